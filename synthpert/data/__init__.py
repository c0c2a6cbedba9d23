"""PerturbQA pairs, splits and leakage (perturbqa), files and checksums (files), gene/GO knowledge,
the tuples the LLM stages ask about (tuples)."""

from synthpert.data.files import data_file
from synthpert.data.knowledge import Knowledge, jaccard
from synthpert.data.perturbqa import (
    COLUMNS,
    DIRECTIONS,
    apply_split,
    build_split,
    carve_validation,
    describe,
    evaluation_view,
    gene_sample,
    is_validation,
    leakage_report,
    load_pairs,
    load_split,
    parse_split,
    read_user_pairs,
    subsample,
)
from synthpert.data.tuples import eval_tuples, sample_tuples, with_context

__all__ = ["COLUMNS", "DIRECTIONS", "Knowledge", "apply_split", "build_split", "carve_validation", "describe", "eval_tuples", "evaluation_view", "data_file", "gene_sample", "is_validation", "jaccard", "leakage_report", "load_pairs", "load_split", "parse_split", "read_user_pairs", "sample_tuples", "subsample", "with_context"]
