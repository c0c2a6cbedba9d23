"""Train stage: real Ray Train + DeepSpeed ZeRO runs with LoRA on the bundled SmolLM2 (2 CPU workers)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import torch

from synthpert.artifacts import write_manifest, write_table
from synthpert.config import LABELS, load_config
from synthpert.errors import SynthPertError
from synthpert.train import train
from synthpert.train.collate import IGNORE, build_messages, collate, pack, tokenize_chat, tokenize_frame
from tests.conftest import run_cli

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SFT_SCHEMA = pa.schema(
    [("cell_line", pa.string()), ("pert", pa.string()), ("gene", pa.string()), ("label", pa.string()), ("messages", MESSAGES)]
)
# Small and memorisable: short prompts, one fixed reasoning pattern, labels cycling.
TINY = [
    "train.max_seq_len=64",
    "train.batch_size=2",
    "train.learning_rate=1e-3",
    "train.warmup_ratio=0",
    "train.lora_r=8",
    "train.lora_alpha=16",
    "train.lora_dropout=0",
    # the saved adapter is checked against the in-memory logits to 5e-4, which only float32 holds;
    # `auto` is bfloat16 on CPUs with avx512_bf16 (synthpert.hardware), trained in test_train_memory
    "train.dtype=float32",
]


def chat(i: int, label: str, repeat: int = 1) -> list[dict]:
    """A short trace; `repeat` > 1 repeats its reasoning sentence (~7 tokens each) for long rows."""
    return [
        {"role": "system", "content": "Predict the effect of the knock-down."},
        {"role": "user", "content": f"Knock-down of P{i}; read-out G{i}?"},
        {"role": "assistant", "content": f"<think>{' '.join([f'P{i} regulates G{i}.'] * repeat)}</think><answer>{label}</answer>"},
    ]


def write_traces(directory: Path, n: int = 16, run_id: str | None = "traces-run-1", drop: tuple[str, ...] = (),
                 repeat: int = 1) -> Path:
    rows = [  # every 8th perturbation a validation one, as the traces stage marks them
        {"cell_line": "k562", "pert": f"P{i}", "gene": f"G{i}", "label": LABELS[i % 3], "messages": chat(i, LABELS[i % 3], repeat),
         "split": "validation" if i % 8 == 7 else "train"}
        for i in range(n)
    ]
    schema = pa.schema([f for f in SFT_SCHEMA if f.name not in drop])
    entry = write_table(directory, "sft", pd.DataFrame(rows, columns=SFT_SCHEMA.names), schema)
    write_manifest(directory, "judge", {"sft": entry}, **({"mlflow_run_id": run_id} if run_id else {}))
    return directory


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    return write_traces(tmp_path_factory.mktemp("traces"))


@pytest.fixture(scope="module")
def tokenizer(embedded_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model)


def labelled_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])


def reloaded_logits(adapter: Path, input_ids: list[int], base: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([input_ids])).logits


def assert_adapter_matches_memory(output: Path, base: Path) -> None:
    """The saved PEFT dir reproduces the logits the trained in-memory model gave (probe.pt)."""
    from safetensors.torch import load_file

    lora_b = {k: v for k, v in load_file(output / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k}
    assert lora_b and all(v.numel() > 0 for v in lora_b.values())
    assert sum(int(v.count_nonzero()) for v in lora_b.values()) > 0.9 * sum(v.numel() for v in lora_b.values())
    probe = torch.load(output / "probe.pt")
    torch.testing.assert_close(reloaded_logits(output / "adapter", probe["input_ids"], base), probe["logits"], atol=5e-4, rtol=0)


# ---------------------------------------------------------------- token masks, packing, collate


@pytest.mark.unit
def test_cot_labels_cover_only_the_assistant_turn(tokenizer):
    messages = chat(7, "upregulated")
    ids, labels = tokenize_chat(tokenizer, messages, max_seq_len=512)
    assert labelled_text(tokenizer, ids, labels) == messages[-1]["content"] + "<|im_end|>\n"
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert all(lab == IGNORE for lab in labels[:first]) and "Knock-down of P7" in tokenizer.decode(ids[:first])
    _, unmasked = tokenize_chat(tokenizer, messages, max_seq_len=512, loss_on="all")
    assert unmasked == ids


@pytest.mark.unit
def test_raw_mode_labels_only_the_answer_tag(tokenizer):
    """raw: the same tuple, the cot student's very user turn (context included), and only
    `<answer>label</answer>` to learn."""
    rows = [{"cell_line": "k562", "pert": f"P{i}", "gene": f"G{i}", "label": LABELS[i], "messages": chat(i, LABELS[i])} for i in range(3)]
    messages = build_messages(rows[1], "raw")
    assert messages[:-1] == build_messages(rows[1], "cot")[:-1] == chat(1, LABELS[1])[:-1]
    ids, labels = tokenize_chat(tokenizer, messages, max_seq_len=512)
    assert labelled_text(tokenizer, ids, labels) == "<answer>downregulated</answer><|im_end|>\n"
    assert "<think>" not in tokenizer.decode(ids)
    for mode, packing in (("cot", False), ("raw", False), ("raw", True)):
        table = tokenize_frame(pd.DataFrame(rows), tokenizer, mode, 512, loss_on="assistant", packing=packing)
        assert table["examples"].sum() == 3 and len(table) == (1 if packing else 3)
        texts = sorted(labelled_text(tokenizer, i, lab) for i, lab in zip(table["input_ids"], table["labels"]))
        if not packing:
            answers = [r["messages"][-1]["content"] if mode == "cot" else f"<answer>{r['label']}</answer>" for r in rows]
            assert texts == sorted(a + "<|im_end|>\n" for a in answers)


@pytest.mark.unit
def test_truncation_keeps_prefix_and_drops_examples_without_answer_tokens(tokenizer):
    messages = chat(1, "downregulated")
    ids, labels = tokenize_chat(tokenizer, messages, max_seq_len=512)
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    cut = tokenize_chat(tokenizer, messages, max_seq_len=first + 3)
    assert cut == (ids[: first + 3], labels[: first + 3])
    assert tokenize_chat(tokenizer, messages, max_seq_len=first) is None


@pytest.mark.slow
def test_packing_isolates_examples(tokenizer, embedded_model):
    """Packed rows give each example the logits it gets alone: positions restart, no cross-attention."""
    from transformers import AutoModelForCausalLM

    examples = [tokenize_chat(tokenizer, chat(i, LABELS[i % 3]), 512) for i in range(3)]
    bins = pack(examples, max_len=sum(len(e[0]) for e in examples[:2]) + 1)
    assert sorted(i for b in bins for i in b) == [0, 1, 2] and len(bins) == 2
    row = bins[0] if len(bins[0]) == 2 else bins[1]
    batch = collate(
        {
            "input_ids": [sum((examples[i][0] for i in row), [])],
            "labels": [sum((examples[i][1] for i in row), [])],
            "segments": [[len(examples[i][0]) for i in row]],
        },
        pad_id=tokenizer.pad_token_id,
    )
    first_len = len(examples[row[0]][0])
    assert batch["position_ids"][0, first_len] == 0 and batch["labels"][0, first_len] == IGNORE
    assert int(batch["num_tokens"]) == sum(len(examples[i][0]) for i in row)
    model = AutoModelForCausalLM.from_pretrained(embedded_model).eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([examples[row[1]][0]])).logits[0]
    torch.testing.assert_close(packed[first_len:], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.unit
def test_collate_pads_as_a_separate_segment(tokenizer):
    batch = collate({"input_ids": [[5, 6, 7], [8]], "labels": [[5, 6, 7], [IGNORE]], "segments": [[3], [1]]}, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE] * 3]
    assert int(batch["num_tokens"]) == 4


# ---------------------------------------------------------------- bad input: errors before any worker


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_file", "traces file not found"),
        ("missing_column", "lacks columns ['messages']"),
        ("empty", "has no rows"),
        ("bad_messages", "no assistant message"),
        ("no_model", "is not a model directory"),
        ("bad_targets", "LoRA target modules ['qkv_proj']"),
    ],
)
@pytest.mark.unit
def test_bad_input_fails_before_training(tmp_path, case, message):
    import ray

    data = tmp_path / "traces"
    overrides = ["tracking.enabled=false"]
    if case == "missing_column":
        write_traces(data, drop=("messages",))
    elif case == "empty":
        write_traces(data, n=0)
    elif case == "bad_messages":
        frame = pd.DataFrame([{"cell_line": "k562", "pert": "A", "gene": "B", "label": LABELS[0], "messages": chat(0, LABELS[0])[:2]}])
        write_table(data, "sft", frame, SFT_SCHEMA)
    elif case != "no_file":
        write_traces(data, n=4)
    if case == "no_model":
        overrides.append(f"train.base_model={tmp_path / 'nowhere'}")
    if case == "bad_targets":
        overrides.append("train.target_modules=[q_proj, qkv_proj]")
    with pytest.raises(SynthPertError, match=message.replace("[", r"\[").replace("]", r"\]")):
        train(load_config(None, overrides), data, tmp_path / "out")
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_cli_reports_bad_input_and_exits_2(tmp_path):
    proc = run_cli("train", "--data", str(tmp_path / "nothing"), "--mode", "cot", "--output", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert f"error: traces file not found: {tmp_path / 'nothing' / 'sft.parquet'}" in proc.stderr


# ---------------------------------------------------------------- real distributed runs


def _our_train_workers() -> list[int]:
    """Pids of Ray Train workers descended from this test process (never another session's)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            parents[int(pid)] = int(rest.rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = parents.get(pid, 0)
        return False

    workers = []
    for pid in parents:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker") and ours(pid):
                workers.append(pid)
        except OSError:
            continue
    return workers


def checkpointed(storage: Path) -> bool:
    """Ray Train has reported its first checkpoint into the run's storage folder."""
    from synthpert.train.stage import RUN_NAME

    snapshot = storage / RUN_NAME / "checkpoint_manager_snapshot.json"
    try:
        return bool(json.loads(snapshot.read_text()).get("checkpoint_results"))
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return False


def kill_a_worker_after_first_checkpoint(output: Path, timeout: float) -> tuple[threading.Thread, list[int]]:
    """A thread that SIGKILLs one of this test's Ray Train workers once the run in `output` has
    its first checkpoint; the list gets the killed pid."""
    killed: list[int] = []

    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not killed:
            if checkpointed(output / "ray"):
                workers = _our_train_workers()
                if workers:
                    os.kill(max(workers), signal.SIGKILL)
                    killed.append(max(workers))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher, killed


@pytest.mark.train
@pytest.mark.slow
def test_zero2_worker_killed_then_resumed_continues_and_registers(traces, tmp_path, embedded_model):
    """No restarts left (max_failures=0): a worker killed after the first checkpoint ends the run
    with exit 2 and one line (worker, cause, --resume, log); --resume continues the step counter
    and the loss; the result is a PEFT adapter, logged to MLflow and registered with lineage tags."""
    import mlflow

    from synthpert.serving.adapters import resolve_adapter

    output, db = tmp_path / "run", tmp_path / "mlflow.db"
    args = ["train", "--data", str(traces), "--mode", "cot", "--output", str(output), "--zero-stage", "2",
            "--num-workers", "2", "--max-steps", "8", "--lora-r", "8", "--json"]
    sets = [f"--set={s}" for s in (*TINY, "train.checkpoint_every_steps=2", "train.max_failures=0",
                                    f"tracking.tracking_uri=sqlite:///{db}")]
    watcher, killed = kill_a_worker_after_first_checkpoint(output, timeout=900)
    failed = run_cli(*args, *sets, timeout=900)
    watcher.join(timeout=1)
    assert killed and failed.returncode == 2, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training worker ") and f"(pid {killed[0]}" in last and "ActorDiedError" in last, last
    assert last.endswith(f"checkpoints kept, continue with --resume; full log: {output / 'train_error.log'}")
    assert not (output / "adapter").exists()

    again = run_cli(*args, *sets)
    assert again.returncode == 2 and "already holds a training run" in again.stderr

    resumed = run_cli(*args, *sets, "--resume", check=True, timeout=900)
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    state = json.loads((output / "train_state.json").read_text())
    history = state["history"]
    assert [h["step"] for h in history] == list(range(1, 9)) and summary["steps"] == 8
    (resumed_at,) = state["resumed_from"]
    assert resumed_at >= 2 and resumed_at % 2 == 0
    # the first step after the restart continues the curve instead of starting from the untrained loss
    assert history[resumed_at]["loss"] < 0.8 * history[0]["loss"], history
    assert summary["final_loss"] < 0.6 * summary["first_loss"]
    assert summary["tokens_per_s"] > 0 and summary["adapter_path"] == str(output / "adapter")
    assert_adapter_matches_memory(output, embedded_model)

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.params["train.lora_r"] == "8" and run.data.tags["synthpert.traces_run_id"] == "traces-run-1"
    assert run.data.params["chat_rendering"] == summary["chat_rendering"] == "template"  # SmolLM2's keeps the traces as written
    assert {"loss", "lr", "tokens_per_s", "val_loss", "final_loss"} <= set(run.data.metrics)
    assert "deepspeed_config.json" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    version = mlflow.MlflowClient().get_model_version_by_alias("synthpert-student", "cot")
    assert version.tags["synthpert.traces_run_id"] == "traces-run-1"
    assert version.tags["synthpert.train_run_id"] == summary["mlflow_run_id"]

    adapter = resolve_adapter("models:/synthpert-student@cot", str(embedded_model))  # and its base model is the one trained on
    assert (adapter / "adapter_model.safetensors").read_bytes() == (output / "adapter" / "adapter_model.safetensors").read_bytes()
    loaded = mlflow.pyfunc.load_model("models:/synthpert-student@cot").unwrap_python_model()
    probe = torch.load(output / "probe.pt")
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([probe["input_ids"]])).logits
    torch.testing.assert_close(logits, probe["logits"], atol=5e-4, rtol=0)
