"""The SynthPert pipeline: traces (teacher + judge) -> train cot and raw -> predict -> evaluate
-> register -> report.

Every stage writes into `<run_dir>/<stage>-<key>/`, where the key hashes what the stage depends
on: its config sections (output paths excluded) and its inputs' digests. A directory that holds
`stage.json` is a finished stage and is skipped, so a re-run after a failure resumes where it
stopped and a second run of the same config recomputes nothing. All stage runs nest under one
MLflow parent run per invocation.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from synthpert import prompts, tracking
from synthpert.artifacts import _atomic_write, read_manifest
from synthpert.config import LABELS, Config, EndpointConfig
from synthpert.errors import SynthPertError

STAGE_FILE = "stage.json"
STUDENT = "student-cot"  # the served names of the two adapters
RAW = "student-raw"
CHAMPION = "champion"
MODES = ("cot", "raw")  # the two students: reasoning traces, and the raw label only
SCORES = ("auroc_de", "auroc_dir", "accuracy", "macro_f1", "trivial_accuracy")


def _strip_outputs(tree: Any) -> Any:
    """A config subtree without output locations: where results go does not change what they are."""
    if isinstance(tree, dict):
        return {k: _strip_outputs(v) for k, v in tree.items() if k not in ("output_dir", "cache_path")}
    return tree


def stage_key(cfg: Config, sections: tuple[str, ...], **inputs: Any) -> str:
    dumped = cfg.model_dump(mode="json")
    payload = {"sections": {s: _strip_outputs(dumped[s]) for s in sections}, "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def official_score(metrics: dict) -> float:
    """One number to rank models by: the mean of the official DE and direction AUROCs."""
    values = [metrics[k] for k in ("auroc_de", "auroc_dir") if metrics.get(k) is not None]
    return sum(values) / len(values) if values else float("nan")


class Pipeline:
    """Runs the stages in order; remembers which ran and which were skipped."""

    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg = cfg
        self.root = Path(cfg.run_dir).resolve()
        self.progress = progress
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def stage(self, name: str, key: str, fn: Callable[[Path], dict]) -> dict:
        """`fn(out_dir)` once per key; its JSON result is kept in `stage.json` for later runs."""
        finished = self.result(name, key)
        if finished is not None:
            self.skipped.append(name)
            return finished
        out = self.root / f"{name}-{key}"
        done = out / STAGE_FILE
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        result = fn(out) | {"stage": name, "key": key, "dir": str(out), "wall_s": round(time.time() - started, 2)}
        _atomic_write(done, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2, sort_keys=True, default=str)))
        self.ran.append(name)
        return result

    def is_done(self, name: str, key: str) -> bool:
        return (self.root / f"{name}-{key}" / STAGE_FILE).is_file()

    def result(self, name: str, key: str) -> dict | None:
        """A finished stage's result, None when it has not run."""
        return json.loads((self.root / f"{name}-{key}" / STAGE_FILE).read_text()) if self.is_done(name, key) else None

    # ---- stage keys: what each stage depends on -----------------------------------------------
    def traces_key(self) -> str:
        # the prompts' versions (templates, rubric, principles, context text) are inputs: traces written
        # with other wording are regenerated, never reused
        versions = prompts.PromptSet.from_config(self.cfg.generate).versions
        return stage_key(self.cfg, ("data", "generate"), prompts=versions)

    def train_key(self, traces: dict, mode: str) -> str:
        validation = (self.cfg.data.validation_fraction, self.cfg.data.seed)
        return stage_key(self.cfg, ("train",), mode=mode, sft=traces["sft_sha256"], validation=validation)

    def predict_keys(self, models: dict[str, dict]) -> dict[str, str]:
        versions = prompts.PromptSet.from_config(self.cfg.generate).versions
        asked = [versions["student"], versions["student_direction"]]
        return {name: stage_key(self.cfg, ("data", "evaluate"), model=spec["identity"], prompts=asked) for name, spec in models.items()}

    # ---- stages -----------------------------------------------------------------------------
    def traces(self) -> dict:
        from synthpert import generate

        def run(out: Path) -> dict:
            cfg = self.cfg.model_copy(deep=True)
            cfg.generate.output_dir = out
            summary = generate.run(cfg, progress=self.progress)
            if summary["accepted"] == 0:
                raise SynthPertError(
                    f"no trace was kept out of {summary['rows']} (grades {summary['grades']}): nothing to train on; "
                    "loosen generate.keep / generate.require_answer_match or use a stronger teacher"
                )
            return {"summary": summary, "sft_sha256": read_manifest(out)["outputs"]["sft"]["sha256"], "run_id": summary["run_id"]}

        return self.stage("traces", self.traces_key(), run)

    def train(self, traces: dict, mode: str) -> dict:
        from synthpert.train import train

        def run(out: Path) -> dict:
            cfg = self.cfg.model_copy(deep=True)
            cfg.train.mode = mode  # registered under its own name (tracking.registered_name)
            return train(cfg, traces["dir"], output_dir=out, resume=True)  # a crashed attempt continues

        return self.stage(f"train-{mode}", self.train_key(traces, mode), run)

    def predictions(self, models: dict[str, dict]) -> dict[str, dict]:
        """Every model over the same test tuples; our endpoint is started only if some are missing."""
        from synthpert import predict
        from synthpert.generate import api_key

        keys = self.predict_keys(models)
        if all(self.is_done(f"predict-{name}", keys[name]) for name in models):
            return {name: self.stage(f"predict-{name}", keys[name], None) for name in models}
        tuples = predict.eval_tuples(self.cfg)
        adapters = {name: spec["adapter"] for name, spec in models.items() if spec.get("adapter")}
        with contextlib.ExitStack() as stack:
            own_url = None
            if any(spec["endpoint"].base_url is None for spec in models.values()):
                from synthpert.serving import running

                serve_cfg = self.cfg.serve.model_copy(update={"adapters": {**self.cfg.serve.adapters, **adapters}})
                own_url = stack.enter_context(running(serve_cfg))

            def run(out: Path, spec: dict) -> dict:
                endpoint: EndpointConfig = spec["endpoint"]
                frame = predict.predict(
                    self.cfg, tuples, endpoint, endpoint.base_url or own_url, spec["mode"], out,
                    api_key=api_key(endpoint, self.cfg), score=endpoint.base_url is None, progress=self.progress,
                )
                return {"rows": len(frame), "errored": int(frame["llm_error"].notna().sum()), "model": endpoint.model}

            # all models at once: their rows share the endpoint's decode batches; a failure surfaces
            # after the others have finished (and been kept)
            with ThreadPoolExecutor(len(models)) as pool:
                futures = {name: pool.submit(self.stage, f"predict-{name}", keys[name], functools.partial(run, spec=spec))
                           for name, spec in models.items()}
            return {name: future.result() for name, future in futures.items()}

    def evaluate(self, predictions: dict[str, dict]) -> dict:
        """Every model and baseline on the validation tuples (what choices are made on) and on the
        test tuples (reported only): `models` holds the test metrics, `validation` the others."""
        from synthpert import evaluate
        from synthpert.artifacts import read_table
        from synthpert.data import evaluation_view, load_split

        digests = {name: read_manifest(p["dir"])["outputs"]["predictions"]["sha256"] for name, p in predictions.items()}

        def run(out: Path) -> dict:
            truth = load_split(self.cfg.data)
            frames = {name: read_table(p["dir"], "predictions") for name, p in predictions.items()}
            results: dict[str, dict] = {"validation": {}, "models": {}}
            for part, where in (("validation", "validation"), ("test", "models")):
                view = evaluation_view(truth, part)
                asked = {name: frame[frame["split"] == part] for name, frame in frames.items()}
                if next(iter(asked.values())).empty:
                    continue
                asked.update(baseline_predictions(self.cfg, view, next(iter(asked.values()))[["cell_line", "pert", "gene"]]))
                for name, frame in asked.items():
                    metrics = evaluate.evaluate(evaluate.check_predictions(frame.drop(columns=["split"], errors="ignore"), name), view,
                                                bootstrap=self.cfg.evaluate.bootstrap, seed=self.cfg.evaluate.seed, progress=self.progress)
                    evaluate.write_report(metrics, out / part / name)
                    results[where][name] = metrics
            return results

        return self.stage("evaluate", stage_key(self.cfg, ("data", "evaluate"), predictions=digests), run)

    def register(self, student: dict, validation: dict, test: dict, evaluation_key: str) -> dict:
        """Tag the student's model version with its validation and test scores; alias it champion
        if it beats the holder on VALIDATION (test scores are reported, never used to choose)."""
        name = tracking.registered_name(self.cfg)

        def run(out: Path) -> dict:
            if not student.get("model_version") or not name:
                return {"registered": False}
            tags = {f"synthpert.{part}.{k}": v for part, scores in (("validation", validation), ("test", test))
                    for k, v in scores.items() if isinstance(v, (int, float))}
            return tracking.promote_if_better(name, student["model_version"], official_score(validation), CHAMPION,
                                              tags={**tags, "synthpert.split": self.cfg.data.split})

        key = stage_key(self.cfg, ("train", "tracking"), model=student.get("model_uri"), version=student.get("model_version"),
                        evaluation=evaluation_key)
        return self.stage("register", key, run)

    def report(self, traces: dict, trained: dict[str, dict], evaluation: dict) -> dict:
        from synthpert import report

        def run(out: Path) -> dict:
            paths = report.write(out, self.cfg, traces=traces, trained=trained, evaluation=evaluation)
            return {name: str(p) for name, p in paths.items()}

        return self.stage("report", stage_key(self.cfg, (), evaluation=evaluation["key"], traces=traces["key"]), run)


def baseline_predictions(cfg: Config, truth: pd.DataFrame, asked: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Non-LLM predictions for the tuples the LLMs were asked: always-"not DE", the GO baselines,
    the learned ranker and, for a held-out cell line, the lookup of the same pair in the other
    lines. `truth` is an evaluation view (its "test" rows are the part being scored); the
    baselines fit, and choose their hyper-parameters by perturbation-grouped folds, on its train
    rows only, and predict the asked tuples alone."""
    from synthpert.baselines import go_knowledge, run_baseline

    knowledge = go_knowledge(cfg.evaluate, cfg.data.data_dir)  # read once for every method
    methods = ["retrieval", "kernel", "twoside", "ranker"] + (["transfer"] if cfg.data.split.startswith("holdout:") else [])
    asked = asked[["cell_line", "pert", "gene"]].astype(str).reset_index(drop=True)
    out = {"trivial": asked.assign(p_up=0.0, p_down=0.0, p_none=1.0, answer=LABELS[2])}
    for method in methods:
        out[method], _ = run_baseline(truth, method, cfg.evaluate, knowledge=knowledge, progress=False, query=asked)
    return out


def models_to_evaluate(cfg: Config, trained: dict[str, dict]) -> dict[str, dict]:
    """Student (cot adapter), the raw-label baseline, the base model zero-shot, the teacher if remote."""
    ours = lambda name: cfg.generate.teacher.model_copy(update={"base_url": None, "model": name, "temperature": 0.0})  # noqa: E731
    models = {
        STUDENT: {"endpoint": ours(STUDENT), "mode": "cot", "adapter": trained["cot"]["adapter_path"], "identity": trained["cot"]["key"]},
        RAW: {"endpoint": ours(RAW), "mode": "raw", "adapter": trained["raw"]["adapter_path"], "identity": trained["raw"]["key"]},
        "base": {"endpoint": ours(cfg.serve.served_model_name), "mode": "cot", "identity": cfg.serve.model or "embedded"},
    }
    teacher = cfg.generate.teacher
    if teacher.base_url is not None:
        models["teacher"] = {"endpoint": teacher.model_copy(update={"temperature": 0.0}), "mode": "cot",
                             "identity": f"{teacher.base_url}|{teacher.model}"}
    return models


def pending(cfg: Config) -> list[str]:
    """The stages a run of this config would compute rather than skip, the prediction stages by
    model (`predict-teacher`, ...): what the pre-flight must check. Evaluation, registration and
    the report follow from them and call nothing outside."""
    pipeline = Pipeline(cfg, progress=False)
    traces = pipeline.result("traces", pipeline.traces_key())
    trained = {mode: traces and pipeline.result(f"train-{mode}", pipeline.train_key(traces, mode)) for mode in MODES}
    todo = ([] if traces else ["traces"]) + [f"train-{mode}" for mode, result in trained.items() if not result]
    if todo:  # the students' keys are not known before they are trained: every prediction runs
        unknown = {mode: {"adapter_path": None, "key": None} for mode in MODES}
        return todo + [f"predict-{name}" for name in models_to_evaluate(cfg, unknown)]
    keys = pipeline.predict_keys(models_to_evaluate(cfg, trained))
    return [f"predict-{name}" for name, key in keys.items() if not pipeline.is_done(f"predict-{name}", key)]


def run(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """The whole pipeline; returns what ran, what was skipped, the metrics and where the report is.
    The pre-flight runs first: a missing key, model, GPU or folder stops it before anything starts."""
    from synthpert import preflight
    from synthpert.cluster import ray_session
    from synthpert.serving.app import cluster_cpus

    preflight.require(cfg)
    pipeline = Pipeline(cfg, progress)
    needs = max(cluster_cpus(cfg.serve), cfg.train.num_workers * cfg.train.cpus_per_worker)
    with ray_session(needs), tracking.pipeline_run(cfg) as parent_id:
        traces = pipeline.traces()
        trained = {mode: pipeline.train(traces, mode) for mode in MODES}
        predictions = pipeline.predictions(models_to_evaluate(cfg, trained))
        evaluation = pipeline.evaluate(predictions)
        pick = lambda models: {name: {k: m.get(k) for k in SCORES} for name, m in models.items()}  # noqa: E731
        scores, validation = pick(evaluation["models"]), pick(evaluation["validation"])
        registered = pipeline.register(trained["cot"], validation.get(STUDENT, {}), scores[STUDENT], evaluation["key"])
        report = pipeline.report(traces, trained, evaluation)
        tracking.set_tags({
            "synthpert.traces_dir": traces["dir"], "synthpert.traces_run_id": traces.get("run_id"),
            "synthpert.train_run_id": trained["cot"].get("mlflow_run_id"), "synthpert.model_uri": trained["cot"].get("model_uri"),
            "synthpert.model_version": registered.get("version"),
        })
        tracking.log_metrics({f"{part}{name}.{k}": v for part, models in (("", scores), ("validation.", validation))
                              for name, s in models.items() for k, v in s.items() if v is not None})
        tracking.log_artifact(report["markdown"], "report")
        tracking.log_artifact(report["html"], "report")
    return {
        "ran": pipeline.ran, "skipped": pipeline.skipped, "mlflow_parent_run_id": parent_id,
        "scores": scores, "validation_scores": validation, "registered": registered, "report": report["markdown"], "run_dir": str(pipeline.root),
    }
