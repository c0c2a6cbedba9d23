"""Non-LLM baselines: what GO similarity and label lookup alone achieve, to print beside any LLM.

retrieval  PerturbQA's "Retrieval (No LLM)" in spirit: (P, G) is scored by the mean label of
           (P', G) over the k training perturbations P' most GO-similar to P (Jaccard), where
           measured; none measured -> not DE, direction 0.5.
kernel     ours: every training perturbation P' measured on G votes with weight
           exp((sim(P, P') - max sim(P, .)) / tau); tau is chosen per cell line and task by
           perturbation-grouped K-fold CV inside the training rows (no test label is read).
twoside    the kernel smoothed on the read-out side too: G's votes are pooled with those of the
           genes that respond to the same training perturbations (its `twoside_neighbours` most
           similar by their sets of DE perturbations; for direction by their signed responses),
           weighted lam x similarity; tau and lam chosen by the same grouped CV.
ranker     gradient boosting over features of (P, G) (synthpert.ranker): kernel and two-sided
           scores at several bandwidths, GO and genomic relations of P and G, G's training rates.
transfer   for held-out cell lines: the same pair's labels in the other lines (their mean, so
           a hard answer is the majority vote), else the same perturbation's DE rate / up share
           there, else the gene's.

Pools: retrieval, kernel, twoside and ranker use the cell line's own training rows, or, for a line
with none (`holdout:<line>`), every training row of the other lines; transfer always uses the
other lines' training rows. A prediction depends on the pool and its own (cell line, P, G) only,
never on other query rows. Output rows `cell_line, pert, gene, p_up, p_down, p_none` with
p_up + p_down = the DE score and p_up / (p_up + p_down) = the direction score, as
`synthpert.evaluate` reads them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from synthpert.config import CELL_LINES, Config, EvaluateConfig, KnowledgeConfig
from synthpert.data import Knowledge
from synthpert.errors import SynthPertError
from synthpert.evaluate import KEYS, check_predictions, load_truth, mean_auroc_per_gene, run_evaluation, write_predictions

METHODS = ("retrieval", "kernel", "twoside", "ranker", "transfer")


@dataclass(frozen=True)
class Profiles:
    """Training rows as sparse (perturbation x read-out gene) matrices of row counts, DE-positive
    counts and upregulated counts (repeated pairs add up). A perturbation is measured on ~100 of
    ~5-7k genes: sparse products smooth the pool over all perturbations at once."""

    perts: pd.Index
    genes: pd.Index
    counts: tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix]  # rows, DE-positive rows, upregulated rows

    @classmethod
    def of(cls, rows: pd.DataFrame) -> Profiles:
        p, perts = pd.factorize(rows["pert"].to_numpy(), sort=True)
        g, genes = pd.factorize(rows["gene"].to_numpy(), sort=True)
        labels = [np.ones(len(rows)), rows["de"].to_numpy(), (rows["direction"] == "up").to_numpy()]
        shape = (len(perts), len(genes))
        return cls(pd.Index(perts), pd.Index(genes), tuple(sp.csr_matrix((v.astype(float), (p, g)), shape=shape) for v in labels))

    def gene_rates(self, genes) -> tuple[np.ndarray, np.ndarray]:
        """Each gene's DE rate and up share among its DE rows (the pool's overall rates for genes it never measured)."""
        per_gene = np.stack([np.asarray(c.sum(axis=0)).ravel() for c in self.counts])
        overall = per_gene.sum(axis=1)
        col = self.genes.get_indexer(genes)
        with np.errstate(invalid="ignore", divide="ignore"):
            de = np.where(col >= 0, per_gene[1, col] / per_gene[0, col], overall[1] / overall[0])
            up = np.where(col >= 0, per_gene[2, col] / per_gene[1, col], overall[2] / overall[1])
        return de, np.nan_to_num(up, nan=overall[2] / max(overall[1], 1))

    def smoothed(self, weights: np.ndarray) -> np.ndarray:
        """(3, query perturbations, genes): the counts summed over pool perturbations with `weights` (query x pool)."""
        return np.stack([(c.T @ weights.T).T for c in self.counts])


class Queries:
    """Query pairs located in a pool: their perturbation's row in a (query perturbations x genes)
    matrix and their gene's column (-1: a gene the pool never measured)."""

    def __init__(self, profiles: Profiles, query: pd.DataFrame):
        self.row, self.perts = pd.factorize(query["pert"].to_numpy(), sort=True)
        self.genes = query["gene"].to_numpy()
        self.col = profiles.genes.get_indexer(self.genes)

    def at(self, matrix: np.ndarray) -> np.ndarray:
        """matrix[pair's perturbation, pair's gene] per pair; NaN for unmeasured genes."""
        return np.where(self.col >= 0, matrix[self.row, self.col.clip(0)], np.nan)


def ratios(sums: np.ndarray, q: Queries) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean DE label and up share per pair from `smoothed` sums; NaN where no weight fell
    on a measured (DE-positive) entry."""
    rows, de, up = (q.at(s) for s in sums)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, de / rows, np.nan), np.where(de > 0, up / de, np.nan)


def top_k_weights(sim: np.ndarray, k: int) -> np.ndarray:
    """1 for each row's k most similar pool perturbations (ties: the first in pool order), else 0."""
    weights = np.zeros_like(sim, dtype=float)
    np.put_along_axis(weights, np.argsort(-sim, axis=1, kind="stable")[:, :k], 1.0, axis=1)
    return weights


def kernel_weights(sim: np.ndarray, tau: float) -> np.ndarray:
    """exp((sim - row max) / tau): the most similar pool perturbation weighs 1, others decay with tau."""
    return np.exp((sim - sim.max(axis=1, keepdims=True)) / tau)


def gene_neighbours(profiles: Profiles, k: int, signed: bool) -> sp.csr_matrix:
    """(genes x genes) similarity of read-out genes by their training responses, each row keeping
    its k most similar other genes (ties: the first in gene order): Jaccard of their sets of DE
    perturbations, or (`signed`, for direction) cosine of their responses (+1 up, -1 down, 0 not
    DE), negatives dropped."""
    _, de, up = profiles.counts
    responses = ((2 * up - de).sign() if signed else (de > 0).astype(float)).T.tocsr()
    inter = (responses @ responses.T).tocoo()
    size = np.asarray(abs(responses).sum(axis=1)).ravel()
    i, j = inter.row, inter.col
    sim = inter.data / (np.sqrt(size[i] * size[j]) if signed else size[i] + size[j] - inter.data)
    keep = (i != j) & (sim > 0)
    i, j, sim = i[keep], j[keep], sim[keep]
    order = np.lexsort((j, -sim, i))
    i, j, sim = i[order], j[order], sim[order]
    rank = np.arange(len(i)) - np.searchsorted(i, i)
    top = rank < k
    return sp.csr_matrix((sim[top], (i[top], j[top])), shape=(len(size),) * 2)


def two_sided(sums: np.ndarray, neighbours: tuple[sp.csr_matrix, sp.csr_matrix], lam: float) -> tuple[np.ndarray, np.ndarray]:
    """`smoothed` sums pooled over read-out neighbours: G's own sums plus lam x similarity x each
    neighbour's, with the DE neighbours for the row and DE counts, the signed ones for DE and up."""
    if lam == 0:
        return sums, sums
    de_side, dir_side = ((sp.identity(n.shape[0], format="csr") + lam * n) for n in neighbours)
    pool = lambda a, s: (a @ s.T).T  # noqa: E731  s[q, g] -> sum_g' a[g, g'] s[q, g']
    return np.stack([pool(de_side, sums[0]), pool(de_side, sums[1]), sums[2]]), np.stack([sums[0], pool(dir_side, sums[1]), pool(dir_side, sums[2])])


def side_scores(sums: np.ndarray, neighbours, lam: float, q: Queries) -> tuple[np.ndarray, np.ndarray]:
    """(DE, direction) ratios per pair after `two_sided` smoothing (NaN where nothing was measured)."""
    for_de, for_dir = two_sided(sums, neighbours, lam)
    return ratios(for_de, q)[0], ratios(for_dir, q)[1]


def filled(de: np.ndarray, up: np.ndarray, profiles: Profiles, q: Queries) -> tuple[np.ndarray, np.ndarray]:
    """Scores with gaps filled: the gene's pool DE rate (the pool's for unseen genes), direction 0.5."""
    return np.where(np.isnan(de), profiles.gene_rates(q.genes)[0], de), np.nan_to_num(up, nan=0.5)


def perturbation_folds(rows: pd.DataFrame, folds: int, seed: int) -> np.ndarray:
    """Each row's fold: perturbations dealt into `folds` seeded groups (all rows of P in one fold)."""
    codes, perts = pd.factorize(rows["pert"].to_numpy(), sort=True)
    if folds < 2 or len(perts) < folds:
        raise SynthPertError(f"evaluate.cv_folds={folds} needs 2 <= folds <= {len(perts)} training perturbations")
    return (np.random.default_rng(seed).permutation(len(perts)) % folds)[codes]


def fold_pools(train: pd.DataFrame, knowledge: Knowledge, folds: int, seed: int):
    """(held-out mask, pool profiles, held-out queries, GO similarity held-out x pool) per fold."""
    fold = perturbation_folds(train, folds, seed)
    for f in range(folds):
        held = fold == f
        profiles = Profiles.of(train[~held])
        q = Queries(profiles, train[held])
        yield held, profiles, q, knowledge.similarity_matrix(list(q.perts), list(profiles.perts))


def choose_bandwidths(train: pd.DataFrame, knowledge: Knowledge, cfg: EvaluateConfig, lams=(0.0,)) -> dict:
    """Kernel tau (and read-out smoothing lam) for DE and for direction by perturbation-grouped
    K-fold CV inside `train`: each fold's perturbations are scored from the other folds only (gene
    neighbours too), with the official metric (mean per-gene AUROC); the best mean wins, per task."""
    if not cfg.kernel_taus:
        raise SynthPertError("evaluate.kernel_taus is empty: give at least one bandwidth")
    grid = list(itertools.product(cfg.kernel_taus, lams))
    gene = pd.factorize(train["gene"].to_numpy())[0]
    is_de, is_up = train["de"].to_numpy() == 1, (train["direction"] == "up").to_numpy()
    scores = np.zeros((2, len(grid), cfg.cv_folds))
    for f, (held, profiles, q, sim) in enumerate(fold_pools(train, knowledge, cfg.cv_folds, cfg.seed)):
        neighbours = tuple(gene_neighbours(profiles, cfg.twoside_neighbours, signed) for signed in (False, True)) if any(lams) else None
        d = is_de[held]
        for tau in cfg.kernel_taus:
            sums = profiles.smoothed(kernel_weights(sim, tau))
            for lam in lams:
                de, up = filled(*side_scores(sums, neighbours, lam, q), profiles, q)
                t = grid.index((tau, lam))
                scores[0, t, f] = mean_auroc_per_gene(gene[held], is_de[held], de)
                scores[1, t, f] = mean_auroc_per_gene(gene[held][d], is_up[held][d], up[d])
    mean = scores.mean(axis=2)
    names = [str(tau) if len(lams) == 1 else f"{tau},{lam}" for tau, lam in grid]
    (tau_de, lam_de), (tau_dir, lam_dir) = grid[int(np.argmax(mean[0]))], grid[int(np.argmax(mean[1]))]
    chosen = {"tau_de": tau_de, "tau_dir": tau_dir, "cv_auroc_de": dict(zip(names, np.round(mean[0], 4).tolist())),
              "cv_auroc_dir": dict(zip(names, np.round(mean[1], 4).tolist()))}
    return chosen | ({"lam_de": lam_de, "lam_dir": lam_dir} if len(lams) > 1 else {})


def kernel_scores(profiles: Profiles, q: Queries, sim: np.ndarray, chosen: dict, neighbours=None) -> tuple[np.ndarray, np.ndarray]:
    """(DE, direction) per pair at the chosen bandwidths (and read-out smoothing, for twoside)."""
    de = side_scores(profiles.smoothed(kernel_weights(sim, chosen["tau_de"])), neighbours, chosen.get("lam_de", 0), q)[0]
    up = side_scores(profiles.smoothed(kernel_weights(sim, chosen["tau_dir"])), neighbours, chosen.get("lam_dir", 0), q)[1]
    return filled(de, up, profiles, q)


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


def _scores(method: str, pool_rows: pd.DataFrame, query: pd.DataFrame, cfg: EvaluateConfig, knowledge: Knowledge) -> tuple[np.ndarray, np.ndarray, dict]:
    """(DE score, direction score, what was used) of `method` for the `query` pairs of one cell line."""
    if method == "transfer":
        return *transfer_scores(query, pool_rows), {}
    if method == "ranker":
        from synthpert.ranker import ranker_scores  # its learners (scikit-learn, LightGBM) load for the ranker only

        return ranker_scores(pool_rows, query, knowledge, cfg)
    profiles = Profiles.of(pool_rows)
    q = Queries(profiles, query)
    sim = knowledge.similarity_matrix(list(q.perts), list(profiles.perts))
    if method == "retrieval":
        de, up = ratios(profiles.smoothed(top_k_weights(sim, cfg.retrieval_k)), q)
        return np.nan_to_num(de, nan=0.0), np.nan_to_num(up, nan=0.5), {"k": cfg.retrieval_k}
    twoside = method == "twoside"
    chosen = choose_bandwidths(pool_rows, knowledge, cfg, cfg.twoside_lams if twoside else (0.0,))
    neighbours = tuple(gene_neighbours(profiles, cfg.twoside_neighbours, signed) for signed in (False, True)) if twoside else None
    return *kernel_scores(profiles, q, sim, chosen, neighbours), chosen


def go_knowledge(cfg: EvaluateConfig, data_dir: str | Path | None = None) -> Knowledge:
    """The GO annotations the baselines read: terms up to `cfg.go_max_genes` genes (None: all)."""
    return Knowledge.load(data_dir, KnowledgeConfig(max_go_gene_count=cfg.go_max_genes or 10**9))


def run_baseline(
    pairs: pd.DataFrame, method: str, cfg: EvaluateConfig, cell_lines=None, knowledge: Knowledge | None = None, progress: bool = True,
    data_dir: str | Path | None = None, query: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Predictions of `method` for the `query` pairs (cell_line, pert, gene; None: the test rows of
    `pairs`) of `cell_lines` (None: every line with query pairs).

    `pairs` carries its split (`apply_split`); only its train rows are read. GO annotations:
    `knowledge`, else `go_knowledge` from `data_dir`. Returns
    the predictions and, per cell line, what was used (pool size, k or the CV-chosen bandwidths
    with their CV scores, the ranker's rounds and feature importance).
    """
    _check_method(method)
    train = pairs[pairs["split"] == "train"]
    query = pairs[pairs["split"] == "test"] if query is None else query
    cells = [c for c in CELL_LINES if (query["cell_line"] == c).any() and (cell_lines is None or c in cell_lines)]
    if not cells:
        raise SynthPertError(f"no test pairs for cell line(s) {cell_lines} under split {pairs.attrs.get('split', 'perturbqa')!r}")
    load_go = method != "transfer" and knowledge is None
    frames, info = [], {}
    bar = tqdm(total=len(cells) + load_go, desc="GO annotations", unit="step", disable=not progress)
    if load_go:
        knowledge = go_knowledge(cfg, data_dir)
        bar.update()
    for cell in cells:
        bar.set_description(f"baseline {method} {cell}")
        asked = query[query["cell_line"] == cell]
        own = train[train["cell_line"] == cell]
        pool_rows = train[train["cell_line"] != cell] if method == "transfer" or own.empty else own
        if pool_rows.empty:
            raise SynthPertError(f"baseline {method}: no training rows to learn {cell} from")
        de, up, used = _scores(method, pool_rows, asked, cfg, knowledge)
        info[cell] = {"pool_rows": len(pool_rows), "pool": "other cell lines" if pool_rows is not own else "own training rows", **used}
        frames.append(to_predictions(asked, de, up))
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
