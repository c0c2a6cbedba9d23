import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from synthpert.baselines import Profiles, Queries, gene_neighbours, kernel_weights, ratios, run_baseline, side_scores, to_predictions, top_k_weights
from synthpert.ranker import compare_learners, importance_table
from synthpert.config import DataConfig, EvaluateConfig, KnowledgeConfig
from synthpert.data import Knowledge, apply_split, carve_validation
from synthpert.evaluate import check_predictions, evaluate, load_truth, read_predictions
from tests.conftest import run_cli

# Per-gene AUROC (DE, direction), PerturbQA Table 1 (Wu et al., ICLR 2025)
PERTURBQA_RETRIEVAL = {"k562": (0.58, 0.69), "rpe1": (0.59, 0.63), "hepg2": (0.56, 0.64), "jurkat": (0.56, 0.61)}
SUMMER = {"k562": (0.62, 0.64), "rpe1": (0.59, 0.64), "hepg2": (0.62, 0.66), "jurkat": (0.59, 0.67)}


@pytest.fixture(scope="module")
def truth():
    return load_truth(DataConfig())


@pytest.fixture(scope="module")
def holdout():
    return load_truth(DataConfig(split="holdout:rpe1"))


@pytest.fixture(scope="module")
def knowledge():
    return Knowledge.load(cfg=KnowledgeConfig(max_go_gene_count=10**9))


def _scramble_test_labels(pairs: pd.DataFrame, part: str = "test") -> pd.DataFrame:
    """The same pairs with the `part` rows' labels permuted among themselves (the others untouched)."""
    out = pairs.copy()
    test = np.flatnonzero((out["split"] == part).to_numpy())
    shuffled = np.random.default_rng(0).permutation(test)
    for column in ("de", "direction", "label"):
        values = out[column].to_numpy().copy()
        values[test] = values[shuffled]
        out[column] = pd.Series(values, index=out.index).astype(pairs[column].dtype)
    return out


def _frame(rows):
    frame = pd.DataFrame(rows, columns=["pert", "gene", "direction"]).assign(cell_line="k562", split="train")
    return frame.assign(de=(frame["direction"] != "none").astype(int))


@pytest.mark.unit
def test_neighbour_means_on_a_hand_made_pool():
    profiles = Profiles.of(_frame([("A", "g1", "up"), ("B", "g1", "none"), ("C", "g1", "down"), ("A", "g2", "none"), ("C", "g2", "up"), ("C", "g2", "up")]))
    query = _frame([("Q", "g1", "none"), ("Q", "g2", "none"), ("Q", "g3", "none")])
    de, up = ratios(profiles.smoothed(np.array([[1.0, 2.0, 0.5]])), Queries(profiles, query))  # weights of A, B, C
    # g1: DE labels A 1, B 0, C 1 -> (1 + 0.5) / 3.5; up share over DE-positive A (up), C (down) -> 1 / 1.5
    # g2: A 0 (weight 1), C measured twice, both up (weight 0.5 each) -> 1 / 2; up share 1
    # g3: never measured -> NaN
    np.testing.assert_allclose(de, [1.5 / 3.5, 1 / 2, np.nan])
    np.testing.assert_allclose(up, [1 / 1.5, 1.0, np.nan])
    np.testing.assert_array_equal(top_k_weights(np.array([[0.9, 0.1, 0.5, 0.5]]), 2), [[1, 0, 1, 0]])  # ties: first
    np.testing.assert_allclose(kernel_weights(np.array([[0.9, 0.8]]), 0.1), [[1, np.exp(-1)]])
    preds = to_predictions(query, np.array([0.4, 0.0, 1.0]), np.array([0.25, 0.5, 1.0]))
    np.testing.assert_allclose(preds.p_up + preds.p_down, [0.4, 0.0, 1.0])
    np.testing.assert_allclose((preds.p_up / (preds.p_up + preds.p_down))[[0, 2]], [0.25, 1.0])


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_retrieval_reproduces_perturbqa_table_1(truth, knowledge):
    preds, info = run_baseline(truth, "retrieval", EvaluateConfig(), knowledge=knowledge, progress=False)
    result = evaluate(check_predictions(preds), truth, bootstrap=0)
    assert result["n"] == (truth.split == "test").sum() and info["k562"]["k"] == 5
    for cell, (de, direction) in PERTURBQA_RETRIEVAL.items():
        got = result["per_cell_line"][cell]
        assert got["auroc_de"] == pytest.approx(de, abs=0.03), cell
        if cell != "jurkat":
            assert got["auroc_dir"] == pytest.approx(direction, abs=0.03), cell
    # Jurkat direction: GO neighbours score ~.68, above PerturbQA's .61 (their retrieval used a
    # larger knowledge graph we do not have): the one cell outside 0.03, reported in the README.
    assert 0.61 < result["per_cell_line"]["jurkat"]["auroc_dir"] < 0.70


@pytest.mark.slow  # the kernel over all four lines through the CLI: ~15-30 s
def test_kernel_beats_summer_in_all_eight_cells_through_the_cli(tmp_path, truth):
    out = tmp_path / "kernel.csv"
    proc = run_cli("baseline", "--cell-line", "all", "--method", "kernel", "--bootstrap", "0", "--output-dir", str(tmp_path), "--predictions-out", str(out), "--json", check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("auroc_de", "auroc_dir", "accuracy", "macro_f1", "trivial_accuracy"):
        assert isinstance(result[key], float)
    for cell, (de, direction) in SUMMER.items():
        got = result["per_cell_line"][cell]
        assert got["auroc_de"] > de and got["auroc_dir"] > direction, (cell, got["auroc_de"], got["auroc_dir"])
        assert result["baseline"][cell]["tau_de"] in EvaluateConfig().kernel_taus
    again = evaluate(read_predictions(out), truth, bootstrap=0)  # the written file round-trips
    assert again["auroc_de"] == pytest.approx(result["auroc_de"]) and again["auroc_dir"] == pytest.approx(result["auroc_dir"])
    assert (tmp_path / "baseline-kernel-perturbqa" / "predictions.parquet").is_file()


@pytest.mark.unit
def test_read_out_neighbours_and_two_sided_smoothing_by_hand():
    # DE sets: g1 {A, B}, g2 {A, B, C}, g3 {C}; g1 and g2 up under A and B, g3 down under C, g2 down under C
    rows = [("A", "g1", "up"), ("B", "g1", "up"), ("A", "g2", "up"), ("B", "g2", "up"), ("C", "g2", "down"), ("C", "g3", "down"),
            ("C", "g1", "none"), ("A", "g3", "none")]
    profiles = Profiles.of(_frame(rows))
    de_side = gene_neighbours(profiles, 1, signed=False).toarray()
    # Jaccard: g1-g2 2/3, g2-g3 1/3, g1-g3 0; each gene keeps its single best neighbour
    np.testing.assert_allclose(de_side, [[0, 2 / 3, 0], [2 / 3, 0, 0], [0, 1 / 3, 0]])
    dir_side = gene_neighbours(profiles, 2, signed=True).toarray()
    # signed responses g1 (+1, +1, 0), g2 (+1, +1, -1), g3 (0, 0, -1): cosines 2/sqrt(6), 1/sqrt(3), g1-g3 0 (dropped)
    np.testing.assert_allclose(dir_side, [[0, 2 / 6**0.5, 0], [2 / 6**0.5, 0, 3**-0.5], [0, 3**-0.5, 0]])
    q = Queries(profiles, _frame([("Q", "g1", "none"), ("Q", "g3", "none")]))
    sums = profiles.smoothed(np.array([[0.0, 0.0, 1.0]]))  # Q votes with C only: g1 not DE, g2 down, g3 down
    np.testing.assert_allclose(side_scores(sums, (sp.csr_matrix(de_side), sp.csr_matrix(dir_side)), 0, q)[0], [0, 1])
    de, up = side_scores(sums, (sp.csr_matrix(de_side), sp.csr_matrix(dir_side)), 1.5, q)
    # g1 pools g2's vote with weight 1.5 x 2/3 = 1: DE (0 + 1) / (1 + 1); g3 pools g2's: DE (1 + 0.5) / (1 + 0.5)
    np.testing.assert_allclose(de, [0.5, 1.0])
    np.testing.assert_allclose(up, [0.0, 0.0])  # every DE vote Q sees is down


@pytest.mark.parametrize("method", ["retrieval", "kernel"])
@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_no_test_label_is_read(truth, knowledge, method):
    """Scrambling the test rows' labels leaves every prediction unchanged (official split)."""
    cfg = EvaluateConfig(kernel_taus=[0.05, 0.1], cv_folds=3)
    a, _ = run_baseline(truth, method, cfg, ["hepg2"], knowledge, progress=False)
    b, _ = run_baseline(_scramble_test_labels(truth), method, cfg, ["hepg2"], knowledge, progress=False)
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_transfer_on_rpe1_holdout_beats_always_not_de_and_reads_no_test_label(holdout):
    preds, info = run_baseline(holdout, "transfer", EvaluateConfig(), progress=False)
    assert info == {"rpe1": {"pool_rows": int((holdout.cell_line != "rpe1").sum()), "pool": "other cell lines"}}
    result = evaluate(check_predictions(preds), holdout, bootstrap=0)
    assert result["n"] == (holdout.cell_line == "rpe1").sum()
    assert result["trivial_accuracy"] == pytest.approx(0.858, abs=0.005)
    assert 0.87 < result["accuracy"] < 0.91 and result["accuracy"] > result["trivial_accuracy"] + 0.02
    scrambled, _ = run_baseline(_scramble_test_labels(holdout), "transfer", EvaluateConfig(), progress=False)
    pd.testing.assert_frame_equal(preds, scrambled)


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_cli_rejects_unknown_method_and_cell_line():
    proc = run_cli("baseline", "--method", "oracle")
    assert proc.returncode == 2 and "unknown baseline method 'oracle'" in proc.stderr
    proc = run_cli("baseline", "--cell-line", "hela")
    assert proc.returncode == 2 and "hela" in proc.stderr


@pytest.fixture(scope="module")
def small():
    """HepG2 cut to 150 training and 40 test perturbations: the learned baselines in seconds."""
    hepg2 = load_truth(DataConfig())
    hepg2 = hepg2[hepg2["cell_line"] == "hepg2"]
    keep = set()
    for part, n in (("train", 150), ("test", 40)):
        perts = np.sort(hepg2.loc[hepg2["split"] == part, "pert"].unique())
        keep |= set(np.random.default_rng(0).choice(perts, n, replace=False))
    out = hepg2[hepg2["pert"].isin(keep)].reset_index(drop=True)
    out.attrs.update(hepg2.attrs)
    return out


SMALL = EvaluateConfig(kernel_taus=[0.05, 0.2], twoside_lams=[0.0, 1.0], cv_folds=3, ranker_rounds=40)


@pytest.mark.parametrize("method", ["twoside", "ranker"])
@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_learned_baselines_read_no_test_information(small, knowledge, method):
    """Scrambling the test labels, or dropping every test row and asking for the test pairs
    alone, leaves every prediction unchanged; scrambling training labels does change them."""
    test = small[small["split"] == "test"]
    a, info = run_baseline(small, method, SMALL, knowledge=knowledge, progress=False)
    b, _ = run_baseline(_scramble_test_labels(small), method, SMALL, knowledge=knowledge, progress=False)
    pd.testing.assert_frame_equal(a, b)
    c, _ = run_baseline(small[small["split"] == "train"], method, SMALL, knowledge=knowledge, progress=False, query=test[["cell_line", "pert", "gene"]])
    pd.testing.assert_frame_equal(a, c)
    d, _ = run_baseline(_scramble_test_labels(small, "train"), method, SMALL, knowledge=knowledge, progress=False)
    assert not np.allclose(a[["p_up", "p_down"]], d[["p_up", "p_down"]])  # the check can fail: training labels matter
    if method == "ranker":
        assert {"de", "dir"} <= info["hepg2"].keys() and len(info["hepg2"]["de"]["rounds"]) == SMALL.cv_folds
        shares = dict(info["hepg2"]["de"]["importance"])
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3) and {"kernel_de_0.05", "same_cytoband", "go_propagated_ic"} <= shares.keys()
        assert importance_table(info).startswith("hepg2 de (grouped-CV AUROC ")
    else:
        assert info["hepg2"]["lam_de"] in SMALL.twoside_lams and set(info["hepg2"]["cv_auroc_de"]) == {"0.05,0.0", "0.05,1.0", "0.2,0.0", "0.2,1.0"}


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_ranker_learner_is_chosen_on_training_folds_only(small, knowledge):
    """The learner comparison scores (and so the choice) are the same with the validation and test
    labels scrambled, and change with the training labels: only training rows are read. (The
    candidates besides the default: the ranker tests above cover it.)"""
    learners = ("lightgbm", "logistic")

    def scores(pairs):
        result = compare_learners(pairs, knowledge, SMALL, ["hepg2"], learners)
        return {n: {t: r[t] for t in ("de", "dir")} for n, r in result["per_cell_line"]["hepg2"].items()}, result

    pairs = carve_validation(small, 0.2)
    assert set(pairs["split"]) == {"train", "validation", "test"}
    a, result = scores(pairs)
    assert all(len(a[n][t]) == SMALL.cv_folds for n in learners for t in ("de", "dir"))
    for task in ("de", "dir"):
        assert result["chosen"][task] == max(learners, key=lambda n: np.mean(a[n][task]))
    assert scores(_scramble_test_labels(_scramble_test_labels(pairs), "validation"))[0] == a
    assert scores(_scramble_test_labels(pairs, "train"))[0] != a


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_learned_baselines_beat_the_kernel_on_a_small_pool(small, knowledge):
    scores = {}
    for method in ("kernel", "twoside", "ranker"):
        preds, _ = run_baseline(small, method, SMALL, knowledge=knowledge, progress=False)
        result = evaluate(check_predictions(preds), small, bootstrap=0)
        scores[method] = (result["auroc_de"], result["auroc_dir"])
    assert scores["twoside"][1] > scores["kernel"][1] and scores["ranker"][0] > scores["kernel"][0], scores


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_importance_needs_the_ranker():
    proc = run_cli("baseline", "--method", "kernel", "--importance")
    assert proc.returncode == 2 and "--importance needs --method ranker" in proc.stderr


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_learned_baselines_under_a_holdout_learn_from_the_other_lines(small, knowledge):
    jurkat = load_truth(DataConfig())
    jurkat = jurkat[(jurkat["cell_line"] == "jurkat") & jurkat["pert"].isin(small["pert"].unique()[:120])]
    pairs = apply_split(pd.concat([small, jurkat], ignore_index=True).assign(split=lambda f: f["split"].astype(small["split"].dtype)), "holdout:hepg2")
    for method in ("twoside", "ranker"):
        preds, info = run_baseline(pairs, method, SMALL, knowledge=knowledge, progress=False)
        assert info["hepg2"]["pool"] == "other cell lines" and info["hepg2"]["pool_rows"] == len(jurkat)
        assert len(check_predictions(preds)) == len(small)
