"""Teacher stage, and the `synthpert generate` run: sample → teacher → judge, streamed on Ray Data.

The teacher sees the TRUE label and writes `<think>…</think><answer>…</answer>`; the judge
(synthpert.judge) grades the reasoning while other rows are still being generated. Outputs in
the output directory: `attempts.parquet` (every sampled row exactly once, with its outcome,
usage and cost), `sft.parquet` (kept traces as chat messages whose system+user part is the
STUDENT prompt, which never contains the label) and manifest.json. Every finished call is in
the call cache (default `<output>/calls.sqlite`) the moment it returns, so re-running the same
command after a crash pays only for the calls that had not finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from synthpert import console, estimate, prompts, tracking
from synthpert.prompts import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN
from synthpert.artifacts import TableWriter, write_manifest
from synthpert.cluster import ray_session
from synthpert.config import Config, GenerateConfig
from synthpert.data.tuples import sample_tuples
from synthpert.errors import SynthPertError
from synthpert.judge import JudgeActor, counts, grade_choice, grade_histogram, use_guided_judge
from synthpert.llm.actor import LLMActor, map_with_actors, report_batch
from synthpert.llm.cache import CallCache, cache_owner
from synthpert.llm.client import BUDGET_REFUSED, CallResult, budget_stop
from synthpert.llm.endpoint import api_key, endpoint_identity
from synthpert.llm.prefill import CONTINUE, GUIDED_LABELS, continue_with

STAGE = "generate"
TUPLE_COLUMNS = ["tuple_id", "cell_line", "pert", "gene", "label", "split"]
SAMPLE_TRACES = 20  # traces logged to MLflow as a sample of what was kept and rejected

_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SFT_SCHEMA = pa.schema(
    [("cell_line", pa.string()), ("pert", pa.string()), ("gene", pa.string()), ("label", pa.string()), ("split", pa.string()),
     ("messages", _MESSAGES)]
)


def prompt_hash(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]



class TeacherActor(LLMActor):
    """Ray Data actor: the label-conditioned teacher prompt for each row; parses the trace.

    Guided (`generate.guided_teacher`): the reasoning is generated after a prefilled `<think>` up to
    `</think>`, and the answer is then chosen among the three labels by the endpoint's
    guided_choice, so even a model that ignores the format yields a well-formed trace.
    """

    prefix = "teacher"
    fields = [(name, pa.string()) for name in ("prompt_hash", "teacher_model", "teacher_output", "reasoning", "answer")]

    def __init__(self, *, prompt_set: prompts.PromptSet, guided: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.prompt_set = prompt_set
        self.guided = guided

    async def process(self, row: dict[str, Any]) -> dict[str, Any]:
        messages = self.prompt_set.teacher(row, row["context"])
        scope = {"tuple": row["tuple_id"], "template": "teacher", "version": self.prompt_set.versions["teacher"]}
        result = await (self._guided(messages, scope) if self.guided else self.client.complete(messages, scope))
        reasoning, answer = prompts.parse_trace(result.text) if result.error is None else (None, None)
        return {
            **row,
            "prompt_hash": prompt_hash(messages),
            "teacher_model": self.client.endpoint.model,
            "teacher_output": result.text,
            "reasoning": reasoning,
            "answer": answer,
            **self.outcome(result),
        }

    async def _guided(self, messages: list[dict], scope: dict) -> CallResult:
        think = await self.client.complete(
            continue_with(messages, THINK_OPEN), scope | {"step": "think"}, extra_body={**CONTINUE, "stop": [THINK_CLOSE]}
        )
        if think.error is not None:
            return think
        reasoning = (think.text or "").split(THINK_CLOSE)[0].strip()
        trace = f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{ANSWER_OPEN}"
        answer = await self.client.complete(continue_with(messages, trace), scope | {"step": "answer"}, extra_body=GUIDED_LABELS)
        merged = CallResult.merge(think, answer)
        merged.text = f"{trace}{answer.text}{ANSWER_CLOSE}" if answer.error is None else None
        return merged


def use_guided_teacher(cfg: GenerateConfig) -> bool:
    """Explicit setting, else only for our own endpoint (it supports prefill + guided_choice)."""
    return cfg.guided_teacher if cfg.guided_teacher is not None else cfg.teacher.base_url is None


ATTEMPTS_SCHEMA = pa.schema(
    [(name, pa.string()) for name in TUPLE_COLUMNS]
    + TeacherActor.output_fields()
    + JudgeActor.output_fields()
    + [("error", pa.string()), ("tokens_in", pa.int64()), ("tokens_out", pa.int64()),
       ("latency_s", pa.float64()), ("cost_usd", pa.float64())]
)


def _stream(cfg: Config, prompt_set: prompts.PromptSet, tuples: pd.DataFrame, urls: dict[str, str], progress: bool) -> Iterator[pd.DataFrame]:
    """Teacher and judge actor pools on one streaming Ray Data pipeline. Yields finished batches in
    the tuples' order, so the caller writes them as they come and never holds the run (at the
    paper's scale, gathering them grew the driver by ~8 KB per call); every row comes back once."""
    import ray.data
    from tqdm import tqdm

    g = cfg.generate
    ray.data.DataContext.get_current().enable_progress_bars = progress
    cache_path = g.cache_path or Path(g.output_dir) / "calls.sqlite"
    CallCache.start_budget(cache_path, g.max_cost_usd)
    cache = cache_owner(cache_path)  # teacher and judge actors, on any node, share it
    # One block per batch, cut here: no repartition step (and its task workers) in the pipeline.
    blocks = [tuples.iloc[i : i + g.batch_size] for i in range(0, len(tuples), g.batch_size)]
    ds = ray.data.from_pandas(blocks)
    ds = map_with_actors(
        ds, TeacherActor, g.teacher, g.actors, g.batch_size, len(blocks),
        base_url=urls["teacher"], api_key=api_key(g.teacher, cfg), identity=endpoint_identity(g.teacher, cfg), cache=cache, guided=use_guided_teacher(g),
        max_cost_usd=g.max_cost_usd,
        prompt_set=prompt_set,
    )
    ds = map_with_actors(
        ds, JudgeActor, g.judge, g.actors, g.batch_size, len(blocks),
        base_url=urls["judge"], api_key=api_key(g.judge, cfg), identity=endpoint_identity(g.judge, cfg), cache=cache,
        max_cost_usd=g.max_cost_usd,
        keep=g.keep, require_answer_match=g.require_answer_match, guided=use_guided_judge(g), choice=grade_choice(g), prompt_set=prompt_set,
        structured=g.judge_structured,
    )
    ds.context.execution_options.preserve_order = True  # this dataset's own copy of the context
    expected, done = tuples["tuple_id"].tolist(), 0
    console.total(len(tuples))
    with tqdm(total=len(tuples), desc="traces", unit="row", disable=not progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            if batch["tuple_id"].tolist() != expected[done : done + len(batch)]:
                raise RuntimeError(f"rows out of order, lost or repeated after row {done} of {len(expected)}")
            done += len(batch)
            bar.update(len(batch))
            report_batch(batch, ("teacher", "judge"))
            yield _finish_columns(batch)
    if done != len(expected):
        raise RuntimeError(f"rows in ({len(expected)}) != rows out ({done})")


def _finish_columns(attempts: pd.DataFrame) -> pd.DataFrame:
    """Per-row totals over both calls, and one error column naming the stage that failed."""
    out = attempts.copy()
    for name in ("tokens_in", "tokens_out", "latency_s", "cost_usd"):
        out[name] = out[f"teacher_{name}"] + out[f"judge_{name}"]
    out["error"] = ("teacher: " + out["teacher_error"]).fillna("judge: " + out["judge_error"])
    return out


def sft_rows(attempts: pd.DataFrame) -> pd.DataFrame:
    """Kept traces as chat messages: the student's prompt (no label) + the teacher's trace."""
    kept = attempts[attempts["accepted"]]
    messages = [
        [*prompts.student_messages(row, row["context"]),
         {"role": "assistant", "content": f"{THINK_OPEN}{row['reasoning']}{THINK_CLOSE}{prompts.format_answer(row['answer'])}"}]
        for row in kept.to_dict("records")
    ]
    return kept[["cell_line", "pert", "gene", "label", "split"]].assign(messages=pd.Series(messages, index=kept.index, dtype=object))


def tally(attempts: pd.DataFrame) -> Counter:
    """A batch's additive numbers (rows by outcome, calls made and cached, tokens, cost, grades):
    summed over batches they are the run's, without holding its rows."""
    made = {stage: attempts[f"{stage}_called"] for stage in ("teacher", "judge")}
    spent = lambda column: sum(attempts.loc[made[s], f"{s}_{column}"].sum() for s in made)  # noqa: E731
    out = Counter(counts(attempts))
    out.update(
        teacher_calls=int(made["teacher"].sum()),
        judge_calls=int(made["judge"].sum()),
        cached=int(attempts["teacher_cached"].sum() + attempts["judge_cached"].sum()),
        retries=int(attempts["teacher_retries"].sum() + attempts["judge_retries"].sum()),
        tokens_in=int(spent("tokens_in")),
        tokens_out=int(spent("tokens_out")),
        cost_usd=float(spent("cost_usd")),
        tokens_total=int(attempts["tokens_in"].sum() + attempts["tokens_out"].sum()),
        cost_usd_total=float(attempts["cost_usd"].sum()),
        refused=int(attempts["error"].str.endswith(BUDGET_REFUSED, na=False).sum()),
    )
    out.update({f"grade:{grade}": n for grade, n in grade_histogram(attempts).items()})
    return out


def summarize(totals: Counter, wall_s: float) -> dict[str, Any]:
    """The run's numbers from its summed tallies: outcomes, calls made vs answered from cache, tokens and cost."""
    summary: dict[str, Any] = {k: v for k, v in totals.items() if not k.startswith("grade:")}
    summary.update(
        cost_usd=round(totals["cost_usd"], 6),
        cost_usd_total=round(totals["cost_usd_total"], 6),
        acceptance_rate=round(totals["accepted"] / max(1, totals["rows"]), 4),
        grades={k.removeprefix("grade:"): n for k, n in totals.items() if k.startswith("grade:")},
        wall_s=round(wall_s, 2),
        rows_per_s=round(totals["rows"] / max(wall_s, 1e-9), 3),
        tokens=totals["tokens_in"] + totals["tokens_out"],
    )
    return summary


def _sample(samples: dict[str, list[dict]], attempts: pd.DataFrame, sft: pd.DataFrame) -> None:
    """Keep the run's first SAMPLE_TRACES kept and rejected traces, for MLflow."""
    rejected = attempts.loc[~attempts["accepted"], ["tuple_id", "label", "reject_reason", "grade", "answer", "teacher_output", "error"]]
    for name, frame in (("kept", sft), ("rejected", rejected)):
        samples[name] += frame.head(SAMPLE_TRACES - len(samples[name])).to_dict("records")


def _track(summary: dict, samples: dict[str, list[dict]], manifest: Path) -> None:
    from matplotlib.figure import Figure

    numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracking.log_metrics(numbers | {f"grade_{g}": n for g, n in summary["grades"].items()})
    figure = Figure(figsize=(6, 3.5))
    axes = figure.subplots()
    axes.bar(list(summary["grades"]), list(summary["grades"].values()), color="#4c72b0")
    axes.set(title="Judge grades", ylabel="traces")
    tracking.log_figure(figure, "grade_histogram.png")
    tracking.log_dict(samples, "traces_sample.json")
    tracking.log_artifact(manifest)


def run(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Generate, judge and filter traces as `cfg` says; returns the summary (also in the manifest)."""
    g = cfg.generate
    started = time.time()
    tuples = sample_tuples(cfg.data)
    prompt_set = prompts.PromptSet.from_config(g)
    output = Path(g.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    cost = estimate.estimate(tuples, g, g.cache_path or output / "calls.sqlite")
    console.note(estimate.describe(cost, g.max_cost_usd))
    with contextlib.ExitStack() as stack:
        own = None
        if g.teacher.base_url is None or g.judge.base_url is None:
            from synthpert.serving import running

            own = stack.enter_context(running(cfg.serve))  # joins or starts Ray sized for the endpoint
        stack.enter_context(ray_session())
        urls = {"teacher": g.teacher.base_url or own, "judge": g.judge.base_url or own}
        with tracking.stage_run(cfg, STAGE, sections=("data", "generate")) as run_id:
            tracking.log_params(tracking.flatten({"estimate": cost}))
            tracking.log_input_table(tuples[TUPLE_COLUMNS], name="perturbqa-train-sample", source=str(cfg.data.data_dir or "vendored"))
            totals, samples = Counter(), {"kept": [], "rejected": []}
            with TableWriter(output, "attempts", ATTEMPTS_SCHEMA) as attempts_out, TableWriter(output, "sft", SFT_SCHEMA) as sft_out:
                for batch in _stream(cfg, prompt_set, tuples, urls, progress):
                    sft = sft_rows(batch)
                    attempts_out.write(batch)
                    sft_out.write(sft)
                    totals.update(tally(batch))
                    _sample(samples, batch, sft)
            summary = summarize(totals, time.time() - started)
            outputs = {"attempts": attempts_out.entry, "sft": sft_out.entry}
            manifest = write_manifest(
                output,
                STAGE,
                outputs,
                config=cfg.model_dump(mode="json", include={"data", "generate"}),
                config_digest=cfg.digest("data", "generate"),
                template_versions=prompt_set.versions,
                models={"teacher": g.teacher.model, "judge": g.judge.model},
                endpoints=urls,
                counts=summary,
                estimate=cost,
                mlflow_run_id=run_id,
            )
            if run_id is not None:
                _track(summary, samples, manifest)
    if summary["refused"]:
        raise budget_stop("generate.max_cost_usd", g.max_cost_usd, summary["cost_usd"], summary["refused"], summary["rows"])
    return summary | {"output": str(output), "run_id": run_id}
