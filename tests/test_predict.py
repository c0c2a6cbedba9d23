"""PredictActor's rows, against the loopback fake API (the official openai client over HTTP)."""

import asyncio

import pandas as pd
import pytest

from synthpert import prompts
from synthpert.config import LABELS, EndpointConfig
from synthpert.evaluate import answer_counts, check_predictions
from synthpert.llm.cache import CallCache
from synthpert.predict import PROBS, PredictActor
from tests.conftest import free_port
from tests.fake_api import FakeAPI, Faults, content_key


@pytest.mark.unit
def test_a_failed_direction_question_keeps_the_row_and_its_de_scores(tmp_path):
    """evaluate.direction = separate asks the direction of truly DE pairs only: its failure once
    failed the whole row, so DE positives alone went missing from the DE AUROC. The row stands
    (its direction then derived), the failure in its own column."""
    row = {"tuple_id": "t0", "cell_line": "k562", "pert": "P1", "gene": "G1", "label": LABELS[0], "split": "test", "context": ""}
    endpoint = EndpointConfig(model="fake-teacher", max_retries=0)
    student, direction = (content_key(endpoint.model, messages(row)) for messages in (prompts.student_messages, prompts.direction_messages))
    # the server's dice are seeded: one seed under which the direction question always fails, the student's never
    faults = next(f for seed in range(1000) for f in [Faults(rate_dead=0.5, seed=seed)] if f.dead(direction) and not f.dead(student))

    async def ask(actor: PredictActor) -> dict:
        try:
            return await actor.process(row)
        finally:
            await actor.client.aclose()

    with FakeAPI(free_port(), faults) as api:
        actor = PredictActor(endpoint=endpoint, base_url=api.base_url, api_key=None, share=1.0, cache=CallCache(tmp_path / "calls.sqlite"),
                             mode="cot", score=False, direction="separate")
        out = asyncio.run(ask(actor))
        assert api.requests[direction] and api.answered[student] == 1
    assert out["llm_error"] is None and "Error code: 500" in out["direction_error"]
    assert out["answer"] in LABELS and sum(out[p] for p in PROBS) == pytest.approx(1) and out["p_dir_up"] is None
    frame = pd.DataFrame([out])
    assert len(check_predictions(frame)) == 1  # scored: its DE score stands
    assert answer_counts(frame) == {"asked": 1, "answered": 1, "errors": 0, "direction_errors": 1, "coverage": 1.0}
