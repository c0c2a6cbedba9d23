"""The tuples the LLM stages ask about, as prompt rows: the seeded training sample, the evaluation
tuples, and any pairs with their knowledge context (from training rows only)."""

from __future__ import annotations

import pandas as pd

from synthpert.config import DataConfig, EvaluateConfig
from synthpert.data.knowledge import Knowledge
from synthpert.data.perturbqa import build_split, gene_sample, load_split
from synthpert.errors import SynthPertError


def sample_tuples(data_cfg: DataConfig) -> pd.DataFrame:
    """The seeded sample of training and validation tuples (fraction/limit), with prompt context.

    The context's labelled neighbours come from the same pool as an evaluation tuple's: the whole
    training part of the split (never the sample, which would show a fraction of them), with the
    tuple's own perturbation left out (synthpert.data.knowledge).
    """
    pool = load_split(data_cfg)
    pairs = build_split(data_cfg, pool)
    picked = pairs[pairs["split"].isin(["train", "validation"])].reset_index(drop=True)
    if picked.empty:
        raise SynthPertError(f"no training tuples for cell lines {data_cfg.cell_lines} with split {data_cfg.split!r}")
    return with_context(picked, pool, data_cfg)


def eval_tuples(data_cfg: DataConfig, eval_cfg: EvaluateConfig) -> pd.DataFrame:
    """Validation and test tuples of the configured split (at most `evaluate.limit` of each per cell
    line, whole read-out genes), with context and their `split`: the champion is chosen on the
    validation rows, the test rows are only reported."""
    pairs = load_split(data_cfg)
    parts = []
    for part in ("validation", "test"):
        rows = pairs[pairs["split"] == part]
        if eval_cfg.limit is not None:
            rows = pd.concat([gene_sample(group, eval_cfg.limit, eval_cfg.seed)
                              for _, group in rows.groupby("cell_line", observed=True)] or [rows])
        parts.append(rows)
    if parts[1].empty:
        raise SynthPertError(f"no test tuples for cell lines {data_cfg.cell_lines} with split {data_cfg.split!r}")
    return with_context(pd.concat(parts).reset_index(drop=True), pairs, data_cfg)


def with_context(pairs: pd.DataFrame, train: pd.DataFrame, data_cfg: DataConfig) -> pd.DataFrame:
    """Prompt rows for `pairs`: tuple id, the tuple, its label and split, and knowledge context from
    the rows of `train` whose split is train (only those)."""
    frame = pairs[["cell_line", "pert", "gene", "label", "split"]].astype(str).reset_index(drop=True)
    frame.insert(0, "tuple_id", frame["cell_line"] + "/" + frame["pert"] + "/" + frame["gene"])
    context = [""] * len(frame)
    if data_cfg.knowledge.enabled:
        knowledge = Knowledge.load(data_cfg.data_dir, data_cfg.knowledge)
        context = [knowledge.context(r.cell_line, r.pert, r.gene, train, data_cfg.knowledge) or "" for r in frame.itertuples()]
    return frame.assign(context=context)
