"""Finished stages as a run records them (stage.json holding a synthpert.results model), with
made-up fields: for the tests of keys, plans and the pre-flight, which need finished stages, not
their work."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from synthpert.pipeline import Pipeline
from synthpert.results import EvaluateResult, PredictResult, RegisterResult, ReportResult, StageResult, TracesResult, TrainResult

SUMMARY = {
    "rows": 4, "accepted": 3, "rejected_grade": 1, "rejected_answer": 0, "rejected_malformed": 0, "errored": 0, "completed": 4,
    "teacher_calls": 4, "judge_calls": 4, "cached": 0, "retries": 0, "tokens_in": 800, "tokens_out": 200, "tokens": 1000,
    "cost_usd": 0.0, "tokens_total": 1000, "cost_usd_total": 0.0, "refused": 0, "acceptance_rate": 0.75,
    "grades": {"excellent": 3, "bad": 1}, "wall_s": 1.0, "rows_per_s": 4.0, "run_id": None,
}
MADE_UP: dict[type[StageResult], Callable[[Path], dict[str, Any]]] = {
    TracesResult: lambda out: {"summary": {**SUMMARY, "output": out}, "sft_sha256": "sft"},
    TrainResult: lambda out: {"adapter_path": out / "adapter", "final_loss": 1.5},
    PredictResult: lambda out: {"rows": 8, "errored": 0, "model": out.name, "sha256": out.name},
    EvaluateResult: lambda out: {"models": {}, "validation": {}},
    RegisterResult: lambda out: {"registered": False},
    ReportResult: lambda out: {"markdown": out / "report.md", "html": out / "report.html"},
}


def finish(pipeline: Pipeline, name: str, inputs: dict, kind: type[StageResult], /, **fields: Any) -> Any:
    """Run stage `name` as the pipeline would, its work replaced by made-up `kind` fields (and `fields`)."""
    return pipeline.stage(name, inputs, kind, lambda out: {**MADE_UP[kind](out), **fields})
