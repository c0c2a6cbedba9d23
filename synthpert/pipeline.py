"""The SynthPert pipeline: traces (teacher + judge) -> train cot and raw -> predict -> evaluate
-> register -> report.

Every stage writes into `<run_dir>/<stage>-<key>/`, where the key hashes exactly what the stage
declares it reads (DECLARED): the config fields, our endpoint's identity when it calls it, and its
upstream stages' keys or output digests, so a change upstream changes every key downstream. A
directory that holds `stage.json` (the stage's typed result, synthpert.results, with those inputs)
is a finished stage and is skipped, so a re-run after a failure resumes where it stopped and a
second run of the same config recomputes nothing; one an older version wrote that no longer
validates runs again. `plan` says, without running anything, which stages would run and which
input changed. All stage runs nest under one MLflow parent run per invocation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import pandas as pd
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from synthpert import console, prompts, tracking
from synthpert.artifacts import _atomic_write, read_manifest
from synthpert.config import LABELS, Config, EndpointConfig
from synthpert.errors import SynthPertError
from synthpert.results import (
    EvaluateResult,
    Metrics,
    PredictResult,
    RegisterResult,
    ReportResult,
    StageResult,
    TraceSummary,
    TracesResult,
    TrainResult,
)

STAGE_FILE = "stage.json"
STUDENT = "student-cot"  # the served names of the two adapters
RAW = "student-raw"
CHAMPION = "champion"
MODES = ("cot", "raw")  # the two students: reasoning traces, and the raw label only
SCORES = ("auroc_de", "auroc_dir", "accuracy", "macro_f1", "trivial_accuracy")
R = TypeVar("R", bound=StageResult)


@dataclasses.dataclass(frozen=True)
class Declared:
    """What a stage reads, as data: its key derives from exactly these, so the plan can name what
    changed. `fields` are dotted config fields (a section: each of its fields but those in IGNORED);
    `inputs` name what it takes from upstream stages (keys, digests) or code (prompt versions);
    `calls` names the endpoints it asks: one without a base_url (ours) makes our endpoint's identity
    (ServeConfig.ANSWERS) an input."""

    fields: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    calls: tuple[str, ...] = ()


# Where results go, how fast they are made, with which key variable and under which budget (a stage
# stopped by its budget does not finish) does not change what they are.
IGNORED = (
    "*.output_dir", "*.cache_path", "*.api_key_env", "generate.actors", "generate.batch_size",
    "*.max_cost_usd", "generate.confirm_above_usd",
    # reasoning_tokens: hidden reasoning's room decides which calls are cut off (errors), not what an answered call says
    *(f"generate.*.{f}" for f in ("max_concurrency", "requests_per_minute", "tokens_per_minute", "timeout_s", "max_retries", "reasoning_tokens")),
    "train.mode",  # the pipeline trains both modes; the mode is an input of its own
    *(f"train.{f}" for f in ("storage_path", "checkpoints_to_keep", "max_failures", "log_every_steps", "memory_budget_gb", "placement_strategy")),
)
DECLARED = {
    "traces": Declared(("data", "generate"), ("prompts",), ("generate.teacher", "generate.judge")),
    "train": Declared(("train", "data.validation_fraction", "data.seed"), ("traces.sft", "mode")),
    # every model answers greedily with the teacher's other sampling settings, reasoning up to evaluate.max_tokens
    # (the teacher's max_tokens when unset); which model is its own input
    "predict": Declared(("data", "evaluate.limit", "evaluate.seed", "evaluate.direction", "evaluate.max_tokens",
                         *(f"generate.teacher.{f}" for f in ("max_tokens", "top_p", "seed"))), ("model", "prompts"), ("endpoint",)),
    "evaluate": Declared(("data", "evaluate"), ("predictions",)),
    "register": Declared(("train.registered_model_name", "data.split", "tracking"), ("train-cot", "evaluate")),
    # the report prints the settings (and how our endpoint scored) beside its upstream results
    "report": Declared(("data", "generate", "train", "evaluate", "serve.engine", "serve.dtype", "serve.use_gpu", "serve.engine_kwargs"),
                       ("traces", "train", "evaluate")),
}


def _leaves(node: Any, path: str) -> dict[str, Any]:
    """The dotted leaf fields under `path` of a config (a plain value is its own leaf)."""
    if isinstance(node, BaseModel):
        return {k: v for name in type(node).model_fields for k, v in _leaves(getattr(node, name), f"{path}.{name}").items()}
    return {} if any(fnmatch.fnmatchcase(path, pattern) for pattern in IGNORED) else {path: to_jsonable_python(node)}


def read_fields(cfg: Config, dotted: tuple[str, ...]) -> dict[str, Any]:
    """The values of the declared fields, by dotted name."""
    values: dict[str, Any] = {}
    for path in dotted:
        node: Any = cfg
        for part in path.split("."):
            node = getattr(node, part)
        values |= _leaves(node, path)
    return values


def declared_inputs(cfg: Config, kind: str, calls: tuple[EndpointConfig, ...] = (), **inputs: Any) -> dict[str, Any]:
    """A stage's inputs as its declaration says: the fields it reads and what it takes from upstream,
    as JSON reads them back (so a recorded run compares equal)."""
    declared = DECLARED[kind]
    if set(inputs) != set(declared.inputs) or len(calls) != len(declared.calls):
        raise TypeError(f"stage {kind} declares inputs {declared.inputs} and calls {declared.calls}")
    cfg = cfg.model_copy(update={"serve": cfg.serve.resolved()})  # `auto` as this machine decides it
    fields = read_fields(cfg, declared.fields)
    if any(endpoint.base_url is None for endpoint in calls):
        fields |= cfg.serve.identity()
    return json.loads(json.dumps({"fields": fields, "inputs": inputs}, sort_keys=True, default=str))


def stage_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


def changed(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The declared fields and inputs whose values differ between two stages' recorded inputs."""
    names = []
    for part in ("fields", "inputs"):
        old, new = before.get(part, {}), after.get(part, {})
        names += sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>"))
    return names


def standings(models: dict[str, Metrics]) -> dict[str, dict[str, Any]]:
    """Each model's headline scores with its answered / asked and error counts and whether it is
    ranked: what MLflow, the registry's tags and the CLI show (all on the same pairs)."""
    return {name: {**m.model_dump(include=set(SCORES)), **(m.answers.model_dump() if m.answers else {}), "ranked": m.ranked}
            for name, m in models.items()}


def official_score(metrics: dict) -> float:
    """One number to rank models by: the mean of the official DE and direction AUROCs."""
    values = [metrics[k] for k in ("auroc_de", "auroc_dir") if metrics.get(k) is not None]
    return sum(values) / len(values) if values else float("nan")


class Pipeline:
    """Runs the stages in order; remembers which ran and which were skipped."""

    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg = cfg
        self.root = Path(cfg.run_dir).resolve()
        self.progress = progress
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def stage(self, name: str, inputs: dict, kind: type[R], fn: Callable[[Path], dict[str, Any]] | None) -> R:
        """`fn(out_dir)` once per key: its fields, with the record (key, dir, inputs ...), are validated
        as `kind` at once (a stage that makes a wrong result fails, not the stage that reads it) and
        kept in `stage.json` for later runs."""
        key = stage_key(inputs)
        finished = self.result(name, key, kind)
        if finished is not None:
            self.skipped.append(name)
            console.finish(name, "skipped", 0.0, finished.dir)
            return finished
        out = self.root / f"{name}-{key}"
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        console.start(name)
        fields = fn(out)
        result = kind.model_validate({**fields, "stage": name, "key": key, "dir": out, "wall_s": round(time.time() - started, 2), "inputs": inputs})
        text = json.dumps(result.model_dump(mode="json"), indent=2, sort_keys=True)
        _atomic_write(out / STAGE_FILE, lambda tmp: Path(tmp).write_text(text))
        self.ran.append(name)
        console.finish(name, "ran", result.wall_s, out)
        return result

    def _record(self, name: str, key: str, kind: type[R]) -> R | ValidationError | None:
        """A finished stage's result; None when it has not run, the error when its stage.json does
        not validate as `kind` (an older version wrote it)."""
        path = self.root / f"{name}-{key}" / STAGE_FILE
        if not path.is_file():
            return None
        try:
            return kind.model_validate_json(path.read_text())
        except ValidationError as error:
            return error

    def result(self, name: str, key: str, kind: type[R]) -> R | None:
        """A finished stage's result, None when it has to run (never ran, or recorded by an older version)."""
        record = self._record(name, key, kind)
        return None if isinstance(record, ValidationError) else record

    def look(self, name: str, inputs: dict, kind: type[R]) -> tuple[Step, R | None]:
        """Whether a stage with these inputs would run, and why; its result when it is finished."""
        key = stage_key(inputs)
        record = self._record(name, key, kind)
        if isinstance(record, ValidationError):
            return Step(name, key, "run", f"its stage.json, from an older version, is not a {kind.__name__} "
                                          f"({record.error_count()} errors, first at {_where(record)}): it runs again"), None
        if record is not None:
            return Step(name, key, "skip", "finished"), record
        runs = sorted(self.root.glob(f"{name}-{'?' * len(key)}/{STAGE_FILE}"), key=lambda p: p.stat().st_mtime)
        if not runs:
            return Step(name, key, "run", "never run"), None
        recorded = json.loads(runs[-1].read_text()).get("inputs")
        if recorded is None:
            return Step(name, key, "run", f"last run {runs[-1].parent.name} recorded no inputs"), None
        return Step(name, key, "run", "changed since the last run: " + (", ".join(changed(recorded, inputs)) or "the key's derivation")), None

    # ---- each stage's declared inputs (DECLARED) ----------------------------------------------
    def traces_inputs(self) -> dict:
        # the prompts' versions (templates, rubric, principles, context text) are inputs: traces written
        # with other wording are regenerated, never reused
        g = self.cfg.generate
        return declared_inputs(self.cfg, "traces", (g.teacher, g.judge), prompts=prompts.PromptSet.from_config(g).versions)

    def train_inputs(self, traces: TracesResult, mode: str) -> dict:
        return declared_inputs(self.cfg, "train", mode=mode, **{"traces.sft": traces.sft_sha256})

    def predict_inputs(self, spec: ModelSpec) -> dict:
        versions = prompts.PromptSet.from_config(self.cfg.generate).versions
        return declared_inputs(self.cfg, "predict", (spec.endpoint,), model=spec.identity,
                               prompts=[versions["student"], versions["student_direction"]])

    def evaluate_inputs(self, predictions: dict[str, PredictResult]) -> dict:
        return declared_inputs(self.cfg, "evaluate", predictions={name: p.sha256 for name, p in predictions.items()})

    def register_inputs(self, student: TrainResult, evaluation: EvaluateResult) -> dict:
        return declared_inputs(self.cfg, "register", **{"train-cot": student.key, "evaluate": evaluation.key})

    def report_inputs(self, traces: TracesResult, trained: dict[str, TrainResult], evaluation: EvaluateResult) -> dict:
        return declared_inputs(self.cfg, "report", traces=traces.key, train={mode: t.key for mode, t in trained.items()},
                               evaluate=evaluation.key)

    # ---- stages -----------------------------------------------------------------------------
    def traces(self) -> TracesResult:
        from synthpert import generate

        def run(out: Path) -> dict[str, Any]:
            cfg = self.cfg.model_copy(deep=True)
            cfg.generate.output_dir = out
            summary = TraceSummary.model_validate(generate.run(cfg, progress=self.progress))
            if summary.accepted == 0:
                raise SynthPertError(
                    f"no trace was kept out of {summary.rows} (grades {summary.grades}): nothing to train on; "
                    "loosen generate.keep / generate.require_answer_match or use a stronger teacher"
                )
            return {"summary": summary, "sft_sha256": read_manifest(out)["outputs"]["sft"]["sha256"], "run_id": summary.run_id}

        return self.stage("traces", self.traces_inputs(), TracesResult, run)

    def train(self, traces: TracesResult, mode: str) -> TrainResult:
        from synthpert.train import train

        def run(out: Path) -> dict[str, Any]:
            cfg = self.cfg.model_copy(deep=True)
            cfg.train.mode = mode  # registered under its own name (tracking.registered_name)
            return train(cfg, traces.dir, output_dir=out, resume=True)  # a crashed attempt continues

        return self.stage(f"train-{mode}", self.train_inputs(traces, mode), TrainResult, run)

    def predictions(self, models: dict[str, ModelSpec]) -> dict[str, PredictResult]:
        """Every model over the same test tuples; our endpoint is started only if some are missing."""
        from synthpert import predict
        from synthpert.data import eval_tuples
        from synthpert.llm.endpoint import api_key

        inputs = {name: self.predict_inputs(spec) for name, spec in models.items()}
        finished = {name: self.result(f"predict-{name}", stage_key(inputs[name]), PredictResult) for name in models}
        if all(result is not None for result in finished.values()):
            return {name: self.stage(f"predict-{name}", inputs[name], PredictResult, None) for name in models}
        tuples = eval_tuples(self.cfg.data, self.cfg.evaluate)
        adapters = {name: str(spec.adapter) for name, spec in models.items() if spec.adapter is not None}
        with contextlib.ExitStack() as stack:
            own_url = None
            if any(spec.endpoint.base_url is None for spec in models.values()):
                from synthpert.serving import running

                serve_cfg = self.cfg.serve.model_copy(update={"adapters": {**self.cfg.serve.adapters, **adapters}})
                own_url = stack.enter_context(running(serve_cfg))

            def run(out: Path, spec: ModelSpec) -> dict[str, Any]:
                endpoint = spec.endpoint
                frame = predict.predict(
                    self.cfg, tuples, endpoint, endpoint.base_url or own_url, spec.mode, out,
                    api_key=api_key(endpoint, self.cfg), score=endpoint.base_url is None, progress=self.progress,
                )
                return {"rows": len(frame), "errored": int(frame["llm_error"].notna().sum()), "model": endpoint.model,
                        "sha256": read_manifest(out)["outputs"]["predictions"]["sha256"]}

            # all models at once: their rows share the endpoint's decode batches; a failure surfaces
            # after the others have finished (and been kept)
            with ThreadPoolExecutor(len(models)) as pool:
                futures = {name: pool.submit(self.stage, f"predict-{name}", inputs[name], PredictResult, functools.partial(run, spec=spec))
                           for name, spec in models.items()}
            return {name: future.result() for name, future in futures.items()}

    def evaluate(self, predictions: dict[str, PredictResult]) -> EvaluateResult:
        """Every model and baseline on the validation tuples (what choices are made on) and on the
        test tuples (reported only): `models` holds the test metrics, `validation` the others. In
        each part all are scored on the same pairs (evaluate.like_with_like), each with its
        answered / asked and error counts; `left_out` counts the pairs that leaves out."""
        from synthpert import evaluate
        from synthpert.artifacts import read_table
        from synthpert.data import evaluation_view, load_split

        def run(out: Path) -> dict[str, Any]:
            e = self.cfg.evaluate
            truth = load_split(self.cfg.data)
            frames = {name: read_table(p.dir, "predictions") for name, p in predictions.items()}
            results: dict[str, Any] = {"validation": {}, "models": {}, "left_out": {}}
            tuples = next(iter(frames.values()))
            baselines = baseline_predictions(self.cfg, truth, tuples[list(evaluate.KEYS)])
            for part, where in (("validation", "validation"), ("test", "models")):
                view = evaluation_view(truth, part)
                keys = evaluate.pair_index(tuples[tuples["split"] == part])
                if keys.empty:
                    continue
                asked = {name: frame[frame["split"] == part] for name, frame in frames.items()}
                asked.update({name: frame[evaluate.pair_index(frame).isin(keys)] for name, frame in baselines.items()})
                scored, ranked, results["left_out"][part] = evaluate.like_with_like(asked, keys, e.min_coverage)
                for name, frame in scored.items():
                    standing = {"answers": evaluate.answer_counts(asked[name]), "ranked": name in ranked}
                    if frame.empty:  # answered none of the compared pairs: its coverage is all there is to show
                        results[where][name] = Metrics(n=0, **standing)
                        continue
                    metrics = evaluate.evaluate(frame, view, bootstrap=e.bootstrap, seed=e.seed, require_complete=e.require_complete,
                                                progress=self.progress)
                    for cell, scope in metrics["per_cell_line"].items():
                        scope["answers"] = evaluate.answer_counts(asked[name][asked[name]["cell_line"] == cell])
                    metrics.update(standing)
                    evaluate.write_report(metrics, out / part / name)
                    results[where][name] = Metrics.model_validate(metrics)
            return results

        return self.stage("evaluate", self.evaluate_inputs(predictions), EvaluateResult, run)

    def register(self, student: TrainResult, validation: dict[str, float | None], test: dict[str, float | None],
                 evaluation: EvaluateResult) -> RegisterResult:
        """Tag the student's model version with its validation and test scores; alias it champion
        if it beats the holder on VALIDATION (test scores are reported, never used to choose) and
        answered evaluate.min_coverage of its pairs in both parts (`unranked`)."""
        name = tracking.registered_name(self.cfg)

        def run(out: Path) -> dict[str, Any]:
            if not student.model_version or not name:
                return {"registered": False}
            tags = {f"synthpert.{part}.{k}": v for part, scores in (("validation", validation), ("test", test))
                    for k, v in scores.items() if isinstance(v, (int, float))}
            return tracking.promote_if_better(name, student.model_version, official_score(validation), CHAMPION,
                                              tags={**tags, "synthpert.split": self.cfg.data.split},
                                              refused=unranked(evaluation, STUDENT, self.cfg.evaluate.min_coverage))

        return self.stage("register", self.register_inputs(student, evaluation), RegisterResult, run)

    def report(self, traces: TracesResult, trained: dict[str, TrainResult], evaluation: EvaluateResult) -> ReportResult:
        from synthpert import report

        def run(out: Path) -> dict[str, Any]:
            return report.write(out, self.cfg, traces=traces, trained=trained, evaluation=evaluation)

        return self.stage("report", self.report_inputs(traces, trained, evaluation), ReportResult, run)


def unranked(evaluation: EvaluateResult, name: str, min_coverage: float) -> str | None:
    """Why model `name` is not ranked (it answered under `min_coverage` of a part's pairs, so its
    scores are on other pairs than the rest's), None when it is."""
    for part, models in (("validation", evaluation.validation), ("test", evaluation.models)):
        metrics = models.get(name)
        if metrics is not None and metrics.ranked is False:
            return f"{name} answered {metrics.answers.coverage:.1%} of its {part} pairs, under evaluate.min_coverage={min_coverage}"
    return None


def _where(error: ValidationError) -> str:
    """The first invalid field of a record, dotted (`summary.rows`)."""
    return ".".join(map(str, error.errors()[0]["loc"])) or "the top"


def baseline_predictions(cfg: Config, truth: pd.DataFrame, asked: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Non-LLM predictions for the tuples the LLMs were asked: always-"not DE", the GO baselines,
    the learned ranker and, for a held-out cell line, the lookup of the same pair in the other
    lines. The baselines fit, and choose their hyper-parameters by perturbation-grouped folds, on
    the train rows of `truth` only, and predict the asked tuples alone: train rows are the same
    whichever part is scored, so one fit predicts the validation and the test tuples (the ranker's
    fit is most of the evaluate stage's time)."""
    from synthpert.baselines import go_knowledge, run_baseline

    knowledge = go_knowledge(cfg.evaluate, cfg.data.data_dir)  # read once for every method
    methods = [*cfg.evaluate.baselines, *(["transfer"] if cfg.data.split.startswith("holdout:") else [])]
    asked = asked[["cell_line", "pert", "gene"]].astype(str).reset_index(drop=True)
    out = {"trivial": asked.assign(p_up=0.0, p_down=0.0, p_none=1.0, answer=LABELS[2])}
    for method in methods:
        out[method], _ = run_baseline(truth, method, cfg.evaluate, knowledge=knowledge, progress=False, query=asked)
    return out


def predictor(cfg: Config, endpoint: EndpointConfig) -> EndpointConfig:
    """`endpoint` asked as a predictor: greedily, reasoning up to evaluate.max_tokens, else the
    teacher's max_tokens (what the students learnt to write within)."""
    return endpoint.model_copy(update={"temperature": 0.0, "max_tokens": cfg.evaluate.max_tokens or cfg.generate.teacher.max_tokens})


def served(cfg: Config, name: str) -> EndpointConfig:
    """Our endpoint's model (or adapter) `name` as a predictor, with the teacher's other settings
    less its hidden reasoning's room (our models reason in the open)."""
    return predictor(cfg, cfg.generate.teacher).model_copy(update={"base_url": None, "model": name, "reasoning_tokens": 0})


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model the predict stages ask: where, in which mode, and what names its weights (the
    `model` input of its key: a train stage's key, a base model, an endpoint and its model)."""

    endpoint: EndpointConfig
    mode: str
    identity: str | None  # None until the train stage it comes from has run (plan only)
    adapter: Path | None = None  # a LoRA adapter our endpoint serves as endpoint.model


STUDENTS = {"cot": STUDENT, "raw": RAW}  # each train stage's adapter, by the name it is served and scored as


def models_to_evaluate(cfg: Config, trained: dict[str, TrainResult | None]) -> dict[str, ModelSpec]:
    """Student (cot adapter), the raw-label baseline, the base model zero-shot, the teacher if remote.
    A train stage that has not run (None: the plan) gives a spec without adapter or identity."""
    models = {
        name: ModelSpec(served(cfg, name), mode, t.key if t else None, t.adapter_path if t else None)
        for mode, name in STUDENTS.items() for t in [trained[mode]]
    }
    models["base"] = ModelSpec(served(cfg, cfg.serve.served_model_name), "cot", cfg.serve.model or "embedded")
    teacher = cfg.generate.teacher
    if teacher.base_url is not None:
        models["teacher"] = ModelSpec(predictor(cfg, teacher), "cot", f"{teacher.base_url}|{teacher.model}")
    return models


@dataclasses.dataclass(frozen=True)
class Step:
    """One stage of a plan: its key (None until the stages it takes from have run), and whether it
    would run or be skipped, and why."""

    stage: str
    key: str | None
    action: Literal["run", "skip"]
    reason: str


def plan(cfg: Config) -> list[Step]:
    """What a run of this config would do, stage by stage, from the run folder's stage.json files
    alone: nothing is started, called or created."""
    pipeline = Pipeline(cfg, progress=False)
    steps: list[Step] = []

    def visit(name: str, kind: type[R], inputs: Callable[[], dict], **upstream: StageResult | None) -> R | None:
        waiting = [stage for stage, result in upstream.items() if result is None]
        if waiting:
            steps.append(Step(name, None, "run", f"key known after {', '.join(waiting)}"))
            return None
        step, result = pipeline.look(name, inputs(), kind)
        steps.append(step)
        return result

    traces = visit("traces", TracesResult, pipeline.traces_inputs)
    trained = {mode: visit(f"train-{mode}", TrainResult, lambda: pipeline.train_inputs(traces, mode), traces=traces) for mode in MODES}
    trained_by = {name: mode for mode, name in STUDENTS.items()}
    predictions = {
        name: visit(f"predict-{name}", PredictResult, lambda: pipeline.predict_inputs(spec),
                    **({f"train-{trained_by[name]}": trained[trained_by[name]]} if name in trained_by else {}))
        for name, spec in models_to_evaluate(cfg, trained).items()
    }
    evaluation = visit("evaluate", EvaluateResult, lambda: pipeline.evaluate_inputs(predictions),
                       **{f"predict-{n}": p for n, p in predictions.items()})
    visit("register", RegisterResult, lambda: pipeline.register_inputs(trained["cot"], evaluation),
          **{"train-cot": trained["cot"], "evaluate": evaluation})
    visit("report", ReportResult, lambda: pipeline.report_inputs(traces, trained, evaluation),
          traces=traces, **{f"train-{mode}": trained[mode] for mode in MODES}, evaluate=evaluation)
    return steps


def pending(cfg: Config) -> list[str]:
    """The stages a run of this config would compute rather than skip that call or load something
    outside (traces, training, the prediction stages by model: `predict-teacher`, ...): what the
    pre-flight must check. Evaluation, registration and the report follow from them."""
    return [step.stage for step in plan(cfg) if step.action == "run" and step.stage.startswith(("traces", "train-", "predict-"))]


ADAPTER = "adapter"  # the served name of `synthpert predict --adapter`


def predict_one(cfg: Config, adapter: str | None = None, mode: str = "cot", verbose: bool = True) -> dict[str, Any]:
    """`synthpert predict`: the served base model, or a LoRA adapter on it (a local PEFT folder or a
    `models:/` URI), over the split's validation and test tuples, as the pipeline's predict stage:
    `<run_dir>/predict-<base|adapter>-<key>/` with predictions.parquet and manifest.json, skipped
    when finished, and a re-run after a crash answers the finished rows from its call cache. The
    base model's key is the pipeline's own, so either finds the other's predictions. Returns the
    stage's record as JSON values (the command prints it)."""
    from synthpert.cluster import ray_session
    from synthpert.serving import adapters
    from synthpert.serving.app import cluster_cpus

    if adapter is not None and not adapter.startswith(adapters.REGISTRY_PREFIX):
        # a bad folder or another base model fails here, before Serve starts
        adapter = str(adapters.resolve_adapter(adapter, cfg.serve.model).resolve())
    name = ADAPTER if adapter else "base"
    spec = (ModelSpec(served(cfg, ADAPTER), mode, adapter, Path(adapter)) if adapter
            else ModelSpec(served(cfg, cfg.serve.served_model_name), mode, cfg.serve.model or "embedded"))
    with console.session(cfg.run_dir, verbose=verbose), ray_session(cluster_cpus(cfg.serve)):
        return Pipeline(cfg, progress=verbose).predictions({name: spec})[name].model_dump(mode="json")


def run(cfg: Config, verbose: bool = True, yes: bool = False) -> dict[str, Any]:
    """The whole pipeline; returns what ran, what was skipped, the metrics and where the report is.
    The pre-flight runs first: a missing key, model, GPU or folder stops it before anything starts
    (or is created: the console's log folder too), and so does a cost above
    generate.confirm_above_usd that is not confirmed (`yes` confirms it). Not `verbose`: the
    console's view, the libraries' output in `<run_dir>/logs/`."""
    from synthpert import preflight
    from synthpert.cluster import ray_session
    from synthpert.serving.app import cluster_cpus

    checked = preflight.require(cfg)
    preflight.confirm(cfg, checked.cost, yes, checked.size)
    pipeline = Pipeline(cfg, progress=verbose)
    needs = max(cluster_cpus(cfg.serve), cfg.train.num_workers * cfg.train.cpus_per_worker)
    with console.session(cfg.run_dir, verbose=verbose), ray_session(needs), tracking.pipeline_run(cfg) as parent_id:
        traces = pipeline.traces()
        trained = {mode: pipeline.train(traces, mode) for mode in MODES}
        predictions = pipeline.predictions(models_to_evaluate(cfg, trained))
        evaluation = pipeline.evaluate(predictions)
        scores, validation = standings(evaluation.models), standings(evaluation.validation)
        registered = pipeline.register(trained["cot"], validation.get(STUDENT, {}), scores[STUDENT], evaluation)
        report = pipeline.report(traces, trained, evaluation)
        tracking.set_tags({
            "synthpert.traces_dir": str(traces.dir), "synthpert.traces_run_id": traces.run_id,
            "synthpert.train_run_id": trained["cot"].mlflow_run_id, "synthpert.model_uri": trained["cot"].model_uri,
            "synthpert.model_version": registered.version,
        })
        tracking.log_metrics({f"{part}{name}.{k}": v for part, models in (("", scores), ("validation.", validation))
                              for name, s in models.items() for k, v in s.items() if v is not None}
                             | {f"{'' if part == 'test' else part + '.'}left_out": n for part, n in evaluation.left_out.items()})
        tracking.log_artifact(report.markdown, "report")
        tracking.log_artifact(report.html, "report")
    return {
        # `registered` as promote_if_better answered it ({"registered": false} when nothing was), with its record
        "ran": pipeline.ran, "skipped": pipeline.skipped, "mlflow_parent_run_id": parent_id, "scores": scores, "validation_scores": validation,
        "left_out": evaluation.left_out,
        "registered": registered.model_dump(mode="json", exclude_unset=True), "report": str(report.markdown), "run_dir": str(pipeline.root),
    }
