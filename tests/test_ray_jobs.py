"""ray_jobs/ entry points submitted as real Ray jobs to a real local Ray head (`ray start --head`)."""

import re
import runpy
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, ray_job_env, wait_job

STAGE_SCRIPTS = {
    "config_show": ["config", "show"],
    "data_stats": ["data", "stats"],
    "baseline": ["baseline"],
    "evaluate": ["evaluate"],
    "predict": ["predict"],
    "serve": ["serve"],
    "generate": ["generate"],
    "train": ["train"],
    "pipeline": ["pipeline"],
}


@pytest.mark.unit
@pytest.mark.parametrize("script, command", STAGE_SCRIPTS.items(), ids=list(STAGE_SCRIPTS))
def test_entry_point_is_its_cli_command(script, command, monkeypatch, capsys):
    """`python ray_jobs/X.py ARGS` is `synthpert CMD ARGS`: the CLI's own parser, nothing duplicated."""
    monkeypatch.syspath_prepend(str(REPO / "ray_jobs"))  # what `python ray_jobs/X.py` gives; undone after
    monkeypatch.setattr(sys, "argv", [f"ray_jobs/{script}.py", "--help"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "ray_jobs" / f"{script}.py"), run_name="__main__")
    assert done.value.code == 0
    assert f"Usage: synthpert {' '.join(command)} [OPTIONS]" in capsys.readouterr().out


@pytest.mark.ray
@pytest.mark.slow
def test_cli_job_on_a_real_ray_head(ray_head):
    """`ray job submit`-equivalent through the Job SDK: working dir + shared runtime_env; a good job
    succeeds with the CLI's output and the venv's Python on the cluster, a bad one fails with the
    CLI's error line."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head)
    env = ray_job_env()
    good = client.submit_job(
        entrypoint="python ray_jobs/config_show.py --config configs/paper.yaml --set train.lora_r=7",
        runtime_env=env,
    )
    bad = client.submit_job(entrypoint="python ray_jobs/config_show.py --set train.lora_rr=3", runtime_env=env)

    status, logs = wait_job(client, good)
    assert status == JobStatus.SUCCEEDED, logs
    assert "lora_r: 7" in logs and "model: o4-mini" in logs  # the config file travelled with the working dir
    assert re.search(r"synthpert job: config show on Ray cluster \S+:\d+", logs)  # the driver joined the cluster
    assert f"(python {Path(sys.executable).parent}" in logs  # ...with this venv's interpreter

    status, logs = wait_job(client, bad)
    assert status == JobStatus.FAILED
    assert "error: invalid config" in logs and "lora_rr" in logs
