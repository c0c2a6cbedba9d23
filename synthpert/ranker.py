"""The `ranker` baseline: gradient boosting over features of (P, G), one model for DE and one for direction.

Features (all vectorised; `pool_features`, `pair_features`):
- pool features, from labelled training rows: the kernel's DE score and up share at every
  `evaluate.kernel_taus`, the same smoothed on the read-out side too (`twoside`, lam 1), the
  share of P's similarity mass on perturbations that measured G and that found G DE, P's best
  GO similarity to the pool, G's DE rate, up share and row count;
- pair features, from annotations only: GO Jaccard (all terms and per aspect), the
  information-content-weighted Jaccard of the GO sets propagated up the hierarchy (simGIC),
  shared specific cellular-component terms (complexes), the most specific shared term, annotation
  counts, P = G, and genomic proximity (same chromosome / arm / band / cytoband, band distance).

Training (no test row is read): the pool's perturbations are dealt into `evaluate.cv_folds`
groups; each training row's pool features come from the other groups only (as a test pair's
come from the whole pool, P never among them). One model per held-out group, early-stopped on
that group's rows and cut back to its best round (perturbation-grouped, so the stopping point
reflects unseen perturbations); a query's score is the mean of their raw scores. Single-threaded
and deterministic under `evaluate.seed`.

Learner (`LEARNER`): LightGBM (learning rate 0.05, `PARAMS`), chosen among `LEARNERS` by
perturbation-grouped CV inside the training rows, validation and test labels
unread (`compare_learners`; `bench/ranker_learners.py`, docs/benchmarks.md): the training
perturbations of each of the four lines dealt into 3 groups, each scored by the whole ranker
fitted on the other two; mean per-gene AUROC over the 12 (line, group) scores, the best mean
per task wins, a tie within fold noise to the cheaper. DE: HistGradientBoosting .6547, LightGBM .6546 (paired difference +.0001, s.e.
.0014, higher in 8 of 12 groups), logistic regression .6524; direction: .7566, .7529 (+.0037,
s.e. .0030, 7 of 12), .736. HistGradientBoosting's margins over LightGBM are within fold noise
(0.1 and 1.2 standard errors) at ~1.6x LightGBM's CPU time, so the tie goes to LightGBM, which also
reports gain importance (`--importance`); the linear model trails on direction in 11 of 12 groups.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable, NamedTuple

import lightgbm as lgb
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from synthpert.baselines import Profiles, Queries, gene_neighbours, kernel_weights, perturbation_folds, ratios, side_scores
from synthpert.config import EvaluateConfig
from synthpert.data import Knowledge
from synthpert.data.knowledge import ONTOLOGIES
from synthpert.evaluate import mean_auroc_per_gene

COMPLEX_MAX_GENES = 30  # a cellular-component term annotated to at most this many genes: a complex, not a compartment
TWOSIDE_LAM = 1.0  # read-out smoothing of the twoside features (the boosted trees weigh them against the one-sided ones)
EARLY_STOP = 50  # rounds without improvement on the held-out group
# DE: ~130k rows, default-sized trees. Direction: ~15k DE-positive rows, so smaller trees with
# more rows per leaf, 70 % of features per tree (per split in HistGradientBoosting), and monotone in the up-share features (a pair
# whose similar perturbations push G up more cannot be less likely up): best grouped CV.
PARAMS = {
    "de": {"num_leaves": 31, "min_data_in_leaf": 20},
    "dir": {"num_leaves": 15, "min_data_in_leaf": 100, "feature_fraction": 0.7},
}


def pool_features(profiles: Profiles, query: pd.DataFrame, knowledge: Knowledge, cfg: EvaluateConfig) -> dict[str, np.ndarray]:
    """Features of the query pairs that read labels: all from `profiles` (the pool), none from a query row."""
    q = Queries(profiles, query)
    sim = knowledge.similarity_matrix(list(q.perts), list(profiles.perts))
    neighbours = tuple(gene_neighbours(profiles, cfg.twoside_neighbours, signed) for signed in (False, True))
    out = {}
    for tau in cfg.kernel_taus:
        weights = kernel_weights(sim, tau)
        sums = profiles.smoothed(weights)
        total = weights.sum(axis=1)[q.row]
        out[f"kernel_de_{tau}"], out[f"kernel_up_{tau}"] = ratios(sums, q)
        out[f"twoside_de_{tau}"], out[f"twoside_up_{tau}"] = side_scores(sums, neighbours, TWOSIDE_LAM, q)
        out[f"measured_share_{tau}"], out[f"de_share_{tau}"] = q.at(sums[0]) / total, q.at(sums[1]) / total
    out["p_best_similarity"] = sim.max(axis=1)[q.row] if sim.size else np.zeros(len(query))
    out["g_de_rate"], out["g_up_share"] = profiles.gene_rates(q.genes)
    out["g_rows"] = np.where(q.col >= 0, np.asarray(profiles.counts[0].sum(axis=0)).ravel()[q.col.clip(0)], 0)
    return out


def _pairwise(a: sp.csr_matrix, b: sp.csr_matrix, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row-by-row (weighted) intersection and union sizes of two aligned binary matrices."""
    w = sp.diags(np.ones(a.shape[1]) if weights is None else weights)
    inter = np.asarray((a.multiply(b) @ w).sum(axis=1)).ravel()
    return inter, np.asarray((a @ w).sum(axis=1)).ravel() + np.asarray((b @ w).sum(axis=1)).ravel() - inter


def _jaccard(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def pair_features(query: pd.DataFrame, knowledge: Knowledge) -> dict[str, np.ndarray]:
    """Features of (P, G) from the annotations alone (no label): GO relations and genomic proximity."""
    perts, p_at = np.unique(query["pert"].to_numpy().astype(str), return_inverse=True)
    genes, g_at = np.unique(query["gene"].to_numpy().astype(str), return_inverse=True)
    a, b = knowledge.go_matrix(perts)[p_at], knowledge.go_matrix(genes)[g_at]
    terms = knowledge.column_terms
    out = {"go_jaccard": _jaccard(*_pairwise(a, b)), "go_shared": _pairwise(a, b)[0]}
    for aspect in ONTOLOGIES:
        out[f"go_jaccard_{aspect}"] = _jaccard(*_pairwise(a, b, (terms["ontology"] == aspect).to_numpy(float)))
    complexes = ((terms["ontology"] == "CC") & (terms["genes"] <= COMPLEX_MAX_GENES)).to_numpy(float)
    out["shared_complexes"] = _pairwise(a, b, complexes)[0]
    shared_sizes = a.multiply(b) @ sp.diags(1.0 / terms["genes"].to_numpy(float))  # 1 / genes of each shared term
    out["most_specific_shared"] = np.asarray(shared_sizes.max(axis=1).todense()).ravel()
    out["go_propagated_ic"] = _jaccard(*_pairwise(knowledge.propagated_matrix(perts)[p_at], knowledge.propagated_matrix(genes)[g_at],
                                                  knowledge.information_content))
    out["p_go_terms"], out["g_go_terms"] = np.asarray(a.sum(axis=1)).ravel(), np.asarray(b.sum(axis=1)).ravel()
    out["same_gene"] = (perts[p_at] == genes[g_at]).astype(float)
    p_loc, g_loc = knowledge.locations(perts).iloc[p_at].reset_index(drop=True), knowledge.locations(genes).iloc[g_at].reset_index(drop=True)
    for level in ("chromosome", "arm", "band", "cytoband"):
        out[f"same_{level}"] = (p_loc[level].notna() & (p_loc[level] == g_loc[level])).to_numpy(float)
    out["band_distance"] = np.where(out["same_chromosome"] > 0, (p_loc["position"] - g_loc["position"]).abs(), np.nan)
    return out


def features(profiles: Profiles, query: pd.DataFrame, knowledge: Knowledge, cfg: EvaluateConfig) -> pd.DataFrame:
    return pd.DataFrame(pool_features(profiles, query, knowledge, cfg) | pair_features(query, knowledge))


def out_of_fold_features(train: pd.DataFrame, knowledge: Knowledge, cfg: EvaluateConfig) -> tuple[pd.DataFrame, np.ndarray]:
    """Every training row's features with its own perturbation's group left out of the pool, and the groups."""
    fold = perturbation_folds(train, cfg.cv_folds, cfg.seed)
    frames = [features(Profiles.of(train[fold != f]), train[fold == f], knowledge, cfg).set_index(np.flatnonzero(fold == f))
              for f in range(cfg.cv_folds)]
    return pd.concat(frames).sort_index(), fold


class Fitted(NamedTuple):
    """One fitted model: its raw (log-odds) scorer, rounds used and gain shares (None: no gain to share)."""

    score: Callable[[pd.DataFrame], np.ndarray]
    rounds: int
    gain: np.ndarray | None


def _monotone(task: str, columns) -> list[int] | None:
    """Direction models rise with the up-share features (`PARAMS`); DE models are unconstrained."""
    return [int("_up_" in c) for c in columns] if task == "dir" else None


def fit_lightgbm(task: str, x: pd.DataFrame, y: np.ndarray, x_stop: pd.DataFrame, y_stop: np.ndarray, cfg: EvaluateConfig) -> Fitted:
    """LightGBM (learning rate 0.05, `PARAMS`), early-stopped on the stopping rows' log loss."""
    params = {"objective": "binary", "learning_rate": 0.05, "num_threads": 1, "deterministic": True, "force_row_wise": True,
              "seed": cfg.seed, "verbose": -1, **PARAMS[task]}
    if task == "dir":
        params["monotone_constraints"] = _monotone(task, x.columns)
    train_set = lgb.Dataset(x, y)
    booster = lgb.train(params, train_set, cfg.ranker_rounds, valid_sets=[lgb.Dataset(x_stop, y_stop, reference=train_set)],
                        callbacks=[lgb.early_stopping(EARLY_STOP, verbose=False)])
    gain = booster.feature_importance("gain", iteration=booster.best_iteration)
    return Fitted(lambda q: booster.predict(q, num_iteration=booster.best_iteration, raw_score=True), booster.best_iteration,
                  gain / max(gain.sum(), 1e-12))


def fit_hist_gradient_boosting(task: str, x: pd.DataFrame, y: np.ndarray, x_stop: pd.DataFrame, y_stop: np.ndarray, cfg: EvaluateConfig) -> Fitted:
    """scikit-learn's histogram boosting with LightGBM's settings (its `max_features` samples per split,
    not per tree), stopped on the stopping rows' log loss and cut back to their best round as LightGBM is."""
    p = PARAMS[task]
    model = HistGradientBoostingClassifier(
        learning_rate=0.05, max_iter=cfg.ranker_rounds, max_leaf_nodes=p["num_leaves"], min_samples_leaf=p["min_data_in_leaf"],
        max_features=p.get("feature_fraction", 1.0), monotonic_cst=_monotone(task, x.columns), early_stopping=True,
        n_iter_no_change=EARLY_STOP, random_state=cfg.seed).fit(x, y, X_val=x_stop, y_val=y_stop)
    best = max(int(np.argmax(model.validation_score_)), 1)  # validation_score_[i]: after i rounds
    return Fitted(lambda q: next(itertools.islice(model.staged_decision_function(q), best - 1, None)), best, None)


def fit_logistic(task: str, x: pd.DataFrame, y: np.ndarray, x_stop: pd.DataFrame, y_stop: np.ndarray, cfg: EvaluateConfig) -> Fitted:
    """L2-regularised (C = 1) logistic regression on the standardised features, a gap filled with the
    feature's median plus a missing flag; nothing to stop, so the stopping rows go unused."""
    model = make_pipeline(SimpleImputer(strategy="median", add_indicator=True), StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)
    return Fitted(model.decision_function, int(model[-1].n_iter_[0]), None)


LEARNERS = {"lightgbm": fit_lightgbm, "hist_gradient_boosting": fit_hist_gradient_boosting, "logistic": fit_logistic}
LEARNER = "lightgbm"  # tied on grouped CV over training rows with the best mean, at 0.6x its CPU time (module docstring)


def fit_predict(task: str, x: pd.DataFrame, y: np.ndarray, fold: np.ndarray, gene: np.ndarray, query: pd.DataFrame,
                cfg: EvaluateConfig, learner: str = LEARNER) -> tuple[np.ndarray, dict]:
    """One model per held-out group, early-stopped on it; the query's mean raw score, and the
    grouped-CV AUROC (per gene within each group, whose pool all its rows share), rounds and, for
    the boosted learners, gain importance ([feature, share of the total gain averaged over the models], largest first)."""
    scores, rounds, cv, gain = [], [], [], []
    for f in np.unique(fold):
        held = fold == f
        model = LEARNERS[learner](task, x[~held], y[~held], x[held], y[held], cfg)
        rounds.append(model.rounds)
        cv.append(mean_auroc_per_gene(gene[held], y[held], model.score(x[held])))
        scores.append(model.score(query))
        gain.append(model.gain)
    used = {"cv_auroc": round(float(np.mean(cv)), 4), "rounds": rounds}
    if gain[0] is not None:
        importance = pd.Series(np.mean(gain, axis=0), index=x.columns).sort_values(ascending=False)
        used["importance"] = [[k, round(float(v), 4)] for k, v in importance.items()]
    return 1 / (1 + np.exp(-np.mean(scores, axis=0))), used


def learned_scores(train: pd.DataFrame, x: pd.DataFrame, fold: np.ndarray, x_query: pd.DataFrame, cfg: EvaluateConfig,
                   learner: str = LEARNER) -> tuple[np.ndarray, np.ndarray, dict]:
    """(DE score, direction score, what was used) of `learner` fitted on `train`'s out-of-fold features, on one thread."""
    gene = train["gene"].to_numpy()
    is_de, is_up = train["de"].to_numpy() == 1, (train["direction"] == "up").to_numpy()
    with threadpool_limits(1):
        de, used_de = fit_predict("de", x, is_de, fold, gene, x_query, cfg, learner)
        up, used_dir = fit_predict("dir", x[is_de].reset_index(drop=True), is_up[is_de], fold[is_de], gene[is_de], x_query, cfg, learner)
    return de, up, {"de": used_de, "dir": used_dir}


def ranker_scores(train: pd.DataFrame, query: pd.DataFrame, knowledge: Knowledge, cfg: EvaluateConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """(DE score, direction score, what was used) for `query` from a pool of labelled `train` rows."""
    x, fold = out_of_fold_features(train, knowledge, cfg)
    return learned_scores(train, x, fold, features(Profiles.of(train), query, knowledge, cfg), cfg)


def compare_learners(pairs: pd.DataFrame, knowledge: Knowledge, cfg: EvaluateConfig, cell_lines, learners=tuple(LEARNERS)) -> dict:
    """Each learner's official metric by perturbation-grouped CV inside the training rows of `pairs`
    (validation and test rows are never read): the `cv_folds` groups of a line's training
    perturbations are scored in turn by the whole ranker (pool, features, inner folds, early
    stopping) fitted on the other groups, every learner on the same features. Per line and
    learner: per-gene AUROC per group for DE and direction, and CPU seconds; `chosen`: per task,
    the learner with the best mean over all (line, group) scores."""
    train = pairs[pairs["split"] == "train"]
    per_cell = {}
    for cell in cell_lines:
        rows = train[train["cell_line"] == cell].reset_index(drop=True)
        outer = perturbation_folds(rows, cfg.cv_folds, cfg.seed)
        got = {name: {"de": [], "dir": [], "cpu_s": 0.0} for name in learners}
        for f in range(cfg.cv_folds):
            fit_rows, held = rows[outer != f].reset_index(drop=True), rows[outer == f]
            x, fold = out_of_fold_features(fit_rows, knowledge, cfg)
            x_held = features(Profiles.of(fit_rows), held, knowledge, cfg)
            gene, is_de, is_up = held["gene"].to_numpy(), held["de"].to_numpy() == 1, (held["direction"] == "up").to_numpy()
            for name in learners:
                start = time.process_time()
                de, up, _ = learned_scores(fit_rows, x, fold, x_held, cfg, name)
                got[name]["cpu_s"] += time.process_time() - start
                got[name]["de"].append(mean_auroc_per_gene(gene, is_de, de))
                got[name]["dir"].append(mean_auroc_per_gene(gene[is_de], is_up[is_de], up[is_de]))
        per_cell[cell] = got
    mean = {name: {task: float(np.mean([per_cell[c][name][task] for c in per_cell])) for task in ("de", "dir")} for name in learners}
    return {"per_cell_line": per_cell, "mean": mean, "chosen": {task: max(learners, key=lambda n: mean[n][task]) for task in ("de", "dir")}}


def importance_table(info: dict, top: int = 10) -> str:
    """The `top` features by gain share per cell line and task, from `run_baseline`'s info."""
    lines = []
    for cell, used in info.items():
        for task in ("de", "dir"):
            shares = ", ".join(f"{name} {share:.1%}" for name, share in used[task]["importance"][:top])
            lines.append(f"{cell} {task} (grouped-CV AUROC {used[task]['cv_auroc']:.3f}): {shares}")
    return "\n".join(lines)
