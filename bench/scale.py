"""The paper's scale by simulation: `synthpert generate` over N tuples, killed at 60 % and resumed.

The paper's traces stage makes ~75,000 teacher and as many judge calls (configs/paper.yaml: 15 %
of four lines' training pairs). This runs that stage as a user does (`python -m synthpert
generate --config configs/paper.yaml`, Ray Data actors, call cache, Parquet outputs) with
`data.limit=N` over the same four lines, against tests/fake_api.py in its own process:
lognormal latency (median 1 s, p99 ~4 s), 2 % of attempts answered 429 with Retry-After. When
the server has answered 60 % of the 2N calls (require_answer_match=false: every row is judged,
so 2N is exact), the run's process group gets SIGKILL; the same command then resumes it.

Reports (one JSON object, last line, and --out): answered calls/s overall and over the first and
last 10 % of answers (server clock; goal last/first >= 0.9), wall times, peak RSS of the driver
and the Ray actors (psutil, once a second), the cache's size and the RSS at each tenth of the
calls (growth per call), whether every tuple is in attempts.parquet exactly once and whether any
call content was answered twice; then bench/evaluate.py and bench/baselines.py over all test rows.
Every wait has a deadline; the server and every process the runs started are stopped at exit.

    python bench/scale.py [--tuples 75000] [--out scale.json] [--methods kernel twoside ranker]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import pandas as pd
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import baselines  # noqa: E402
from bench.generate import fake_server, stats_url  # noqa: E402
from synthpert.cluster import code_env  # noqa: E402
from synthpert.llm.cache import CallCache  # noqa: E402
from tests.fake_api import finished_keys  # noqa: E402

KILL_AT = 0.6
GRACE_S = 30.0  # how long a killed run's orphans get to exit by themselves
MB = 2**20


def generate_cli(base_url: str, out: Path, tuples: int, log: Path) -> subprocess.Popen:
    """The paper's traces stage as a user runs it, pointed at the fake server, in its own process group."""
    sets = [f"data.limit={tuples}", "data.fraction=null", "generate.require_answer_match=false", "tracking.enabled=false"]
    command = [sys.executable, "-m", "synthpert", "generate", "--config", str(REPO / "configs/paper.yaml"),
               "--teacher-base-url", base_url, "--teacher-model", "fake-teacher", "--judge-model", "fake-judge",
               "--output", str(out), "--yes", "--json", *(arg for s in sets for arg in ("--set", s))]
    env = {**os.environ, "OPENAI_API_KEY": "sk-loopback-fake"}
    with open(log.with_suffix(".json"), "w") as stdout, open(log, "w") as stderr:
        return subprocess.Popen(command, cwd=out.parent, env=env, stdout=stdout, stderr=stderr, start_new_session=True)


def cache_bytes(out: Path, files: str = "calls.sqlite*") -> int:
    return sum(p.stat().st_size for p in out.glob(files))


class Watch:
    """Samples a run's process tree and the server's counters: peaks per run, and one row per tenth of the calls."""

    def __init__(self, base_url: str, out: Path, calls: int):
        self.base_url, self.out = base_url, out
        self.step = self.next_mark = max(1, calls // 10)
        self.peaks: list[dict[str, int]] = []
        self.progress: list[dict] = []
        self.seen: dict[int, psutil.Process] = {}
        self.started = time.monotonic()

    def rss(self, proc: subprocess.Popen) -> dict[str, int]:
        """RSS of the driver, of the biggest Ray Data actor, of all actors and of the whole tree."""
        try:
            root = psutil.Process(proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return {}
        self.seen.update((p.pid, p) for p in tree)
        sizes = {}
        for p in tree:
            try:
                sizes[p.pid] = (p.memory_info().rss, "MapWorker" in " ".join(p.cmdline()))
            except psutil.Error:
                pass
        actors = [rss for rss, actor in sizes.values() if actor]
        return {"driver": sizes.get(proc.pid, (0,))[0], "actor_max": max(actors, default=0), "actors": sum(actors),
                "tree": sum(rss for rss, _ in sizes.values())}

    def run(self, proc: subprocess.Popen, deadline: float, stop_at: int | None = None) -> int:
        """Until the run exits, or SIGKILL its process group once the server has answered `stop_at` calls."""
        peak = dict.fromkeys(("driver", "actor_max", "actors", "tree"), 0)
        self.peaks.append(peak)
        while proc.poll() is None:
            answered = httpx.get(stats_url(self.base_url)).json()["answered"]
            rss = self.rss(proc)
            peak.update((k, max(v, rss.get(k, 0))) for k, v in peak.items())
            if answered >= self.next_mark:
                self.next_mark = (answered // self.step + 1) * self.step
                size = cache_bytes(self.out)
                self.progress.append({"calls": answered, "elapsed_s": round(time.monotonic() - self.started, 1),
                                      "cache_mb": round(size / MB, 2), "wal_mb": round(cache_bytes(self.out, "*-wal") / MB, 2),
                                      "cache_bytes_per_call": round(size / max(answered, 1)),
                                      **{f"{k}_rss_mb": round(v / MB) for k, v in rss.items()}})
            if stop_at is not None and answered >= stop_at:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return answered
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise SystemExit(f"generation still running at its deadline; see {self.out.parent}")
            time.sleep(1.0)
        return proc.wait()

    def alive(self) -> Counter:
        """Processes the runs started that are still alive, by name."""
        names = Counter()
        for p in self.seen.values():
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    names[p.name()] += 1
        return names

    def reap(self, grace_s: float = 0.0) -> dict:
        """Who outlived the run (a Ray process outside its group): at once, how long they lived on (up to
        `grace_s`) and who was still there; then SIGKILL them."""
        outlived, start = {"at_once": self.alive()}, time.monotonic()
        while outlived["at_once"] and self.alive() and time.monotonic() < start + grace_s:
            time.sleep(1.0)
        outlived.update(lived_on_s=round(time.monotonic() - start, 1), left=self.alive())
        for p in self.seen.values():
            with contextlib.suppress(psutil.Error):
                p.kill()
        return outlived


def rates(times: list[float], rerun_start: float) -> dict:
    """Answered calls/s over both runs' time from first to last answer, and over the first and last tenth of the answers."""
    times = sorted(times)
    k = max(1, len(times) // 10)
    before, after = [t for t in times if t < rerun_start], [t for t in times if t >= rerun_start]
    active = sum(part[-1] - part[0] for part in (before, after) if part)
    first, last = k / (times[k] - times[0]), k / (times[-1] - times[-1 - k])
    return {"calls_per_s": round(len(times) / active, 1), "calls_per_s_first_10pct": round(first, 1),
            "calls_per_s_last_10pct": round(last, 1), "last_over_first": round(last / first, 3)}


def scoring(methods: list[str], bootstrap: int) -> dict:
    """bench/evaluate.py and bench/baselines.py as they are, over all test rows, each in its own process."""
    evaluate = subprocess.run([sys.executable, str(REPO / "bench/evaluate.py"), "--repeats", "1", "--bootstrap", str(bootstrap)],
                              capture_output=True, text=True, check=True, timeout=3600)
    with tempfile.TemporaryDirectory() as tmp:
        return {"evaluate": json.loads(evaluate.stdout.splitlines()[-1]),
                "baselines": {m: baselines.run(m, bootstrap, "perturbqa", tmp) for m in methods}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tuples", type=int, default=75_000)
    parser.add_argument("--latency", type=float, default=1.0, help="median seconds per call")
    parser.add_argument("--latency-sigma", type=float, default=0.6, help="sigma of log latency (0.6: p99 = 4x the median)")
    parser.add_argument("--rate-429", type=float, default=0.02)
    parser.add_argument("--retry-after", type=float, default=1.0)
    parser.add_argument("--timeout-s", type=float, help="per run (default 600 + 0.1 s a tuple)")
    parser.add_argument("--methods", nargs="*", default=["kernel", "twoside", "ranker"], help="baselines to time")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.update(code_env()["env_vars"])  # the runs and the scoring import this checkout's synthpert
    calls, timeout = 2 * args.tuples, args.timeout_s or 600 + 0.1 * args.tuples
    concurrency = 64  # configs/paper.yaml, per endpoint
    mean_latency = args.latency * math.exp(args.latency_sigma**2 / 2)
    report: dict = {"tuples": args.tuples, "calls_expected": calls, "latency_median_s": args.latency,
                    "latency_sigma": args.latency_sigma, "rate_429": args.rate_429, "concurrency_per_endpoint": concurrency,
                    "ideal_calls_per_s": round(2 * concurrency / mean_latency, 1), "load_avg_1m": os.getloadavg()[0]}
    server_args = ["--latency", str(args.latency), "--latency-sigma", str(args.latency_sigma),
                   "--rate-429", str(args.rate_429), "--retry-after", str(args.retry_after)]
    with tempfile.TemporaryDirectory() as tmp, fake_server(*server_args) as base_url:
        out = Path(tmp) / "traces"
        out.mkdir()
        watch = Watch(base_url, out, calls)
        try:
            start = time.monotonic()
            killed = watch.run(generate_cli(base_url, out, args.tuples, Path(tmp) / "killed.log"), start + timeout, int(KILL_AT * calls))
            if killed < KILL_AT * calls:
                raise SystemExit(f"the first run exited ({killed}) before {KILL_AT:.0%} of the calls: too few tuples?")
            killed_wall = time.monotonic() - start
            outlived = watch.reap(GRACE_S)
            finished = finished_keys(out / "calls.sqlite")
            answered_after_kill = httpx.get(stats_url(base_url)).json()["answered"] - killed
            rerun_start = time.monotonic()
            if watch.run(generate_cli(base_url, out, args.tuples, Path(tmp) / "rerun.log"), rerun_start + timeout) != 0:
                raise SystemExit(f"the re-run failed:\n{(Path(tmp) / 'rerun.log').read_text()[-3000:]}")
            rerun_wall = time.monotonic() - rerun_start
        finally:
            outlived_rerun = watch.reap()
        summary = json.loads((Path(tmp) / "rerun.json").read_text().strip().splitlines()[-1])
        stats = httpx.get(stats_url(base_url), params={"times": 1}).json()
        rows = pd.read_parquet(out / "attempts.parquet", columns=["tuple_id"])["tuple_id"]
        cache = CallCache(out / "calls.sqlite")
        cache_rows, size = len(cache), cache_bytes(out)
        cache.close()
    report.update(
        calls=stats["answered"], requests=stats["requests"], max_in_flight=stats["max_in_flight"],
        **rates(stats["answered_at"], rerun_start),
        wall_s={"killed_run": round(killed_wall, 1), "rerun": round(rerun_wall, 1), "total": round(killed_wall + rerun_wall, 1)},
        peak_rss_mb={run: {k: round(v / MB) for k, v in peak.items()} for run, peak in zip(("killed_run", "rerun"), watch.peaks)},
        progress=watch.progress,
        cache={"rows": cache_rows, "mb": round(size / MB, 1), "bytes_per_row": round(size / max(cache_rows, 1))},
        kill={"at_calls": killed, "cached_after": len(finished), "answered_after": answered_after_kill, "outlived": outlived},
        resume={"rows": len(rows), "unique_rows": int(rows.nunique()), "every_row_once": len(rows) == rows.nunique() == args.tuples,
                "answered_twice": len(stats["repeated"]), "cached_answered_twice": len(finished & set(stats["repeated"])),
                "cache_rows_are_calls": cache_rows == calls, "outlived": outlived_rerun,
                "rerun_cached": summary["cached"], "rerun_calls": summary["teacher_calls"] + summary["judge_calls"],
                "errored": summary["errored"]},
    )
    report["scoring"] = scoring(args.methods, args.bootstrap)
    report["load_avg_1m_end"] = os.getloadavg()[0]  # a shared machine: read the numbers with this
    line = json.dumps(report)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
