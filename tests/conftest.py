"""Shared fixtures. Stage-specific fixtures live next to their tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Every test session starts as a new machine does: empty model caches (the embedded model is
    converted by the first test that needs it), in this process and every one it starts.
    SYNTHPERT_TEST_WARM_CACHE=1 keeps the caches the environment names (faster local iterations)."""
    if os.environ.get("SYNTHPERT_TEST_WARM_CACHE") != "1":
        config._synthpert_caches = Path(tempfile.mkdtemp(prefix="synthpert-test-caches-"))
        os.environ["SYNTHPERT_CACHE"] = str(config._synthpert_caches / "synthpert")
        os.environ["HF_HOME"] = str(config._synthpert_caches / "hf")


def pytest_unconfigure(config):
    """The session's caches go with it (the converted model alone is ~540 MB)."""
    if getattr(config, "_synthpert_caches", None):
        shutil.rmtree(config._synthpert_caches, ignore_errors=True)


@pytest.fixture(scope="session")
def embedded_model():
    """The real bundled SmolLM2-135M-Instruct as a plain HF folder (converted once, then cached)."""
    from synthpert.models import embedded_model_dir

    return embedded_model_dir()


def free_port() -> int:
    """A free loopback TCP port (tests bind nothing but loopback: 127.0.0.1, and 127.0.0.x for a simulated node)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str, check: bool = False, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m synthpert ARGS` in a subprocess, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "synthpert", *args], capture_output=True, text=True, timeout=timeout, cwd=kwargs.pop("cwd", REPO), **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"synthpert {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextlib.contextmanager
def background_service(cmd: list[str], env: dict[str, str], log: Path, ready, what: str, timeout: float = 240):
    """Run `cmd` in its own process group until `ready()` is true (bounded); stop the whole group after.

    Only processes this call started are signalled (by their process and group id), never others by name.
    """
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    try:
        deadline = time.monotonic() + timeout
        while not _probe(ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited {proc.returncode}" if proc.poll() is not None else f"not ready after {timeout:.0f} s"
                raise RuntimeError(f"{what} {state}; log {log}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield proc
    finally:  # the leader shuts its own children down on SIGTERM; the group's leftovers get SIGKILL
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _probe(ready) -> bool:
    try:
        return bool(ready())
    except Exception:
        return False


def _http_ok(url: str) -> bool:
    import httpx

    return httpx.get(url, timeout=2).status_code == 200


@contextlib.contextmanager
def mlflow_service(root: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """A real `mlflow server` (started by mlflow/server.sh) at `host` (a loopback address) with a
    sqlite store and an artifact root under `root`; yields its http URI."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "MLFLOW_HOST": host,
        "MLFLOW_PORT": str(port),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{root}/mlflow.db",
        "MLFLOW_ARTIFACTS_DESTINATION": str(root / "artifacts"),
        # MLflow answers 403 to a Host header outside localhost, 127.0.0.1 and the private ranges (a
        # cluster head's address is in them); a simulated node's 127.0.0.x is not
        "MLFLOW_SERVER_ALLOWED_HOSTS": f"{host},{host}:*",
    }
    uri = f"http://{host}:{port}"
    cmd = ["bash", str(REPO / "mlflow" / "server.sh")]
    with background_service(cmd, env, root / "server.log", lambda: _http_ok(f"{uri}/health"), "mlflow server"):
        yield uri


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    with mlflow_service(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="session")
def ray_head():
    """A real Ray head (`ray start --head --block`) on loopback with its own temp dir and free
    ports, started from this venv (so a job's `python` is the venv's); yields the dashboard (job
    API) address. Token auth is off on this loopback-only test cluster. Three logical CPUs: a vLLM
    replica holds two, and the Ray Data stage calling it one more."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))  # short: Ray's socket paths
    venv_bin = Path(sys.executable).parent
    dashboard, agent = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}
    cmd = [
        str(venv_bin / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={free_port()}", f"--temp-dir={temp_dir}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={free_port()}",
        "--num-cpus=3", f"--object-store-memory={300 * 2**20}",
    ]  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    # jobs go to the head node's agent: ready when both the job API and that agent answer
    ready = lambda: _http_ok(f"{address}/api/version") and _http_ok(f"http://127.0.0.1:{agent}/api/healthz")  # noqa: E731
    try:
        with pytest.MonkeyPatch.context() as patch, background_service(cmd, env, temp_dir / "head.log", ready, "ray head"):
            patch.setenv("RAY_AUTH_MODE", "disabled")  # for the job client in this process
            yield address
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_job_env() -> dict:
    """The shared runtime_env of ray_jobs/ with this checkout as the working dir."""
    env = yaml.safe_load((REPO / "ray_jobs" / "runtime_env.yaml").read_text())
    return {**env, "working_dir": str(REPO)}


def wait_job(client, job_id: str, timeout: float = 180):
    """Wait (bounded) for a Ray job to end; returns its status and logs."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} still {status} after {timeout} s:\n{client.get_job_logs(job_id)}")
        time.sleep(1)
    return status, client.get_job_logs(job_id)


TIERS = {"unit", "ray", "serve", "train", "slow"}


def pytest_collection_modifyitems(config, items):
    """Every test belongs to a tier (pyproject's markers): an unmarked test would silently fall
    out of `pytest -m unit` and of every other selection."""
    untiered = [item.nodeid for item in items if not TIERS & {m.name for m in item.iter_markers()}]
    if untiered:
        raise pytest.UsageError(f"tests without a tier marker ({', '.join(sorted(TIERS))}): {', '.join(untiered)}")
