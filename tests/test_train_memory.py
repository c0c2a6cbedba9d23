"""Train memory (issue #11): the chunked loss equals transformers' full-logits loss and never keeps
vocabulary-sized tensors; the pre-flight plan checkpoints, lowers the micro-batch or refuses; a
failed worker becomes one line; real 2-worker runs on rows of ~1024 tokens."""

from __future__ import annotations

import json
import math

import pytest
import torch

from synthpert.config import TrainConfig
from synthpert.errors import SynthPertError
from synthpert.train.collate import IGNORE, collate
from synthpert.train.loss import causal_lm_loss
from synthpert.train.memory import MIB, estimate_peak, model_shape, plan_memory, worker_budget
from synthpert.train.model import load_lora_model
from tests.conftest import free_port, run_cli
from tests.test_train import write_traces

LONG = 170  # reasoning repeats: chats of ~1080 tokens, rows cut to max_seq_len 1024 (the default)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 2-layer Llama with tied embeddings (as SmolLM2), saved as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _zero3_rank(rank: int, port: int, model: str, labelled: int, out) -> None:
    """One of two gloo ranks: the product's ZeRO-3 engine, one step and one validation loss on a row
    with `labelled` label positions, in chunks of 2 (a spawned process: module level)."""
    import datetime
    import os
    from dataclasses import asdict

    import torch.distributed as dist

    from synthpert.train.trainer import build_engine

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    cfg = TrainConfig(zero_stage=3, batch_size=1, lora_r=4, lora_dropout=0, warmup_ratio=0)
    plan = {"base_model": model, "dtype": "float32", "shape": asdict(model_shape(model, cfg)), "total_steps": 1}
    engine, _ = build_engine(cfg, plan, 2, torch.device("cpu"))
    ids = torch.randint(3, 4096, (1, 24), generator=torch.Generator().manual_seed(rank))
    labels = ids.clone()
    labels[0, : 24 - labelled] = IGNORE
    loss = causal_lm_loss(engine, ids, labels, chunk=2)
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        val = causal_lm_loss(engine, ids, labels, chunk=2)
    out.put((rank, float(loss), float(val)))
    dist.destroy_process_group()


@pytest.mark.train
def test_zero3_ranks_with_different_label_counts_run_the_same_collectives(tmp_path):
    """Under ZeRO-3 each call of the head gathers its partitioned weight (here 4096 x 32, over
    DeepSpeed's persistence threshold, as any real model's head): ranks whose rows hold 3 and 15
    labelled positions (2 and 8 chunks) both finish a step and a validation loss. Before, the first
    rank's fewer gathers left the other waiting and gloo aborted the step (the paper config's
    ZeRO-3 on traces of different lengths)."""
    import multiprocessing

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    spawn = multiprocessing.get_context("spawn")
    out, port = spawn.Queue(), free_port()
    ranks = [spawn.Process(target=_zero3_rank, args=(rank, port, str(tmp_path / "model"), labelled, out))
             for rank, labelled in ((0, 3), (1, 15))]
    for proc in ranks:
        proc.start()
    for proc in ranks:
        proc.join(timeout=240)  # bounded: the imports, a step, and gloo's 60 s timeout on a mismatch
    hung = [proc.pid for proc in ranks if proc.is_alive()]
    for proc in ranks:
        proc.kill()
    assert not hung and [proc.exitcode for proc in ranks] == [0, 0], f"exit codes {[p.exitcode for p in ranks]}, hung {hung}"
    results = sorted(out.get(timeout=5) for _ in ranks)
    assert [rank for rank, *_ in results] == [0, 1] and all(math.isfinite(v) and v > 0 for _, *vs in results for v in vs), results


def lora_model(path, **settings):
    """The training model with a non-zero adapter, so every LoRA weight gets a gradient."""
    torch.manual_seed(0)
    model = load_lora_model(path, TrainConfig(lora_r=4, lora_dropout=0, **settings), torch.float32)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def packed_batch() -> dict:
    """Two rows: one with two packed examples, one padded; labels only on their second halves."""
    ids = torch.randint(3, 320, (70,)).tolist()
    rows = {
        "input_ids": [ids[:40], ids[40:70]],
        "labels": [[IGNORE] * 8 + ids[8:20] + [IGNORE] * 6 + ids[26:40], [IGNORE] * 10 + ids[50:70]],
        "segments": [[20, 20], [30]],
    }
    batch = collate(rows, pad_id=0)
    batch.pop("num_tokens")
    return batch


def loss_and_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.unit
def test_chunked_loss_equals_full_logits_loss_and_gradients(tiny_llama):
    """Same loss and LoRA gradients as transformers' loss on the same batch (chunks of 5 of the 44
    labelled positions, the last one ragged), with and without gradient checkpointing."""
    batch = packed_batch()
    for checkpointing in (False, True):
        model = lora_model(tiny_llama, gradient_checkpointing=checkpointing)
        full, full_grads = loss_and_grads(model, model(**batch).loss)
        chunked, grads = loss_and_grads(model, causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["position_ids"], chunk=5))
        torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
        assert full_grads.keys() == grads.keys() and len(grads) == 2 * 2 * 7
        for name, grad in grads.items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.unit
def test_chunked_loss_keeps_no_vocabulary_sized_tensor_for_backward(tiny_llama):
    """What autograd stores until backward: transformers' loss keeps [batch, seq, vocab] logits;
    the chunked loss keeps no tensor with a vocabulary dimension (each chunk is recomputed) but
    views of the (tied) head weight."""
    from torch.autograd.graph import saved_tensors_hooks

    model, batch = lora_model(tiny_llama), packed_batch()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def vocab_sized_saved(compute) -> int:
        sizes = []

        def pack(tensor):
            if tensor.shape and tensor.shape[-1] == 320 and tensor.untyped_storage().data_ptr() not in weights:
                sizes.append(tensor.numel())
            return tensor

        with saved_tensors_hooks(pack, lambda tensor: tensor):
            compute()
        return max(sizes, default=0)

    assert vocab_sized_saved(lambda: model(**batch).loss) >= batch["input_ids"].numel() * 320
    assert vocab_sized_saved(lambda: causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["position_ids"], chunk=5)) == 0


@pytest.mark.unit
def test_lora_model_trains_with_sdpa_dropout_and_checkpointing_on(tiny_llama):
    """from_pretrained returns eval mode, where LoRA dropout and gradient checkpointing are off:
    the training model must be in training mode, with SDPA attention."""
    model = load_lora_model(tiny_llama, TrainConfig(lora_r=4, gradient_checkpointing=True), torch.float32)
    base = model.get_base_model()
    assert model.training and base.model.gradient_checkpointing and base.config._attn_implementation == "sdpa"


@pytest.mark.unit
def test_model_shape_reads_sizes_without_weights(tiny_llama):
    """params / LoRA parameter counts from the config alone equal the loaded PEFT model's."""
    cfg = TrainConfig(lora_r=4)
    shape = model_shape(tiny_llama, cfg)
    model = load_lora_model(tiny_llama, cfg, torch.float32)
    assert shape.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert shape.params == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert shape.largest_module == 320 * 32 and (shape.layers, shape.hidden, shape.vocab) == (2, 32, 320)


@pytest.fixture(scope="module")
def smollm_shape(embedded_model):
    return model_shape(embedded_model, TrainConfig())


def peak(shape, cfg, micro, checkpointing, longest=1024) -> int:
    return sum(estimate_peak(shape, cfg, cfg.num_workers, micro, longest, checkpointing).values())


@pytest.mark.unit
def test_memory_plan_checkpoints_then_lowers_the_micro_batch_then_refuses(smollm_shape):
    """Defaults (2 workers, batch 4, rows of 1024 tokens): ample memory keeps the configuration;
    less turns checkpointing on; less lowers the micro-batch keeping the effective batch, with a
    one-line note; too little refuses naming the settings to change."""
    cfg = TrainConfig()
    plan = plan_memory(smollm_shape, cfg, 1024, (peak(smollm_shape, cfg, 4, False), "plenty"))
    assert (plan.batch_size, plan.grad_accum, plan.gradient_checkpointing, plan.note) == (4, 1, False, None)
    plan = plan_memory(smollm_shape, cfg, 1024, (peak(smollm_shape, cfg, 4, True), "less"))
    assert (plan.batch_size, plan.grad_accum, plan.gradient_checkpointing, plan.note) == (4, 1, True, None)

    budget = peak(smollm_shape, cfg, 2, True)
    plan = plan_memory(smollm_shape, cfg, 1024, (budget, "1.0 GB (test) for 2 workers"))
    assert (plan.batch_size, plan.grad_accum, plan.gradient_checkpointing) == (2, 2, True)
    assert plan.apply(cfg).batch_size * plan.apply(cfg).grad_accum == 4
    assert plan.note.startswith("train: micro-batch 4 -> 2, grad_accum 1 -> 2 (effective batch kept), gradient checkpointing on")
    assert plan.summary() == {"batch_size": 2, "grad_accum": 2, "gradient_checkpointing": True, "note": plan.note,
                              "estimate_mb": round(budget / MIB), "budget_mb": round(budget / MIB)}

    with pytest.raises(SynthPertError, match=r"^training does not fit in memory: .* micro-batch 1 with gradient checkpointing "
                                             r"\(longest row 1024 tokens\).*lower train.max_seq_len") as refused:
        plan_memory(smollm_shape, cfg, 1024, (peak(smollm_shape, cfg, 1, True) - 1, "1.0 GB (test) for 2 workers"))
    assert "\n" not in str(refused.value)


@pytest.mark.unit
def test_memory_plan_respects_checkpointing_turned_off(smollm_shape):
    cfg = TrainConfig(gradient_checkpointing=False)
    plan = plan_memory(smollm_shape, cfg, 1024, (peak(smollm_shape, cfg, 1, False), "test"))
    assert (plan.batch_size, plan.grad_accum, plan.gradient_checkpointing) == (1, 4, False)
    with pytest.raises(SynthPertError, match="set train.gradient_checkpointing=true"):
        plan_memory(smollm_shape, cfg, 1024, (peak(smollm_shape, cfg, 1, False) - 1, "test"))
    on_gpu = plan_memory(smollm_shape, TrainConfig(use_gpu=True), 1024, None)
    assert on_gpu.gradient_checkpointing and on_gpu.estimate is None


@pytest.mark.unit
def test_worker_budget_reads_ray_nodes(monkeypatch):
    """Ray's memory figure per node, shared by the workers its CPUs host; the override wins."""
    import ray

    nodes = [
        {"Alive": True, "NodeManagerAddress": "10.0.0.8", "Resources": {"CPU": 1.0, "memory": 3e9}},
        {"Alive": True, "NodeManagerAddress": "10.0.0.9", "Resources": {"CPU": 8.0, "memory": 16e9}},
        {"Alive": False, "NodeManagerAddress": "10.0.0.10", "Resources": {"CPU": 8.0, "memory": 1e9}},
    ]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.1")
    per_worker, where = worker_budget(TrainConfig(num_workers=4))
    assert per_worker == pytest.approx(0.9 * 3e9) and where == "3.0 GB (Ray's memory resource) for 1 workers"
    per_worker, where = worker_budget(TrainConfig(num_workers=4, memory_budget_gb=2))
    assert per_worker == pytest.approx(0.9 * 2e9 / 4) and "train.memory_budget_gb" in where


@pytest.mark.unit
def test_killed_worker_is_one_line_naming_worker_cause_memory_and_log(tmp_path):
    """Ray Train's WorkerGroupError for a worker the memory monitor killed (its peer then fails
    on the broken process group) becomes one line; the full error goes to a log file."""
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError
    from ray.train import WorkerGroupError

    from synthpert.train.memory import MemoryPlan
    from synthpert.train.stage import training_failed

    report = (
        "The actor is dead because its worker process has died. Worker exit type: NODE_OUT_OF_MEMORY Worker exit detail: "
        "Task was killed due to the node running low on memory.\nMemory on the node (IP: 10.0.0.5, ID: 7f3a) was "
        "22.31GB used / 23.43GB limit (0.952165)\n(... pid=4321, actual memory used=10.47GB, worker ID=9c1e)"
    )
    died = ActorDiedError(ActorDiedErrorContext(class_name="RayTrainWorker", actor_id=b"\x01" * 16, pid=4321,
                                                node_ip_address="10.0.0.5", error_message=report))
    error = WorkerGroupError("2 workers failed", {0: RuntimeError("Connection closed by peer"), 1: died})
    line = str(training_failed(error, tmp_path / "out", str(tmp_path / "out" / "ray"), MemoryPlan(4, 1, True, 2_700_000_000, 5e9)))
    assert "\n" not in line
    assert line.startswith("training worker 1 (pid 4321 on 10.0.0.5) was killed by Ray's memory monitor (node out of memory; "
                           "it held 10.47 GB, estimated 2.7 GB): lower train.batch_size or train.max_seq_len")
    assert line.endswith(f"; no checkpoint was written; full log: {tmp_path / 'out' / 'train_error.log'}")
    assert "actual memory used=10.47GB" in (tmp_path / "out" / "train_error.log").read_text()

    # a worker killed otherwise reaches Ray Train as a failed health check wrapping its death
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    killed = ActorDiedError(ActorDiedErrorContext(
        class_name="RayTrainWorker", actor_id=b"\x02" * 16, pid=555, node_ip_address="10.0.0.5",
        error_message="The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: EOF"))
    error = WorkerGroupError("2 workers failed", {0: RuntimeError("Connection closed by peer"),
                                                  1: WorkerHealthCheckFailedError("A worker health check failed.", killed)})
    line = str(training_failed(error, tmp_path / "out", str(tmp_path / "out" / "ray"), MemoryPlan(4, 1, True, None, None)))
    assert line.startswith("training worker 1 (pid 555 on 10.0.0.5) failed (ActorDiedError: worker exit type SYSTEM_ERROR); ")


# ---------------------------------------------------------------- real runs on rows of ~1024 tokens


@pytest.fixture(scope="module")
def long_traces(tmp_path_factory):
    return write_traces(tmp_path_factory.mktemp("long-traces"), n=8, repeat=LONG)


@pytest.mark.slow  # the training CLI up to its memory check: ~100 s on a loaded box
def test_too_little_memory_refuses_before_any_worker_starts(long_traces, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--data", str(long_traces), "--mode", "cot", "--output", str(out), "--json",
                   "--set=train.memory_budget_gb=0.5", "--set=tracking.enabled=false", timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training does not fit in memory: each of 2 workers needs ~")
    assert "(longest row 1024 tokens), but a node has 0.5 GB (train.memory_budget_gb) for 2 workers" in last
    # no result line (Ray's own warnings, forwarded to stdout, may be there)
    assert not (out / "ray").exists() and not [line for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.train
@pytest.mark.slow
def test_zero3_defaults_train_rows_of_1024_tokens_within_the_estimate(long_traces, tmp_path):
    """The issue's command (defaults, ZeRO-3, 2 workers) on rows of 1024 tokens, one step: it
    completes, prints its JSON, and every worker's peak RSS stays within the pre-flight estimate."""
    proc = run_cli("train", "--data", str(long_traces), "--mode", "cot", "--output", str(tmp_path / "run"), "--zero-stage", "3",
                   "--num-workers", "2", "--max-steps", "1", "--json", "--set=tracking.enabled=false",
                   "--set=train.warmup_ratio=0", timeout=900)  # no warm-up: one step at lr 0 would leave lora_B zero
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 1 and summary["lora_b_nonzero"] > 0
    peaks, estimate = summary["peak_memory_mb_per_worker"], summary["memory"]["estimate_mb"]
    assert len(peaks) == 2 and max(peaks) <= estimate <= summary["memory"]["budget_mb"], summary
