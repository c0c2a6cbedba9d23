"""The causal-LM loss without [batch, seq, vocab] logits: lm_head + cross-entropy on chunks of
the labelled positions only.

transformers' loss computes fp32 logits for every position (SmolLM2, 4 x 1024 tokens: 0.8 GB)
and keeps them, their log-softmax and their gradient alive through backward: memory that grows
with the vocabulary. Here the model runs with `logits_to_keep=1` (the head sees one position), a
forward hook takes the decoder's hidden states, and the head + cross-entropy run on chunks of
labelled positions, each under checkpointing, so backward recomputes one chunk's logits at a
time. The head is called as a module: under ZeRO-3 its hooks gather the (tied, partitioned)
weight. Same value as transformers' ForCausalLMLoss: the mean over label tokens.

Under ZeRO-3 each call of the head gathers its partitioned weight, a collective every rank must
join: a rank with fewer labelled positions than another would run fewer chunks and leave the other
waiting (gloo aborts, NCCL hangs; rows of the same length, as in most tests, never show it). So
every rank runs as many chunks as the rank with the most, the extra ones empty.

The chunks use reentrant checkpointing: its backward reruns the head as an ordinary forward +
backward, so ZeRO-3's module hooks gather the frozen head weight for it. Under the non-reentrant
form DeepSpeed 0.19 releases that weight as soon as the recomputed head returns (the head is
itself the module whose backward is running), and backward fails with "Recomputed values ...
have different metadata" (shape [0]).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from synthpert.train.collate import IGNORE

CHUNK_LOGITS = 2**24  # logits per chunk (64 MiB in fp32): SmolLM2's vocab gives 341 positions


def chunk_positions(vocab_size: int) -> int:
    """Labelled positions per loss chunk for a vocabulary of this size."""
    return max(1, CHUNK_LOGITS // vocab_size)


def _chunk_loss(lm_head, hidden, targets):
    import torch.nn.functional as F

    # logits in the model's dtype (bf16 on GPU), cross-entropy in fp32 as transformers does
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def chunks_on_every_rank(chunks: int, lm_head, device) -> int:
    """The chunks this rank runs: its own, or under ZeRO-3 (a partitioned head: `ds_id`) in a
    process group, the most any rank has (one all-reduce per loss)."""
    import torch
    import torch.distributed as dist

    if not (hasattr(lm_head.weight, "ds_id") and dist.is_available() and dist.is_initialized()):
        return chunks
    most = torch.tensor([chunks], dtype=torch.int64, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item())


def causal_lm_loss(model, input_ids, labels, position_ids=None, chunk: int | None = None) -> Any:
    """Mean next-token cross-entropy over the labelled positions of `labels` (IGNORE elsewhere).

    `model` is a PEFT causal LM or the DeepSpeed engine around one; `chunk`: positions per chunk
    (default from the vocabulary size, see `chunk_positions`).
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    causal_lm = getattr(model, "module", model).get_base_model()
    lm_head = causal_lm.get_output_embeddings()
    captured = []
    hook = causal_lm.get_decoder().register_forward_hook(lambda _module, _args, out: captured.append(out[0]))
    try:
        model(input_ids=input_ids, position_ids=position_ids, logits_to_keep=1)
    finally:
        hook.remove()
    targets = labels[:, 1:]
    labelled = targets != IGNORE
    hidden, targets = captured[0][:, :-1][labelled], targets[labelled]
    step = chunk or chunk_positions(lm_head.out_features)
    # without gradients (validation) nothing is kept for backward: no recomputation needed
    run = partial(checkpoint, _chunk_loss, use_reentrant=True) if torch.is_grad_enabled() else _chunk_loss
    total = hidden[:0].sum()  # zero, yet on the graph when no position is labelled
    for start in range(0, chunks_on_every_rank(math.ceil(len(targets) / step), lm_head, hidden.device) * step, step):
        part = slice(start, start + step)  # past this rank's positions: empty, the head still called
        total = total + run(lm_head, hidden[part], targets[part])
    return total / max(len(targets), 1)
