"""One way for every stage to get a Ray cluster: the one we are in, RAY_ADDRESS, or a private one.

A stage run inside the pipeline, a Ray job or a test reuses the connected cluster; run alone it
starts a local one for its own lifetime (`address="local"`: never another local cluster by
accident). Workers import synthpert from where this process did, so a source checkout works as
well as an install.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_OBJECT_STORE = 300 * 2**20  # bytes; our datasets are small and Ray spills beyond this


def code_env() -> dict[str, Any]:
    """runtime_env that puts this synthpert on the workers' path."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def ray_address() -> str | None:
    """The existing cluster that RAY_ADDRESS names (None: none, a private one would be started)."""
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):  # a job-API URL: we run inside that cluster
        return "auto"
    return address or None


@contextlib.contextmanager
def ray_session(num_cpus: float | None = None) -> Iterator[None]:
    """Use the connected Ray cluster, or RAY_ADDRESS, else start a private local one until exit.

    `num_cpus`: logical CPUs the caller needs scheduled at once on a private cluster (at least
    the machine's cores are offered).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = ray_address()
    local = {} if address else {
        "num_cpus": max(os.cpu_count() or 1, num_cpus or 0),
        "object_store_memory": LOCAL_OBJECT_STORE,
        "include_dashboard": False,
    }
    from synthpert import console

    # under the pipeline's console the workers' lines stay in Ray's session logs (linked from the run's logs/)
    context = ray.init(address=address or "local", runtime_env=code_env(), log_to_driver=not console.quiet(), **local)
    console.ray_started(context.address_info["session_dir"])
    try:
        yield
    finally:
        ray.shutdown()
