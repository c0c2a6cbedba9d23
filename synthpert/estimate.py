"""What the traces stage will cost, before any call: a low-high range for the teacher and the judge.

Input tokens come from the prompts actually rendered for the sampled tuples, counted at
CHARS_PER_TOKEN characters a token (the count the rate cap and the budget reserve with, so the
estimate and the budget agree). Output tokens: `max_tokens` is the high end (what a provider can
bill at most); the low end is the model's measured average in the call cache when resuming, else
TYPICAL_OUTPUT_FRACTION of `max_tokens`. The judge's prompt holds the teacher's reasoning, so its
input grows with the teacher's output; every tuple is assumed judged (an upper bound on calls).
Calls already in the cache cost nothing: the range is for the whole run, an upper bound on a resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from synthpert import prompts
from synthpert.config import Config, EndpointConfig, GenerateConfig
from synthpert.llm.cache import CallCache
from synthpert.llm.client import price, prompt_tokens_estimate

TYPICAL_OUTPUT_FRACTION = 0.5  # of max_tokens, when the cache has no measured average yet


def measured_output_tokens(cache_path: Path | None) -> tuple[dict[str, float], int]:
    """Mean completion tokens per model over the cache's answered calls, and how many calls it holds."""
    if cache_path is None or not cache_path.exists():
        return {}, 0
    cache = CallCache(cache_path)
    try:
        by_model = cache.output_tokens()
    finally:
        cache.close()
    return {model: mean for model, (mean, _) in by_model.items() if mean is not None}, sum(n for _, n in by_model.values())


def _side(endpoint: EndpointConfig, calls: int, tokens_in: int, out_low: float, extra_in_low: float = 0, extra_in_high: float = 0) -> dict:
    """One endpoint's calls, tokens and USD range; extra_in: input tokens that depend on another call's output."""
    low_in, high_in = tokens_in + calls * extra_in_low, tokens_in + calls * extra_in_high
    return {
        "calls": calls,
        "tokens_in": [int(low_in), int(high_in)],
        "tokens_out": [int(calls * out_low), calls * endpoint.max_tokens],
        "usd": [round(price(endpoint, low_in, calls * out_low), 4), round(price(endpoint, high_in, calls * endpoint.max_tokens), 4)],
    }


def estimate(tuples: pd.DataFrame, g: GenerateConfig, cache_path: Path) -> dict[str, Any]:
    """Teacher and judge calls, tokens and USD [low, high] for `tuples` (see the module doc)."""
    prompt_set = prompts.PromptSet.from_config(g)
    rows = tuples.to_dict("records")
    measured, cached = measured_output_tokens(cache_path)
    teacher_in = sum(prompt_tokens_estimate(prompt_set.teacher(r, r["context"])) for r in rows)
    judge_in = sum(prompt_tokens_estimate(prompt_set.judge(r, "", r["context"])) for r in rows)
    out = {name: measured.get(e.model, TYPICAL_OUTPUT_FRACTION * e.max_tokens) for name, e in (("teacher", g.teacher), ("judge", g.judge))}
    teacher = _side(g.teacher, len(rows), teacher_in, out["teacher"])
    judge = _side(g.judge, len(rows), judge_in, out["judge"], extra_in_low=out["teacher"], extra_in_high=g.teacher.max_tokens)
    return {
        "tuples": len(rows),
        "cached_calls": cached,
        "output_tokens_low_from": "cache" if measured else f"{TYPICAL_OUTPUT_FRACTION} x max_tokens",
        "teacher": teacher,
        "judge": judge,
        "usd": [round(teacher["usd"][0] + judge["usd"][0], 4), round(teacher["usd"][1] + judge["usd"][1], 4)],
    }


def predict_estimate(tuples: pd.DataFrame, teacher: EndpointConfig, direction: str) -> dict[str, Any]:
    """The remote teacher as a predictor (`predict-teacher`), in `estimate`'s form: one answer per
    tuple (a remote endpoint gets no scoring call), and with `direction="separate"` one more per
    DE pair. Its cache is the stage's own, unknown before the run: output low at the typical fraction."""
    rows = tuples.to_dict("records")
    asked = [prompts.student_messages(r, r["context"] or None) for r in rows]
    if direction == "separate":
        asked += [prompts.direction_messages(r, r["context"] or None) for r in rows if r["label"] in prompts.DIRECTIONS]
    side = _side(teacher, len(asked), sum(map(prompt_tokens_estimate, asked)), TYPICAL_OUTPUT_FRACTION * teacher.max_tokens)
    return {"tuples": len(rows), "cached_calls": 0, "output_tokens_low_from": f"{TYPICAL_OUTPUT_FRACTION} x max_tokens",
            "teacher": side, "usd": side["usd"]}


def for_stages(cfg: Config, stages: list[str], cache_path: Path | None = None) -> dict[str, dict[str, Any]]:
    """The estimate of each of `stages` that makes paid calls (traces; the teacher as a predictor),
    by stage, with its budget; empty when none is paid, without sampling a tuple (the local run
    costs nothing)."""
    g, out = cfg.generate, {}
    from synthpert.data import eval_tuples, sample_tuples  # the data tables load only for a paid run

    if "traces" in stages and (g.teacher.priced() or g.judge.priced()):
        out["traces"] = estimate(sample_tuples(cfg.data), g, cache_path or g.cache_path) | {"budget_usd": g.max_cost_usd}
    if "predict-teacher" in stages and g.teacher.priced():
        out["predict-teacher"] = (predict_estimate(eval_tuples(cfg.data, cfg.evaluate), g.teacher, cfg.evaluate.direction)
                                  | {"budget_usd": cfg.evaluate.max_cost_usd})
    return out


BUDGETS = {"traces": "generate.max_cost_usd", "predict-teacher": "evaluate.max_cost_usd"}


def describe(est: dict[str, Any], budget: float | None, stage: str = "traces") -> str:
    """The short block printed before the stage runs."""
    lines = [f"{stage} cost estimate for {est['tuples']} tuples (whole run; {est['cached_calls']} calls already cached are free):"]
    for name in ("teacher", "judge"):
        if name not in est:
            continue
        side = est[name]
        lines.append(f"  {name:<8}{side['calls']:>7} calls  in {side['tokens_in'][0]:,}-{side['tokens_in'][1]:,} tok  "
                     f"out {side['tokens_out'][0]:,}-{side['tokens_out'][1]:,} tok  ${side['usd'][0]:.2f}-${side['usd'][1]:.2f}")
    lines.append(f"  total ${est['usd'][0]:.2f}-${est['usd'][1]:.2f} (low: output at {est['output_tokens_low_from']}); "
                 + ("no budget" if budget is None else f"budget {BUDGETS[stage]}=${budget:.2f}"))
    return "\n".join(lines)
