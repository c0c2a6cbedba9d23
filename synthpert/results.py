"""What each pipeline stage hands the next: typed results, written to its stage.json and read back.

One module rather than one model per stage module: these records are the contract between the
stages (the pipeline reads them, the report and the plan too), and `pipeline --plan` validates every
finished stage's record without importing the modules that compute them (Ray Data, torch), so it
stays a matter of seconds. A record that no longer validates (an older version wrote it) is not a
finished stage: the stage runs again.

`Metrics` and the training `memory` plan keep the figures no other stage reads as they come
(evaluate.evaluate and train.memory own their many fields); the fields another stage reads are typed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict


class StageResult(BaseModel):
    """What Pipeline.stage records for every finished stage, beside the stage's own fields."""

    stage: str
    key: str
    dir: Path
    wall_s: float
    inputs: dict[str, Any]  # the declared fields and upstream inputs, as pipeline.declared_inputs made them


class TraceSummary(BaseModel):
    """generate.run's numbers: outcomes, calls, tokens, cost (the report's traces table)."""

    rows: int
    accepted: int
    rejected_grade: int
    rejected_answer: int
    rejected_malformed: int
    errored: int
    completed: int
    teacher_calls: int
    judge_calls: int
    cached: int
    retries: int
    tokens_in: int
    tokens_out: int
    tokens: int
    cost_usd: float
    tokens_total: int
    cost_usd_total: float
    refused: int
    acceptance_rate: float
    grades: dict[str, int]
    wall_s: float
    rows_per_s: float
    output: Path
    run_id: Optional[str] = None


class TracesResult(StageResult):
    summary: TraceSummary
    sft_sha256: str  # the kept traces' digest: what the train stages' keys hash
    run_id: Optional[str] = None


class TrainResult(StageResult):
    """train.train's summary: the adapter, its losses and speed, where MLflow has it."""

    adapter_path: Path
    final_loss: Optional[float] = None
    first_loss: Optional[float] = None
    val_loss: Optional[float] = None
    steps: Optional[int] = None
    tokens: Optional[int] = None
    tokens_per_s: Optional[float] = None
    train_time_s: Optional[float] = None
    tokens_per_cpu_s: Optional[float] = None
    peak_memory_mb: Optional[float] = None
    peak_memory_mb_per_worker: Optional[list[Optional[float]]] = None
    worker_nodes: Optional[list[str]] = None  # each rank's Ray node id, by rank (after a restart: the last attempt's)
    memory: dict[str, Any] = {}
    chat_rendering: Optional[str] = None  # by the base model's chat template, or as written where it drops reasoning (synthpert.chat)
    lora_b_nonzero: Optional[int] = None
    train_rows: Optional[int] = None
    validation_rows: Optional[int] = None
    train_examples: Optional[int] = None
    validation_examples: Optional[int] = None
    own_rendered_examples: Optional[int] = None
    source_rows: Optional[int] = None
    longest_row: Optional[int] = None
    mlflow_run_id: Optional[str] = None
    traces_run_id: Optional[str] = None
    model_uri: Optional[str] = None  # models:/NAME@MODE when registered, else the logged model
    model_version: Optional[str] = None


class PredictResult(StageResult):
    rows: int
    errored: int
    model: str
    sha256: str  # predictions.parquet's digest: what the evaluate key hashes


class Answers(BaseModel):
    """How much of what a model was asked it answered: every comparison is on pairs all ranked models
    answered, so a model's coverage is shown beside its scores."""

    asked: int
    answered: int
    errors: int  # the call failed: the pair has no prediction
    direction_errors: int = 0  # the separate direction question failed: its derived direction is scored
    coverage: float  # answered / asked


class Metrics(BaseModel):
    """One model's scores on one part (evaluate.evaluate): the headline figures typed, per cell line
    the same, and the rest (coverage, bootstrap shifts, per-gene AUROCs) carried as they are."""

    model_config = ConfigDict(extra="allow")

    auroc_de: Optional[float] = None
    auroc_dir: Optional[float] = None
    accuracy: Optional[float] = None
    macro_f1: Optional[float] = None
    trivial_accuracy: Optional[float] = None
    n: Optional[int] = None
    ci: dict[str, Optional[list[Optional[float]]]] = {}
    per_cell_line: dict[str, Metrics] = {}
    answers: Optional[Answers] = None
    ranked: Optional[bool] = None  # False: under evaluate.min_coverage (shown, not ranked); None per cell line


class EvaluateResult(StageResult):
    models: dict[str, Metrics]  # test: reported only
    validation: dict[str, Metrics]  # what the champion is chosen on
    left_out: dict[str, int] = {}  # by part: asked pairs not every ranked model answered, scored for none


class RegisterResult(StageResult):
    """tracking.promote_if_better's answer, or registered=False when there was nothing to register."""

    registered: bool = True
    name: Optional[str] = None
    version: Optional[str] = None
    score: Optional[float] = None
    previous: Optional[str] = None
    previous_score: Optional[float] = None
    promoted: bool = False
    uri: Optional[str] = None
    refused: Optional[str] = None  # why the version may not take the alias (under evaluate.min_coverage)


class ReportResult(StageResult):
    markdown: Path
    html: Path
