"""Pre-flight: a run that cannot finish fails in seconds, listing every problem, having created and
called nothing; a finished stage's needs are not checked."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from synthpert import preflight
from synthpert.config import load_config
from synthpert.pipeline import Pipeline, models_to_evaluate, pending
from synthpert.results import PredictResult, TracesResult, TrainResult
from tests.conftest import REPO, free_port, run_cli
from tests.fake_api import FakeAPI
from tests.stages import finish

pytestmark = pytest.mark.unit

PAPER = REPO / "configs" / "paper.yaml"
LOCAL = REPO / "configs" / "local.yaml"
RAY_LATEST = Path("/tmp/ray/session_latest")


def _ray_session() -> str | None:
    """The newest local Ray session, if any: a started cluster would change it."""
    return os.readlink(RAY_LATEST) if RAY_LATEST.is_symlink() else None


def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "RAY_ADDRESS")}, **extra}


def test_paper_config_on_this_box_fails_fast_listing_everything(tmp_path):
    paper = load_config(PAPER)
    assert str(paper.run_dir) == "/mnt/shared/synthpert/paper" and not Path("/mnt/shared").exists()
    ray_before = _ray_session()
    started = time.monotonic()
    proc = run_cli("pipeline", "--config", str(PAPER), cwd=tmp_path, env=_env(), timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert elapsed < 10, f"pre-flight took {elapsed:.1f} s"
    problems = proc.stderr.strip().splitlines()[1:]
    expected = {
        "run_dir": "/mnt/shared/synthpert/paper is missing and so is /mnt/shared",
        "generate.teacher": "$OPENAI_API_KEY is not set",
        "generate.judge": "$OPENAI_API_KEY is not set",
        "train.base_model": "/home/ubuntu/models/base-8b does not exist",
        "serve.model": "/home/ubuntu/models/base-8b does not exist",
        "train.gpus": "4 GPUs needed (train.num_workers=4 x 1 with train.use_gpu), this node has 0",
    }
    assert len(problems) == len(expected), proc.stderr
    for subject, text in expected.items():
        assert any(line.strip().startswith(f"{subject}:") and text in line for line in problems), (subject, proc.stderr)
    # nothing created: no folder, no MLflow store, no Ray session
    assert not Path("/mnt/shared").exists()
    assert list(tmp_path.iterdir()) == []
    assert _ray_session() == ray_before


def test_wrong_key_is_a_401_before_any_call(tmp_path):
    endpoint = [f"--set=generate.{role}.{k}={v}" for role in ("teacher", "judge")
                for k, v in (("base_url", "{url}"), ("model", "fake-teacher"), ("api_key_env", "FAKE_API_KEY"))]
    with FakeAPI(free_port(), api_key="right-key") as api:
        args = [a.format(url=api.base_url) for a in endpoint]
        # a second, key-independent problem: should the key check ever pass wrongly, nothing starts anyway
        proc = run_cli("pipeline", "--config", str(LOCAL), *args, "--set=train.base_model=/nonexistent/base",
                       cwd=tmp_path, env=_env(FAKE_API_KEY="wrong-key"), timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "train.base_model: /nonexistent/base does not exist" in proc.stderr
        for role in ("teacher", "judge"):
            assert f"generate.{role}: {api.base_url}: 401 Unauthorized" in proc.stderr, proc.stderr
        assert "wrong-key" not in proc.stdout + proc.stderr  # secrets are never printed
        assert api.paths["/v1/chat/completions"] == 0 and api.paths["/v1/models"] == 1  # one probe for both
        assert list(tmp_path.iterdir()) == []

        # the same endpoint with the right key passes; a model it does not list does not
        ok = run_cli("pipeline", "--config", str(LOCAL), *args, "--check", cwd=tmp_path, env=_env(FAKE_API_KEY="right-key"), timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert f"ok generate.judge: {api.base_url} accepts $FAKE_API_KEY and lists fake-teacher" in ok.stdout
        absent = run_cli("pipeline", "--config", str(LOCAL), *args, "--set=generate.judge.model=absent", "--check",
                         cwd=tmp_path, env=_env(FAKE_API_KEY="right-key"), timeout=60)
        assert absent.returncode == 2
        assert f"generate.judge: {api.base_url} does not list model 'absent' (it has: fake-teacher)" in absent.stderr
        assert api.paths["/v1/chat/completions"] == 0


def test_local_check_passes_quickly_and_creates_nothing(tmp_path):
    started = time.monotonic()
    proc = run_cli("pipeline", "--config", str(LOCAL), "--check", "--json", cwd=tmp_path, env=_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 10
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["pending"][:3] == ["traces", "train-cot", "train-raw"]
    assert {c["subject"] for c in report["checks"]} == {"run_dir", "serve.model", "train.base_model"}
    assert all(c["ok"] for c in report["checks"])
    assert f"ok run_dir: {tmp_path}/runs/local will be created in {tmp_path}" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_finished_stages_are_not_checked(tmp_path):
    cfg = load_config(LOCAL, [f"run_dir={tmp_path}", "train.base_model=/nonexistent/model", "train.use_gpu=true"])
    pipeline = Pipeline(cfg, progress=False)
    assert pending(cfg)[:3] == ["traces", "train-cot", "train-raw"]
    failed = {c.subject for c in preflight.run(cfg).failures}
    assert {"train.base_model", "serve.model"} <= failed  # the adapters' base would differ from the served model

    traces = finish(pipeline, "traces", pipeline.traces_inputs(), TracesResult, sft_sha256="abc")
    trained = {mode: finish(pipeline, f"train-{mode}", pipeline.train_inputs(traces, mode), TrainResult, adapter_path=tmp_path / mode)
               for mode in ("cot", "raw")}
    models = models_to_evaluate(cfg, trained)
    assert pending(cfg) == [f"predict-{name}" for name in models]
    report = preflight.run(cfg)
    assert report.failures == [] and "train.base_model" not in {c.subject for c in report.checks}

    for name, spec in models.items():
        finish(pipeline, f"predict-{name}", pipeline.predict_inputs(spec), PredictResult, sha256=name)
    assert pending(cfg) == []
    assert [c.subject for c in preflight.run(cfg).checks] == ["run_dir"]


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("")
    check = preflight.writable("run_dir", tmp_path / "taken")
    assert not check.ok and check.detail == f"{tmp_path}/taken is not a folder"
    assert preflight.writable("run_dir", tmp_path / "a" / "b").ok is False  # absolute, parent missing
    assert preflight.writable("run_dir", tmp_path / "a").ok
