"""Serving pieces without Serve: request validation, adapter sources (local + MLflow registry),
and the batched decoder against one-at-a-time decoding on the real embedded model."""

from __future__ import annotations

import pytest

from synthpert.config import LABELS
from synthpert.errors import SynthPertError
from synthpert.serving.adapters import check_adapter_names, max_lora_rank, parse_adapter_specs, resolve_adapter
from synthpert.serving.protocol import APIError, ChatRequest, Sampling, check_supported
from tests.serving_util import GRADE_SCHEMA, JUDGE, make_lora_adapters


@pytest.mark.unit
def test_adapter_specs_and_names():
    assert parse_adapter_specs(["a=/x", "b=models:/student@champion"]) == {"a": "/x", "b": "models:/student@champion"}
    with pytest.raises(SynthPertError, match="NAME=PATH_OR_URI"):
        parse_adapter_specs(["a"])
    with pytest.raises(SynthPertError, match="clashes"):
        check_adapter_names({"base": "/x"}, "base")


@pytest.mark.unit
def test_local_adapter_must_be_a_peft_folder(tmp_path):
    with pytest.raises(SynthPertError, match="adapter_config.json"):
        resolve_adapter(str(tmp_path))


@pytest.mark.unit
def test_request_rules():
    msgs = [{"role": "user", "content": "hi"}]
    assert ChatRequest(model="m", messages=msgs, stop="x").stop == ["x"]
    for bad in ({"top_logprobs": 2}, {"n": 2, "temperature": 0}, {"stop": ["a"] * 5}, {"guided_choice": ["a", "a"]},
                {"continue_final_message": True}, {"unknown": 1}):
        with pytest.raises(ValueError):
            ChatRequest(model="m", messages=msgs, **bad)


@pytest.fixture(scope="module")
def engine(embedded_model):
    import torch

    from synthpert.serving.hf_engine import HFEngine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a replica; on a busy shared box more threads only spin
    # float32: batched and cached decoding equal one-at-a-time only there; in bfloat16 (`auto` on
    # CPUs with avx512_bf16) batch shapes change the rounding, and now and then a greedy token
    yield HFEngine(embedded_model, 2048, dtype="float32")
    torch.set_num_threads(threads)


def _ids(engine, question):
    req = ChatRequest(model="base", messages=[{"role": "user", "content": question}])
    return engine.tokenizer(req.prompt_text(engine.tokenizer), add_special_tokens=False).input_ids


def _answer_prompt(tokenizer, ending):
    """A label-scoring prompt as predict sends it (the assistant turn continued after `<answer>`),
    plus `ending`."""
    req = ChatRequest(model="base", messages=[{"role": "user", "content": "Is gene B up, down or unchanged?"},
                                              {"role": "assistant", "content": "<think>Hard to say.</think><answer>" + ending}],
                      continue_final_message=True)
    return req.prompt_text(tokenizer)


def _alone(engine, ctx, cont):
    """log p(cont | ctx) from one plain forward pass over ctx + cont."""
    import torch

    with torch.inference_mode():
        logp = torch.log_softmax(engine.model(input_ids=torch.tensor([ctx + cont])).logits.float(), -1)[0]
    return float(sum(logp[len(ctx) - 1 + k, t] for k, t in enumerate(cont)))


def _decode(engine, jobs, late=(), finishes=None):
    """Texts per (key, job) (each job's last completion); `late` jobs join the running batch after
    two steps. `finishes`, when given, collects (key, job, index) -> (text, finish_reason)."""
    from synthpert.serving.hf_engine import Decoding

    decoding, texts, steps = Decoding(engine), {}, 0
    results = decoding.admit(jobs, "early")
    while results:
        for key, j, d in results:
            texts[key, j] = texts.get((key, j), "") + d.text
            if finishes is not None:
                text, _ = finishes.get((key, j, d.index), ("", None))
                finishes[key, j, d.index] = text + d.text, d.finish_reason
        steps += 1
        results = decoding.step() + (decoding.admit(list(late), "late") if steps == 2 and late else [])
    return texts


@pytest.mark.slow
def test_batched_greedy_equals_one_at_a_time(engine):
    from synthpert.serving.hf_engine import Job

    questions = ["What is the capital of France?", "Say hi.", "List three prime numbers.", "Name a colour."]
    jobs = [Job(_ids(engine, q), Sampling(max_tokens=6 + 3 * i, temperature=0)) for i, q in enumerate(questions)]
    # left padding, different lengths, rows finishing at different steps, two rows joining mid-flight
    batched = _decode(engine, jobs[:2], late=jobs[2:])
    alone = [_decode(engine, [job])["early", 0] for job in jobs]
    assert [batched["early", 0], batched["early", 1], batched["late", 0], batched["late", 1]] == alone


@pytest.mark.slow
def test_a_cancelled_request_leaves_the_batch(engine):
    """Serve keeps decoding for callers that have gone; a cancelled job must stop costing steps."""
    from synthpert.serving.hf_engine import Decoding, Job

    keep, drop, gone = (Job(_ids(engine, q), Sampling(max_tokens=12, temperature=0))
                        for q in ("Say hi.", "Name a colour.", "Count to ten."))
    gone.cancelled = True  # its client left while it was queued: no prefill, ended at once
    decoding = Decoding(engine)
    results = decoding.admit([keep, drop, gone], "g")
    assert [(j, d.finish_reason) for _, j, d in results if d.finish_reason] == [(2, "abort")]
    assert len(decoding.rows) == 2
    text = "".join(d.text for _, j, d in results if j == 0)
    drop.cancelled = True
    results = decoding.step()
    assert [(j, d.finish_reason) for _, j, d in results if j == 1] == [(1, "abort")]
    assert [row.job for row in decoding.rows] == [0]
    while results:
        text += "".join(d.text for _, j, d in results if j == 0)
        results = decoding.step()
    assert text == _decode(engine, [keep])["early", 0]


@pytest.mark.slow
def test_loglikelihood_ranks_the_obvious_answer(engine):
    from synthpert.serving.hf_engine import continuation_pairs

    req = ChatRequest(model="base", messages=[{"role": "user", "content": "What is the capital of France?"},
                                              {"role": "assistant", "content": "The capital of France is"}],
                      continue_final_message=True)
    text = req.prompt_text(engine.tokenizer)
    assert text.endswith("The capital of France is")  # continued, no new turn
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids
    pairs = continuation_pairs(engine.tokenizer, text, ids, [" Paris", " a banana"])
    paris, banana = engine.loglikelihoods(pairs, None)
    assert paris > banana


@pytest.mark.unit
@pytest.mark.parametrize("ending", ["s", " "])
def test_every_label_is_scored_after_the_same_context(embedded_model, ending):
    """One context for every label. After "<answer>s" the tokenizer merges "s" into "sup" +
    "regulated", which scored "upregulated" after one prompt token fewer than the other labels;
    a trailing space moves into every label (" up", as lm-evaluation-harness splits)."""
    from transformers import AutoTokenizer

    from synthpert.serving.hf_engine import continuation_pairs

    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    text = _answer_prompt(tokenizer, ending)
    ids = encode(text)
    assert any(encode(text + label)[: len(ids)] != ids for label in LABELS)  # a label merges with the prompt
    pairs = continuation_pairs(tokenizer, text, ids, list(LABELS))
    for (ctx, cont), label in zip(pairs, LABELS):
        assert ctx == encode(text.rstrip())
        assert tokenizer.decode(ctx + cont) == text + label


@pytest.mark.slow
def test_engine_scores_every_label_after_the_prompts_own_tokens(engine):
    """A label whose first characters merge with the prompt's last ("<answer>s" + "upregulated")
    is still scored as log p(label | the prompt's tokens), like the others."""
    from synthpert.serving.hf_engine import continuation_pairs

    text = _answer_prompt(engine.tokenizer, "s")
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids
    pairs = continuation_pairs(engine.tokenizer, text, ids, list(LABELS))
    assert [ctx for ctx, _ in pairs] == [ids] * len(LABELS)
    assert [engine.tokenizer.decode(cont) for _, cont in pairs] == list(LABELS)
    assert engine.loglikelihoods(pairs, None) == pytest.approx([_alone(engine, ids, cont) for _, cont in pairs], abs=1e-3)


@pytest.mark.slow
def test_registry_uri_resolves_to_the_adapter(tmp_path, monkeypatch, embedded_model):
    import mlflow

    (adapter,) = make_lora_adapters(embedded_model, [tmp_path / "student-adapter"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.setenv("SYNTHPERT_CACHE", str(tmp_path / "cache"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    mlflow.set_experiment("registry")  # not the experiment id an earlier test left active in this process

    class AdapterModel(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=AdapterModel(), artifacts={"adapter": str(adapter)},
                                       registered_model_name="student", pip_requirements=[])
    mlflow.MlflowClient().set_registered_model_alias("student", "champion", info.registered_model_version)
    path = resolve_adapter("models:/student@champion")
    assert (path / "adapter_config.json").read_text() == (adapter / "adapter_config.json").read_text()
    with pytest.raises(SynthPertError, match="cannot download"):
        resolve_adapter("models:/student@nope")


@pytest.mark.slow
def test_shared_prefix_loglikelihoods_equal_one_full_pass_per_choice(engine):
    """The prompt runs once for all choices: the scores must equal scoring each (context +
    continuation) alone, also when one context is a token shorter (any contexts sharing a prefix)."""
    ids = _ids(engine, "Is the gene upregulated?")
    yes, no = (engine.tokenizer(w, add_special_tokens=False).input_ids for w in (" yes", " not differentially expressed"))
    pairs = [(ids, yes), (ids, no), (ids[:-1], ids[-1:] + no)]
    assert engine.loglikelihoods(pairs, None) == pytest.approx([_alone(engine, *p) for p in pairs], abs=1e-3)


@pytest.mark.slow
def test_scoring_after_a_generation_reuses_its_kv_cache(engine):
    """guided_choice after the model's own text (the teacher's answer, the judge's grade, a label
    after the reasoning) prefills only the new tokens: same scores, with the cache hit."""
    from collections import OrderedDict

    from synthpert.serving.hf_engine import Decoding, Job, continuation_pairs

    prompt = _ids(engine, "Explain in one sentence why the sky is blue.")
    job = Job(prompt, Sampling(max_tokens=24, temperature=0))
    decoding, generated = Decoding(engine), ""
    results = decoding.admit([job], "g")
    while results:
        generated += "".join(d.text for _, _, d in results)
        results = decoding.step()
    text = engine.tokenizer.decode(prompt) + generated + "\nSo the answer is"
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids
    pairs = continuation_pairs(engine.tokenizer, text, ids, [" yes", " no", " scattering"])
    hits = engine.prefix_cache.hits
    cached = engine.loglikelihoods(pairs, None)
    assert engine.prefix_cache.hits == hits + 1
    saved, engine.prefix_cache.entries = engine.prefix_cache.entries, OrderedDict()
    try:
        full = engine.loglikelihoods(pairs, None)  # no cached prefix: the whole prompt runs
    finally:
        engine.prefix_cache.entries = saved
    assert engine.prefix_cache.hits == hits + 1 and cached == pytest.approx(full, abs=1e-3)
    engine.prefix_cache.drop("__base__")  # what unloading an adapter does to its entries
    assert not engine.prefix_cache.entries and engine.prefix_cache.bytes == 0
    assert engine.prefix_cache.longest("__base__", ids) == (0, None)




@pytest.mark.unit
def test_structured_output_and_parameter_rules():
    msgs = [{"role": "user", "content": "hi"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "grade", "schema": GRADE_SCHEMA, "strict": True}}
    req = ChatRequest(model="m", messages=msgs, response_format=fmt, user="u", metadata={"k": "v"}, store=False,
                      presence_penalty=-2, frequency_penalty=2, repetition_penalty=1.3, logit_bias={"7": -100})
    body = req.model_dump(exclude_none=True)
    assert body["response_format"] == fmt  # forwarded to vLLM with OpenAI's key names
    assert not {"user", "metadata", "store"} & set(body)  # accepted, dropped
    assert req.grammar()[0] == "json" and req.model_copy(update={"max_tokens": 4}).sampling().logit_bias == {7: -100}
    legacy = ChatRequest(model="m", messages=msgs, guided_json=GRADE_SCHEMA).model_dump(exclude_none=True)
    assert legacy["structured_outputs"] == {"json": GRADE_SCHEMA} and "guided_json" not in legacy  # vLLM 0.32's name
    assert ChatRequest(model="m", messages=msgs, guided_regex="a+").grammar() == ("regex", "a+")
    assert ChatRequest(model="m", messages=msgs, response_format={"type": "json_object"}).grammar() == ("json_object", "")
    assert ChatRequest(model="m", messages=msgs, response_format={"type": "text"}).grammar() is None
    for bad, field in (({"response_format": {"type": "xml"}}, "response_format"),
                       ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
                       ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
                       ({"guided_regex": "a", "guided_choice": ["a"]}, "one output constraint"),
                       ({"presence_penalty": 2.5}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
                       ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"a": 1}}, "logit_bias"),
                       ({"nonsense": 1}, "nonsense")):
        with pytest.raises(ValueError, match=field):
            ChatRequest(model="m", messages=msgs, **bad)
    check_supported({"modalities": ["text"], "tool_choice": "none", "user": "u"})
    for field, value in (("tools", [{"type": "function"}]), ("modalities", ["text", "audio"]), ("functions", [{}])):
        with pytest.raises(APIError, match=f"`{field}` is not supported") as err:
            check_supported({field: value})
        assert err.value.status == 400 and err.value.param == field


@pytest.mark.slow
def test_constrained_rows_always_parse_and_validate(engine):
    """Grammar-constrained rows (a schema sampled three times, any JSON object, a regex) decode in
    one batch with a free row; each constrained output is complete and valid, the free row is
    what it is alone."""
    import json
    import re

    import jsonschema

    from synthpert.serving.hf_engine import Job

    prompt = _ids(engine, JUDGE[0]["content"])

    def job(kind, source, **sampling):
        return Job(prompt, Sampling(**{"max_tokens": 96, "temperature": 0, **sampling}),
                   grammar=engine.grammars.compile(kind, source))

    regex = r"(yes|no), [0-9]{2}"
    jobs = [job("json", json.dumps(GRADE_SCHEMA), temperature=1.0, n=3, seed=5), job("json_object", ""),
            job("regex", regex), job("choice", json.dumps(["up", "down"])),
            Job(prompt, Sampling(max_tokens=12, temperature=0))]
    out = {}
    texts = _decode(engine, jobs, finishes=out)
    for i in range(3):
        text, finish = out["early", 0, i]
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), GRADE_SCHEMA)
    assert out["early", 1, 0][1] == "stop" and isinstance(json.loads(out["early", 1, 0][0]), dict)
    assert re.fullmatch(regex, texts["early", 2]) and texts["early", 3] in ("up", "down")
    assert texts["early", 4] == _decode(engine, [jobs[4]])["early", 0]
    with pytest.raises(APIError, match="json output constraint cannot be compiled: Unsupported type"):
        engine.grammars.compile("json", '{"type": "nope"}')


@pytest.mark.slow
def test_penalties_and_logit_bias_change_greedy_output(engine):
    """Each setting changes the greedy text; rows with different settings share one batch without
    touching each other (the plain row is what it is alone)."""
    from synthpert.serving.hf_engine import Job

    prompt = _ids(engine, "Write the word 'cat' ten times, separated by spaces.")
    banana = engine.tokenizer(" banana", add_special_tokens=False).input_ids[0]
    settings = [{}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 1.5},
                {"frequency_penalty": -2.0}, {"logit_bias": {banana: 100.0}}]
    jobs = [Job(prompt, Sampling(max_tokens=20, temperature=0, **kw)) for kw in settings]
    batch = _decode(engine, jobs)
    texts = [batch["early", j] for j in range(len(jobs))]
    plain = _decode(engine, jobs[:1])["early", 0]
    assert texts[0] == plain
    assert all(text != plain for text in texts[1:]), texts
    assert texts[-1].split()[:2] == ["banana", "banana"]


@pytest.mark.unit
def test_vllm_lora_rank_fits_the_listed_adapters(tmp_path):
    """vLLM pads every adapter to max_lora_rank: the smallest size it accepts that fits the local
    adapters (rank-8 adapters at 64 served 6-17x slower), 64 for a registry URI fetched later."""
    import json

    for name, rank in (("a", 8), ("b", 12)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": rank}))
    assert max_lora_rank({"a": str(tmp_path / "a")}) == 8
    assert max_lora_rank({"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}) == 16
    assert max_lora_rank({"a": str(tmp_path / "a"), "c": "models:/synthpert-student@champion"}) == 64



@pytest.mark.unit
@pytest.mark.parametrize("bound, handed_out", [("127.0.0.1", "127.0.0.1"), ("localhost", "127.0.0.1"), ("0.0.0.0", "10.0.1.5")])
def test_the_endpoint_is_handed_out_where_its_callers_reach_it(monkeypatch, bound, handed_out):
    """Serve's one proxy runs on the head: bound to every interface, its URL names the head's
    address (the Ray Data actors calling it may run on other nodes), not 127.0.0.1."""
    from types import SimpleNamespace

    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    from synthpert.serving import launch

    client = SimpleNamespace(http_config=SimpleNamespace(host=bound, port=8000))
    monkeypatch.setattr("ray.serve.context._get_global_client", lambda: client)
    monkeypatch.setattr("ray.nodes", lambda: [{"NodeManagerAddress": "10.0.1.9", "Alive": True, "Resources": {"CPU": 4.0}},
                                              {"NodeManagerAddress": "10.0.1.5", "Alive": True, "Resources": {HEAD_NODE_RESOURCE_NAME: 1.0}}])
    assert launch._proxy_url() == f"http://{handed_out}:8000"
