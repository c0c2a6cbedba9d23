import json

import numpy as np
import pandas as pd
import pytest

from synthpert.baselines import Neighbours, Pool, kernel_weights, run_baseline, to_predictions, top_k_weights
from synthpert.config import DataConfig, EvaluateConfig, KnowledgeConfig
from synthpert.data import Knowledge
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


def _scramble_test_labels(pairs: pd.DataFrame) -> pd.DataFrame:
    """The same pairs with the test rows' labels permuted among themselves (train rows untouched)."""
    out = pairs.copy()
    test = np.flatnonzero((out["split"] == "test").to_numpy())
    shuffled = np.random.default_rng(0).permutation(test)
    for column in ("de", "direction", "label"):
        values = out[column].to_numpy().copy()
        values[test] = values[shuffled]
        out[column] = pd.Series(values, index=out.index).astype(pairs[column].dtype)
    return out


def _frame(rows):
    frame = pd.DataFrame(rows, columns=["pert", "gene", "direction"]).assign(cell_line="k562", split="train")
    return frame.assign(de=(frame["direction"] != "none").astype(int))


def test_neighbour_means_on_a_hand_made_pool():
    pool = Pool.of(_frame([("A", "g1", "up"), ("B", "g1", "none"), ("C", "g1", "down"), ("A", "g2", "none"), ("C", "g2", "up"), ("C", "g2", "up")]))
    query = _frame([("Q", "g1", "none"), ("Q", "g2", "none"), ("Q", "g3", "none")])
    nb = Neighbours(pool, query)
    de, up = nb.means(np.array([[1.0, 2.0, 0.5]]))  # weights of A, B, C
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


@pytest.mark.parametrize("method", ["retrieval", "kernel"])
def test_no_test_label_is_read(truth, knowledge, method):
    """Scrambling the test rows' labels leaves every prediction unchanged (official split)."""
    cfg = EvaluateConfig(kernel_taus=[0.05, 0.1], cv_folds=3)
    a, _ = run_baseline(truth, method, cfg, ["hepg2"], knowledge, progress=False)
    b, _ = run_baseline(_scramble_test_labels(truth), method, cfg, ["hepg2"], knowledge, progress=False)
    pd.testing.assert_frame_equal(a, b)


def test_transfer_on_rpe1_holdout_beats_always_not_de_and_reads_no_test_label(holdout):
    preds, info = run_baseline(holdout, "transfer", EvaluateConfig(), progress=False)
    assert info == {"rpe1": {"pool_rows": int((holdout.cell_line != "rpe1").sum()), "pool": "other cell lines"}}
    result = evaluate(check_predictions(preds), holdout, bootstrap=0)
    assert result["n"] == (holdout.cell_line == "rpe1").sum()
    assert result["trivial_accuracy"] == pytest.approx(0.858, abs=0.005)
    assert 0.87 < result["accuracy"] < 0.91 and result["accuracy"] > result["trivial_accuracy"] + 0.02
    scrambled, _ = run_baseline(_scramble_test_labels(holdout), "transfer", EvaluateConfig(), progress=False)
    pd.testing.assert_frame_equal(preds, scrambled)


def test_cli_rejects_unknown_method_and_cell_line():
    proc = run_cli("baseline", "--method", "oracle")
    assert proc.returncode == 2 and "unknown baseline method 'oracle'" in proc.stderr
    proc = run_cli("baseline", "--cell-line", "hela")
    assert proc.returncode == 2 and "hela" in proc.stderr
