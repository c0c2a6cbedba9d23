"""GPU hours from token counts: decoding bound by memory bandwidth and the KV cache, prefill and
training by FLOPs (synthpert.estimate's A10G figures, written out here)."""

from __future__ import annotations

import pytest

from synthpert import estimate
from synthpert.config import TrainConfig

pytestmark = pytest.mark.unit

WEIGHTS = 2 * 8.03e9  # bytes of an 8B model in bf16
KV = 2 * 32 * 8 * 128 * 2  # bytes of K and V a token: Llama-3.1-8B
STEP_BYTES_PER_S = 600e9 * 0.77  # the A10G's bandwidth at vLLM's measured share
PREFILL = 70e12 * 0.5 / (2 * 8.03e9)  # tokens/s: half the A10G's bf16 FLOPs, 2 a parameter and token


def test_decoding_slows_once_sequences_outgrow_the_kv_cache():
    """2.5 GiB of KV cache holds 20,480 tokens: ten sequences of 2,048 at once, each step reading
    the weights and all their KV; short sequences fill the replica's slots instead."""
    rate, at_once = estimate.decode_rate(2048, 64)
    assert at_once == pytest.approx(10)
    assert rate == pytest.approx(10 / ((WEIGHTS + 20480 * KV) / STEP_BYTES_PER_S))
    assert estimate.decode_rate(100, 64) == (pytest.approx(64 / ((WEIGHTS + 64 * 100 * KV) / STEP_BYTES_PER_S)), 64)
    assert estimate.decode_rate(4096, 64)[0] == pytest.approx(rate / 2)  # half as many at once, the same step


def test_prediction_gpu_seconds():
    """160 questions of 400 prompt tokens: raw scores the labels only; cot decodes half (low) or all
    (high) of max_tokens, scored with the prompt and reasoning from the prefix cache (low) or
    prefilled again (high)."""
    asked = {"tuples": 100, "answers": 100, "answer_tokens": 40_000, "directions": 60, "direction_tokens": 24_000}
    assert estimate.predict_gpu_s(asked, "raw", 1000, 64) == [pytest.approx(160 * 408 / PREFILL)] * 2
    low, high = estimate.predict_gpu_s(asked, "cot", 1000, 64)
    assert low == pytest.approx(160 * 408 / PREFILL + 160 * 500 / estimate.decode_rate(400 + 250, 64)[0])
    assert high == pytest.approx(160 * (408 + 400 + 1000) / PREFILL + 160 * 1000 / estimate.decode_rate(400 + 500, 64)[0])
    # the whole set at the same mean prompt lengths
    assert estimate.rescaled(asked, 1000, 700, "separate") == {"tuples": 1000, "answers": 1000, "answer_tokens": 400_000,
                                                               "directions": 700, "direction_tokens": 280_000}
    assert estimate.rescaled(asked, 1000, 700, "derived")["directions"] == 0


def test_training_gpu_seconds():
    """Forward and backward through the frozen weights, 4 FLOPs a parameter and token, 6 with
    gradient checkpointing (on GPUs unless turned off), at 30 % of the A10G's; sequences cut at
    max_seq_len; train.max_steps counts sequences instead of epochs over the rows."""
    t = TrainConfig(epochs=3, max_seq_len=2048)
    rate = 70e12 * 0.3 / (6 * 8.03e9)
    assert estimate.train_gpu_s(t, "cot", 1000, 400, 2048) == [pytest.approx(3000 * (400 + 1024 + 8) / rate),
                                                             pytest.approx(3000 * 2048 / rate)]
    assert estimate.train_gpu_s(t, "raw", 1000, 400, 2048) == [pytest.approx(3000 * 408 / rate)] * 2
    plain = t.model_copy(update={"gradient_checkpointing": False, "max_steps": 10, "batch_size": 2, "grad_accum": 3, "num_workers": 4})
    assert estimate.train_gpu_s(plain, "raw", 1000, 400, 2048) == [pytest.approx(240 * 408 / (rate * 1.5))] * 2
