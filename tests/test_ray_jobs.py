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


@pytest.mark.ray
def test_pipeline_job_fails_its_preflight_in_seconds(ray_head, tmp_path):
    """`ray job submit` of a pipeline that cannot run: the job fails within a minute of submission
    with the pre-flight's list in its logs, and makes no run folder."""
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    run_dir = tmp_path / "runs"
    args = ["--config", "configs/local.yaml", f"--set=run_dir={run_dir}", "--set=generate.teacher.base_url=http://127.0.0.1:9/v1",
            "--set=generate.teacher.api_key_env=SYNTHPERT_TEST_MISSING_KEY", "--set=train.base_model=/nonexistent/base-8b"]
    client = JobSubmissionClient(ray_head)
    submitted = time.monotonic()
    job = client.submit_job(entrypoint=f"python ray_jobs/pipeline.py {' '.join(args)}", runtime_env=ray_job_env())
    status, logs = wait_job(client, job, timeout=90)
    elapsed = time.monotonic() - submitted
    assert status == JobStatus.FAILED, logs
    assert elapsed < 60, f"the job took {elapsed:.0f} s to fail"
    assert "error: pre-flight: 3 problem(s), nothing was started or created:" in logs, logs
    assert "generate.teacher: $SYNTHPERT_TEST_MISSING_KEY is not set (the key for http://127.0.0.1:9/v1)" in logs
    assert "train.base_model: /nonexistent/base-8b does not exist" in logs
    assert "serve.model: the adapters are trained on train.base_model (/nonexistent/base-8b)" in logs
    assert not run_dir.exists()
