"""`synthpert predict`: one model over the split's evaluation tuples through the real CLI, Ray and
Serve (the embedded model): the predictions file and manifest, the console (stage lines only, the
libraries' output in the run's logs/), a re-run after a crash answered from the call cache, and a
finished run skipped."""

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import run_cli

OURS = ("logs:", "▶ ", "… ", "✓ ", "· ", "  Ray worker logs:", "estimate", "serving with ", "{")  # the console's own lines


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_a_bad_adapter_folder_fails_in_one_line_before_anything_starts(tmp_path):
    proc = run_cli("predict", "--adapter", str(tmp_path / "none"), "--output", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: adapter path {tmp_path / 'none'} is not a PEFT adapter folder (no adapter_config.json there)"
    assert not (tmp_path / "run").exists()


@pytest.mark.serve
@pytest.mark.timeout(1200)
def test_predict_writes_predictions_and_a_rerun_resumes_from_the_cache(tmp_path):
    args = ["predict", "--config", "configs/local.yaml", "--output", str(tmp_path), "--limit", "2", "--json",
            "--set", "data.cell_lines=[k562]", "--set", "generate.teacher.max_tokens=16", "--set", "evaluate.direction=derived",
            "--set", "serve.engine=transformers"]  # the portable engine: the README's run predicts on the default

    def predict() -> tuple[dict, pd.DataFrame, str]:
        proc = run_cli(*args, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        noise = [line for line in proc.stdout.splitlines() if line.strip() and not line.startswith(OURS)]
        assert noise == [], noise  # Ray, Serve and transformers print into the log, not here
        return result, pd.read_parquet(Path(result["dir"]) / "predictions.parquet"), proc.stdout

    first, frame, out = predict()
    folder = Path(first["dir"])
    assert folder.parent == tmp_path and folder.name.startswith("predict-base-")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rows"] == first["rows"] == len(frame) and 0 < len(frame) <= 4  # 2 per part of k562
    assert set(frame["split"]) == {"validation", "test"} and frame[["p_up", "p_down", "p_none"]].notna().all().all()
    assert frame["llm_called"].all() and not frame["llm_cached"].any()
    assert "▶ predict-base" in out and f"✓ predict-base" in out and str(folder) in out
    log = next((tmp_path / "logs").glob("pipeline-*.log"))
    assert "ray" in log.read_text().lower()  # Ray's own lines went to the run's log

    (folder / "stage.json").unlink()  # as if it crashed after its calls: the stage is not finished
    again, resumed, _ = predict()
    assert again["dir"] == first["dir"] and resumed["llm_cached"].all() and not resumed["llm_called"].any()
    pd.testing.assert_frame_equal(resumed[["tuple_id", "p_up", "p_down", "p_none"]], frame[["tuple_id", "p_up", "p_down", "p_none"]])

    _, _, out = predict()  # finished: skipped, nothing asked
    assert f"· predict-base" in out and "skipped" in out


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_an_adapter_of_another_base_model_is_refused(tmp_path):
    from synthpert.errors import SynthPertError
    from synthpert.serving.adapters import resolve_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/root/.cache/synthpert/models/SmolLM2-135M-Instruct"}))
    assert resolve_adapter(str(adapter), None) == adapter  # the embedded model, converted anywhere
    assert resolve_adapter(str(adapter), "/models/SmolLM2-135M-Instruct") == adapter  # a copy of it
    with pytest.raises(SynthPertError, match="was trained on .*SmolLM2-135M-Instruct, but this endpoint serves /models/llama-8b"):
        resolve_adapter(str(adapter), "/models/llama-8b")
    proc = run_cli("predict", "--adapter", str(adapter), "--output", str(tmp_path / "run"), "--set", "serve.model=/models/llama-8b")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "serve it on its own base model" in proc.stderr
    assert not (tmp_path / "run").exists()
