"""Locate the PerturbQA and annotation files (vendored copy or a user `data_dir`) and verify them.

Layout, the same for the vendored copy and for `/work/shared/data`-style copies:
`<dir>/perturbqa/<cell>-de.csv.gz`, `<dir>/perturbqa/<cell>-dir.csv.gz`,
`<dir>/annotations/<table>.tsv.gz`. A flat `<dir>/<file>` (everything in one folder) is accepted
too. Checksums: the vendored files are always checked against `vendor/SHA256SUMS`; a user copy
is checked against its own `<dir>/SHA256SUMS` when it has one (else taken as is: its digests are
still reported by `data_digests` for manifests).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from synthpert.artifacts import sha256_file
from synthpert.errors import SynthPertError

VENDOR_DIR = Path(__file__).resolve().parent / "vendor"
CHECKSUMS = "SHA256SUMS"


def root(data_dir: str | Path | None) -> Path:
    """The data root: the vendored copy when `data_dir` is None."""
    if data_dir is None:
        return VENDOR_DIR
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise SynthPertError(f"data_dir {path} is not a directory")
    return path


@functools.lru_cache(maxsize=8)
def _checksums(sums_file: Path, mtime_ns: int) -> dict[str, str]:
    sums: dict[str, str] = {}
    for lineno, line in enumerate(sums_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise SynthPertError(f"{sums_file}:{lineno}: not a 'sha256  path' line: {line!r}")
        sums[parts[1].strip().lstrip("*")] = parts[0].lower()
    return sums


@functools.lru_cache(maxsize=64)
def _verify(path: Path, expected: str, size: int, mtime_ns: int) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise SynthPertError(
            f"checksum mismatch for {path}: sha256 {actual}, expected {expected} (from {CHECKSUMS}); "
            "the file is corrupt or was changed — restore it or point data.data_dir at a good copy"
        )


def data_file(kind: str, name: str, data_dir: str | Path | None = None) -> Path:
    """Path of `<kind>/<name>` (kind: perturbqa | annotations), checksum-verified where possible."""
    base = root(data_dir)
    candidates = [base / kind / name, base / name]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise SynthPertError(f"data file not found: {' or '.join(str(p) for p in candidates)}")
    sums_file = base / CHECKSUMS
    if sums_file.is_file():
        sums = _checksums(sums_file, sums_file.stat().st_mtime_ns)
        expected = sums.get(path.relative_to(base).as_posix())
        if expected is None:
            raise SynthPertError(f"{sums_file} has no checksum for {path.relative_to(base).as_posix()}")
        stat = path.stat()
        _verify(path, expected, stat.st_size, stat.st_mtime_ns)
    elif data_dir is None:
        raise SynthPertError(f"vendored checksum file missing: {sums_file} (broken install)")
    return path


def read_csv(path: Path, column_types: dict[str, pa.DataType], delimiter: str = ",") -> pa.Table:
    """Read a (gzip) CSV/TSV with pyarrow; wrong or missing columns are errors naming the file."""
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if delimiter == "," else False),
            convert_options=pacsv.ConvertOptions(column_types=column_types, strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise SynthPertError(f"cannot read {path}: {exc}") from exc
    missing = [c for c in column_types if c not in table.column_names]
    if missing:
        raise SynthPertError(f"{path} lacks column(s) {missing}; it has {table.column_names}")
    return table
