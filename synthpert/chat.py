"""Chats rendered through a model's chat template without losing what the assistant wrote.

Reasoning models' templates rewrite assistant turns: DeepSeek-R1-Distill renders only
`content.split('</think>')[-1]` (its current revision also opens `<think>\\n` in the generation
prompt), Qwen3 reformats the reasoning of the last turn and drops it from earlier ones. Trained
on such a rendering, a student learns the answer without the reasoning; continued through it, a
scored answer loses the reasoning it followed. So a turn the template does not keep verbatim is
rendered here instead: the template's generation prompt (exactly what the model sees when it
answers), the content as written (less a tag that prompt already opened), the template's end of
turn.
"""

from __future__ import annotations

import os

from synthpert.errors import SynthPertError

TEMPLATE, OWN = "template", "own rendering"
PROBE = "SynthPertProbe"  # an assistant content no template rewrites: no tags, no edge whitespace


def render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def turn_frame(tokenizer, history: list[dict[str, str]]) -> tuple[str, str, str]:
    """(prompt, opened, end) around an assistant turn after `history`: the generation prompt, the
    part of it that already belongs to the answer (R1's `<think>\\n`), and the end-of-turn text."""
    prompt = render(tokenizer, history, generation_prompt=True)
    if prompt == render(tokenizer, history):
        raise SynthPertError("the chat template renders no generation prompt, so where an assistant turn starts is unknown")
    probed = render(tokenizer, [*history, {"role": "assistant", "content": PROBE}])
    if probed.count(PROBE) != 1:
        raise SynthPertError("the chat template does not render an assistant turn's content as written")
    before, end = probed.split(PROBE)
    return prompt, prompt[len(os.path.commonprefix([prompt, before])) :], end


def answer_body(content: str, opened: str) -> str:
    """The content less a tag the generation prompt already opened, so the trace appears once."""
    head, stripped = opened.strip(), content.lstrip()
    return stripped[len(head) :].lstrip() if head and stripped.startswith(head) else content


def own_turn(tokenizer, history: list[dict[str, str]], content: str) -> tuple[str, str]:
    """(prompt, prompt + answer + end of turn) for `content` answering `history`, rendered here."""
    prompt, opened, end = turn_frame(tokenizer, history)
    return prompt, prompt + answer_body(content, opened) + end


def _template_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]] | None:
    """The template's rendering and its assistant spans, or None when it renders a prefix of the
    chat inconsistently or does not follow the generation prompt with the assistant's content as
    written (Qwen3 inserts an empty think block before an answer that has none)."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not (upto.startswith(prompt) and text.startswith(upto) and upto[len(prompt) :].startswith(message["content"])):
            return None
        spans.append((len(prompt), len(upto)))
    return text, spans


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]], str]:
    """The rendered chat, the character spans of its assistant turns (end of turn included), and
    how it was rendered: TEMPLATE, or OWN where the template drops or rewrites an assistant turn
    (then the chat must end in its only assistant turn)."""
    rendered = _template_spans(tokenizer, messages)
    if rendered is not None:
        return *rendered, TEMPLATE
    roles = [m["role"] for m in messages]
    if roles.count("assistant") != 1 or roles[-1] != "assistant":
        raise SynthPertError(f"the chat template drops or rewrites assistant turns, and rendering them itself needs a chat "
                             f"ending in its only assistant turn (roles {roles})")
    prompt, text = own_turn(tokenizer, messages[:-1], messages[-1]["content"])
    return text, [(len(prompt), len(text))], OWN


def continued_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt that continues the chat's final, partial assistant message (vLLM's
    `continue_final_message`): the template's, where it ends in that message as written; else
    the generation prompt, then the message (a template that drops reasoning makes transformers
    refuse, or would score an answer without the reasoning before it)."""
    content = messages[-1]["content"]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    except ValueError:  # transformers: the final message does not appear in the rendered chat
        text = ""
    if text.endswith(content):
        return text
    prompt, opened, _ = turn_frame(tokenizer, messages[:-1])
    return prompt + answer_body(content, opened)
