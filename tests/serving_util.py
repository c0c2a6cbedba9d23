"""Helpers for the serving tests: real PEFT LoRA adapters built on the embedded model, and a
judge-like JSON schema for structured outputs."""

from __future__ import annotations

from pathlib import Path

# {critique, grade}: what a judge returns; the critique bounded so a small model always closes it
GRADE_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["critique", "grade"],
                "properties": {"critique": {"type": "string", "maxLength": 120},
                               "grade": {"type": "string", "enum": ["excellent", "good", "average", "bad", "terrible"]}}}
JUDGE = [{"role": "user", "content": "Grade this reasoning: 'the gene is up because it is up'. Critique it, then grade it."}]


def make_lora_adapters(base_dir: Path, out_dirs: list[Path], rank: int = 8, scale: float = 0.2) -> list[Path]:
    """Save one real PEFT LoRA adapter per folder: random lora_B (not PEFT's zeros), so each
    adapter really changes the model, and each differently (seeded by its position)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for seed, out in enumerate(out_dirs):
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, scale)
        model.save_pretrained(out)
        base = model.unload()
    return out_dirs
