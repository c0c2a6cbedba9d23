"""Trace-generation throughput against a loopback OpenAI-compatible server with fixed latency L.

Measures calls/s as a fraction of the ideal C/L for
  - our async client (`synthpert.llm.client.LLMClient`) at concurrency C = 8, 64, 256;
  - a plain pool of 40 threads each making blocking calls with the sync openai client (what
    SynthPert's own code does), ideal 40/L;
  - with --pipeline: the whole `synthpert generate` path (teacher + judge actor pools streamed on
    Ray Data, cache, outputs) at C = 64 per endpoint: ideal 2C/L calls/s once the actors are up
    (both stages busy at once), measured over the server's first-to-last request.
The server runs in its own process (tests/fake_api.py) so it does not share our GIL. Every run
is bounded: a fixed number of calls per level (`--rounds` × C). Prints one JSON object.

    python bench/generate.py [--latency 1.0] [--rounds 6] [--pipeline]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import openai  # noqa: E402

from synthpert.config import EndpointConfig, load_config  # noqa: E402
from synthpert.llm.client import LLMClient  # noqa: E402
from tests.conftest import free_port  # noqa: E402


@contextlib.contextmanager
def fake_server(*args: str) -> Iterator[str]:
    """tests/fake_api.py in its own process (so it does not share our GIL) until exit; yields its base URL."""
    server = subprocess.Popen([sys.executable, "-m", "tests.fake_api", "--port", str(free_port()), *args],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        yield server.stdout.readline().split()[-1]
    finally:
        server.terminate()
        server.wait(10)


def stats_url(base_url: str) -> str:
    """The fake server's counters (tests/fake_api.py `_stats`)."""
    return base_url.removesuffix("/v1") + "/stats"


def _messages(tag: str, i: int) -> list[dict]:
    return [{"role": "user", "content": f"{tag} call {i}: is the gene upregulated?"}]


def _level(calls: int, wall: float, concurrency: int, latency: float) -> dict:
    rate = calls / wall
    return {"calls": calls, "wall_s": round(wall, 2), "calls_per_s": round(rate, 1),
            "ideal_per_s": round(concurrency / latency, 1), "fraction_of_ideal": round(rate * latency / concurrency, 3)}


async def _async_level(base_url: str, concurrency: int, calls: int) -> float:
    client = LLMClient(EndpointConfig(model="fake-teacher", max_concurrency=concurrency), base_url)
    await client.complete(_messages("warm", concurrency), scope={})  # connection set-up is not throughput
    start = time.perf_counter()
    results = await asyncio.gather(*(client.complete(_messages(f"async{concurrency}", i), scope={}) for i in range(calls)))
    wall = time.perf_counter() - start
    await client.aclose()
    assert all(r.error is None for r in results), [r.error for r in results if r.error][:3]
    return wall


def _thread_pool(base_url: str, threads: int, calls: int) -> float:
    client = openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=5)

    def call(i: int) -> str:
        reply = client.chat.completions.create(model="fake-teacher", messages=_messages("threads", i), max_tokens=512)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(call, range(threads)))  # warm the connections
        start = time.perf_counter()
        list(pool.map(call, range(threads, threads + calls)))
        return time.perf_counter() - start


def _pipeline(base_url: str, concurrency: int, rows: int, latency: float) -> dict:
    """The whole generate path; steady state from the server's view (first to last request + L)."""
    import httpx
    import ray

    from synthpert import generate

    httpx.delete(stats_url(base_url))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [
            f"generate.teacher.base_url={base_url}", "generate.teacher.model=fake-teacher",
            f"generate.judge.base_url={base_url}", "generate.judge.model=fake-judge",
            f"generate.teacher.max_concurrency={concurrency}", f"generate.judge.max_concurrency={concurrency}",
            "generate.require_answer_match=false", f"generate.output_dir={tmp}", f"data.limit={rows}",
            "data.knowledge.enabled=false", "tracking.enabled=false",
        ])
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        try:
            summary = generate.run(cfg, progress=False)
        finally:
            ray.shutdown()
    stats = httpx.get(stats_url(base_url)).json()
    steady = stats["requests"] / (stats["span_s"] + latency)
    return {"rows": rows, "concurrency_per_endpoint": concurrency, "wall_s_incl_startup": summary["wall_s"],
            "rows_per_s_incl_startup": summary["rows_per_s"], "calls": stats["requests"],
            "steady_calls_per_s": round(steady, 1), "ideal_calls_per_s": 2 * concurrency / latency,
            "steady_fraction_of_ideal": round(steady * latency / (2 * concurrency), 3),
            "max_in_flight": stats["max_in_flight"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=1.0, help="server latency L per call, seconds")
    parser.add_argument("--rounds", type=int, default=6, help="calls per level = rounds x concurrency")
    parser.add_argument("--levels", default="8,64,256")
    parser.add_argument("--threads", type=int, default=40)
    parser.add_argument("--pipeline", action="store_true", help="also time the whole generate path on Ray Data")
    args = parser.parse_args()
    with fake_server("--latency", str(args.latency)) as base_url:
        result = {"latency_s": args.latency, "rounds": args.rounds, "load_avg_1m": os.getloadavg()[0], "async_client": {}}
        for concurrency in map(int, args.levels.split(",")):
            calls = args.rounds * concurrency
            wall = asyncio.run(_async_level(base_url, concurrency, calls))
            result["async_client"][str(concurrency)] = _level(calls, wall, concurrency, args.latency)
        calls = args.rounds * args.threads
        result[f"thread_pool_{args.threads}"] = _level(calls, _thread_pool(base_url, args.threads, calls), args.threads, args.latency)
        threads_rate = result[f"thread_pool_{args.threads}"]["calls_per_s"]
        result["speedup_vs_thread_pool"] = {c: round(v["calls_per_s"] / threads_rate, 2) for c, v in result["async_client"].items()}
        if args.pipeline:
            result["pipeline"] = _pipeline(base_url, 64, args.rounds * 64 * 2, args.latency)
    result["load_avg_1m_end"] = os.getloadavg()[0]  # a shared machine: read the numbers with this
    print(json.dumps(result))


if __name__ == "__main__":
    main()
