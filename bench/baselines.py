"""Benchmark: the non-LLM baselines on all four cell lines, as a user runs them, timed.

Each method runs as its own `synthpert baseline --cell-line all --method M --json` process (one
thread: OMP_NUM_THREADS=1), so its wall time, CPU time and peak RSS are its own. Goal: the
ranker, bootstrap CIs included, in under 10 minutes on a 2-core box. Prints one JSON object:
per method the time, memory and the official per-gene AUROCs (DE, direction) per cell line
with their 95 % CIs, and the load average (wall time on a shared machine is inflated by other
work; CPU time is not). Run: `python bench/baselines.py [--methods kernel twoside ranker] [--bootstrap 1000]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

GOAL_S = 600.0


def run(method: str, bootstrap: int, split: str, out_dir: str) -> dict:
    """One baseline run in a child process: its wall/CPU seconds, peak RSS and scores."""
    command = [sys.executable, "-m", "synthpert", "baseline", "--cell-line", "all", "--method", method, "--split", split,
               "--bootstrap", str(bootstrap), "--output-dir", out_dir, "--json"]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout:
        proc = subprocess.Popen(command, stdout=stdout, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(command)} exited {os.waitstatus_to_exitcode(status)}")
        stdout.seek(0)
        result = json.loads(stdout.read().strip().splitlines()[-1])

    def scores(m: dict) -> dict:
        ci = m.get("ci") or {}
        return {key: [round(m[key], 4), *[round(v, 4) for v in ci.get(key, [])]] for key in ("auroc_de", "auroc_dir")}

    return {
        "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "vs_goal": round(wall / GOAL_S, 3), "overall": scores(result),
        "per_cell_line": {cell: scores(m) for cell, m in result["per_cell_line"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["kernel", "twoside", "ranker"])
    parser.add_argument("--bootstrap", type=int, default=1000, help="replicates for the CIs (the CLI's default)")
    parser.add_argument("--split", default="perturbqa")
    args = parser.parse_args()
    report: dict = {"load_average_1m": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(), "goal_s": GOAL_S,
                    "bootstrap": args.bootstrap, "split": args.split}
    with tempfile.TemporaryDirectory() as out_dir:
        report["methods"] = {method: run(method, args.bootstrap, args.split, out_dir) for method in args.methods}
    report["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
