"""The light engine: transformers on CPU (or one GPU), with real batched generation.

Concurrent requests that arrive within `batch_wait_timeout_s` are decoded together: prompts are
left-padded into one tensor, every decode step is ONE forward pass for the whole batch (KV cache,
finished rows dropped from the batch), and each row keeps its own sampling parameters, seed,
stop strings and adapter (PEFT mixed-adapter batches: `adapter_names` per row).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from synthpert.serving.adapters import load_error, resolve_adapter
from synthpert.serving.protocol import ChatRequest, Delta, Sampling, TokenLogprob, assemble, sse

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class Job:
    """One request: a prompt and how to sample its n completions."""

    prompt_ids: list[int]
    sampling: Sampling
    adapter: str | None = None


@dataclass
class _Row:
    job: int
    index: int
    sampling: Sampling
    adapter: str
    generator: Any
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    finish: str | None = None


def _seed(seed: int | None, index: int) -> int:
    """A per-completion seed: stable for a given request seed, random without one."""
    if seed is None:
        import secrets

        return secrets.randbits(63)
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") >> 1


class HFEngine:
    """A causal LM plus LoRA adapters; thread-confined: call it from one worker thread only."""

    def __init__(self, model_dir: Path, max_model_len: int, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None) or max_model_len
        self.max_model_len = min(max_model_len, limit)
        eos = {self.tokenizer.eos_token_id, *_as_list(getattr(self.model.generation_config, "eos_token_id", None))}
        self.eos_ids = {e for e in eos if e is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.adapters: set[str] = set()

    # ---- adapters -------------------------------------------------------------------------
    def add_adapter(self, name: str, path: Path) -> None:
        from peft import PeftConfig, PeftModel

        if name in self.adapters:
            return
        PeftConfig.from_pretrained(str(path))  # a broken folder fails here, before the model is touched
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
        if self.adapters:
            self.model.delete_adapter(name)
        else:  # the last one: back to the plain base model
            self.model = self.model.unload()

    # ---- scoring --------------------------------------------------------------------------
    def loglikelihoods(self, pairs: list[tuple[list[int], list[int]]], adapter: str | None) -> list[float]:
        """Summed log-probability of each continuation after its context (one batched forward)."""
        torch = self.torch
        seqs = [ctx + cont for ctx, cont in pairs]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):  # right padding: positions stay 0..len-1
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        kwargs = {"adapter_names": [adapter or BASE] * len(seqs)} if self.adapters else {}
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        out = []
        for i, (ctx, cont) in enumerate(pairs):
            positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
            out.append(float(logp[i, positions, torch.tensor(cont)].sum()))
        return out

    # ---- generation -----------------------------------------------------------------------
    def start(self, jobs: list[Job]) -> "Decoding":
        return Decoding(self, jobs)


class Decoding:
    """One batch in flight: `step()` runs one forward pass and returns each job's new Deltas."""

    def __init__(self, engine: HFEngine, jobs: list[Job]):
        torch = engine.torch
        self.engine, self.jobs = engine, jobs
        self.rows = [
            _Row(j, i, job.sampling, job.adapter or BASE, torch.Generator().manual_seed(_seed(job.sampling.seed, i)))
            for j, job in enumerate(jobs)
            for i in range(job.sampling.n)
        ]
        prompts = [jobs[r.job].prompt_ids for r in self.rows]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), engine.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every row's last token is at -1
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        self.mask = mask.to(engine.device)
        self.active = list(range(len(self.rows)))  # row numbers still decoding, in batch order
        self.cache = None
        self._next_ids = ids.to(engine.device)
        self.max_stop = max((len(s) for r in self.rows for s in r.sampling.stop), default=0)

    @property
    def done(self) -> bool:
        return not self.active

    def step(self) -> list[list[Delta]]:
        """One forward pass for all active rows; returns new Deltas per job (maybe empty lists)."""
        torch, engine = self.engine.torch, self.engine
        position_ids = (self.mask.cumsum(-1) - 1).clamp(min=0)
        if self.cache is not None:
            position_ids = position_ids[:, -self._next_ids.shape[1]:]
        adapters = [self.rows[r].adapter for r in self.active]
        kwargs = {"adapter_names": adapters} if engine.adapters else {}
        with torch.inference_mode():
            out = engine.model(input_ids=self._next_ids, attention_mask=self.mask, position_ids=position_ids,
                               past_key_values=self.cache, use_cache=True, **kwargs)
        self.cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        logp = torch.log_softmax(logits, dim=-1)
        tokens = self._sample(logits)
        deltas: list[list[Delta]] = [[] for _ in self.jobs]
        keep = []
        for b, r in enumerate(self.active):
            row = self.rows[r]
            token = int(tokens[b])
            deltas[row.job].append(self._advance(row, token, logp[b]))
            if row.finish is None:
                keep.append(b)
        if len(keep) < len(self.active):
            if keep:
                index = torch.tensor(keep, device=engine.device)
                self.cache.batch_select_indices(index)
                self.mask = self.mask[index]
                tokens = tokens[index]
            self.active = [self.active[b] for b in keep]
        if self.active:
            self._next_ids = tokens.view(-1, 1)
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return deltas

    def _sample(self, logits: Any) -> Any:
        torch = self.engine.torch
        picks = logits.argmax(dim=-1)
        for b, r in enumerate(self.active):
            s = self.rows[r].sampling
            if s.temperature == 0:
                continue
            probs = torch.softmax(logits[b] / s.temperature, dim=-1)
            if s.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                drop = sorted_p.cumsum(0) - sorted_p >= s.top_p  # keep the smallest prefix reaching top_p
                sorted_p[drop] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            picks[b] = torch.multinomial(probs.cpu(), 1, generator=self.rows[r].generator)[0]
        return picks

    def _advance(self, row: _Row, token: int, logp: Any) -> Delta:
        engine, s = self.engine, row.sampling
        stopped_by_eos = token in engine.eos_ids
        if not stopped_by_eos:
            row.ids.append(token)
        logprobs = []
        if s.logprobs:
            top = []
            if s.top_logprobs:
                values, ids = logp.topk(s.top_logprobs)
                top = [(engine.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]
            logprobs = [TokenLogprob(engine.tokenizer.decode([token]), float(logp[token]), top)]
        text = engine.tokenizer.decode(row.ids, skip_special_tokens=True)
        finish = "stop" if stopped_by_eos else None
        if s.stop:
            hits = [i for i in (text.find(stop, max(0, row.sent - self.max_stop)) for stop in s.stop) if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
        if finish is None and len(row.ids) >= s.max_tokens:
            finish = "length"
        upto = len(text)
        if finish is None:  # hold back a possible stop-string prefix or a split UTF-8 character
            upto -= max(self.max_stop - 1, 0)
            while upto > row.sent and text[upto - 1] == "\ufffd":
                upto -= 1
        new = text[row.sent: max(upto, row.sent)]
        row.sent += len(new)
        row.finish = finish
        return Delta(row.index, new, 1, logprobs, finish)


def continuation_pairs(tokenizer: Any, prompt_text: str, prompt_ids: list[int],
                       choices: list[str]) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token ids per choice, tokenizing prompt+choice together so the
    split matches how the model would see the answer (a merge across the boundary moves into
    the continuation)."""
    pairs = []
    for choice in choices:
        full = tokenizer(prompt_text + choice, add_special_tokens=False).input_ids
        shared = next((i for i, (a, b) in enumerate(zip(full, prompt_ids)) if a != b), min(len(full), len(prompt_ids)))
        shared = min(shared, len(full) - 1)  # a non-empty choice always adds at least one token
        pairs.append((full[:shared], full[shared:]))
    return pairs


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
        if not cfg.use_gpu:  # as many compute threads as CPUs reserved, in a replica or not
            import torch

            torch.set_num_threads(max(1, int(cfg.cpus_per_replica)))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="hf-engine")
        self.engine = HFEngine(resolve_model(cfg.model), cfg.max_model_len)
        self._generate.set_max_batch_size(cfg.max_batch_size)
        self._generate.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

        async def load(name: str) -> _LoadedAdapter:  # serve.multiplexed wants a plain function
            return await self._load_adapter(name)

        self._adapter = serve.multiplexed(max_num_models_per_replica=cfg.max_adapters_per_replica)(load)
        self._lock = threading.Lock()
        self._in_use: Counter[str] = Counter()
        self._evicted: set[str] = set()

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _load_adapter(self, name: str) -> "_LoadedAdapter":
        path = await self._call(resolve_adapter, self.cfg.adapters[name])
        await self._call(self.engine.add_adapter, name, path)
        return _LoadedAdapter(self, name)

    def evict(self, name: str) -> None:
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

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def _generate(self, jobs: list[Job]) -> AsyncIterator[list[Any]]:
        """One step's Deltas per job; a job's stream ends (StopIteration) right after its last."""
        decoding = await self._call(self.engine.start, jobs)
        left = [job.sampling.n for job in jobs]
        while not decoding.done:
            step = await self._call(decoding.step)
            yield step
            ended = False
            for j, deltas in enumerate(step):
                finished = sum(d.finish_reason is not None for d in deltas)
                left[j] -= finished
                ended |= finished > 0 and left[j] == 0
            if ended:
                yield [StopIteration if n == 0 else [] for n in left]

    async def _deltas(self, req: ChatRequest, prompt_ids: list[int]) -> AsyncIterator[list[Delta]]:
        async with self._adapter_for_request() as adapter:
            async for deltas in self._generate(Job(prompt_ids, req.sampling(), adapter)):
                yield deltas

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
