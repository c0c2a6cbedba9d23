"""Throughput of Ray Train + DeepSpeed ZeRO LoRA against a plain single-process PEFT loop.

Same model, data, LoRA config, batch size, optimizer, schedule and step count. Each Ray worker
gets `--cpus-per-worker` CPUs (torch threads); the plain loop gets the same number of threads,
so `ratio_per_worker` = (Ray tokens/s / workers) / plain tokens/s compares one worker with one
equally-resourced plain process (goal >= 0.8). `ratio_per_cpu_s` compares tokens per CPU-second
(all Ray workers' CPU time against the plain process's): the honest figure on a shared, busy
machine, where wall-clock rates depend on what else runs. The plain loop uses the gradient
checkpointing the Ray run's memory plan chose. The last stdout line is one JSON object.

`--memory-sweep 256 512 1024 2048` adds peak RSS per worker for rows of those lengths (batch 4,
ZeRO-2 and ZeRO-3), "before" (transformers' full-logits loss) and "after" (the chunked loss),
next to the pre-flight estimate; "before" uses the checkpointing "after" chose.

    python bench/train.py --steps 20 --num-workers 2 --zero-stage 2
    python bench/train.py --steps 4 --max-seq-len 1024 --memory-sweep 256 512 1024 2048
    python bench/train.py --gpu --zero-stage 3 --num-workers 8 --base-model /models/llama-8b
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402

from synthpert.artifacts import write_table  # noqa: E402
from synthpert.config import LABELS, load_config  # noqa: E402

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SCHEMA = pa.schema([("cell_line", pa.string()), ("pert", pa.string()), ("gene", pa.string()), ("label", pa.string()), ("messages", MESSAGES)])


def make_traces(directory: Path, rows: int, sentences: int = 6) -> Path:
    """Synthetic traces shaped like the real ones: student prompt + reasoning + answer; each
    reasoning sentence is ~14 tokens (long rows: many sentences, truncated at max_seq_len)."""
    records = []
    for i in range(rows):
        label = LABELS[i % 3]
        reasoning = " ".join(f"Gene P{i} acts on pathway {j} which regulates G{i}." for j in range(sentences))
        records.append({
            "cell_line": "k562", "pert": f"P{i}", "gene": f"G{i}", "label": label,
            "messages": [
                {"role": "system", "content": "You are an expert in CRISPRi perturbation biology."},
                {"role": "user", "content": f"In K562 cells, P{i} is knocked down. Is G{i} up, down or unchanged?"},
                {"role": "assistant", "content": f"<think>{reasoning}</think><answer>{label}</answer>"},
            ],
        })
    write_table(directory, "sft", pd.DataFrame(records), SCHEMA)
    return directory


def device_name(gpu: bool) -> str:
    if gpu:
        import torch

        return torch.cuda.get_device_name(0)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"cpu: {model}"


def plain_loop(cfg, data: Path, steps: int, threads: int, gpu: bool) -> dict:
    """The baseline: one process, PEFT model, torch AdamW, same batches and schedule, no Ray, no DeepSpeed."""
    import torch
    from transformers import AutoTokenizer

    from synthpert.models import resolve_model
    from synthpert.train.collate import collate, pad_token_id, tokenize_frame
    from synthpert.train.model import load_lora_model
    from synthpert.train.trainer import lr_schedule

    tc = cfg.train
    torch.set_num_threads(threads)
    torch.manual_seed(tc.seed)
    device = torch.device("cuda" if gpu else "cpu")
    model_dir = resolve_model(tc.base_model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = tokenize_frame(pd.read_parquet(data / "sft.parquet"), tokenizer, tc.mode, tc.max_seq_len, tc.loss_on, tc.packing)
    model = load_lora_model(model_dir, tc, torch.bfloat16 if gpu else torch.float32).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay, fused=gpu)
    scheduler = lr_schedule(optimizer, tc, steps)
    tokens, elapsed, cpu, step = 0, 0.0, 0.0, 0
    while step < steps:
        for start in range(0, len(rows) - tc.batch_size + 1, tc.batch_size):
            if step == steps:
                break
            began, cpu_began = time.perf_counter(), time.process_time()
            batch = collate(rows.iloc[start : start + tc.batch_size].to_dict("list"), pad_token_id(tokenizer))
            tokens += int(batch.pop("num_tokens"))
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            float(loss.detach())  # wait for the device, as the Ray loop does when it logs the loss
            elapsed += time.perf_counter() - began
            cpu += time.process_time() - cpu_began
            step += 1
    peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "tokens_per_s": tokens / elapsed, "tokens_per_cpu_s": tokens / cpu, "tokens": tokens,
        "train_time_s": elapsed, "peak_memory_mb": peak, "threads": threads,
    }


def bench_config(args, *overrides: str):
    """The config the command line asks for, plus `overrides` (tracking off, no validation split)."""
    base = [
        f"train.num_workers={args.num_workers}", f"train.cpus_per_worker={args.cpus_per_worker}",
        f"train.zero_stage={args.zero_stage}", f"train.batch_size={args.batch_size}",
        f"train.max_seq_len={args.max_seq_len}", f"train.lora_r={args.lora_r}", f"train.max_steps={args.steps}",
        f"train.use_gpu={str(args.gpu).lower()}", "data.validation_fraction=0", "tracking.enabled=false",
        *([f"train.base_model={args.base_model}"] if args.base_model else []),
    ]
    return load_config(None, [*base, *overrides])


def sentences(max_seq_len: int) -> int:
    """Reasoning sentences that fill a row to max_seq_len (truncation cuts the rest)."""
    return max(6, max_seq_len // 10)


def same_checkpointing(run: dict) -> str:
    """The override that repeats the gradient checkpointing a run's memory plan chose."""
    return f"train.gradient_checkpointing={str(run['memory']['gradient_checkpointing']).lower()}"


def memory_sweep(args) -> list[dict]:
    """Peak RSS per worker by row length x ZeRO stage, chunked loss ("after") then transformers'
    full-logits loss ("before", same gradient checkpointing); a run the plan refuses says why."""
    from synthpert.errors import SynthPertError
    from synthpert.train import train

    results = []
    for tokens in args.memory_sweep:
        for stage in (2, 3):
            checkpointing: list[str] = []
            for loss in ("after", "before"):
                cfg = bench_config(args, f"train.max_seq_len={tokens}", f"train.zero_stage={stage}",
                                   f"train.max_steps={args.sweep_steps}", "train.warmup_ratio=0", *checkpointing)
                entry: dict = {"tokens": tokens, "zero_stage": stage, "loss": loss}
                with tempfile.TemporaryDirectory(prefix="bench-train-sweep-") as tmp:
                    data = make_traces(Path(tmp) / "traces", args.num_workers * args.batch_size * args.sweep_steps, sentences(tokens))
                    try:
                        run = train(cfg, data, Path(tmp) / "run", _full_logits=loss == "before")
                    except SynthPertError as exc:  # the memory plan's refusal: a result, not a failure
                        if not str(exc).startswith("training does not fit"):
                            raise
                        entry["refused"] = str(exc)
                        run = None
                if run:
                    memory = run["memory"]
                    checkpointing = [same_checkpointing(run)]
                    entry.update(
                        peak_rss_mb_per_worker=[round(m) for m in run["peak_memory_mb_per_worker"]],
                        estimate_mb=memory["estimate_mb"], micro_batch=memory["batch_size"],
                        grad_accum=memory["grad_accum"], gradient_checkpointing=memory["gradient_checkpointing"],
                        tokens_per_cpu_s=run["tokens_per_cpu_s"],
                    )
                results.append(entry)
                print(json.dumps(entry), file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=2, choices=(2, 3))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=160)
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--memory-sweep", type=int, nargs="*", default=[], metavar="TOKENS",
                        help="also measure peak RSS per worker for rows of these lengths (e.g. 256 512 1024 2048)")
    parser.add_argument("--sweep-steps", type=int, default=1, help="optimizer steps per sweep point (the peak is reached in the first)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    args = parser.parse_args()

    from synthpert.train import train

    cfg = bench_config(args)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = make_traces(Path(tmp) / "traces", args.rows, sentences(args.max_seq_len))
        began = time.perf_counter()
        ray_run = train(cfg, data, Path(tmp) / "run")
        ray_wall = time.perf_counter() - began
        plain = plain_loop(bench_config(args, same_checkpointing(ray_run)), data, args.steps, args.cpus_per_worker, args.gpu)
    per_worker = ray_run["tokens_per_s"] / args.num_workers
    result = {
        "bench": "train",
        "device": device_name(args.gpu),
        "model": cfg.train.base_model or "embedded SmolLM2-135M-Instruct",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_seq_len": args.max_seq_len,
        "lora_r": args.lora_r,
        "ray": {
            "zero_stage": args.zero_stage,
            "num_workers": args.num_workers,
            "cpus_per_worker": args.cpus_per_worker,
            "tokens_per_s": ray_run["tokens_per_s"],
            "tokens_per_s_per_worker": per_worker,
            "tokens_per_cpu_s": ray_run["tokens_per_cpu_s"],
            "peak_memory_mb": ray_run["peak_memory_mb"],
            "peak_memory_mb_per_worker": ray_run["peak_memory_mb_per_worker"],
            "memory_plan": ray_run["memory"],
            "train_time_s": ray_run["train_time_s"],
            "wall_s_with_startup": ray_wall,
            "final_loss": ray_run["final_loss"],
        },
        "plain": plain,
        "ratio_per_worker": per_worker / plain["tokens_per_s"],
        # the same ratio from CPU time instead of wall time: not skewed by other load on the machine
        "ratio_per_cpu_s": ray_run["tokens_per_cpu_s"] / plain["tokens_per_cpu_s"],
        "goal_ratio_per_worker": 0.8,
    }
    if args.memory_sweep:
        result["memory_sweep"] = memory_sweep(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)  # the last stdout line (Ray workers print to stdout too)
    print(f"Ray Train + ZeRO-{args.zero_stage}: {per_worker:.0f} tokens/s per worker vs plain PEFT "
          f"{plain['tokens_per_s']:.0f} tokens/s: ratio {result['ratio_per_worker']:.2f} (goal >= 0.8)", file=sys.stderr)


if __name__ == "__main__":
    main()
