import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from synthpert.config import LABELS, DataConfig
from synthpert.errors import SynthPertError
from synthpert.evaluate import (
    _point_metrics,
    _Rows,
    align,
    answer_counts,
    bootstrap_ci,
    check_predictions,
    evaluate,
    grouped_auroc,
    like_with_like,
    load_truth,
    pair_index,
    weighted_metrics,
    write_report,
)
from tests.conftest import run_cli


UP, DOWN, NONE = LABELS


@pytest.fixture(scope="module")
def truth():
    return load_truth(DataConfig())


def _noisy(test: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Probabilities that lean towards the truth: informative but far from perfect."""
    rng = np.random.default_rng(seed)
    onehot = (test["label"].astype(str).to_numpy()[:, None] == np.asarray(LABELS)[None, :]).astype(float)
    probs = rng.dirichlet([1, 1, 1], len(test)) + 0.8 * onehot
    probs = np.round(probs / probs.sum(axis=1, keepdims=True), 2)  # rounding makes ties
    probs[:, 2] = 1 - probs[:, 0] - probs[:, 1]
    return test[["cell_line", "pert", "gene"]].astype(str).assign(p_up=probs[:, 0], p_down=probs[:, 1], p_none=probs[:, 2])


# ---------------------------------------------------------------- the metric on a hand-made case
HAND = [  # pert, gene, true label, (p_up, p_down, p_none)
    ("p1", "g1", UP, (0.6, 0.2, 0.2)),
    ("p2", "g1", NONE, (0.1, 0.1, 0.8)),
    ("p3", "g1", DOWN, (0.2, 0.5, 0.3)),
    ("p4", "g1", NONE, (0.3, 0.4, 0.3)),
    ("p1", "g2", NONE, (0.1, 0.2, 0.7)),
    ("p2", "g2", UP, (0.2, 0.2, 0.6)),
    ("p3", "g2", NONE, (0.5, 0.1, 0.4)),
    ("p1", "g3", NONE, (0.05, 0.05, 0.9)),
    ("p2", "g3", NONE, (0.1, 0.0, 0.9)),
]


def _hand_truth() -> pd.DataFrame:
    rows = [("k562", p, g, l, "test") for p, g, l, _ in HAND] + [("k562", "p9", "g1", UP, "train")]
    frame = pd.DataFrame(rows, columns=["cell_line", "pert", "gene", "label", "split"])
    frame["direction"] = frame["label"].map({UP: "up", DOWN: "down", NONE: "none"})
    frame["de"] = (frame["direction"] != "none").astype(int)
    return frame


def _hand_predictions() -> pd.DataFrame:
    return pd.DataFrame([("k562", p, g, *probs) for p, g, _, probs in HAND], columns=["cell_line", "pert", "gene", "p_up", "p_down", "p_none"])


@pytest.mark.unit
def test_metrics_on_a_hand_made_case():
    result = evaluate(check_predictions(_hand_predictions()), _hand_truth(), bootstrap=0)
    # DE score = p_up + p_down. g1: positives .8 (p1), .7 (p3); negatives .2 (p2), .7 (p4):
    # .8>.2, .8>.7, .7>.2, .7=.7 (half) -> 3.5/4. g2: positive .4 vs negatives .3, .6 -> 1/2.
    # g3 has no DE-positive pair: skipped. Mean over genes: (0.875 + 0.5) / 2.
    assert result["auroc_de"] == pytest.approx((0.875 + 0.5) / 2)
    assert result["n_genes_de"] == 2
    # direction score = p_up / (p_up + p_down) on DE-positive pairs: g1 up .75 vs down 2/7 -> 1;
    # g2 has a single DE-positive pair: skipped.
    assert result["auroc_dir"] == pytest.approx(1.0)
    assert result["n_genes_dir"] == 1
    # argmax answers (ties -> not DE): up, none, down, down, none, none, up, none, none: 6 of 9 right
    assert result["accuracy"] == pytest.approx(6 / 9)
    assert result["trivial_accuracy"] == pytest.approx(6 / 9)
    # F1 = 2 TP / (predicted + true): up 2/4, down 2/3, none 8/11
    assert result["macro_f1"] == pytest.approx((2 / 4 + 2 / 3 + 8 / 11) / 3)
    assert result["per_class"][DOWN] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert result["confusion"] == {"labels": list(LABELS), "matrix": [[1, 0, 1], [0, 1, 0], [1, 1, 4]]}
    # SynthPert: pooled AUROC of hard answers (up/down = 1). Positives 1, 1, 0; negatives
    # 0, 1, 0, 1, 0, 0 -> (2 x (4 + 2 x 0.5) + 4 x 0.5) / 18
    assert result["synthpert_auroc_de"] == pytest.approx(12 / 18)
    assert result["per_cell_line"]["k562"]["coverage"] == 1.0


@pytest.mark.unit
def test_a_separate_direction_question_scores_the_direction():
    """evaluate.direction = separate: p_dir_up, where given, is the direction score."""
    hand = _hand_predictions()
    # g1's DE pairs: p1 (up) and p3 (down). Derived scores rank them right (AUROC 1); the
    # separate question ranks them the other way round; an empty p_dir_up falls back to derived.
    flipped = hand.assign(p_dir_up=[0.1, None, 0.9, None, None, None, None, None, None])
    assert evaluate(check_predictions(hand), _hand_truth(), bootstrap=0)["auroc_dir"] == pytest.approx(1.0)
    result = evaluate(check_predictions(flipped), _hand_truth(), bootstrap=0)
    assert result["auroc_dir"] == pytest.approx(0.0) and result["auroc_de"] == pytest.approx((0.875 + 0.5) / 2)
    assert evaluate(check_predictions(hand.assign(p_dir_up=None)), _hand_truth(), bootstrap=0)["auroc_dir"] == pytest.approx(1.0)
    with pytest.raises(SynthPertError, match="p_dir_up must be in"):
        check_predictions(hand.assign(p_dir_up=1.5))


@pytest.mark.unit
def test_grouped_auroc_is_sklearn_per_group_with_ties_and_weights(truth):
    test = truth[(truth.split == "test") & (truth.cell_line == "hepg2")]
    genes = test.gene.to_numpy()
    chosen = np.isin(genes, pd.unique(genes)[:300])
    rng = np.random.default_rng(1)
    group = pd.factorize(genes[chosen])[0]
    y = test.de.to_numpy()[chosen]
    score = np.round(rng.random(chosen.sum()), 1)  # many ties
    weights = rng.integers(0, 3, (chosen.sum(), 3)).astype(float)  # bootstrap-like multiplicities
    got = grouped_auroc(group, y, score, group.max() + 1, weights)
    checked = 0
    for b in range(weights.shape[1]):
        for g in range(group.max() + 1):
            reps = weights[group == g, b].astype(int)
            yy, ss = np.repeat(y[group == g], reps), np.repeat(score[group == g], reps)
            if len(set(yy)) < 2:
                assert np.isnan(got[g, b])
            else:
                assert got[g, b] == pytest.approx(roc_auc_score(yy, ss), abs=1e-12)
                checked += 1
    assert checked > 100


@pytest.mark.unit
def test_answers_only_and_unparseable_rows():
    preds = _hand_predictions()[["cell_line", "pert", "gene"]].assign(answer=[l for _, _, l, _ in HAND])
    preds.loc[0, "answer"] = "  UPREGULATED "  # case and spaces are fine
    preds.loc[1, "answer"] = None  # no parseable answer
    checked = check_predictions(preds)
    assert checked.loc[1, "answer"] == "unparseable"
    assert checked.loc[1, ["p_up", "p_down", "p_none"]].tolist() == pytest.approx([1 / 3] * 3)
    result = evaluate(checked, _hand_truth(), bootstrap=0)
    assert result["accuracy"] == pytest.approx(8 / 9)
    assert result["n_unparseable"] == 1
    assert result["confusion"]["labels"][-1] == "unparseable"
    assert result["auroc_dir"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.drop(columns=["gene"]), "missing column"),
        (lambda f: f.drop(columns=["p_none"]), "give all of"),
        (lambda f: pd.concat([f, f.iloc[[2]]]), "duplicate predictions"),
        (lambda f: f.assign(p_up=[np.nan] + [0.1] * 8), "finite numbers in [0, 1]"),
        (lambda f: f.assign(p_up=1.5), "finite numbers in [0, 1]"),
        (lambda f: f.assign(p_none=0.0), "must be 1"),
        (lambda f: f.assign(answer="maybe"), "answer must be one of"),
    ],
)
@pytest.mark.unit
def test_bad_predictions_are_errors_that_name_the_rows(change, message):
    with pytest.raises(SynthPertError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_predictions(change(_hand_predictions()))


@pytest.mark.unit
def test_unknown_pairs_are_errors_and_missing_pairs_lower_coverage():
    truth = _hand_truth()
    extra = pd.concat([_hand_predictions(), pd.DataFrame([("k562", "p9", "g1", 0.1, 0.1, 0.8), ("k562", "pX", "g1", 0.1, 0.1, 0.8)], columns=_hand_predictions().columns)])
    with pytest.raises(SynthPertError, match=r"not test pairs.*1 of them are training pairs.*'p9'.*'pX'"):
        align(check_predictions(extra), truth)
    partial = check_predictions(_hand_predictions().iloc[:6])
    result = evaluate(partial, truth, bootstrap=0)
    assert (result["n"], result["test_pairs"], result["coverage"]) == (6, 9, pytest.approx(6 / 9))
    with pytest.raises(SynthPertError, match="miss test pairs"):
        align(partial, truth, require_complete=True)


@pytest.mark.unit
def test_failed_calls_are_missing_pairs_not_bad_probabilities():
    """synthpert.predict keeps a row whose call failed (NaN probabilities, `llm_error` set): scored
    as a missing pair (it once stopped the pipeline's evaluate as 'probabilities must be finite')."""
    frame = _hand_predictions().assign(llm_error=None)
    frame.loc[frame.index[:2], ["p_up", "p_down", "p_none"]] = np.nan
    frame.loc[frame.index[:2], "llm_error"] = "InternalServerError: Error code: 503"
    result = evaluate(check_predictions(frame), _hand_truth(), bootstrap=0)
    assert (result["n"], result["test_pairs"]) == (len(frame) - 2, len(frame))
    with pytest.raises(SynthPertError, match="miss test pairs"):
        align(check_predictions(frame), _hand_truth(), require_complete=True)


@pytest.mark.unit
def test_models_are_compared_on_the_pairs_every_ranked_model_answered():
    """A model whose call failed on a pair (a DE-positive one: the separate direction question once
    dropped only those) must not leave the others scored on more pairs than it: every model is scored
    on the pairs every ranked model answered, and the pairs left out are counted. Under min_coverage
    it is not ranked, keeps its answers among all the pairs, and shrinks nobody's set."""
    complete = _hand_predictions().assign(llm_error=None)
    flaky = complete.copy()
    flaky.loc[0, ["p_up", "p_down", "p_none"]] = np.nan  # p1/g1, truly upregulated
    flaky.loc[0, "llm_error"] = "InternalServerError: Error code: 503"
    baseline = _hand_predictions()  # no llm_error column: every pair answered
    frames = {"complete": complete, "flaky": flaky, "baseline": baseline}
    asked = pair_index(_hand_predictions())
    assert answer_counts(flaky) == {"asked": 9, "answered": 8, "errors": 1, "direction_errors": 0, "coverage": pytest.approx(8 / 9)}

    scored, ranked, left_out = like_with_like(frames, asked, min_coverage=0.8)
    assert ranked == {"complete", "flaky", "baseline"} and left_out == 1
    results = {name: evaluate(frame, _hand_truth(), bootstrap=0) for name, frame in scored.items()}
    assert {name: r["n"] for name, r in results.items()} == {"complete": 8, "flaky": 8, "baseline": 8}
    assert results["complete"]["auroc_de"] == results["flaky"]["auroc_de"] == results["baseline"]["auroc_de"]

    scored, ranked, left_out = like_with_like(frames, asked, min_coverage=0.98)
    assert ranked == {"complete", "baseline"} and left_out == 0
    assert {name: len(frame) for name, frame in scored.items()} == {"complete": 9, "flaky": 8, "baseline": 9}
    all_failed = complete.assign(llm_error="InternalServerError: Error code: 503")
    with pytest.raises(SynthPertError, match="no pair of the 9 asked was answered by every model"):
        like_with_like({"complete": all_failed}, asked, min_coverage=0.0)


@pytest.mark.unit
def test_bootstrap_replicates_use_the_same_metrics_as_the_point_estimates(truth):
    test = truth[(truth.split == "test") & truth.cell_line.isin(["k562", "hepg2"])]
    scored, _ = align(check_predictions(_noisy(test)), truth)
    rows = _Rows(scored)
    unit = weighted_metrics(rows, np.ones((len(scored), 1)))
    per_gene = rows.auroc()
    for scope in (None, 0, 1):
        point = _point_metrics(rows, scope, per_gene)
        for name in ("auroc_de", "auroc_dir", "accuracy", "macro_f1", "trivial_accuracy"):
            assert unit[scope][name][0] == pytest.approx(point[name], abs=1e-12), (scope, name)
    m = rows.scope(0)
    assert point_of(rows, m) == pytest.approx(accuracy_score(rows.true[m], rows.pred[m]))
    assert f1_score(rows.true[m], rows.pred[m], labels=[0, 1, 2], average="macro") == pytest.approx(unit[0]["macro_f1"][0])
    ci = bootstrap_ci(rows, 60, seed=3, progress=False)
    assert ci == bootstrap_ci(rows, 60, seed=3, progress=False)  # seeded
    for scope in (None, 0, 1):
        point = _point_metrics(rows, scope, per_gene)
        for name, interval in ci[scope].items():
            (lo, hi), shift = interval["ci"], interval["shift"]
            assert lo < point[name] < hi and hi - lo < 0.2, (scope, name, lo, point[name], hi)
            if name in ("accuracy", "trivial_accuracy", "macro_f1"):
                assert abs(shift) < 0.005  # resampling shifts only the per-gene AUROC mean


@pytest.mark.unit
def test_shifted_interval_stays_in_the_metric_range():
    from synthpert.evaluate import _interval

    got = _interval(np.array([0.0, 0.5, 1.0, np.nan]), 0.9)  # few genes: replicates far from the point
    assert got["shift"] == pytest.approx(-0.4) and 0.0 <= got["ci"][0] < 0.9 and got["ci"][1] == 1.0
    assert _interval(np.array([np.nan]), 0.5) == {"ci": None, "shift": None}


def point_of(rows, mask):
    return float(np.mean(rows.true[mask] == rows.pred[mask]))


@pytest.mark.unit
def test_report_files(tmp_path, truth):
    test = truth[(truth.split == "test") & (truth.cell_line == "rpe1")]
    result = evaluate(check_predictions(_noisy(test)), truth, bootstrap=20, progress=False)
    paths = write_report(result, tmp_path)
    saved = json.loads(paths["metrics"].read_text())
    assert saved["per_cell_line"]["rpe1"]["ci"]["auroc_de"][0] < saved["auroc_de"] < 1
    for name in ("confusion", "auroc_hist"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[name].stat().st_size > 10_000


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_cli_evaluate_json_and_bad_file(tmp_path, truth):
    test = truth[(truth.split == "test") & (truth.cell_line == "k562")]
    preds = _noisy(test)
    preds["answer"] = test["label"].astype(str).to_numpy()  # answers perfect, probabilities noisy
    path = tmp_path / "preds.csv"
    preds.to_csv(path, index=False)
    proc = run_cli("evaluate", "--predictions", str(path), "--output-dir", str(tmp_path / "out"), "--bootstrap", "30", "--json", check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["accuracy"] == 1.0 and result["macro_f1"] == 1.0
    assert 0.6 < result["auroc_de"] < 1 and result["trivial_accuracy"] == pytest.approx((test.de == 0).mean())
    assert set(result["per_cell_line"]) == {"k562"} and len(result["ci"]["auroc_dir"]) == 2
    assert (tmp_path / "out" / "metrics.json").is_file() and (tmp_path / "out" / "manifest.json").is_file()
    assert "k562" in proc.stdout and "AUROC DE" in proc.stdout

    train_row = truth[(truth.split == "train") & (truth.cell_line == "k562")].iloc[0]
    bad = pd.concat([preds.head(3), pd.DataFrame([{"cell_line": "k562", "pert": train_row.pert, "gene": train_row.gene, "p_up": 0.2, "p_down": 0.2, "p_none": 0.6, "answer": UP}])])
    bad.to_parquet(tmp_path / "bad.parquet")
    proc = run_cli("evaluate", "--predictions", str(tmp_path / "bad.parquet"), "--output-dir", str(tmp_path / "out2"))
    assert proc.returncode == 2
    assert "not test pairs" in proc.stderr and train_row.pert in proc.stderr and "training pairs" in proc.stderr
