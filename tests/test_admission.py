"""Admission by expected wait and the metrics' text format, without Serve (a fake clock)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from synthpert.serving.admission import Admission
from synthpert.serving.metrics import EngineMetrics, IngressMetrics
from synthpert.serving.protocol import APIError

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def served(adm: Admission, clock: Clock, n: int, every_s: float) -> None:
    """n requests one after another, each taking `every_s`: a drain rate of 1 / every_s."""
    for _ in range(n):
        adm.admit()
        clock.now += every_s
        adm.release(completed=True)


def test_unmeasured_rate_admits_and_measured_rate_bounds_the_wait():
    clock = Clock()
    adm = Admission(max_wait_s=10, clock=clock)
    for _ in range(500):  # no completion measured yet: the first burst is admitted whole
        adm.admit()
    assert adm.in_flight == 500 and adm.rate() is None
    for _ in range(500):
        adm.release(completed=False)  # failures measure nothing

    served(adm, clock, 8, every_s=0.5)  # 2 requests per busy second
    clock.now += 3600  # an idle hour does not lower the rate
    assert adm.rate() == pytest.approx(2.0)
    for _ in range(20):  # the 20th waits 20 / 2 = 10 s: still fits
        adm.admit()
    with pytest.raises(APIError) as refused:
        adm.admit()  # the 21st would wait 10.5 s
    assert refused.value.status == 503 and adm.in_flight == 20
    # Retry-After: when enough has drained for it to fit ((20 + 1 - 2 * 10) / 2 = 0.5 -> 1 s)
    assert refused.value.headers["Retry-After"] == "1" and "2.00/s" in refused.value.message

    adm.max_wait_s = 1  # the same queue against a tighter bound: (21 - 2) / 2 = 9.5 s
    with pytest.raises(APIError) as refused:
        adm.admit()
    assert refused.value.headers["Retry-After"] == "10"


def test_rate_follows_busy_time_and_draining_refuses():
    clock = Clock()
    adm = Admission(max_wait_s=100, clock=clock)
    served(adm, clock, 8, every_s=0.5)
    adm.admit()
    clock.now += 30  # a request that has been running for 30 s: the engine drains slower than measured
    assert adm.rate() < 0.3
    adm.draining = True
    with pytest.raises(APIError) as refused:
        adm.admit()
    assert refused.value.status == 503 and "shutting down" in refused.value.message


def test_metrics_render_labels_and_engine_snapshot():
    metrics = IngressMetrics()
    metrics.requests.labels("/v1/chat/completions", "base", "200").inc(3)
    metrics.usage("base", {"prompt_tokens": 10, "completion_tokens": 4})
    engine = EngineMetrics("r1")
    for rows in (1, 3, 3, 40):
        engine.step(rows)
    engine.adapter_loads, engine.adapter_evictions = 2, 1
    metrics.engine["r1"] = engine.snapshot()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.render(5, 2.5).decode()) for s in family.samples}
    assert samples[("synthpert_requests_total", (("model", "base"), ("route", "/v1/chat/completions"),
                                                 ("status", "200")))] == 3
    assert samples[("synthpert_prompt_tokens_total", (("model", "base"),))] == 10
    assert samples[("synthpert_queue_depth", ())] == 5 and samples[("synthpert_drain_rate", ())] == 2.5
    assert samples[("synthpert_adapter_loads_total", (("replica", "r1"),))] == 2
    assert samples[("synthpert_batch_size_bucket", (("le", "4.0"), ("replica", "r1")))] == 3
    assert samples[("synthpert_batch_size_count", (("replica", "r1"),))] == 4
    assert samples[("synthpert_batch_size_sum", (("replica", "r1"),))] == 47
