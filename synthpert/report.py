"""The pipeline report: every model beside the baselines, per cell line, with CIs, plots and cost.

One list of sections is rendered twice, as Markdown (report.md) and HTML (report.html), next to
copies of the evaluation plots, so the folder can be read, shared or logged to MLflow as it is.
"""

from __future__ import annotations

import html
import shutil
from pathlib import Path
from typing import Any

from synthpert.config import Config
from synthpert.results import EvaluateResult, Metrics, TracesResult, TrainResult

METRICS = (("auroc_de", "AUROC DE"), ("auroc_dir", "AUROC dir"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1"))
NOTE = (
    "AUROC is the official PerturbQA metric: per read-out gene over the test pairs, averaged over genes "
    "(DE: p_up + p_down; direction: p_up / (p_up + p_down) on DE pairs). Accuracy is nearly trivial on this "
    "data: compare it with `trivial acc.` (always \"not differentially expressed\"). Brackets: bootstrap 95 % CI "
    "over perturbations."
)


def _fmt(value: Any, ci: list | None = None) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    text = f"{value:.3f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)
    if ci and None not in ci:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def _coverage(m: Metrics) -> str:
    return "-" if m.answers is None else f"{m.answers.coverage:.1%}"


def _errors(m: Metrics) -> str:
    """Failed calls (pairs without a prediction), and failed direction questions (derived direction scored)."""
    if m.answers is None:
        return "-"
    return f"{m.answers.errors:,}" + (f" (+{m.answers.direction_errors:,} dir.)" if m.answers.direction_errors else "")


def _name(name: str, *parts: Metrics) -> str:
    """The model's name, marked where it answered under evaluate.min_coverage of a part's pairs."""
    return name + (" (not ranked)" if any(m.ranked is False for m in parts) else "")


def _metric_rows(models: dict[str, Metrics], scope: str | None = None) -> list[list[str]]:
    rows = []
    for name, result in models.items():
        m = result if scope is None else result.per_cell_line.get(scope)
        if m is None:
            continue
        rows.append([_name(name, result), *(_fmt(getattr(m, key), m.ci.get(key)) for key, _ in METRICS), _fmt(m.trivial_accuracy),
                     _fmt(m.n), _coverage(m), _errors(m)])
    return rows


def _side_by_side(evaluation: EvaluateResult) -> tuple[list[str], list[list[str]]]:
    """Every model's validation and test figures in one row: the champion is chosen on the first."""
    headers = ["model", "val AUROC DE", "val AUROC dir", "val n", "val coverage", "val errors", "test AUROC DE", "test AUROC dir",
               "test accuracy", "test macro-F1", "trivial acc.", "test n", "test coverage", "test errors"]
    rows = []
    for name, test in evaluation.models.items():
        val = evaluation.validation.get(name, Metrics())
        rows.append([_name(name, val, test), _fmt(val.auroc_de), _fmt(val.auroc_dir), _fmt(val.n), _coverage(val), _errors(val),
                     *(_fmt(getattr(test, k), test.ci.get(k)) for k in ("auroc_de", "auroc_dir", "accuracy", "macro_f1")),
                     _fmt(test.trivial_accuracy), _fmt(test.n), _coverage(test), _errors(test)])
    return headers, rows


def pairs_note(cfg: Config, evaluation: EvaluateResult) -> str:
    """Which pairs every table compares on, and how many of those asked that leaves out."""
    parts = []
    for part, models in (("validation", evaluation.validation), ("test", evaluation.models)):
        asked = max((m.answers.asked for m in models.values() if m.answers), default=None)
        if part in evaluation.left_out and asked:
            left = evaluation.left_out[part]
            parts.append(f"{part}: {asked - left:,} of {asked:,} asked pairs, {left:,} left out")
    return ("Like with like: in every table, each model and baseline is scored on the pairs that every ranked model answered ("
            + ("; ".join(parts) or "not counted") + f"). Coverage is the share of its pairs a model answered; errors are failed calls (the pair has no "
            "prediction), and `dir.` failed separate direction questions (the pair keeps its DE scores, its derived direction is "
            f"scored). A model under evaluate.min_coverage ({cfg.evaluate.min_coverage}) in either part is marked `not ranked`: "
            "scored on its answers among those pairs only (its `n` is smaller), it does not narrow the others' pairs and cannot "
            "take the champion alias.")


def scoring_note(cfg: Config) -> str:
    """How the LLM scores were made: engine, dtype, scoring contract, direction protocol, split."""
    serve = cfg.serve.resolved()
    dtype = serve.engine_kwargs.get("dtype") or serve.dtype
    direction = ("asked as its own two-choice question" if cfg.evaluate.direction == "separate"
                 else "derived from the three-way scores, p_up / (p_up + p_down)")
    return (f"Served by our endpoint, engine `{serve.engine}` ({dtype}). Scoring contract: after the model's answer "
            "prefix (its reasoning, then `<answer>`), each label's score is the model's own unconstrained summed "
            "log-likelihood of the label's tokens (guided_choice `choice_logprobs`, the same on both engines); "
            f"p_up / p_down / p_none are their softmax. Direction: {direction}. Split `{cfg.data.split}`; validation: "
            f"{cfg.data.validation_fraction:.0%} of each line's training perturbations (seed {cfg.data.seed}), never "
            "trained on; the champion alias moves on the validation score only, test scores are reported, never used "
            "to choose.")


def sections(cfg: Config, traces: TracesResult, trained: dict[str, TrainResult], evaluation: EvaluateResult) -> list[tuple[str, Any]]:
    """(title, content) pairs; content is text, a table (headers, rows) or a list of images."""
    models = evaluation.models
    headers = ["model", *(label for _, label in METRICS), "trivial acc.", "n", "coverage", "errors"]
    cells = sorted({c for m in models.values() for c in m.per_cell_line})
    summary = traces.summary
    grades = summary.grades
    out: list[tuple[str, Any]] = [
        ("Setting", f"split `{cfg.data.split}`, cell lines {', '.join(cfg.data.cell_lines)}; teacher `{cfg.generate.teacher.model}`, "
                    f"judge `{cfg.generate.judge.model}`, student base `{cfg.train.base_model or 'embedded SmolLM2-135M-Instruct'}`; "
                    f"keep {cfg.generate.keep}, answer must match: {cfg.generate.require_answer_match}; "
                    + (f"validation and test pairs: {cfg.evaluate.limit} of each per cell line, drawn as whole read-out genes (class shares are not "
                       "the test set's; the AUROCs rest on a few genes)." if cfg.evaluate.limit else "test pairs: all.")),
        ("Validation and test, side by side", _side_by_side(evaluation)),
        ("Pairs compared", pairs_note(cfg, evaluation)),
        ("How scores were made", scoring_note(cfg)),
        ("How to read this", NOTE),
    ]
    out += [(f"Cell line {cell}", (headers, _metric_rows(models, cell))) for cell in cells]
    out.append(("Traces (teacher + judge)", (
        ["rows", "kept", "rejected by grade", "rejected by answer", "errored", "tokens", "cost (USD)"],
        [[_fmt(getattr(summary, k)) for k in ("rows", "accepted", "rejected_grade", "rejected_answer", "errored", "tokens")]
         + [f"{summary.cost_usd:.4f}"]],
    )))
    out.append(("Judge grades", (list(grades), [[_fmt(v) for v in grades.values()]])))
    out.append(("Training", (
        ["mode", "steps", "first loss", "final loss", "val loss", "tokens/s", "model"],
        [[mode, *(_fmt(getattr(t, k)) for k in ("steps", "first_loss", "final_loss", "val_loss", "tokens_per_s")), t.model_uri or "-"]
         for mode, t in trained.items()],
    )))
    figures = [f"test/{name}/{png}" for name, m in models.items() if m.n != 0 for png in ("confusion.png", "auroc_per_gene.png")]
    out.append(("Confusion matrices and per-gene AUROC", figures))
    return out


def _md(title: str, content: Any) -> str:
    if isinstance(content, str):
        body = content
    elif isinstance(content, tuple):
        head, rows = content
        body = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)])
    else:
        body = "\n".join(f"![{p}]({p})" for p in content)
    return f"## {title}\n\n{body}\n"


def _html(title: str, content: Any) -> str:
    if isinstance(content, str):
        body = f"<p>{html.escape(content)}</p>"
    elif isinstance(content, tuple):
        head, rows = content
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        body_rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        body = f"<table><thead><tr>{cells}</tr></thead><tbody>{body_rows}</tbody></table>"
    else:
        body = "".join(f'<figure><img src="{html.escape(p)}" alt="{html.escape(p)}"><figcaption>{html.escape(p)}</figcaption></figure>' for p in content)
    return f"<h2>{html.escape(title)}</h2>\n{body}\n"


STYLE = "body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child{text-align:left}img{max-width:32em}"


def write(out: Path, cfg: Config, traces: TracesResult, trained: dict[str, TrainResult], evaluation: EvaluateResult) -> dict[str, Path]:
    """report.md + report.html (+ the evaluation plots they show) in `out`."""
    out = Path(out)
    for name in evaluation.models:
        for png in Path(evaluation.dir, "test", name).glob("*.png"):
            (out / "test" / name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(png, out / "test" / name / png.name)
    parts = sections(cfg, traces, trained, evaluation)
    title = "SynthPert pipeline report"
    markdown = out / "report.md"
    markdown.write_text(f"# {title}\n\n" + "\n".join(_md(t, c) for t, c in parts))
    page = out / "report.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head>"
                    f"<body><h1>{title}</h1>\n" + "".join(_html(t, c) for t, c in parts) + "</body></html>")
    return {"markdown": markdown, "html": page}
