"""The float type and engine `auto` picks, and that what it picks is part of the endpoint's identity."""

from __future__ import annotations

import sys

import pytest

from synthpert import hardware
from synthpert.config import ServeConfig

pytestmark = pytest.mark.unit

FLAGS = "processor\t: 0\nflags\t\t: fpu vme sse sse2 avx2 avx512f {extra}\n"


@pytest.mark.parametrize(("extra", "fast"), [("", False), ("avx512_bf16", True), ("amx_bf16 amx_tile", True)])
def test_bf16_is_native_only_with_its_cpu_flags(tmp_path, extra, fast):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(FLAGS.format(extra=extra))
    assert hardware.cpu_has_fast_bf16(cpuinfo) is fast


def test_auto_dtype_follows_the_hardware_and_an_explicit_one_wins(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert hardware.pick_dtype("auto", on_gpu=False)[0] == "float32"
    assert hardware.pick_dtype("auto", on_gpu=True)[0] == "bfloat16"
    assert hardware.pick_dtype("bfloat16", on_gpu=False) == ("bfloat16", "set in the config")
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert hardware.pick_dtype("auto", on_gpu=False)[0] == "bfloat16"


def test_auto_engine_falls_back_to_transformers_with_a_reason_when_vllm_is_hidden(monkeypatch):
    hardware.vllm_missing.cache_clear()
    monkeypatch.setitem(sys.modules, "vllm", None)  # what an install without vLLM looks like to import
    try:
        engine, why = hardware.pick_engine("auto")
        assert engine == "transformers" and "vLLM is not importable" in why
        assert hardware.pick_engine("vllm") == ("vllm", "set in the config")
    finally:
        hardware.vllm_missing.cache_clear()


def test_the_identity_names_what_auto_resolves_to(monkeypatch):
    """A cache filled by vLLM in float32 is not read as the transformers engine's or bf16's."""
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    auto = ServeConfig().identity()
    assert auto["serve.dtype"] == "float32" and auto["serve.engine"] in ("vllm", "transformers")
    assert ServeConfig(dtype="float32").identity() == auto
    assert ServeConfig(dtype="bfloat16").identity() != auto
    other = "transformers" if auto["serve.engine"] == "vllm" else "vllm"
    assert ServeConfig(engine=other).identity() != auto
