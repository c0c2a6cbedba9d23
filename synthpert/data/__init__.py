"""PerturbQA pairs, splits and leakage (perturbqa), files and checksums (files), gene/GO knowledge."""

from synthpert.data.files import data_file
from synthpert.data.perturbqa import (
    COLUMNS,
    DIRECTIONS,
    apply_split,
    build_split,
    leakage_report,
    load_pairs,
    parse_split,
    subsample,
)

__all__ = ["COLUMNS", "DIRECTIONS", "apply_split", "build_split", "data_file", "leakage_report", "load_pairs", "parse_split", "subsample"]
