"""The MLflow tracking server as the pipeline uses it: a real `mlflow server` (mlflow/server.sh) on
loopback, written to through synthpert.tracking and read back through the MLflow client."""

import mlflow
from mlflow import MlflowClient
import pytest

from synthpert import tracking
from synthpert.config import load_config

pytestmark = pytest.mark.slow


def test_stage_run_artifacts_and_registry_alias_through_the_server(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    cfg = load_config(None, [f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=server-test", "train.lora_r=8"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (tmp_path / "report.md").write_text("# report\nAUROC 0.61\n")

    with tracking.stage_run(cfg, "train", sections=("train",)) as run_id:
        tracking.log_metrics({"loss": 0.5}, step=3)
        tracking.log_artifact(adapter, "adapter")
        tracking.log_artifact(tmp_path / "report.md")

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lora_r"] == "8" and run.data.metrics["loss"] == 0.5
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: stored by the server
    assert {a.path for a in client.list_artifacts(run_id)} == {"adapter", "report.md"}
    report = client.download_artifacts(run_id, "report.md", str(tmp_path / "down"))
    assert open(report).read() == "# report\nAUROC 0.61\n"

    name = "synthpert-student-test"
    client.create_registered_model(name)
    first = client.create_model_version(name, f"{run.info.artifact_uri}/adapter", run_id=run_id)
    second = client.create_model_version(name, f"{run.info.artifact_uri}/adapter", run_id=run_id)
    client.set_registered_model_alias(name, "champion", first.version)
    assert client.get_model_version_by_alias(name, "champion").version == first.version
    client.set_registered_model_alias(name, "champion", second.version)  # a better model takes the alias
    assert client.get_model_version_by_alias(name, "champion").version == second.version
    assert client.get_registered_model(name).aliases == {"champion": second.version}

    uri = f"models:/{name}@champion"  # what `synthpert serve` resolves
    local = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "champion"), tracking_uri=mlflow_server)
    assert open(f"{local}/adapter_config.json").read() == '{"r": 8}'
