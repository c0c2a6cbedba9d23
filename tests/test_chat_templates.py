"""Chat templates of every shape the paper's model family ships: training learns the trace as the
teacher wrote it, a scored answer follows its reasoning, and the pre-flight says how (or fails in
one line). The embedded SmolLM2 tokenizer carries each template, so the token ids are real."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from synthpert import preflight
from synthpert.chat import OWN, TEMPLATE, assistant_spans
from synthpert.config import LABELS, load_config
from synthpert.errors import SynthPertError
from synthpert.predict import answer_prefix
from synthpert.prompts import parse_answer, parse_trace, student_messages
from synthpert.serving.protocol import ChatRequest
from synthpert.train.collate import IGNORE, collate, pad_token_id, tokenize_chat, tokenize_frame
from tests.conftest import REPO

# DeepSeek-R1-Distill-Llama-8B's tokenizer_config.json chat_template, current revision: an assistant
# turn keeps only what follows `</think>`, and the generation prompt opens `<think>\n` itself.
R1_CURRENT = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)
# Its first revision: the same, but the generation prompt stops at `<｜Assistant｜>`.
R1_OLD = R1_CURRENT.replace("{{'<｜Assistant｜><think>\\n'}}{% endif %}", "{{'<｜Assistant｜>'}}{% endif %}")
assert R1_OLD != R1_CURRENT

# Qwen3's: the reasoning of a turn after the last user query is moved into its own reformatted
# block, that of earlier turns dropped.
QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

R1_EOS = "<｜end▁of▁sentence｜>"
THINK_TOKENS = ["<think>", "</think>"]  # added (not special) tokens of R1's and Qwen3's tokenizers
R1_TOKENS = ["<｜User｜>", "<｜Assistant｜>", R1_EOS]  # special tokens of R1's
# shape: (template or None for the embedded one, how training renders, the end of an assistant turn)
SHAPES = {
    "plain": (None, TEMPLATE, "<|im_end|>\n"),
    "r1-old": (R1_OLD, OWN, R1_EOS),
    "r1-current": (R1_CURRENT, OWN, R1_EOS),
    "qwen3": (QWEN3, OWN, "<|im_end|>\n"),
}
REASONING = "P7 is a transcriptional activator of G7, so losing it lowers G7."
TRACE = f"<think>{REASONING}</think><answer>downregulated</answer>"
ROW = {"cell_line": "k562", "pert": "P7", "gene": "G7", "label": "downregulated"}


def carrying(embedded_model, template: str | None):
    """The embedded tokenizer with `template` as its chat template (its own when None) and the
    tokens the template's model family has for its markers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    if template is not None:
        tokenizer.chat_template = template
        tokenizer.add_tokens(THINK_TOKENS)
        if R1_EOS in template:
            tokenizer.add_tokens(R1_TOKENS, special_tokens=True)
    return tokenizer


def learnt(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE])


@pytest.mark.unit
@pytest.mark.parametrize("shape", SHAPES)
def test_training_learns_the_trace_as_written_whatever_the_template(embedded_model, shape):
    """The loss sees the reasoning, once, exactly as the teacher wrote it, then the template's end
    of turn; where the generation prompt already opened `<think>\\n` (R1's current template), the
    trace continues it, as the model's own answers will."""
    template, rendering, end = SHAPES[shape]
    tokenizer = carrying(embedded_model, template)
    chat = [*student_messages(ROW), {"role": "assistant", "content": TRACE}]
    text, _, how = assistant_spans(tokenizer, chat)
    assert how == rendering and text.count(REASONING) == 1
    ids, labels = tokenize_chat(tokenizer, chat, max_seq_len=1024)
    expected = TRACE.removeprefix("<think>") if shape == "r1-current" else TRACE
    assert learnt(tokenizer, ids, labels) == expected + end
    prompt = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE])
    assert prompt == tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
    raw = tokenize_frame(pd.DataFrame([{**ROW, "messages": chat}]), tokenizer, "raw", 1024, "assistant", packing=False)
    assert learnt(tokenizer, raw["input_ids"][0], raw["labels"][0]) == "<answer>downregulated</answer>" + end
    assert raw["own_rendered"].tolist() == [int(shape in ("r1-current", "qwen3"))]  # raw answers have no </think> to drop


@pytest.mark.unit
def test_own_rendering_needs_the_chat_to_end_in_its_only_assistant_turn(embedded_model):
    tokenizer = carrying(embedded_model, R1_OLD)
    chat = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": TRACE}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": TRACE}]
    with pytest.raises(SynthPertError, match=r"drops or rewrites assistant turns.*roles \['user', 'assistant', 'user', 'assistant'\]"):
        assistant_spans(tokenizer, chat)


@pytest.mark.unit
@pytest.mark.parametrize("shape", SHAPES)
def test_a_scored_answer_follows_its_reasoning_whatever_the_template(embedded_model, shape):
    """Prediction: an answer that starts inside the think block the generation prompt opened is
    parsed, and the labels are scored after exactly what the model saw and wrote: the generation
    prompt, its reasoning, `<answer>` (R1's templates would drop the reasoning; transformers refuses)."""
    tokenizer = carrying(embedded_model, SHAPES[shape][0])
    messages = student_messages(ROW)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    output = ("" if prompt.endswith("<think>\n") else "<think>") + f"{REASONING}</think>\n\n<answer>downregulated</answer>"
    assert parse_answer(output) == "downregulated" and parse_trace(output) == (REASONING, "downregulated")
    prefix = answer_prefix(output)
    request = ChatRequest.model_validate({"model": "m", "messages": [*messages, {"role": "assistant", "content": prefix}],
                                          "continue_final_message": True, "add_generation_prompt": False})
    assert request.prompt_text(tokenizer) == prompt + prefix


@pytest.mark.unit
def test_a_tokenizer_without_a_pad_token_pads_with_eos(embedded_model):
    """Llama-3 tokenizers have no pad token: batches are padded with eos (as the serving engine
    does), never learnt from."""
    tokenizer = carrying(embedded_model, None)
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None and pad_token_id(tokenizer) == tokenizer.eos_token_id
    chats = [[*student_messages(ROW), {"role": "assistant", "content": answer}] for answer in (TRACE, "<answer>downregulated</answer>")]
    rows = tokenize_frame(pd.DataFrame([{**ROW, "messages": chat} for chat in chats]), tokenizer, "cot", 1024, "assistant", packing=False)
    batch = collate(rows.to_dict("list"), pad_token_id(tokenizer))
    short = int(rows["length"].min())
    assert batch["input_ids"][1, short:].eq(tokenizer.eos_token_id).all() and batch["labels"][1, short:].eq(IGNORE).all()


def _model_folder(tmp_path, embedded_model, template: str):
    """A base-model folder: the embedded model's config and tokenizer carrying `template`."""
    folder = tmp_path / "base-8b"
    folder.mkdir()
    shutil.copy(embedded_model / "config.json", folder)
    carrying(embedded_model, template).save_pretrained(folder)
    return folder


@pytest.mark.unit
def test_preflight_says_training_renders_r1_turns_itself(tmp_path, embedded_model):
    """The paper's setting: base and served model DeepSeek-R1-Distill (current template)."""
    folder = _model_folder(tmp_path, embedded_model, R1_CURRENT)
    cfg = load_config(REPO / "configs" / "local.yaml", [f"run_dir={tmp_path / 'run'}", f"train.base_model={folder}", f"serve.model={folder}"])
    lines = preflight.run(cfg).text().splitlines()
    assert f"ok train.base_model: chat template of {folder} drops or rewrites the assistant's turn: training renders it itself " \
           "(generation prompt, the trace as written, end of turn)" in lines
    assert f"ok serve.model: chat template of {folder} opens <think> in its generation prompt: answers start inside it, " \
           "and their labels are scored after their reasoning" in lines


@pytest.mark.unit
def test_preflight_fails_in_one_line_when_the_template_would_lose_the_reasoning(tmp_path, embedded_model):
    """R1's template without its generation prompt: the reasoning would be dropped, and where the
    answer starts cannot be told to render it here instead."""
    folder = _model_folder(tmp_path, embedded_model, R1_OLD.replace("{{'<｜Assistant｜>'}}{% endif %}", "{% endif %}"))
    cfg = load_config(REPO / "configs" / "local.yaml", [f"run_dir={tmp_path / 'run'}", f"train.base_model={folder}", f"serve.model={folder}"])
    with pytest.raises(SynthPertError) as failed:
        preflight.require(cfg)
    problems = str(failed.value).splitlines()[1:]
    reason = "the chat template renders no generation prompt, so where an assistant turn starts is unknown"
    assert f"  train.base_model: chat template of {folder} would lose the reasoning: {reason}" in problems
    assert f"  serve.model: chat template of {folder} would lose the reasoning: {reason}" in problems
