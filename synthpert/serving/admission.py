"""Admission at the ingress: every request waits its turn unless its expected wait is too long.

Serve's own `max_queued_requests` refuses at a fixed queue length with a constant Retry-After, so
clients spend their retries in the first seconds of a burst that would have drained in a minute.
Here the engine deployment's queue is unbounded and the ingress decides, by time instead of by
length: a request is admitted while (requests ahead of it) / (measured drain rate) fits
`serve.max_queue_wait_s`; beyond it, 503 with a Retry-After of when it would fit. Admitted
requests queue at the engine's handle, where Serve's autoscaler counts them (queued + ongoing).
Hand-written: no library measures a drain rate for a request queue.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from synthpert.serving.protocol import APIError


class Admission:
    """In-flight requests and the rate they complete at, per second of busy time.

    The rate counts only time with requests in flight, so an idle minute does not make the next
    burst look slow; it is taken over the last `window` completions (and at most `horizon_s` of
    busy time), so it follows the current load. Until `min_samples` completions are measured the
    rate is unknown and requests are admitted: the first burst is what measures it.
    """

    def __init__(self, max_wait_s: float, window: int = 64, horizon_s: float = 120.0, min_samples: int = 4,
                 clock: Callable[[], float] = time.monotonic):
        self.max_wait_s, self.horizon_s, self.min_samples, self.clock = max_wait_s, horizon_s, min_samples, clock
        self.in_flight = 0
        self.draining = False
        self._busy = 0.0  # cumulative seconds with at least one request in flight
        self._since = clock()  # when _busy was last brought up to date
        self._done: deque[float] = deque(maxlen=window)  # busy time at each completion

    def _tick(self) -> None:
        now = self.clock()
        if self.in_flight:
            self._busy += now - self._since
        self._since = now

    def rate(self) -> float | None:
        """Completed requests per busy second, or None while too few were measured."""
        self._tick()
        while self._done and self._busy - self._done[0] > self.horizon_s:
            self._done.popleft()
        if len(self._done) < self.min_samples:
            return None
        span = self._busy - self._done[0]
        return (len(self._done) - 1) / span if span > 0 else None

    def expected_wait_s(self) -> float | None:
        """How long a request arriving now should take to finish: the requests ahead of it,
        itself included, at the drain rate (None: not measured yet)."""
        rate = self.rate()
        return None if rate is None else (self.in_flight + 1) / rate

    def check(self) -> None:
        """Raise a 503 if this request should not wait (draining, or its wait would be too long)."""
        if self.draining:
            raise APIError(503, "the server is shutting down", type_="server_unavailable",
                           headers={"Retry-After": str(max(1, math.ceil(self.max_wait_s)))})
        rate, wait = self.rate(), self.expected_wait_s()
        if rate is None or wait is None or wait <= self.max_wait_s:
            return
        retry = self.retry_after_s(rate)
        raise APIError(503, f"the server is at capacity: {self.in_flight} requests ahead, draining at "
                            f"{rate:.2f}/s, an expected wait of {wait:.0f} s over the {self.max_wait_s:.0f} s "
                            f"bound; retry in {retry} s", type_="server_overloaded",
                       headers={"Retry-After": str(retry)})

    def retry_after_s(self, rate: float | None = None) -> int:
        """Whole seconds until enough of the queue has drained that a new request would fit."""
        rate = rate if rate is not None else self.rate()
        if not rate:
            return 1
        excess = self.in_flight + 1 - rate * self.max_wait_s
        return max(1, math.ceil(excess / rate))

    def admit(self) -> None:
        """Admit one request (or raise 503); it counts in flight until `release`."""
        self.check()
        self._tick()
        self.in_flight += 1

    def release(self, completed: bool) -> None:
        """The request has left; a completed one counts towards the drain rate."""
        self._tick()
        self.in_flight -= 1
        if completed:
            self._done.append(self._busy)
