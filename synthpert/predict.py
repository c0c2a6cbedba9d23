"""LLM predictions on test tuples, with class probabilities the official AUROC can rank.

For each tuple the model first answers the student prompt (with reasoning in `cot` mode); then
the three labels are scored as continuations of its reasoning + `<answer>` through the
endpoint's `guided_choice` (our Serve endpoint returns each choice's summed log-likelihood as
`choice_logprobs`). softmax over those gives `p_up, p_down, p_none`: continuous scores, where
a parsed answer alone would only give one-hot ones. The hard `answer` is the parsed one, or the
likeliest label when the model wrote none.

Runs on Ray Data with the same actor pools, limits, retries and call cache as trace generation.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from synthpert import prompts
from synthpert.artifacts import write_manifest, write_table
from synthpert.config import LABELS, Config, EndpointConfig
from synthpert.errors import SynthPertError
from synthpert.generate import ANSWER_OPEN, GUIDED_LABELS, continue_with
from synthpert.llm.actor import LLMActor, map_with_actors
from synthpert.llm.client import CallResult

STAGE = "predict"
PROBS = ("p_up", "p_down", "p_none")  # in the order of LABELS


def label_probabilities(choice_logprobs: dict[str, float]) -> dict[str, float]:
    """softmax over the three labels' log-likelihoods, as p_up / p_down / p_none."""
    scores = [choice_logprobs[label] for label in LABELS]
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return {name: w / total for name, w in zip(PROBS, weights)}


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
    """Ray Data actor: answer, then score the labels after the answer tag."""

    prefix = "llm"
    fields = [
        ("model", pa.string()),
        ("output", pa.string()),
        ("answer", pa.string()),
        ("parsed", pa.bool_()),
        *((name, pa.float64()) for name in PROBS),
    ]

    def __init__(self, *, mode: str, score: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.mode = mode
        self.score = score  # False: an endpoint without guided_choice scoring (e.g. OpenAI)

    async def process(self, row: dict[str, Any]) -> dict[str, Any]:
        messages = prompts.student_messages(row, row["context"] or None, mode=self.mode)
        template = f"student_{self.mode}"
        scope = {"tuple": row["tuple_id"], "template": template, "version": prompts.TEMPLATE_VERSIONS[template]}
        output, answer, prefix, calls = None, None, ANSWER_OPEN, []
        if self.mode == "cot":
            first = await self.client.complete(messages, scope)
            calls.append(first)
            if first.error is not None:
                return self._row(row, first, output=None, answer=None, probs=None)
            output = first.text
            answer = prompts.parse_answer(output)
            prefix = answer_prefix(output)
            if not self.score:
                return self._row(row, first, output=output, answer=answer, probs=one_hot(answer), parsed=answer is not None)
        scored = await self.client.complete(continue_with(messages, prefix), scope | {"step": "score"}, extra_body=GUIDED_LABELS)
        usage = CallResult.merge(*calls, scored)
        if scored.error is not None or "choice_logprobs" not in scored.extra:
            error = scored.error or "the endpoint returned no choice_logprobs: it does not support guided_choice scoring"
            return self._row(row, usage, output=output, answer=answer, probs=None, error=error)
        probs = label_probabilities(scored.extra["choice_logprobs"])
        parsed = answer is not None
        if answer is None:
            answer = LABELS[max(range(3), key=lambda i: probs[PROBS[i]])]
        return self._row(row, usage, output=output, answer=answer, probs=probs, parsed=parsed)

    def _row(self, row, result, output, answer, probs, parsed=False, error=None) -> dict[str, Any]:
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
            **outcome,
        }


def test_tuples(cfg: Config) -> pd.DataFrame:
    """Test tuples of the configured split (at most `evaluate.limit` per cell line), with context."""
    from synthpert.data import apply_split, gene_sample, load_pairs
    from synthpert.generate import with_context

    pairs = apply_split(load_pairs(cfg.data.cell_lines, cfg.data.data_dir), cfg.data.split)
    train = pairs[pairs["split"] == "train"].reset_index(drop=True)
    test = pairs[pairs["split"] == "test"]
    if cfg.evaluate.limit is not None:
        test = pd.concat(
            [gene_sample(part, cfg.evaluate.limit, cfg.evaluate.seed) for _, part in test.groupby("cell_line", observed=True)]
        )
    if test.empty:
        raise SynthPertError(f"no test tuples for cell lines {cfg.data.cell_lines} with split {cfg.data.split!r}")
    return with_context(test.reset_index(drop=True), train, cfg.data)


def predict(cfg: Config, tuples: pd.DataFrame, endpoint: EndpointConfig, base_url: str, mode: str, output_dir: str | Path,
            api_key=None, score: bool = True, progress: bool = True) -> pd.DataFrame:
    """Run one model over `tuples`; write `predictions.parquet` + manifest to `output_dir`."""
    import ray.data

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.time()
    ray.data.DataContext.get_current().enable_progress_bars = progress
    size = cfg.generate.batch_size
    blocks = [tuples.iloc[i : i + size] for i in range(0, len(tuples), size)]
    ds = ray.data.from_pandas(blocks)
    ds = map_with_actors(
        ds, PredictActor, endpoint, cfg.generate.actors, size, len(blocks),
        base_url=base_url, api_key=api_key, cache_path=output / "calls.sqlite", mode=mode, score=score,
    )
    frame = pd.concat(list(ds.iter_batches(batch_size=None, batch_format="pandas")), ignore_index=True)
    if len(frame) != len(tuples):
        raise RuntimeError(f"rows in ({len(tuples)}) != rows out ({len(frame)})")
    schema = pa.schema([(c, pa.string()) for c in ("tuple_id", "cell_line", "pert", "gene", "label")] + PredictActor.output_fields())
    outputs = {"predictions": write_table(output, "predictions", frame, schema)}
    errored = int(frame["llm_error"].notna().sum())
    write_manifest(
        output, STAGE, outputs, model=endpoint.model, mode=mode, rows=len(frame), errored=errored,
        parsed=int(frame["parsed"].sum()), template_versions=prompts.TEMPLATE_VERSIONS, wall_s=round(time.time() - started, 2),
    )
    return frame
