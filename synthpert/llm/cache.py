"""Durable content-addressed store of finished LLM calls: never pay for the same call twice.

One sqlite file in WAL mode, one row per call, committed the moment the call returns. A
`kill -9` can only lose calls still in flight (a committed WAL frame survives the process; with
synchronous=NORMAL only a power cut can drop the last commits). Several processes of one
machine may open the same file (a stage's owner actor, the driver reading it back, a resumed
run): sqlite serialises the writers, `INSERT OR IGNORE` makes a duplicate write harmless, and the
busy timeout makes a writer wait instead of failing.

The same file holds the run's cost budget counter (`reserve` / `settle`): a one-row table shared
through sqlite's write lock, where `BEGIN IMMEDIATE` makes check-and-reserve atomic.

WAL shares its index through memory of one machine, so a file on a cluster's shared file system
cannot be written from several hosts: a stage's calling actors, which Ray Data places on any
node, reach the file through one owner actor on the driver's node (`cache_owner`), and await it
(`AwaitedCache`).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any


def cache_key(**parts: Any) -> str:
    """SHA-256 of the canonical JSON of everything that determines a call's answer."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class CallCache:
    """`get(key)` / `put(key, record)` over one sqlite file shared by every process of a run."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 120.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: autocommit, so each INSERT is its own committed transaction.
        self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        self._enter_wal(busy_timeout_s)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
            "record TEXT NOT NULL, created REAL NOT NULL)"
        )
        # committed = USD spent in this run + USD reserved by calls still in flight
        self._db.execute("CREATE TABLE IF NOT EXISTS budget (id INTEGER PRIMARY KEY CHECK (id = 0), committed REAL NOT NULL)")
        self._db.execute("INSERT OR IGNORE INTO budget (id, committed) VALUES (0, 0.0)")

    def _enter_wal(self, timeout_s: float) -> None:
        """Switch to WAL, retrying by hand: when several processes open a new file at once,
        sqlite answers the journal-mode switch with SQLITE_BUSY without calling the busy
        handler, so the connection timeout alone does not make it wait."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM calls WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, model: str, record: dict) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO calls (key, model, record, created) VALUES (?, ?, ?, ?)",
                (key, model, json.dumps(record, sort_keys=True), time.time()),
            )

    def reset_budget(self) -> None:
        """A new run starts at zero: reservations a killed run left behind are not spent money."""
        with self._lock:
            self._db.execute("UPDATE budget SET committed = 0.0")

    @classmethod
    def start_budget(cls, path: str | Path, limit_usd: float | None) -> None:
        """Before a stage's actors start: its run's budget counter at zero (nothing when no budget)."""
        if limit_usd is not None:
            cache = cls(path)
            try:
                cache.reset_budget()
            finally:
                cache.close()

    def reserve(self, usd: float, limit_usd: float) -> bool:
        """Atomically add `usd` to the run's committed cost unless that would pass `limit_usd`."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (committed,) = self._db.execute("SELECT committed FROM budget").fetchone()
                fits = committed + usd <= limit_usd
                if fits:
                    self._db.execute("UPDATE budget SET committed = committed + ?", (usd,))
            finally:
                self._db.execute("COMMIT")
        return fits

    def settle(self, delta_usd: float) -> None:
        """Replace a call's reservation by its actual cost (delta = actual - reserved)."""
        with self._lock:
            self._db.execute("UPDATE budget SET committed = committed + ?", (delta_usd,))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def output_tokens(self) -> dict[str, tuple[float, int]]:
        """Per model: mean completion tokens and calls held. Summed inside SQLite: a resume at the
        paper's scale must not load the whole cache (it held ~4 KB per call)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT model, AVG(json_extract(record, '$.completion_tokens')), COUNT(*) FROM calls GROUP BY model"
            ).fetchall()
        return {model: (mean, calls) for model, mean, calls in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()


def cache_owner(path: str | Path):
    """The actor that holds CallCache(path) for a stage's calling actors, on this (the driver's)
    node, with no CPU (it fits a 0-CPU head); one call at a time, as the file's one writer."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(CallCache).options(num_cpus=0, scheduling_strategy=here).remote(str(path))


class AwaitedCache:
    """A CallCache in this process, or the handle of its owner actor (`cache_owner`), behind one
    awaitable call: what LLMClient's event loop uses, wherever the file is."""

    def __init__(self, cache: Any):
        self.cache = cache

    async def __call__(self, method: str, *args: Any) -> Any:
        if isinstance(self.cache, CallCache):
            return getattr(self.cache, method)(*args)
        return await getattr(self.cache, method).remote(*args)
