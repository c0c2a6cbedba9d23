"""PerturbQA as one typed pairs table, the splits we evaluate on, subsampling and a leakage report.

Pairs table: one row per (cell_line, pert, gene) with `de` (0/1), `direction` (up/down/none),
`label` (the three-class SynthPert label) and `split` (train/test, and validation once carved out
of train by `load_split`). The DE and direction files
are joined exactly: every DE-positive pair must have one direction row and every direction row
must be a DE-positive pair with the same split, else the data is wrong and we say where.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from synthpert.config import CELL_LINES, LABELS, DataConfig
from synthpert.data.files import data_file, read_csv
from synthpert.errors import SynthPertError

DIRECTIONS = ("up", "down", "none")
SPLITS = ("train", "test", "validation")
COLUMNS = ("cell_line", "pert", "gene", "de", "direction", "label", "split")
LABEL_OF_DIRECTION = dict(zip(DIRECTIONS, LABELS))  # up -> upregulated, down -> ..., none -> not DE

_CELL = pd.CategoricalDtype(CELL_LINES)
_DIRECTION = pd.CategoricalDtype(DIRECTIONS)
_LABEL = pd.CategoricalDtype(LABELS)
_SPLIT = pd.CategoricalDtype(SPLITS)
_FILE_COLUMNS = {"pert": pa.string(), "gene": pa.string(), "label": pa.int8(), "split": pa.string()}


def check_cell_lines(cell_lines) -> list[str]:
    """Validated, de-duplicated cell lines in the given order (None: all four)."""
    if cell_lines is None:
        return list(CELL_LINES)
    if isinstance(cell_lines, str):
        cell_lines = [cell_lines]
    unknown = [c for c in cell_lines if c not in CELL_LINES]
    if unknown:
        raise SynthPertError(f"unknown cell line(s) {unknown}; known: {list(CELL_LINES)}")
    if not cell_lines:
        raise SynthPertError("no cell line selected")
    return list(dict.fromkeys(cell_lines))


def _first_bad(path: Path, table: pa.Table, bad: np.ndarray, what: str) -> SynthPertError:
    row = int(np.flatnonzero(bad)[0])
    pert, gene = table["pert"][row].as_py(), table["gene"][row].as_py()
    return SynthPertError(f"{path}: line {row + 2}: {what} ({pert}, {gene}) [{int(bad.sum())} such row(s)]")


def _read_pairs_file(path: Path) -> pa.Table:
    """One -de/-dir file as (pert, gene, label, split), with its values checked."""
    table = read_csv(path, _FILE_COLUMNS).select(list(_FILE_COLUMNS))
    for column, allowed in (("label", pa.array([0, 1], pa.int8())), ("split", pa.array(SPLITS))):
        bad = np.asarray(pc.invert(pc.is_in(table[column], value_set=allowed)))
        if bad.any():
            raise _first_bad(path, table, bad, f"{column} {table[column][int(np.flatnonzero(bad)[0])]} is not one of {allowed.to_pylist()} for")
    return table


def _pair_keys(table: pa.Table, perts: pa.Array, genes: pa.Array) -> np.ndarray:
    """Integer key per row from the positions of pert and gene in the DE file's vocabularies (-1: absent)."""
    p = pc.index_in(table["pert"], value_set=perts).fill_null(-1).to_numpy().astype("int64")
    g = pc.index_in(table["gene"], value_set=genes).fill_null(-1).to_numpy().astype("int64")
    return np.where((p < 0) | (g < 0), -1, p * len(genes) + g)


def _load_cell_line(cell_line: str, data_dir) -> pd.DataFrame:
    de_path = data_file("perturbqa", f"{cell_line}-de.csv.gz", data_dir)
    dir_path = data_file("perturbqa", f"{cell_line}-dir.csv.gz", data_dir)
    de, up = _read_pairs_file(de_path), _read_pairs_file(dir_path)
    perts, genes = pc.unique(de["pert"]), pc.unique(de["gene"])
    de_keys, up_keys = _pair_keys(de, perts, genes), _pair_keys(up, perts, genes)
    for path, table, keys in ((de_path, de, de_keys), (dir_path, up, up_keys)):
        order = np.argsort(keys, kind="stable")
        dup = np.zeros(len(keys), bool)
        dup[order[1:]] = (np.diff(keys[order]) == 0) & (keys[order[1:]] >= 0)
        if dup.any():
            raise _first_bad(path, table, dup, "duplicate pair")
    order = np.argsort(de_keys)
    pos = order[np.searchsorted(de_keys, up_keys, sorter=order).clip(0, len(de_keys) - 1)]
    de_flag = de["label"].to_numpy()
    orphan = (up_keys < 0) | (de_keys[pos] != up_keys) | (de_flag[pos] == 0)
    if orphan.any():
        raise _first_bad(dir_path, up, orphan, f"direction row for a pair that is not DE-positive in {de_path.name}:")
    is_test = np.asarray(pc.equal(de["split"], "test")).astype("int8")
    clash = np.asarray(pc.equal(up["split"], "test")) != is_test[pos].astype(bool)
    if clash.any():
        raise _first_bad(dir_path, up, clash, f"split differs from {de_path.name} for")
    direction = np.where(de_flag == 0, 2, -1).astype("int8")  # 0 up, 1 down, 2 none
    direction[pos] = np.where(up["label"].to_numpy() == 1, 0, 1)
    undirected = direction == -1
    if undirected.any():
        raise _first_bad(de_path, de, undirected, f"DE-positive pair without a direction row in {dir_path.name}:")
    return pd.DataFrame(
        {
            "cell_line": pd.Categorical.from_codes(np.full(len(de), CELL_LINES.index(cell_line), "int8"), dtype=_CELL),
            "pert": de["pert"].to_pandas(),
            "gene": de["gene"].to_pandas(),
            "de": de_flag,
            "direction": pd.Categorical.from_codes(direction, dtype=_DIRECTION),
            "label": pd.Categorical.from_codes(direction, dtype=_LABEL),
            "split": pd.Categorical.from_codes(is_test, dtype=_SPLIT),
        }
    )


def load_pairs(cell_lines=None, data_dir: str | Path | None = None) -> pd.DataFrame:
    """The pairs table for `cell_lines` (None: all four) with the official PerturbQA split."""
    frames = [_load_cell_line(cell, data_dir) for cell in check_cell_lines(cell_lines)]
    pairs = pd.concat(frames, ignore_index=True)
    pairs.attrs["split"] = "perturbqa"
    return pairs


def parse_split(split: str) -> str | None:
    """The held-out cell line of `holdout:<cell>`, None for `perturbqa`; anything else is an error."""
    if split == "perturbqa":
        return None
    kind, _, cell = split.partition(":")
    if kind != "holdout" or cell not in CELL_LINES:
        raise SynthPertError(f"unknown split {split!r}; use 'perturbqa' or 'holdout:<cell_line>' with one of {list(CELL_LINES)}")
    return cell


def apply_split(pairs: pd.DataFrame, split: str) -> pd.DataFrame:
    """`perturbqa`: the official per-line split; `holdout:<cell>`: test = all of <cell>, train = the rest."""
    held_out = parse_split(split)
    current = pairs.attrs.get("split", "perturbqa")
    if held_out is None:
        if current != "perturbqa":
            raise SynthPertError(f"pairs already re-split as {current!r}; reload them to get the official split")
        return pairs
    present = set(pairs["cell_line"].unique())
    if held_out not in present:
        raise SynthPertError(f"split {split!r}: cell line {held_out} is not among the loaded lines {sorted(present)}")
    if present == {held_out}:
        raise SynthPertError(f"split {split!r} needs at least one other cell line to train on; loaded only {held_out}")
    out = pairs.copy()
    out["split"] = pd.Categorical.from_codes((out["cell_line"] == held_out).to_numpy().astype("int8"), dtype=_SPLIT)
    out.attrs["split"] = split
    return out


def is_validation(cell_line: str, pert: str, fraction: float, seed: int = 0) -> bool:
    """Whether a training perturbation of a line is held out for validation: a seeded hash of
    (line, perturbation), so every stage (and a user's own traces) agrees without a shared table."""
    digest = hashlib.sha256(f"{seed}|{cell_line}|{pert}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def carve_validation(pairs: pd.DataFrame, fraction: float, seed: int = 0) -> pd.DataFrame:
    """Training rows of a seeded `fraction` of each line's training perturbations become
    `validation`: grouped by perturbation, like the test split, so validation asks about
    knock-downs the student never saw."""
    if not fraction:
        return pairs
    train = (pairs["split"] == "train").to_numpy()
    keys = pairs.loc[train, ["cell_line", "pert"]].astype(str).drop_duplicates()
    held = {(c, p) for c, p in zip(keys["cell_line"], keys["pert"]) if is_validation(c, p, fraction, seed)}
    mask = np.zeros(len(pairs), dtype=bool)
    mask[np.flatnonzero(train)] = [k in held for k in zip(pairs["cell_line"].astype(str)[train], pairs["pert"].astype(str)[train])]
    out = pairs.copy()
    out.loc[mask, "split"] = "validation"
    out.attrs.update(pairs.attrs)
    return out


def load_split(data_cfg: DataConfig) -> pd.DataFrame:
    """The configured lines and split, with validation carved out of train."""
    pairs = apply_split(load_pairs(data_cfg.cell_lines, data_cfg.data_dir), data_cfg.split)
    return carve_validation(pairs, data_cfg.validation_fraction, data_cfg.seed)


def evaluation_view(pairs: pd.DataFrame, part: str) -> pd.DataFrame:
    """The pairs as evaluation sees them when scoring `part` (validation or test): its rows are
    the "test" rows, train stays train, the other part is dropped (never seen at all)."""
    if part not in ("validation", "test"):
        raise SynthPertError(f"can evaluate on 'validation' or 'test', not {part!r}")
    kept = pairs[pairs["split"].isin(["train", part])].copy()
    kept["split"] = kept["split"].map({"train": "train", part: "test"}).astype(_SPLIT)
    kept.attrs.update(pairs.attrs)
    return kept


def _quotas(counts: np.ndarray, n: int) -> np.ndarray:
    """Split n over strata proportionally to `counts` (largest remainder, ties to the earlier stratum)."""
    exact = counts * (n / counts.sum())
    quota = np.floor(exact).astype(int)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: n - quota.sum()]] += 1
    return quota


def subsample(pairs: pd.DataFrame, fraction: float | None = None, limit: int | None = None, seed: int = 0, stratify: bool = True) -> pd.DataFrame:
    """A seeded sample of the rows: round(fraction * n) rows, at most `limit`, in original order
    (index kept).

    With `stratify` every (cell_line, split, label) stratum keeps its share (to within one row),
    so class balance and the train/test and cell-line mix are those of the input.
    """
    if fraction is None and limit is None:
        return pairs
    if fraction is not None and not 0 < fraction <= 1:
        raise SynthPertError(f"fraction must be in (0, 1], got {fraction}")
    if limit is not None and limit < 1:
        raise SynthPertError(f"limit must be >= 1, got {limit}")
    n = len(pairs) if fraction is None else round(fraction * len(pairs))
    n = min(n, limit) if limit is not None else n
    if n >= len(pairs):
        return pairs
    rng = np.random.default_rng(seed)
    if stratify:
        groups = list(pairs.groupby(["cell_line", "split", "label"], observed=True, sort=True).indices.values())
        quota = _quotas(np.array([len(g) for g in groups]), n)
        chosen = np.concatenate([rng.choice(g, size=q, replace=False) for g, q in zip(groups, quota)])
    else:
        chosen = rng.choice(len(pairs), size=n, replace=False)
    return pairs.iloc[np.sort(chosen)]


def gene_sample(pairs: pd.DataFrame, limit: int, seed: int = 0) -> pd.DataFrame:
    """At most `limit` rows drawn as whole read-out genes (index kept, original order).

    The official metric is an AUROC per read-out gene, undefined for a gene seen once or with one
    class. So genes come in seeded random order, those with more distinct labels first, and each
    gene's rows are taken round-robin over its labels: even a smoke-sized sample has genes on
    which both the DE and the direction AUROC exist. Class shares are then not the test set's.
    """
    if limit < 1:
        raise SynthPertError(f"limit must be >= 1, got {limit}")
    if limit >= len(pairs):
        return pairs
    rng = np.random.default_rng(seed)
    by_gene = pairs.groupby("gene", observed=True, sort=True)
    distinct = by_gene["label"].nunique()
    order = distinct.index[np.lexsort((rng.random(len(distinct)), -distinct.to_numpy()))]
    label = pairs["label"].astype(str).to_numpy()
    chosen: list[np.ndarray] = []
    left = limit
    for gene in order:
        positions = rng.permutation(by_gene.indices[gene])
        kinds = label[positions]
        turn = pd.Series(kinds).groupby(kinds).cumcount().to_numpy()  # the k-th row of its label
        chosen.append(positions[np.argsort(turn, kind="stable")[:left]])
        left -= len(chosen[-1])
        if not left:
            break
    return pairs.iloc[np.sort(np.concatenate(chosen))]


def build_split(data_cfg: DataConfig, pairs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Load and split as the DataConfig says (or take `pairs`, load_split's result); fraction/limit
    subsample the train and validation rows only.

    That sample is what the teacher sees (kept traces of validation perturbations give training
    its validation loss); the test rows stay whole (evaluation samples them itself, see
    evaluate.limit), so a smoke-sized run is still scored on the real test set.
    """
    pairs = load_split(data_cfg) if pairs is None else pairs
    is_train = pairs["split"].isin(["train", "validation"]).to_numpy()
    train = subsample(pairs[is_train], data_cfg.fraction, data_cfg.limit, data_cfg.seed, data_cfg.stratify)
    out = pd.concat([train, pairs[~is_train]]).sort_index(kind="stable").reset_index(drop=True)
    out.attrs["split"] = data_cfg.split
    return out


def leakage_report(pairs: pd.DataFrame) -> dict:
    """How much of the test set was seen in training or validation (in any loaded cell line).

    Counts are per cell line of the test rows: test perturbations (unique per line) that occur as a
    training perturbation anywhere, and test (pert, gene) pairs that occur as a training pair
    anywhere; `pair_label_agreement` is the share of (test row, training row of the same pair)
    matches whose labels agree — what a lookup of the same pair elsewhere would get right.
    """
    train = pairs[pairs["split"] != "test"]
    test = pairs[pairs["split"] == "test"]
    train_perts = set(train["pert"].unique())
    train_pair_labels = train[["pert", "gene", "label"]].rename(columns={"label": "train_label"})
    matched = test[["cell_line", "pert", "gene", "label"]].merge(train_pair_labels, on=["pert", "gene"], how="inner")
    seen_pairs = matched.drop_duplicates(["cell_line", "pert", "gene"])

    def agreement(matches: pd.DataFrame) -> float | None:
        return round(float((matches["label"] == matches["train_label"]).mean()), 4) if len(matches) else None

    per_cell = {}
    for cell in CELL_LINES:
        rows = test[test["cell_line"] == cell]
        if rows.empty:
            continue
        perts = rows["pert"].unique()
        per_cell[cell] = {
            "test_perturbations": int(len(perts)),
            "test_perturbations_in_train": int(sum(p in train_perts for p in perts)),
            "test_pairs": int(len(rows)),
            "test_pairs_in_train": int((seen_pairs["cell_line"] == cell).sum()),
            "pair_label_agreement": agreement(matched[matched["cell_line"] == cell]),
        }
    total = {key: sum(v[key] for v in per_cell.values()) for key in ("test_perturbations", "test_perturbations_in_train", "test_pairs", "test_pairs_in_train")}
    total["pair_label_agreement"] = agreement(matched)
    return {
        "split": pairs.attrs.get("split", "perturbqa"),
        "cell_lines": [c for c in CELL_LINES if (pairs["cell_line"] == c).any()],
        **total,
        "per_cell_line": per_cell,
    }


def describe(pairs: pd.DataFrame) -> dict:
    """Counts per cell line and split: pairs, each label, DE rate and the up share of DE pairs."""
    counts = pairs.groupby(["cell_line", "split", "label"], observed=True).size()
    out: dict = {}
    for (cell, split), block in counts.groupby(level=[0, 1], observed=True):
        by_label = {label: int(block.get((cell, split, label), 0)) for label in LABELS}
        n, de = sum(by_label.values()), by_label[LABELS[0]] + by_label[LABELS[1]]
        out.setdefault(cell, {})[split] = {
            "pairs": n,
            **by_label,
            "perturbations": int(pairs.loc[(pairs["cell_line"] == cell) & (pairs["split"] == split), "pert"].nunique()),
            "de_rate": round(de / n, 4) if n else None,
            "up_share_of_de": round(by_label[LABELS[0]] / de, 4) if de else None,
        }
    return out


def read_user_pairs(path: str | Path, pairs: pd.DataFrame | None = None, label: bool = False) -> pd.DataFrame:
    """A user's table of (cell_line, pert, gene[, label]) tuples from CSV/TSV/Parquet, checked.

    Errors name the file, the row (CSV line number) and the bad value: missing file or columns,
    an unknown cell line, a label that is not one of the three, and, with `pairs`, a perturbation
    or read-out gene that PerturbQA does not have for that cell line.
    """
    path = Path(path)
    if not path.is_file():
        raise SynthPertError(f"file not found: {path}")
    suffixes = "".join(path.suffixes[-2:]).lower()
    try:
        if suffixes.endswith(".parquet"):
            frame, first_row, where = pd.read_parquet(path), 0, "row"
        elif any(suffixes.endswith(s) for s in (".csv", ".csv.gz", ".tsv", ".tsv.gz")):
            frame = pd.read_csv(path, sep="\t" if ".tsv" in suffixes else ",", dtype=str, keep_default_na=False)
            first_row, where = 2, "line"
        else:
            raise SynthPertError(f"{path}: unsupported file type (use .csv, .tsv or .parquet)")
    except (OSError, ValueError) as exc:
        raise SynthPertError(f"cannot read {path}: {exc}") from exc
    required = ["cell_line", "pert", "gene"] + (["label"] if label else [])
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise SynthPertError(f"{path} lacks column(s) {missing}; it has {list(frame.columns)}")

    def fail(mask, column: str, why: str) -> None:
        bad = np.flatnonzero(np.asarray(mask))
        if len(bad):
            row = int(bad[0])
            raise SynthPertError(f"{path}: {where} {row + first_row}: {column} {frame[column].iloc[row]!r} {why} [{len(bad)} such row(s)]")

    fail(~frame["cell_line"].isin(CELL_LINES), "cell_line", f"is not one of {list(CELL_LINES)}")
    if "label" in frame.columns:
        fail(~frame["label"].isin(LABELS), "label", f"is not one of {list(LABELS)}")
    if pairs is not None:
        for column in ("pert", "gene"):
            known = pd.MultiIndex.from_frame(pairs[["cell_line", column]].astype(str).drop_duplicates())
            here = pd.MultiIndex.from_frame(frame[["cell_line", column]].astype(str))
            fail(~here.isin(known), column, "is not in PerturbQA for that cell line")
    return frame.assign(cell_line=frame["cell_line"].astype(_CELL))
