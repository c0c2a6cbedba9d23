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


PAPER = REPO / "configs" / "paper.yaml"
LOCAL = REPO / "configs" / "local.yaml"
RAY_LATEST = Path("/tmp/ray/session_latest")


def _ray_session() -> str | None:
    """The newest local Ray session, if any: a started cluster would change it."""
    return os.readlink(RAY_LATEST) if RAY_LATEST.is_symlink() else None


def _env(**extra: str) -> dict[str, str]:
    """The caller's environment without what would change the answer under test (CI sets CI=true)."""
    return {**{k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "RAY_ADDRESS", "CI")}, **extra}


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
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
        "serve.gpus": "1 GPUs needed (1 replica(s) with serve.use_gpu), this node has 0",
    }
    assert len(problems) == len(expected), proc.stderr
    for subject, text in expected.items():
        assert any(line.strip().startswith(f"{subject}:") and text in line for line in problems), (subject, proc.stderr)
    # nothing created: no folder, no MLflow store, no Ray session
    assert not Path("/mnt/shared").exists()
    assert list(tmp_path.iterdir()) == []
    assert _ray_session() == ray_before


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
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
        assert f"generate.judge: {api.base_url} does not list model 'absent' (it has: fake-teacher, fake-judge)" in absent.stderr
        assert api.paths["/v1/chat/completions"] == 0


@pytest.mark.unit
def test_local_check_passes_quickly_and_creates_nothing(tmp_path, tmp_path_factory):
    """On a new machine too: the embedded model not yet converted into an empty cache (the
    pre-flight once read its config.json from there, and failed before any stage had made it)."""
    caches = tmp_path_factory.mktemp("caches")
    started = time.monotonic()
    proc = run_cli("pipeline", "--config", str(LOCAL), "--check", "--json", cwd=tmp_path, timeout=60,
                   env=_env(SYNTHPERT_CACHE=str(caches / "synthpert"), HF_HOME=str(caches / "hf")))
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 20  # seconds; "quickly" with room for a loaded box (the paper config's bound is 10 s)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["pending"][:3] == ["traces", "train-cot", "train-raw"]
    assert {c["subject"] for c in report["checks"]} == {"run_dir", "serve.model", "train.base_model", "disk"}
    assert all(c["ok"] for c in report["checks"])
    assert f"ok run_dir: {tmp_path}/runs/local will be created in {tmp_path}" in proc.stdout
    assert list(tmp_path.iterdir()) == [] and list(caches.iterdir()) == []


@pytest.mark.unit
def test_a_cluster_with_cpus_for_the_replica_only_is_refused(tmp_path, monkeypatch):
    """On a running cluster, our endpoint's replica and the Ray Data stage calling it run at once:
    a vLLM replica (its engine asks one more CPU) on 2 CPUs would leave the stage's tasks waiting
    forever, so the pre-flight says so; 3 CPUs, or the transformers engine's 1, fit."""
    monkeypatch.setattr(preflight, "cluster_resources", lambda: preflight.Cluster({"CPU": 2.0, "GPU": 0.0}, "the Ray cluster at 127.0.0.1:6379"))
    subject = lambda cfg: {c.subject: c for c in preflight.run(cfg).checks}["serve.cpus"]  # noqa: E731
    vllm = load_config(LOCAL, [f"run_dir={tmp_path}", "serve.engine=vllm"])
    check = subject(vllm)
    assert not check.ok and check.detail == (
        "3 CPUs needed (1 replica(s) x 2 on vllm + 1 for the Ray Data stage calling them), the Ray cluster at 127.0.0.1:6379 has 2")
    assert subject(load_config(LOCAL, [f"run_dir={tmp_path}", "serve.engine=transformers"])).ok
    monkeypatch.setattr(preflight, "cluster_resources", lambda: preflight.Cluster({"CPU": 3.0}, "the Ray cluster at 127.0.0.1:6379"))
    assert subject(vllm).ok


# resources `ray up` fills in for cluster.yaml's instance types (AWS's DescribeInstanceTypes)
FILLED = {"m6i.4xlarge": {"CPU": 16}, "g5.12xlarge": {"CPU": 48, "GPU": 4, "memory": 141733920768, "accelerator_type:A10G": 1}}


def _head_of_cluster_yaml(tmp_path, monkeypatch, **worker) -> None:
    """This process as a job driver on cluster.yaml's head at submit time: connected to a cluster of
    the head alone, ~/ray_bootstrap_config.yaml as `ray up` writes it (`worker`: changes to the GPU
    node type); no Ray is started."""
    import yaml
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    for node_type in config["available_node_types"].values():
        node_type["resources"] = {**FILLED[node_type["node_config"]["InstanceType"]], **node_type["resources"]}
    config["available_node_types"]["gpu_worker"].update(worker)
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(json.dumps(config))  # Ray writes JSON there
    monkeypatch.setattr(preflight, "AUTOSCALER_CONFIG", bootstrap)
    monkeypatch.setattr("ray.is_initialized", lambda: True)
    monkeypatch.setattr("ray.cluster_resources", lambda: {"CPU": 16.0, "memory": 4.6e10, "object_store_memory": 2e10})
    monkeypatch.setattr("ray.util.get_node_ip_address", lambda: "10.0.1.5")
    monkeypatch.setattr("ray.nodes", lambda: [{"NodeManagerAddress": "10.0.1.5", "Alive": True}])


@pytest.mark.unit
def test_a_cluster_of_its_head_alone_passes_with_the_gpu_workers_it_can_launch(tmp_path, monkeypatch):
    """At `ray job submit` cluster.yaml's cluster is its CPU head (gpu_worker.min_workers 0); the
    autoscaler launches the GPU nodes once training or Serve asks for them. The pre-flight counts
    what the autoscaler's config lets it launch, and still refuses what it cannot."""
    paper = load_config(PAPER)

    def checks() -> dict[str, preflight.Check]:
        cluster = preflight.cluster_resources()
        return {c.subject: c for c in [*preflight.train_resources(paper, cluster), *preflight.serve_resources(paper, cluster)]}

    _head_of_cluster_yaml(tmp_path, monkeypatch)
    now = checks()
    assert now["train.gpus"].ok and now["train.gpus"].detail == (
        "4 GPUs needed (train.num_workers=4 x 1 with train.use_gpu), the connected Ray cluster has 0 now "
        "and can launch 4 x {GPU: 4, CPU: 48} (gpu_worker, max_workers 4)")
    assert now["train.cpus"].ok and "32 CPUs needed (train.num_workers=4 x 8), the connected Ray cluster has 16" in now["train.cpus"].detail
    assert set(now) == {"train.gpus", "train.cpus", "serve.gpus", "serve.cpus"} and all(c.ok for c in now.values())

    _head_of_cluster_yaml(tmp_path, monkeypatch, max_workers=1, resources={"CPU": 8, "GPU": 2})  # one 2-GPU node at most
    short = checks()
    assert not short["train.gpus"].ok and short["train.gpus"].detail.endswith(
        "has 0 now and can launch 1 x {GPU: 2, CPU: 8} (gpu_worker, max_workers 1): 2 at most")
    assert short["serve.gpus"].ok and not short["train.cpus"].ok  # 16 + 8 CPUs for 32

    monkeypatch.setattr(preflight, "AUTOSCALER_CONFIG", tmp_path / "absent.yaml")  # not a `ray up` head: what is up now
    alone = checks()
    assert not alone["train.gpus"].ok and alone["train.gpus"].detail.endswith("the connected Ray cluster has 0")
    monkeypatch.setenv(preflight.AUTOSCALER_CONFIG_ENV, str(tmp_path / "ray_bootstrap_config.yaml"))  # that config, named
    assert checks()["train.gpus"].detail.endswith("has 0 now and can launch 1 x {GPU: 2, CPU: 8} (gpu_worker, max_workers 1): 2 at most")


@pytest.mark.unit
def test_training_on_other_machines_needs_a_tracking_server_they_reach(tmp_path, monkeypatch):
    """Rank 0 logs each step from the node it lands on: a loopback server or a sqlite file is the
    driver's machine's alone. Refused at submit on cluster.yaml's head (the GPU nodes are only
    launchable then) and on a cluster with a node at another address; the head's private address,
    which cluster.yaml exports as MLFLOW_TRACKING_URI for `tracking_uri: null`, passes."""
    _head_of_cluster_yaml(tmp_path, monkeypatch)

    def reach(uri: str | None) -> list[preflight.Check]:
        return preflight.tracking_reach(load_config(PAPER, [f"tracking.tracking_uri={uri or 'null'}"]).tracking, preflight.cluster_resources())

    (refused,) = reach("http://127.0.0.1:5000")  # the old configs/paper.yaml
    assert not refused.ok and refused.subject == "tracking.tracking_uri"
    assert refused.detail.startswith("http://127.0.0.1:5000 is this machine's loopback, out of reach of training workers on "
                                     "the gpu_worker nodes the autoscaler can launch: name a tracking server")
    assert not reach("http://localhost:5000")[0].ok and not reach("sqlite:///mlruns.db")[0].ok
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.1.5:5000")
    assert reach(None) == [] and load_config(PAPER).tracking.tracking_uri == "http://10.0.1.5:5000"
    assert reach("https://mlflow.example.com") == []  # a host name: resolved where it is used

    monkeypatch.setattr(preflight, "AUTOSCALER_CONFIG", tmp_path / "absent.yaml")  # no autoscaler: the nodes that are up
    assert reach("http://127.0.0.1:5000") == []  # every node on this machine (one box's simulated cluster)
    monkeypatch.setattr("ray.nodes", lambda: [{"NodeManagerAddress": a, "Alive": alive} for a, alive in
                                              (("10.0.1.5", True), ("10.0.1.9", True), ("10.0.1.7", False))])
    assert "out of reach of training workers on 10.0.1.9:" in reach("http://127.0.0.1:5000")[0].detail
    # one box's simulated nodes at 127.0.0.x: the head's own address is every node's way to it, 127.0.0.1 no node's
    monkeypatch.setattr("ray.util.get_node_ip_address", lambda: "127.0.0.2")
    monkeypatch.setattr("ray.nodes", lambda: [{"NodeManagerAddress": a, "Alive": True} for a in ("127.0.0.2", "127.0.0.3")])
    assert reach("http://127.0.0.2:5000") == []
    assert "out of reach of training workers on 127.0.0.3:" in reach("http://127.0.0.1:5000")[0].detail
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert load_config(PAPER).tracking.tracking_uri == "sqlite:///mlruns.db"  # null without the variable: the default


@pytest.mark.unit
def test_a_jobs_preflight_sees_the_nodes_after_leaving_the_cluster(tmp_path, monkeypatch):
    """In a Ray job (RAY_ADDRESS set, Ray not initialized) the pre-flight connects, reads the
    cluster and disconnects before its checks run: the nodes at other addresses are what it read
    while connected (the checks used to ask Ray again, found it shut down, and saw no node)."""
    import ray

    connected = []
    monkeypatch.setattr(preflight, "AUTOSCALER_CONFIG", tmp_path / "absent.yaml")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.1.5:6379")
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(connected))
    monkeypatch.setattr(ray, "init", lambda **_: connected.append(True))
    monkeypatch.setattr(ray, "shutdown", connected.clear)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 48.0} if connected else pytest.fail("read while not connected"))
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeManagerAddress": a, "Alive": True} for a in ("10.0.1.5", "10.0.1.9")]
                        if connected else pytest.fail("read while not connected"))
    monkeypatch.setattr("ray.util.get_node_ip_address", lambda: "10.0.1.5")
    cluster = preflight.cluster_resources()
    assert not connected and cluster.where == "the Ray cluster at 10.0.1.5:6379"
    cfg = load_config(PAPER, ["tracking.tracking_uri=http://127.0.0.1:5000", "serve.host=127.0.0.1"])
    (tracking,) = preflight.tracking_reach(cfg.tracking, cluster)
    (serve,) = preflight.serve_reach(cfg, cluster)
    assert not tracking.ok and "out of reach of training workers on 10.0.1.9:" in tracking.detail
    assert not serve.ok and "out of reach of the actors calling our endpoint from 10.0.1.9:" in serve.detail


@pytest.mark.unit
def test_actors_on_other_machines_need_an_endpoint_they_reach(tmp_path, monkeypatch):
    """Ray Data's actors call our endpoint from any node, through Serve's one proxy on the head: a
    loopback serve.host is refused where they may run on another machine; configs/paper.yaml's
    0.0.0.0 (handed out at the head's address) passes."""
    _head_of_cluster_yaml(tmp_path, monkeypatch)

    def reach(host: str) -> list[preflight.Check]:
        return preflight.serve_reach(load_config(PAPER, [f"serve.host={host}"]), preflight.cluster_resources())

    (refused,) = reach("127.0.0.1")
    assert not refused.ok and refused.detail == (
        "127.0.0.1 is this machine's loopback, out of reach of the actors calling our endpoint from the gpu_worker nodes "
        "the autoscaler can launch: serve.host: 0.0.0.0 (the endpoint is then handed out at the head's address)")
    assert reach("0.0.0.0") == [] and load_config(PAPER).serve.host == "0.0.0.0"
    monkeypatch.setattr(preflight, "AUTOSCALER_CONFIG", tmp_path / "absent.yaml")
    assert reach("127.0.0.1") == []  # every node on this machine


@pytest.mark.unit
def test_unattended_refusal_names_the_budgets_that_let_a_paid_job_run(monkeypatch):
    """A Ray job has nobody to answer "Go ahead?": its refusal says --yes, with a hard budget for
    each paid stage not capped yet, as README's documented job command carries them."""
    from synthpert.errors import SynthPertError

    monkeypatch.setattr(preflight, "unattended_reason", lambda: "inside a Ray job")
    monkeypatch.setattr(preflight, "costs_text", lambda *a: [])  # the estimates' text is tested above
    cfg, tail = load_config(LOCAL), ", or raise generate.confirm_above_usd"
    cost = {"traces": {"usd": [40.0, 80.0], "budget_usd": None}, "predict-teacher": {"usd": [10.0, 20.0], "budget_usd": None}}
    with pytest.raises(SynthPertError) as refused:
        preflight.confirm(cfg, cost, yes=False)
    assert str(refused.value).endswith("not confirmed (inside a Ray job): re-run with --yes and a hard budget for each paid stage "
                                       f"(--set generate.max_cost_usd=USD --set evaluate.max_cost_usd=USD){tail}")
    cost["traces"]["budget_usd"] = 100.0
    with pytest.raises(SynthPertError, match=r"with --yes and a hard budget for each paid stage \(--set evaluate.max_cost_usd=USD\),"):
        preflight.confirm(cfg, cost, yes=False)
    cost["predict-teacher"]["budget_usd"] = 30.0
    with pytest.raises(SynthPertError) as refused:
        preflight.confirm(cfg, cost, yes=False)
    assert str(refused.value).endswith(f"re-run with --yes{tail}")
    preflight.confirm(cfg, cost, yes=True)


@pytest.mark.unit
def test_a_copy_of_the_served_model_in_another_folder_is_the_same_base(tmp_path):
    """Preflight compares the training and serving models as the endpoint compares an adapter's
    base: by the model's folder name, so a copy on a node's own disk is the same model."""
    copy = f"train.base_model={tmp_path}/nfs/SmolLM2-135M-Instruct"
    failed = {c.subject for c in preflight.run(load_config(LOCAL, [f"run_dir={tmp_path}", copy])).failures}
    assert "train.base_model" in failed and "serve.model" not in failed  # the copy is missing, but it is the served model


@pytest.mark.unit
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


@pytest.mark.unit
def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("")
    check = preflight.writable("run_dir", tmp_path / "taken")
    assert not check.ok and check.detail == f"{tmp_path}/taken is not a folder"
    assert preflight.writable("run_dir", tmp_path / "a" / "b").ok is False  # absolute, parent missing
    assert preflight.writable("run_dir", tmp_path / "a").ok


PRICED = ["--set=generate.teacher.price_in_per_mtok=1000", "--set=generate.teacher.price_out_per_mtok=1000"]


def _fake_endpoints(api: FakeAPI) -> list[str]:
    return [f"--set=generate.{role}.{k}={v}" for role in ("teacher", "judge")
            for k, v in (("base_url", api.base_url), ("model", "fake-teacher"), ("api_key_env", "FAKE_API_KEY"))]


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_a_costly_run_is_refused_unattended_before_anything_starts(tmp_path):
    """Above generate.confirm_above_usd, nobody to ask (no terminal; a Ray job; CI): exit 2 in one line
    after the estimate of every paid stage (traces and the teacher as a predictor), nothing sent or made."""
    import subprocess

    with FakeAPI(free_port(), api_key="right-key") as api:
        args = ["pipeline", "--config", str(LOCAL), *_fake_endpoints(api), *PRICED]
        cases = (({}, "stdin is not a terminal"), ({"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}, "inside a Ray job"), ({"CI": "true"}, "in CI"))
        for env, why in cases:
            proc = run_cli(*args, cwd=tmp_path, env=_env(FAKE_API_KEY="right-key", **env), stdin=subprocess.DEVNULL, timeout=60)
            assert proc.returncode == 2, proc.stderr
            error = proc.stderr.strip().splitlines()[-1]
            assert error.startswith("error: this run's paid calls may cost up to $"), proc.stderr
            assert f"above generate.confirm_above_usd=$5.00; not confirmed ({why}): re-run with --yes" in error
            assert "traces cost estimate for 12 tuples" in proc.stderr and "predict-teacher cost estimate for" in proc.stderr
        assert api.paths["/v1/chat/completions"] == 0
        assert list(tmp_path.iterdir()) == []
        # the same run under the threshold (and --check, which never asks) goes past the question
        check = run_cli(*args, "--check", cwd=tmp_path, env=_env(FAKE_API_KEY="right-key"), stdin=subprocess.DEVNULL, timeout=60)
        assert check.returncode == 0 and "predict-teacher cost estimate for" in check.stdout, check.stderr


def _priced_cost(*overrides: str) -> tuple:
    from synthpert import estimate

    cfg = load_config(LOCAL, ["generate.teacher.base_url=http://127.0.0.1:9/v1", "generate.teacher.price_in_per_mtok=1000", *overrides])
    cost = estimate.for_stages(cfg, ["traces", "predict-teacher", "train-cot"])
    return cfg, cost


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_confirmation_asks_on_a_terminal_and_yes_answers_it(monkeypatch, capsys):
    from synthpert import estimate
    from synthpert.errors import SynthPertError

    cfg, cost = _priced_cost()
    high = sum(est["usd"][1] for est in cost.values())
    assert set(cost) == {"traces", "predict-teacher"} and high > cfg.generate.confirm_above_usd
    assert cost["predict-teacher"]["teacher"]["calls"] == cost["predict-teacher"]["tuples"]  # one answer per tuple, no scoring call
    asked = []
    monkeypatch.setattr(preflight, "unattended_reason", lambda: None)  # a terminal
    for answer in (False, True):
        monkeypatch.setattr("typer.confirm", lambda text, **kw: asked.append(text) or answer)
        if answer:
            preflight.confirm(cfg, cost, yes=False)
        else:
            with pytest.raises(SynthPertError, match=r"not confirmed: nothing was started"):
                preflight.confirm(cfg, cost, yes=False)
    assert len(asked) == 2 and f"may cost up to ${high:.2f}" in asked[0]
    monkeypatch.setattr(preflight, "unattended_reason", lambda: "in CI")
    preflight.confirm(cfg, cost, yes=True)  # --yes: no question, even unattended
    preflight.confirm(load_config(LOCAL, [f"generate.confirm_above_usd={high}"]), cost, yes=False)  # not above
    preflight.confirm(load_config(LOCAL, ["generate.confirm_above_usd=null"]), cost, yes=False)  # never ask
    preflight.confirm(cfg, {}, yes=False)  # nothing paid
    assert len(asked) == 2
    with pytest.raises(SynthPertError, match=r"not confirmed \(in CI\)"):
        preflight.confirm(load_config(LOCAL, ["generate.confirm_above_usd=0"]), cost, yes=False)  # 0: any paid run asks
    # the local run (our endpoint, no prices) has nothing to estimate, and samples no tuple to know it
    assert estimate.for_stages(load_config(LOCAL), ["traces", "predict-teacher"]) == {}


@pytest.mark.parametrize("command", ["pipeline", "generate"])
@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_yes_flag_goes_past_the_question(command, monkeypatch, tmp_path):
    """The CLI wiring: without --yes an unattended costly run stops at the question, with it the
    stage starts (stubbed here: what follows the question is tested elsewhere)."""
    from typer.testing import CliRunner

    from synthpert.cli import app
    from synthpert.errors import SynthPertError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CI", raising=False)  # CI=true is its own reason, tested above
    target = "synthpert.cluster.ray_session" if command == "pipeline" else "synthpert.generate.run"
    monkeypatch.setattr(target, lambda *a, **k: (_ for _ in ()).throw(RuntimeError("started")))
    with FakeAPI(free_port(), api_key="right-key") as api:
        monkeypatch.setenv("FAKE_API_KEY", "right-key")
        # --verbose: the console would turn the stub's error into a printed tail and exit 1
        args = [command, "--config", str(LOCAL), *_fake_endpoints(api), *PRICED, *(["--verbose"] if command == "pipeline" else [])]
        refused = CliRunner().invoke(app, args)
        assert isinstance(refused.exception, SynthPertError) and "not confirmed (stdin is not a terminal)" in str(refused.exception)
        started = CliRunner().invoke(app, [*args, "--yes"])
        assert str(started.exception) == "started", started.output
        assert api.paths["/v1/chat/completions"] == 0


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_short_disk_is_one_line_sized_from_the_lora_checkpoints_and_traces(tmp_path, monkeypatch):
    import shutil

    from synthpert.models import model_config, resolve_model
    from synthpert.train.memory import model_shape

    cfg = load_config(LOCAL, [f"run_dir={tmp_path / 'runs'}", "train.checkpoints_to_keep=3"])
    trainable = 8 * 30 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))  # SmolLM2-135M, r 8, 7 modules, 30 layers
    assert model_shape(resolve_model(None), cfg.train).trainable == trainable  # the exact count, on a meta-device model
    assert preflight.lora_params(json.loads((resolve_model(None) / "config.json").read_text()), 8, cfg.train.target_modules) == trainable
    monkeypatch.setenv("SYNTHPERT_CACHE", str(tmp_path / "empty"))  # a new machine: the shipped copy of its config
    assert preflight.lora_params(model_config(None), 8, cfg.train.target_modules) == trainable
    monkeypatch.undo()
    checkpoints = 2 * trainable * preflight.CHECKPOINT_BYTES_PER_PARAM * (3 + 2)  # cot + raw, 3 kept + one being written
    traces = 12 * (128 + 32) * 4 * preflight.TRACE_FILES  # local: 12 tuples, teacher 128 + judge 32 output tokens
    [roomy] = preflight.run(cfg).checks[-1:]
    assert roomy.subject == "disk" and roomy.ok and f"{(checkpoints + traces) / 2**30:.2f} GiB needed" in roomy.detail

    small = shutil.disk_usage(tmp_path)._replace(free=100 * 2**20)  # a 100 MiB disk left: short of ~0.36 GiB
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: small)
    [short] = preflight.run(cfg).failures
    assert short.detail == (f"{tmp_path}: {(checkpoints + traces) / 2**30:.2f} GiB needed (checkpoints {checkpoints / 2**30:.2f} GiB, "
                            f"traces {traces / 2**30:.2f} GiB), 0.10 GiB free; free space or lower train.checkpoints_to_keep")
    # checkpoints in train.storage_path are counted where it is (here the same disk: one line for both)
    other = tmp_path / "ckpt"
    other.mkdir()
    [both] = preflight.disk_space(cfg.model_copy(update={"train": cfg.train.model_copy(update={"storage_path": str(other)})}),
                                  ["traces", "train-cot", "train-raw"], 12)
    assert both.detail.startswith(f"{other}: ") and "(checkpoints" in both.detail and "traces" in both.detail


@pytest.mark.unit
def test_paper_check_prints_usd_and_gpu_hours_for_its_subset_and_the_whole_set(tmp_path, monkeypatch):
    """configs/paper.yaml evaluates a declared subset; its pre-flight sizes that and the whole
    evaluation set in USD and GPU hours. What this box lacks is stubbed (the OpenAI endpoint, the
    cluster's GPUs) or pointed elsewhere (run_dir, the embedded model for the 8B one); one cell line
    and small samples keep it quick, and its whole set is every validation and test pair of k562."""
    monkeypatch.setenv("OPENAI_API_KEY", "stub")
    monkeypatch.setattr(preflight, "_listed_models", lambda url, key: (["o4-mini"], None))
    monkeypatch.setattr(preflight, "cluster_resources", lambda: preflight.Cluster({"GPU": 4.0, "CPU": 48.0}, "the stubbed cluster"))
    cfg = load_config(PAPER, [f"run_dir={tmp_path}", "train.base_model=null", "serve.model=null", "data.cell_lines=[k562]",
                              "data.limit=40", "evaluate.limit=30", "data.knowledge.enabled=false"])
    report = preflight.run(cfg)
    assert report.failures == [] and {"traces", "train-cot", "predict-base", "predict-teacher"} <= set(report.pending)
    subset, whole = report.size["sizes"]
    assert (subset["evaluate.limit"], subset["tuples"]) == (30, 60)  # validation and test: 30 of each
    assert (whole["evaluate.limit"], whole["tuples"]) == (None, 12836 + 23212)
    for kind in ("usd", "gpu_hours"):
        low, high = (subset[kind], whole[kind]) if kind == "usd" else (subset[kind]["total"], whole[kind]["total"])
        assert 0 < low[0] < low[1] and 0 < high[0] < high[1] and low[1] < high[1], kind
    predicted = {name: whole["gpu_hours"][name][1] for name in ("train", "predict")}
    assert predicted["train"] == subset["gpu_hours"]["train"][1] > 0 < predicted["predict"]  # the same training either way
    text = report.text()
    for size, name in ((subset, "evaluate.limit=30 (as configured)"), (whole, "evaluate.limit=null (the whole set)")):
        [line] = [line for line in text.splitlines() if line.strip().startswith(name)]
        hours = size["gpu_hours"]["total"]
        assert f"${size['usd'][0]:,.2f}-${size['usd'][1]:,.2f}" in line and f"GPU hours {hours[0]:,.0f}-{hours[1]:,.0f}" in line, line
    assert "assumed per A10G 24 GB: 600 GB/s, 70 TFLOPS bf16" in text and "tok/s" in text
