"""The student: a local base model wrapped with PEFT LoRA, and checks made before any worker starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from synthpert.config import TrainConfig
from synthpert.errors import SynthPertError


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def meta_model(model_dir: str | Path):
    """The model built from its config on the meta device: shapes and names, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


def targeted(name: str, target_modules: list[str]) -> bool:
    """Whether PEFT wraps the module `name` for these target_modules (a name or its last parts)."""
    return any(name == t or name.endswith("." + t) for t in target_modules)


def check_target_modules(model_dir: Path, target_modules: list[str]) -> None:
    """Every LoRA target must name linear layers of the model (checked on a weightless meta copy)."""
    import torch

    linear = [name for name, module in meta_model(model_dir).named_modules() if isinstance(module, torch.nn.Linear)]
    missing = [t for t in target_modules if not any(targeted(n, [t]) for n in linear)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise SynthPertError(
            f"LoRA target modules {missing} are not linear layers of the model at {model_dir} "
            f"(its linear layers are named {leaves}); fix train.target_modules"
        )


def load_lora_model(model_dir: str | Path, cfg: TrainConfig, dtype: Any):
    """Base model + a fresh LoRA adapter (PEFT initialises lora_B to zero, lora_A at random), in
    training mode: `from_pretrained` returns eval mode, where LoRA dropout and gradient
    checkpointing are silently off. `cfg.gradient_checkpointing` None counts as off (the stage
    resolves it before any worker starts)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    # SDPA explicitly: its fused kernels never hold the [heads, seq, seq] attention weights
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    # No KV cache in training: with one, transformers ignores the segment boundaries that packed
    # position ids describe, and packed examples would attend to each other.
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(cfg)).train()
