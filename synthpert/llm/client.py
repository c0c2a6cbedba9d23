"""Async calls to any OpenAI-compatible endpoint: bounded, rate-capped, retried, cached, accounted.

- Concurrency: at most `share * max_concurrency` calls in flight from one client (a Ray actor
  holds one client; the actors of a stage split the endpoint's budget, see `share`).
- Rate caps: `requests_per_minute` is checked before every HTTP attempt, retries included (an
  httpx request hook); `tokens_per_minute` before every call, with the prompt estimated at 4
  characters a token plus max_completion_tokens (a provider counts what is reserved, not what is used).
  Both are aiolimiter leaky buckets holding at most one second's worth, so no burst of a whole
  minute's budget at start.
- Retries: the openai client's own machinery (honours Retry-After / retry-after-ms, otherwise
  exponential backoff with jitter; retries 408/409/429/5xx, timeouts and dropped connections)
  up to `max_retries`; after that the error is returned on the result, never raised.
- Budget (`max_cost_usd`): before a request is sent its worst case (prompt estimate +
  max_completion_tokens at the prices) is reserved against the run's counter in the cache file; a call that would pass
  the budget is refused (BUDGET_REFUSED, no request); the reservation is settled at the actual usage.
- Cache: a finished call (any 2xx answer, malformed or not: it was paid for) is written to the
  CallCache before it is returned; a key already there is answered from it without a request.
  One cut off before any answer (finish_reason `length`, no content: a reasoning model that
  thought until max_completion_tokens) is an error that keeps its usage and cost, not cached.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import time
from typing import Any

import httpx2
import openai
from aiolimiter import AsyncLimiter
from openai.types.chat import ChatCompletion

from synthpert.config import EndpointConfig
from synthpert.errors import SynthPertError
from synthpert.llm.cache import AwaitedCache, cache_key

CHARS_PER_TOKEN = 4
MAX_ERROR_CHARS = 400
BUDGET_REFUSED = "budget: not sent, max_cost_usd reached"

# Counts the HTTP attempts of the call running in the current task (set by `complete`).
_attempts: contextvars.ContextVar[list[int]] = contextvars.ContextVar("synthpert_llm_attempts")


@dataclasses.dataclass
class CallResult:
    """One logical call: the text or the final error, with its usage and price."""

    text: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cost_usd: float = 0.0
    retries: int = 0
    cached: bool = False
    refused: bool = False  # not sent: the budget would have been passed
    extra: dict = dataclasses.field(default_factory=dict)  # the response's non-OpenAI fields (choice_logprobs)


    @classmethod
    def merge(cls, *parts: "CallResult") -> "CallResult":
        """One logical call made of several requests: usage summed, the first error kept, text of the last."""
        return cls(
            text=parts[-1].text,
            error=next((p.error for p in parts if p.error is not None), None),
            prompt_tokens=sum(p.prompt_tokens for p in parts),
            completion_tokens=sum(p.completion_tokens for p in parts),
            latency_s=sum(p.latency_s for p in parts),
            cost_usd=sum(p.cost_usd for p in parts),
            retries=sum(p.retries for p in parts),
            cached=all(p.cached for p in parts),
            refused=any(p.refused for p in parts),
            extra=parts[-1].extra,
        )


_RECORDED = ("text", "prompt_tokens", "completion_tokens", "latency_s", "cost_usd", "retries", "extra")


def budget_stop(setting: str, limit_usd: float | None, spent_usd: float, refused: int, rows: int) -> SynthPertError:
    """The one line a stage ends with when its budget refused calls (its output is written first)."""
    return SynthPertError(
        f"budget {setting}=${limit_usd} reached after ${spent_usd:.4f}: {refused} of {rows} rows not finished; "
        "re-run with a higher budget to finish them (answered calls come from the cache)"
    )


def price(endpoint: EndpointConfig, prompt_tokens: int, completion_tokens: int) -> float:
    """USD for one call at the endpoint's per-million-token prices."""
    return (prompt_tokens * endpoint.price_in_per_mtok + completion_tokens * endpoint.price_out_per_mtok) / 1e6


def prompt_tokens_estimate(messages: list[dict]) -> int:
    """Prompt tokens at CHARS_PER_TOKEN characters a token (what the rate cap and the budget reserve)."""
    return sum(len(m["content"]) for m in messages) // CHARS_PER_TOKEN + 1


def _leaky_bucket(per_minute: float | None) -> AsyncLimiter | None:
    if not per_minute:
        return None
    per_second = per_minute / 60.0
    capacity = max(1.0, per_second)
    return AsyncLimiter(capacity, capacity / per_second)


class LLMClient:
    """One endpoint's calls from one event loop (one per Ray actor; made lazily inside the loop)."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        base_url: str,
        api_key: str | None = None,
        share: float = 1.0,
        cache: Any = None,  # a CallCache, or its owner actor's handle (llm.cache.cache_owner)
        identity: Any = None,
        max_cost_usd: float | None = None,
    ):
        self.endpoint = endpoint
        self.base_url = base_url
        # who answers, for the cache key: the address, unless the caller knows better (our own
        # endpoint's address changes from run to run; what it serves is its identity)
        self.identity = base_url if identity is None else identity
        self.concurrency = max(1, int(endpoint.max_concurrency * share + 1e-9))
        self.cache = AwaitedCache(cache) if cache is not None else None
        self.max_cost_usd = max_cost_usd
        if max_cost_usd is not None and cache is None:
            raise ValueError("a budget needs the call cache: it holds the run's shared cost counter")
        self._api_key = api_key
        self._rpm = _leaky_bucket(endpoint.requests_per_minute and endpoint.requests_per_minute * share)
        self._tpm = _leaky_bucket(endpoint.tokens_per_minute and endpoint.tokens_per_minute * share)
        self._client: openai.AsyncOpenAI | None = None
        self._slots: asyncio.Semaphore | None = None

    def sampling(self) -> dict[str, Any]:
        """The request's sampling parameters (part of the cache key).

        `max_completion_tokens` is the current OpenAI name (o-series models refuse `max_tokens`;
        vLLM and our endpoint take both), with room for hidden reasoning. temperature/top_p at the
        API default 1.0 are left out, and any value for a model with hidden reasoning: reasoning
        models reject them even at their default, and any other value (the greedy predictor's 0).
        """
        e = self.endpoint
        params = {"max_completion_tokens": e.completion_limit(), "seed": e.seed}
        if not e.reasoning_tokens:
            params |= {k: v for k, v in (("temperature", e.temperature), ("top_p", e.top_p)) if v != 1.0}
        return {k: v for k, v in params.items() if v is not None}

    def _openai(self) -> openai.AsyncOpenAI:
        if self._client is None:
            limits = httpx2.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
            http = openai.DefaultAioHttpClient(limits=limits, event_hooks={"request": [self._before_attempt]})
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=self._api_key or "EMPTY",  # servers without auth still need a token shape
                max_retries=self.endpoint.max_retries,
                timeout=self.endpoint.timeout_s,
                http_client=http,
            )
            self._slots = asyncio.Semaphore(self.concurrency)
        return self._client

    async def _before_attempt(self, request: httpx2.Request) -> None:
        """Runs before every HTTP attempt, retries included."""
        counter = _attempts.get(None)
        if counter is not None:
            counter[0] += 1
        if self._rpm is not None:
            await self._rpm.acquire()

    def _describe(self, exc: Exception) -> str:
        text = f"{type(exc).__name__}: {exc}"
        if exc.__cause__ is not None:  # e.g. which transport failure the SDK reports as a timeout
            text += f" ({type(exc.__cause__).__name__}: {exc.__cause__})"
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text[:MAX_ERROR_CHARS]

    def key(self, messages: list[dict], scope: dict, extra_body: dict | None = None) -> str:
        """The cache key: what is asked (scope: tuple, template, version), of which endpoint and model, how."""
        return cache_key(
            scope=scope, endpoint=self.identity, model=self.endpoint.model, sampling=self.sampling(), messages=messages, extra_body=extra_body
        )

    async def complete(self, messages: list[dict], scope: dict, extra_body: dict | None = None) -> CallResult:
        """One chat completion, from the cache when it was made before; errors come back on the result."""
        key = self.key(messages, scope, extra_body)
        if self.cache is not None and (hit := await self.cache("get", key)) is not None:
            return CallResult(**{f: hit[f] for f in _RECORDED if f in hit}, cached=True)
        client = self._openai()
        prompt_estimate = prompt_tokens_estimate(messages)
        async with self._slots:
            if self._tpm is not None:
                await self._tpm.acquire(min(prompt_estimate + self.endpoint.completion_limit(), self._tpm.max_rate))
            reserved = price(self.endpoint, prompt_estimate, self.endpoint.completion_limit())
            if self.max_cost_usd is not None and not await self.cache("reserve", reserved, self.max_cost_usd):
                return CallResult(error=BUDGET_REFUSED, refused=True)
            result = await self._send(client, messages, extra_body)
            if self.max_cost_usd is not None:
                await self.cache("settle", result.cost_usd - reserved)
        if self.cache is not None and result.error is None:
            request = {"model": self.endpoint.model, "messages": messages, "extra_body": extra_body}
            record = {f: getattr(result, f) for f in _RECORDED} | {"request": request}
            await self.cache("put", key, self.endpoint.model, record)
        return result

    async def _send(self, client: openai.AsyncOpenAI, messages: list[dict], extra_body: dict | None) -> CallResult:
        """The HTTP request with the SDK's retries; its usage priced, or its final error."""
        counter = [0]
        _attempts.set(counter)
        start = time.perf_counter()
        try:  # the SDK's own request path and retries, minus its costly re-validation of our params
            completion = await client.post(
                "/chat/completions",
                body={"model": self.endpoint.model, "messages": messages, **self.sampling(), **(extra_body or {})},
                cast_to=ChatCompletion,
            )
        except openai.APIError as exc:
            return CallResult(
                error=self._describe(exc), latency_s=time.perf_counter() - start, retries=max(0, counter[0] - 1)
            )
        latency = time.perf_counter() - start
        usage = completion.usage
        prompt_tokens = usage.prompt_tokens if usage else 0
        completion_tokens = usage.completion_tokens if usage else 0
        choice = completion.choices[0] if completion.choices else None
        result = CallResult(
            text=(choice.message.content or "") if choice else "",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_s=latency,
            cost_usd=price(self.endpoint, prompt_tokens, completion_tokens),
            retries=max(0, counter[0] - 1),
            extra=dict(completion.model_extra or {}),
        )
        if choice is not None and choice.finish_reason == "length" and not choice.message.content:
            details = usage.completion_tokens_details if usage else None
            hidden = f", {details.reasoning_tokens} of them hidden reasoning," if details and details.reasoning_tokens is not None else ""
            result.text, result.error = None, (
                f"cut off before any answer: {completion_tokens} completion tokens{hidden} filled max_completion_tokens="
                f"{self.endpoint.completion_limit()} (finish_reason length); raise reasoning_tokens")
        return result

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
