"""Benchmark: which learner the ranker should use, chosen by perturbation-grouped CV on training rows.

Candidates (`synthpert.ranker.LEARNERS`, same features, same folds): LightGBM, scikit-learn's
HistGradientBoosting with LightGBM's settings, and an L2-regularised logistic regression. Only
the training part of the default split is read (validation is carved out first and, like test,
never read): each line's training perturbations are dealt into --folds groups, and each group is
scored by the whole ranker fitted on the others (`synthpert.ranker.compare_learners`). Metric: the
official mean per-gene AUROC, for DE and for direction (on DE-positive rows). One core.

Prints one JSON object (also written to --out): per learner and line the mean and standard
deviation over groups, CPU seconds; over all (line, group) scores the mean, standard deviation and
the paired difference to the chosen learner (mean, sd, groups it loses); the choice per task.
Run: `python bench/ranker_learners.py [--cell-lines k562 hepg2] [--folds 3]`.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, before numpy loads
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from synthpert.baselines import go_knowledge  # noqa: E402
from synthpert.config import DataConfig, EvaluateConfig  # noqa: E402
from synthpert.data.perturbqa import load_split  # noqa: E402
from synthpert.ranker import LEARNER, compare_learners  # noqa: E402

TASKS = ("de", "dir")


def summary(result: dict) -> dict:
    """Mean and sd over groups per line, over all (line, group) scores, and paired to the chosen learner."""
    cells = result["per_cell_line"]
    learners = list(result["mean"])
    scores = {name: {task: np.concatenate([cells[c][name][task] for c in cells]) for task in TASKS} for name in learners}
    out = {}
    for name in learners:
        entry = {"per_cell_line": {c: {**{f"{task}_mean": round(float(np.mean(cells[c][name][task])), 4) for task in TASKS},
                                       **{f"{task}_sd": round(float(np.std(cells[c][name][task], ddof=1)), 4) for task in TASKS},
                                       "cpu_s": round(cells[c][name]["cpu_s"], 1)} for c in cells}}
        for task in TASKS:
            s, best = scores[name][task], scores[result["chosen"][task]][task]
            entry[task] = {"mean": round(float(s.mean()), 4), "sd": round(float(s.std(ddof=1)), 4),
                           "minus_chosen_mean": round(float((s - best).mean()), 4), "minus_chosen_sd": round(float((s - best).std(ddof=1)), 4),
                           "groups_below_chosen": int((s < best).sum()), "groups": len(s)}
        out[name] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell-lines", nargs="+", default=["k562", "hepg2"])
    parser.add_argument("--folds", type=int, default=3, help="perturbation groups, outer (scored) and inner (the ranker's own)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ranker_learners.json"))
    args = parser.parse_args()
    cfg = EvaluateConfig(cv_folds=args.folds)
    wall, cpu = time.perf_counter(), time.process_time()
    pairs = load_split(DataConfig(cell_lines=args.cell_lines))
    result = compare_learners(pairs, go_knowledge(cfg), cfg, args.cell_lines)
    report = {"cell_lines": args.cell_lines, "folds": args.folds, "split": "perturbqa, training rows only (validation carved out, unread)",
              "train_rows": {c: int(((pairs["cell_line"] == c) & (pairs["split"] == "train")).sum()) for c in args.cell_lines},
              "chosen": result["chosen"], "default": LEARNER, "learners": summary(result),
              "raw": {c: {n: {t: [round(v, 4) for v in r[t]] for t in TASKS} for n, r in per.items()} for c, per in result["per_cell_line"].items()},
              "wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1),
              "load_average_1m": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True))
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
