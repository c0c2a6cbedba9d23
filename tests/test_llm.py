"""LLM client and call cache against a real loopback HTTP server that the official openai client talks to."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from synthpert.config import EndpointConfig, ServeConfig
from synthpert.llm.cache import CallCache
from synthpert.llm.client import LLMClient
from tests.conftest import REPO, free_port
from tests.fake_api import FakeAPI, Faults, content_key


def _messages(i: int) -> list[dict]:
    return [{"role": "system", "content": "You are a biologist."}, {"role": "user", "content": f"question {i}: upregulated?"}]


async def _ask(client: LLMClient, n: int):
    try:
        return await asyncio.gather(*(client.complete(_messages(i), scope={"row": i}) for i in range(n)))
    finally:
        await client.aclose()


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_faults_are_retried_per_retry_after_and_final_errors_recorded(tmp_path):
    faults = Faults(rate_429=0.2, retry_after_s=0.4, rate_500=0.15, rate_hang=0.04, hang_s=2.0, rate_drop=0.08,
                    rate_dead=0.05, rate_malformed=0.1, seed=3)
    endpoint = EndpointConfig(model="fake-teacher", max_concurrency=16, max_retries=3, timeout_s=0.8,
                              price_in_per_mtok=2.0, price_out_per_mtok=10.0)
    with FakeAPI(free_port(), faults, latency_s=0.02) as api:
        results = asyncio.run(_ask(LLMClient(endpoint, api.base_url, cache=CallCache(tmp_path / "c.sqlite")), 80))
        log = {key: list(attempts) for key, attempts in api.requests.items()}
    assert len(results) == 80  # nothing raised, nothing lost
    seen = {"429": 0, "500": 0, "hang": 0, "drop": 0, "dead": 0}
    for i, result in enumerate(results):
        attempts = log[content_key("fake-teacher", _messages(i))]
        outcomes = [outcome for _, outcome in attempts]
        for outcome in outcomes:
            seen[outcome] = seen.get(outcome, 0) + 1
        assert result.retries == len(attempts) - 1
        if result.error is None:  # the last attempt was answered; every earlier one was a fault
            assert outcomes[-1] == "ok" and "ok" not in outcomes[:-1]
            assert result.prompt_tokens > 0 and result.completion_tokens > 0
            assert result.cost_usd == pytest.approx((2.0 * result.prompt_tokens + 10.0 * result.completion_tokens) / 1e6)
        else:  # retries exhausted: max_retries + 1 attempts, all faults, the last one named
            assert len(attempts) == endpoint.max_retries + 1 and "ok" not in outcomes
            last = {"429": "RateLimitError: Error code: 429", "500": "InternalServerError: Error code: 500",
                    "dead": "InternalServerError: Error code: 500", "hang": "APITimeoutError",
                    "drop": "Server disconnected"}[outcomes[-1]]
            assert last in result.error, result.error
        for (t0, outcome), (t1, _) in zip(attempts, attempts[1:]):
            if outcome == "429":  # Retry-After honoured
                assert t1 - t0 >= faults.retry_after_s - 0.02
    assert all(seen[kind] > 0 for kind in ("429", "500", "hang", "drop", "dead")), seen
    assert any(r.text and "<think>" not in r.text for r in results)  # malformed answers come back as text
    assert sum(r.error is not None for r in results) >= seen["dead"] // (endpoint.max_retries + 1) > 0


@pytest.mark.unit
def test_cache_answers_finished_calls_without_a_request(tmp_path):
    endpoint = EndpointConfig(model="fake-teacher", max_concurrency=8, max_retries=1)
    with FakeAPI(free_port(), Faults(rate_dead=0.2, seed=1)) as api:
        cache = CallCache(tmp_path / "c.sqlite")
        first = asyncio.run(_ask(LLMClient(endpoint, api.base_url, cache=cache), 30))
        answered = api.answered_total()
        again = asyncio.run(_ask(LLMClient(endpoint, api.base_url, cache=cache), 30))
        assert api.answered_total() == answered  # nothing finished was asked again
        errored = [i for i, r in enumerate(first) if r.error]
        assert errored and all(again[i].error and not again[i].cached for i in errored)  # errors are retried next run
        assert all(again[i].cached and again[i].text == first[i].text for i in range(30) if i not in errored)
        hotter = endpoint.model_copy(update={"temperature": 1.0})  # other sampling parameters: another call
        asyncio.run(_ask(LLMClient(hotter, api.base_url, cache=cache), 1))
        assert api.answered_total() == answered + (0 if 0 in errored else 1)


@pytest.mark.unit
def test_an_answer_cut_off_by_hidden_reasoning_is_an_error_with_its_cost(tmp_path):
    """An o-series model counts its hidden reasoning in max_completion_tokens: one that thinks until
    they are spent ends `length` with no content, and is billed for them. It is asked with the
    reasoning's room on top of max_tokens; a cut call comes back as an error that carries its usage
    and cost (what the budget and the stage's spend count), and is not cached: a re-run asks again."""
    endpoint = EndpointConfig(model="fake-teacher", max_tokens=100, reasoning_tokens=300, max_retries=0,
                              price_in_per_mtok=2.0, price_out_per_mtok=10.0)
    with FakeAPI(free_port(), Faults(rate_cut=0.4, seed=2)) as api:
        cache = CallCache(tmp_path / "c.sqlite")
        first = asyncio.run(_ask(LLMClient(endpoint, api.base_url, cache=cache), 12))
        cut = [i for i, r in enumerate(first) if r.error]
        assert 0 < len(cut) < 12 and all(first[i].text for i in range(12) if i not in cut)
        for result in (first[i] for i in cut):
            assert result.text is None and result.completion_tokens == 400  # max_tokens + reasoning_tokens, all spent thinking
            assert result.error.startswith("cut off before any answer: 400 completion tokens, 400 of them hidden reasoning, "
                                           "filled max_completion_tokens=400")
            assert result.cost_usd == pytest.approx((2.0 * result.prompt_tokens + 10.0 * 400) / 1e6)
        answered = api.answered_total()
        again = asyncio.run(_ask(LLMClient(endpoint, api.base_url, cache=cache), 12))
        assert api.answered_total() == answered + len(cut)  # only the cut calls are asked again
        assert all(again[i].cached == (i not in cut) for i in range(12))


@pytest.mark.unit
def test_a_reasoning_model_is_sent_no_sampling_settings():
    """o-series models refuse any temperature or top_p but their default: the teacher as a greedy
    predictor (temperature 0) would get a 400 on every call."""
    o_series = EndpointConfig(model="o4-mini", temperature=0.0, top_p=0.9, max_tokens=100, reasoning_tokens=300)
    assert LLMClient(o_series, "http://127.0.0.1:9/v1").sampling() == {"max_completion_tokens": 400, "seed": 0}
    plain = o_series.model_copy(update={"reasoning_tokens": 0})
    assert LLMClient(plain, "http://127.0.0.1:9/v1").sampling() == {"temperature": 0.0, "top_p": 0.9, "max_completion_tokens": 100, "seed": 0}


@pytest.mark.unit
def test_the_cache_key_names_who_answers():
    """Same model name, same question: another address, or our own endpoint serving other weights
    (whatever port it is on this time), is another call."""
    ask = ([{"role": "user", "content": "q"}], {"tuple": "t"})
    endpoint = EndpointConfig(model="base")
    key = lambda url, identity=None: LLMClient(endpoint, url, identity=identity).key(*ask)  # noqa: E731
    assert key("http://127.0.0.1:1/v1") != key("http://127.0.0.2:1/v1")
    ours, other = ServeConfig().identity(), ServeConfig(model="/models/other").identity()
    assert key("http://127.0.0.1:1/v1", ours) == key("http://127.0.0.1:2/v1", ours) != key("http://127.0.0.1:1/v1", other)


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_concurrency_and_rate_caps_hold(tmp_path):
    with FakeAPI(free_port(), latency_s=0.15) as api:
        asyncio.run(_ask(LLMClient(EndpointConfig(model="m", max_concurrency=8), api.base_url, share=0.5), 24))
        assert api.max_in_flight == 4  # the client's share of the endpoint's concurrency, fully used
    with FakeAPI(free_port()) as api:
        start = time.monotonic()
        asyncio.run(_ask(LLMClient(EndpointConfig(model="m", requests_per_minute=480), api.base_url, share=0.5), 10))
        times = sorted(t for attempts in api.requests.values() for t, _ in attempts)
        # 240/min for this client: a 4-request bucket, then one every 0.25 s
        assert times[-1] - start >= (10 - 4) * 0.25 - 0.05
        assert sum(t < start + 0.5 for t in times) <= 4 + 2
    with FakeAPI(free_port()) as api:
        start = time.monotonic()
        tpm = EndpointConfig(model="m", tokens_per_minute=6000, max_tokens=40)  # 100 tokens/s
        asyncio.run(_ask(LLMClient(tpm, api.base_url), 6))  # ~50 tokens reserved per call
        assert time.monotonic() - start >= (6 * 48 - 100) / 100 - 0.1


WRITER = """
import sys
from synthpert.llm.cache import CallCache
cache = CallCache(sys.argv[1])
for i in range(int(sys.argv[3])):
    cache.put(f"{sys.argv[2]}-{i}", "m", {"text": "x" * 200, "i": i})
    print(i, flush=True)
"""


OPENER = """
import sys, time
from pathlib import Path
from synthpert.llm.cache import CallCache
Path(sys.argv[2]).touch()
while not Path(sys.argv[3]).exists():
    time.sleep(0.001)
CallCache(sys.argv[1]).put(sys.argv[2], "m", {})
"""


@pytest.mark.slow  # several interpreters started at once
def test_processes_opening_a_new_cache_at_the_same_instant_all_wait_their_turn(tmp_path):
    """Ray actors start together: sqlite refuses a concurrent switch to WAL without waiting."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for round_ in range(6):
        path, go = tmp_path / f"calls{round_}.sqlite", tmp_path / f"go{round_}"
        ready = [tmp_path / f"ready{round_}-{i}" for i in range(8)]
        procs = [subprocess.Popen([sys.executable, "-c", OPENER, str(path), str(r), str(go)], stderr=subprocess.PIPE, text=True, env=env) for r in ready]
        deadline = time.monotonic() + 120
        while not all(r.exists() for r in ready) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()  # all eight open the same new file at once
        errors = [p.communicate(timeout=120)[1] for p in procs if p.wait(timeout=120) != 0]
        assert not errors, errors[0]
        assert len(CallCache(path)) == 8


@pytest.mark.slow  # writer processes, one killed with SIGKILL
def test_cache_is_durable_under_kill_9_and_concurrent_writers(tmp_path):
    path = tmp_path / "calls.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    steady = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "steady", "300"], stdout=subprocess.PIPE, text=True, env=env)
    victim = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "victim", "1000000"], stdout=subprocess.PIPE, text=True, env=env)
    confirmed = -1
    for line in victim.stdout:  # kill it mid-stream, after it has confirmed some writes
        confirmed = int(line)
        if confirmed >= 200:
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait()
    assert confirmed >= 200, "the victim never wrote"
    assert steady.wait(60) == 0
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    keys = {k for (k,) in db.execute("SELECT key FROM calls")}
    assert {f"steady-{i}" for i in range(300)} <= keys
    assert {f"victim-{i}" for i in range(confirmed + 1)} <= keys  # every confirmed write survived the kill
    cache = CallCache(path)
    assert cache.get("victim-0") == {"text": "x" * 200, "i": 0}
    cache.put("victim-0", "m", {"text": "other"})  # a second writer of the same call changes nothing
    assert cache.get("victim-0")["text"] == "x" * 200
