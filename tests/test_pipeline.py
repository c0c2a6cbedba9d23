"""The pipeline: skip-if-done keys and champion promotion (the whole local run as a Ray job, run
twice, is in tests/test_multinode.py, on a multi-node cluster)."""

import mlflow
import pytest
from mlflow import MlflowClient

from synthpert import tracking
from synthpert.config import load_config
from synthpert.pipeline import Pipeline, declared_inputs
from synthpert.results import PredictResult, TrainResult

STAGES = ["traces", "train-cot", "train-raw", "predict-student-cot", "predict-student-raw", "predict-base", "evaluate", "register", "report"]


@pytest.mark.unit
def test_a_finished_stage_is_skipped_and_a_failed_one_reruns(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    calls = []

    def work(out):
        calls.append(out)
        (out / "thing.txt").write_text("x")
        return {"rows": len(calls), "errored": 0, "model": "m", "sha256": "x"}

    def broken(out):
        raise RuntimeError("boom")

    one, two = (declared_inputs(cfg, "train", mode="cot", **{"traces.sft": sft}) for sft in ("a", "b"))
    first = Pipeline(cfg, progress=False)
    with pytest.raises(RuntimeError):
        first.stage("s", one, PredictResult, broken)  # a crash leaves no stage.json: the stage is not done
    assert first.stage("s", one, PredictResult, work).rows == 1
    second = Pipeline(cfg, progress=False)
    assert second.stage("s", one, PredictResult, work).rows == 1 and len(calls) == 1
    assert second.skipped == ["s"] and second.ran == []
    assert second.stage("s", two, PredictResult, work).rows == 2  # other inputs are another stage


def _registry(cfg, name: str, versions: int) -> MlflowClient:
    """A registered model with `versions` versions (each a logged adapter folder)."""
    tracking.setup(cfg.tracking)
    client = MlflowClient()
    client.create_registered_model(name)
    for _ in range(versions):
        with mlflow.start_run():
            mlflow.log_text("adapter", "adapter/a.txt")
            client.create_model_version(name, f"{mlflow.get_artifact_uri()}/adapter", mlflow.active_run().info.run_id)
    return client


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_champion_moves_only_to_a_better_version(tmp_path):
    client = _registry(load_config(None, [f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db"]), "student", 3)
    first = tracking.promote_if_better("student", "1", 0.60, "champion")
    worse = tracking.promote_if_better("student", "2", 0.55, "champion")
    better = tracking.promote_if_better("student", "3", 0.65, "champion")
    assert first["promoted"] and not worse["promoted"] and better["promoted"]
    assert str(client.get_model_version_by_alias("student", "champion").version) == "3"
    assert client.get_model_version("student", "2").tags[tracking.SCORE_TAG] == "0.55"


def _fake_predictions(cfg, root, truth, name: str, skill: float, failed=None) -> PredictResult:
    """A model's predictions file on the validation + test tuples: scores that follow the truth by
    `skill` (plus seeded noise); `failed(rows)`: a mask of the rows whose call failed."""
    import numpy as np

    from synthpert.artifacts import write_manifest, write_table
    import pyarrow as pa

    from synthpert.data import eval_tuples
    from synthpert.predict import PROBS

    rows = eval_tuples(cfg.data, cfg.evaluate)[["cell_line", "pert", "gene", "label", "split"]]
    rng = np.random.default_rng(len(name))
    truth_label = rows.merge(truth[["cell_line", "pert", "gene", "label"]], on=["cell_line", "pert", "gene"], suffixes=("", "_t"))["label_t"]
    logits = rng.normal(size=(len(rows), 3)) + skill * np.stack([truth_label == lab for lab in ("upregulated", "downregulated", "not differentially expressed")], 1)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    table = rows.assign(**{p: probs[:, i] for i, p in enumerate(PROBS)})
    if failed is not None:
        mask = failed(rows)
        table.loc[mask, list(PROBS)] = np.nan
        table["llm_error"] = np.where(mask, "InternalServerError: Error code: 503", None)
    frame = pa.Table.from_pandas(table, preserve_index=False)
    out = root / name
    out.mkdir(parents=True)
    outputs = {"predictions": write_table(out, "predictions", frame, frame.schema)}
    write_manifest(out, "predict", outputs)
    return PredictResult(stage=f"predict-{name}", key="k", dir=out, wall_s=0.0, inputs={}, rows=len(rows), errored=0, model=name,
                         sha256=outputs["predictions"]["sha256"])


@pytest.mark.slow
def test_test_labels_cannot_move_the_champion(tmp_path, monkeypatch):
    """The champion is chosen on validation: scrambling every test label changes the test metrics
    and nothing about the choice; a version better on test but worse on validation is not promoted."""
    import numpy as np

    import synthpert.baselines as baselines
    import synthpert.data as data

    # a fixed and a learned baseline (the kernel's bandwidth by grouped CV); that every learned one reads no
    # test label, the ranker and twoside too, is tests/test_baselines.py's
    cfg = load_config(None, [f"run_dir={tmp_path}/a", "data.cell_lines=[k562]", "evaluate.limit=30", "evaluate.bootstrap=0",
                             "evaluate.baselines=[retrieval,kernel]", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db"])
    truth = data.load_split(cfg.data)
    assert (truth["split"] == "validation").any()
    predictions = {"student-cot": _fake_predictions(cfg, tmp_path / "p", truth, "student-cot", 1.5)}
    fits = []  # each baseline learns once from the train rows and predicts validation and test alike
    scores = baselines._scores
    monkeypatch.setattr(baselines, "_scores", lambda method, *args: fits.append(method) or scores(method, *args))
    real = Pipeline(cfg, progress=False).evaluate(predictions)
    assert sorted(fits) == sorted(cfg.evaluate.baselines), fits
    assert set(real.validation) == set(real.models) >= {"student-cot", "trivial", *cfg.evaluate.baselines}
    scrambled_truth = truth.copy()
    test = (scrambled_truth["split"] == "test").to_numpy()
    scrambled_truth.loc[test, "label"] = np.random.default_rng(0).permutation(scrambled_truth.loc[test, "label"].to_numpy())
    monkeypatch.setattr(data, "load_split", lambda _: scrambled_truth)
    cfg_b = cfg.model_copy(update={"run_dir": tmp_path / "b"})
    scrambled = Pipeline(cfg_b, progress=False).evaluate(predictions)
    assert scrambled.validation == real.validation
    assert scrambled.models["student-cot"].auroc_de != real.models["student-cot"].auroc_de

    client = _registry(cfg, "synthpert-student", 2)
    good_val, bad_val = {"auroc_de": 0.70, "auroc_dir": 0.70}, {"auroc_de": 0.60, "auroc_dir": 0.60}
    student = lambda version: TrainResult.model_construct(model_version=version, model_uri=f"u{version}", key=f"k{version}")  # noqa: E731
    first = Pipeline(cfg, progress=False).register(student("1"), good_val, {"auroc_de": 0.50, "auroc_dir": 0.50}, real)
    second = Pipeline(cfg, progress=False).register(student("2"), bad_val, {"auroc_de": 0.99, "auroc_dir": 0.99}, real)
    assert first.promoted and not second.promoted
    holder = client.get_model_version_by_alias("synthpert-student", "champion")
    assert str(holder.version) == "1" and holder.tags["synthpert.test.auroc_de"] == "0.5"
    assert client.get_model_version("synthpert-student", "2").tags["synthpert.validation.auroc_de"] == "0.6"


def _fails_on(rows, split: str, n: int, labels=("upregulated", "downregulated")):
    """The first `n` rows of `split` whose truth is one of `labels` (DE-positive by default)."""
    import numpy as np

    mask = (rows["split"] == split).to_numpy() & rows["label"].isin(labels).to_numpy()
    return mask & (np.cumsum(mask) <= n)


@pytest.mark.slow  # the evaluate stage: the split, the GO annotations, a plot per model and part
def test_every_model_is_scored_on_the_pairs_every_ranked_model_answered(tmp_path):
    """One model failing on two DE-positive test pairs: every model and baseline is scored without
    them (left out, counted); one under evaluate.min_coverage is shown with its coverage, not
    ranked, and narrows nobody's pairs. The report marks it and shows coverage and errors."""
    from synthpert import report
    from synthpert.data import load_split

    cfg = load_config(None, [f"run_dir={tmp_path}", "data.cell_lines=[k562]", "evaluate.limit=30", "evaluate.bootstrap=0",
                             "evaluate.baselines=[]", "evaluate.min_coverage=0.9"])
    truth = load_split(cfg.data)
    predictions = {
        "student-cot": _fake_predictions(cfg, tmp_path / "p", truth, "student-cot", 1.5),
        "student-raw": _fake_predictions(cfg, tmp_path / "p", truth, "student-raw", 1.0, lambda rows: _fails_on(rows, "test", 2)),
        "base": _fake_predictions(cfg, tmp_path / "p", truth, "base", 0.5, lambda rows: _fails_on(rows, "test", 5, ("not differentially expressed",))),
    }
    result = Pipeline(cfg, progress=False).evaluate(predictions)
    test = result.models
    asked = test["trivial"].answers.asked
    assert result.left_out == {"validation": 0, "test": 2} and asked == 30
    assert {name: m.n for name, m in test.items()} == {"student-cot": 28, "student-raw": 28, "base": 23, "trivial": 28}
    assert {name: m.ranked for name, m in test.items()} == {"student-cot": True, "student-raw": True, "base": False, "trivial": True}
    assert (test["student-raw"].answers.errors, test["student-raw"].answers.coverage) == (2, pytest.approx(28 / 30))
    assert test["student-raw"].per_cell_line["k562"].answers.errors == 2
    assert {m.n for m in result.validation.values()} == {30}

    headers, rows = report._side_by_side(result)
    by_name = {row[0]: dict(zip(headers, row)) for row in rows}
    assert by_name["student-raw"]["test coverage"] == "93.3%" and by_name["student-raw"]["test errors"] == "2"
    assert by_name["base (not ranked)"]["test n"] == "23" and by_name["base (not ranked)"]["val coverage"] == "100.0%"
    assert "test: 28 of 30 asked pairs, 2 left out" in report.pairs_note(cfg, result)


@pytest.mark.unit
def test_a_student_under_min_coverage_cannot_take_the_champion_alias(tmp_path):
    from synthpert.pipeline import STUDENT
    from synthpert.results import EvaluateResult, Metrics

    cfg = load_config(None, [f"run_dir={tmp_path}", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db"])
    client = _registry(cfg, "synthpert-student", 2)
    scores = {"auroc_de": 0.9, "auroc_dir": 0.9}

    def evaluation(test_answered: int) -> EvaluateResult:
        metrics = lambda answered: Metrics(**scores, n=answered, ranked=answered >= 98, answers={  # noqa: E731
            "asked": 100, "answered": answered, "errors": 100 - answered, "coverage": answered / 100})
        return EvaluateResult(stage="evaluate", key=f"e{test_answered}", dir=tmp_path, wall_s=0.0, inputs={},
                              models={STUDENT: metrics(test_answered)}, validation={STUDENT: metrics(100)})

    student = lambda version: TrainResult.model_construct(model_version=version, model_uri=f"u{version}", key=f"k{version}")  # noqa: E731
    refused = Pipeline(cfg, progress=False).register(student("1"), scores, scores, evaluation(90))
    assert not refused.promoted and refused.refused == "student-cot answered 90.0% of its test pairs, under evaluate.min_coverage=0.98"
    assert client.get_model_version("synthpert-student", "1").tags[tracking.REFUSED_TAG] == refused.refused
    assert Pipeline(cfg, progress=False).register(student("2"), scores, scores, evaluation(99)).promoted
    assert str(client.get_model_version_by_alias("synthpert-student", "champion").version) == "2"


@pytest.mark.unit
def test_hold_out_runs_register_under_their_own_name():
    assert tracking.registered_name(load_config(None)) == "synthpert-student"
    assert tracking.registered_name(load_config(None, ["train.mode=raw"])) == "synthpert-student-raw"
    assert tracking.registered_name(load_config("configs/paper_rpe1.yaml")) == "synthpert-student-holdout-rpe1"

