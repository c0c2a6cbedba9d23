"""Pre-flight memory plan: every CPU training worker's peak resident memory, estimated before any
worker starts and compared with what the Ray nodes have free. When the configured micro-batch
does not fit, gradient checkpointing goes on (if left to auto), then the micro-batch is halved
and gradient accumulation raised so the effective batch stays; when even micro-batch 1 with
checkpointing does not fit, the run is refused with one line. No run starts that the estimate
says Ray's memory monitor would kill.

The estimate (`estimate_peak`) adds, per worker:
  runtime      a Ray Train worker with torch, transformers, peft and DeepSpeed imported and the
               gloo process group up (measured, RUNTIME_BYTES)
  weights      the fp32 base weights (ZeRO-3: this rank's partition plus the largest module,
               gathered while it runs)
  lora         LoRA weights, gradients and AdamW's two moments (fp32: 16 bytes a parameter),
               plus DeepSpeed's reduce/all-gather buckets (sized to the LoRA weights, zero.py)
  activations  tokens x (hidden-sized and intermediate-sized tensors a decoder layer keeps for
               backward, counted for a Llama layer: 13 x hidden + 4 x intermediate, plus a copy
               of every LoRA input and its mask when lora_dropout > 0) x layers; with
               checkpointing each layer's input plus the one layer being recomputed; times
               ALLOCATOR_SLACK
  loss         one chunk of logits, its softmax and gradient (loss.py); the plain full-logits
               loss instead keeps LOGIT_COPIES fp32 [tokens, vocab] tensors
  mask         the block-causal attention mask, one byte per (row, query, key)
with tokens = micro-batch x the longest tokenized row.

Calibration (SmolLM2-135M, LoRA r=32 on all seven projections, 2 CPU workers, batch 4 x 1024
tokens, checkpointing on, `synthpert train` on this 2-core box): ZeRO-2 estimated 2458 MiB, peak
RSS 2306 / 2258 MiB; ZeRO-3 estimated 2310 MiB, peak 2259 / 2208 MiB. Without checkpointing
(bench/train.py --memory-sweep) 256 tokens: 4465 vs 3749 MiB (ZeRO-2), 4317 vs 4114 (ZeRO-3);
512 tokens: 7144 vs 5753 (ZeRO-2). The estimate errs 7-24 % high, never low.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from synthpert.config import TrainConfig
from synthpert.errors import SynthPertError
from synthpert.train.loss import chunk_positions
from synthpert.train.model import meta_model, targeted
from synthpert.train.zero import bucket_size

GB = 1e9
MIB = 2**20
RUNTIME_BYTES = int(0.9 * GB)  # a worker's resident memory before the model loads (measured)
ALLOCATOR_SLACK = 1.15  # measured peak RSS / counted activation bytes
LOGIT_COPIES = 4  # full-logits loss: logits, shifted copy, log-softmax, gradient
FP32 = 4
SAFETY = 0.9  # plan to use at most this share of a node's free memory
MONITOR_THRESHOLD_ENV = "RAY_memory_usage_threshold"  # Ray's memory monitor kills above this share of a node


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a base model + LoRA config, read from the model's config.json."""

    params: int  # base weights (tied ones once)
    largest_module: int  # the most weights one module owns: what ZeRO-3 gathers at once
    trainable: int  # LoRA weights for the configured targets and rank
    lora_inputs: int  # per decoder layer: summed input widths of the LoRA-wrapped linears
    layers: int
    hidden: int
    intermediate: int
    vocab: int


def model_shape(model_dir: str | Path, cfg: TrainConfig) -> ModelShape:
    """The model's shape on the meta device (no weights read) and its LoRA size for `cfg`."""
    import torch

    model = meta_model(model_dir)
    config = model.config
    wrapped = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and targeted(n, cfg.target_modules)]
    layers = config.num_hidden_layers
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        largest_module=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        trainable=sum(cfg.lora_r * (m.in_features + m.out_features) for m in wrapped),
        lora_inputs=sum(m.in_features for m in wrapped) // layers,
        layers=layers,
        hidden=config.hidden_size,
        intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
        vocab=config.vocab_size,
    )


def estimate_peak(shape: ModelShape, cfg: TrainConfig, world: int, micro_batch: int, longest: int,
                  checkpointing: bool, full_logits: bool = False) -> dict[str, int]:
    """Peak resident bytes of one CPU worker, by part (see the module docstring)."""
    tokens = micro_batch * longest
    dropout_copies = 1.25 * shape.lora_inputs if cfg.lora_dropout else 0  # the copy + a one-byte mask
    layer = tokens * (13 * shape.hidden + 4 * shape.intermediate + dropout_copies) * FP32
    kept = shape.layers * tokens * shape.hidden * FP32 + layer if checkpointing else shape.layers * layer
    logits = tokens if full_logits else min(tokens, chunk_positions(shape.vocab))
    weights = shape.params / world + shape.largest_module if cfg.zero_stage == 3 else shape.params
    parts = {
        "runtime": RUNTIME_BYTES,
        "weights": weights * FP32,
        "lora": (4 * shape.trainable + 2 * bucket_size(shape)) * FP32,
        "activations": kept * ALLOCATOR_SLACK,
        "loss": logits * shape.vocab * FP32 * (LOGIT_COPIES if full_logits else 3),
        "mask": micro_batch * longest**2,
    }
    return {k: int(v) for k, v in parts.items()}


def allocator_env(use_gpu: bool) -> dict[str, str]:
    """Environment for CPU training workers: the jemalloc Ray ships, never returning freed pages.

    glibc malloc hands the activations' varied, short-lived buffers out of a heap that fragments:
    at 4 x 1024 tokens with checkpointing a worker's RSS reached 3.8-4.6 GB and grew every step;
    a fixed mmap threshold held 1.8 GB but cost 40 % more CPU (a page fault for every fresh
    buffer). jemalloc without decay: 2.0 GB and glibc's speed (bench/train.py, this box).
    """
    import ray

    library = Path(ray.__file__).parent / "core" / "libjemalloc.so"
    if use_gpu or not library.is_file():
        return {}
    return {"LD_PRELOAD": str(library), "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}


def _local_headroom() -> float:
    """Bytes this machine can still take before Ray's memory monitor starts killing workers."""
    import psutil

    memory = psutil.virtual_memory()
    threshold = float(os.environ.get(MONITOR_THRESHOLD_ENV, 0.95))
    return memory.available - (1 - threshold) * memory.total


def worker_budget(cfg: TrainConfig) -> tuple[float, str]:
    """Bytes each worker may use on the tightest Ray node that can host one, and that node's figure.

    A node's free memory is `train.memory_budget_gb` when set, else Ray's "memory" resource for
    it, on this machine capped by the live headroom below the memory monitor's threshold (other
    processes count there too). Its workers are as many as its CPUs (GPUs) can host.
    """
    import ray

    local = ray.util.get_node_ip_address()
    budgets = []
    for node in ray.nodes():
        resources = node.get("Resources", {})
        hosted = math.floor(resources.get("CPU", 0) / cfg.cpus_per_worker) if cfg.cpus_per_worker else cfg.num_workers
        if cfg.use_gpu:
            hosted = min(hosted, int(resources.get("GPU", 0)))
        if not node.get("Alive") or hosted < 1:
            continue
        if cfg.memory_budget_gb is not None:
            free, source = cfg.memory_budget_gb * GB, "train.memory_budget_gb"
        else:
            free, source = resources.get("memory", 0.0), "Ray's memory resource"
            if node.get("NodeManagerAddress") == local and _local_headroom() < free:
                free, source = _local_headroom(), "free below Ray's memory-monitor threshold"
        workers = min(hosted, cfg.num_workers)
        budgets.append((SAFETY * max(free, 0.0) / workers, f"{free / GB:.1f} GB ({source}) for {workers} workers"))
    if not budgets:
        raise SynthPertError(f"no Ray node can host a training worker ({cfg.cpus_per_worker} CPUs{' + 1 GPU' if cfg.use_gpu else ''})")
    return min(budgets)


@dataclass(frozen=True)
class MemoryPlan:
    """The settings a run uses, its estimate and budget per worker (bytes), and what changed."""

    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    estimate: int | None
    budget: float | None
    note: str | None = None

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        return cfg.model_copy(update={"batch_size": self.batch_size, "grad_accum": self.grad_accum,
                                      "gradient_checkpointing": self.gradient_checkpointing})

    def summary(self) -> dict[str, Any]:
        """The plan for the run's summary and params; estimate and budget in MiB, as peak_memory_mb."""
        out = asdict(self)
        for key in ("estimate", "budget"):
            value = out.pop(key)
            out[f"{key}_mb"] = round(value / MIB) if value else None
        return out


def plan_memory(shape: ModelShape, cfg: TrainConfig, longest: int, budget: tuple[float, str] | None,
                full_logits: bool = False) -> MemoryPlan:
    """The first setting that fits, in order: as configured; checkpointing on (when auto); each
    smaller divisor of the micro-batch, accumulation raised to keep the effective batch. On GPU
    (budget None) activations live in device memory: only checkpointing's auto value is set."""
    auto = cfg.gradient_checkpointing is None
    if budget is None:
        return MemoryPlan(cfg.batch_size, cfg.grad_accum, True if auto else cfg.gradient_checkpointing, None, None)
    per_worker, where = budget
    micro_batches = [m for m in range(cfg.batch_size, 0, -1) if cfg.batch_size % m == 0]
    checkpointing = [False, True] if auto else [cfg.gradient_checkpointing]
    for micro in micro_batches:
        for ckpt in checkpointing:
            peak = sum(estimate_peak(shape, cfg, cfg.num_workers, micro, longest, ckpt, full_logits).values())
            if peak <= per_worker:
                plan = MemoryPlan(micro, cfg.grad_accum * cfg.batch_size // micro, ckpt, peak, per_worker)
                return plan if micro == cfg.batch_size else replace(plan, note=_note(cfg, plan, where))
        checkpointing = checkpointing[-1:]  # a smaller micro-batch is tried with checkpointing when allowed
    least = sum(estimate_peak(shape, cfg, cfg.num_workers, 1, longest, checkpointing[-1], full_logits).values())
    raise SynthPertError(
        f"training does not fit in memory: each of {cfg.num_workers} workers needs ~{least / GB:.1f} GB even at "
        f"micro-batch 1{' with gradient checkpointing' if checkpointing[-1] else ''} (longest row {longest} tokens), "
        f"but a node has {where}, {per_worker / GB:.1f} GB usable each: lower train.max_seq_len, --num-workers or "
        f"--lora-r{'' if checkpointing[-1] else ', set train.gradient_checkpointing=true'}, use --zero-stage 3, "
        f"or free memory (train.memory_budget_gb)"
    )


def _note(cfg: TrainConfig, plan: MemoryPlan, where: str) -> str:
    return (
        f"train: micro-batch {cfg.batch_size} -> {plan.batch_size}, grad_accum {cfg.grad_accum} -> {plan.grad_accum} "
        f"(effective batch kept){', gradient checkpointing on' if plan.gradient_checkpointing else ''}: "
        f"~{plan.estimate / GB:.1f} GB per worker estimated, a node has {where}"
    )
