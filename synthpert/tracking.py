"""MLflow tracking: the only module that talks to MLflow.

Every stage runs inside `stage_run(...)`. A pipeline sets `SYNTHPERT_PARENT_RUN_ID` so stage
runs started anywhere (other processes, Ray jobs) nest under its parent run. Parameters come
from the config, which holds env-var *names* only; as a second guard, any value equal to a
secret read from those env vars is redacted before it reaches MLflow.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from synthpert.config import Config, TrackingConfig

PARENT_ENV = "SYNTHPERT_PARENT_RUN_ID"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
REDACTED = "***"


def setup(cfg: TrackingConfig) -> None:
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_experiment(cfg.experiment)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {'a.b.c': 'value'} with values as strings (MLflow params are flat)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name] = text[:MAX_PARAM_CHARS]
    return flat


def _secrets(cfg: Config) -> set[str]:
    names = {cfg.generate.teacher.api_key_env, cfg.generate.judge.api_key_env, cfg.serve.api_key_env}
    return {os.environ[n] for n in names if n and os.environ.get(n)}


def redact(values: dict[str, str], secrets: set[str]) -> dict[str, str]:
    """Replace any secret appearing inside a value; keys stay as they are."""
    out = {}
    for key, value in values.items():
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        out[key] = value
    return out


@contextlib.contextmanager
def stage_run(
    cfg: Config, stage: str, sections: tuple[str, ...] = (), params: dict | None = None, tags: dict | None = None
) -> Iterator[str | None]:
    """Open an MLflow run for one stage; yields its run id (None when tracking is disabled).

    The config sections named in `sections` are logged as parameters, plus `params`.
    """
    if not cfg.tracking.enabled:
        yield None
        return
    import mlflow

    setup(cfg.tracking)
    parent = os.environ.get(PARENT_ENV)
    active = mlflow.active_run()
    run_tags = {"synthpert.stage": stage, **{k: str(v) for k, v in (tags or {}).items()}}
    with mlflow.start_run(
        run_name=stage,
        nested=active is not None,
        parent_run_id=None if active is not None else parent,
        tags=run_tags,
    ) as run:
        dumped = cfg.model_dump(mode="json")
        values = flatten({s: dumped[s] for s in sections})
        values.update(flatten(params or {}))
        log_params(values, _secrets(cfg))
        yield run.info.run_id


def log_params(values: dict[str, Any], secrets: set[str] = frozenset()) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.log_params(redact({k: str(v)[:MAX_PARAM_CHARS] for k, v in values.items()}, secrets))


def log_metrics(values: dict[str, float], step: int | None = None) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.log_metrics({k: float(v) for k, v in values.items() if v is not None}, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or a whole directory."""
    import mlflow

    if mlflow.active_run() is None:
        return
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_dict(obj: Any, artifact_file: str) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.log_dict(obj, artifact_file)


def log_figure(figure: Any, artifact_file: str) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.log_figure(figure, artifact_file)


def log_input_table(frame: Any, name: str, source: str, context: str = "input") -> None:
    """Record a pandas table as the run's input dataset (name, digest, schema, source)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    dataset = mlflow.data.from_pandas(frame, source=source, name=name)
    mlflow.log_input(dataset, context=context)


def set_tags(tags: dict[str, Any]) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


@contextlib.contextmanager
def pipeline_run(cfg: Config) -> Iterator[str | None]:
    """The parent run of one pipeline invocation; stage runs, in this process or not, nest under it."""
    if not cfg.tracking.enabled:
        yield None
        return
    import mlflow

    setup(cfg.tracking)
    with mlflow.start_run(run_name="pipeline", tags={"synthpert.stage": "pipeline"}) as run:
        log_params(flatten(cfg.model_dump(mode="json")), _secrets(cfg))
        previous = os.environ.get(PARENT_ENV)
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            yield run.info.run_id
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous


SCORE_TAG = "synthpert.score"


def registered_name(cfg: Config) -> str | None:
    """The registry name a run's adapter goes under: the raw-label baseline and each hold-out
    split get their own, so neither ever competes with the official-split cot student."""
    from synthpert.data import parse_split

    name = cfg.train.registered_model_name
    if not name:
        return None
    held = parse_split(cfg.data.split)
    return name + ("-raw" if cfg.train.mode == "raw" else "") + (f"-holdout-{held}" if held else "")


REFUSED_TAG = "synthpert.refused"


def promote_if_better(name: str, version: str, score: float, alias: str, tags: dict[str, Any] | None = None,
                      refused: str | None = None) -> dict[str, Any]:
    """Tag a model version with its score; point `alias` at it only if it beats the alias's holder.
    `score` must be a validation score: the alias is a choice, never made on test labels. `refused`
    says why the version may not hold the alias whatever its score (its score is on fewer pairs
    than the others'): it is tagged with the reason and never promoted."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    for key, value in {**(tags or {}), SCORE_TAG: score, **({REFUSED_TAG: refused} if refused else {})}.items():
        client.set_model_version_tag(name, version, key, str(value))
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no holder yet
        holder = None
    held = float(holder.tags.get(SCORE_TAG, "nan")) if holder is not None else None
    promote = not refused and (holder is None or not held == held or score > held)  # held != held: NaN, an unscored holder
    if promote:
        client.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": version, "score": score, "previous": None if holder is None else str(holder.version),
            "previous_score": held, "promoted": promote, "uri": f"models:/{name}@{alias}", "refused": refused}


def portable_uri(uri: str) -> str:
    """The tracking URI with a relative sqlite/file path made absolute, valid from any cwd (Ray workers)."""
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme) and not uri[len(scheme) :].startswith("/"):
            return scheme + str(Path(uri[len(scheme) :]).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


class RunLogger:
    """Metrics into an existing run from another process (a Ray Train worker), without opening or
    closing it: the driver owns the run's lifecycle."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=batch)
