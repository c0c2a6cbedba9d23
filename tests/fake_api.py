"""A loopback OpenAI-compatible chat-completions server that misbehaves on purpose.

The one allowed fake: it stands in for a paid frontier API, which cannot be reached here. It
speaks the real wire format (the official `openai` client talks to it over HTTP) and injects
429 (with Retry-After), 500, hangs past the client's timeout, dropped connections, malformed
outputs and answers cut off by hidden reasoning at chosen rates. Which fault hits which request is a pure function of (seed, request
content, attempt number), so a test can replay the server's decisions. It counts every request
and every answered call per request content: the crash-resume test uses those counters to prove
no finished call was made twice. Its latency is fixed, or lognormal around a median (`latency_sigma`:
a heavy tail as a real provider's). Given `api_key`, it answers any request without that bearer key
with OpenAI's 401, and counts every request by path first (`paths`), refused ones too. Used by tests (in a thread) and bench/generate.py (in a
subprocess: `python -m tests.fake_api --port P --latency L [--latency-sigma S] [--rate-429 R]`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

from aiohttp import web

LABELS = ("upregulated", "downregulated", "not differentially expressed")
GRADES = ("excellent", "good", "average", "bad", "terrible")
MALFORMED = "Sure! Here is my analysis, in prose, without any of the requested tags."


def content_key(model: str, messages: list[dict]) -> str:
    """What the server counts calls by: the model and the exact messages."""
    return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()[:20]


def uniform(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts (the server's dice)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class Faults:
    """Fault rates. Transient ones are drawn per attempt; `dead`/`malformed` stick to a content."""

    rate_429: float = 0.0
    retry_after_s: float = 0.3
    rate_500: float = 0.0
    rate_hang: float = 0.0  # answer only after `hang_s` (set it past the client's timeout)
    hang_s: float = 3.0
    rate_drop: float = 0.0  # close the connection without an answer
    rate_dead: float = 0.0  # this content always gets 500: the row must end up errored
    rate_malformed: float = 0.0  # this content gets a 200 whose text ignores the format
    # this content gets what a reasoning model answers when its thinking fills max_completion_tokens:
    # finish_reason length, no content, every completion token billed as hidden reasoning
    rate_cut: float = 0.0
    seed: int = 0

    def transient(self, key: str, attempt: int) -> str | None:
        u = uniform(self.seed, key, attempt)
        for name, rate in (("429", self.rate_429), ("500", self.rate_500), ("hang", self.rate_hang), ("drop", self.rate_drop)):
            if u < rate:
                return name
            u -= rate
        return None

    def dead(self, key: str) -> bool:
        return uniform(self.seed, key, "dead") < self.rate_dead

    def malformed(self, key: str) -> bool:
        return uniform(self.seed, key, "malformed") < self.rate_malformed

    def cut(self, key: str) -> bool:
        return uniform(self.seed, key, "cut") < self.rate_cut


def default_reply(body: dict, key: str) -> str:
    """A plausible answer: one of the allowed choices (our `guided_choice` or vLLM's
    `structured_outputs.choice`), a grade for a judge model, else a trace."""
    choices = body.get("guided_choice") or (body.get("structured_outputs") or {}).get("choice")
    if choices:
        return choices[int(uniform(key, "choice") * len(choices))]
    if "judge" in body["model"]:
        return GRADES[int(uniform(key, "grade") * len(GRADES))]
    prompt = "\n".join(m["content"] for m in body["messages"] if m["role"] != "assistant")
    label = true_label(prompt) if uniform(key, "right") < 0.8 else LABELS[int(uniform(key, "label") * 3)]
    return f"<think>Knocking down the perturbed gene changes its targets; reasoning {key[:6]}.</think><answer>{label}</answer>"


def true_label(prompt: str) -> str:
    """The label the teacher prompt discloses (the last one it names), else a fixed guess."""
    found = {label: prompt.rfind(label) for label in LABELS}
    best = max(found, key=found.get)
    return best if found[best] >= 0 else LABELS[2]


def finished_keys(cache_path: Path, before: float | None = None) -> set[str]:
    """Server-side keys of the calls a call cache holds (what must never be asked again); `before`:
    only those committed before that time.time() (a node loss's moment, say). Read from the
    cache's SQLite file itself, as an auditor would, not through the product's own reader."""
    with contextlib.closing(sqlite3.connect(cache_path)) as db:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'calls'").fetchone():
            return set()  # a live run that has only just created the file
        rows = db.execute("SELECT record FROM calls WHERE created < ?", (math.inf if before is None else before,)).fetchall()
    records = [json.loads(record) for (record,) in rows]
    return {content_key(r["request"]["model"], r["request"]["messages"]) for r in records}


@dataclass
class FakeAPI:
    """Run with `with FakeAPI(port, faults) as api:`; `api.base_url` ends in /v1."""

    port: int
    faults: Faults = field(default_factory=Faults)
    latency_s: float = 0.0  # the median when latency_sigma > 0
    latency_sigma: float = 0.0  # sigma of log(latency): 0 fixed; 0.6 puts the p99 at 4x the median
    host: str = "127.0.0.1"
    api_key: str | None = None  # None: any key (or none) is accepted
    paths: Counter = field(default_factory=Counter)
    requests: dict[str, list[tuple[float, str]]] = field(default_factory=lambda: defaultdict(list))
    answered: Counter = field(default_factory=Counter)
    answered_at: list[float] = field(default_factory=list)  # monotonic time of each answer (a bench's throughput)
    authorization: set[str] = field(default_factory=set)
    in_flight: int = 0
    max_in_flight: int = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def answered_total(self) -> int:
        return sum(self.answered.values())

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        self.paths[request.path] += 1
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            error = {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}
            return web.json_response({"error": error}, status=401)
        return await handler(request)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.authorization.add(request.headers.get("Authorization", ""))
        key = content_key(body["model"], body["messages"])
        attempt = len(self.requests[key])
        fault = "dead" if self.faults.dead(key) else self.faults.transient(key, attempt)
        self.requests[key].append((time.monotonic(), fault or "ok"))
        if self.latency_s:
            await asyncio.sleep(self.latency(key, attempt))
        if fault == "429":
            return web.json_response(
                {"error": {"message": "rate limited", "type": "rate_limit"}},
                status=429,
                headers={"Retry-After": str(self.faults.retry_after_s)},
            )
        if fault in ("500", "dead"):
            return web.json_response({"error": {"message": "internal error", "type": "server"}}, status=500)
        if fault == "drop":
            request.transport.close()
            return web.Response()  # never reaches the client
        if fault == "hang":
            await asyncio.sleep(self.faults.hang_s)
            return web.json_response({"error": {"message": "too late"}}, status=504)
        text = MALFORMED if self.faults.malformed(key) else default_reply(body, key)
        prompt_tokens = sum(len(m["content"]) for m in body["messages"]) // 4 + 1
        completion_tokens = len(text) // 4 + 1
        finish, details = "stop", {"reasoning_tokens": 0}
        if self.faults.cut(key):
            text, finish = None, "length"
            completion_tokens = body.get("max_completion_tokens") or body["max_tokens"]
            details["reasoning_tokens"] = completion_tokens
        self.answered[key] += 1
        self.answered_at.append(time.monotonic())
        return web.json_response(
            {
                "id": f"chatcmpl-{key}-{attempt}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                    "completion_tokens_details": details,
                },
            }
        )

    def latency(self, key: str, attempt: int) -> float:
        """This attempt's delay: the median times a seeded lognormal factor."""
        if not self.latency_sigma:
            return self.latency_s
        z = NormalDist().inv_cdf(min(max(uniform(self.faults.seed, key, attempt, "latency"), 1e-9), 1 - 1e-9))
        return self.latency_s * math.exp(self.latency_sigma * z)

    async def _stats(self, request: web.Request) -> web.Response:
        """What a benchmark in another process needs: request count, their time span, peak concurrency,
        answered calls and the contents answered more than once; `?times=1`: each answer's time."""
        if request.method == "DELETE":
            self.requests.clear()
            self.max_in_flight = 0
        times = [t for attempts in self.requests.values() for t, _ in attempts]
        span = max(times) - min(times) if times else 0.0
        stats = {"requests": len(times), "span_s": span, "max_in_flight": self.max_in_flight, "answered": len(self.answered_at),
                 "repeated": [key for key, n in self.answered.items() if n > 1]}
        if request.query.get("times"):
            stats["answered_at"] = self.answered_at
        return web.json_response(stats)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in ("fake-teacher", "fake-judge")]})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20, middlewares=[self._auth])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/stats", self._stats)
        return app

    async def _serve(self, on_ready) -> None:
        runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=False)
        await runner.setup()
        await web.TCPSite(runner, self.host, self.port, backlog=4096).start()
        self._stop = asyncio.Event()
        on_ready()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> "FakeAPI":
        started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(started.set),), daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("fake API did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per call (the median under --latency-sigma)")
    parser.add_argument("--latency-sigma", type=float, default=0.0, help="lognormal latency: sigma of its log")
    parser.add_argument("--rate-429", type=float, default=0.0, help="share of attempts answered 429 with Retry-After")
    parser.add_argument("--retry-after", type=float, default=0.3, help="the 429s' Retry-After, seconds")
    args = parser.parse_args()
    faults = Faults(rate_429=args.rate_429, retry_after_s=args.retry_after)
    api = FakeAPI(port=args.port, faults=faults, latency_s=args.latency, latency_sigma=args.latency_sigma)
    import uvloop  # the stand-in provider should not be the bottleneck of a benchmark

    uvloop.run(api._serve(lambda: print("ready", api.base_url, flush=True)))


if __name__ == "__main__":
    main()
