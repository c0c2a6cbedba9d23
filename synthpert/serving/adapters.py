"""Where a served LoRA adapter comes from: a local PEFT folder or an MLflow model URI.

`resolve_adapter(ref)` is the one hook every engine calls before loading an adapter, so new
sources (a registry, object storage) are added here and nowhere else.

Registry layout (written by the train/pipeline stage): `models:/NAME@ALIAS` (or
`models:/NAME/VERSION`) is a pyfunc model whose artifacts hold the PEFT adapter folder under the
artifact key `adapter` (`log_model(..., artifacts={"adapter": dir})`). It is downloaded into the
synthpert cache; the MLmodel file says where that artifact is (else the shallowest folder with an
`adapter_config.json` is used). The tracking server comes from MLFLOW_TRACKING_URI in the
replica's environment.
"""

from __future__ import annotations

import json
from pathlib import Path

from synthpert.errors import SynthPertError
from synthpert.models import cache_dir, model_name
from synthpert.serving.protocol import APIError

ADAPTER_CONFIG = "adapter_config.json"
REGISTRY_PREFIX = "models:/"


def parse_adapter_specs(specs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`NAME=PATH_OR_URI` strings (CLI --adapter) -> {name: ref}."""
    out = {}
    for spec in specs:
        name, sep, ref = spec.partition("=")
        if not sep or not name.strip() or not ref.strip():
            raise SynthPertError(f"--adapter {spec!r} is not of the form NAME=PATH_OR_URI")
        out[name.strip()] = ref.strip()
    return out


def check_adapter_names(adapters: dict[str, str], served_model_name: str) -> None:
    """Adapter names must not shadow the base model's name (the request's `model` picks one)."""
    if served_model_name in adapters:
        raise SynthPertError(f"adapter name {served_model_name!r} clashes with serve.served_model_name")
    for name in adapters:
        if not name or any(c.isspace() for c in name) or ":" in name:
            raise SynthPertError(f"adapter name {name!r} must be non-empty, without spaces or ':'")


def resolve_adapter(ref: str, base_model: str | None | object = ...) -> Path:
    """A local PEFT adapter folder for a config value (local path or `models:/…` URI); given the
    served `base_model` (serve.model), one trained on another base model is refused."""
    if ref.startswith(REGISTRY_PREFIX):
        path = _from_registry(ref)
    else:
        path = Path(ref).expanduser()
        if not (path / ADAPTER_CONFIG).is_file():
            raise SynthPertError(f"adapter path {path} is not a PEFT adapter folder (no {ADAPTER_CONFIG} there)")
    if base_model is not ...:
        check_base_model(ref, path, base_model)
    return path


def check_base_model(ref: str, path: Path, base_model: str | None) -> None:
    """An adapter of the right shapes loads on another base model too, and then answers garbage
    without a word: its recorded base model (adapter_config.json) must be the one served."""
    trained_on = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if trained_on and model_name(trained_on) != model_name(base_model):
        raise SynthPertError(f"adapter {ref} was trained on {trained_on}, but this endpoint serves "
                             f"{base_model or 'the embedded model'} (serve.model): serve it on its own base model")


def _from_registry(uri: str) -> Path:
    """Download a registered model (fresh each time: an alias may point elsewhere by now)."""
    import tempfile

    import mlflow

    root = cache_dir() / "adapters"
    root.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="registry-", dir=root))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target))
    except Exception as exc:  # mlflow raises several types; all mean "cannot fetch"
        raise SynthPertError(f"cannot download adapter {uri}: {exc}") from exc
    declared = _pyfunc_artifact(target, "adapter")
    if declared is not None and (declared / ADAPTER_CONFIG).is_file():
        return declared
    found = sorted(target.rglob(ADAPTER_CONFIG), key=lambda p: len(p.parts))
    if not found:
        raise SynthPertError(f"registered model {uri} holds no PEFT adapter ({ADAPTER_CONFIG} not found)")
    return found[0].parent


def _pyfunc_artifact(model_dir: Path, key: str) -> Path | None:
    """Where a pyfunc model keeps the artifact logged under `key` (from its MLmodel file)."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        return None
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    entry = (flavor.get("artifacts") or {}).get(key)
    return model_dir / entry["path"] if isinstance(entry, dict) and "path" in entry else None


def load_error(name: str, exc: BaseException) -> APIError:
    """A failed adapter load fails that request only; the base model and other adapters stay up."""
    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return APIError(500, f"adapter {name!r} could not be loaded: {reason}", type_="adapter_load_error")
