"""Tracking against a real MLflow store (sqlite file under tmp)."""

import mlflow
import pandas as pd
import pytest

from synthpert import tracking
from synthpert.config import load_config

pytestmark = pytest.mark.unit


def _cfg(tmp_path, *extra):
    return load_config(None, [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=t", *extra])


def test_stage_run_logs_sections_and_nests_under_parent(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "generate.teacher.api_key_env=TEACHER_KEY", "train.lora_r=8")
    monkeypatch.setenv("TEACHER_KEY", "sk-do-not-leak")
    tracking.setup(cfg.tracking)
    parent = mlflow.start_run(run_name="pipeline")
    mlflow.end_run()
    monkeypatch.setenv(tracking.PARENT_ENV, parent.info.run_id)
    with tracking.stage_run(cfg, "train", sections=("train", "generate"), params={"note": "x sk-do-not-leak y"}) as run_id:
        tracking.log_metrics({"loss": 1.5}, step=1)
        tracking.log_input_table(pd.DataFrame({"a": [1, 2]}), name="tuples", source="unit-test")
    run = mlflow.get_run(run_id)
    assert run.data.params["train.lora_r"] == "8"
    assert run.data.params["generate.teacher.api_key_env"] == "TEACHER_KEY"
    assert run.data.params["note"] == "x *** y"
    assert all("sk-do-not-leak" not in v for v in run.data.params.values())
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.tags["synthpert.stage"] == "train"
    assert run.data.metrics["loss"] == 1.5
    assert run.inputs.dataset_inputs[0].dataset.name == "tuples"


def test_disabled_tracking_yields_none(tmp_path):
    cfg = _cfg(tmp_path, "tracking.enabled=false")
    with tracking.stage_run(cfg, "data") as run_id:
        tracking.log_metrics({"x": 1})
    assert run_id is None and not (tmp_path / "mlflow.db").exists()
