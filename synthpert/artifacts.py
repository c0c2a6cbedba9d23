"""Stage outputs: Parquet tables with a declared schema, plus one manifest.json per directory.

The manifest records what went in (digests, config, template versions) and what came out
(rows, digest, schema) so a stage can be skipped when its inputs have not changed, and a
reader can check it got what it expected.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from synthpert import __version__
from synthpert.errors import SynthPertError

MANIFEST = "manifest.json"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_table(directory: str | Path, name: str, frame: pd.DataFrame | pa.Table, schema: pa.Schema) -> dict:
    """Write `<directory>/<name>.parquet` cast to `schema` (atomically); return its manifest entry."""
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise SynthPertError(f"table {name!r} lacks declared columns {missing}")
    table = table.select(schema.names).cast(schema)
    path = Path(directory) / f"{name}.parquet"
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return {"file": path.name, "rows": table.num_rows, "sha256": sha256_file(path), "schema": schema.to_string()}


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
