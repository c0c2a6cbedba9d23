"""The per-worker training loop: DeepSpeed ZeRO over a PEFT LoRA model, fed by a Ray Data shard.

Runs inside Ray Train workers (`TorchTrainer` has already set up the process group: gloo on
CPU, NCCL on GPU; DeepSpeed reuses it). Every rank calls the same collectives in the same
order: equal data shards give every rank the same number of batches, and checkpoints follow a
fixed step schedule.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from synthpert.config import TrainConfig
from synthpert.train.collate import IGNORE, collate
from synthpert.train.loss import causal_lm_loss
from synthpert.train.memory import ModelShape
from synthpert.train.model import load_lora_model
from synthpert.train.zero import deepspeed_config

DS_TAG = "state"  # fixed DeepSpeed checkpoint tag: one state per Ray checkpoint directory
STATE_FILE = "train_state.json"
PROBE_FILE = "probe.pt"


def lr_schedule(optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warm-up, then linear or cosine decay to zero at total_steps."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = get_cosine_schedule_with_warmup if cfg.scheduler == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps), num_training_steps=total_steps)


def _skip_shm_comm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce (~90 s) whenever it sets up comms on CPU.

    Only its inference all-reduce uses that op; training collectives go through the torch
    process group, so marking it unavailable changes nothing but start-up time.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _collate_fn(pad_id: int):
    """`collate` as the callable class Ray Data expects (plain functions are deprecated there)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch):
            return collate(batch, pad_id)

    return Collate()


def _all_reduce(values: list[float], device, op: str = "SUM") -> list[float]:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.tolist()


def _worker_nodes(world: int) -> list[str]:
    """Every rank's Ray node id, by rank: on a cluster, where the workers of this attempt ran."""
    import ray
    import torch.distributed as dist

    nodes: list[str] = [""] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return nodes


def _peak_memory_mb(device) -> float:
    """This worker's peak accelerator memory (GPU) or peak resident set size (CPU), in MiB."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _lora_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def save_adapter(engine, directory: Path, rank: int, zero_stage: int) -> None:
    """Write a standard PEFT adapter dir on rank 0; under ZeRO-3 gather the LoRA weights first.

    Under ZeRO-3 each rank holds only a slice of every weight (the rest is an empty tensor), so
    saving outside `GatheredParameters` writes empty or zero lora_B matrices. The gather is a
    collective: every rank enters it.
    """
    import deepspeed

    gathered = (
        deepspeed.zero.GatheredParameters(_lora_parameters(engine.module), modifier_rank=None)
        if zero_stage == 3
        else contextlib.nullcontext()
    )
    with gathered:
        if rank == 0:
            engine.module.save_pretrained(directory)


def _probe_logits(engine, probe_ids: list[int], device):
    """Logits of the in-memory model on a fixed input (collective under ZeRO-3: all ranks run it)."""
    import torch

    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=torch.tensor([probe_ids], device=device)).logits.float().cpu()
    engine.train()
    return logits


def batch_loss(engine, batch: dict, full_logits: bool = False):
    """Mean loss over the batch's label tokens: chunked, never holding [batch, seq, vocab] logits
    (loss.py), or transformers' full-logits loss (`full_logits`: the bench's before/after only)."""
    if full_logits:
        return engine(**batch).loss
    return causal_lm_loss(engine, batch["input_ids"], batch["labels"], batch["position_ids"])


def validation_loss(engine, shard, batch_size: int, pad_id: int, device, full_logits: bool = False) -> float | None:
    """Mean loss over every label token of the held-out shards of all ranks (None when empty)."""
    import torch

    engine.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=_collate_fn(pad_id)):
            batch.pop("num_tokens")
            labelled = float((batch["labels"][:, 1:] != IGNORE).sum())
            total += float(batch_loss(engine, batch, full_logits)) * labelled
            count += labelled
    engine.train()
    total, count = _all_reduce([total, count], device)
    return total / count if count else None


class _Reporter:
    """Checkpoints (DeepSpeed state on every rank + adapter and history on rank 0) through Ray Train."""

    def __init__(self, engine, cfg: TrainConfig, rank: int, device, probe_ids: list[int]):
        self.engine, self.cfg, self.rank, self.device, self.probe_ids = engine, cfg, rank, device, probe_ids

    def checkpoint(self, state: dict, metrics: dict, final: bool = False) -> None:
        import ray.train
        import torch

        with tempfile.TemporaryDirectory(prefix="synthpert-ckpt-") as tmp:
            path = Path(tmp)
            self.engine.save_checkpoint(
                str(path / "deepspeed"), tag=DS_TAG, client_state={"synthpert": state}, exclude_frozen_parameters=True
            )
            save_adapter(self.engine, path / "adapter", self.rank, self.cfg.zero_stage)
            probe = _probe_logits(self.engine, self.probe_ids, self.device) if final else None
            if self.rank == 0:
                (path / STATE_FILE).write_text(json.dumps(state, indent=1))
                if probe is not None:
                    torch.save({"input_ids": self.probe_ids, "logits": probe}, path / PROBE_FILE)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"step_{state['step']:07d}",
            )


def build_engine(cfg: TrainConfig, plan: dict[str, Any], world: int, device):
    """The DeepSpeed engine around base model + LoRA, plus the ZeRO-3 hint object (or None).

    Under ZeRO-3, while `HfDeepSpeedConfig` lives, `from_pretrained` loads weights straight into
    partitions (`deepspeed.zero.Init`): an 8B model never sits whole in one worker's memory.
    """
    import deepspeed
    import torch

    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    _skip_shm_comm_build()
    deepspeed.init_distributed()  # wraps the process group Ray Train set up (gloo on CPU, NCCL on GPU)
    dtype = plan["dtype"]  # decided once by the driver (synthpert.hardware), logged with the run
    ds_config = deepspeed_config(cfg, world, on_gpu, ModelShape(**plan["shape"]), bf16=dtype == "bfloat16")
    zero3_hint = None
    if cfg.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        zero3_hint = HfDeepSpeedConfig(ds_config)
    model = load_lora_model(plan["base_model"], cfg, getattr(torch, dtype))
    params = _lora_parameters(model)
    optimizer = None
    if cfg.optimizer == "torch":
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=on_gpu)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=partial(lr_schedule, cfg=cfg, total_steps=plan["total_steps"]),
        config=ds_config,
    )
    return engine, zero3_hint


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker. `loop` carries the train config and the driver's plan (steps, paths)."""
    import ray.train
    import ray.train.torch

    from synthpert import tracking

    cfg = TrainConfig.model_validate(loop["train"])
    plan = loop["plan"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    engine, zero3_hint = build_engine(cfg, plan, world, device)  # noqa: F841 (the hint must outlive training)

    state: dict[str, Any] = {
        "step": 0, "tokens": 0, "train_time_s": 0.0, "cpu_time_s": 0.0, "history": [], "validation": [], "resumed_from": []
    }
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # --resume, or a restart after a worker failure
        with checkpoint.as_directory() as directory:
            _, client = engine.load_checkpoint(f"{directory}/deepspeed", tag=DS_TAG, load_module_strict=False)
        state = client["synthpert"]
        state["resumed_from"].append(state["step"])

    logger = tracking.RunLogger(**plan["mlflow"]) if rank == 0 and plan.get("mlflow") else None
    reporter = _Reporter(engine, cfg, rank, device, plan["probe_ids"])
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation") if plan["validation_rows"] else None
    steps_per_epoch, total_steps = plan["steps_per_epoch"], plan["total_steps"]
    pad_id, full_logits = plan["pad_id"], plan["full_logits"]

    def metrics(extra: dict) -> dict:
        last = state["history"][-1] if state["history"] else {}
        return {
            "step": state["step"],
            "loss": last.get("loss"),
            "tokens": state["tokens"],
            "tokens_per_s": state["tokens"] / state["train_time_s"] if state["train_time_s"] else 0.0,
            **extra,
        }

    while state["step"] < total_steps:
        epoch, done = divmod(state["step"], steps_per_epoch)
        skip, stop = done * cfg.grad_accum, steps_per_epoch * cfg.grad_accum
        loss_sum, tokens, started, cpu_started = 0.0, 0, time.perf_counter(), time.process_time()
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            collate_fn=_collate_fn(pad_id),
            local_shuffle_buffer_size=4 * cfg.batch_size,
            local_shuffle_seed=cfg.seed + epoch,
        )
        # Every rank drains its whole shard each epoch (Ray Data starts the next epoch for all
        # splits together); batches before a resume point or past the last step are skipped.
        for index, batch in enumerate(batches):
            if index < skip or index >= stop or state["step"] >= total_steps:
                continue
            tokens += int(batch.pop("num_tokens"))
            loss = batch_loss(engine, batch, full_logits)
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
            if (index + 1) % cfg.grad_accum:
                continue
            loss_sum, tokens, elapsed, cpu = _all_reduce(
                [loss_sum, tokens, time.perf_counter() - started, time.process_time() - cpu_started], device
            )
            elapsed /= world  # the ranks' mean wall time for this step
            state["step"] += 1
            state["tokens"] += int(tokens)
            state["train_time_s"] += elapsed
            state["cpu_time_s"] += cpu  # summed over ranks: tokens per CPU-second is immune to a busy machine
            entry = {
                "step": state["step"],
                "epoch": state["step"] / steps_per_epoch,
                "loss": loss_sum / (world * cfg.grad_accum),
                "lr": engine.get_lr()[0],
                "tokens_per_s": tokens / elapsed if elapsed else 0.0,
            }
            state["history"].append(entry)
            if logger and state["step"] % cfg.log_every_steps == 0:
                logger.metrics({k: v for k, v in entry.items() if k != "step"}, step=state["step"])
            due = cfg.checkpoint_every_steps and state["step"] % cfg.checkpoint_every_steps == 0
            if due and state["step"] < total_steps:
                reporter.checkpoint(state, metrics({}))
            loss_sum, tokens, started, cpu_started = 0.0, 0, time.perf_counter(), time.process_time()
        epoch_done = state["step"] == (epoch + 1) * steps_per_epoch
        if epoch_done or state["step"] >= total_steps:
            val = validation_loss(engine, val_shard, cfg.batch_size, pad_id, device, full_logits) if val_shard else None
            if val is not None:
                state["validation"].append({"step": state["step"], "epoch": state["step"] / steps_per_epoch, "val_loss": val})
                if logger:
                    logger.metrics({"val_loss": val}, step=state["step"])
            final = state["step"] >= total_steps
            if final:
                peaks = [0.0] * world
                peaks[rank] = _peak_memory_mb(device)
                state["peak_memory_mb_per_worker"] = _all_reduce(peaks, device)  # every rank's, by rank
                state["peak_memory_mb"] = max(state["peak_memory_mb_per_worker"])
                state["worker_nodes"] = _worker_nodes(world)
            if final or not cfg.checkpoint_every_steps:
                reporter.checkpoint(state, metrics({"val_loss": val}), final=final)
