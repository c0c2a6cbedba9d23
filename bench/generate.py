"""Trace-generation throughput against a loopback OpenAI-compatible server with fixed latency L.

Measures calls/s as a fraction of the ideal C/L for
  - our async client (`synthpert.llm.client.LLMClient`) at concurrency C = 8, 64, 256;
  - a plain pool of 40 threads each making blocking calls with the sync openai client (what
    SynthPert's own code does), ideal 40/L;
  - with --pipeline: the whole `synthpert generate` path (teacher + judge actor pools streamed on
    Ray Data, cache, outputs) at C = 64 per endpoint, ideal C/L rows/s once the actors are up.
The server runs in its own process (tests/fake_api.py) so it does not share our GIL. Every run
is bounded: a fixed number of calls per level (`--rounds` × C). Prints one JSON object.

    python bench/generate.py [--latency 1.0] [--rounds 6] [--pipeline]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import openai  # noqa: E402

from synthpert.config import EndpointConfig, load_config  # noqa: E402
from synthpert.llm.client import LLMClient  # noqa: E402
from tests.conftest import free_port  # noqa: E402


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
    import ray

    from synthpert import generate

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
    ideal_wall = rows * latency / concurrency + latency  # both stages busy at once, plus one row's judge call
    return {"rows": rows, "concurrency_per_endpoint": concurrency, "wall_s": summary["wall_s"],
            "rows_per_s": summary["rows_per_s"], "ideal_wall_s": round(ideal_wall, 2),
            "fraction_of_ideal_incl_startup": round(ideal_wall / summary["wall_s"], 3),
            "calls": summary["teacher_calls"] + summary["judge_calls"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=1.0, help="server latency L per call, seconds")
    parser.add_argument("--rounds", type=int, default=6, help="calls per level = rounds x concurrency")
    parser.add_argument("--levels", default="8,64,256")
    parser.add_argument("--threads", type=int, default=40)
    parser.add_argument("--pipeline", action="store_true", help="also time the whole generate path on Ray Data")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tests.fake_api", "--port", str(port), "--latency", str(args.latency)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        base_url = server.stdout.readline().split()[-1]
        result = {"latency_s": args.latency, "rounds": args.rounds, "async_client": {}}
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
    finally:
        server.terminate()
        server.wait(10)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
