"""The train stage: check inputs, tokenise the traces, run `TorchTrainer` on Ray Datasets, export
the adapter, log to MLflow and register it.

Everything that can be wrong with the input (no file, missing columns, no rows, bad messages, a
base model path that is not a model, LoRA targets the model lacks, too few rows for the workers,
too little memory for even micro-batch 1: memory.py) raises SynthPertError before any training
worker starts; workers that fail anyway end the run with one line (`training_failed`).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import traceback
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from synthpert import console, tracking
from synthpert.artifacts import read_manifest, write_manifest
from synthpert.chat import OWN, TEMPLATE
from synthpert.cluster import ray_session
from synthpert.config import LABELS, Config, TrainConfig
from synthpert.data.perturbqa import is_validation
from synthpert.errors import SynthPertError
from synthpert.hardware import pick_dtype
from synthpert.models import resolve_model
from synthpert.serving.adapters import log_adapter_model
from synthpert.train.collate import check_messages, pad_token_id, tokenize_frame
from synthpert.train.memory import GB, MemoryPlan, allocator_env, model_shape, plan_memory, worker_budget
from synthpert.train.model import check_target_modules
from synthpert.train.trainer import PROBE_FILE, STATE_FILE, train_loop_per_worker
from synthpert.train.zero import deepspeed_config

SFT_FILE = "sft.parquet"
# raw training needs the messages too: its user turns are the cot student's, context included
REQUIRED = dict.fromkeys(("cot", "raw"), ("cell_line", "pert", "gene", "label", "messages"))
RUN_NAME = "train"  # Ray Train run name under OUTPUT/ray: the same name is what --resume finds
PROBE_TEXT = "Knocking down a gene with CRISPRi can change the expression of other genes."


def check_traces(data_dir: str | Path, mode: str) -> Path:
    """The traces' sft.parquet, checked: the columns `mode` needs, rows, well-formed chats/labels."""
    import pyarrow.parquet as pq

    path = Path(data_dir) / SFT_FILE
    if not path.is_file():
        raise SynthPertError(f"traces file not found: {path} (train --data takes the generate/judge output dir)")
    names = pq.read_schema(path).names
    missing = [c for c in REQUIRED[mode] if c not in names]
    if missing:
        raise SynthPertError(f"{path} lacks columns {missing} needed for --mode {mode} (it has {names})")
    table = pq.read_table(path, columns=list(REQUIRED[mode]))
    if table.num_rows == 0:
        raise SynthPertError(f"{path} has no rows: nothing to train on")
    for i, messages in enumerate(table.column("messages").to_pylist()):
        check_messages(messages, f"{path} row {i}")
    if mode == "raw":
        for i, label in enumerate(table.column("label").to_pylist()):
            if label not in LABELS:
                raise SynthPertError(f"{path} row {i}: label {label!r} is not one of {list(LABELS)}")
    return path


def held_out(frame: pd.DataFrame, fraction: float, seed: int) -> pd.Series:
    """Validation rows: the traces' own split where they carry one, else the data split's seeded
    perturbation hash (the same perturbations `data.validation_fraction` holds out)."""
    if "split" in frame.columns:
        return frame["split"] == "validation"
    return pd.Series([is_validation(c, p, fraction, seed) for c, p in zip(frame["cell_line"], frame["pert"])], index=frame.index)


@lru_cache(maxsize=2)
def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def build_datasets(sft: Path, model_dir: Path, tc: TrainConfig, validation: tuple[float, int] = (0.0, 0)) -> tuple[Any, Any, dict[str, int]]:
    """Ray Datasets for the workers (train shuffled once; validation) and their row/example counts.
    `validation`: (data.validation_fraction, data.seed), for traces without a split column.

    Tokenised here, in the driver, which already holds the tokenizer: a Ray Data map over the
    traces (thousands of rows at most, a second or two of tokenising) paid a cold worker's
    transformers import, ~20 s of every training stage on a 2-core box."""
    import numpy as np
    import pyarrow.parquet as pq
    import ray.data

    context = ray.data.DataContext.get_current()  # travels with the datasets into the workers
    context.enable_progress_bars = False  # a few small datasets: bars only bury the training log
    context.print_on_execution_start = False
    columns = [*REQUIRED[tc.mode], *(["split"] if "split" in pq.read_schema(sft).names else [])]
    source = pd.read_parquet(sft, columns=columns)
    held = held_out(source, *validation).to_numpy(dtype=bool)
    tokenizer = _tokenizer(str(model_dir))
    rows = {split: tokenize_frame(part, tokenizer, tc.mode, tc.max_seq_len, tc.loss_on, tc.packing)
            for split, part in (("train", source[~held]), ("validation", source[held]))}
    shuffled = rows["train"].sample(frac=1, random_state=tc.seed).reset_index(drop=True)
    # a block per worker: each rank's shard streams from its own block
    train, val = (ray.data.from_pandas([frame.iloc[i] for i in np.array_split(np.arange(len(frame)), max(1, min(tc.num_workers, len(frame))))])
                  for frame in (shuffled, rows["validation"]))
    counts = {f"{split}_{kind}": int(len(frame) if kind == "rows" else frame["examples"].sum())
              for split, frame in rows.items() for kind in ("rows", "examples")}
    both = pd.concat(rows.values())
    counts |= {"own_rendered_examples": int(both["own_rendered"].sum()), "source_rows": len(source),
               "longest_row": int(both["length"].max()) if len(both) else 0}  # tokens: what the memory plan sizes for
    if counts["train_rows"] == 0:
        raise SynthPertError(
            f"no training example left from {sft}: every row was held out or lost all assistant tokens "
            f"to truncation (max_seq_len={tc.max_seq_len}, data.validation_fraction={validation[0]})"
        )
    return train, val, counts


def chat_rendering(counts: dict[str, int]) -> str:
    """How the training chats were rendered (synthpert.chat): by the base model's chat template,
    or as written where the template drops or rewrites the assistant's turn (R1, Qwen3)."""
    own, total = counts["own_rendered_examples"], counts["train_examples"] + counts["validation_examples"]
    return TEMPLATE if own == 0 else OWN if own == total else f"{OWN} for {own} of {total} examples"


def make_plan(tc: TrainConfig, counts: dict[str, int]) -> dict[str, Any]:
    """Steps per epoch and in total: every worker gets floor(rows / workers) rows (equal shards)."""
    rows_per_worker = counts["train_rows"] // tc.num_workers
    steps_per_epoch = math.ceil(rows_per_worker / tc.batch_size) // tc.grad_accum
    if steps_per_epoch == 0:
        raise SynthPertError(
            f"{counts['train_rows']} training rows cannot fill one step of {tc.num_workers} workers x "
            f"batch_size {tc.batch_size} x grad_accum {tc.grad_accum}: use fewer workers or more data"
        )
    total = tc.max_steps if tc.max_steps is not None else max(1, math.ceil(tc.epochs * steps_per_epoch))
    return {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "validation_rows": counts["validation_rows"] // tc.num_workers,
    }


def _has_run(storage: str) -> bool:
    """Whether Ray Train storage (a local path or a URI) already holds this stage's run."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage else Path(storage).resolve().as_uri())
    return fs.get_file_info(f"{root}/{RUN_NAME}/checkpoint_manager_snapshot.json").type != pyarrow.fs.FileType.NotFound


def _export(checkpoint, output: Path) -> dict[str, Any]:
    """Copy the final checkpoint's adapter, probe logits and training state into OUTPUT."""
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        adapter = output / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        shutil.copytree(directory / "adapter", adapter)
        for name in (PROBE_FILE, STATE_FILE):
            if (directory / name).is_file():
                shutil.copy2(directory / name, output / name)
    return json.loads((output / STATE_FILE).read_text())


def check_lora_b(adapter: Path) -> int:
    """Fail loudly on the classic ZeRO-3 + LoRA bug: an adapter saved with empty or all-zero lora_B."""
    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    broken = [k for k, v in lora_b.items() if v.numel() == 0] or (
        list(lora_b) if lora_b and all(not v.any() for v in lora_b.values()) else []
    )
    if not lora_b or broken:
        raise SynthPertError(f"saved adapter {adapter} has empty or all-zero lora_B weights ({broken[:3] or 'none found'})")
    return sum(int(v.count_nonzero()) for v in lora_b.values())


def _oom(cause: Exception) -> bool:
    """Whether Ray's memory monitor killed the worker (its report names the exit type)."""
    import ray.exceptions

    return isinstance(cause, ray.exceptions.OutOfMemoryError) or "OUT_OF_MEMORY" in str(cause)


def _worker_failure(failures: dict[int | None, Exception]) -> tuple[int | None, Exception]:
    """The failed worker that explains a failed run: one killed by the memory monitor, else one
    that died, else the lowest rank (the others usually fail only because a peer vanished). A
    dead worker reaches Ray Train as a failed health check wrapping the ActorDiedError."""
    import ray.exceptions

    failures = {rank: getattr(cause, "health_check_failure", cause) for rank, cause in failures.items()}

    def order(item):
        rank, cause = item
        return (not _oom(cause), not isinstance(cause, ray.exceptions.ActorDiedError), rank or 0)

    return min(failures.items(), key=order)


def training_failed(error: Exception, output: Path, storage: str, memory: MemoryPlan) -> SynthPertError:
    """One line for a run whose workers failed: which worker, why, the memory it held (from Ray's
    memory-monitor report), what to lower, whether --resume can continue, where the full log is."""
    log = output / "train_error.log"
    output.mkdir(parents=True, exist_ok=True)
    failures = getattr(error, "worker_failures", None) or {}
    log.write_text("".join([*traceback.format_exception(error), *(
        f"\n--- worker {rank}:\n{''.join(traceback.format_exception(cause))}" for rank, cause in sorted(failures.items())
    )]))
    rank, cause = _worker_failure(failures or {None: error})
    text = str(cause).strip()
    pid, ip = re.search(r"\bpid[:=] ?(\d+)", text), re.search(r"\bip: (\S+)", text)
    who = f"training worker {rank}" + (f" (pid {pid[1]}{f' on {ip[1]}' if ip else ''})" if pid else "")
    if _oom(cause):
        held = re.search(r"actual memory used=([\d.]+) ?GB", text)
        why = (
            f"was killed by Ray's memory monitor (node out of memory; it held {held[1] + ' GB' if held else 'an unknown amount'}"
            f"{f', estimated {memory.estimate / GB:.1f} GB' if memory.estimate else ''}): lower train.batch_size or "
            "train.max_seq_len, set train.gradient_checkpointing=true or train.memory_budget_gb, or use fewer --num-workers"
        )
    else:
        exit_type = re.search(r"Worker exit type: (\w+)", text)
        detail = f"worker exit type {exit_type[1]}" if exit_type else (text.splitlines()[0] if text else "no message")
        why = f"failed ({type(cause).__name__}: {detail})"
    resume = "checkpoints kept, continue with --resume" if _has_run(storage) else "no checkpoint was written"
    return SynthPertError(f"{who} {why}; {resume}; full log: {log}")


def train(cfg: Config, data_dir: str | Path, output_dir: str | Path | None = None, resume: bool = False,
          *, _full_logits: bool = False) -> dict[str, Any]:
    """Fine-tune a LoRA adapter on the traces in `data_dir`; returns the summary (also in OUTPUT/manifest.json).
    `_full_logits`: transformers' full-logits loss instead of the chunked one (bench/train.py's before/after only)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    output = Path(output_dir or tc.output_dir).resolve()
    sft = check_traces(data_dir, tc.mode)
    model_dir = resolve_model(tc.base_model)
    check_target_modules(model_dir, tc.target_modules)
    shape = model_shape(model_dir, tc)
    storage = tc.storage_path or str(output / "ray")
    if _has_run(storage) and not resume:
        raise SynthPertError(f"{output} already holds a training run: pass --resume to continue it, or choose another --output")
    traces_manifest = read_manifest(data_dir) or {}
    traces_run_id = traces_manifest.get("mlflow_run_id")
    probe_ids = _tokenizer(str(model_dir))(PROBE_TEXT)["input_ids"]
    pad_id = pad_token_id(_tokenizer(str(model_dir)))
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}

    with ray_session(tc.num_workers * tc.cpus_per_worker):
        train_ds, val_ds, counts = build_datasets(sft, model_dir, tc, (cfg.data.validation_fraction, cfg.data.seed))
        budget = None if tc.use_gpu else worker_budget(tc)
        memory = plan_memory(shape, tc, counts["longest_row"], budget, full_logits=_full_logits)
        if memory.note:
            console.note(memory.note)
        rendering = chat_rendering(counts)
        if rendering != TEMPLATE:
            console.note(f"train: {rendering} of the chats: the chat template of {model_dir} drops or rewrites the "
                         "assistant's turn, so the traces are trained on as written (synthpert.chat)")
        tc = memory.apply(tc)
        steps = make_plan(tc, counts)
        dtype = pick_dtype(tc.dtype, tc.use_gpu)[0]
        plan = {**steps, "base_model": str(model_dir), "probe_ids": probe_ids, "pad_id": pad_id,
                "shape": asdict(shape), "full_logits": _full_logits, "dtype": dtype}
        tags = {"synthpert.traces_run_id": traces_run_id} if traces_run_id else {}
        params = {"plan": {**counts, **steps, "dtype": dtype, "memory": memory.summary()}, "chat_rendering": rendering}
        with tracking.stage_run(cfg, "train", sections=("train",), params=params, tags=tags) as run_id:
            if run_id:
                plan["mlflow"] = {"tracking_uri": tracking.portable_uri(cfg.tracking.tracking_uri), "run_id": run_id}
                tracking.log_dict(deepspeed_config(tc, tc.num_workers, tc.use_gpu, shape, dtype == "bfloat16"), "deepspeed_config.json")
            datasets = {"train": train_ds, **({"validation": val_ds} if plan["validation_rows"] else {})}
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"train": tc.model_dump(mode="json"), "plan": plan},
                scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources,
                                             placement_strategy=tc.placement_strategy),
                run_config=RunConfig(
                    name=RUN_NAME,
                    storage_path=storage,
                    checkpoint_config=CheckpointConfig(num_to_keep=tc.checkpoints_to_keep),
                    failure_config=FailureConfig(max_failures=tc.max_failures),
                    worker_runtime_env={"env_vars": allocator_env(tc.use_gpu)},
                ),
                datasets=datasets,
            )
            try:
                result = trainer.fit()
            except TrainingFailedError as error:
                raise training_failed(error, output, storage, memory) from None
            state = _export(result.checkpoint, output)
            adapter = output / "adapter"
            lora_b_nonzero = check_lora_b(adapter)
            history, validation = state["history"], state["validation"]
            summary = {
                "final_loss": history[-1]["loss"],
                "first_loss": history[0]["loss"],
                "val_loss": validation[-1]["val_loss"] if validation else None,
                "steps": state["step"],
                "tokens": state["tokens"],
                "tokens_per_s": state["tokens"] / state["train_time_s"] if state["train_time_s"] else 0.0,
                "train_time_s": state["train_time_s"],
                "tokens_per_cpu_s": state["tokens"] / state["cpu_time_s"] if state["cpu_time_s"] else 0.0,
                "peak_memory_mb": state.get("peak_memory_mb"),
                "peak_memory_mb_per_worker": state.get("peak_memory_mb_per_worker"),
                "worker_nodes": state.get("worker_nodes"),
                "memory": memory.summary(),
                "chat_rendering": rendering,
                "adapter_path": str(adapter),
                "lora_b_nonzero": lora_b_nonzero,
                "mlflow_run_id": run_id,
                "traces_run_id": traces_run_id,
                **counts,
            }
            tracking.log_metrics({k: summary[k] for k in ("final_loss", "val_loss", "tokens_per_s", "train_time_s")})
            if run_id:
                registered = log_adapter_model(
                    adapter,
                    base_model=str(model_dir) if tc.base_model else "embedded",  # "embedded" resolves anywhere
                    registered_model_name=tracking.registered_name(cfg),
                    alias=tc.mode if tracking.registered_name(cfg) else None,
                    tags={"synthpert.train_run_id": run_id, "synthpert.mode": tc.mode, "synthpert.split": cfg.data.split, **tags},
                )
                summary["model_uri"] = registered.get("uri", registered["model_uri"])
                summary["model_version"] = registered.get("version")
    write_manifest(output, "train", {"adapter": {"dir": "adapter"}}, config=cfg.model_dump(mode="json"), summary=summary)
    return summary
