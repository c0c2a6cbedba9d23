"""Benchmark: load all four cell lines, then score all four official test sets (~116k rows).

Goals (one core): load < 3 s, official metrics < 2 s; the bootstrap is timed on its own.
Prints one JSON object: wall and CPU seconds per step (best of --repeats), their ratio to the
goal, and the load average (wall time on a shared machine is inflated by other work; CPU time
is not). Run: `python bench/evaluate.py [--repeats 3] [--bootstrap 1000]`.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, before numpy loads
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from synthpert.config import LABELS  # noqa: E402
from synthpert.data import load_pairs  # noqa: E402
from synthpert.evaluate import _Rows, align, bootstrap_ci, check_predictions, evaluate  # noqa: E402

GOALS = {"load": 3.0, "metrics": 2.0}


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """Best wall and best CPU seconds of `repeats` calls, and the last result."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, default=1000, help="replicates for the separately timed bootstrap")
    args = parser.parse_args()
    report: dict = {"load_average_1m": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count()}

    load_wall, load_cpu, pairs = timed(load_pairs, args.repeats)
    test = pairs[pairs["split"] == "test"]
    rng = np.random.default_rng(0)
    truth_onehot = (test["label"].astype(str).to_numpy()[:, None] == np.asarray(LABELS)[None, :]).astype(float)
    probs = rng.dirichlet([1, 1, 1], len(test)) + 0.3 * truth_onehot  # informative, imperfect predictions
    probs /= probs.sum(axis=1, keepdims=True)
    raw = test[["cell_line", "pert", "gene"]].astype(str).assign(p_up=probs[:, 0], p_down=probs[:, 1], p_none=probs[:, 2])

    metrics_wall, metrics_cpu, result = timed(lambda: evaluate(check_predictions(raw), pairs, bootstrap=0, progress=False), args.repeats)
    rows = _Rows(align(check_predictions(raw), pairs)[0])
    boot_wall, boot_cpu, _ = timed(lambda: bootstrap_ci(rows, args.bootstrap, seed=0, progress=False), 1)

    report.update(
        rows=len(pairs),
        test_rows=len(test),
        load_s=round(load_wall, 3),
        load_cpu_s=round(load_cpu, 3),
        metrics_s=round(metrics_wall, 3),
        metrics_cpu_s=round(metrics_cpu, 3),
        bootstrap_replicates=args.bootstrap,
        bootstrap_s=round(boot_wall, 3),
        bootstrap_cpu_s=round(boot_cpu, 3),
        load_vs_goal=round(load_wall / GOALS["load"], 3),
        metrics_vs_goal=round(metrics_wall / GOALS["metrics"], 3),
        goals_s=GOALS,
        auroc_de=round(result["auroc_de"], 4),
        auroc_dir=round(result["auroc_dir"], 4),
    )
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
