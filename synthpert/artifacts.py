"""Stage outputs: Parquet tables with a declared schema, plus one manifest.json per directory.

The manifest records what went in (digests, config, template versions) and what came out
(rows, digest, schema) so a stage can be skipped when its inputs have not changed, and a
reader can check it got what it expected.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from synthpert import __version__
from synthpert.errors import SynthPertError

MANIFEST = "manifest.json"
ROW_GROUP_ROWS = 2048  # batches are buffered up to this: few row groups, a few MB held at most


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[str]:
    """A temp file beside `path`, moved onto it when the block ends cleanly, removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_write(path: Path, write) -> None:
    with _atomic_path(path) as tmp:
        write(tmp)


class TableWriter:
    """`<directory>/<name>.parquet` cast to `schema`, written one batch at a time so a stage's output
    never has to fit in the driver's memory. The file appears (atomically) only when the `with`
    block ends without an error; `entry` is then its manifest entry."""

    def __init__(self, directory: str | Path, name: str, schema: pa.Schema):
        self.path, self.name, self.schema, self.rows = Path(directory) / f"{name}.parquet", name, schema, 0
        self.entry: dict | None = None
        self._buffer: list[pa.Table] = []

    def __enter__(self) -> TableWriter:
        with contextlib.ExitStack() as stack:  # a writer that fails to open takes its temp file with it
            self._writer = stack.enter_context(pq.ParquetWriter(stack.enter_context(_atomic_path(self.path)), self.schema))
            self._stack = stack.pop_all()
        return self

    def write(self, frame: pd.DataFrame | pa.Table) -> None:
        table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
        missing = [f.name for f in self.schema if f.name not in table.column_names]
        if missing:
            raise SynthPertError(f"table {self.name!r} lacks declared columns {missing}")
        self._buffer.append(table.select(self.schema.names).cast(self.schema))
        self.rows += table.num_rows
        if sum(t.num_rows for t in self._buffer) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.concat_tables(self._buffer))
            self._buffer = []

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:  # the writer closes and the temp file goes
            self._stack.__exit__(kind, error, trace)
            return
        with self._stack:  # the writer closes, then the file moves into place (or goes, if the flush fails)
            self._flush()
        self.entry = {"file": self.path.name, "rows": self.rows, "sha256": sha256_file(self.path), "schema": self.schema.to_string()}


def write_table(directory: str | Path, name: str, frame: pd.DataFrame | pa.Table, schema: pa.Schema) -> dict:
    """Write `<directory>/<name>.parquet` cast to `schema` (atomically); return its manifest entry."""
    with TableWriter(directory, name, schema) as writer:
        writer.write(frame)
    return writer.entry


def read_table(directory: str | Path, name: str, schema: pa.Schema | None = None) -> pd.DataFrame:
    """Read a stage table; with `schema`, check the declared columns are all there."""
    path = Path(directory) / f"{name}.parquet"
    if not path.is_file():
        raise SynthPertError(f"dataset file not found: {path}")
    table = pq.read_table(path)
    if schema is not None:
        missing = [f.name for f in schema if f.name not in table.column_names]
        if missing:
            raise SynthPertError(f"{path} lacks columns {missing} (has {table.column_names})")
    return table.to_pandas()


def write_manifest(directory: str | Path, stage: str, outputs: dict[str, dict], **fields: Any) -> Path:
    """Write the directory's manifest: stage, time, version, outputs, and any extra fields."""
    manifest = {
        "stage": stage,
        "synthpert_version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "outputs": outputs,
        **fields,
    }
    path = Path(directory) / MANIFEST
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str)))
    return path


def read_manifest(directory: str | Path) -> dict | None:
    """The directory's manifest, or None when the stage has not finished there."""
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
