"""Prefilled assistant turns: how the stages make a model continue a partial answer and choose
among fixed strings (vLLM's `continue_final_message` and `guided_choice`, which our endpoint speaks)."""

from __future__ import annotations

from synthpert.config import LABELS

CONTINUE = {"continue_final_message": True, "add_generation_prompt": False}
GUIDED_LABELS = {**CONTINUE, "guided_choice": list(LABELS)}


def continue_with(messages: list[dict], prefix: str) -> list[dict]:
    """The chat plus a partial assistant turn for the model to continue."""
    return [*messages, {"role": "assistant", "content": prefix}]
