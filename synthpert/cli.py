"""The `synthpert` command: thin typer wrappers that load the config and call one stage each.

Every command takes `--config FILE` and repeated `--set key.path=value`; with `--json` the last
line printed is one JSON object. Bad input exits 2 with a one-line reason on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from synthpert.config import Config, load_config
from synthpert.errors import SynthPertError

# tracebacks go to a log file (main), not to the terminal as rich's 90-line rendering
app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_enable=False)
config_app = typer.Typer(no_args_is_help=True, help="Inspect the resolved configuration.")
app.add_typer(config_app, name="config")
data_app = typer.Typer(no_args_is_help=True, help="Inspect the bundled PerturbQA data.")
app.add_typer(data_app, name="data")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (default: built-in defaults).")
SetOpt = typer.Option([], "--set", help="Dotted override, e.g. --set train.lora_r=16 (repeatable).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object as the last line.")
YesOpt = typer.Option(False, "--yes", "-y", help="Go ahead when the cost estimate is above generate.confirm_above_usd (no question).")


_run_dir: Path | None = None  # the last resolved config's run_dir: where an unexpected error's log goes


def resolve(config: Optional[Path], overrides: list[str], **flags: Any) -> Config:
    """The config file + --set overrides + explicit CLI flags (flags win; None means 'not given')."""
    global _run_dir
    extra = [f"{key}={json.dumps(value, default=str)}" for key, value in flags.items() if value is not None]
    cfg = load_config(config, [*overrides, *extra])
    _run_dir = Path(cfg.run_dir)
    return cfg


def emit_json(obj: Any) -> None:
    """Print one JSON object on its own last line (the machine-readable result of a command)."""
    sys.stdout.flush()
    print(json.dumps(obj, default=str, sort_keys=True), flush=True)


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Print the fully resolved config as YAML."""
    cfg = resolve(config, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@data_app.command("stats")
def data_stats(
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    split: Optional[str] = typer.Option(None, "--split", help="perturbqa | holdout:<cell_line> (default: data.split)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Another copy of the data (default: the vendored one)."),
    json_: bool = JsonOpt,
) -> None:
    """Pairs per cell line / split / class for the configured selection, and its leakage report."""
    from rich.console import Console
    from rich.table import Table

    from synthpert.data import build_split, describe, leakage_report

    cfg = resolve(config, set_, **{"data.split": split, "data.data_dir": data_dir})
    pairs = build_split(cfg.data)
    counts, leakage = describe(pairs), leakage_report(pairs)
    console = Console(width=max(Console().width, 100))  # pipes default to 80 columns: too narrow
    table = Table(title=f"PerturbQA pairs, split {cfg.data.split}")
    for column in ("cell line", "split", "pairs", "perts", "up", "down", "not DE", "DE %", "up % of DE"):
        table.add_column(column, justify="left" if column in ("cell line", "split") else "right")
    for cell, splits in counts.items():
        for name, c in splits.items():
            up_share = "-" if c["up_share_of_de"] is None else f"{100 * c['up_share_of_de']:.1f}"
            table.add_row(cell, name, f"{c['pairs']:,}", f"{c['perturbations']:,}", f"{c['upregulated']:,}", f"{c['downregulated']:,}",
                          f"{c['not differentially expressed']:,}", f"{100 * c['de_rate']:.1f}", up_share)
    console.print(table)
    leaks = Table(title="Leakage: test items also seen in training (any loaded cell line)")
    for column in ("test cell line", "test perts", "in train", "test pairs", "in train", "same label"):
        leaks.add_column(column, justify="left" if column == "test cell line" else "right")
    for cell, r in leakage["per_cell_line"].items():
        agreement = "-" if r["pair_label_agreement"] is None else f"{100 * r['pair_label_agreement']:.1f} %"
        leaks.add_row(cell, f"{r['test_perturbations']:,}", f"{r['test_perturbations_in_train']:,}", f"{r['test_pairs']:,}", f"{r['test_pairs_in_train']:,}", agreement)
    console.print(leaks)
    if json_:
        emit_json({"split": cfg.data.split, "data_dir": cfg.data.data_dir or "vendored", "rows": len(pairs), "per_cell_line": counts, "leakage": leakage})


SplitOpt = typer.Option(None, "--split", help="perturbqa | holdout:<cell_line> (default: data.split).")
OutDirOpt = typer.Option(None, "--output-dir", help="Report directory (default: evaluate.output_dir).")
BootstrapOpt = typer.Option(None, "--bootstrap", help="Bootstrap replicates for the 95% CIs (default: evaluate.bootstrap; 0: none).")


def _evaluate_config(config: Optional[Path], overrides: list[str], split: Optional[str], output_dir: Optional[Path], bootstrap: Optional[int]) -> Config:
    return resolve(config, overrides, **{"data.split": split, "evaluate.output_dir": output_dir, "evaluate.bootstrap": bootstrap})


def _print_result(result: dict, json_: bool) -> None:
    """The metrics table (per cell line, overall, with CIs), then the JSON line when asked."""
    from synthpert.evaluate import summary_table

    typer.echo(summary_table(result))
    if json_:
        emit_json(result)


@app.command("evaluate")
def evaluate_cmd(
    predictions: Path = typer.Option(..., "--predictions", help="CSV or Parquet: cell_line, pert, gene + p_up, p_down, p_none and/or answer."),
    split: Optional[str] = SplitOpt,
    output_dir: Optional[Path] = OutDirOpt,
    bootstrap: Optional[int] = BootstrapOpt,
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    json_: bool = JsonOpt,
) -> None:
    """Score predictions on the split's test pairs: per-gene AUROC (DE, direction), accuracy, macro-F1, CIs, plots."""
    from synthpert import evaluate as ev

    cfg = _evaluate_config(config, set_, split, output_dir, bootstrap)
    _print_result(ev.run_evaluation(ev.read_predictions(predictions), ev.load_truth(cfg.data), cfg.evaluate, cfg.evaluate.output_dir, predictions_files=[str(predictions)]), json_)


@app.command("baseline")
def baseline_cmd(
    cell_line: str = typer.Option("all", "--cell-line", help="k562 | rpe1 | hepg2 | jurkat | all"),
    method: str = typer.Option("retrieval", "--method", help="retrieval | kernel | twoside | ranker | transfer"),
    importance: bool = typer.Option(False, "--importance", help="ranker: print which features carry the signal (gain share per cell line and task)."),
    split: Optional[str] = SplitOpt,
    output_dir: Optional[Path] = OutDirOpt,
    predictions_out: Optional[Path] = typer.Option(None, "--predictions-out", help="Also write the predictions here (.parquet or .csv)."),
    bootstrap: Optional[int] = BootstrapOpt,
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    json_: bool = JsonOpt,
) -> None:
    """Run a non-LLM baseline on the split's test pairs and evaluate it like any model."""
    from synthpert.baselines import baseline_report
    from synthpert.data.perturbqa import check_cell_lines

    if importance and method != "ranker":
        raise SynthPertError("--importance needs --method ranker")
    cfg = _evaluate_config(config, set_, split, output_dir, bootstrap)
    result = baseline_report(cfg, method, None if cell_line == "all" else check_cell_lines([cell_line]), predictions_out)
    if importance:
        from synthpert.ranker import importance_table

        typer.echo(importance_table(result["baseline"]))
    _print_result(result, json_)


@app.command()
def generate(
    teacher_base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL (default: our own Serve endpoint)."),
    teacher_model: Optional[str] = typer.Option(None, help="Teacher model name at that endpoint."),
    judge_base_url: Optional[str] = typer.Option(None, help="Judge endpoint (default: the teacher's)."),
    judge_model: Optional[str] = typer.Option(None, help="Judge model (default: the teacher's when the endpoint is too)."),
    cell_line: Optional[str] = typer.Option(None, help="Only this cell line's training tuples."),
    split: Optional[str] = typer.Option(None, help="perturbqa | holdout:<cell_line> (traces come from its train part)."),
    fraction: Optional[float] = typer.Option(None, help="Fraction of the training tuples (SynthPert: 0.15)."),
    limit: Optional[int] = typer.Option(None, help="At most this many training tuples."),
    concurrency: Optional[int] = typer.Option(None, help="Calls in flight per endpoint (teacher and judge each)."),
    keep: Optional[str] = typer.Option(None, help="Grades kept, comma-separated (default: excellent)."),
    output: Optional[Path] = typer.Option(None, help="Output directory (default: generate.output_dir)."),
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    yes: bool = YesOpt,
    json_: bool = JsonOpt,
) -> None:
    """Teacher traces for training tuples, judged and filtered: attempts.parquet + sft.parquet.

    API keys come from the env vars named by generate.teacher.api_key_env / generate.judge.api_key_env.
    Re-running the same command resumes: finished calls come from the call cache.
    """
    if cell_line and split:
        raise SynthPertError("use --cell-line or --split, not both")
    if fraction is not None and limit is not None:
        raise SynthPertError("use --fraction or --limit, not both")
    if judge_base_url is None and teacher_base_url is not None:
        judge_base_url, judge_model = teacher_base_url, judge_model or teacher_model
    cfg = resolve(
        config,
        set_,
        **{
            "generate.teacher.base_url": teacher_base_url,
            "generate.teacher.model": teacher_model,
            "generate.judge.base_url": judge_base_url,
            "generate.judge.model": judge_model,
            "generate.teacher.max_concurrency": concurrency,
            "generate.judge.max_concurrency": concurrency,
            "generate.keep": keep.split(",") if keep else None,
            "generate.output_dir": output,
            "data.cell_lines": [cell_line] if cell_line else None,
            "data.split": split,
            "data.fraction": fraction,
            "data.limit": limit,
        },
    )
    if cfg.generate.judge.base_url == cfg.generate.teacher.base_url and cfg.generate.judge.api_key_env is None:
        cfg.generate.judge.api_key_env = cfg.generate.teacher.api_key_env
    from synthpert import estimate, preflight
    from synthpert.generate import run  # heavy (Ray, pandas): only once the input is known to be good

    preflight.confirm(cfg, estimate.for_stages(cfg, ["traces"], cfg.generate.cache_path or cfg.generate.output_dir / "calls.sqlite"), yes)
    summary = run(cfg)
    typer.echo(
        f"{summary['rows']} rows: {summary['accepted']} kept, {summary['rejected_grade']} rejected by grade, "
        f"{summary['rejected_answer']} by answer, {summary['rejected_malformed']} malformed, {summary['errored']} errored; "
        f"{summary['teacher_calls']} teacher + {summary['judge_calls']} judge calls, {summary['cached']} from cache, "
        f"${summary['cost_usd']:.4f} -> {summary['output']}",
        err=True,
    )
    if json_:
        emit_json(summary)


@app.command("serve")
def serve_cmd(
    config: Optional[Path] = typer.Option(
        None, "--config", "-c",
        help="A synthpert config file, or a Ray Serve config file (e.g. serve/local.yaml, run as `serve run` would).",
    ),
    set_: list[str] = typer.Option([], "--set", help="Dotted override, e.g. --set serve.engine=vllm (repeatable)."),
    port: Optional[int] = typer.Option(None, "--port", help="HTTP port (default: serve.port, or the Serve file's)."),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=PATH_OR_URI: serve a LoRA adapter (repeatable)."),
) -> None:
    """Serve the base model and adapters over an OpenAI-compatible API until SIGINT/SIGTERM."""
    from synthpert.serving.adapters import parse_adapter_specs
    from synthpert.serving.launch import is_serve_config_file, serve_until_stopped

    adapters = parse_adapter_specs(adapter)
    if is_serve_config_file(config):
        serve_until_stopped(None, config_file=config, port=port, adapters=adapters, overrides=set_, on_ready=emit_json)
    else:
        serve_until_stopped(resolve(config, set_, **{"serve.port": port}).serve, adapters=adapters, on_ready=emit_json)


@app.command("train")
def train_cmd(
    data: Path = typer.Option(..., "--data", help="Traces directory holding sft.parquet (generate/judge output)."),
    mode: str = typer.Option(..., "--mode", help="cot: the kept reasoning traces; raw: <answer>label</answer> only."),
    output: Path = typer.Option(..., "--output", help="Run directory: adapter/, checkpoints under ray/, manifest.json."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Local HF model dir (default: embedded SmolLM2)."),
    zero_stage: Optional[int] = typer.Option(None, "--zero-stage", help="DeepSpeed ZeRO stage: 2 or 3."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Ray Train workers."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (instead of --epochs)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data (instead of --max-steps)."),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", help="LoRA rank."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its latest checkpoint."),
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    json_: bool = JsonOpt,
) -> None:
    """LoRA fine-tuning on Ray Train + DeepSpeed ZeRO; writes OUTPUT/adapter (a PEFT dir)."""
    from synthpert.train import train

    if max_steps is not None and epochs is not None:
        raise SynthPertError("give --max-steps or --epochs, not both")
    overrides = [*set_, "train.max_steps=null"] if epochs is not None else set_
    flags = {"mode": mode, "base_model": base_model, "zero_stage": zero_stage, "num_workers": num_workers,
             "max_steps": max_steps, "epochs": epochs, "lora_r": lora_r, "output_dir": output}
    cfg = resolve(config, overrides, **{f"train.{k}": v for k, v in flags.items()})
    summary = train(cfg, data, output, resume=resume)
    typer.echo(
        f"trained {summary['steps']} steps: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}, "
        f"{summary['tokens_per_s']:.0f} tokens/s; adapter at {summary['adapter_path']}"
    )
    if json_:
        emit_json(summary)


@app.command("predict")
def predict_cmd(
    adapter: Optional[str] = typer.Option(None, "--adapter", help="LoRA adapter: a PEFT folder or models:/NAME@ALIAS (default: the base model)."),
    mode: str = typer.Option("cot", "--mode", help="cot: reason, then answer; raw: the label only (as the adapter was trained)."),
    split: Optional[str] = SplitOpt,
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many tuples per cell line and part (default: evaluate.limit)."),
    output: Optional[Path] = typer.Option(None, "--output", help="Run folder (default: run_dir); predictions go to OUTPUT/predict-NAME-KEY/."),
    verbose: bool = typer.Option(False, "--verbose", help="Print Ray and Serve output here (default: OUTPUT/logs/)."),
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    json_: bool = JsonOpt,
) -> None:
    """One model over the split's validation and test tuples: predictions.parquet + manifest.json.

    Our endpoint serves the base model (and the adapter). Finished: skipped; re-run after a crash:
    the finished rows come from the call cache. Score it with `synthpert evaluate --predictions`.
    """
    if mode not in ("cot", "raw"):
        raise SynthPertError(f"--mode must be cot or raw, not {mode!r}")
    cfg = resolve(config, set_, **{"data.split": split, "evaluate.limit": limit, "run_dir": output})
    from synthpert.pipeline import predict_one

    result = predict_one(cfg, adapter, mode, verbose=verbose)
    typer.echo(f"{result['rows']} rows ({result['errored']} errored) by {result['model']}: {result['dir']}/predictions.parquet", err=True)
    if json_:
        emit_json(result)


@app.command()
def pipeline(
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    check: bool = typer.Option(False, "--check", help="Only the pre-flight: keys, endpoints, model paths, GPUs, folders."),
    plan: bool = typer.Option(False, "--plan", help="Only say what would run: every stage, its key, run or skip and why."),
    verbose: bool = typer.Option(False, "--verbose", help="Print Ray, Serve, DeepSpeed, MLflow output here (default: RUN_DIR/logs/)."),
    yes: bool = YesOpt,
    json_: bool = JsonOpt,
) -> None:
    """The whole SynthPert pipeline: traces -> train cot + raw -> predict -> evaluate -> register -> report.

    Finished stages (same config and inputs) are skipped, so a re-run resumes after a failure.
    A pre-flight runs first: what the pending stages need is checked before anything starts, and a
    cost estimate above generate.confirm_above_usd is asked about (refused unattended) unless --yes.
    """
    cfg = resolve(config, set_)
    if plan:
        from synthpert.pipeline import plan as make_plan

        steps = make_plan(cfg)
        for step in steps:
            typer.echo(f"{step.stage:<20} {step.key or '?':<12}  {step.action:<4}  {step.reason}")
        if json_:
            emit_json({"run_dir": str(cfg.run_dir), "stages": [dataclasses.asdict(step) for step in steps]})
        return
    if check:
        from synthpert import preflight

        report = preflight.require(cfg)
        typer.echo(report.text())
        if json_:
            emit_json(dataclasses.asdict(report))
        return
    from synthpert.pipeline import run

    result = run(cfg, verbose=verbose, yes=yes)
    typer.echo(f"ran {result['ran'] or 'nothing'}; skipped {result['skipped'] or 'nothing'}; report: {result['report']}", err=True)
    if json_:
        emit_json(result)


def crash_log(exc: BaseException) -> Path:
    """Write `exc`'s traceback to `<run_dir>/logs/` (the system temp folder before a config is read,
    or when run_dir cannot be written) and return the file."""
    import tempfile
    import time
    import traceback

    name = f"error-{time.strftime('%Y%m%d-%H%M%S')}.log"
    text = "".join(traceback.format_exception(exc))
    for folder in ([_run_dir / "logs"] if _run_dir else []) + [Path(tempfile.gettempdir()) / "synthpert-logs"]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return folder / name
        except OSError:
            continue
    raise exc


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one clear line on stderr and exit code 2; anything else one
    line naming the log that holds its traceback, and exit code 1.

    `argv` (default: sys.argv[1:]) lets ray_jobs/ entry points reuse this exact parser.
    """
    try:
        app(args=argv, prog_name="synthpert")
    except SynthPertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as exc:  # noqa: BLE001 - an unexpected failure: one line here, the traceback in the log
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"error: {type(exc).__name__}: {first} (traceback in {crash_log(exc)})", file=sys.stderr)
        raise SystemExit(1) from None
