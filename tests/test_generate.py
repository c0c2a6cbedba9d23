"""Teacher → judge on Ray Data against real HTTP endpoints: faults, keep rule, crash-resume, secrets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from synthpert import generate, judge, prompts
from synthpert.config import load_config
from synthpert.data import eval_tuples, sample_tuples
from tests.conftest import REPO, free_port
from tests.fake_api import MALFORMED, FakeAPI, Faults, content_key, finished_keys

SECRET = "sk-test-5f3c9e-never-print-me"
PROMPTS = prompts.PromptSet.from_config()


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(
        address="local",
        num_cpus=4,  # logical: the actors are I/O-bound; Serve needs room for its replica and proxy
        object_store_memory=300 * 2**20,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    yield
    ray.shutdown()


def _fake_cfg(api: FakeAPI, tmp_path: Path, *extra: str):
    return load_config(
        None,
        [
            f"generate.teacher.base_url={api.base_url}",
            "generate.teacher.model=fake-teacher",
            f"generate.judge.base_url={api.base_url}",
            "generate.judge.model=fake-judge",
            f"generate.output_dir={tmp_path / 'traces'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "data.knowledge.enabled=false",
            "data.cell_lines=[k562]",  # one cell line loads faster; the pipeline is the same
            *extra,
        ],
    )


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows as dicts with None for missing values (pandas would give NaN)."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


@pytest.mark.unit
def test_keep_rule_checks_cheap_things_first_and_counts_add_up():
    row = {"teacher_error": None, "reasoning": "because", "answer": "upregulated", "label": "upregulated"}
    assert judge.precheck(row, True) is None
    assert judge.precheck({**row, "teacher_error": "APIConnectionError"}, True) == "teacher_error"
    assert judge.precheck({**row, "reasoning": None}, True) == "malformed_trace"
    assert judge.precheck({**row, "answer": None}, False) == "malformed_trace"
    assert judge.precheck({**row, "answer": "downregulated"}, True) == "answer_mismatch"
    assert judge.precheck({**row, "answer": "downregulated"}, False) is None
    assert judge.keep_rule("excellent", ["excellent"]) is None
    assert judge.keep_rule("good", ["excellent"]) == "grade"
    assert judge.keep_rule(None, ["excellent", "good"]) == "grade_unparseable"
    ours = load_config(None, []).generate
    assert judge.use_guided_judge(ours) and judge.grade_choice(ours) == {"guided_choice": list(judge.GRADES)}  # our endpoint
    vllm = load_config(None, ["generate.judge.base_url=http://127.0.0.1:1/v1"]).generate
    assert not judge.use_guided_judge(vllm)  # another endpoint: parse, unless told it can constrain
    vllm.use_guided_choice, vllm.guided_choice_format = True, "structured_outputs"
    assert judge.use_guided_judge(vllm) and judge.grade_choice(vllm) == {"structured_outputs": {"choice": list(judge.GRADES)}}
    reasons = [None, "teacher_error", "judge_error", "malformed_trace", "answer_mismatch", "grade_unparseable", "grade", None]
    frame = pd.DataFrame({"reject_reason": reasons, "accepted": [r is None for r in reasons]})
    assert judge.counts(frame) == {"rows": 8, "accepted": 2, "rejected_grade": 2, "rejected_answer": 1,
                                   "rejected_malformed": 1, "errored": 2, "completed": 6}


@pytest.mark.unit
def test_structured_verdict_grade_or_none():
    """A structured judge's grade comes from its JSON verdict; anything else is unparseable (never a pass)."""
    assert judge.structured_grade('{"critique": "sound", "grade": "good"}') == "good"
    for text in (None, "", "Grade: good", '{"critique": "cut off', '["good"]', '{"grade": "superb"}'):
        assert judge.structured_grade(text) is None
    schema = judge.VERDICT_FORMAT["json_schema"]["schema"]
    assert schema["properties"]["grade"]["enum"] == list(judge.GRADES) and schema["additionalProperties"] is False


def _assert_secret_nowhere(roots: list[Path], *texts: str) -> None:
    assert all(SECRET not in text for text in texts)
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.ray
@pytest.mark.slow
def test_generate_under_faults_streams_keeps_rule_and_accounts(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working directory
    monkeypatch.setenv("FAKE_PROVIDER_KEY", SECRET)
    faults = Faults(rate_429=0.15, retry_after_s=0.3, rate_500=0.1, rate_hang=0.03, hang_s=2.0, rate_drop=0.05,
                    rate_dead=0.06, rate_malformed=0.12, seed=7)
    with FakeAPI(free_port(), faults, latency_s=0.1) as api:
        cfg = _fake_cfg(api, tmp_path, "data.limit=48", "generate.keep=[excellent,good]", "generate.teacher.max_retries=2",
                        "generate.judge.max_retries=2", "generate.teacher.timeout_s=1.0", "generate.judge.timeout_s=1.0",
                        "generate.teacher.max_concurrency=8", "generate.teacher.price_in_per_mtok=3",
                        "generate.teacher.price_out_per_mtok=15", "generate.teacher.api_key_env=FAKE_PROVIDER_KEY")
        summary = generate.run(cfg, progress=False)
        log = {key: list(attempts) for key, attempts in api.requests.items()}
        max_in_flight = api.max_in_flight
        assert f"Bearer {SECRET}" in api.authorization  # the teacher's key reached the provider...
    # ...but not the outputs, the call cache, MLflow's store or artifacts, or this Ray cluster's logs
    _assert_secret_nowhere([tmp_path, *Path("/tmp/ray").glob(f"session_*_{os.getpid()}")])
    out = tmp_path / "traces"
    attempts = pd.read_parquet(out / "attempts.parquet")
    sample = sample_tuples(cfg.data)
    assert list(attempts["tuple_id"]) == list(sample["tuple_id"])  # every row exactly once, in order
    assert summary["rows"] == 48 == sum(summary[k] for k in ("accepted", "rejected_grade", "rejected_answer", "rejected_malformed", "errored"))
    assert summary == {**summary, **judge.counts(attempts)}
    assert all(summary[k] > 0 for k in ("accepted", "rejected_grade", "rejected_answer", "rejected_malformed", "errored")), summary
    assert max_in_flight <= 8 + 8  # the teacher's and the judge's budgets, each split over 2 actors

    teacher_times, judge_times = [], []
    for row in _records(attempts):
        key = content_key("fake-teacher", PROMPTS.teacher(row, ""))
        outcomes = [o for _, o in log[key]]
        teacher_times += [t for t, _ in log[key]]
        assert row["teacher_retries"] == len(outcomes) - 1
        if row["teacher_error"]:  # retries exhausted, then recorded on the row
            assert row["reject_reason"] == "teacher_error" and "ok" not in outcomes and len(outcomes) == 3
            assert row["error"].startswith("teacher: ")
            continue
        assert outcomes[-1] == "ok"
        assert row["teacher_cost_usd"] == pytest.approx((3 * row["teacher_tokens_in"] + 15 * row["teacher_tokens_out"]) / 1e6)
        if faults.malformed(key):
            assert row["teacher_output"] == MALFORMED and row["reject_reason"] == "malformed_trace"
        elif row["answer"] != row["label"]:
            assert row["reject_reason"] == "answer_mismatch"
        if row["reject_reason"] in ("malformed_trace", "answer_mismatch"):
            assert not row["judge_called"] and row["judge_output"] is None  # nothing paid for a lost cause
            continue
        jkey = content_key("fake-judge", PROMPTS.judge(row, row["reasoning"], ""))
        judge_times += [t for t, _ in log[jkey]]
        if row["judge_error"]:
            assert row["reject_reason"] == "judge_error" and row["error"].startswith("judge: ")
        elif row["judge_output"] == MALFORMED:
            assert row["grade"] is None and row["reject_reason"] == "grade_unparseable" and not row["accepted"]
        else:
            assert row["accepted"] == (row["grade"] in ("excellent", "good"))
    assert min(judge_times) < max(teacher_times)  # judging streamed while teacher calls were still going
    assert summary["teacher_calls"] == 48 and summary["judge_calls"] == int(attempts["judge_called"].sum())
    assert summary["cost_usd"] == pytest.approx(attempts["cost_usd"].sum(), abs=1e-5) and summary["cost_usd"] > 0

    sft = pd.read_parquet(out / "sft.parquet")
    kept = attempts[attempts["accepted"]]
    assert list(sft.columns) == ["cell_line", "pert", "gene", "label", "split", "messages"] and len(sft) == len(kept)
    for row, messages in zip(_records(kept), sft["messages"]):
        messages = [dict(m) for m in messages]
        assert messages[:2] == prompts.student_messages(row, "")  # the student's prompt, not the teacher's
        assert messages[:2] != PROMPTS.teacher(row, "") and "observed outcome" not in messages[1]["content"]
        assert messages[2]["role"] == "assistant"
        assert prompts.parse_trace(messages[2]["content"]) == (row["reasoning"], row["label"])

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["accepted"] == summary["accepted"]
    assert manifest["template_versions"] == PROMPTS.versions
    assert manifest["models"] == {"teacher": "fake-teacher", "judge": "fake-judge"}
    run = mlflow.get_run(summary["run_id"])
    assert run.data.metrics["accepted"] == summary["accepted"] and "grade_good" in run.data.metrics
    assert run.inputs.dataset_inputs[0].dataset.name == "perturbqa-train-sample"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(summary["run_id"])}
    assert {"grade_histogram.png", "traces_sample.json", "manifest.json"} <= artifacts
    sampled = mlflow.artifacts.load_dict(f"runs:/{summary['run_id']}/traces_sample.json")  # gathered over batches
    assert [r["tuple_id"] for r in sampled["rejected"]] == list(attempts.loc[~attempts["accepted"], "tuple_id"][: generate.SAMPLE_TRACES])
    assert len(sampled["kept"]) == min(len(sft), generate.SAMPLE_TRACES)


@pytest.mark.unit
def test_table_writer_streams_batches_into_few_row_groups_and_writes_nothing_on_error(tmp_path, monkeypatch):
    """The traces stage writes as it goes (the driver never holds the run): batches are buffered
    into row groups, and a failure part-way leaves the previous file as it was and no temp file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from synthpert import artifacts

    monkeypatch.setattr(artifacts, "ROW_GROUP_ROWS", 10)
    schema = pa.schema([("tuple_id", pa.string()), ("n", pa.int64())])
    batches = [pd.DataFrame({"tuple_id": [f"t{i}-{j}" for j in range(4)], "n": range(4), "extra": 1.0}) for i in range(7)]
    with artifacts.TableWriter(tmp_path, "out", schema) as writer:
        for batch in batches:
            writer.write(batch)
        assert not (tmp_path / "out.parquet").exists()  # only complete files appear
    whole = pd.concat(batches, ignore_index=True)[["tuple_id", "n"]]
    assert pd.read_parquet(tmp_path / "out.parquet").equals(whole)
    assert pq.ParquetFile(tmp_path / "out.parquet").metadata.num_row_groups == 3  # 12 + 12 + 4 rows, not 7 groups
    assert writer.entry == {"file": "out.parquet", "rows": 28, "sha256": artifacts.sha256_file(tmp_path / "out.parquet"),
                            "schema": schema.to_string()}

    with pytest.raises(RuntimeError, match="mid-run"), artifacts.TableWriter(tmp_path, "out", schema) as failing:
        failing.write(batches[0])
        raise RuntimeError("mid-run")
    assert pd.read_parquet(tmp_path / "out.parquet").equals(whole) and [p.name for p in tmp_path.iterdir()] == ["out.parquet"]



def _cli(tmp_path: Path, api: FakeAPI, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAKE_PROVIDER_KEY": SECRET}
    args = [
        "generate", "--teacher-base-url", api.base_url, "--teacher-model", "fake-teacher", "--judge-model", "fake-judge",
        "--cell-line", "k562", "--limit", "40", "--concurrency", "4", "--keep", "excellent,good", "--output", str(out), "--json",
        "--set", "generate.teacher.api_key_env=FAKE_PROVIDER_KEY", "--set", "data.knowledge.enabled=false",
        "--set", "generate.actors=1", "--set", "tracking.enabled=false",  # fewer processes to start twice
    ]
    return subprocess.Popen([sys.executable, "-m", "synthpert", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


@pytest.mark.slow
def test_cli_resumes_after_kill_9_exactly_once_without_repaying_or_leaking_the_key(tmp_path):
    out = tmp_path / "traces"
    with FakeAPI(free_port(), Faults(rate_429=0.1, retry_after_s=0.2, seed=2), latency_s=0.25) as api:
        victim = _cli(tmp_path, api, out)
        deadline = time.monotonic() + 240
        while not (out / "calls.sqlite").exists() or len(finished_keys(out / "calls.sqlite")) < 12:
            assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()
            time.sleep(0.2)
        os.killpg(victim.pid, signal.SIGKILL)  # the CLI and everything it started
        killed_out, killed_err = victim.communicate()
        time.sleep(1.0)
        finished = finished_keys(out / "calls.sqlite")
        answered = dict(api.answered)
        assert 12 <= len(finished) < 80 and not (out / "attempts.parquet").exists()

        rerun = _cli(tmp_path, api, out)
        stdout, stderr = rerun.communicate(timeout=240)
        assert rerun.returncode == 0, stderr
        assert all(api.answered[key] == answered[key] for key in finished)  # no finished call was made again
        assert api.authorization == {f"Bearer {SECRET}"}  # the key reached the provider...
    summary = json.loads(stdout.strip().splitlines()[-1])
    attempts = pd.read_parquet(out / "attempts.parquet")
    assert len(attempts) == attempts["tuple_id"].nunique() == summary["rows"] == 40
    assert summary["cached"] >= len(finished)
    assert summary["teacher_calls"] + summary["judge_calls"] + summary["cached"] == 40 + int(attempts["judge_output"].notna().sum())
    for key in ("completed", "accepted", "rejected_grade", "rejected_answer", "errored", "tokens", "cost_usd"):
        assert key in summary
    # ...and nowhere else: not in the CLI's output, the output files, the call cache, Ray's logs.
    ray_sessions = [p for pid in (victim.pid, rerun.pid) for p in Path("/tmp/ray").glob(f"session_*_{pid}")]
    _assert_secret_nowhere([tmp_path, *ray_sessions], killed_out, killed_err, stdout, stderr)


@pytest.mark.ray
@pytest.mark.serve
@pytest.mark.slow
def test_generate_against_our_serve_endpoint_with_the_bundled_model(ray_local, tmp_path, monkeypatch, embedded_model):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None,
        [
            f"generate.output_dir={tmp_path / 'traces'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "data.limit=2",
            "data.cell_lines=[k562]",
            "data.knowledge.enabled=false",  # short prompts: the 135M model runs on 2 CPU cores here
            "serve.engine=transformers",  # the portable engine; the pipeline test generates on the default (vLLM)
            "generate.teacher.max_tokens=32",
            "generate.judge.max_tokens=24",
            "generate.require_answer_match=false",
            "generate.keep=[excellent,good,average,bad,terrible]",
        ],
    )
    summary = generate.run(cfg, progress=False)
    attempts = pd.read_parquet(tmp_path / "traces" / "attempts.parquet")
    sft = pd.read_parquet(tmp_path / "traces" / "sft.parquet")
    assert len(attempts) == 2 and summary["errored"] == 0, attempts["error"].tolist()
    print(summary, attempts[["teacher_output", "reasoning", "answer", "grade", "reject_reason"]].to_dict("records"))
    assert attempts["teacher_output"].str.len().gt(0).all()
    judged = attempts[attempts["judge_output"].notna()]
    assert judged["grade"].isin(judge.GRADES).all()  # guided choice: always exactly one grade
    for output, grade in zip(judged["judge_output"], judged["grade"]):  # the critic: a critique, then the grade
        assert output.startswith("Critique: ") and output.endswith(f"\nGrade: {grade}"), output
    assert len(sft) == summary["accepted"] == len(judged)


@pytest.mark.unit
def test_cli_rejects_bad_input_with_exit_2():
    from tests.conftest import run_cli

    proc = run_cli("generate", "--keep", "excellent,great", "--output", "unused")
    assert proc.returncode == 2 and "great" in proc.stderr and "keep" in proc.stderr
    proc = run_cli("generate", "--cell-line", "k562", "--split", "holdout:rpe1", "--output", "unused")
    assert proc.returncode == 2 and "--cell-line or --split" in proc.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_budget_stops_sending_then_a_bigger_budget_finishes_without_repaying(ray_local, tmp_path, monkeypatch):
    from synthpert.errors import SynthPertError
    from synthpert.llm.client import BUDGET_REFUSED, prompt_tokens_estimate

    monkeypatch.chdir(tmp_path)
    prices = ["generate.teacher.price_in_per_mtok=1000", "generate.teacher.price_out_per_mtok=1000",
              "generate.judge.price_in_per_mtok=1000", "generate.judge.price_out_per_mtok=1000"]  # $0.001 a token
    with FakeAPI(free_port(), latency_s=0.05) as api:
        sizes = ["data.limit=24", "generate.teacher.max_concurrency=4", "generate.judge.max_concurrency=4",
                 "generate.teacher.max_tokens=200", "generate.judge.max_tokens=100", *prices]
        cfg = _fake_cfg(api, tmp_path, *sizes)
        rows = _records(sample_tuples(cfg.data))
        worst_teacher = [(prompt_tokens_estimate(PROMPTS.teacher(r, "")) + 200) / 1000 for r in rows]
        budget = round(0.3 * sum(worst_teacher), 2)  # well under what the teacher calls alone would cost
        with pytest.raises(SynthPertError, match=r"budget generate.max_cost_usd=\$.* reached .* rows not finished") as stop:
            generate.run(_fake_cfg(api, tmp_path, *sizes, f"generate.max_cost_usd={budget}"), progress=False)
        first = pd.read_parquet(tmp_path / "traces" / "attempts.parquet")
        answered_first = dict(api.answered)
        sent = int(first["teacher_called"].sum() + first["judge_called"].sum())
        spent = float(first["cost_usd"].sum())
        refused = first["error"].str.endswith(BUDGET_REFUSED, na=False)
        assert len(first) == 24 and 0 < refused.sum() < 24 and sent == api.answered_total()
        assert f"{refused.sum()} of 24 rows not finished" in str(stop.value), str(stop.value)
        # reserving the worst case before sending: spent <= budget; one batch of in-flight calls is the most
        # that can be past it (were a provider to bill more than the reservation), and it is not here
        assert spent <= budget + 8 * max(worst_teacher)
        assert spent <= budget
        assert sent <= budget / min(first.loc[first["teacher_called"], "teacher_cost_usd"]) + 8  # stopped, not finished

        summary = generate.run(_fake_cfg(api, tmp_path, *sizes, "generate.max_cost_usd=1000"), progress=False)
        second = pd.read_parquet(tmp_path / "traces" / "attempts.parquet")
    assert list(second["tuple_id"]) == [r["tuple_id"] for r in rows] and summary["refused"] == 0 == summary["errored"]
    assert all(api.answered[key] == 1 for key in answered_first)  # no answered call was made again
    assert max(api.answered.values()) == 1
    assert summary["cached"] == sent  # every call the first run paid for came from the cache
    # the estimate (printed before, kept in the manifest and MLflow): the whole run's real cost is within its range
    cost = json.loads((tmp_path / "traces" / "manifest.json").read_text())["estimate"]
    assert cost["tuples"] == 24 and cost["cached_calls"] == sent and cost["output_tokens_low_from"] == "cache"
    assert cost["teacher"]["tokens_in"][0] == sum(second["teacher_tokens_in"])  # the same count the fake server bills
    assert cost["teacher"]["usd"][0] < cost["teacher"]["usd"][1] and spent + summary["cost_usd"] <= cost["usd"][1]
    assert second["teacher_cost_usd"].sum() == pytest.approx(cost["teacher"]["usd"][0], rel=0.25)  # low: measured averages
    params = mlflow.get_run(summary["run_id"]).data.params
    assert json.loads(params["estimate.usd"]) == cost["usd"]
    assert summary["teacher_calls"] + summary["judge_calls"] + sent == 24 + int(second["judge_output"].notna().sum())


@pytest.mark.ray
def test_prediction_budget_stops_paid_calls_then_a_rerun_finishes_without_repaying(ray_local, tmp_path):
    """evaluate.max_cost_usd: the teacher as a predictor goes through the same reserve/settle budget."""
    from synthpert import estimate, predict
    from synthpert.errors import SynthPertError
    from synthpert.llm.client import BUDGET_REFUSED

    with FakeAPI(free_port(), latency_s=0.05) as api:
        cfg = _fake_cfg(api, tmp_path, "evaluate.limit=6", "generate.teacher.max_tokens=100", "generate.teacher.max_concurrency=4",
                        "generate.teacher.price_in_per_mtok=1000", "generate.teacher.price_out_per_mtok=1000")
        teacher, out = cfg.generate.teacher, tmp_path / "predict-teacher"
        tuples = eval_tuples(cfg.data, cfg.evaluate)
        budget = round(0.3 * estimate.predict_estimate(tuples, teacher, cfg.evaluate.direction)["usd"][1], 4)
        cfg.evaluate.max_cost_usd = budget
        with pytest.raises(SynthPertError, match=rf"budget evaluate.max_cost_usd=\${budget} reached .* rows not finished"):
            predict.predict(cfg, tuples, teacher, api.base_url, "cot", out, score=False, progress=False)
        first = pd.read_parquet(out / "predictions.parquet")
        refused = first["llm_error"].str.endswith(BUDGET_REFUSED, na=False)
        assert 0 < refused.sum() < len(first) and int(first["llm_called"].sum()) == api.answered_total()
        assert first["llm_cost_usd"].sum() <= budget
        answered_first = dict(api.answered)

        cfg.evaluate.max_cost_usd = 1000.0
        second = predict.predict(cfg, tuples, teacher, api.base_url, "cot", out, score=False, progress=False)
    assert second["llm_error"].isna().all() and len(second) == len(tuples)
    assert int(second["llm_cached"].sum()) == len(answered_first) and max(api.answered.values()) == 1  # nothing paid twice
