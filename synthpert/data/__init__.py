"""PerturbQA pairs, splits and leakage (perturbqa), files and checksums (files), gene/GO knowledge."""

from synthpert.data.files import data_file
from synthpert.data.knowledge import Knowledge, jaccard
from synthpert.data.perturbqa import (
    COLUMNS,
    DIRECTIONS,
    apply_split,
    build_split,
    describe,
    gene_sample,
    leakage_report,
    load_pairs,
    parse_split,
    read_user_pairs,
    subsample,
)

__all__ = ["COLUMNS", "DIRECTIONS", "Knowledge", "apply_split", "build_split", "describe", "data_file", "gene_sample", "jaccard", "leakage_report", "load_pairs", "parse_split", "read_user_pairs", "subsample"]
