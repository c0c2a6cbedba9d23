"""LLM predictions on validation and test tuples, with class probabilities the official AUROC can rank.

For each tuple the model first answers the student prompt (with reasoning in `cot` mode); then
the three labels are scored as continuations of its reasoning + `<answer>` through the
endpoint's `guided_choice` (our Serve endpoint returns each choice's summed log-likelihood as
`choice_logprobs`). softmax over those gives `p_up, p_down, p_none`: continuous scores, where
a parsed answer alone would only give one-hot ones. The hard `answer` is the parsed one, or the
likeliest label when the model wrote none. With `evaluate.direction = separate`, a DE pair's
direction is also asked as its own two-choice question (`p_dir_up`), as PerturbQA asks it. That
question failing leaves the row (its DE scores stand) with `direction_error` set and no `p_dir_up`:
evaluation scores its derived direction. Only truly DE pairs are asked it, so dropping the row would
take DE positives alone out of the DE AUROC.

Runs on Ray Data with the same actor pools, limits, retries and call cache as trace generation.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from synthpert import console, prompts
from synthpert.prompts import ANSWER_OPEN
from synthpert.artifacts import write_manifest, write_table
from synthpert.config import LABELS, Config, EndpointConfig
from synthpert.errors import SynthPertError
from synthpert.llm.actor import LLMActor, map_with_actors, report_batch
from synthpert.llm.cache import CallCache, cache_owner
from synthpert.llm.client import BUDGET_REFUSED, CallResult, budget_stop
from synthpert.llm.endpoint import endpoint_identity
from synthpert.llm.prefill import CONTINUE, continue_with

STAGE = "predict"
PROBS = ("p_up", "p_down", "p_none")  # in the order of LABELS


def softmax(scores: list[float]) -> list[float]:
    """Probabilities from log-likelihoods (stable: the largest is subtracted first)."""
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


def one_hot(answer: str | None) -> dict[str, float]:
    """Scores from a hard answer alone (uniform when there is none): AUROC then sees only ranks 0/1."""
    if answer is None:
        return dict.fromkeys(PROBS, 1 / 3)
    return {name: float(label == answer) for name, label in zip(PROBS, LABELS)}


def answer_prefix(text: str) -> str:
    """The model's output up to and including `<answer>`, where the label is to be scored."""
    cut = text.find(ANSWER_OPEN)
    return text[:cut] + ANSWER_OPEN if cut >= 0 else text.rstrip() + "\n" + ANSWER_OPEN


class PredictActor(LLMActor):
    """Ray Data actor: answer, then score the labels after the answer tag (and, with
    `direction="separate"`, ask a DE pair's direction as its own two-choice question)."""

    prefix = "llm"
    fields = [
        ("model", pa.string()),
        ("output", pa.string()),
        ("answer", pa.string()),
        ("parsed", pa.bool_()),
        *((name, pa.float64()) for name in PROBS),
        ("p_dir_up", pa.float64()),
        ("direction_error", pa.string()),  # the separate direction question failed: the row stands
    ]

    def __init__(self, *, mode: str, score: bool = True, direction: str = "derived", **kwargs: Any):
        super().__init__(**kwargs)
        self.mode = mode
        self.score = score  # False: an endpoint without guided_choice scoring (e.g. OpenAI)
        self.direction = direction
        self.versions = prompts.PromptSet.from_config().versions

    async def _ask(self, messages: list[dict], scope: dict, choices: list[str]) -> tuple[str | None, str | None, list[float] | None, list[CallResult], str | None]:
        """(output, parsed answer, softmax over `choices` or None, calls, error) for one question."""
        output, answer, prefix, calls = None, None, ANSWER_OPEN, []
        if self.mode == "cot":
            first = await self.client.complete(messages, scope)
            calls.append(first)
            if first.error is not None:
                return None, None, None, calls, first.error
            output = first.text
            answer = prompts.parse_answer(output)
            answer = answer if answer in choices else None
            prefix = answer_prefix(output)
            if not self.score:
                return output, answer, None, calls, None
        scored = await self.client.complete(continue_with(messages, prefix), scope | {"step": "score"},
                                            extra_body={**CONTINUE, "guided_choice": list(choices)})
        calls.append(scored)
        if scored.error is not None or "choice_logprobs" not in scored.extra:
            return output, answer, None, calls, scored.error or "the endpoint returned no choice_logprobs: it does not support guided_choice scoring"
        return output, answer, softmax([scored.extra["choice_logprobs"][c] for c in choices]), calls, None

    async def process(self, row: dict[str, Any]) -> dict[str, Any]:
        context = row["context"] or None
        scope = {"tuple": row["tuple_id"], "template": "student", "version": self.versions["student"], "mode": self.mode}
        output, answer, scores, calls, error = await self._ask(prompts.student_messages(row, context), scope, list(LABELS))
        p_dir_up = direction_error = None
        if error is None and self.direction == "separate" and row["label"] in prompts.DIRECTIONS:
            scope = scope | {"template": "student_direction", "version": self.versions["student_direction"]}
            _, dir_answer, dir_scores, more, direction_error = await self._ask(prompts.direction_messages(row, context), scope,
                                                                               list(prompts.DIRECTIONS))
            calls += more
            if direction_error is None:
                p_dir_up = dir_scores[0] if dir_scores else None if dir_answer is None else float(dir_answer == LABELS[0])
        usage = dataclasses.replace(CallResult.merge(*calls), error=error)  # a direction error is its own column
        parsed = answer is not None
        if scores is None:
            probs = one_hot(answer) if error is None else None
        else:
            probs = dict(zip(PROBS, scores))
            answer = answer or LABELS[max(range(3), key=scores.__getitem__)]
        return self._row(row, usage, output=output, answer=answer, probs=probs, parsed=parsed, p_dir_up=p_dir_up, error=error,
                         direction_error=direction_error)

    def _row(self, row, result, output, answer, probs, parsed=False, p_dir_up=None, error=None, direction_error=None) -> dict[str, Any]:
        outcome = self.outcome(result)
        if error is not None:
            outcome[f"{self.prefix}_error"] = error
        return {
            **row,
            "model": self.client.endpoint.model,
            "output": output,
            "answer": answer,
            "parsed": parsed,
            **(probs or dict.fromkeys(PROBS)),
            "p_dir_up": p_dir_up,
            "direction_error": direction_error,
            **outcome,
        }


def predict(cfg: Config, tuples: pd.DataFrame, endpoint: EndpointConfig, base_url: str, mode: str, output_dir: str | Path,
            api_key=None, score: bool = True, progress: bool = True) -> pd.DataFrame:
    """Run one model over `tuples` (eval_tuples); write `predictions.parquet` + manifest to `output_dir`."""
    import ray.data

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.time()
    # only a remote endpoint is paid for (ours costs nothing, whatever prices its copied config holds)
    budget = cfg.evaluate.max_cost_usd if endpoint.base_url is not None else None
    CallCache.start_budget(output / "calls.sqlite", budget)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    size = cfg.generate.batch_size
    blocks = [tuples.iloc[i : i + size] for i in range(0, len(tuples), size)]
    ds = ray.data.from_pandas(blocks)
    ds = map_with_actors(
        ds, PredictActor, endpoint, cfg.generate.actors, size, len(blocks),
        base_url=base_url, api_key=api_key, identity=endpoint_identity(endpoint, cfg), cache=cache_owner(output / "calls.sqlite"), mode=mode, score=score,
        direction=cfg.evaluate.direction, max_cost_usd=budget,
    )
    console.total(len(tuples))
    frames = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        frames.append(batch)
        report_batch(batch, (PredictActor.prefix,))
    frame = pd.concat(frames, ignore_index=True)
    if len(frame) != len(tuples):
        raise RuntimeError(f"rows in ({len(tuples)}) != rows out ({len(frame)})")
    schema = pa.schema([(c, pa.string()) for c in ("tuple_id", "cell_line", "pert", "gene", "label", "split")] + PredictActor.output_fields())
    outputs = {"predictions": write_table(output, "predictions", frame, schema)}
    errored = int(frame["llm_error"].notna().sum())
    write_manifest(
        output, STAGE, outputs, model=endpoint.model, mode=mode, rows=len(frame), errored=errored,
        parsed=int(frame["parsed"].sum()), template_versions=prompts.PromptSet.from_config().versions, wall_s=round(time.time() - started, 2),
    )
    # a refused direction question too: the stage must not finish with its derived direction in place
    refused = int((frame["llm_error"].str.endswith(BUDGET_REFUSED, na=False) | frame["direction_error"].str.endswith(BUDGET_REFUSED, na=False)).sum())
    if refused:
        spent = float(frame.loc[frame["llm_called"], "llm_cost_usd"].sum())
        raise budget_stop("evaluate.max_cost_usd", budget, spent, refused, len(frame))
    return frame
