"""Shared start of the ray_jobs/ scripts: run one `synthpert` CLI command as a Ray job.

Each script is `run("<command>")`, so arguments are parsed once, by the CLI (`synthpert.cli`).
`python ray_jobs/X.py` puts ray_jobs/ first on sys.path, where stage-named files (evaluate.py,
train.py, ...) would shadow real packages: the repository root (the job's working dir) takes its
place. Under `ray job submit`, RAY_ADDRESS names the cluster: connecting here, before any stage
code runs, makes every stage use that cluster and the job's runtime_env instead of starting a
private local Ray (stage code reuses an initialised Ray).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run(*command: str) -> None:
    """`synthpert COMMAND... ARGS`, ARGS being this script's own arguments."""
    sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
    address = os.environ.get("RAY_ADDRESS", "")
    if address and not address.startswith(("http://", "https://")):  # http: a job-API URL, not a cluster
        import ray

        ray.init(address=address)
        print(
            f"synthpert job: {' '.join(command)} on Ray cluster {ray.get_runtime_context().gcs_address}"
            f" (python {sys.executable})",
            file=sys.stderr,
            flush=True,
        )
    from synthpert.cli import main

    main([*command, *sys.argv[1:]])
