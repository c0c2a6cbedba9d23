"""The DeepSpeed config, generated from TrainConfig so CPU CI and a GPU cluster differ only in config.

bf16 or fp32 as synthpert.hardware picks (fp32 on CPUs without native bf16); ZeRO stage 2 or 3 with
optional optimizer / parameter offload to CPU; accumulation and clipping handled by DeepSpeed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from synthpert.config import TrainConfig

if TYPE_CHECKING:
    from synthpert.train.memory import ModelShape

DEFAULT_BUCKET = 50_000_000  # DeepSpeed's default bucket, in elements


def bucket_size(shape: ModelShape) -> int:
    """Gradient reduce / all-gather bucket in elements: only LoRA weights are reduced and gathered,
    so a bucket larger than they are is memory (DeepSpeed allocates it whole) for nothing."""
    return min(DEFAULT_BUCKET, shape.trainable)


def deepspeed_config(cfg: TrainConfig, world_size: int, on_gpu: bool, shape: ModelShape, bf16: bool) -> dict[str, Any]:
    """A complete DeepSpeed config dict (no "auto" values: we own every number)."""
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "overlap_comm": on_gpu,  # overlapping needs a side stream; none on CPU
        "contiguous_gradients": True,
        "reduce_bucket_size": bucket_size(shape),
        "allgather_bucket_size": bucket_size(shape),
    }
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.zero_stage == 3:
        # Gather the full 16-bit weights on save only through our own GatheredParameters call.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        # Keep at most about one module's weights gathered beyond the one running (the default,
        # 1e9 parameters, keeps a small model whole on every rank); prefetch it only on GPU.
        zero["stage3_max_live_parameters"] = zero["stage3_max_reuse_distance"] = shape.largest_module
        zero["stage3_prefetch_bucket_size"] = min(DEFAULT_BUCKET, shape.largest_module) if on_gpu else 0
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # A plain torch AdamW (cfg.optimizer == "torch") needs no JIT-compiled op; DeepSpeed
        # calls any client optimizer "untested" and, with offload, asks for its own CPU Adam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": cfg.optimizer == "deepspeed",
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.optimizer == "deepspeed":  # FusedAdam on GPU, DeepSpeedCPUAdam when offloading (JIT-built)
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8},
        }
    return config
