"""Evaluation: the official PerturbQA metrics (and SynthPert's) for predictions on test pairs.

Predictions are one row per (cell_line, pert, gene) with class probabilities `p_up, p_down,
p_none` and/or a hard `answer` (exactly one of the three labels, case and surrounding spaces
ignored; empty/null = the model gave no parseable answer — run `prompts.parse_answer` on raw
LLM text first). With probabilities only, the hard answer is their argmax (ties: not DE, then
up); with an answer only, the probabilities are one-hot (uniform for an unparseable answer). With
both, AUROCs use the probabilities and accuracy/F1 use the answer. Probabilities must be finite,
in [0, 1] and sum to 1 (within 1e-3).

Scores: DE = p_up + p_down; direction = p_up / (p_up + p_down), on DE-positive pairs only, or
`p_dir_up` where the predictions carry it (direction asked as its own two-choice question).
Official metric (PerturbQA): AUROC per read-out gene over the test pairs of a cell line (genes
whose test labels are all one class skipped), averaged over genes; "overall" averages over all
(cell line, gene) groups. SynthPert's metric, as its code computes it: one pooled AUROC from the
hard answers (DE: up/down = 1, not DE = 0; direction: up = 1, down = 0; anything else 0.5).

Accuracy, macro-F1 (over the three labels; a label absent from both truth and answers scores 0,
sklearn's zero_division=0) and the trivial always-"not DE" accuracy are on the same rows.

Coverage: only the test pairs that have a prediction are scored (LLM runs often score a seeded
subset); every metric, the trivial baseline included, is on those same rows, and `coverage`
says how many of the test pairs of the evaluated cell lines that is. `require_complete` turns
missing pairs into an error. A prediction for a pair that is not a test pair is always an error.

Like with like: models whose calls failed on different pairs are compared on the pairs every one
of them answered (`like_with_like`; the pipeline does this for every table it makes), with each
model's answered / asked and error counts beside its scores; a model under evaluate.min_coverage
is scored on its answers among those pairs, shown, and not ranked, so it does not shrink the
others' set.

Confidence intervals: bootstrap over perturbations (a (cell line, perturbation) is the unit,
resampled within its cell line), seeded; percentile intervals re-centred on the point estimate
(see `bootstrap_ci` for why), with the shift reported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score
from tqdm.auto import tqdm

from synthpert.artifacts import write_manifest
from synthpert.config import CELL_LINES, LABELS, DataConfig, EvaluateConfig
from synthpert.data import apply_split, load_pairs
from synthpert.errors import SynthPertError

KEYS = ("cell_line", "pert", "gene")
PROBS = ("p_up", "p_down", "p_none")
UNPARSEABLE = "unparseable"
PRED_LABELS = (*LABELS, UNPARSEABLE)
CI_METRICS = ("auroc_de", "auroc_dir", "accuracy", "macro_f1", "trivial_accuracy")
_SHOW = 5  # offending rows named in an error message
_FLOAT_SLACK = 1e-9  # 1 - 0.81 - 0.19 < 0 in floating point: tolerated, then clipped
_CHUNK = 25  # bootstrap replicates computed at once (memory: _CHUNK x rows floats)


def _examples(frame: pd.DataFrame, mask, columns=KEYS) -> str:
    rows = frame.loc[np.asarray(mask), list(columns)].head(_SHOW)
    shown = "; ".join(f"row {i}: " + ", ".join(f"{c}={r[c]!r}" for c in columns) for i, r in rows.iterrows())
    return f"{int(np.sum(mask))} row(s), e.g. {shown}"


def read_predictions(path: str | Path) -> pd.DataFrame:
    """A predictions file (.csv, .csv.gz or .parquet), checked by `check_predictions`."""
    path = Path(path)
    if not path.is_file():
        raise SynthPertError(f"predictions file not found: {path}")
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif path.name.endswith((".csv", ".csv.gz")):
            frame = pd.read_csv(path, dtype={"cell_line": str, "pert": str, "gene": str, "answer": str}, keep_default_na=False, na_values=[""])
        else:
            raise SynthPertError(f"predictions file {path} must be .csv, .csv.gz or .parquet")
    except (ValueError, OSError) as exc:
        raise SynthPertError(f"cannot read predictions file {path}: {exc}") from exc
    return check_predictions(frame, source=str(path))


def write_predictions(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write predictions as .parquet or .csv (by suffix), the formats `read_predictions` takes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif path.name.endswith((".csv", ".csv.gz")):
        frame.to_csv(path, index=False)
    else:
        raise SynthPertError(f"predictions output {path} must end in .parquet, .csv or .csv.gz")
    return path


def check_predictions(frame: pd.DataFrame, source: str = "predictions") -> pd.DataFrame:
    """Validated predictions: keys, finite probabilities in [0, 1] summing to 1, exact labels.
    Rows whose LLM call failed (`llm_error`) are left out: coverage, and evaluate.require_complete,
    count them as missing.

    Returns KEYS + PROBS + `answer` (a label or UNPARSEABLE) + `has_probs`, one row per pair, and
    `p_dir_up` when given (in [0, 1] or empty).
    """
    missing = [c for c in KEYS if c not in frame.columns]
    if missing:
        raise SynthPertError(f"{source}: missing column(s) {missing}; it has {list(frame.columns)}")
    if "llm_error" in frame.columns:  # a failed call (synthpert.predict) is a missing pair, not a prediction
        frame = frame[frame["llm_error"].isna()]
    given = [c for c in PROBS if c in frame.columns]
    if given and len(given) < len(PROBS):
        raise SynthPertError(f"{source}: give all of {list(PROBS)} or none; it has only {given}")
    if not given and "answer" not in frame.columns:
        raise SynthPertError(f"{source}: needs probability columns {list(PROBS)} and/or an 'answer' column")
    out = pd.DataFrame({c: frame[c].astype("string") for c in KEYS}).reset_index(drop=True)
    out["cell_line"] = out["cell_line"].str.strip().str.lower()
    null_key = out.isna().any(axis=1).to_numpy()
    if null_key.any():
        raise SynthPertError(f"{source}: empty cell_line/pert/gene in {_examples(out, null_key)}")
    dup = out.duplicated(list(KEYS), keep=False).to_numpy()
    if dup.any():
        raise SynthPertError(f"{source}: duplicate predictions for the same pair: {_examples(out, dup)}")
    if given:
        probs = frame[list(PROBS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(probs).all(axis=1) | (probs < -_FLOAT_SLACK).any(axis=1) | (probs > 1 + _FLOAT_SLACK).any(axis=1)
        if bad.any():
            shown = out.assign(**{c: frame[c].to_numpy() for c in PROBS})
            raise SynthPertError(f"{source}: probabilities must be finite numbers in [0, 1]: {_examples(shown, bad, (*KEYS, *PROBS))}")
        off = np.abs(probs.sum(axis=1) - 1) > 1e-3
        if off.any():
            shown = out.assign(**{c: probs[:, i] for i, c in enumerate(PROBS)})
            raise SynthPertError(f"{source}: p_up + p_down + p_none must be 1 (within 1e-3): {_examples(shown, off, (*KEYS, *PROBS))}")
        out[list(PROBS)] = np.clip(probs, 0, 1)
    if "answer" in frame.columns:
        answer = frame["answer"].astype("string").str.strip().str.lower().reset_index(drop=True)
        answer = answer.mask(answer == "", pd.NA)
        unknown = (answer.notna() & ~answer.isin(LABELS)).fillna(False).to_numpy()
        if unknown.any():
            raise SynthPertError(f"{source}: answer must be one of {list(LABELS)} or empty: {_examples(out.assign(answer=answer), unknown, (*KEYS, 'answer'))}")
        out["answer"] = answer.fillna(UNPARSEABLE).astype(str)
    else:
        preference = [2, 0, 1]  # argmax ties go to "not DE", then up: a 50/50 vote is not a call
        out["answer"] = np.asarray(LABELS)[preference][np.argmax(out[list(PROBS)].to_numpy()[:, preference], axis=1)]
    if not given:
        onehot = (out["answer"].to_numpy()[:, None] == np.asarray(LABELS)[None, :]).astype(float)
        onehot[out["answer"].to_numpy() == UNPARSEABLE] = 1 / 3
        out[list(PROBS)] = onehot
    out["has_probs"] = bool(given)
    if "p_dir_up" in frame.columns:
        p_dir = pd.to_numeric(frame["p_dir_up"], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isnan(p_dir) & ((p_dir < -_FLOAT_SLACK) | (p_dir > 1 + _FLOAT_SLACK))
        if bad.any():
            raise SynthPertError(f"{source}: p_dir_up must be in [0, 1] or empty: {_examples(out.assign(p_dir_up=p_dir), bad, (*KEYS, 'p_dir_up'))}")
        out["p_dir_up"] = np.clip(p_dir, 0, 1)
    return out


def pair_index(frame: pd.DataFrame) -> pd.Index:
    """One string key per (cell_line, pert, gene): a hash join ~10x faster than a 3-column merge."""
    parts = [frame[c].astype(str).to_numpy(dtype=object) for c in KEYS]
    return pd.Index(parts[0] + "\t" + parts[1] + "\t" + parts[2])


def answer_counts(frame: pd.DataFrame) -> dict[str, Any]:
    """How much of what it was asked (its rows) a model answered: `errors` are failed calls (the
    pair has no prediction), `direction_errors` failed separate direction questions (the row stands,
    scored with its derived direction); `coverage` = answered / asked."""
    errors = int(frame["llm_error"].notna().sum()) if "llm_error" in frame.columns else 0
    direction = int(frame["direction_error"].notna().sum()) if "direction_error" in frame.columns else 0
    asked = len(frame)
    return {"asked": asked, "answered": asked - errors, "errors": errors, "direction_errors": direction,
            "coverage": round((asked - errors) / asked, 6) if asked else 0.0}


def like_with_like(frames: dict[str, pd.DataFrame], asked: pd.Index, min_coverage: float) -> tuple[dict[str, pd.DataFrame], set[str], int]:
    """Every model's checked predictions on the same pairs: the `asked` pairs (pair_index) that every
    model answering at least `min_coverage` of its rows (the ranked ones) answered. A model under it
    keeps its answers among those pairs, unranked, so one failing model cannot silently shrink (or,
    failing on DE pairs alone, bias) the set the others are scored on.

    Returns the predictions by model, the ranked models and how many asked pairs are left out."""
    checked = {name: check_predictions(frame, name) for name, frame in frames.items()}
    ranked = {name for name, frame in frames.items() if answer_counts(frame)["answered"] >= min_coverage * len(frame)}
    common = asked
    for name in ranked:
        common = common[common.isin(pair_index(checked[name]))]
    if common.empty:
        raise SynthPertError(f"no pair of the {len(asked)} asked was answered by every model at evaluate.min_coverage={min_coverage} "
                             f"or above ({sorted(ranked)}): nothing to compare them on")
    scored = {name: frame[pair_index(frame).isin(common)].reset_index(drop=True) for name, frame in checked.items()}
    return scored, ranked, len(asked) - len(common)


def align(predictions: pd.DataFrame, truth: pd.DataFrame, require_complete: bool = False) -> tuple[pd.DataFrame, dict]:
    """Join checked predictions to the test pairs of `truth` (a pairs table with a split).

    Returns the scored rows (truth columns + predictions, in prediction order) and coverage per
    cell line, for the cell lines that have predictions. Predictions that match no test pair are
    an error.
    """
    test = truth[truth["split"] == "test"]
    wanted = pair_index(predictions)
    at = pair_index(test).get_indexer(wanted)
    unmatched = at < 0
    if unmatched.any():
        train = truth[truth["split"] == "train"]
        in_train = int((pair_index(train).get_indexer(wanted[unmatched]) >= 0).sum())
        hint = f" ({in_train} of them are training pairs)" if in_train else ""
        raise SynthPertError(f"predictions for pairs that are not test pairs of split {truth.attrs.get('split', 'perturbqa')!r}{hint}: {_examples(predictions, unmatched)}")
    scored = test.iloc[at].reset_index(drop=True)
    for column in predictions.columns.difference(list(KEYS)):
        scored[column] = predictions[column].to_numpy()
    coverage = {}
    for cell in [c for c in CELL_LINES if (predictions["cell_line"] == c).any()]:
        n_test, n_scored = int((test["cell_line"] == cell).sum()), int((predictions["cell_line"] == cell).sum())
        coverage[cell] = {"test_pairs": n_test, "scored_pairs": n_scored, "coverage": round(n_scored / n_test, 6)}
    missing = {c: v["test_pairs"] - v["scored_pairs"] for c, v in coverage.items() if v["scored_pairs"] < v["test_pairs"]}
    if missing and require_complete:
        raise SynthPertError(f"predictions miss test pairs (evaluate.require_complete is set): {missing}")
    return scored, coverage


def _prefix_sums(x: np.ndarray) -> np.ndarray:
    """Cumulative sums along axis 0 with a leading zero row: sum(x[a:b]) = c[b] - c[a]."""
    return np.concatenate([np.zeros((1, *x.shape[1:])), np.cumsum(x, axis=0)])


def _segment_sums(prefix: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sums of the contiguous segments beginning at `starts` (np.add.reduceat, ~10x faster in 2-D)."""
    return prefix[np.r_[starts[1:], len(prefix) - 1]] - prefix[starts]


def grouped_auroc(group: np.ndarray, y: np.ndarray, score: np.ndarray, n_groups: int, weights: np.ndarray | None = None) -> np.ndarray:
    """AUROC of `score` for binary `y` within each group, for many weight vectors at once.

    The Mann-Whitney form (ties count one half): exactly sklearn's roc_auc_score per group (the
    tests check this), without its ~1 ms per-call overhead x 20k genes. `weights` (n, B) are row
    multiplicities, one column per bootstrap replicate; None = one column of ones. Returns
    (n_groups, B), NaN where a group has no positive or no negative.
    """
    n_weights = 1 if weights is None else np.shape(weights)[1]
    if len(group) == 0:
        return np.full((n_groups, n_weights), np.nan)
    order = np.lexsort((score, group))
    g, s, pos = group[order], score[order], y[order].astype(float)[:, None]
    w = np.ones((len(g), 1)) if weights is None else np.asarray(weights, dtype=float)[order]
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_block = new_group | np.r_[True, s[1:] != s[:-1]]  # a block = tied scores within a group
    block_start, group_start = np.flatnonzero(new_block), np.flatnonzero(new_group)
    pos_w = w * pos
    cum_w, cum_pos = _prefix_sums(w), _prefix_sums(pos_w)
    below = cum_w[block_start] - cum_w[group_start][np.cumsum(new_group)[block_start] - 1]  # weight ranked below, in group
    tied = _segment_sums(cum_w, block_start)
    block_rank_sum_pos = _segment_sums(cum_pos, block_start) * (below + (tied + 1) / 2)
    rank_sum_pos = _segment_sums(_prefix_sums(block_rank_sum_pos), np.flatnonzero(new_group[block_start]))
    n_pos, n_all = _segment_sums(cum_pos, group_start), _segment_sums(cum_w, group_start)
    n_neg = n_all - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.where((n_pos > 0) & (n_neg > 0), (rank_sum_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg), np.nan)
    out = np.full((n_groups, n_weights), np.nan)
    out[g[group_start]] = auc
    return out


def mean_auroc_per_gene(gene: np.ndarray, y: np.ndarray, score: np.ndarray) -> float:
    """The official metric on one cell line's rows: per-gene AUROC averaged over genes."""
    codes, uniques = pd.factorize(np.asarray(gene))
    per_gene = grouped_auroc(codes, np.asarray(y).astype(int), np.asarray(score, dtype=float), len(uniques))
    return float(np.nanmean(per_gene)) if np.isfinite(per_gene).any() else float("nan")


class _Rows:
    """The scored rows as integer codes, shared by the point estimates and the bootstrap."""

    def __init__(self, scored: pd.DataFrame):
        self.cells = [c for c in CELL_LINES if (scored["cell_line"] == c).any()]
        self.cell = pd.Categorical(scored["cell_line"], categories=self.cells).codes
        self.true = pd.Categorical(scored["label"], categories=LABELS).codes
        self.pred = pd.Categorical(scored["answer"], categories=PRED_LABELS).codes
        probs = scored[list(PROBS)].to_numpy(dtype=float)
        self.de_score = probs[:, 0] + probs[:, 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            self.dir_score = np.where(self.de_score > 0, probs[:, 0] / self.de_score, 0.5)
        if "p_dir_up" in scored.columns:  # the separate direction question, where it was asked
            separate = scored["p_dir_up"].to_numpy(dtype=float)
            self.dir_score = np.where(np.isnan(separate), self.dir_score, separate)
        self.gene_group, self.gene_cell = self._within_cell(scored["gene"])
        self.unit, self.unit_cell = self._within_cell(scored["pert"])
        self.de = (self.true != 2).astype(int)
        self.up = (self.true == 0).astype(int)

    def _within_cell(self, names: pd.Series) -> tuple[np.ndarray, np.ndarray]:
        """Codes of (cell line, name) and the cell line of each code."""
        codes, uniques = pd.factorize(names)
        keys, inverse = np.unique(self.cell.astype(np.int64) * len(uniques) + codes, return_inverse=True)
        return inverse, keys // len(uniques)

    def scope(self, cell: int | None) -> np.ndarray:
        return np.ones(len(self.cell), bool) if cell is None else self.cell == cell

    def auroc(self, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-gene AUROC for DE (all rows) and direction (DE-positive rows): (n_gene_groups, B) each."""
        n = len(self.gene_cell)
        de = grouped_auroc(self.gene_group, self.de, self.de_score, n, weights)
        m = self.de == 1
        dw = None if weights is None else weights[m]
        direction = grouped_auroc(self.gene_group[m], self.up[m], self.dir_score[m], n, dw)
        return de, direction


def _mean_over_genes(per_gene: np.ndarray, gene_cell: np.ndarray, cell: int | None) -> np.ndarray:
    rows = per_gene if cell is None else per_gene[gene_cell == cell]
    valid = ~np.isnan(rows)
    with np.errstate(invalid="ignore"):
        return np.where(valid.any(axis=0), np.nansum(rows, axis=0) / valid.sum(axis=0), np.nan)


def _number(x: float) -> float | None:
    """A float for JSON; None where the metric is undefined (e.g. no gene has both classes)."""
    return float(x) if np.isfinite(x) else None


def _interval(replicates: np.ndarray, point: float) -> dict:
    """{ci: 2.5/97.5 % percentiles shifted by (point - replicate mean), shift}; None where undefined.
    The shifted ends are clipped to [0, 1], the range of every metric here (few genes: big shifts)."""
    finite = replicates[np.isfinite(replicates)]
    if not len(finite) or not np.isfinite(point):
        return {"ci": None, "shift": None}
    shift = float(finite.mean() - point)
    return {"ci": [float(np.clip(v - shift, 0.0, 1.0)) for v in np.percentile(finite, [2.5, 97.5])], "shift": shift}


def _pooled_auroc(y: np.ndarray, score: np.ndarray) -> float | None:
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else None


def _point_metrics(rows: _Rows, cell: int | None, per_gene: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Every metric for one scope (a cell line, or None = overall), with sklearn where it is one call."""
    m = rows.scope(cell)
    true, pred = rows.true[m], rows.pred[m]  # integer codes: sklearn is ~10x slower on strings
    classes = list(range(len(LABELS)))
    precision, recall, f1, support = precision_recall_fscore_support(true, pred, labels=classes, zero_division=0)
    de_auc, dir_auc = per_gene
    hard_de = np.where(pred == 3, 0.5, (pred < 2).astype(float))
    d = m & (rows.de == 1)
    hard_dir = np.select([rows.pred[d] == 0, rows.pred[d] == 1], [1.0, 0.0], 0.5)
    gene_cols = slice(None) if cell is None else rows.gene_cell == cell
    shown = list(range(len(PRED_LABELS) if (pred == 3).any() else len(LABELS)))
    return {
        "n": int(m.sum()),
        "n_perturbations": int(len(np.unique(rows.unit[m]))),
        "auroc_de": _number(_mean_over_genes(de_auc, rows.gene_cell, cell)[0]),
        "auroc_dir": _number(_mean_over_genes(dir_auc, rows.gene_cell, cell)[0]),
        "n_genes_de": int((~np.isnan(de_auc[gene_cols, 0])).sum()),
        "n_genes_dir": int((~np.isnan(dir_auc[gene_cols, 0])).sum()),
        "accuracy": float(accuracy_score(true, pred)),
        "trivial_accuracy": float(np.mean(true == 2)),
        "macro_f1": float(f1_score(true, pred, labels=classes, average="macro", zero_division=0)),
        "synthpert_auroc_de": _pooled_auroc(rows.de[m], hard_de),
        "synthpert_auroc_dir": _pooled_auroc(rows.up[d], hard_dir),
        "n_unparseable": int((pred == 3).sum()),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(LABELS, precision, recall, f1, support)
        },
        "confusion": {"labels": [PRED_LABELS[i] for i in shown], "matrix": confusion_matrix(true, pred, labels=shown).tolist()},
    }


def bootstrap_weights(rows: _Rows, n: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, n) multiplicities: each cell line's perturbations resampled with replacement."""
    unit_w = np.zeros((len(rows.unit_cell), n))
    for cell in range(len(rows.cells)):
        idx = np.flatnonzero(rows.unit_cell == cell)
        unit_w[idx] = rng.multinomial(len(idx), np.full(len(idx), 1 / len(idx)), size=n).T
    return unit_w[rows.unit]


def weighted_metrics(rows: _Rows, weights: np.ndarray) -> dict[int | None, dict[str, np.ndarray]]:
    """CI_METRICS for each scope (cell code, None = overall) under each weight column: (B,) arrays.

    Accuracy and macro-F1 come from weighted confusion counts (one sparse product for all scopes;
    F1_c = 2 TP / (predicted_c + true_c), 0 when both are 0, i.e. sklearn's zero_division=0).
    """
    de_auc, dir_auc = rows.auroc(weights)
    scopes = [None, *range(len(rows.cells))]
    k = len(LABELS) * len(PRED_LABELS)
    cell_col = np.stack([np.zeros(len(rows.cell), int), rows.cell + 1])  # overall, then the row's cell line
    cols = (cell_col * k + rows.true * len(PRED_LABELS) + rows.pred).ravel()
    onehot = sp.csr_matrix((np.ones(cols.size), (np.tile(np.arange(len(rows.cell)), 2), cols)), shape=(len(rows.cell), len(scopes) * k))
    counts = (onehot.T @ weights).reshape(len(scopes), len(LABELS), len(PRED_LABELS), -1)
    out = {}
    for i, cell in enumerate(scopes):
        conf = counts[i]  # true x pred x B
        total = conf.sum(axis=(0, 1))
        tp = np.stack([conf[c, c] for c in range(len(LABELS))])
        with np.errstate(invalid="ignore", divide="ignore"):
            denominator = conf[:, : len(LABELS)].sum(axis=0) + conf.sum(axis=1)[: len(LABELS)]
            f1 = np.where(denominator > 0, 2 * tp / denominator, 0.0)
        out[cell] = {
            "auroc_de": _mean_over_genes(de_auc, rows.gene_cell, cell),
            "auroc_dir": _mean_over_genes(dir_auc, rows.gene_cell, cell),
            "accuracy": tp.sum(axis=0) / total,
            "macro_f1": f1.mean(axis=0),
            "trivial_accuracy": conf[2].sum(axis=0) / total,
        }
    return out


def bootstrap_ci(rows: _Rows, n: int, seed: int, progress: bool = True) -> dict[int | None, dict[str, dict]]:
    """95 % intervals of CI_METRICS per scope from `n` perturbation-bootstrap replicates.

    Per metric: `ci`, the percentile interval re-centred on the point estimate, and `shift`, how
    far the replicates' mean sat from it. A resample holds ~63 % distinct perturbations, so genes
    with a single DE-positive test pair drop out of the per-gene mean more often than the rest;
    their AUROC is lower, so raw replicates sit ~0.01 high and a raw percentile interval can miss
    the point estimate. Accuracy-type metrics have no such shift (`shift` ~ 0).
    """
    rng = np.random.default_rng(seed)
    point = weighted_metrics(rows, np.ones((len(rows.cell), 1)))
    parts: dict = {}
    with tqdm(total=n, desc="bootstrap", unit="rep", disable=not progress, leave=False) as bar:
        for start in range(0, n, _CHUNK):
            b = min(_CHUNK, n - start)
            for scope, metrics in weighted_metrics(rows, bootstrap_weights(rows, b, rng)).items():
                for name, values in metrics.items():
                    parts.setdefault(scope, {}).setdefault(name, []).append(values)
            bar.update(b)
    return {
        scope: {name: _interval(np.concatenate(chunks), point[scope][name][0]) for name, chunks in metrics.items()}
        for scope, metrics in parts.items()
    }


def evaluate(predictions: pd.DataFrame, truth: pd.DataFrame, bootstrap: int = 1000, seed: int = 0, require_complete: bool = False, progress: bool = True) -> dict:
    """All metrics for checked predictions against the test pairs of `truth`, per cell line and overall.

    The result is JSON-ready; `_per_gene` (popped by `write_report`) keeps the per-gene AUROCs
    for the histogram.
    """
    scored, coverage = align(predictions, truth, require_complete)
    if scored.empty:
        raise SynthPertError("no predictions to evaluate")
    rows = _Rows(scored)
    per_gene = rows.auroc()
    result = _point_metrics(rows, None, per_gene)
    test_pairs = sum(v["test_pairs"] for v in coverage.values())
    result.update(split=truth.attrs.get("split", "perturbqa"), test_pairs=test_pairs, coverage=round(len(scored) / test_pairs, 6), bootstrap=bootstrap, seed=seed)
    result["per_cell_line"] = {cell: {**_point_metrics(rows, i, per_gene), **coverage[cell]} for i, cell in enumerate(rows.cells)}
    if bootstrap > 0:
        intervals = bootstrap_ci(rows, bootstrap, seed, progress)
        for scope, target in [(None, result), *((i, result["per_cell_line"][cell]) for i, cell in enumerate(rows.cells))]:
            target["ci"] = {name: v["ci"] for name, v in intervals[scope].items()}
            target["bootstrap_shift"] = {name: v["shift"] for name, v in intervals[scope].items()}
    result["_per_gene"] = {
        "auroc_de": per_gene[0][:, 0],
        "auroc_dir": per_gene[1][:, 0],
        "cell_line": np.asarray(rows.cells)[rows.gene_cell],
    }
    return result


def summary_table(result: dict) -> str:
    """A plain-text table of the headline numbers (what the CLI prints above the JSON line)."""

    def ci(metrics, name):
        lo_hi = metrics.get("ci", {}).get(name)
        return f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else ""  # None: undefined in every replicate

    def fmt(x):
        return "   -  " if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"

    head = f"{'cell line':<10} {'pairs':>7} {'cover':>6}  {'AUROC DE':<24} {'AUROC dir':<24} {'accuracy':<24} {'trivial':<24} {'macro-F1':<24}"
    lines = [head, "-" * len(head)]
    scopes = [*result["per_cell_line"].items(), ("overall", result)]
    for name, m in scopes:
        cells = [f"{fmt(m[k])}{ci(m, k)}" for k in ("auroc_de", "auroc_dir", "accuracy", "trivial_accuracy", "macro_f1")]
        lines.append(f"{name:<10} {m['n']:>7} {m['coverage']:>6.1%}  " + " ".join(f"{c:<24}" for c in cells))
    if result["n"] < result["test_pairs"]:
        lines.append(f"note: {result['test_pairs'] - result['n']} test pairs of these cell lines have no prediction; every number above "
                     "(the trivial baseline too) is on the scored pairs only (evaluate.require_complete=true makes this an error)")
    return "\n".join(lines)


def write_report(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """metrics.json plus confusion-matrix and per-gene-AUROC-histogram PNGs in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_gene = result.pop("_per_gene", None)
    paths = {"metrics": out_dir / "metrics.json", "confusion": out_dir / "confusion.png", "auroc_hist": out_dir / "auroc_per_gene.png"}
    paths["metrics"].write_text(json.dumps(result, indent=2, sort_keys=True))

    conf = result["confusion"]
    matrix = np.asarray(conf["matrix"])[: len(LABELS)]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.imshow(matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, f"{v}", ha="center", va="center", fontsize=9)
    short = {"upregulated": "up", "downregulated": "down", LABELS[2]: "not DE", UNPARSEABLE: "unparseable"}
    ax.set_xticks(range(len(conf["labels"])), [short[x] for x in conf["labels"]])
    ax.set_yticks(range(len(LABELS)), [short[x] for x in LABELS])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion (all scored pairs, n={result['n']}; colour = row share)")
    fig.tight_layout()
    fig.savefig(paths["confusion"], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    if per_gene is not None:
        for ax, name in zip(axes, ("auroc_de", "auroc_dir")):
            values = per_gene[name]
            for cell in dict.fromkeys(per_gene["cell_line"]):
                v = values[(per_gene["cell_line"] == cell) & ~np.isnan(values)]
                ax.hist(v, bins=np.linspace(0, 1, 21), histtype="step", label=f"{cell} (mean {v.mean():.3f}, {len(v)} genes)" if len(v) else cell)
            ax.set_xlabel("AUROC per read-out gene")
            ax.set_title({"auroc_de": "DE", "auroc_dir": "direction"}[name])
            ax.legend(fontsize=8)
    axes[0].set_ylabel("genes")
    fig.tight_layout()
    fig.savefig(paths["auroc_hist"], dpi=100)
    plt.close(fig)
    return paths


def load_truth(data_cfg: DataConfig) -> pd.DataFrame:
    """All four cell lines under the configured split (a holdout trains on the other lines)."""
    return apply_split(load_pairs(data_dir=data_cfg.data_dir), data_cfg.split)


def run_evaluation(predictions: pd.DataFrame, truth: pd.DataFrame, cfg: EvaluateConfig, out_dir: str | Path, progress: bool = True, **fields: Any) -> dict:
    """`evaluate` checked predictions, add `fields` (provenance), write the report and a manifest."""
    result = evaluate(predictions, truth, cfg.bootstrap, cfg.seed, cfg.require_complete, progress)
    result.update(fields)
    paths = write_report(result, out_dir)
    result["outputs"] = {name: str(path) for name, path in paths.items()}
    write_manifest(out_dir, "evaluate", {name: {"file": path.name} for name, path in paths.items()}, split=result["split"], coverage=result["coverage"], config=cfg.model_dump(mode="json"))
    return result
