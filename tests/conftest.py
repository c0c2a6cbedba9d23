"""Shared fixtures. Stage-specific fixtures live next to their tests."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def embedded_model():
    """The real bundled SmolLM2-135M-Instruct as a plain HF folder (converted once, then cached)."""
    from synthpert.models import embedded_model_dir

    return embedded_model_dir()


def free_port() -> int:
    """A free loopback TCP port (tests never bind anything but 127.0.0.1)."""
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
