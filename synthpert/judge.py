"""Judge stage: a second model grades the teacher's reasoning only; the keep rule decides.

Cheap checks come first, so no judge call is paid for a row that cannot be kept anyway: a
teacher error, a malformed trace (no <think> or no <answer>), or, when `require_answer_match`,
an answer other than the true label. Then the judge grades the reasoning (the answer is not
shown to it); with guided choice the endpoint must answer one of the grades, otherwise the
text is parsed, and an unparseable grade is a rejection with its reason, never a pass.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pandas as pd
import pyarrow as pa

from synthpert import prompts
from synthpert.config import GRADES, GenerateConfig
from synthpert.llm.actor import LLMActor

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


def use_guided_choice(cfg: GenerateConfig) -> bool:
    """Explicit setting, else only for our own endpoint (vLLM supports it too: set it to true)."""
    return cfg.use_guided_choice if cfg.use_guided_choice is not None else cfg.judge.base_url is None


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

    def __init__(self, keep: list[str], require_answer_match: bool, guided_choice: bool, **kwargs):
        super().__init__(**kwargs)
        self.keep = keep
        self.require_answer_match = require_answer_match
        self.extra_body = {"guided_choice": list(GRADES)} if guided_choice else None

    async def process(self, row: dict[str, Any]) -> dict[str, Any]:
        reason = precheck(row, self.require_answer_match)
        result = grade = None
        if reason is None:
            messages = prompts.judge_messages(row, row["reasoning"], row["context"])
            scope = {"tuple": row["tuple_id"], "template": "judge", "version": prompts.TEMPLATE_VERSIONS["judge"]}
            result = await self.client.complete(messages, scope, extra_body=self.extra_body)
            if result.error is not None:
                reason = "judge_error"
            else:
                grade = prompts.parse_grade(result.text)
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
