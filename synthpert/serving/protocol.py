"""The OpenAI chat-completions wire format we accept and emit, plus our two extensions.

Extensions (sent by the `openai` client in `extra_body`, as vLLM names them):
- `guided_choice: [str, ...]`: the answer is exactly one of the strings, picked by the model's
  likelihood of each string as a continuation of the prompt (argmax at temperature 0, else
  sampled from softmax(loglik / temperature)). The response then carries `choice_logprobs`:
  `{choice: summed token log-probability}`, the scores the pick was made from.
- `continue_final_message: true`: a trailing assistant message is continued (no new turn).

Structured outputs, OpenAI's and vLLM's names: `response_format` (`json_object`, `json_schema`),
`structured_outputs` ({json | regex | choice | grammar | json_object}) and the older `guided_json` /
`guided_regex` (moved into `structured_outputs`, the only form vLLM 0.32 reads). These constrain
decoding by a grammar on both engines; `guided_choice` keeps its likelihood-scoring contract.
Sampling parameters beyond OpenAI's: `repetition_penalty` (vLLM's). Fields clients send that do not
change the answer (`user`, `metadata`, ...) are accepted and dropped; features we do not serve
(`tools`, ...) are a 400 naming the field.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from synthpert.chat import continued_prompt
from synthpert.errors import SynthPertError

MAX_N = 16
MAX_TOP_LOGPROBS = 20
# OpenAI features this endpoint does not serve: a 400 that names them, not a silent plain answer
UNSUPPORTED_FIELDS = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
    "function_call": "function calling", "audio": "audio output", "modalities": "output modalities other than text",
    "prediction": "predicted outputs", "web_search_options": "web search",
}


class APIError(Exception):
    """An error the client sees as OpenAI-style JSON with an HTTP status (picklable: it crosses
    from engine replicas to the ingress)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status, message, type_, param, headers)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers or {}

    def __str__(self) -> str:
        return f"{self.status} {self.message}"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


def check_supported(body: Any) -> None:
    """A 400 naming the first unsupported feature the request asks for (its neutral values pass)."""
    if not isinstance(body, dict):
        return
    for name, what in UNSUPPORTED_FIELDS.items():
        value = body.get(name)
        if value is None or (name, value) in (("modalities", ["text"]), ("tool_choice", "none")):
            continue
        raise APIError(400, f"`{name}` is not supported: this endpoint serves no {what}", param=name)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = True


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class JSONObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_object"]


class JSONSchemaFormat(BaseModel):
    """`json_schema` is kept as the client's dict ({name, schema, strict, description}) so it reaches
    vLLM with its own key names (`schema` would shadow a BaseModel attribute as a field)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    json_schema: dict[str, Any]

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = set(value) - {"name", "schema", "strict", "description"}
        if unknown or not isinstance(value.get("schema"), dict):
            raise ValueError("json_schema takes {name, schema (a JSON Schema object), strict, description}"
                             + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else ""))
        return value


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint."""

    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> "StructuredOutputs":
        if len(self.model_dump(exclude_none=True)) != 1:
            raise ValueError("structured_outputs takes exactly one of json, regex, choice, grammar, json_object")
        return self

    def grammar_spec(self) -> tuple[str, str]:
        """(kind, source) for the transformers engine's grammar compiler."""
        (kind, value), = self.model_dump(exclude_none=True).items()
        return kind, value if isinstance(value, str) else json.dumps(value)


class ChatRequest(BaseModel):
    """A chat completion request. Unknown fields are rejected (400), so a typo is never ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's penalties: subtracted from a token's logit, once if it was generated / per time it was
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as JSON writes it) -> added to its logit
    response_format: ResponseFormat | None = None
    # extensions (extra_body)
    repetition_penalty: float = Field(1.0, gt=0.0)  # vLLM's: prompt or generated tokens' logits / it (> 0) or * it
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = Field(None, exclude=True)  # -> structured_outputs.json
    guided_regex: str | None = Field(None, exclude=True)  # -> structured_outputs.regex
    guided_choice: list[str] | None = Field(None, min_length=1)
    continue_final_message: bool = False
    add_generation_prompt: bool | None = None
    # sent by common clients, no effect on the completion: accepted, never forwarded to an engine
    user: Any = Field(None, exclude=True)
    metadata: Any = Field(None, exclude=True)
    store: Any = Field(None, exclude=True)
    service_tier: Any = Field(None, exclude=True)
    parallel_tool_calls: Any = Field(None, exclude=True)
    prompt_cache_key: Any = Field(None, exclude=True)
    safety_identifier: Any = Field(None, exclude=True)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value and any(not -100 <= v <= 100 for v in value.values()):
            raise ValueError("logit_bias values must lie in [-100, 100]")
        if value and not all(k.isdigit() for k in value):
            raise ValueError("logit_bias keys are token ids (non-negative integers)")
        return value or None

    @field_validator("guided_choice")
    @classmethod
    def _choices(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (any(not c for c in value) or len(set(value)) != len(value)):
            raise ValueError("guided_choice must hold distinct non-empty strings")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ChatRequest":
        legacy = {k: v for k, v in (("json", self.guided_json), ("regex", self.guided_regex)) if v is not None}
        if legacy:  # vLLM 0.32 ignores the guided_* names (unconstrained output): move them
            if self.structured_outputs is not None:
                raise ValueError("give guided_json / guided_regex or structured_outputs, not both")
            self.structured_outputs = StructuredOutputs.model_validate(legacy)
            self.guided_json = self.guided_regex = None
        constraints = [name for name in ("response_format", "structured_outputs", "guided_choice")
                       if getattr(self, name) is not None
                       and not (name == "response_format" and self.response_format.type == "text")]
        if len(constraints) > 1:
            raise ValueError(f"one output constraint at a time, got {' and '.join(constraints)}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        if self.n > 1 and self.temperature == 0 and not self.guided_choice:
            raise ValueError("n > 1 needs temperature > 0 (greedy completions would all be the same)")
        if self.continue_final_message:
            if self.messages[-1].role != "assistant":
                raise ValueError("continue_final_message needs the last message to be from the assistant")
            if self.add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def prompt_text(self, tokenizer: Any) -> str:
        """The chat template applied as vLLM does; a trailing assistant message continued as written
        (synthpert.chat: a reasoning model's template would drop the reasoning before the answer)."""
        if self.continue_final_message:
            try:
                return continued_prompt(tokenizer, self.chat_messages())
            except SynthPertError as exc:
                raise APIError(400, f"continue_final_message: {exc}", param="messages") from None
        add = True if self.add_generation_prompt is None else self.add_generation_prompt
        return tokenizer.apply_chat_template(self.chat_messages(), tokenize=False, add_generation_prompt=add)

    def grammar(self) -> tuple[str, str] | None:
        """The output constraint as (kind, source): kind is json (a schema), json_object, regex,
        choice (a JSON list) or grammar (EBNF); None when the output is free text."""
        fmt = self.response_format
        if isinstance(fmt, JSONObjectFormat):
            return "json_object", ""
        if isinstance(fmt, JSONSchemaFormat):
            return "json", json.dumps(fmt.json_schema["schema"])
        return self.structured_outputs.grammar_spec() if self.structured_outputs else None

    def sampling(self) -> "Sampling":
        """Engine sampling parameters (max_tokens must have been filled in by the ingress)."""
        assert self.token_limit is not None
        return Sampling(max_tokens=self.token_limit, temperature=self.temperature, top_p=self.top_p, n=self.n,
                        stop=list(self.stop or []), seed=self.seed, logprobs=self.logprobs,
                        top_logprobs=self.top_logprobs or 0, presence_penalty=self.presence_penalty,
                        frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                        logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()}, grammar=self.grammar())


@dataclass
class Sampling:
    """Engine-level sampling parameters for one prompt (n completions)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: tuple[str, str] | None = None  # ChatRequest.grammar()

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)

    def to_openai(self) -> dict[str, Any]:
        def entry(tok: str, lp: float) -> dict[str, Any]:
            return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8", "replace"))}

        return {**entry(self.token, self.logprob), "top_logprobs": [entry(t, lp) for t, lp in self.top]}


@dataclass
class Delta:
    """A piece of one completion (index < n): new text, its token logprobs, and the end reason."""

    index: int
    text: str = ""
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int,
                    completion_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens), **extra}


def chunk_body(rid: str, model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, **extra}


def choice_body(index: int, text: str, finish_reason: str | None, logprobs: list[TokenLogprob] | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": None if logprobs is None else {"content": [lp.to_openai() for lp in logprobs]},
            "finish_reason": finish_reason}


async def assemble(stream: AsyncIterator[list[Delta]], req: ChatRequest, prompt_tokens: int,
                   **extra: Any) -> dict[str, Any]:
    """A non-streaming response from the engine's deltas."""
    texts: list[list[str]] = [[] for _ in range(req.n)]
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(req.n)]
    finish: list[str | None] = [None] * req.n
    tokens = 0
    async for deltas in stream:
        for d in deltas:
            texts[d.index].append(d.text)
            logprobs[d.index].extend(d.logprobs)
            tokens += d.tokens
            finish[d.index] = d.finish_reason or finish[d.index]
    choices = [choice_body(i, "".join(texts[i]), finish[i], logprobs[i] if req.logprobs else None) for i in range(req.n)]
    return completion_body(new_id(), req.model, choices, prompt_tokens, tokens, **extra)


def sse_line(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def sse(stream: AsyncIterator[list[Delta]], req: ChatRequest, prompt_tokens: int,
              **extra: Any) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, content chunks, then a usage chunk (always), then [DONE]."""
    rid = new_id()
    first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
             for i in range(req.n)]
    yield sse_line(chunk_body(rid, req.model, first))
    tokens = 0
    async for deltas in stream:
        choices = []
        for d in deltas:
            tokens += d.tokens
            if d.text or d.finish_reason or (req.logprobs and d.logprobs):
                choices.append({"index": d.index, "delta": {"content": d.text} if d.text else {},
                                "logprobs": {"content": [lp.to_openai() for lp in d.logprobs]} if req.logprobs else None,
                                "finish_reason": d.finish_reason})
        if choices:
            yield sse_line(chunk_body(rid, req.model, choices))
    yield sse_line(chunk_body(rid, req.model, [], usage=usage(prompt_tokens, tokens), **extra))
    yield sse_line("[DONE]")
