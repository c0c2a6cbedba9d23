"""A Ray Data actor that turns each row of a batch into one LLM call, all rows of the batch at once.

Ray Data gives each actor whole batches; the actor's LLMClient (one per actor, built inside the
actor's event loop) bounds the calls in flight to the actor's share of the endpoint's budget.
Subclasses say what to ask for a row (`process`); a row always comes back, with the call's
outcome in columns named `<prefix>_…`, so rows in = rows out whatever the endpoint does.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any

import pyarrow as pa
from pydantic import SecretStr

from synthpert.config import EndpointConfig
from synthpert.llm.client import CallResult, LLMClient

# An I/O-bound actor needs almost no CPU; more would starve Ray Data's own tasks on small nodes.
ACTOR_NUM_CPUS = 0.05
USAGE_FIELDS = [
    ("called", pa.bool_()),  # a request was sent in this run (not answered from the cache)
    ("cached", pa.bool_()),
    ("error", pa.string()),
    ("tokens_in", pa.int64()),
    ("tokens_out", pa.int64()),
    ("latency_s", pa.float64()),
    ("cost_usd", pa.float64()),
    ("retries", pa.int64()),
]


class LLMActor:
    """Base of the teacher and judge stages (Ray Data `map_batches` callable classes)."""

    prefix = "llm"
    fields: list[tuple[str, pa.DataType]] = []  # the columns `process` adds, besides the usage ones

    @classmethod
    def output_fields(cls) -> list[tuple[str, pa.DataType]]:
        return [*cls.fields, *((f"{cls.prefix}_{name}", kind) for name, kind in USAGE_FIELDS)]

    def __init__(self, endpoint: EndpointConfig, base_url: str, api_key: SecretStr | None, share: float, cache: Any,
                 identity: Any = None, max_cost_usd: float | None = None):
        """`cache`: the stage's call cache owner (llm.cache.cache_owner), on the driver's node."""
        self.client = LLMClient(
            endpoint,
            base_url,
            api_key.get_secret_value() if api_key is not None else None,
            share=share,
            cache=cache,
            identity=identity,
            max_cost_usd=max_cost_usd,
        )

    async def __call__(self, batch: pa.Table) -> pa.Table:
        self._loop = asyncio.get_running_loop()
        rows = await asyncio.gather(*(self.process(row) for row in batch.to_pylist()))
        schema = batch.schema
        for name, kind in self.output_fields():
            schema = schema.append(pa.field(name, kind))
        return pa.Table.from_pylist(rows, schema=schema)

    def __del__(self) -> None:
        """Ray Data drops the UDF when the pool shuts down: close the HTTP session in its loop."""
        loop = getattr(self, "_loop", None)
        if loop is not None and loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.client.aclose(), loop).result(timeout=5)

    async def process(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def outcome(self, result: CallResult | None) -> dict[str, Any]:
        """The call's columns; None = no call was needed for this row."""
        called = result is not None and not result.cached and not result.refused
        result = result or CallResult()
        return {
            f"{self.prefix}_called": called,
            f"{self.prefix}_cached": result.cached,
            f"{self.prefix}_error": result.error,
            f"{self.prefix}_tokens_in": result.prompt_tokens,
            f"{self.prefix}_tokens_out": result.completion_tokens,
            f"{self.prefix}_latency_s": result.latency_s,
            f"{self.prefix}_cost_usd": result.cost_usd,
            f"{self.prefix}_retries": result.retries,
        }


def map_with_actors(
    dataset, actor_cls: type[LLMActor], endpoint: EndpointConfig, actors: int, batch_size: int, blocks: int, **kwargs
):
    """Add an actor-pool stage: `actors` actors split the endpoint's concurrency and rate budget.

    Each actor gets 1/actors of max_concurrency, requests_per_minute and tokens_per_minute, so
    the endpoint's limits hold across the pool. An actor runs enough batches at once to fill its
    share, plus one so a slow row at the end of a batch does not idle the others.
    """
    import ray.data

    actors = max(1, min(actors, endpoint.max_concurrency, blocks))  # no idle actors for a small input
    slots = max(1, endpoint.max_concurrency // actors)
    concurrent_batches = math.ceil(slots / batch_size) + 1
    return dataset.map_batches(
        actor_cls,
        fn_constructor_kwargs={"endpoint": endpoint, "share": 1.0 / actors, **kwargs},
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=ACTOR_NUM_CPUS,
        compute=ray.data.ActorPoolStrategy(
            size=actors,
            max_concurrent_calls_per_actor=concurrent_batches,
            max_tasks_in_flight_per_actor=2 * concurrent_batches,
        ),
    )


def report_batch(batch, prefixes: tuple[str, ...]) -> None:
    """A finished batch (pandas) to the pipeline's console: rows, calls sent, tokens, cost, rows with an error."""
    from synthpert import console

    column = lambda name: sum(float(batch[f"{p}_{name}"].fillna(0).sum()) for p in prefixes)  # noqa: E731
    errors = sum(batch[f"{p}_error"].notna() for p in prefixes)
    console.update(rows=len(batch), calls=int(column("called")), tokens=int(column("tokens_in") + column("tokens_out")),
                   cost_usd=column("cost_usd"), errors=int((errors > 0).sum()) if len(batch) else 0)
