"""First contact: what a user meets on a machine that never ran the project. Every warm-machine
leftover a developer's box has (model caches, runs/, an MLflow store, a Ray session, ports held by
other servers) is absent, or present the way a stranger's machine would have it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from synthpert import cli
from tests.conftest import REPO

# ports a developer's machine often has taken: MLflow's and Serve's defaults, Ray's GCS, dashboard and client server
COMMON_PORTS = (5000, 8000, 6379, 8265, 10001)


def readme_first_command() -> str:
    """The first line of the README's first code block: the command a new user runs."""
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return block.group(1).splitlines()[0]


@contextlib.contextmanager
def ports_held(ports: tuple[int, ...]):
    """Listen on each of `ports` that is free (loopback), as another program on the machine would."""
    sockets = []
    for port in ports:
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            sockets.append(sock)
        except OSError:  # already taken by something else: held all the same
            sock.close()
    try:
        yield
    finally:
        for sock in sockets:
            sock.close()


def fresh_copy(dest: Path) -> Path:
    """The repository as a clone has it: tracked (and not ignored) files only, no runs/, no
    mlruns.db, no .venv. The working tree's, not HEAD's, so uncommitted changes are what is tested."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.mark.unit
def test_an_unexpected_error_is_one_line_naming_the_log_that_holds_its_traceback(tmp_path, monkeypatch, capsys):
    import synthpert.pipeline

    def broken(cfg):
        raise RuntimeError("the plan broke\nsecond line of the message")

    monkeypatch.setattr(synthpert.pipeline, "plan", broken)
    with pytest.raises(SystemExit) as ended:
        cli.main(["pipeline", "--plan", "--set", f"run_dir={tmp_path / 'run'}"])
    assert ended.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    logged = re.fullmatch(r"error: RuntimeError: the plan broke \(traceback in (.+)\)", err)
    assert logged, err
    log = Path(logged.group(1))
    assert log.parent == tmp_path / "run" / "logs"
    assert "Traceback" in log.read_text() and "in broken" in log.read_text()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.serve
@pytest.mark.train
@pytest.mark.timeout(2400)  # the main command (under 15 min on the 2-core box), then its skipping re-run
def test_readme_first_command_in_a_fresh_clone_with_empty_caches(tmp_path):
    """The README's main command where nothing was ever run: a fresh copy, empty SYNTHPERT_CACHE and
    HF_HOME, the usual ports taken. Then again in the same folder: a runs/ and an MLflow store from
    before are reused, every stage skipped. (install.sh is what .ci/run runs from scratch.)"""
    command = readme_first_command()
    install, _, main = command.partition(" && ")
    assert install == "bash install.sh" and main.startswith(".venv/bin/synthpert pipeline"), command
    clone = fresh_copy(tmp_path / "synthpert")
    argv = [str(Path(sys.executable).parent / "synthpert"), *main.split()[1:]]
    caches = tmp_path / "caches"
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
           "SYNTHPERT_CACHE": str(caches / "synthpert"), "HF_HOME": str(caches / "hf")}
    with ports_held(COMMON_PORTS):
        first = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
        assert first.returncode == 0, f"{first.stdout[-3000:]}\n{first.stderr[-3000:]}"
        assert "Traceback" not in first.stdout + first.stderr
        [report] = (clone / "runs" / "local").glob("report-*/report.md")
        assert "student-cot" in report.read_text()
        assert (caches / "synthpert" / "models").is_dir()  # the run made its own cache
        again = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ran nothing" in again.stderr, again.stderr[-2000:]
