"""What a run will cost, before any call or GPU: a low-high range of USD for the paid calls (the
traces stage's teacher and judge, the teacher as a predictor), and of GPU hours for training and our
endpoint's predictions.

Input tokens come from the prompts actually rendered for the sampled tuples, counted at
CHARS_PER_TOKEN characters a token (the count the rate cap and the budget reserve with, so the
estimate and the budget agree). Output tokens: max_completion_tokens (`max_tokens` and the hidden
reasoning's room) is the high end (what a provider can bill at most); the low end is the model's
measured average in the call cache when resuming, else TYPICAL_OUTPUT_FRACTION of it. The judge's prompt holds the teacher's reasoning, so its
input grows with the teacher's output; every tuple is assumed judged (an upper bound on calls).
Calls already in the cache cost nothing: the range is for the whole run, an upper bound on a resume.

GPU hours (`sizes`) are token counts over tokens/s of one GPU of the paper's cluster, from its data
sheet and a published vLLM measurement (see the constants); they are printed with the run at the
configured evaluate.limit and, for a subset, on the whole evaluation set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from synthpert import prompts
from synthpert.config import Config, EndpointConfig, GenerateConfig, TrainConfig
from synthpert.llm.cache import CallCache
from synthpert.llm.client import price, prompt_tokens_estimate

TYPICAL_OUTPUT_FRACTION = 0.5  # of max_tokens, when the cache has no measured average yet


def measured_output_tokens(cache_path: Path | None) -> tuple[dict[str, float], int]:
    """Mean completion tokens per model over the cache's answered calls, and how many calls it holds."""
    if cache_path is None or not cache_path.exists():
        return {}, 0
    cache = CallCache(cache_path)
    try:
        by_model = cache.output_tokens()
    finally:
        cache.close()
    return {model: mean for model, (mean, _) in by_model.items() if mean is not None}, sum(n for _, n in by_model.values())


def _side(endpoint: EndpointConfig, calls: int, tokens_in: int, out_low: float, extra_in_low: float = 0, extra_in_high: float = 0) -> dict:
    """One endpoint's calls, tokens and USD range; extra_in: input tokens that depend on another call's output."""
    low_in, high_in = tokens_in + calls * extra_in_low, tokens_in + calls * extra_in_high
    return {
        "calls": calls,
        "tokens_in": [int(low_in), int(high_in)],
        "tokens_out": [int(calls * out_low), calls * endpoint.completion_limit()],
        "usd": [round(price(endpoint, low_in, calls * out_low), 4), round(price(endpoint, high_in, calls * endpoint.completion_limit()), 4)],
    }


def estimate(tuples: pd.DataFrame, g: GenerateConfig, cache_path: Path) -> dict[str, Any]:
    """Teacher and judge calls, tokens and USD [low, high] for `tuples` (see the module doc)."""
    prompt_set = prompts.PromptSet.from_config(g)
    rows = tuples.to_dict("records")
    measured, cached = measured_output_tokens(cache_path)
    teacher_in = sum(prompt_tokens_estimate(prompt_set.teacher(r, r["context"])) for r in rows)
    judge_in = sum(prompt_tokens_estimate(prompt_set.judge(r, "", r["context"])) for r in rows)
    out = {name: measured.get(e.model, TYPICAL_OUTPUT_FRACTION * e.completion_limit()) for name, e in (("teacher", g.teacher), ("judge", g.judge))}
    teacher = _side(g.teacher, len(rows), teacher_in, out["teacher"])
    # the judge reads the teacher's written trace, never its hidden reasoning (which the measured mean counts)
    written = min(measured.get(g.teacher.model, TYPICAL_OUTPUT_FRACTION * g.teacher.max_tokens), g.teacher.max_tokens)
    judge = _side(g.judge, len(rows), judge_in, out["judge"], extra_in_low=written, extra_in_high=g.teacher.max_tokens)
    return {
        "tuples": len(rows),
        "cached_calls": cached,
        "output_tokens_low_from": "cache" if measured else f"{TYPICAL_OUTPUT_FRACTION} x max_completion_tokens",
        "teacher": teacher,
        "judge": judge,
        "usd": [round(teacher["usd"][0] + judge["usd"][0], 4), round(teacher["usd"][1] + judge["usd"][1], 4)],
    }


def questions(tuples: pd.DataFrame, direction: str) -> dict[str, int]:
    """What prediction asks each model about `tuples`: one answer per tuple and, with
    `direction="separate"`, one more question per DE pair, with their prompts' tokens."""
    rows = tuples.to_dict("records")
    answers = [prompt_tokens_estimate(prompts.student_messages(r, r["context"] or None)) for r in rows]
    directions = [prompt_tokens_estimate(prompts.direction_messages(r, r["context"] or None))
                  for r in rows if direction == "separate" and r["label"] in prompts.DIRECTIONS]
    return {"tuples": len(rows), "answers": len(answers), "answer_tokens": sum(answers),
            "directions": len(directions), "direction_tokens": sum(directions)}


def rescaled(asked: dict[str, int], tuples: int, de_pairs: int, direction: str) -> dict[str, int]:
    """`questions` for another set of `tuples` holding `de_pairs` DE pairs, at `asked`'s mean prompt
    lengths: the whole evaluation set's, without rendering every prompt of it."""
    directions = de_pairs if direction == "separate" else 0
    tokens = lambda kind, n: round(asked[f"{kind}_tokens"] / max(asked[f"{kind}s"], 1) * n)  # noqa: E731
    return {"tuples": tuples, "answers": tuples, "answer_tokens": tokens("answer", tuples),
            "directions": directions, "direction_tokens": tokens("direction", directions)}


def predict_estimate(tuples: pd.DataFrame, teacher: EndpointConfig, direction: str) -> dict[str, Any]:
    """The remote teacher as a predictor (`predict-teacher`) over `tuples`: see `teacher_predictions`."""
    return teacher_predictions(questions(tuples, direction), teacher)


def teacher_predictions(asked: dict[str, int], teacher: EndpointConfig) -> dict[str, Any]:
    """`estimate`'s form for the remote teacher answering `asked` (`questions`): one call per
    question, as a remote endpoint gets no scoring call. Its cache is the stage's own, unknown
    before the run: output low at the typical fraction."""
    calls, tokens_in = asked["answers"] + asked["directions"], asked["answer_tokens"] + asked["direction_tokens"]
    side = _side(teacher, calls, tokens_in, TYPICAL_OUTPUT_FRACTION * teacher.completion_limit())
    return {"tuples": asked["tuples"], "cached_calls": 0, "output_tokens_low_from": f"{TYPICAL_OUTPUT_FRACTION} x max_completion_tokens",
            "teacher": side, "usd": side["usd"], "asked": asked}


def for_stages(cfg: Config, stages: list[str], cache_path: Path | None = None) -> dict[str, dict[str, Any]]:
    """The estimate of each of `stages` that makes paid calls (traces; the teacher as a predictor),
    by stage, with its budget; empty when none is paid, without sampling a tuple (the local run
    costs nothing)."""
    g, out = cfg.generate, {}
    from synthpert.data import eval_tuples, sample_tuples  # the data tables load only for a paid run
    from synthpert.pipeline import predictor

    if "traces" in stages and (g.teacher.priced() or g.judge.priced()):
        out["traces"] = estimate(sample_tuples(cfg.data), g, cache_path or g.cache_path) | {"budget_usd": g.max_cost_usd}
    if "predict-teacher" in stages and g.teacher.priced():
        out["predict-teacher"] = (predict_estimate(eval_tuples(cfg.data, cfg.evaluate), predictor(cfg, g.teacher), cfg.evaluate.direction)
                                  | {"budget_usd": cfg.evaluate.max_cost_usd})
    return out


BUDGETS = {"traces": "generate.max_cost_usd", "predict-teacher": "evaluate.max_cost_usd"}


def describe(est: dict[str, Any], budget: float | None, stage: str = "traces") -> str:
    """The short block printed before the stage runs."""
    lines = [f"{stage} cost estimate for {est['tuples']} tuples (whole run; {est['cached_calls']} calls already cached are free):"]
    for name in ("teacher", "judge"):
        if name not in est:
            continue
        side = est[name]
        lines.append(f"  {name:<8}{side['calls']:>7} calls  in {side['tokens_in'][0]:,}-{side['tokens_in'][1]:,} tok  "
                     f"out {side['tokens_out'][0]:,}-{side['tokens_out'][1]:,} tok  ${side['usd'][0]:.2f}-${side['usd'][1]:.2f}")
    lines.append(f"  total ${est['usd'][0]:.2f}-${est['usd'][1]:.2f} (low: output at {est['output_tokens_low_from']}); "
                 + ("no budget" if budget is None else f"budget {BUDGETS[stage]}=${budget:.2f}"))
    return "\n".join(lines)


# ---- GPU hours ---------------------------------------------------------------------------------
# One GPU of the paper's cluster (cluster.yaml: g5.12xlarge, 4 x A10G 24 GB) and an 8B model in bf16
# shaped as Llama-3.1-8B (DeepSeek-R1-Distill-Llama-8B, SynthPert's base).
GPU = "A10G 24 GB"
BANDWIDTH, TENSOR_FLOPS = 600e9, 70e12  # its memory's bytes/s and dense bf16 FLOP/s, from GPU_SOURCE
GPU_SOURCE = "Baseten, 'NVIDIA A10 vs A10G for ML model inference'"
PARAMS = 8.03e9
KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V of 32 layers x 8 KV heads x 128 dims, bf16: 128 KiB
KV_CACHE_BYTES = 2.5 * 2**30  # what one vLLM replica keeps for the KV cache beside 15 GiB of weights (of 24 GB, at its 0.9 share)
# Decoding reads the weights and the KV cache in use once per step, at this share of the bandwidth:
# what vLLM decoding Llama-3.1-8B alone on an A100 reached (DECODE_SOURCE)
DECODE_SHARE = 0.77
DECODE_SOURCE = "vLLM, Llama-3.1-8B on an A100 40GB, johnmusgrave.com 'vLLM throughput-latency sweep'"
PREFILL_SHARE = 0.5  # of TENSOR_FLOPS in prefill (assumed)
TRAIN_SHARE = 0.3  # of TENSOR_FLOPS in training (assumed: ZeRO-3 gathers every layer's weights over PCIe, a g5 has no NVLink)
ANSWER_TOKENS = 8  # `<answer>label</answer>`: a raw student's whole output, and what scoring adds to a prompt


def decode_rate(sequence: float, max_sequences: int) -> tuple[float, float]:
    """Tokens/s of one vLLM replica decoding sequences of `sequence` tokens on average, and how many
    it decodes at once: as many as its KV cache holds (at most `max_sequences`), each step reading
    the weights and their KV once. Longer reasoning means fewer at once, so fewer tokens/s."""
    at_once = max(1.0, min(float(max_sequences), KV_CACHE_BYTES / (sequence * KV_BYTES_PER_TOKEN)))
    step_s = (2 * PARAMS + at_once * sequence * KV_BYTES_PER_TOKEN) / (BANDWIDTH * DECODE_SHARE)
    return at_once / step_s, at_once


def prefill_rate() -> float:
    """Prompt tokens/s of one GPU: 2 FLOPs a parameter and token."""
    return TENSOR_FLOPS * PREFILL_SHARE / (2 * PARAMS)


def train_rate(t: TrainConfig) -> float:
    """Trained tokens/s of one GPU: the frozen weights cost 2 FLOPs a parameter and token forward
    and 2 backward (to the activations; the LoRA weights' own are negligible), 2 more for gradient
    checkpointing's second forward (on GPUs unless turned off)."""
    return TENSOR_FLOPS * TRAIN_SHARE / ((4 if t.gradient_checkpointing is False else 6) * PARAMS)


def predict_gpu_s(asked: dict[str, int], mode: str, max_tokens: int, max_sequences: int) -> list[float]:
    """GPU seconds [low, high] of one of our models answering `asked` (`questions`). cot: each
    question decoded (low TYPICAL_OUTPUT_FRACTION of max_tokens, high all of it), then its labels
    scored after it (low: prompt and reasoning read from vLLM's prefix cache; high: prefilled
    again). raw: scored only."""
    calls, prompt = asked["answers"] + asked["directions"], asked["answer_tokens"] + asked["direction_tokens"]
    if mode == "raw" or not calls:
        return [(prompt + calls * ANSWER_TOKENS) / prefill_rate()] * 2
    seconds = []
    for decoded, again in ((TYPICAL_OUTPUT_FRACTION * max_tokens, 0), (max_tokens, 1)):
        rate, _ = decode_rate(prompt / calls + decoded / 2, max_sequences)  # mid-way through, on average
        prefilled = prompt + calls * ANSWER_TOKENS + again * (prompt + calls * decoded)
        seconds.append(prefilled / prefill_rate() + calls * decoded / rate)
    return seconds


def train_gpu_s(t: TrainConfig, mode: str, rows: int, prompt_tokens: float, trace_tokens: int) -> list[float]:
    """GPU seconds [low, high] of one training run over `rows` traces (train.max_steps' sequences
    when set): each its prompt and, cot, the teacher's trace (low TYPICAL_OUTPUT_FRACTION of
    `trace_tokens`, high all), raw, the label alone; cut at max_seq_len."""
    sequences = t.max_steps * t.batch_size * t.grad_accum * t.num_workers if t.max_steps else rows * t.epochs
    outputs = [0.0, 0.0] if mode == "raw" else [TYPICAL_OUTPUT_FRACTION * trace_tokens, trace_tokens]
    return [sequences * min(prompt_tokens + out + ANSWER_TOKENS, t.max_seq_len) / train_rate(t) for out in outputs]


def _summed(ranges: list[list[float]]) -> list[float]:
    return [sum(low for low, _ in ranges), sum(high for _, high in ranges)]


def sizes(cfg: Config, stages: list[str], cost: dict[str, dict]) -> dict[str, Any]:
    """The run at the configured evaluate.limit and, when that draws a subset, on the whole
    evaluation set: per size its evaluation tuples, USD [low, high] of the paid calls (`cost`, as
    for_stages made it, rescaled) and GPU hours [low, high] of the pending training runs and our
    endpoint's predictions where they are on GPUs; with the rates assumed. Empty when the run pays
    for nothing and uses no GPU."""
    from synthpert.data import eval_tuples
    from synthpert.data.perturbqa import build_split, load_split
    from synthpert.pipeline import MODES, models_to_evaluate, predictor

    e, t, s = cfg.evaluate, cfg.train, cfg.serve
    trained = [mode for mode in MODES if f"train-{mode}" in stages] if t.use_gpu else []
    ours = [spec for name, spec in models_to_evaluate(cfg, dict.fromkeys(MODES)).items()
            if s.use_gpu and spec.endpoint.base_url is None and f"predict-{name}" in stages]
    if not (cost or trained or ours):
        return {}
    pairs = load_split(cfg.data)
    asked = cost["predict-teacher"]["asked"] if "predict-teacher" in cost else questions(eval_tuples(cfg.data, e), e.direction)
    each_size = [(e.limit, asked)]
    if e.limit is not None:
        evaluated = pairs[pairs["split"].isin(["validation", "test"])]
        each_size.append((None, rescaled(asked, len(evaluated), int(evaluated["label"].isin(prompts.DIRECTIONS).sum()), e.direction)))
    prompt = asked["answer_tokens"] / max(asked["answers"], 1)  # the students' training prompts are the same template
    rows = int((build_split(cfg.data, pairs)["split"] == "train").sum()) if trained else 0
    train_h = [x / 3600 for x in _summed([train_gpu_s(t, mode, rows, prompt, cfg.generate.teacher.max_tokens) for mode in trained])]
    traces_usd = cost.get("traces", {}).get("usd", [0.0, 0.0])
    out = []
    for limit, each in each_size:
        predict_h = [x / 3600 for x in _summed([predict_gpu_s(each, spec.mode, spec.endpoint.max_tokens, s.max_ongoing_requests)
                                                for spec in ours])]
        usd = traces_usd
        if "predict-teacher" in cost:
            usd = [a + b for a, b in zip(usd, teacher_predictions(each, predictor(cfg, cfg.generate.teacher))["usd"])]
        out.append({"evaluate.limit": limit, "tuples": each["tuples"], "usd": usd,
                    "gpu_hours": {"train": train_h, "predict": predict_h, "total": [a + b for a, b in zip(train_h, predict_h)]}})
    rates = {"prefill_tps": prefill_rate(), "train_tps": train_rate(t), "trained_rows": rows}
    cot = [spec.endpoint.max_tokens for spec in ours if spec.mode == "cot"]
    if cot:  # at the longest reasoning: the slowest decoding
        rates["sequence_tokens"] = prompt + max(cot) / 2
        rates["decode_tps"], rates["sequences_at_once"] = decode_rate(rates["sequence_tokens"], s.max_ongoing_requests)
    return {"sizes": out, "rates": rates}


def describe_sizes(size: dict[str, Any]) -> list[str]:
    """The run's USD and GPU hours at each size, and the rates they assume."""
    if not size:
        return []
    lines = [f"run size (USD: the paid calls; GPU hours on {GPU}: training and our endpoint's predictions):"]
    for each in size["sizes"]:
        limit = each["evaluate.limit"]
        name = f"evaluate.limit={limit} (as configured)" if limit is not None else "evaluate.limit=null (the whole set)"
        hours = each["gpu_hours"]
        lines.append(f"  {name:<40}{each['tuples']:>9,} evaluation tuples  ${each['usd'][0]:,.2f}-${each['usd'][1]:,.2f}  "
                     f"GPU hours {hours['total'][0]:,.0f}-{hours['total'][1]:,.0f} "
                     f"(train {hours['train'][0]:,.0f}-{hours['train'][1]:,.0f}, predict {hours['predict'][0]:,.0f}-{hours['predict'][1]:,.0f})")
    r = size["rates"]
    lines += [f"  assumed per {GPU}: {BANDWIDTH / 1e9:.0f} GB/s, {TENSOR_FLOPS / 1e12:.0f} TFLOPS bf16 ({GPU_SOURCE});",
              "    an 8B model in bf16 (Llama-3.1-8B's shape);"]
    if "decode_tps" in r:
        lines += [f"    decode at {DECODE_SHARE:.0%} of the bandwidth ({DECODE_SOURCE})",
                  f"    over the weights and a {KV_CACHE_BYTES / 2**30:.1f} GiB KV cache: at the longest reasoning "
                  f"{r['sequences_at_once']:.0f} sequences of {r['sequence_tokens']:,.0f} tokens at once, {r['decode_tps']:,.0f} tok/s;"]
    lines.append(f"    prefill at {PREFILL_SHARE:.0%} of the FLOPs (assumed), {r['prefill_tps']:,.0f} tok/s"
                 + (f"; training at {TRAIN_SHARE:.0%} (assumed), {r['train_tps']:,.0f} tok/s,\n"
                    f"    on all {r['trained_rows']:,} sampled training tuples (every trace kept: an upper bound)" if r["trained_rows"] else ""))
    return lines
