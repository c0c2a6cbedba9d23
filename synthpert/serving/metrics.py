"""Prometheus metrics of the endpoint, served at `GET /metrics` on the API's own port.

Why prometheus_client in the ingress rather than `ray.util.metrics`: Ray's metrics leave through
each node's metrics agent on a port of its own (Serve's `serve_*` metrics go there and stay on),
which a user must first find; `/metrics` next to `/v1` is scraped like any other service. Every
request passes the ingress, so it sees requests, queue depth, time to first token and tokens.
What only an engine replica sees (decode batch size, adapter loads and evictions) is counted in
the replica (`EngineMetrics`, transformers engine; vLLM exports its own through Ray) and fetched
by the scrape through the engine's handle, with a short timeout so that a saturated engine never
blocks a scrape. A scrape reaches one engine replica: with several, each keeps its own series
(label `replica`) at its latest snapshot.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class IngressMetrics:
    """The ingress's metrics, in a registry of its own (one per ingress, so apps never collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = {"registry": self.registry, "namespace": "synthpert"}
        self.requests = Counter("requests", "Requests answered, by route, model and HTTP status",
                                ["route", "model", "status"], **labels)
        self.queue_depth = Gauge("queue_depth", "Requests admitted and not finished (waiting or running)", **labels)
        self.drain_rate = Gauge("drain_rate", "Measured completions per busy second (0: not measured yet)", **labels)
        self.ttft = Histogram("time_to_first_token_seconds", "From arrival to the first generated text (streams); "
                              "to the whole answer otherwise", ["model", "stream"], buckets=TTFT_BUCKETS, **labels)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens of answered requests", ["model"], **labels)
        self.completion_tokens = Counter("completion_tokens", "Generated tokens of answered requests", ["model"],
                                         **labels)
        self.engine: dict[str, dict[str, Any]] = {}  # replica -> its latest snapshot
        self.registry.register(self)  # collect(): the engine replicas' snapshots

    def usage(self, model: str, usage: dict[str, Any] | None) -> None:
        if usage:
            self.prompt_tokens.labels(model).inc(usage.get("prompt_tokens") or 0)
            self.completion_tokens.labels(model).inc(usage.get("completion_tokens") or 0)

    def collect(self) -> Any:
        """The engine replicas' counters as of their latest snapshots."""
        loads = CounterMetricFamily("synthpert_adapter_loads", "LoRA adapters loaded by an engine replica",
                                    labels=["replica"])
        evictions = CounterMetricFamily("synthpert_adapter_evictions", "LoRA adapters evicted (LRU) by an engine replica",
                                        labels=["replica"])
        batch = HistogramMetricFamily("synthpert_batch_size", "Rows per decode step of an engine replica",
                                      labels=["replica"])
        for replica, snap in sorted(self.engine.items()):
            loads.add_metric([replica], snap["adapter_loads"])
            evictions.add_metric([replica], snap["adapter_evictions"])
            batch.add_metric([replica], [(floatToGoString(b), c) for b, c in snap["batch_buckets"]], snap["batch_sum"])
        yield from (loads, evictions, batch)

    def render(self, queue_depth: int, rate: float | None) -> bytes:
        self.queue_depth.set(queue_depth)
        self.drain_rate.set(rate or 0.0)
        return generate_latest(self.registry)


class EngineMetrics:
    """What an engine replica counts; `snapshot()` is what the ingress's scrape fetches."""

    def __init__(self, replica: str):
        self.replica = replica
        self.adapter_loads = self.adapter_evictions = 0
        self.batch_counts = [0] * (len(BATCH_BUCKETS) + 1)
        self.batch_sum = 0

    def step(self, rows: int) -> None:
        self.batch_sum += rows
        self.batch_counts[next((i for i, b in enumerate(BATCH_BUCKETS) if rows <= b), len(BATCH_BUCKETS))] += 1

    def snapshot(self) -> dict[str, Any]:
        cumulative, total = [], 0
        for bound, count in zip([*BATCH_BUCKETS, float("inf")], self.batch_counts):
            total += count
            cumulative.append((bound, total))
        return {"replica": self.replica, "adapter_loads": self.adapter_loads,
                "adapter_evictions": self.adapter_evictions, "batch_buckets": cumulative, "batch_sum": self.batch_sum}
