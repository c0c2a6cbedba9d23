"""The pipeline's console: what a person sees (stage lines, progress with ETA / calls/s / tokens /
cost / errors), where the libraries' output goes (the run's log file, not the terminal), and what a
failure prints (the log's tail and its path)."""

import io
import logging
import os
import sys

import pandas as pd
import pytest

from synthpert import console
from synthpert.errors import SynthPertError
from synthpert.llm.actor import report_batch


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.mark.unit
def test_the_console_prints_a_line_per_stage_and_progress_from_batches():
    out, clock = io.StringIO(), Clock()
    view = console.Console(out, live=False, interval_s=None, clock=clock)
    console._active = view
    try:
        console.start("traces")
        console.total(16)
        batch = pd.DataFrame({"teacher_called": [True] * 4, "judge_called": [True, True, False, False],
                              "teacher_tokens_in": [100] * 4, "teacher_tokens_out": [50] * 4, "judge_tokens_in": [10] * 4,
                              "judge_tokens_out": [1] * 4, "teacher_cost_usd": [0.01] * 4, "judge_cost_usd": [0.0] * 4,
                              "teacher_error": [None, None, None, "timeout"], "judge_error": [None, None, None, "skipped"]})
        report_batch(batch, ("teacher", "judge"))
        report_batch(batch, ("teacher", "judge"))
        clock.now += 60
        view.tick()
        clock.now += 30
        console.finish("traces", "ran", 90.0, "runs/local/traces-abc")
        console.finish("train-cot", "skipped", 0.0, "runs/local/train-cot-def")
        console.update(rows=5)  # no stage running in this thread: ignored
    finally:
        console._active = None
    lines = out.getvalue().splitlines()
    assert lines[0] == "▶ traces"
    # 8 of 16 rows in 60 s: another 60 s to go; 12 calls in 60 s; 8 x 161 tokens; 8 x $0.01; 2 rows with an error
    assert lines[1].split() == ["…", "traces", "0:01:00", "8/16", "rows", "ETA", "0:01:00", "0.20", "calls/s", "1,288", "tokens",
                                "$0.0800", "2", "errors"]
    assert lines[2].split() == ["✓", "traces", "ran", "0:01:30", "8", "rows", "runs/local/traces-abc"]
    assert lines[3].split() == ["·", "train-cot", "skipped", "0:00:00", "runs/local/train-cot-def"]
    assert len(lines) == 4


@pytest.mark.unit
def test_the_live_view_leaves_only_the_finished_lines():
    out = io.StringIO()
    view = console.Console(out, live=True)
    view.start("predict-base")
    view.finish("predict-base", "ran", 12.0, "runs/x/predict-base-1")
    view.close()
    assert "predict-base" in out.getvalue() and "runs/x/predict-base-1" in out.getvalue()


@pytest.mark.unit
def test_library_output_goes_to_the_run_log_and_not_to_the_terminal(tmp_path, capfd):
    before, handlers = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"), logging.getLogger("mlflow").handlers[:]
    with console.session(tmp_path, live=False, interval_s=None) as s:
        logging.getLogger("ray.serve").warning("PlacementGroupCleaner Continuing to monitor")
        logging.getLogger("mlflow").warning("pyfunc warning")
        print("a library's print")
        os.write(2, b"raylet says hi from C++\n")
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        console.start("evaluate")
        console.note("estimate: $0.00")
        console.finish("evaluate", "ran", 3.0, tmp_path / "evaluate-1")
    out, err = capfd.readouterr()
    log = s.log_path.read_text()
    assert s.log_path.parent == tmp_path / "logs"
    for noise in ("PlacementGroupCleaner", "pyfunc warning", "a library's print", "raylet says hi"):
        assert noise in log and noise not in out + err
    lines = out.splitlines()
    assert lines[:3] == [f"logs: {s.log_path}", "▶ evaluate", "estimate: $0.00"] and len(lines) == 4
    assert lines[3].split() == ["✓", "evaluate", "ran", "0:00:03", f"{tmp_path}/evaluate-1"]
    assert err == "" and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == before
    assert logging.getLogger("mlflow").handlers == handlers  # put back
    print("after")  # the terminal is back
    assert capfd.readouterr().out == "after\n"


@pytest.mark.unit
def test_a_failure_prints_the_log_tail_and_its_path_and_exits_nonzero(tmp_path, capfd):
    with pytest.raises(SystemExit) as exit_:
        with console.session(tmp_path, live=False, interval_s=None) as s:
            console.start("train-cot")
            for i in range(40):
                print(f"deepspeed line {i}")
            sys.stdout.flush()
            raise RuntimeError("worker died")
    out = capfd.readouterr().out
    assert exit_.value.code == 1
    assert "✗ train-cot failed: RuntimeError: worker died" in out
    assert f"--- full log: {s.log_path}" in out
    assert "deepspeed line 39" in out and "deepspeed line 5\n" not in out  # the tail only
    assert "RuntimeError: worker died" in s.log_path.read_text()  # the traceback is in the log

    with pytest.raises(SynthPertError):  # a user error stays one line for the CLI to print (exit 2)
        with console.session(tmp_path, live=False, interval_s=None):
            raise SynthPertError("budget reached")
    assert "✗ the pipeline failed: SynthPertError: budget reached" in capfd.readouterr().out
