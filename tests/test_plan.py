"""Declared inputs and derived keys: a stage's key follows exactly the fields it reads and its
upstream stages' keys; `synthpert pipeline --plan` says what would run and why, creating nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from synthpert.config import load_config
from synthpert.pipeline import MODES, STAGE_FILE, Pipeline, models_to_evaluate, plan, stage_key
from synthpert.results import EvaluateResult, PredictResult, RegisterResult, ReportResult, TracesResult, TrainResult
from tests.conftest import REPO, run_cli
from tests.stages import finish

pytestmark = pytest.mark.unit

LOCAL = REPO / "configs" / "local.yaml"
STAGES = ["traces", "train-cot", "train-raw", "predict-student-cot", "predict-student-raw", "predict-base", "evaluate", "register", "report"]
REMOTE = [f"generate.{who}.base_url=http://127.0.0.1:9/v1" for who in ("teacher", "judge")]


def _keys(*overrides: str) -> dict[str, str]:
    """Every stage's key for the local config, with fixed upstream results where a stage needs them."""
    cfg = load_config(LOCAL, list(overrides))
    pipeline = Pipeline(cfg, progress=False)
    traces = TracesResult.model_construct(key=stage_key(pipeline.traces_inputs()), sft_sha256="sft")
    trained = {mode: TrainResult.model_construct(key=stage_key(pipeline.train_inputs(traces, mode)), adapter_path=Path(f"/a/{mode}"))
               for mode in MODES}
    models = models_to_evaluate(cfg, trained)
    keys = {"traces": traces.key, **{f"train-{mode}": t.key for mode, t in trained.items()}}
    keys |= {f"predict-{name}": stage_key(pipeline.predict_inputs(spec)) for name, spec in models.items()}
    # a prediction's output digest follows its key here, as a re-run's new predictions would
    predictions = {name[8:]: PredictResult.model_construct(sha256=keys[name]) for name in keys if name.startswith("predict-")}
    evaluation = EvaluateResult.model_construct(key=stage_key(pipeline.evaluate_inputs(predictions)))
    keys["evaluate"] = evaluation.key
    keys["register"] = stage_key(pipeline.register_inputs(trained["cot"], evaluation))
    keys["report"] = stage_key(pipeline.report_inputs(traces, trained, evaluation))
    return keys


def _differ(*overrides: str, base: tuple[str, ...] = ()) -> list[str]:
    before, after = _keys(*base), _keys(*base, *overrides)
    return [stage for stage in STAGES if before[stage] != after[stage]]


def test_a_read_field_changes_its_key_and_every_key_downstream():
    assert _differ("train.lora_r=4") == ["train-cot", "train-raw", "predict-student-cot", "predict-student-raw", "evaluate", "register", "report"]
    assert _differ("evaluate.limit=4") == ["predict-student-cot", "predict-student-raw", "predict-base", "evaluate", "register", "report"]
    assert _differ("evaluate.bootstrap=10") == ["evaluate", "register", "report"]
    assert _differ("generate.keep=[excellent]") == ["traces", "report"]  # same sft digest given: training reads only that
    assert _differ("generate.teacher.temperature=0.2") == ["traces", "report"]  # predictions are greedy whatever it is
    assert _differ("generate.teacher.max_tokens=64")[-6:] == STAGES[3:]  # and as long as the teacher's reasoning
    assert _differ("data.seed=1") == STAGES  # every stage reads it
    assert _differ("tracking.experiment=other") == ["register"]
    assert _differ("data.validation_fraction=0.2") == STAGES


def test_every_predictor_reasons_up_to_evaluate_max_tokens():
    """Not the teacher's trace length, which configs/local.yaml keeps by leaving it unset; our models
    reason in the open, the remote teacher keeps its hidden reasoning's room."""
    assert _differ("evaluate.max_tokens=64") == STAGES[3:]
    cfg = load_config(LOCAL, [*REMOTE, "evaluate.max_tokens=64", "generate.teacher.reasoning_tokens=256"])
    models = models_to_evaluate(cfg, dict.fromkeys(MODES))
    assert set(models) == {"student-cot", "student-raw", "base", "teacher"}
    assert {spec.endpoint.max_tokens for spec in models.values()} == {64}
    assert [name for name, spec in models.items() if spec.endpoint.reasoning_tokens] == ["teacher"]
    assert models_to_evaluate(load_config(LOCAL), dict.fromkeys(MODES))["base"].endpoint.max_tokens == 128  # the teacher's


def test_a_field_a_stage_does_not_read_leaves_its_key():
    unread = ["serve.max_replicas=4", "generate.output_dir=/elsewhere", "generate.teacher.max_concurrency=2", "generate.judge.api_key_env=OTHER_KEY", "train.output_dir=/x",
              "evaluate.output_dir=/y", "train.checkpoints_to_keep=5", "run_dir=/z",
              "generate.teacher.reasoning_tokens=256"]  # hidden reasoning's room: which calls are cut, not what they say
    for override in unread:
        assert _differ(override) == [], override


def test_the_embedded_endpoint_model_is_an_input_of_every_stage_that_calls_it():
    assert _differ("serve.model=/models/other")[:1] == ["traces"]
    other = "transformers" if load_config(LOCAL).serve.resolved().engine == "vllm" else "vllm"  # than `auto` picks here
    assert "predict-base" in _differ(f"serve.engine={other}")
    assert "predict-student-cot" in _differ("serve.engine_kwargs={dtype: float16}")
    remote = _differ("serve.model=/models/other", base=tuple(REMOTE))
    assert "traces" not in remote and "predict-base" in remote  # the teacher and judge are elsewhere; the base is still ours


def _finish_everything(cfg) -> None:
    """Every stage finished as the pipeline records it (stage.json with the inputs), with made-up results."""
    pipeline = Pipeline(cfg, progress=False)
    traces = finish(pipeline, "traces", pipeline.traces_inputs(), TracesResult)
    trained = {mode: finish(pipeline, f"train-{mode}", pipeline.train_inputs(traces, mode), TrainResult) for mode in MODES}
    predictions = {name: finish(pipeline, f"predict-{name}", pipeline.predict_inputs(spec), PredictResult)
                   for name, spec in models_to_evaluate(cfg, trained).items()}
    evaluation = finish(pipeline, "evaluate", pipeline.evaluate_inputs(predictions), EvaluateResult)
    finish(pipeline, "register", pipeline.register_inputs(trained["cot"], evaluation), RegisterResult)
    finish(pipeline, "report", pipeline.report_inputs(traces, trained, evaluation), ReportResult)
    assert pipeline.ran == STAGES


def test_finished_stages_skip_and_a_changed_field_is_named(tmp_path):
    cfg = load_config(LOCAL, [f"run_dir={tmp_path}"])
    assert [(s.stage, s.action) for s in plan(cfg)][:2] == [("traces", "run"), ("train-cot", "run")]
    _finish_everything(cfg)
    assert {(s.action, s.reason) for s in plan(cfg)} == {("skip", "finished")}

    steps = {s.stage: s for s in plan(load_config(LOCAL, [f"run_dir={tmp_path}", "train.lora_r=4", "evaluate.bootstrap=10"]))}
    assert steps["traces"].action == "skip" and steps["predict-base"].action == "skip"
    assert steps["train-cot"].reason == "changed since the last run: train.lora_r"
    assert steps["predict-student-cot"].key is None and steps["predict-student-cot"].reason == "key known after train-cot"
    assert steps["evaluate"].reason == "key known after predict-student-cot, predict-student-raw"
    assert [s.action for s in steps.values()] == ["skip", "run", "run", "run", "run", "skip", "run", "run", "run"]

    swapped = {s.stage: s for s in plan(load_config(LOCAL, [f"run_dir={tmp_path}", "serve.model=/models/other"]))}
    assert swapped["traces"].reason == "changed since the last run: serve.model"
    assert swapped["predict-base"].reason == "changed since the last run: serve.model, model"


def test_plan_from_the_command_line_runs_nothing_and_creates_nothing(tmp_path):
    started = time.monotonic()
    proc = run_cli("pipeline", "--config", str(LOCAL), "--plan", "--json", cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 20
    stages = json.loads(proc.stdout.strip().splitlines()[-1])["stages"]
    assert [s["stage"] for s in stages] == STAGES
    assert all(s["action"] == "run" and s["reason"] for s in stages)
    assert stages[0]["reason"] == "never run" and len(stages[0]["key"]) == 12
    assert stages[1]["key"] is None and stages[1]["reason"] == "key known after traces"
    assert "train-cot            ?             run   key known after traces" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_plan_from_the_command_line_names_the_changed_field(tmp_path):
    _finish_everything(load_config(LOCAL, [f"run_dir={tmp_path}"]))
    proc = run_cli("pipeline", "--config", str(LOCAL), "--set", f"run_dir={tmp_path}", "--set", "generate.judge.max_tokens=64",
                   "--plan", "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    stages = {s["stage"]: s for s in json.loads(proc.stdout.strip().splitlines()[-1])["stages"]}
    assert stages["traces"]["action"] == "run" and stages["traces"]["reason"] == "changed since the last run: generate.judge.max_tokens"
    assert stages["predict-base"]["action"] == "skip"


def test_every_stage_result_reads_back_from_stage_json_as_it_was_written(tmp_path):
    cfg = load_config(LOCAL, [f"run_dir={tmp_path}"])
    inputs = Pipeline(cfg, progress=False).traces_inputs()
    nan = float("nan")
    metrics = {"auroc_de": 0.7, "auroc_dir": None, "accuracy": 0.5, "n": 8, "ci": {"auroc_de": [0.6, 0.8], "auroc_dir": None},
               "per_cell_line": {"k562": {"auroc_de": 0.7, "n": 8, "test_pairs": 9}}, "_per_gene": {"G1": 0.5}, "bootstrap_shift": {"auroc_de": 0.01}}
    made = {
        TracesResult: {}, TrainResult: {"model_uri": "models:/s@cot", "model_version": "3", "memory": {"micro_batch": 1}},
        PredictResult: {}, RegisterResult: {"registered": True, "name": "s", "version": "3", "score": 0.7, "promoted": True},
        EvaluateResult: {"models": {"base": metrics}, "validation": {"base": {**metrics, "auroc_dir": nan}}}, ReportResult: {},
    }
    for kind, fields in made.items():
        written = finish(Pipeline(cfg, progress=False), kind.__name__, inputs, kind, **fields)
        again = Pipeline(cfg, progress=False)
        read = again.stage(kind.__name__, inputs, kind, None)  # finished: read back, nothing run
        assert again.skipped == [kind.__name__] and type(read) is kind
        if kind is EvaluateResult:  # NaN is written as NaN and read back as NaN (it equals nothing)
            assert read.validation["base"].auroc_dir != read.validation["base"].auroc_dir
            read.validation["base"].auroc_dir = written.validation["base"].auroc_dir = None
            assert read.models["base"].per_cell_line["k562"].test_pairs == 9 and read.models["base"]._per_gene == {"G1": 0.5}
        assert read == written, kind


def test_a_stage_json_an_older_version_wrote_runs_again_and_the_plan_says_why(tmp_path):
    cfg = load_config(LOCAL, [f"run_dir={tmp_path}"])
    _finish_everything(cfg)
    traces = next(tmp_path.glob(f"traces-*/{STAGE_FILE}"))
    old = json.loads(traces.read_text())
    del old["summary"]["refused"]  # as the version before the budget wrote it
    traces.write_text(json.dumps(old))

    steps = {s.stage: s for s in plan(cfg)}
    assert steps["traces"].action == "run" and steps["traces"].key == traces.parent.name.split("-")[1]
    assert steps["traces"].reason == ("its stage.json, from an older version, is not a TracesResult (1 errors, first at "
                                      "summary.refused): it runs again")
    assert steps["train-cot"].reason == "key known after traces"  # its key waits for the new traces' digest

    pipeline, ran = Pipeline(cfg, progress=False), []
    rerun = pipeline.stage("traces", pipeline.traces_inputs(), TracesResult,
                           lambda out: ran.append(out) or {"summary": {**old["summary"], "refused": 0}, "sft_sha256": "sft"})
    assert ran == [traces.parent] and pipeline.ran == ["traces"] and rerun.summary.refused == 0
    assert {(s.action, s.reason) for s in plan(cfg)} == {("skip", "finished")}
