"""Judge stage: a second model grades the teacher's reasoning only; the keep rule decides.

Cheap checks come first, so no judge call is paid for a row that cannot be kept anyway: a
teacher error, a malformed trace (no <think> or no <answer>), or, when `require_answer_match`,
an answer other than the true label. Then the judge, shown the question and the reasoning only
(SynthPert's critic: never the label or the answer), writes a short critique and then a grade.
Guided (our endpoint): the critique is generated up to "Grade:", and the grade is then chosen
among the five by guided_choice. Structured (`generate.judge_structured`): one call whose
response_format json_schema makes the answer a JSON object {critique, grade}, the grade one of the
five. Otherwise the grade is parsed from the text, and an unparseable grade is a rejection with its
reason, never a pass.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pandas as pd
import pyarrow as pa

from synthpert import prompts
from synthpert.config import GRADES, GenerateConfig
from synthpert.llm.actor import LLMActor
from synthpert.llm.client import CallResult
from synthpert.llm.prefill import CONTINUE, continue_with

# reject_reason values, and the summary count each one falls under.
REASONS = {
    "teacher_error": "errored",
    "judge_error": "errored",
    "malformed_trace": "rejected_malformed",
    "answer_mismatch": "rejected_answer",
    "grade_unparseable": "rejected_grade",
    "grade": "rejected_grade",
}
UNPARSEABLE = "unparseable"
# response_format of the structured judge. The critique is bounded: SmolLM2-135M's greedy critique
# loops until max_tokens (measured: still open after 400 tokens), and a verdict that never closes
# has no grade.
VERDICT_FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["critique", "grade"],
    "properties": {"critique": {"type": "string", "maxLength": 600}, "grade": {"type": "string", "enum": list(GRADES)}}}}}


def precheck(row: dict[str, Any], require_answer_match: bool) -> str | None:
    """Why the row is rejected before judging (None: it goes to the judge)."""
    if row["teacher_error"] is not None:
        return "teacher_error"
    if row["reasoning"] is None or row["answer"] is None:
        return "malformed_trace"
    if require_answer_match and row["answer"] != row["label"]:
        return "answer_mismatch"
    return None


def keep_rule(grade: str | None, keep: list[str]) -> str | None:
    """After judging: None if kept, else the reason."""
    if grade is None:
        return "grade_unparseable"
    return None if grade in keep else "grade"


def use_guided_judge(cfg: GenerateConfig) -> bool:
    """Explicit setting, else only for our own endpoint (it supports prefill + guided_choice)."""
    return cfg.use_guided_choice if cfg.use_guided_choice is not None else cfg.judge.base_url is None


def grade_choice(cfg: GenerateConfig) -> dict:
    """The extra_body making the endpoint answer exactly one grade (vLLM's own servers ignore
    `guided_choice` in recent versions: guided_choice_format=structured_outputs there)."""
    if cfg.guided_choice_format == "structured_outputs":
        return {"structured_outputs": {"choice": list(GRADES)}}
    return {"guided_choice": list(GRADES)}


def structured_grade(text: str | None) -> str | None:
    """The grade of a structured verdict; None when the text is not one (an endpoint that ignored
    the format, an answer cut at max_tokens)."""
    try:
        verdict = json.loads(text or "")
    except json.JSONDecodeError:
        return None
    grade = verdict.get("grade") if isinstance(verdict, dict) else None
    return grade if grade in GRADES else None


class JudgeActor(LLMActor):
    """Ray Data actor: grades each row's reasoning and applies the keep rule."""

    prefix = "judge"
    fields = [
        ("judge_model", pa.string()),
        ("judge_output", pa.string()),
        ("grade", pa.string()),
        ("accepted", pa.bool_()),
        ("reject_reason", pa.string()),
    ]

    def __init__(self, keep: list[str], require_answer_match: bool, prompt_set: prompts.PromptSet,
                 guided: bool = False, choice: dict | None = None, structured: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.structured = structured
        self.keep = keep
        self.require_answer_match = require_answer_match
        self.prompt_set = prompt_set
        self.guided = guided
        self.choice = choice or {"guided_choice": list(GRADES)}

    async def _grade(self, messages: list[dict], scope: dict) -> CallResult:
        """One call, parsed; guided: critique up to the grade marker, then the grade by choice."""
        if self.structured:
            return await self.client.complete(messages, scope, extra_body={"response_format": VERDICT_FORMAT})
        if not self.guided:
            return await self.client.complete(messages, scope)
        if self.prompt_set.judge_sees_label:  # the ablation's judge answers one word: choose it
            return await self.client.complete(messages, scope, extra_body={**self.choice})
        opening = f"{prompts.CRITIQUE_MARK} "
        critique = await self.client.complete(continue_with(messages, opening), scope | {"step": "critique"},
                                              extra_body={**CONTINUE, "stop": [prompts.GRADE_MARK]})
        if critique.error is not None:
            return critique
        text = f"{opening}{(critique.text or '').split(prompts.GRADE_MARK)[0].strip()}\n{prompts.GRADE_MARK} "
        grade = await self.client.complete(continue_with(messages, text), scope | {"step": "grade"},
                                           extra_body={**CONTINUE, **self.choice})
        merged = CallResult.merge(critique, grade)
        merged.text = f"{text}{grade.text}" if grade.error is None else None
        return merged

    async def process(self, row: dict[str, Any]) -> dict[str, Any]:
        reason = precheck(row, self.require_answer_match)
        result = grade = None
        if reason is None:
            messages = self.prompt_set.judge(row, row["reasoning"], row["context"])
            scope = {"tuple": row["tuple_id"], "template": "judge", "version": self.prompt_set.versions["judge"]}
            result = await self._grade(messages, scope)
            if result.error is not None:
                reason = "judge_error"
            else:
                grade = structured_grade(result.text) if self.structured else prompts.parse_grade(result.text)
                reason = keep_rule(grade, self.keep)
        return {
            **row,
            "judge_model": self.client.endpoint.model,
            "judge_output": result.text if result else None,
            "grade": grade,
            "accepted": reason is None,
            "reject_reason": reason,
            **self.outcome(result),
        }


def counts(attempts: pd.DataFrame) -> dict[str, int]:
    """Rows by outcome; rows = accepted + rejected_* + errored, always."""
    by_reason = attempts["reject_reason"].map(REASONS).value_counts()
    out = {"rows": len(attempts), "accepted": int(attempts["accepted"].sum())}
    for name in ("rejected_grade", "rejected_answer", "rejected_malformed", "errored"):
        out[name] = int(by_reason.get(name, 0))
    out["completed"] = out["rows"] - out["errored"]
    return out


def grade_histogram(attempts: pd.DataFrame) -> dict[str, int]:
    """Grades of the judged rows (unparseable ones too), in rubric order."""
    judged = attempts[attempts["judge_output"].notna()]
    found = Counter(judged["grade"].fillna(UNPARSEABLE))
    return {grade: int(found.get(grade, 0)) for grade in (*GRADES, UNPARSEABLE)}
