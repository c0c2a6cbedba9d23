"""Chat rows -> token ids with assistant-only labels; optional packing; padded batches.

Every example is one *segment*. A row holds one segment (or several when packing); `collate`
restarts position ids at each segment and passes no attention mask, so transformers builds a
block-diagonal causal mask from the position ids: packed examples never see each other, and
padding is a segment of its own. One code path serves packed and unpacked training.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from synthpert.chat import OWN, assistant_spans
from synthpert.errors import SynthPertError

IGNORE = -100  # label value that transformers' loss skips
ROLES = ("system", "user", "assistant")


def build_messages(row: Mapping[str, Any], mode: str) -> list[dict[str, str]]:
    """The chat to train on: the trace as is (cot), or the same student turns (context included)
    answered with `<answer>label</answer>` only (raw): both students see identical user turns."""
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]]
    if mode == "cot":
        return messages
    from synthpert.prompts import format_answer

    prompt = messages[: next(i for i, m in enumerate(messages) if m["role"] == "assistant")]
    return [*prompt, {"role": "assistant", "content": format_answer(row["label"])}]


def check_messages(messages: Any, where: str) -> None:
    """A trainable chat: a list of {role, content} with known roles and at least one assistant turn."""
    try:
        roles = [m["role"] for m in messages]
        contents = [m["content"] for m in messages]
    except (TypeError, KeyError, IndexError) as exc:
        raise SynthPertError(f"{where}: messages must be a list of {{role, content}}, got {messages!r:.200}") from exc
    unknown = sorted({r for r in roles if r not in ROLES})
    if unknown:
        raise SynthPertError(f"{where}: unknown message roles {unknown} (expected {list(ROLES)})")
    if "assistant" not in roles:
        raise SynthPertError(f"{where}: no assistant message to learn from (roles {roles})")
    if any(not isinstance(c, str) for c in contents):
        raise SynthPertError(f"{where}: message contents must be strings")


def tokenize_chat(tokenizer, messages, max_seq_len: int, loss_on: str = "assistant") -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) truncated to max_seq_len, or None when no assistant token survives."""
    text, spans, _ = assistant_spans(tokenizer, messages)
    return _tokenize(tokenizer, text, spans, max_seq_len, loss_on)


def _tokenize(tokenizer, text: str, spans: list[tuple[int, int]], max_seq_len: int, loss_on: str) -> tuple[list[int], list[int]] | None:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"][:max_seq_len]
    starts = np.array([start for start, _ in encoded["offset_mapping"][:max_seq_len]])
    in_answer = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        in_answer |= (starts >= lo) & (starts < hi)
    if not in_answer.any():
        return None
    labels = ids if loss_on == "all" else np.where(in_answer, ids, IGNORE).tolist()
    return list(ids), list(labels)


def pack(examples: list[tuple[list[int], list[int]]], max_len: int) -> list[list[int]]:
    """First-fit-decreasing bins of example indices, each bin's total length <= max_len."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i][0])):
        size = len(examples[i][0])
        slot = next((b for b, room in enumerate(free) if room >= size), None)
        if slot is None:
            bins.append([i])
            free.append(max_len - size)
        else:
            bins[slot].append(i)
            free[slot] -= size
    return bins


def tokenize_frame(frame: pd.DataFrame, tokenizer, mode: str, max_seq_len: int, loss_on: str, packing: bool) -> pd.DataFrame:
    """Rows of a traces table -> training rows: input_ids, labels, segments (lengths), examples,
    own_rendered (of those, how many the chat template could not render: synthpert.chat), length
    (tokens in the row).

    Examples with no assistant token left after truncation are dropped; `examples` counts the
    examples in each row so the caller can tell how many were kept.
    """
    examples, own = [], []
    for row in frame.to_dict("records"):
        text, spans, rendering = assistant_spans(tokenizer, build_messages(row, mode))
        tokens = _tokenize(tokenizer, text, spans, max_seq_len, loss_on)
        if tokens is not None:
            examples.append(tokens)
            own.append(rendering == OWN)
    groups = pack(examples, max_seq_len) if packing else [[i] for i in range(len(examples))]
    out = {"input_ids": [], "labels": [], "segments": [], "examples": [], "own_rendered": [], "length": []}
    for group in groups:
        out["input_ids"].append([t for i in group for t in examples[i][0]])
        out["labels"].append([t for i in group for t in examples[i][1]])
        out["segments"].append([len(examples[i][0]) for i in group])
        out["examples"].append(len(group))
        out["own_rendered"].append(sum(own[i] for i in group))
        out["length"].append(len(out["input_ids"][-1]))
    return pd.DataFrame(out)


def pad_token_id(tokenizer) -> int:
    """The id padding is filled with: the pad token, else eos as the serving engine does (Llama-3
    tokenizers have no pad token), else 0; any id serves, padding is never attended to or learnt."""
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)


def collate(batch: Mapping[str, Iterable], pad_id: int) -> dict[str, Any]:
    """Training rows -> right-padded tensors input_ids, position_ids, labels (no attention mask),
    plus num_tokens, the count of real (non-padding) tokens.

    Positions restart at every segment and in the padding; the first label of every segment is
    ignored so no example is trained to predict its start from its neighbour's end.
    """
    import torch

    rows = list(zip(batch["input_ids"], batch["labels"], batch["segments"]))
    width = max(len(ids) for ids, _, _ in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    for r, (ids, lab, segments) in enumerate(rows):
        n = len(ids)
        input_ids[r, :n] = ids
        labels[r, :n] = lab
        offset = 0
        for length in [*segments, width - n]:
            positions[r, offset : offset + length] = np.arange(length)
            if offset < n:
                labels[r, offset] = IGNORE
            offset += length
    return {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.from_numpy(positions),
        "labels": torch.from_numpy(labels),
        "num_tokens": torch.tensor(sum(len(ids) for ids, _, _ in rows)),
    }
