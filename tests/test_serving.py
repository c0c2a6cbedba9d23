"""The OpenAI-compatible endpoint on real Ray Serve (transformers engine, embedded SmolLM2),
driven over loopback HTTP by the official `openai` client. Serve starts once for the module,
with an API key in the environment (so every request here also proves auth works)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from synthpert.config import ServeConfig
from tests.serving_util import GRADE_SCHEMA, JUDGE, make_lora_adapters

pytestmark = pytest.mark.serve

KEY = "test-key-not-a-secret"
LABELS = ["upregulated", "downregulated", "not differentially expressed"]
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, embedded_model):
    root = tmp_path_factory.mktemp("adapters")
    ad1, ad2 = make_lora_adapters(embedded_model, [root / "ad1", root / "ad2"])
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    return {"ad1": str(ad1), "ad2": str(ad2), "broken": str(broken)}


@pytest.fixture(scope="module")
def endpoint(adapters):
    from synthpert.serving import running

    cfg = ServeConfig(engine="transformers", adapters=adapters, max_adapters_per_replica=2, max_batch_size=16, max_ongoing_requests=24)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SYNTHPERT_API_KEY", KEY)  # replicas inherit it from the cluster this starts
        with running(cfg) as base_url:
            yield base_url


@pytest.fixture(scope="module")
def client(endpoint):
    return openai.OpenAI(base_url=endpoint, api_key=KEY, max_retries=0, timeout=300)


def chat(client, model="base", messages=QUESTION, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=model, messages=messages, **kwargs)


def test_model_list_names_base_and_adapters(client):
    assert [m.id for m in client.models.list().data] == ["base", "ad1", "ad2", "broken"]


def test_chat_completion_has_text_and_usage(client):
    out = chat(client, temperature=0)
    assert out.object == "chat.completion" and out.model == "base"
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content.strip()
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 5 and 0 < out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_same_seed_same_text_and_stop_strings(client):
    one, two = (chat(client, temperature=1.0, seed=7, max_tokens=16).choices[0].message.content for _ in range(2))
    assert one == two
    greedy = chat(client, temperature=0, max_tokens=30).choices[0].message.content
    cut = greedy.split()[2]
    stopped = chat(client, temperature=0, max_tokens=30, stop=[cut]).choices[0]
    assert stopped.finish_reason == "stop" and cut not in stopped.message.content
    assert greedy.startswith(stopped.message.content)


def test_streaming_matches_non_streaming(client):
    full = chat(client, temperature=0, max_tokens=16).choices[0].message.content
    chunks = list(chat(client, temperature=0, max_tokens=16, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_n_completions_differ_under_sampling(client):
    out = chat(client, n=3, temperature=1.0, seed=3, max_tokens=16)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) > 1
    assert out.usage.completion_tokens >= 3  # summed over the three completions


def test_logprobs_and_top_logprobs(client):
    out = chat(client, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3).choices[0]
    entries = out.logprobs.content
    assert len(entries) == 6 or out.finish_reason == "stop"
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
    assert "".join(e.token for e in entries) == out.message.content


def test_guided_choice_is_always_a_member_with_scores(client):
    messages = [{"role": "user", "content": "After knocking down gene A in K562 cells, is gene B up, down or unchanged?"},
                {"role": "assistant", "content": "<think>It is hard to say.</think><answer>"}]
    seen = set()
    for seed in range(4):
        out = chat(client, messages=messages, temperature=1.0, seed=seed,
                   extra_body={"guided_choice": LABELS, "continue_final_message": True, "add_generation_prompt": False})
        answer = out.choices[0].message.content
        assert answer in LABELS
        scores = out.model_extra["choice_logprobs"]
        assert set(scores) == set(LABELS) and all(s < 0 for s in scores.values())
        seen.add(answer)
    greedy = chat(client, messages=messages, temperature=0,
                  extra_body={"guided_choice": LABELS, "continue_final_message": True})
    scores = greedy.model_extra["choice_logprobs"]
    assert greedy.choices[0].message.content == max(scores, key=scores.get)


def test_guided_choice_streams_one_answer(client):
    chunks = list(chat(client, stream=True, temperature=0, extra_body={"guided_choice": ["yes", "no"]}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) in ("yes", "no")


def test_adapters_change_output_and_share_one_replica(client):
    outs = {m: chat(client, model=m, temperature=0, max_tokens=12) for m in ("base", "ad1", "ad2")}
    texts = {m: o.choices[0].message.content for m, o in outs.items()}
    assert texts["ad1"] != texts["base"] and texts["ad2"] != texts["base"] and texts["ad1"] != texts["ad2"]
    # back to the first adapter (LRU of 2 per replica): same output as before
    assert chat(client, model="ad1", temperature=0, max_tokens=12).choices[0].message.content == texts["ad1"]


def test_broken_adapter_fails_alone(client):
    with pytest.raises(openai.InternalServerError) as err:
        chat(client, model="broken")
    assert "broken" in err.value.message
    assert chat(client, temperature=0).choices[0].message.content  # the base model is still up
    assert chat(client, model="ad2", temperature=0).choices[0].message.content


def test_unknown_model_is_404_listing_models(client):
    with pytest.raises(openai.NotFoundError) as err:
        chat(client, model="nope")
    assert "nope" in err.value.message and "ad1" in err.value.message and "base" in err.value.message


@pytest.mark.parametrize("bad", [{"temperature": 5}, {"n": 0}, {"n": 2, "temperature": 0}, {"top_logprobs": 2},
                                 {"bogus_param": 1},
                                 {"extra_body": {"guided_choice": []}}])
def test_bad_parameters_are_400(client, bad):
    kwargs = dict(bad.pop("extra_body", {}))
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, extra_body={**kwargs, **bad})
    assert err.value.body["type"] == "invalid_request_error"


CAT = [{"role": "user", "content": "Write the word 'cat' ten times, separated by spaces."}]


def test_structured_outputs_parse_and_validate(client):
    """What LangChain's with_structured_output(method="json_schema") sends; json_object streamed;
    an unknown format or a broken constraint is a 400 that says which."""
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "grade", "schema": GRADE_SCHEMA, "strict": True}}
    replies = chat(client, messages=JUDGE, max_tokens=96, temperature=1.0, seed=3, n=2, response_format=fmt)
    for choice in replies.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), GRADE_SCHEMA)
    chunks = chat(client, messages=JUDGE, max_tokens=96, temperature=0, stream=True, response_format={"type": "json_object"})
    assert isinstance(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), dict)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        chat(client, response_format={"type": "xml"})
    with pytest.raises(openai.BadRequestError, match="regex output constraint cannot be compiled"):
        chat(client, extra_body={"guided_regex": "(unclosed"})


def test_penalties_and_logit_bias_change_greedy_output(client, embedded_model):
    from transformers import AutoTokenizer

    banana = AutoTokenizer.from_pretrained(embedded_model)(" banana", add_special_tokens=False).input_ids[0]
    plain = chat(client, messages=CAT, max_tokens=20, temperature=0).choices[0].message.content
    for kwargs in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 1.5}}):
        assert chat(client, messages=CAT, max_tokens=20, temperature=0, **kwargs).choices[0].message.content != plain
    biased = chat(client, messages=CAT, max_tokens=4, temperature=0, logit_bias={str(banana): 100})
    assert biased.choices[0].message.content.split()[0] == "banana"


def test_unsupported_features_are_400_and_client_fields_ignored(client):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert "`tools` is not supported" in err.value.message and err.value.param == "tools"
    plain = chat(client, temperature=0).choices[0].message.content
    assert chat(client, temperature=0, user="u1", metadata={"run": "x"}, store=False, service_tier="auto",
                prompt_cache_key="k").choices[0].message.content == plain


def test_structured_judge_grades_through_json_schema(endpoint, tmp_path):
    """generate.judge_structured: one call, a {critique, grade} JSON verdict, its grade kept."""
    from pydantic import SecretStr

    from synthpert import prompts
    from synthpert.config import GRADES, load_config
    from synthpert.judge import JudgeActor
    from synthpert.llm.cache import CallCache

    g = load_config(None, ["generate.judge_structured=true", "generate.judge.max_tokens=256"]).generate
    row = {"tuple_id": "t1", "cell_line": "k562", "pert": "TP53", "gene": "MDM2", "label": "downregulated",
           "context": None, "teacher_error": None, "answer": "downregulated",
           "reasoning": "TP53 activates MDM2 transcription, so knocking TP53 down lowers MDM2."}

    async def judged():
        actor = JudgeActor(list(GRADES), True, prompts.PromptSet.from_config(g), structured=True, endpoint=g.judge,
                           base_url=endpoint, api_key=SecretStr(KEY), share=1.0, cache=CallCache(tmp_path / "calls.sqlite"))
        try:
            return await actor.process(row)
        finally:
            await actor.client.aclose()

    out = asyncio.run(judged())
    assert out["judge_error"] is None and out["reject_reason"] is None, out
    assert json.loads(out["judge_output"])["grade"] == out["grade"] and out["grade"] in GRADES


def test_prompt_longer_than_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, messages=[{"role": "user", "content": "gene " * 3000}])
    assert "context" in err.value.message


def test_malformed_body_is_400_json(endpoint):
    r = httpx.post(f"{endpoint}/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_auth_required_except_healthz(endpoint):
    assert httpx.get(f"{endpoint.removesuffix('/v1')}/healthz").status_code == 200
    assert httpx.get(f"{endpoint}/models").status_code == 401
    assert httpx.get(f"{endpoint}/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=endpoint, api_key="wrong", max_retries=0).models.list()


def test_32_concurrent_requests_all_answered(endpoint):
    async def main():
        client = openai.AsyncOpenAI(base_url=endpoint, api_key=KEY, max_retries=0, timeout=300)
        outs = await asyncio.gather(*[
            client.chat.completions.create(model="base", max_tokens=4, temperature=0, messages=[
                {"role": "user", "content": f"Say the number {i}."}]) for i in range(32)])
        await client.close()
        return outs

    outs = asyncio.run(main())
    assert len(outs) == 32 and all(o.choices[0].message.content for o in outs)


def test_200_concurrent_default_clients_all_answered(endpoint):
    """The openai client's defaults (2 retries, 600 s timeout): nothing is lost, requests wait."""
    async def main():
        client = openai.AsyncOpenAI(base_url=endpoint, api_key=KEY)
        outs = await asyncio.gather(*[
            client.chat.completions.create(model="base", max_tokens=2, temperature=0, messages=[
                {"role": "user", "content": f"Say the number {i}."}]) for i in range(200)], return_exceptions=True)
        await client.close()
        return outs

    outs = asyncio.run(main())
    failed = [o for o in outs if isinstance(o, BaseException)]
    assert not failed, f"{len(failed)} of 200 failed, e.g. {failed[0]!r}"


def metric_samples(endpoint) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{endpoint.removesuffix('/v1')}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_count_requests_tokens_ttft_and_engine(endpoint, client):
    def value(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0)

    before = metric_samples(endpoint)
    chat(client, temperature=0, max_tokens=5)
    chat(client, model="ad1", temperature=0, max_tokens=5)
    list(chat(client, temperature=0, max_tokens=5, stream=True))
    with pytest.raises(openai.NotFoundError):
        chat(client, model="nope")
    after = metric_samples(endpoint)
    moved = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    route = "/v1/chat/completions"
    assert moved("synthpert_requests_total", route=route, model="base", status="200") == 2
    assert moved("synthpert_requests_total", route=route, model="ad1", status="200") == 1
    assert moved("synthpert_requests_total", route=route, model="", status="404") == 1
    assert moved("synthpert_completion_tokens_total", model="base") >= 2
    assert moved("synthpert_prompt_tokens_total", model="ad1") > 5
    assert moved("synthpert_time_to_first_token_seconds_count", model="base", stream="true") == 1
    assert moved("synthpert_time_to_first_token_seconds_count", model="base", stream="false") == 1
    assert value(after, "synthpert_queue_depth") == 0 and value(after, "synthpert_drain_rate") > 0
    engine = {labels: v for (name, labels), v in after.items() if name == "synthpert_batch_size_count"}
    assert engine and all(v > 0 for v in engine.values())
    assert sum(v for (name, _), v in after.items() if name == "synthpert_adapter_loads_total") >= 1  # ad1 at least


def test_over_capacity_is_503_with_retry_after_from_drain_rate(endpoint):
    """A bound of 5 s of expected wait: once the drain rate is measured, a burst is partly refused,
    each refusal with a Retry-After computed from the queue and the rate."""
    from synthpert.serving import running

    tight = ServeConfig(engine="transformers", max_batch_size=8, max_ongoing_requests=8, max_queue_wait_s=5)
    with running(tight, name="tight") as base_url:  # beside the module's app, on its Ray and Serve
        warm = openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=300)
        for _ in range(4):  # measures the drain rate (admitted whole: no rate before the 4th completion)
            chat(warm, max_tokens=8)

        async def main():
            async with httpx.AsyncClient(timeout=300, headers={"Authorization": f"Bearer {KEY}"}) as http:
                body = {"model": "base", "max_tokens": 8, "messages": QUESTION}
                return await asyncio.gather(*[http.post(f"{base_url}/chat/completions", json=body) for _ in range(60)])

        responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    # how many fit depends on the rate the warm-up measured (low on a loaded box); some never do
    assert set(codes) <= {200, 503} and codes.count(503) >= 1, codes
    for rejected in (r for r in responses if r.status_code == 503):
        message = json.loads(rejected.text)["error"]["message"]
        assert int(rejected.headers["retry-after"]) >= 1 and "draining at" in message and "5 s bound" in message
