"""The `synthpert` command: thin typer wrappers that load the config and call one stage each.

Every command takes `--config FILE` and repeated `--set key.path=value`; with `--json` the last
line printed is one JSON object. Bad input exits 2 with a one-line reason on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from synthpert.config import Config, load_config
from synthpert.errors import SynthPertError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
config_app = typer.Typer(no_args_is_help=True, help="Inspect the resolved configuration.")
app.add_typer(config_app, name="config")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (default: built-in defaults).")
SetOpt = typer.Option([], "--set", help="Dotted override, e.g. --set train.lora_r=16 (repeatable).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object as the last line.")


def resolve(config: Optional[Path], overrides: list[str], **flags: Any) -> Config:
    """The config file + --set overrides + explicit CLI flags (flags win; None means 'not given')."""
    extra = [f"{key}={json.dumps(value, default=str)}" for key, value in flags.items() if value is not None]
    return load_config(config, [*overrides, *extra])


def emit_json(obj: Any) -> None:
    """Print one JSON object on its own last line (the machine-readable result of a command)."""
    sys.stdout.flush()
    print(json.dumps(obj, default=str, sort_keys=True), flush=True)


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Print the fully resolved config as YAML."""
    cfg = resolve(config, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


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


def main() -> None:
    """Entry point: user errors become one clear line on stderr and exit code 2."""
    try:
        app()
    except SynthPertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
