"""OpenAI-compatible serving on Ray Serve: base model + LoRA adapters, transformers or vLLM engine.

`running(serve_cfg)` is what other stages use: a context manager yielding the base URL (".../v1").
Importing this package imports neither Ray Serve nor vLLM; they load when an app is built.
"""

from __future__ import annotations

from typing import Any

__all__ = ["running"]


def __getattr__(name: str) -> Any:
    if name == "running":
        from synthpert.serving.launch import running

        return running
    raise AttributeError(name)
