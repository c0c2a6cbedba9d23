"""Declared inputs and derived keys: a stage's key follows exactly the fields it reads and its
upstream stages' keys; `synthpert pipeline --plan` says what would run and why, creating nothing."""

from __future__ import annotations

import json
import time

import pytest

from synthpert.config import load_config
from synthpert.pipeline import MODES, Pipeline, models_to_evaluate, plan, stage_key
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.unit

LOCAL = REPO / "configs" / "local.yaml"
STAGES = ["traces", "train-cot", "train-raw", "predict-student-cot", "predict-student-raw", "predict-base", "evaluate", "register", "report"]
REMOTE = [f"generate.{who}.base_url=http://127.0.0.1:9/v1" for who in ("teacher", "judge")]


def _keys(*overrides: str) -> dict[str, str]:
    """Every stage's key for the local config, with fixed upstream results where a stage needs them."""
    cfg = load_config(LOCAL, list(overrides))
    pipeline = Pipeline(cfg, progress=False)
    traces = {"key": stage_key(pipeline.traces_inputs()), "sft_sha256": "sft"}
    trained = {mode: {"key": stage_key(pipeline.train_inputs(traces, mode)), "adapter_path": f"/a/{mode}"} for mode in MODES}
    models = models_to_evaluate(cfg, trained)
    keys = {"traces": traces["key"], **{f"train-{mode}": t["key"] for mode, t in trained.items()}}
    keys |= {f"predict-{name}": stage_key(pipeline.predict_inputs(spec)) for name, spec in models.items()}
    # a prediction's output digest follows its key here, as a re-run's new predictions would
    evaluation = {"key": stage_key(pipeline.evaluate_inputs({name[8:]: {"sha256": keys[name]} for name in keys if name.startswith("predict-")}))}
    keys["evaluate"] = evaluation["key"]
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


def test_a_field_a_stage_does_not_read_leaves_its_key():
    unread = ["serve.max_replicas=4", "generate.output_dir=/elsewhere", "generate.teacher.max_concurrency=2", "generate.judge.api_key_env=OTHER_KEY", "train.output_dir=/x",
              "evaluate.output_dir=/y", "train.checkpoints_to_keep=5", "run_dir=/z"]
    for override in unread:
        assert _differ(override) == [], override


def test_the_embedded_endpoint_model_is_an_input_of_every_stage_that_calls_it():
    assert _differ("serve.model=/models/other")[:1] == ["traces"]
    assert "predict-base" in _differ("serve.engine=vllm")
    assert "predict-student-cot" in _differ("serve.engine_kwargs={dtype: float16}")
    remote = _differ("serve.model=/models/other", base=tuple(REMOTE))
    assert "traces" not in remote and "predict-base" in remote  # the teacher and judge are elsewhere; the base is still ours


def _finish_everything(cfg) -> None:
    """Every stage finished as the pipeline records it (stage.json with the inputs), with made-up results."""
    pipeline = Pipeline(cfg, progress=False)
    traces = pipeline.stage("traces", pipeline.traces_inputs(), lambda out: {"sft_sha256": "sft"})
    trained = {mode: pipeline.stage(f"train-{mode}", pipeline.train_inputs(traces, mode), lambda out: {"adapter_path": str(out)})
               for mode in MODES}
    predictions = {name: pipeline.stage(f"predict-{name}", pipeline.predict_inputs(spec), lambda out: {"sha256": out.name})
                   for name, spec in models_to_evaluate(cfg, trained).items()}
    evaluation = pipeline.stage("evaluate", pipeline.evaluate_inputs(predictions), lambda out: {})
    pipeline.stage("register", pipeline.register_inputs(trained["cot"], evaluation), lambda out: {})
    pipeline.stage("report", pipeline.report_inputs(traces, trained, evaluation), lambda out: {})
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
