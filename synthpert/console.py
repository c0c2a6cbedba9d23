"""The pipeline's console: one live view of the running stages (rows done / total, ETA, calls/s,
tokens, cost, errors) and one line per finished stage; everything the libraries print (Ray, Serve,
DeepSpeed, vLLM, MLflow, transformers) goes to a log file under the run folder instead.

Stages report through the module functions (`total`, `update`, `note`), which do nothing when no
console is active (a stage run alone keeps its own tqdm bars), so no stage signature carries it.
The stage a report belongs to is the one started in the calling thread: the predict stages run in
threads of their own.

Why file descriptors are redirected and not only Python loggers: Ray's raylet and the workers'
lines forwarded by the driver, vLLM, DeepSpeed and tqdm bars print to fds 1 and 2 from C++,
subprocesses and handlers that hold the original stream; `dup2` onto the log file catches all of
it, and the view writes to a saved copy of the terminal's fd.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Iterator, TextIO

from synthpert.errors import SynthPertError

TAIL_LINES = 30
PLAIN_INTERVAL_S = 30.0  # without a terminal (CI, `ray job submit`): one status line per stage this often
LIBRARY_LOGGERS = ("ray", "mlflow", "transformers", "deepspeed", "vllm", "torch", "urllib3", "httpx", "filelock", "py.warnings")
QUIET_ENV = {  # read by the libraries when they start (the Ray workers inherit them)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TQDM_DISABLE": "1",
    "RAY_DEDUP_LOGS": "1",
}


@dataclasses.dataclass
class StageProgress:
    stage: str
    total: int | None = None
    done: int = 0
    calls: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    errors: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)

    def line(self, now: float) -> str:
        elapsed = now - self.started
        parts = [f"{self.stage:<20}", _clock(elapsed)]
        if self.total:
            parts.append(f"{self.done}/{self.total} rows")
            if 0 < self.done < self.total:
                parts.append(f"ETA {_clock(elapsed / self.done * (self.total - self.done))}")
        if self.calls or self.tokens:
            parts += [f"{self.calls / max(elapsed, 1e-9):.2f} calls/s", f"{self.tokens:,} tokens", f"${self.cost_usd:.4f}"]
        if self.errors:
            parts.append(f"{self.errors} errors")
        return "  ".join(parts)


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class Console:
    """What the person running the pipeline sees: the running stages, then a line per finished one.
    `live`: a rich live view (a terminal); otherwise plain status lines every `interval_s`."""

    def __init__(self, out: TextIO, live: bool, interval_s: float | None = PLAIN_INTERVAL_S, clock=time.monotonic):
        self.out, self.clock = out, clock
        self.active: dict[str, StageProgress] = {}
        self.lock = threading.Lock()
        self.current = threading.local()
        self.live = None
        self.stopped = threading.Event()
        if live:
            from rich.console import Console as RichConsole
            from rich.live import Live

            self.live = Live(console=RichConsole(file=out, force_terminal=True), get_renderable=self._render,
                             refresh_per_second=2, transient=True, redirect_stdout=False, redirect_stderr=False)
            self.live.start()
        elif interval_s:
            threading.Thread(target=self._ticker, args=(interval_s,), daemon=True, name="synthpert-console").start()

    def _print(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.out, flush=True)

    def _render(self):
        from rich.text import Text

        with self.lock:
            lines = [p.line(self.clock()) for p in self.active.values()]
        return Text("\n".join(f"▶ {line}" for line in lines))

    def _ticker(self, interval_s: float) -> None:
        while not self.stopped.wait(interval_s):
            self.tick()

    def tick(self) -> None:
        """One plain status line per running stage."""
        with self.lock:
            lines = [p.line(self.clock()) for p in self.active.values()]
        for line in lines:
            self._print(f"… {line}")

    def start(self, stage: str) -> None:
        with self.lock:
            self.active[stage] = StageProgress(stage, started=self.clock())
        self.current.stage = stage
        if self.live is None:
            self._print(f"▶ {stage}")

    def progress(self, stage: str | None = None) -> StageProgress | None:
        """The progress of `stage`, or of the stage started in this thread."""
        return self.active.get(stage or getattr(self.current, "stage", None) or "")

    def finish(self, stage: str, action: str, wall_s: float, path: str | Path) -> None:
        with self.lock:
            p = self.active.pop(stage, None)
        counts = f"  {p.done} rows" if p is not None and p.done else ""
        mark = "✓" if action == "ran" else "·"
        self._print(f"{mark} {stage:<20} {action:<7} {_clock(wall_s):>8}{counts}  {path}")

    def note(self, text: str) -> None:
        self._print(text)

    def close(self) -> None:
        self.stopped.set()
        if self.live is not None:
            self.live.stop()


_active: Console | None = None


def active() -> Console | None:
    return _active


def start(stage: str) -> None:
    """A stage begins (in this thread: its reports below are its own)."""
    if _active is not None:
        _active.start(stage)


def finish(stage: str, action: str, wall_s: float, path: str | Path) -> None:
    """A stage ran or was skipped: its one summary line."""
    if _active is not None:
        _active.finish(stage, action, wall_s, path)


def total(rows: int) -> None:
    """The rows the current stage will produce."""
    p = _active.progress() if _active else None
    if p is not None:
        p.total = rows


def update(rows: int = 0, calls: int = 0, tokens: int = 0, cost_usd: float = 0.0, errors: int = 0) -> None:
    """Add a finished batch's counts to the current stage."""
    p = _active.progress() if _active else None
    if p is not None:
        with _active.lock:
            p.done += rows
            p.calls += calls
            p.tokens += tokens
            p.cost_usd += cost_usd
            p.errors += errors


def note(text: str) -> None:
    """A line the user must see (the cost estimate, a changed memory plan): in the view, or on stderr."""
    if _active is not None:
        _active.note(text)
    else:
        print(text, file=sys.stderr, flush=True)


def tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace").splitlines()[-lines:]
    return []


@contextlib.contextmanager
def _route_logging(handler: logging.Handler) -> Iterator[None]:
    """The libraries' loggers write to `handler` only (their own stream handlers are put back after),
    with the children that keep handlers of their own (ray.serve does not propagate)."""
    saved = {}
    logging.captureWarnings(True)
    children = [name for name, logger in logging.root.manager.loggerDict.items()
                if isinstance(logger, logging.Logger) and logger.handlers and name.split(".")[0] in LIBRARY_LOGGERS]
    for name in dict.fromkeys([*LIBRARY_LOGGERS, *children]):
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.propagate)
        logger.handlers[:] = [handler]
        logger.propagate = False
    try:
        yield
    finally:
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:], logger.propagate = handlers, propagate
        logging.captureWarnings(False)


@contextlib.contextmanager
def _redirect_fds(log: TextIO) -> Iterator[TextIO]:
    """fds 1 and 2 (and sys.stdout / sys.stderr) point at `log` until exit; yields a stream on the original stdout."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    streams = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = log  # also where they are not fds 1 and 2 (a replaced sys.stdout)
    try:
        yield terminal
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        terminal.close()


@dataclasses.dataclass
class Session:
    log_path: Path | None = None
    ray_logs: str | None = None  # Ray's session log dir (the workers' stdout/stderr), linked as logs/ray


_session: Session | None = None


def quiet() -> bool:
    """Whether the libraries' output goes to the run's log file (Ray then keeps workers' lines in its own logs)."""
    return _session is not None and _session.log_path is not None


def ray_started(session_dir: str) -> None:
    """Ray's session directory (the workers' stdout/stderr): linked as `logs/ray` beside our log."""
    if _session is None or _session.log_path is None:
        return
    _session.ray_logs = session_dir
    link = _session.log_path.parent / "ray"
    with contextlib.suppress(OSError):
        if link.is_symlink():
            link.unlink()
        link.symlink_to(Path(session_dir) / "logs", target_is_directory=True)
    note(f"  Ray worker logs: {link} -> {Path(session_dir) / 'logs'}")


@contextlib.contextmanager
def session(run_dir: str | Path, verbose: bool = False, live: bool | None = None, interval_s: float | None = PLAIN_INTERVAL_S) -> Iterator[Session]:
    """The pipeline's console for the block. Not `verbose`: the libraries' output goes to
    `<run_dir>/logs/pipeline-<time>.log`; on failure the last lines of it and its path are printed,
    and an unexpected error exits 1 (a SynthPertError is re-raised for the CLI's one-line error)."""
    global _active, _session
    if verbose:
        _active, _session = Console(sys.stdout, live=False, interval_s=None), Session()
        try:
            yield _session
        finally:
            _active.close()
            _active = _session = None
        return
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}.log"
    saved_env = {name: os.environ.get(name) for name in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    failed: BaseException | None = None
    with open(log_path, "a", buffering=1, encoding="utf-8") as log:
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        with _route_logging(handler), _redirect_fds(log) as terminal:
            _session = Session(log_path)
            _active = Console(terminal, live=terminal.isatty() if live is None else live, interval_s=interval_s)
            _active.note(f"logs: {log_path}")
            running = "the pipeline"
            try:
                yield _session
            except BaseException as exc:  # noqa: BLE001 - reported here, re-raised below
                failed, running = exc, ", ".join(_active.active) or running
                log.write("".join(traceback.format_exception(exc)))
            finally:
                _active.close()
                _active = _session = None
            if failed is not None:
                log.flush()
                print(f"✗ {running} failed: {type(failed).__name__}: {failed}".splitlines()[0], file=terminal)
                print(f"--- last {TAIL_LINES} lines of {log_path} ---", file=terminal)
                print("\n".join(tail(log_path)), file=terminal)
                print(f"--- full log: {log_path}", file=terminal, flush=True)
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if isinstance(failed, (SynthPertError, KeyboardInterrupt, SystemExit)):
        raise failed
    if failed is not None:  # the traceback is in the log, its end was printed
        raise SystemExit(1)
