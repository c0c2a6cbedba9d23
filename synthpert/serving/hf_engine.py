"""The light engine: transformers on CPU (or one GPU), with real batched generation.

`@serve.batch` gathers the requests that arrive within `batch_wait_timeout_s` into a group; a
group is prefilled in one forward pass (prompts left-padded) and then joins the batch already
decoding (continuous batching: its KV cache is left-padded and concatenated onto the running one).
Every decode step is ONE forward pass for all running rows (at most `max_batch_size`); finished
rows leave the batch at once. Each row keeps its own sampling parameters, seed, stop strings,
penalties, logit bias, output grammar and adapter (PEFT mixed-adapter batches: `adapter_names` per row).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from synthpert.serving.adapters import load_error, resolve_adapter
from synthpert.serving.metrics import EngineMetrics
from synthpert.serving.protocol import APIError, ChatRequest, Delta, Sampling, TokenLogprob, assemble, sse

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class Job:
    """One request: a prompt and how to sample its n completions."""

    prompt_ids: list[int]
    sampling: Sampling
    adapter: str | None = None
    grammar: Any = None  # the compiled output constraint (Grammars.compile), if any
    cancelled: bool = False  # its caller has gone: the rows leave the batch at the next step


@dataclass
class _Row:
    key: Any  # which admission group (one @serve.batch call) the row belongs to
    job: int
    source: Job
    index: int
    sampling: Sampling
    adapter: str
    generator: Any
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    finish: str | None = None
    matcher: Any = None  # xgrammar GrammarMatcher: where the row's output is in its grammar
    counts: Any = None  # penalties: [vocab] times each token was generated
    seen: Any = None  # repetition_penalty: [vocab] whether a token is in the prompt or the output


def _seed(seed: int | None, index: int) -> int:
    """A per-completion seed: stable for a given request seed, random without one."""
    if seed is None:
        import secrets

        return secrets.randbits(63)
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") >> 1


class PrefixCache:
    """KV caches of finished generations, by adapter and token ids, so that a scoring request
    continuing one (guided_choice after the model's own text: the teacher's answer after its
    reasoning, the judge's grade after its critique, a prediction's label after its reasoning)
    prefills only its new tokens instead of the whole prompt again. An LRU bounded by bytes.
    Written here because transformers has no cross-request prefix cache (vLLM has its own)."""

    MIN_TOKENS = 16  # a shorter shared prefix is not worth a lookup

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[int, tuple[str, Any, list[tuple[Any, Any]], int]] = OrderedDict()
        self._ids = itertools.count()
        self.hits = 0

    def put(self, adapter: str, ids: list[int], kv: list[tuple[Any, Any]]) -> None:
        size = sum(k.nbytes + v.nbytes for k, v in kv)
        if len(ids) < self.MIN_TOKENS or size > self.max_bytes:
            return
        import numpy as np

        self.entries[next(self._ids)] = (adapter, np.asarray(ids), kv, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self.bytes -= self.entries.popitem(last=False)[1][3]

    def longest(self, adapter: str, ids: list[int]) -> tuple[int, list[tuple[Any, Any]] | None]:
        """(n, kv): the longest cached prefix of `ids` for this adapter (n = 0: none usable)."""
        import numpy as np

        query, best, found = np.asarray(ids), (0, None), None
        for key, (name, cached, kv, _) in self.entries.items():
            if name != adapter:
                continue
            n = min(len(cached), len(query))
            differ = np.flatnonzero(cached[:n] != query[:n])
            n = int(differ[0]) if len(differ) else n
            if n > best[0]:
                best, found = (n, kv), key
        if best[0] < self.MIN_TOKENS:
            return 0, None
        self.entries.move_to_end(found)
        self.hits += 1
        return best

    def drop(self, adapter: str) -> None:
        """Forget an adapter's entries (it was unloaded: a new one may come under its name)."""
        for key in [k for k, entry in self.entries.items() if entry[0] == adapter]:
            self.bytes -= self.entries.pop(key)[3]


class Grammars:
    """Output constraints (JSON schema, any JSON object, regex, choice, EBNF grammar) compiled for
    one tokenizer; each constrained row gets its own matcher, which masks the tokens its grammar
    forbids before sampling and accepts the token sampled.

    xgrammar rather than llguidance (both maintained, native, on the CPU): on SmolLM2-135M's
    tokenizer, one next-token mask for a {critique, grade-enum} schema took a median 7 us with
    xgrammar (p90 15 us) and 10 us with llguidance (p90 102 us); for any JSON object, 8 us vs 40 us.
    Compiling a schema takes ~10 ms, once per schema (the compiler caches it). xgrammar is also
    vLLM's default backend, so both engines read a schema alike. JSON is written compactly
    (any_whitespace=False): a small model otherwise can emit whitespace until max_tokens.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]):
        import xgrammar

        self.xgr, self.vocab_size = xgrammar, vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)

    def compile(self, kind: str, source: str) -> Any:
        """A compiled grammar for ChatRequest.grammar()'s (kind, source); a bad one is a 400."""
        c = self.compiler
        try:
            if kind == "json":
                return c.compile_json_schema(source, any_whitespace=False)
            if kind == "json_object":
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if kind == "regex":
                return c.compile_regex(source)
            if kind == "choice":
                return c.compile_grammar("root ::= " + " | ".join(json.dumps(x, ensure_ascii=False) for x in json.loads(source)))
            return c.compile_grammar(source)
        except Exception as exc:  # xgrammar's reason comes after its "[time] source.cc:line: " prefix
            reason = re.sub(r"^\[[\d:]+\] \S+: ", "", str(exc).strip())
            raise APIError(400, f"the {kind} output constraint cannot be compiled: {reason}") from None

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, rows: list[_Row], logits: Any) -> None:
        """-inf on every token a constrained row's grammar forbids next (in place)."""
        constrained = [b for b, row in enumerate(rows) if row.matcher is not None]
        if not constrained:
            return
        bitmask = self.xgr.allocate_token_bitmask(len(rows), self.vocab_size)
        for b in constrained:
            rows[b].matcher.fill_next_token_bitmask(bitmask, b)
        self.xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab_size,
                                             indices=constrained)


class HFEngine:
    """A causal LM plus LoRA adapters; thread-confined: call it from one worker thread only."""

    def __init__(self, model_dir: Path, max_model_len: int, device: str | None = None, prefix_cache_bytes: int = 1 << 30,
                 dtype: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from synthpert.hardware import pick_dtype, torch_dtype

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.dtype = torch_dtype(pick_dtype(dtype, self.device == "cuda")[0])
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype).to(self.device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None) or max_model_len
        self.max_model_len = min(max_model_len, limit)
        eos = {self.tokenizer.eos_token_id, *_as_list(getattr(self.model.generation_config, "eos_token_id", None))}
        self.eos_ids = {e for e in eos if e is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.adapters: set[str] = set()
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]  # the logits' width
        self.grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids)

    # ---- adapters -------------------------------------------------------------------------
    def add_adapter(self, name: str, path: Path) -> None:
        from peft import PeftConfig, PeftModel

        if name in self.adapters:
            return
        PeftConfig.from_pretrained(str(path))  # a broken folder fails here, before the model is touched
        self.prefix_cache.drop(name)
        if self.adapters:
            self.model.load_adapter(str(path), adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
        self.model.eval()
        self.adapters.add(name)

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            return
        self.adapters.discard(name)
        self.prefix_cache.drop(name)
        if self.adapters:
            self.model.delete_adapter(name)
        else:  # the last one: back to the plain base model
            self.model = self.model.unload()

    # ---- scoring --------------------------------------------------------------------------
    def loglikelihoods(self, pairs: list[tuple[list[int], list[int]]], adapter: str | None) -> list[float]:
        """Summed log-probability of each continuation after its context. The contexts' common
        prefix (for guided_choice: the whole prompt) runs once and its KV cache is shared by every
        choice: scoring k choices costs one prompt, not k (the judge's 5 grades: ~5x less)."""
        from transformers import DynamicCache

        torch = self.torch
        seqs = [ctx + cont for ctx, cont in pairs]
        shared = min(min(len(ctx) for ctx, _ in pairs), _common_prefix(seqs))
        if shared == 0:
            raise ValueError("continuations are scored after a shared, non-empty context")
        rests = [s[shared:] for s in seqs]  # never empty: every continuation has a token
        width = max(len(r) for r in rests)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.ones((len(seqs), shared + width), dtype=torch.long)
        for i, rest in enumerate(rests):  # right padding: pads come after every scored token
            ids[i, : len(rest)] = torch.tensor(rest)
            mask[i, shared + len(rest):] = 0
        positions = torch.arange(shared, shared + width).expand(len(seqs), -1)
        names = lambda n: {"adapter_names": [adapter or BASE] * n} if self.adapters else {}  # noqa: E731
        # a finished generation's KV covers most of the prompt; the last prompt token always runs
        reuse, kv = self.prefix_cache.longest(adapter or BASE, seqs[0][: shared - 1])
        past = DynamicCache(ddp_cache_data=[(k[..., :reuse, :], v[..., :reuse, :]) for k, v in kv]) if reuse else None
        with torch.inference_mode():
            prefix = torch.tensor([seqs[0][reuse:shared]], device=self.device)
            head = self.model(input_ids=prefix, position_ids=torch.arange(reuse, shared, device=self.device)[None],
                              past_key_values=past, use_cache=True, **names(1))
            head.past_key_values.batch_repeat_interleave(len(seqs))
            tail = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                              position_ids=positions.to(self.device), past_key_values=head.past_key_values,
                              **names(len(seqs))).logits
            # column j predicts the token at position shared + j
            logits = torch.cat([head.logits[:, -1:].expand(len(seqs), -1, -1), tail[:, :-1]], dim=1)
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        out = []
        for i, (ctx, cont) in enumerate(pairs):
            columns = torch.arange(len(ctx) - shared, len(ctx) - shared + len(cont))
            out.append(float(logp[i, columns, torch.tensor(cont)].sum()))
        return out


class Decoding:
    """The running batch (continuous batching): rows join between steps (`admit`: one prefill
    forward for the newcomers, whose KV cache is then left-padded and concatenated onto the
    batch's) and leave as they finish. Every `step()` is ONE forward pass for all rows.

    Between calls: `cache` holds positions [0, L), `mask` is [rows, L + 1] (the extra column is
    for `next_ids`, the token each row feeds next). Results are (key, job, Delta) triples.
    """

    def __init__(self, engine: HFEngine):
        self.engine = engine
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: Any = None
        self.next_ids: Any = None

    def admit(self, jobs: list[Job], key: Any = None) -> list[tuple[Any, int, Delta]]:
        """Prefill `jobs` (their first token comes out of this forward) and join the batch."""
        torch, engine = self.engine.torch, self.engine
        rows = [_Row(key, j, job, i, job.sampling, job.adapter or BASE,
                     torch.Generator().manual_seed(_seed(job.sampling.seed, i)))
                for j, job in enumerate(jobs) for i in range(job.sampling.n)]
        for row in rows:
            if row.source.grammar is not None:
                row.matcher = engine.grammars.matcher(row.source.grammar)
            if row.sampling.penalized:
                row.counts = torch.zeros(engine.vocab_size, device=engine.device)
                row.seen = torch.zeros(engine.vocab_size, dtype=torch.bool, device=engine.device)
                row.seen[torch.tensor(row.source.prompt_ids, device=engine.device)] = True
        aborted = [self._abort(row) for row in rows if row.source.cancelled]
        rows = [row for row in rows if not row.source.cancelled]  # gone while queued: no prefill
        if not rows:
            return aborted
        prompts = [jobs[r.job].prompt_ids for r in rows]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), engine.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every row's last token is at -1
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(engine.device), mask.to(engine.device)
        out = self._forward(rows, ids, mask, None, (mask.cumsum(-1) - 1).clamp(min=0))
        results, tokens, keep = self._advance_all(rows, out.logits[:, -1, :])
        if keep:
            cache, mask, tokens = self._select(out.past_key_values, mask, tokens, keep, len(rows))
            self._join([rows[b] for b in keep], cache, mask, tokens)
        return aborted + results

    def step(self) -> list[tuple[Any, int, Delta]]:
        """One forward pass for every running row."""
        if not self.rows:
            return []
        position_ids = self.mask.sum(-1, keepdim=True) - 1
        out = self._forward(self.rows, self.next_ids, self.mask, self.cache, position_ids)
        results, tokens, keep = self._advance_all(self.rows, out.logits[:, -1, :])
        self._remember([b for b, row in enumerate(self.rows) if row.finish not in (None, "abort")], out.past_key_values)
        self.cache, mask, tokens = self._select(out.past_key_values, self.mask, tokens, keep, len(self.rows))
        self.rows = [self.rows[b] for b in keep]
        self.mask = self._grow(mask)
        self.next_ids = tokens.view(-1, 1)
        return results

    def clear(self) -> None:
        self.rows, self.cache, self.mask, self.next_ids = [], None, None, None

    # ---- internals -------------------------------------------------------------------------
    def _remember(self, finished: list[int], cache: Any) -> None:
        """Keep finished rows' KV (their valid, right-aligned positions) in the prefix cache."""
        for b in finished:
            row, n = self.rows[b], int(self.mask[b].sum())
            kv = [(layer.keys[b: b + 1, :, -n:].clone(), layer.values[b: b + 1, :, -n:].clone()) for layer in cache.layers]
            self.engine.prefix_cache.put(row.adapter, (row.source.prompt_ids + row.ids)[:n], kv)

    def _forward(self, rows: list[_Row], ids: Any, mask: Any, cache: Any, position_ids: Any) -> Any:
        kwargs = {"adapter_names": [r.adapter for r in rows]} if self.engine.adapters else {}
        with self.engine.torch.inference_mode():
            return self.engine.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                     past_key_values=cache, use_cache=True, **kwargs)

    def _advance_all(self, rows: list[_Row], logits: Any) -> tuple[list[tuple[Any, int, Delta]], Any, list[int]]:
        logits = logits.float()
        logp = self.engine.torch.log_softmax(logits, dim=-1)
        with self.engine.torch.inference_mode():  # the logits are inference tensors, adjusted in place
            tokens = self._sample(rows, logits)
        results = [self._abort(row) if row.source.cancelled else (row.key, row.job, self._advance(row, int(tokens[b]), logp[b]))
                   for b, row in enumerate(rows)]
        return results, tokens, [b for b, row in enumerate(rows) if row.finish is None]

    @staticmethod
    def _abort(row: _Row) -> tuple[Any, int, Delta]:
        """End a row whose caller has gone (its client disconnected or timed out)."""
        row.finish = "abort"
        return row.key, row.job, Delta(row.index, finish_reason="abort")

    def _select(self, cache: Any, mask: Any, tokens: Any, keep: list[int], total: int) -> tuple[Any, Any, Any]:
        """Drop finished rows from the cache, the mask and the sampled tokens."""
        if len(keep) == total:
            return cache, mask, tokens
        index = self.engine.torch.tensor(keep, dtype=self.engine.torch.long, device=self.engine.device)
        if keep:
            cache.batch_select_indices(index)
        return cache, mask[index], tokens[index]

    def _grow(self, mask: Any) -> Any:
        return self.engine.torch.cat([mask, self.engine.torch.ones_like(mask[:, :1])], dim=1)

    def _join(self, rows: list[_Row], cache: Any, mask: Any, tokens: Any) -> None:
        """Append prefilled rows: both caches left-padded to one length, then concatenated."""
        torch = self.engine.torch
        mask, tokens = self._grow(mask), tokens.view(-1, 1)
        if not self.rows:
            self.rows, self.cache, self.mask, self.next_ids = rows, cache, mask, tokens
            return
        width = max(self.mask.shape[1], mask.shape[1])

        def pad(t: Any, extra: int, dim: int) -> Any:
            if not extra:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old, new in zip(self.cache.layers, cache.layers):
            old_extra, new_extra = width - self.mask.shape[1], width - mask.shape[1]
            old.keys = torch.cat([pad(old.keys, old_extra, -2), pad(new.keys, new_extra, -2)])
            old.values = torch.cat([pad(old.values, old_extra, -2), pad(new.values, new_extra, -2)])
        self.mask = torch.cat([pad(self.mask, width - self.mask.shape[1], 1), pad(mask, width - mask.shape[1], 1)])
        self.next_ids = torch.cat([self.next_ids, tokens])
        self.rows = self.rows + rows

    def _adjust(self, rows: list[_Row], logits: Any) -> None:
        """Each row's logit bias, then its penalties (vLLM's order and formulas: repetition divides
        a positive logit of a prompt-or-output token by the penalty and multiplies a negative one;
        frequency subtracts per generated occurrence, presence once), then its grammar mask, in place.
        Hand-written: transformers' LogitsProcessors apply one setting to a whole batch, each row
        here has its own, and transformers has no presence/frequency penalty."""
        torch = self.engine.torch
        for b, row in enumerate(rows):
            s = row.sampling
            if s.logit_bias:
                ids = torch.tensor(list(s.logit_bias), device=logits.device)
                logits[b, ids] += torch.tensor(list(s.logit_bias.values()), device=logits.device)
            if row.counts is not None:
                x = logits[b]
                if s.repetition_penalty != 1.0:
                    x = torch.where(row.seen, torch.where(x > 0, x / s.repetition_penalty, x * s.repetition_penalty), x)
                logits[b] = x - s.frequency_penalty * row.counts - s.presence_penalty * (row.counts > 0)
        self.engine.grammars.mask(rows, logits)

    def _sample(self, rows: list[_Row], logits: Any) -> Any:
        """The next token per row, from its adjusted logits (logprobs stay the model's raw ones, as
        vLLM reports them by default)."""
        torch = self.engine.torch
        self._adjust(rows, logits)
        picks = logits.argmax(dim=-1)
        for b, row in enumerate(rows):
            s = row.sampling
            if s.temperature == 0:
                continue
            probs = torch.softmax(logits[b] / s.temperature, dim=-1)
            if s.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                drop = sorted_p.cumsum(0) - sorted_p >= s.top_p  # keep the smallest prefix reaching top_p
                sorted_p[drop] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            picks[b] = torch.multinomial(probs.cpu(), 1, generator=row.generator)[0]
        return picks

    def _advance(self, row: _Row, token: int, logp: Any) -> Delta:
        engine, s = self.engine, row.sampling
        stopped_by_eos = token in engine.eos_ids
        if row.matcher is not None and not row.matcher.accept_token(token):
            raise RuntimeError(f"token {token} is outside the row's grammar, which masked it")
        if not stopped_by_eos:
            row.ids.append(token)
            if row.counts is not None:
                row.counts[token] += 1
                row.seen[token] = True
        logprobs = []
        if s.logprobs:
            top = []
            if s.top_logprobs:
                values, ids = logp.topk(s.top_logprobs)
                top = [(engine.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]
            logprobs = [TokenLogprob(engine.tokenizer.decode([token]), float(logp[token]), top)]
        text = engine.tokenizer.decode(row.ids, skip_special_tokens=True)
        finish = "stop" if stopped_by_eos else None
        longest = max((len(stop) for stop in s.stop), default=0)
        if s.stop:
            hits = [i for i in (text.find(stop, max(0, row.sent - longest)) for stop in s.stop) if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
        if finish is None and len(row.ids) >= s.max_tokens:
            finish = "length"
        upto = len(text)
        if finish is None:  # hold back a possible stop-string prefix or a split UTF-8 character
            upto -= max(longest - 1, 0)
            while upto > row.sent and text[upto - 1] == "\ufffd":
                upto -= 1
        new = text[row.sent: max(upto, row.sent)]
        row.sent += len(new)
        row.finish = finish
        return Delta(row.index, new, 1, logprobs, finish)


def continuation_pairs(tokenizer: Any, prompt_text: str, prompt_ids: list[int],
                       choices: list[str]) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token ids per choice, every choice after the SAME context: the
    choices compete as continuations of one string. Split as lm-evaluation-harness's `_encode_pair`:
    the prompt's trailing whitespace moves into every continuation (a BPE word carries its leading
    space: " up", never " " + "up"), and a continuation is what context + choice adds after the
    context's tokens. Where a choice's first characters merge with the context's last ones
    ("...s" + "upregulated" -> "sup", "regulated"), that choice is tokenized on its own instead."""
    context_text = prompt_text.rstrip()
    space = prompt_text[len(context_text):]
    context = tokenizer(context_text, add_special_tokens=False).input_ids if space else prompt_ids
    pairs = []
    for choice in choices:
        whole = tokenizer(prompt_text + choice, add_special_tokens=False).input_ids
        if whole[: len(context)] == context:
            pairs.append((context, whole[len(context):]))
        else:
            pairs.append((context, tokenizer(space + choice, add_special_tokens=False).input_ids))
    return pairs


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest prefix all sequences share."""
    n = min(len(s) for s in seqs)
    return next((i for i in range(n) if len({s[i] for s in seqs}) > 1), n)


def _replica_id() -> str:
    """This Serve replica's id ("local" outside a replica, e.g. the in-process benchmark)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - RayServeException outside a replica
        return "local"


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class HFServer:
    """Serve deployment around HFEngine: dynamic batching (`@serve.batch`) + multiplexed adapters.

    All model work runs on one worker thread, so the event loop stays free to gather the next
    batch and to answer health checks while a batch decodes. An adapter evicted by the
    multiplexer's LRU while requests still use it is removed when the last of them finishes.
    """

    def __init__(self, serve_cfg: dict[str, Any]):
        from synthpert.config import ServeConfig
        from synthpert.models import resolve_model

        cfg = ServeConfig.model_validate(serve_cfg)
        self.cfg = cfg
        if not cfg.use_gpu:  # as many compute threads as CPUs reserved unless told, in a replica or not
            import torch

            torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_replica)))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="hf-engine")
        self.engine = HFEngine(resolve_model(cfg.model), cfg.max_model_len, prefix_cache_bytes=cfg.prefix_cache_mb << 20,
                               dtype=cfg.dtype)
        self.decoding = Decoding(self.engine)
        self._generate.set_max_batch_size(cfg.max_batch_size)
        self._generate.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._keys = itertools.count()
        self._sinks: dict[int, asyncio.Queue[Any]] = {}
        self._room = asyncio.Condition()
        self._running = 0  # rows admitted and not finished
        self._stepper: asyncio.Task[None] | None = None
        self.metrics = EngineMetrics(_replica_id())

        async def load(name: str) -> _LoadedAdapter:  # serve.multiplexed wants a plain function
            return await self._load_adapter(name)

        self._adapter = serve.multiplexed(max_num_models_per_replica=cfg.max_adapters_per_replica)(load)
        self._lock = threading.Lock()
        self._in_use: Counter[str] = Counter()
        self._evicted: set[str] = set()

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _load_adapter(self, name: str) -> "_LoadedAdapter":
        path = await self._call(resolve_adapter, self.cfg.adapters[name], self.cfg.model)
        await self._call(self.engine.add_adapter, name, path)
        self.metrics.adapter_loads += 1
        return _LoadedAdapter(self, name)

    def metrics_snapshot(self) -> dict[str, Any]:
        return self.metrics.snapshot()

    def evict(self, name: str) -> None:
        self.metrics.adapter_evictions += 1
        with self._lock:
            if self._in_use[name]:
                self._evicted.add(name)
                return
        self.pool.submit(self.engine.remove_adapter, name)  # queued behind the batch in flight

    @contextlib.asynccontextmanager
    async def _adapter_for_request(self) -> AsyncIterator[str | None]:
        """The adapter this request asked for (Serve's multiplexed model id), loaded on demand."""
        name = serve.get_multiplexed_model_id() or None
        if name is None:
            yield None
            return
        try:
            await self._adapter(name)
        except Exception as exc:
            raise load_error(name, exc) from None
        with self._lock:
            self._in_use[name] += 1
            self._evicted.discard(name)
        try:
            yield name
        finally:
            with self._lock:
                self._in_use[name] -= 1
                stale = not self._in_use[name] and name in self._evicted
                if stale:
                    self._evicted.discard(name)
            if stale:
                self.pool.submit(self.engine.remove_adapter, name)

    # several groups in flight at once (continuous batching); rows are capped by max_batch_size below
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05, max_concurrent_batches=64)
    async def _generate(self, jobs: list[Job]) -> AsyncIterator[list[Any]]:
        """Admit one @serve.batch group into the running batch; stream each job's Deltas per step.

        A job's stream ends (StopIteration in its slot) right after its last Delta."""
        key = next(self._keys)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        rows = sum(job.sampling.n for job in jobs)
        async with self._room:  # at most max_batch_size rows decode together
            await self._room.wait_for(lambda: self._running == 0 or self._running + rows <= self.cfg.max_batch_size)
            self._running += rows
        self._sinks[key] = queue
        left = [job.sampling.n for job in jobs]
        try:
            results = await self._call(self.decoding.admit, jobs, key)
            self._ensure_stepper()
            while True:
                step: list[list[Delta]] = [[] for _ in jobs]
                for _, j, delta in results:
                    step[j].append(delta)
                yield step
                finished = sum(d.finish_reason is not None for deltas in step for d in deltas)
                if finished:
                    for j, deltas in enumerate(step):
                        left[j] -= sum(d.finish_reason is not None for d in deltas)
                    await self._release(finished)
                    yield [StopIteration if n == 0 else [] for n in left]
                    if not any(left):
                        return
                results = await queue.get()
                if isinstance(results, BaseException):
                    raise results
        finally:
            del self._sinks[key]
            await self._release(sum(left))

    async def _release(self, rows: int) -> None:
        async with self._room:
            self._running -= rows
            self._room.notify_all()

    def _ensure_stepper(self) -> None:
        if self._stepper is None or self._stepper.done():
            self._stepper = asyncio.create_task(self._step_loop())

    async def _step_loop(self) -> None:
        """Decode steps while rows are running; each step's results go to their groups."""
        while self.decoding.rows:
            self.metrics.step(len(self.decoding.rows))
            try:
                results = await self._call(self.decoding.step)
            except Exception as exc:  # every running request fails, the replica stays up
                await self._call(self.decoding.clear)
                for queue in self._sinks.values():
                    queue.put_nowait(exc)
                return
            by_key: dict[int, list[Any]] = {}
            for result in results:
                by_key.setdefault(result[0], []).append(result)
            for key, group in by_key.items():
                if key in self._sinks:
                    self._sinks[key].put_nowait(group)

    async def _deltas(self, req: ChatRequest, prompt_ids: list[int]) -> AsyncIterator[list[Delta]]:
        """Serve keeps a @serve.batch generator running after its callers are cancelled, so a
        client that disconnects (or times out and retries) marks its job: the rows stop decoding."""
        sampling = req.sampling()
        grammar = await asyncio.to_thread(self.engine.grammars.compile, *sampling.grammar) if sampling.grammar else None
        async with self._adapter_for_request() as adapter:
            job = Job(prompt_ids, sampling, adapter, grammar)
            try:
                async for deltas in self._generate(job):
                    yield deltas
            finally:
                job.cancelled = True  # a no-op once every row has finished

    async def complete(self, request: dict[str, Any], prompt_ids: list[int]) -> dict[str, Any]:
        req = ChatRequest.model_validate(request)
        return await assemble(self._deltas(req, prompt_ids), req, len(prompt_ids))

    async def complete_stream(self, request: dict[str, Any], prompt_ids: list[int]) -> AsyncIterator[str]:
        req = ChatRequest.model_validate(request)
        async for line in sse(self._deltas(req, prompt_ids), req, len(prompt_ids)):
            yield line

    async def loglikelihoods(self, model: str, prompt_text: str, prompt_ids: list[int],
                             choices: list[str]) -> list[tuple[float, int]]:
        pairs = continuation_pairs(self.engine.tokenizer, prompt_text, prompt_ids, choices)
        async with self._adapter_for_request() as adapter:
            scores = await self._call(self.engine.loglikelihoods, pairs, adapter)
        return [(score, len(cont)) for score, (_, cont) in zip(scores, pairs)]


class _LoadedAdapter:
    """What the multiplexer caches; Serve calls __del__ when its LRU evicts the adapter."""

    def __init__(self, server: HFServer, name: str):
        self.server, self.name, self.loaded = server, name, True

    def __del__(self) -> None:
        if self.loaded:  # Serve calls it on eviction, Python again at garbage collection
            self.loaded = False
            self.server.evict(self.name)
