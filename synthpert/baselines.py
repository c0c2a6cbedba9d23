"""Non-LLM baselines: what GO similarity and label lookup alone achieve, to print beside any LLM.

retrieval  PerturbQA's "Retrieval (No LLM)" in spirit: (P, G) is scored by the mean label of
           (P', G) over the k training perturbations P' most GO-similar to P (Jaccard), where
           measured; none measured -> not DE, direction 0.5.
kernel     ours: every training perturbation P' measured on G votes with weight
           exp((sim(P, P') - max sim(P, .)) / tau); tau is chosen per cell line and task by
           perturbation-grouped K-fold CV inside the training rows (no test label is read).
transfer   for held-out cell lines: the same pair's labels in the other lines (their mean, so
           a hard answer is the majority vote), else the same perturbation's DE rate / up share
           there, else the gene's.

Pools: retrieval and kernel use the cell line's own training rows, or, for a line with none
(`holdout:<line>`), every training row of the other lines; transfer always uses the other lines'
training rows. Output rows `cell_line, pert, gene, p_up, p_down, p_none` with p_up + p_down = the
DE score and p_up / (p_up + p_down) = the direction score, as `synthpert.evaluate` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from synthpert.config import CELL_LINES, Config, EvaluateConfig, KnowledgeConfig
from synthpert.data import Knowledge
from synthpert.errors import SynthPertError
from synthpert.evaluate import KEYS, check_predictions, load_truth, mean_auroc_per_gene, run_evaluation, write_predictions

METHODS = ("retrieval", "kernel", "transfer")
_ENTRIES = 2_000_000  # (pair, neighbour) entries per chunk: bounds memory


@dataclass(frozen=True)
class Pool:
    """Labelled training rows counted per (G, P'), sorted by gene: row counts, DE-positive counts
    (also the "measured" count for direction) and upregulated counts. Repeated pairs add up."""

    perts: pd.Index
    genes: pd.Index
    start: np.ndarray  # entries of gene i: start[i]:start[i + 1]
    pert: np.ndarray  # pool perturbation of each entry
    counts: np.ndarray  # (3, entries): rows, DE-positive rows, upregulated rows

    @classmethod
    def of(cls, rows: pd.DataFrame) -> Pool:
        p, perts = pd.factorize(rows["pert"].to_numpy(), sort=True)
        g, genes = pd.factorize(rows["gene"].to_numpy(), sort=True)
        keys, entry = np.unique(g.astype(np.int64) * len(perts) + p, return_inverse=True)
        labels = [np.ones(len(rows)), rows["de"].to_numpy(), (rows["direction"] == "up").to_numpy()]
        counts = np.stack([np.bincount(entry, weights=v.astype(float), minlength=len(keys)) for v in labels])
        start = np.searchsorted(keys // len(perts), np.arange(len(genes) + 1))
        return cls(pd.Index(perts), pd.Index(genes), start, keys % len(perts), counts)

    def gene_de_rate(self, genes) -> np.ndarray:
        """Each gene's DE rate in the pool (the pool's overall rate for genes it never measured)."""
        per_gene = np.add.reduceat(self.counts[:2], self.start[:-1], axis=1)
        col = self.genes.get_indexer(genes)
        return np.where(col >= 0, per_gene[1, col] / per_gene[0, col], self.counts[1].sum() / self.counts[0].sum())


class Neighbours:
    """Each query pair's pool entries (the P' measured on its G), indexed once, re-weighted cheaply."""

    def __init__(self, pool: Pool, query: pd.DataFrame):
        self.pool = pool
        self.row, self.perts = pd.factorize(query["pert"].to_numpy(), sort=True)  # pair -> query perturbation
        self.genes = query["gene"].to_numpy()
        col = pool.genes.get_indexer(self.genes)
        self.known = np.flatnonzero(col >= 0)
        self.first = pool.start[col[self.known]]
        self.lengths = pool.start[col[self.known] + 1] - self.first

    def means(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weighted mean DE label and up share over each pair's entries; `weights` is
        (self.perts, pool.perts). NaN where no weight fell on a measured (DE-positive) entry.
        Works in chunks of `_ENTRIES` entries to bound memory."""
        sums = np.zeros((3, len(self.row)))
        ends = np.cumsum(self.lengths)
        bounds = np.searchsorted(ends, np.arange(_ENTRIES, ends[-1] + _ENTRIES, _ENTRIES) if len(ends) else [], side="right")
        for lo, hi in zip(np.r_[0, bounds[:-1]], bounds):
            n = self.lengths[lo:hi]
            owner = np.repeat(np.arange(hi - lo), n)
            entry = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + np.repeat(self.first[lo:hi], n)
            pairs = self.known[lo:hi]
            w = weights[self.row[pairs][owner], self.pool.pert[entry]]
            for i in range(3):
                sums[i, pairs] = np.bincount(owner, weights=w * self.pool.counts[i, entry], minlength=hi - lo)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(sums[0] > 0, sums[1] / sums[0], np.nan), np.where(sums[1] > 0, sums[2] / sums[1], np.nan)


def top_k_weights(sim: np.ndarray, k: int) -> np.ndarray:
    """1 for each row's k most similar pool perturbations (ties: the first in pool order), else 0."""
    weights = np.zeros_like(sim, dtype=float)
    np.put_along_axis(weights, np.argsort(-sim, axis=1, kind="stable")[:, :k], 1.0, axis=1)
    return weights


def kernel_weights(sim: np.ndarray, tau: float) -> np.ndarray:
    """exp((sim - row max) / tau): the most similar pool perturbation weighs 1, others decay with tau."""
    return np.exp((sim - sim.max(axis=1, keepdims=True)) / tau)


def retrieval_scores(nb: Neighbours, sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(DE score, direction score) per pair; `sim` is (nb.perts, pool.perts). Nothing found: not DE, 0.5."""
    de, up = nb.means(top_k_weights(sim, k))
    return np.nan_to_num(de, nan=0.0), np.nan_to_num(up, nan=0.5)


def kernel_scores(nb: Neighbours, sim: np.ndarray, tau_de: float, tau_dir: float) -> tuple[np.ndarray, np.ndarray]:
    """(DE score, direction score) per pair; genes the pool never measured get its DE rate."""
    de, up = nb.means(kernel_weights(sim, tau_de))
    if tau_dir != tau_de:
        _, up = nb.means(kernel_weights(sim, tau_dir))
    unseen = np.isnan(de)
    if unseen.any():
        de[unseen] = nb.pool.gene_de_rate(nb.genes[unseen])
    return de, np.nan_to_num(up, nan=0.5)


def choose_bandwidths(train: pd.DataFrame, knowledge: Knowledge, taus: list[float], folds: int, seed: int) -> dict:
    """Kernel tau for DE and for direction by perturbation-grouped K-fold CV inside `train`.

    Each fold's perturbations are scored from the other folds only, with the official metric
    (mean per-gene AUROC); the tau with the best mean over folds wins, per task.
    """
    if not taus:
        raise SynthPertError("evaluate.kernel_taus is empty: give at least one bandwidth")
    fold_codes, perts = pd.factorize(train["pert"].to_numpy(), sort=True)
    if folds < 2 or len(perts) < folds:
        raise SynthPertError(f"evaluate.cv_folds={folds} needs 2 <= folds <= {len(perts)} training perturbations")
    fold = (np.random.default_rng(seed).permutation(len(perts)) % folds)[fold_codes]
    perts = pd.Index(perts)
    sim = knowledge.similarity_matrix(list(perts), list(perts))
    gene = pd.factorize(train["gene"].to_numpy())[0]
    is_de, is_up = train["de"].to_numpy() == 1, (train["direction"] == "up").to_numpy()
    scores = np.zeros((2, len(taus), folds))
    for f in range(folds):
        held = fold == f
        nb = Neighbours(Pool.of(train[~held]), train[held])
        block = sim[np.ix_(perts.get_indexer(nb.perts), perts.get_indexer(nb.pool.perts))]
        d = is_de[held]
        for t, tau in enumerate(taus):
            de, up = kernel_scores(nb, block, tau, tau)
            scores[0, t, f] = mean_auroc_per_gene(gene[held], is_de[held], de)
            scores[1, t, f] = mean_auroc_per_gene(gene[held][d], is_up[held][d], up[d])
    mean = scores.mean(axis=2)
    return {
        "tau_de": taus[int(np.argmax(mean[0]))],
        "tau_dir": taus[int(np.argmax(mean[1]))],
        "cv_auroc_de": dict(zip(map(str, taus), np.round(mean[0], 4).tolist())),
        "cv_auroc_dir": dict(zip(map(str, taus), np.round(mean[1], 4).tolist())),
    }


def transfer_scores(query: pd.DataFrame, train: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Labels of the same pair in `train` (other cell lines), else of the same perturbation, else the gene."""
    de, up = np.full(len(query), np.nan), np.full(len(query), np.nan)
    positives = train[train["de"] == 1].assign(up=lambda f: (f["direction"] == "up").astype(float))
    for keys in (["pert", "gene"], ["pert"], ["gene"]):
        at = query[keys].astype(str)
        de_level = at.merge(train.groupby(keys, observed=True)["de"].mean().rename("v").reset_index().astype({k: str for k in keys}), on=keys, how="left")["v"]
        up_level = at.merge(positives.groupby(keys, observed=True)["up"].mean().rename("v").reset_index().astype({k: str for k in keys}), on=keys, how="left")["v"]
        de = np.where(np.isnan(de), de_level.to_numpy(dtype=float), de)
        up = np.where(np.isnan(up), up_level.to_numpy(dtype=float), up)
    return np.nan_to_num(de, nan=float(train["de"].mean())), np.nan_to_num(up, nan=0.5)


def to_predictions(query: pd.DataFrame, de: np.ndarray, up: np.ndarray) -> pd.DataFrame:
    """Class probabilities whose DE score is `de` and direction score is `up`."""
    de, up = np.clip(de, 0, 1), np.clip(up, 0, 1)
    out = query[list(KEYS)].astype(str).reset_index(drop=True)
    return out.assign(p_up=de * up, p_down=de * (1 - up), p_none=1 - de)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise SynthPertError(f"unknown baseline method {method!r}; choose one of {list(METHODS)}")


def run_baseline(
    pairs: pd.DataFrame, method: str, cfg: EvaluateConfig, cell_lines=None, knowledge: Knowledge | None = None, progress: bool = True, data_dir: str | Path | None = None
) -> tuple[pd.DataFrame, dict]:
    """Predictions of `method` for the test rows of `cell_lines` (None: every line with test rows).

    `pairs` carries its split (`apply_split`). GO annotations: `knowledge`, else loaded from
    `data_dir` keeping terms up to `cfg.go_max_genes` genes. Returns the predictions and, per cell
    line, what was used (pool size, k or the CV-chosen bandwidths with their CV scores).
    """
    _check_method(method)
    test, train = pairs[pairs["split"] == "test"], pairs[pairs["split"] == "train"]
    cells = [c for c in CELL_LINES if (test["cell_line"] == c).any() and (cell_lines is None or c in cell_lines)]
    if not cells:
        raise SynthPertError(f"no test pairs for cell line(s) {cell_lines} under split {pairs.attrs.get('split', 'perturbqa')!r}")
    load_go = method != "transfer" and knowledge is None
    frames, info = [], {}
    bar = tqdm(total=len(cells) + load_go, desc="GO annotations", unit="step", disable=not progress)
    if load_go:
        knowledge = Knowledge.load(data_dir, KnowledgeConfig(max_go_gene_count=cfg.go_max_genes or 10**9))
        bar.update()
    for cell in cells:
        bar.set_description(f"baseline {method} {cell}")
        query = test[test["cell_line"] == cell]
        own = train[train["cell_line"] == cell]
        pool_rows = train[train["cell_line"] != cell] if method == "transfer" or own.empty else own
        if pool_rows.empty:
            raise SynthPertError(f"baseline {method}: no training rows to learn {cell} from")
        info[cell] = {"pool_rows": len(pool_rows), "pool": "other cell lines" if pool_rows is not own else "own training rows"}
        if method == "transfer":
            de, up = transfer_scores(query, pool_rows)
        else:
            nb = Neighbours(Pool.of(pool_rows), query)
            sim = knowledge.similarity_matrix(list(nb.perts), list(nb.pool.perts))
            if method == "retrieval":
                de, up = retrieval_scores(nb, sim, cfg.retrieval_k)
                info[cell]["k"] = cfg.retrieval_k
            else:
                chosen = choose_bandwidths(pool_rows, knowledge, cfg.kernel_taus, cfg.cv_folds, cfg.seed)
                de, up = kernel_scores(nb, sim, chosen["tau_de"], chosen["tau_dir"])
                info[cell].update(chosen)
        frames.append(to_predictions(query, de, up))
        bar.update()
    bar.close()
    return pd.concat(frames, ignore_index=True), info


def baseline_report(cfg: Config, method: str, cell_lines=None, predictions_out: str | Path | None = None, progress: bool = True) -> dict:
    """Run a baseline on the configured split and evaluate it; the report (metrics.json, plots,
    predictions.parquet, manifest) goes to `<evaluate.output_dir>/baseline-<method>-<split>/`."""
    _check_method(method)  # before the data load
    truth = load_truth(cfg.data)
    predictions, info = run_baseline(truth, method, cfg.evaluate, cell_lines, progress=progress, data_dir=cfg.data.data_dir)
    out_dir = Path(cfg.evaluate.output_dir) / f"baseline-{method}-{cfg.data.split.replace(':', '-')}"
    written = [write_predictions(predictions, out_dir / "predictions.parquet")]
    if predictions_out is not None:
        written.append(write_predictions(predictions, predictions_out))
    return run_evaluation(check_predictions(predictions), truth, cfg.evaluate, out_dir, progress, method=method, baseline=info, predictions_files=[str(p) for p in written])
