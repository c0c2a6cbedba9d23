"""A real multi-node Ray cluster on one box (Ray's own `ray.cluster_utils.Cluster`): a head with no
CPUs (the driver, Serve's controller, proxy and ingress) and two 1-CPU worker nodes, each its own
raylet, object store and workers. Trace generation, ZeRO-3 training and the Serve endpoint spread
over both worker nodes; then one worker node is removed (`Cluster.remove_node`: its raylet and
every worker on it are killed) in the middle of the work, and the counts must still add up. The
whole pipeline, submitted as a Ray job to the head, runs over both worker nodes too.

One box, so: Ray's control plane listens on the box's own address (192.0.2.2 here), as the
`ray start --head` of tests/conftest.py does: a driver turns 127.0.0.1 into that address before it
connects (ray._private.services.resolve_ip_for_localhost), so nodes bound to 127.0.0.1 alone could
not be joined. Every HTTP endpoint (the fake provider, Serve's proxy, the dashboard) is loopback.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pandas as pd
import pytest

from synthpert import generate
from synthpert.cluster import code_env
from synthpert.config import ServeConfig
from synthpert.data import sample_tuples
from tests.conftest import REPO, free_port
from tests.fake_api import FakeAPI, finished_keys
from tests.test_generate import _fake_cfg
from tests.test_train import TINY, assert_adapter_matches_memory, checkpointed, write_traces

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.multinode]

STORE = 100 * 2**20  # each node's object store: our blocks are a few KiB
WORKERS = 2
# each node at an address of its own, as machines are: what only 127.0.0.1 reaches is one node's alone
HEAD_IP = "127.0.0.2"  # not 127.0.0.1, which ray.init rewrites to the machine's routable address
_WORKER_IDS = itertools.count(1)  # names the worker nodes' addresses (127.0.0.3, ...) and runtime_env folders


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs, dashboard on loopback for the state API and the job API) + two 1-CPU workers;
    this process is the driver (the stages' `ray_session` joins it). The head's dashboard agent,
    which runs submitted jobs, gets a free port: at Ray's default (52365) it would lose the port to
    any other Ray node on the box and the job API would answer "No available agent"."""
    import ray
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 0, "object_store_memory": STORE, "node_ip_address": HEAD_IP, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port()}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(WORKERS):
            _add_worker(cluster)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env=code_env())
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _add_worker(cluster, num_cpus: float = 1):
    """One more worker node (1 CPU unless said) at an address of its own, with runtime_env files of its own. The nodes of one box share a
    session folder, and a node's runtime_env agent deletes a working_dir it no longer uses from the
    shared `runtime_resources/`, under the feet of a job's driver on the head (whose cwd it is):
    on a real cluster each machine has its own."""
    n = next(_WORKER_IDS)
    return cluster.add_node(num_cpus=num_cpus, object_store_memory=STORE, node_ip_address=f"127.0.0.{2 + n}",
                            runtime_env_dir_name=f"runtime_resources_{n}")


def _two_workers(cluster) -> list:
    """The live worker nodes, topped up to two (an earlier test may have removed one)."""
    while len(cluster.worker_nodes) < WORKERS:
        _add_worker(cluster)
    cluster.wait_for_nodes()
    return list(cluster.worker_nodes)


def _actor_nodes(name: str) -> dict[str, str]:
    """Alive actors whose class name contains `name`: actor id -> node id (Ray's state API)."""
    return _actors(name, [("state", "=", "ALIVE")])


def _actors(name: str, filters: list | None = None) -> dict[str, str]:
    """Actors, alive or dead unless `filters` say, whose class name contains `name`: actor id ->
    node id. Asks this driver's cluster by its address (not whichever Ray the box started last)."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=filters, detail=True, limit=10_000)
    return {a.actor_id: a.node_id for a in actors if name in a.class_name}


def _wait(what: str, done, timeout_s: float, step_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s:.0f} s"
        time.sleep(step_s)


def test_generation_spreads_over_nodes_and_a_node_loss_loses_no_row_and_repays_no_finished_call(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workers = {node.node_id: node for node in _two_workers(cluster)}
    with FakeAPI(free_port(), latency_s=0.2) as api:
        cfg = _fake_cfg(api, tmp_path, "data.limit=48", "generate.actors=2", "generate.batch_size=4",
                        "generate.teacher.max_concurrency=8", "generate.judge.max_concurrency=8", "tracking.enabled=false")
        cache = tmp_path / "traces" / "calls.sqlite"
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["summary"] = generate.run(cfg, progress=False)
            except Exception as exc:  # noqa: BLE001 - reported below, then re-run as a user would
                outcome["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        _wait("16 answered calls", lambda: api.answered_total() >= 16 or not thread.is_alive(), 180)
        assert thread.is_alive(), f"the run ended before the node loss: {outcome}"
        # Ray Data places actors SPREAD: best-effort round-robin over the nodes, the teacher and
        # judge pools' actors interleaved, so the two pools together span both nodes (one pool alone may sit on one)
        teachers, judges = _actor_nodes("TeacherActor"), _actor_nodes("JudgeActor")
        spread = set(teachers.values()) | set(judges.values())
        assert len(spread) >= 2 and spread <= set(workers), f"actors on nodes {spread}, workers {set(workers)}"
        victim_id = next(iter(teachers.values()))  # a teacher actor's node (and whatever judges share it)
        victim = workers[victim_id]
        # calls the lost node could hold in flight: each actor's client holds max_concurrency / actors
        # (map_with_actors' share); SPREAD may put both judges beside the teacher
        g = cfg.generate
        lost_actors = {kind: sum(node == victim_id for node in placed.values())
                       for kind, placed in (("teacher", teachers), ("judge", judges))}
        lost_slots = (lost_actors["teacher"] * (g.teacher.max_concurrency // g.actors)
                      + lost_actors["judge"] * (g.judge.max_concurrency // g.actors))
        answered_at_loss, lost_at = api.answered_total(), time.time()
        cluster.remove_node(victim)  # the node's raylet and every worker on it, teacher (and judge) actors too
        thread.join(240)
        assert not thread.is_alive(), "generation still running 240 s after the node loss"
        rerun = "error" in outcome
        if rerun:  # the call cache makes running the same command again exactly-once
            outcome["summary"] = generate.run(cfg, progress=False)

    summary = outcome["summary"]
    attempts = pd.read_parquet(tmp_path / "traces" / "attempts.parquet")
    expected = list(sample_tuples(cfg.data)["tuple_id"])
    assert list(attempts["tuple_id"]) == expected, (
        f"{len(attempts)} rows ({attempts['tuple_id'].nunique()} distinct) for {len(expected)} tuples")
    assert summary["rows"] == 48 and summary["errored"] == 0, summary
    finished_before = finished_keys(cache, before=lost_at)
    repaid = {key: n for key, n in api.answered.items() if n > 1}
    repaid_finished = {key: repaid[key] for key in finished_before & set(repaid)}
    assert not repaid_finished, (f"{len(repaid_finished)} of the {len(finished_before)} calls finished before the loss "
                                 f"were paid again: {repaid_finished}")
    # a call the lost node had in flight was answered (and billed) but never reached the cache:
    # asked again, it is the only kind paid twice, at most the lost actors' share of the concurrency
    assert len(repaid) <= lost_slots and max(repaid.values(), default=1) <= 2, (
        f"paid twice: {repaid}, actors lost {lost_actors} holding {lost_slots} calls")
    calls = finished_keys(cache)
    assert set(api.answered) == calls, f"{len(set(api.answered) - calls)} answered calls never reached the cache"
    assert api.answered_total() == len(calls) + sum(n - 1 for n in repaid.values())
    print(f"nodes {len(spread)}, actors lost {lost_actors} ({lost_slots} calls), answered at loss {answered_at_loss}, finished before it {len(finished_before)}, "
          f"answered {api.answered_total()} for {len(calls)} calls, paid twice {len(repaid)}, re-run {rerun}")


async def _ask(client: openai.AsyncOpenAI, i: int, max_tokens: int = 32) -> tuple[int | str, str]:
    """One chat request: (200, text), (status, message) for an HTTP error, or (exception name, message)."""
    try:
        messages = [{"role": "user", "content": f"Write a 1000-word story about gene number {i}."}]  # runs past max_tokens
        out = await client.chat.completions.create(model="base", messages=messages, max_tokens=max_tokens, temperature=0)
        return 200, out.choices[0].message.content
    except openai.APIStatusError as exc:
        return exc.status_code, f"{exc.message} (Retry-After: {exc.response.headers.get('retry-after')})"
    except openai.APIError as exc:  # no HTTP answer at all: a reset connection, a timeout
        return type(exc).__name__, str(exc)


@pytest.mark.serve
def test_serve_replicas_on_two_nodes_and_a_node_loss_fails_only_its_requests_with_503(cluster, embedded_model):
    import ray
    from synthpert.serving import running

    workers = {node.node_id: node for node in _two_workers(cluster)}
    head = cluster.head_node.node_id
    # half a CPU a replica: both would fit one node, so landing on two is Serve spreading them
    cfg = ServeConfig(engine="transformers", min_replicas=2, max_replicas=2, cpus_per_replica=0.5, max_batch_size=4)
    with running(cfg) as url:
        engines = _actor_nodes(":Engine")
        assert len(set(engines.values())) == 2 and set(engines.values()) <= set(workers), (
            f"engine replicas on nodes {sorted(engines.values())}, workers {sorted(workers)}")
        ingress = set(_actor_nodes(":OpenAIIngress").values())
        assert ingress == {head} == {ray.get_runtime_context().get_node_id()}, f"ingress on {ingress}, head {head}"
        victim = workers[next(iter(engines.values()))]
        survivor = (set(workers) - {victim.node_id}).pop()
        # a request Serve had not yet placed on the lost replica goes to the survivor (its router retries
        # the reservation), behind that replica's own two batches: 600 s lets it finish on a loaded box
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

        async def admitted(n: int) -> None:
            async with httpx.AsyncClient() as http:
                for _ in range(120):  # bounded: 60 s
                    if f"synthpert_queue_depth {float(n)}" in (await http.get(f"{url.removesuffix('/v1')}/metrics")).text:
                        return
                    await asyncio.sleep(0.5)
            raise AssertionError(f"{n} requests not admitted within 60 s")

        async def load() -> tuple[list, list]:
            # 256 tokens each (the prompt runs past them), two batches a replica: they outlast the wait on
            # any CPU (one with native bfloat16 had finished 32-token answers within it)
            during = [asyncio.create_task(_ask(client, i, max_tokens=256)) for i in range(16)]
            await admitted(16)
            await asyncio.sleep(3.0)  # placed on the replicas, the first batches decoding on both
            await asyncio.to_thread(cluster.remove_node, victim)
            first = await asyncio.gather(*during)
            return first, await asyncio.gather(*(_ask(client, 100 + i) for i in range(4)))

        during, after = asyncio.run(load())
        answered = [r for r in during if r[0] == 200]
        lost = [r for r in during if r[0] == 503]
        other = [r for r in during if r[0] not in (200, 503)]
        counts = f"{len(answered)} answered, {len(lost)} x 503, others {other}"
        assert len(answered) + len(lost) == 16 and not other, counts
        assert answered and lost, f"the loss should fail the lost replica's requests and only those: {counts}"
        assert all("replica serving this request was lost" in m and "Retry-After: 1" in m for _, m in lost), lost
        assert all(text for _, text in answered)
        assert [s for s, _ in after] == [200] * 4, f"after the loss: {after}"
        left = set(_actor_nodes(":Engine").values())
        assert left <= {survivor}, f"engine replicas after the loss on {left}, survivor {survivor}"
    print(f"replicas on 2 nodes; during the loss {counts}; after it 4/4 answered on the survivor")


# ---------------------------------------------------------------- autoscaling onto a second node
def _running_replicas() -> int:
    from ray import serve

    from synthpert.serving.launch import APP_NAME

    states = serve.status().applications[APP_NAME].deployments["Engine"].replica_states
    return states.get("RUNNING", 0)


@pytest.mark.serve
def test_serve_scales_out_to_a_second_node_under_load_and_back_in_when_idle(cluster, embedded_model):
    """One replica's CPU per worker node: under more ongoing requests than the target, Serve's
    autoscaler adds a replica, which can only go to the other node; once the load stops it goes
    back to one replica after serve.downscale_delay_s."""
    from synthpert.serving import running

    workers = {node.node_id for node in _two_workers(cluster)}
    cfg = ServeConfig(engine="transformers", min_replicas=1, max_replicas=2, target_ongoing_requests=2,
                      upscale_delay_s=0, downscale_delay_s=5, cpus_per_replica=1, max_batch_size=4)
    with running(cfg) as url:
        assert _running_replicas() == 1
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=180)
        peak: dict[str, str] = {}

        async def load() -> list:
            """8 requests in flight until a second replica runs (at most 240 s), then the last ones."""
            deadline, answers, flying, i = time.monotonic() + 240, [], set(), 0
            while time.monotonic() < deadline and len(peak) < 2:
                while len(flying) < 8:
                    flying.add(asyncio.create_task(_ask(client, i)))
                    i += 1
                done, flying = await asyncio.wait(flying, timeout=2, return_when=asyncio.FIRST_COMPLETED)
                answers += [task.result() for task in done]
                if _running_replicas() == 2:
                    peak.update(_actor_nodes(":Engine"))
            return answers + list(await asyncio.gather(*flying))

        answers = asyncio.run(load())
        statuses = [status for status, _ in answers]
        assert len(set(peak.values())) == 2 and set(peak.values()) <= workers, f"replicas at the peak on {peak}"
        assert statuses == [200] * len(statuses), f"{len(statuses)} requests: {statuses}"
        _wait("back to one replica when idle", lambda: _running_replicas() == 1, 180, 1.0)
    print(f"scaled out to 2 nodes under {len(answers)} requests, back to 1 replica when idle")


# ---------------------------------------------------------------- training over two nodes, one lost
@pytest.mark.train
@pytest.mark.timeout(1200)
def test_zero3_over_two_nodes_resumes_after_losing_one(cluster, tmp_path, embedded_model):
    """ZeRO-3 partitions every weight across two training workers, one per 1-CPU worker node;
    checkpoints go to `train.storage_path`, a folder no node owns (standing in for NFS / S3). Once
    the first checkpoint is in, the node of a training worker is removed and a fresh node joins:
    Ray Train (FailureConfig) restarts the group from that checkpoint on the survivor and the new
    node, and the adapter saved at the end is gathered (non-zero lora_B, the in-memory logits)."""
    nodes = _two_workers(cluster)
    storage = tmp_path / "shared-storage"
    sets = [*TINY, "train.checkpoint_every_steps=2", "train.max_failures=1", "tracking.enabled=false", f"train.storage_path={storage}"]
    args = ["train", "--data", str(write_traces(tmp_path / "traces")), "--mode", "cot", "--output", str(tmp_path / "run"),
            "--zero-stage", "3", "--num-workers", "2", "--max-steps", "4", "--json", *(f"--set={s}" for s in sets)]
    # its own driver, as `synthpert train` always is, joined to this cluster
    proc = subprocess.Popen([sys.executable, "-m", "synthpert", *args], env={**os.environ, "RAY_ADDRESS": cluster.address},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        _wait("the first checkpoint", lambda: checkpointed(storage) or proc.poll() is not None, 600, 0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        placed = _actor_nodes("RayTrainWorker")
        assert len(set(placed.values())) == 2, f"the two training workers ran on nodes {placed}"
        victim = next(node for node in nodes if node.node_id in placed.values())
        survivor = next(node.node_id for node in nodes if node is not victim)
        cluster.remove_node(victim)
        fresh = _add_worker(cluster).node_id
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    state = json.loads((tmp_path / "run" / "train_state.json").read_text())
    assert state["resumed_from"] and state["resumed_from"][0] >= 2, state["resumed_from"]  # from the checkpoint, not step 0
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4] and summary["steps"] == 4
    assert summary["final_loss"] < 0.7 * summary["first_loss"]
    assert sorted(summary["worker_nodes"]) == sorted([survivor, fresh]), summary["worker_nodes"]  # the restarted group's
    assert_adapter_matches_memory(tmp_path / "run", embedded_model)


def test_one_call_cache_serves_callers_on_every_node(cluster, tmp_path):
    """A stage's call cache is one SQLite file, whose WAL cannot be shared across machines: one owner
    actor on the driver's node (no CPU: the 0-CPU head) holds it, and callers on both worker nodes
    write, read and reserve budget through it; check-and-reserve stays atomic across them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from synthpert.llm.cache import AwaitedCache, CallCache, cache_owner

    workers = [node.node_id for node in _two_workers(cluster)]
    path = tmp_path / "calls.sqlite"
    CallCache.start_budget(path, 1.0)
    owner = cache_owner(path)

    @ray.remote(num_cpus=0.1)
    def call(cache, name: str) -> list[bool]:
        async def go() -> list[bool]:
            awaited = AwaitedCache(cache)
            await awaited("put", name, "m", {"node": ray.get_runtime_context().get_node_id()})
            return [await awaited("reserve", 0.25, 1.0) for _ in range(8)]

        return asyncio.run(go())

    granted = ray.get([call.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(owner, f"key-{i}")
                       for i, node in enumerate(workers)])
    assert sum(map(sum, granted)) == 4  # 16 reservations of $0.25 asked for against $1.0: none granted twice
    assert set(_actor_nodes("CallCache").values()) == {cluster.head_node.node_id}
    del owner
    cache = CallCache(path)
    assert len(cache) == 2 and {cache.get(f"key-{i}")["node"] for i in range(2)} == set(workers)


# ---------------------------------------------------------------- the paper's run as a Ray job over the nodes
KEY = "sk-rehearsal-0123456789"  # the job's OPENAI_API_KEY: it must reach the provider and nothing else


@pytest.mark.serve
@pytest.mark.train
@pytest.mark.timeout(1200)
def test_the_paper_config_shrunk_runs_as_a_ray_job_over_the_nodes(cluster, tmp_path):
    """`ray job submit` of configs/paper.yaml, shrunk in size only (one line, a few tuples, one
    training step, the embedded model on CPUs, a loopback provider standing in for o4-mini), to the
    head's job API, as on cluster.yaml's cluster at submit: the head alone, its autoscaler able to
    launch the workers (a ray_bootstrap_config.yaml as `ray up` leaves it; the test adds them once the
    pre-flight has passed, as that autoscaler would). The driver runs on the 0-CPU head, teacher and
    judge are paid calls through the provider (no endpoint of ours for the traces), each training
    stage's two ranks land on two worker nodes, and the students are served on a worker node behind
    a proxy at the head's address. The provider's key and the tracking server's URI (MLflow at the
    head's address) travel in the job's environment, as on cluster.yaml's head; the key reaches
    nothing but the provider. Refused at submit: the head alone with no autoscaler config (nothing
    could train), and the loopback server and endpoint the paper config had. The README's own run, on the default engine, and its re-run that skips every stage are
    tests/test_first_contact.py's."""
    import ray
    import yaml
    from mlflow import MlflowClient
    from ray.autoscaler._private.util import prepare_config
    from ray.job_submission import JobStatus, JobSubmissionClient

    from synthpert import tracking
    from synthpert.config import load_config
    from tests.conftest import mlflow_service, ray_job_env, wait_job
    from tests.test_pipeline import STAGES

    for node in list(cluster.worker_nodes):  # at submit cluster.yaml's cluster is its head
        cluster.remove_node(node)
    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    config["max_workers"] = WORKERS
    config["available_node_types"][config["head_node_type"]]["resources"] = {"CPU": 0}
    config["available_node_types"]["gpu_worker"].update(resources={"CPU": 1}, max_workers=WORKERS)  # CPUs for GPUs here
    # as `ray up` leaves it in the head's HOME; named by SYNTHPERT_AUTOSCALER_CONFIG here: with another HOME,
    # a worker of a cluster with token auth (on when ~/.ray/auth_token exists) cannot find its token
    autoscaler = tmp_path / "ray_bootstrap_config.yaml"
    autoscaler.write_text(json.dumps(config))
    before = {name: set(_actors(name)) for name in (":Engine", "RayTrainWorker")}
    run_dir = tmp_path / "run"
    with FakeAPI(free_port(), api_key=KEY) as api, mlflow_service(tmp_path / "mlflow", HEAD_IP) as mlflow_uri:
        sets = [
            f"run_dir={run_dir}", *(f"{stage}.output_dir={run_dir / stage}" for stage in ("generate", "train", "evaluate")),
            # the fake judge draws each grade from a hash of its prompt: with these prompts enough of the 24
            # traces pass the paper's filter (excellent, answer = label) for two ranks; new wording redraws them
            "data.cell_lines=[k562]", "data.fraction=null", "data.limit=24",
            *(f"generate.{role}.{key}" for role in ("teacher", "judge")
              for key in (f"base_url={api.base_url}", f"model=fake-{role}")),
            "train.base_model=null", "train.use_gpu=false", "train.num_workers=2", "train.cpus_per_worker=1",
            "train.max_steps=1", "train.warmup_ratio=0", "train.max_seq_len=1024", "train.placement_strategy=SPREAD",
            "serve.engine=transformers", "serve.model=null", "serve.use_gpu=false", "serve.max_replicas=1",
            "serve.max_model_len=2048", "serve.torch_threads=2",  # the replica computes alone while the students answer
            "evaluate.limit=4", "evaluate.max_tokens=16", "evaluate.bootstrap=20", "evaluate.baselines=[retrieval]",
            "tracking.experiment=paper-rehearsal",
        ]  # fmt: skip
        client = JobSubmissionClient(f"http://{cluster.head_node.address_info['webui_url']}")  # the head's dashboard, on loopback
        env = ray_job_env()
        # as cluster.yaml's head gives every job: the key, and the MLflow server paper.yaml's `tracking_uri: null` reads
        env["env_vars"] = {**env.get("env_vars", {}), "OPENAI_API_KEY": KEY, "MLFLOW_TRACKING_URI": mlflow_uri,
                          "SYNTHPERT_AUTOSCALER_CONFIG": str(autoscaler)}

        def submit(*extra: str, runtime_env: dict = env) -> str:
            args = ["--config", "configs/paper.yaml", "--json", "--yes", "--set", "generate.max_cost_usd=5",
                    "--set", "evaluate.max_cost_usd=5", *(a for s in [*sets, *extra] for a in ("--set", s))]
            # the venv's interpreter: the nodes' PATH is this process's, where `python` may be another one
            return client.submit_job(entrypoint=f"{shlex.quote(sys.executable)} ray_jobs/pipeline.py {shlex.join(args)}",
                                     runtime_env=runtime_env)

        # the head alone and no autoscaler config: no worker can come, so nothing could train or serve
        alone = {**env, "env_vars": {k: v for k, v in env["env_vars"].items() if k != "SYNTHPERT_AUTOSCALER_CONFIG"}}
        status, logs = wait_job(client, submit(f"serve.host={HEAD_IP}", runtime_env=alone), timeout=180)
        assert status == JobStatus.FAILED and re.search(r"train\.cpus: 2 CPUs needed \(.*\), the .* has 0$", logs, re.M), logs[-3000:]
        assert "can launch" not in logs and not run_dir.exists(), logs[-3000:]
        # the paper config's old values: MLflow and the endpoint on the head's loopback, out of the workers' reach
        status, logs = wait_job(client, submit(f"tracking.tracking_uri=http://127.0.0.1:{free_port()}", "serve.host=127.0.0.1"), timeout=180)
        assert status == JobStatus.FAILED and "pre-flight: 2 problem(s)" in logs, logs[-3000:]
        assert "tracking.tracking_uri: http://127.0.0.1:" in logs and "serve.host: 127.0.0.1 is this machine's loopback" in logs
        assert "the gpu_worker nodes the autoscaler can launch" in logs and not run_dir.exists()

        started = time.monotonic()
        job = submit(f"serve.host={HEAD_IP}")  # the head's address (0.0.0.0 in paper.yaml: tests bind loopback only)
        _wait("the pre-flight passing with no worker up", lambda: run_dir.exists() or client.get_job_status(job).is_terminal(), 180, 0.5)
        workers = {node.node_id for node in _two_workers(cluster)}  # what the autoscaler launches for the pending tasks
        head = cluster.head_node.node_id
        status, logs = wait_job(client, job, timeout=1000)
        elapsed = time.monotonic() - started
        assert status == JobStatus.SUCCEEDED, logs[-5000:]
        assert api.authorization == {f"Bearer {KEY}"} and api.answered_total() > 0
        result = json.loads(logs.strip().splitlines()[-1])
        # the predict stages end in any order; the teacher (a model of the API) is scored too
        assert sorted(result["ran"]) == sorted([*STAGES, "predict-teacher"]) and result["skipped"] == [], result
        assert client.get_job_info(job).driver_node_id == head == ray.get_runtime_context().get_node_id()

        report = (run_dir / result["report"].split(str(run_dir) + "/", 1)[1]).read_text()
        for model in ("student-cot", "student-raw", "base", "teacher", "trivial", "retrieval"):
            assert f"| {model} |" in report
        assert set(result["validation_scores"]) >= {"student-cot", "student-raw", "base", "trivial"}
        assert "engine `transformers`" in report

        trained = {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("train-*/stage.json")}
        assert len(trained) == 2, sorted(trained)
        for stage, record in trained.items():  # SPREAD: the two ranks on two different worker nodes
            nodes = record["worker_nodes"]
            assert len(nodes) == 2 and len(set(nodes)) == 2 and set(nodes) <= workers, (stage, nodes, workers)
        engines = {a: n for a, n in _actors(":Engine").items() if a not in before[":Engine"]}
        ranks = {a: n for a, n in _actors("RayTrainWorker").items() if a not in before["RayTrainWorker"]}
        assert len(engines) == 1 and set(engines.values()) <= workers, f"engine replicas on {engines}"  # the predictions' only
        assert len(ranks) == 4 and set(ranks.values()) <= workers and len(set(ranks.values())) >= 2, f"training workers on {ranks}"

        tracking.setup(load_config(None, [f"tracking.tracking_uri={mlflow_uri}", "tracking.experiment=paper-rehearsal"]).tracking)
        mlflow_client = MlflowClient()
        parent = mlflow_client.get_run(result["mlflow_parent_run_id"])
        children = mlflow_client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert {"generate", "train"} <= {r.data.tags["synthpert.stage"] for r in children}
        champion = mlflow_client.get_model_version_by_alias("synthpert-student", "champion")
        assert str(champion.version) == str(result["registered"]["version"])
        assert "report/report.md" in [a.path for a in mlflow_client.list_artifacts(parent.info.run_id, "report")]
        for run in (parent, *children):  # the key is in no parameter, tag or metric name
            assert KEY not in json.dumps([run.data.params, run.data.tags, list(run.data.metrics)])
        assert KEY not in logs
        leaked = [p for p in run_dir.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
        assert leaked == [], leaked
    print(f"paper config as a job over {len(workers)} worker nodes in {elapsed:.0f} s")
