"""`synthpert serve` as a user runs it: a Serve config file from serve/, --port, --adapter, no API
key in the environment (auth off), stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest

from tests.conftest import REPO, free_port, run_cli


@pytest.mark.unit
def test_bad_adapter_spec_exits_2():
    proc = run_cli("serve", "--adapter", "no-equals-sign")
    assert proc.returncode == 2 and "NAME=PATH_OR_URI" in proc.stderr


@pytest.mark.serve
@pytest.mark.slow
def test_serve_config_file_with_port_and_adapter(tmp_path):
    adapter = tmp_path / "student"
    adapter.mkdir()  # listed only; adapters load on first use
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("SYNTHPERT_API_KEY", "RAY_ADDRESS")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "synthpert", "serve", "--config", "serve/local.yaml", "--port", str(port),
         "--adapter", f"student={adapter}", "--set", "serve.max_batch_size=8"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        ready = None
        deadline = time.monotonic() + 420
        while ready is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=5)
            except queue.Empty:
                continue
            if line.startswith("{"):
                ready = json.loads(line)
        assert ready is not None, f"no ready line; exit code {proc.poll()}"
        (base_url,) = ready["base_urls"]
        assert base_url == f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=base_url, api_key="anything", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["base", "student"]
        out = client.chat.completions.create(model="base", max_tokens=4, temperature=0,
                                             messages=[{"role": "user", "content": "Hi"}])
        assert out.choices[0].message.content and out.usage.completion_tokens > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
