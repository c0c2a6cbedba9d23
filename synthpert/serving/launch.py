"""Starting the endpoint: `running()` for other stages and tests, and the `synthpert serve` command.

Ray is joined if this process is already connected (or RAY_ADDRESS names a cluster); otherwise a
private local cluster is started (address="local": never another user's cluster). The HTTP proxy
binds loopback only unless a config says otherwise.

`synthpert serve` stops cleanly on SIGTERM/SIGINT to its process or its whole process group: the
ingress refuses new requests (503), in-flight ones finish up to `serve.drain_timeout_s`, then Serve
and the Ray it started are shut down and the process exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from synthpert.config import ServeConfig
from synthpert.errors import SynthPertError
from synthpert.cluster import ray_session
from synthpert.serving.app import build_app, cluster_cpus, config_from_args

APP_NAME = "synthpert"
log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _proxy_url() -> str:
    """The URL of Serve's one proxy (on the head): bound to every interface (0.0.0.0), it is handed
    out at the head's address, which the callers on other nodes reach; on loopback, as 127.0.0.1."""
    import ray
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    if http.host in ("0.0.0.0", "::"):
        host = next(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"] and HEAD_NODE_RESOURCE_NAME in n["Resources"])
    else:
        host = "127.0.0.1" if http.host == "localhost" else http.host
    return f"http://{host}:{http.port}"


@contextlib.contextmanager
def _serve(host: str, port: int) -> Iterator[None]:
    """Start Serve's HTTP proxy if it is not running yet; shut it down again only if we started it.

    One proxy, on the head node (`HeadOnly`, as serve/local.yaml): the URL we hand out names the
    head's proxy, so a proxy on every other node (Serve's default) serves no one we tell about it.
    On one machine (several Ray nodes on one box) those proxies share the port (SO_REUSEPORT):
    the kernel hands a connection to any of them, and losing a node reset the connections its
    proxy held (tests/test_multinode.py)."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.exceptions import RayServeException

    try:
        _get_global_client()
        started = False
    except RayServeException:
        serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
        started = True
    try:
        yield
    finally:
        if started:
            serve.shutdown()


@contextlib.contextmanager
def running(serve_cfg: ServeConfig, name: str = APP_NAME) -> Iterator[str]:
    """Serve `serve_cfg` while the block runs; yields the OpenAI base URL (".../v1").

    Uses the current Ray cluster (or starts a local one) and a free loopback port when this call
    starts Serve. The application is routed under `/<name>`, so several can run side by side.
    """
    from ray import serve

    with ray_session(cluster_cpus(serve_cfg)), _serve("127.0.0.1", free_port()):
        serve.run(build_app(serve_cfg), name=name, route_prefix=f"/{name}")
        try:
            yield f"{_proxy_url()}/{name}/v1"
        finally:
            serve.delete(name)


def is_serve_config_file(path: Path | None) -> bool:
    """A Ray Serve config file (has `applications:`), as opposed to a synthpert config file."""
    if path is None or not path.is_file():
        return False
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SynthPertError(f"config file {path} is not valid YAML: {exc}") from exc
    return isinstance(tree, dict) and "applications" in tree


def serve_config_file(path: Path, port: int | None, adapters: dict[str, str], overrides: list[str]) -> Any:
    """A Serve config file as a ServeDeploySchema, with --port, --adapter and --set applied."""
    from ray.serve.schema import ServeDeploySchema

    tree = yaml.safe_load(path.read_text())
    if port is not None:
        tree.setdefault("http_options", {})["port"] = port
    for application in tree.get("applications") or []:
        args = application.get("args") or {}
        args["adapters"] = {**(args.get("adapters") or {}), **adapters}
        args["set"] = [*(args.get("set") or []), *overrides]
        application["args"] = args
    try:
        return ServeDeploySchema.model_validate(tree)
    except Exception as exc:
        raise SynthPertError(f"Serve config file {path} is invalid: {exc}") from exc


@contextlib.contextmanager
def _ray_in_own_session() -> Iterator[None]:
    """Ray processes started in the block (GCS, raylet and, through it, the workers) get a session
    of their own. A signal to `synthpert serve`'s process group (Ctrl-C in a terminal, a
    supervisor's SIGTERM) then reaches only this process, which drains and stops them itself;
    otherwise they die under a shutdown that still waits on them (over 60 s at "Deleting app").
    They still die with this process (Ray's kill-on-parent-death stays on). Ray's process starter
    has no option for this, so its Popen class is swapped for the duration of the block."""
    from ray._private import services

    original = services.ConsolePopen

    class OwnSession(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, start_new_session=True, **kwargs)

    services.ConsolePopen = OwnSession
    try:
        yield
    finally:
        services.ConsolePopen = original


def _drain(names: list[str], timeout_s: float) -> None:
    """Each application's ingress refuses new requests and waits for the admitted ones, at most
    `timeout_s` (all applications at once)."""
    from ray import serve

    calls = {name: serve.get_app_handle(name).drain.remote(timeout_s) for name in names}
    for name, call in calls.items():
        try:
            left = call.result(timeout_s=timeout_s + 5)
        except Exception as exc:  # noqa: BLE001 - stopping goes on whatever one application does
            log.warning("could not drain application %s: %s", name, exc)
            continue
        if left:
            log.warning("application %s: %d requests still in flight after %.0f s", name, left, timeout_s)


def _wait_running(names: list[str], timeout_s: float) -> None:
    """Block until every application is RUNNING; fail clearly when one cannot deploy."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        failed = {n: apps[n].message for n, st in states.items() if st == "DEPLOY_FAILED"}
        if failed:
            raise SynthPertError(f"Serve could not deploy: {failed}")
        if all(st == "RUNNING" for st in states.values()):
            return
        time.sleep(1.0)
    raise SynthPertError(f"Serve applications {names} were not running after {timeout_s:.0f} s")


def serve_until_stopped(cfg: ServeConfig | None, config_file: Path | None = None, port: int | None = None,
                        adapters: dict[str, str] | None = None, overrides: list[str] | None = None,
                        on_ready: Any = print, timeout_s: float = 1800) -> None:
    """`synthpert serve`: run until SIGINT/SIGTERM, then drain and stop (module docstring). A Serve
    config file is deployed exactly as `serve run FILE` deploys it (its per-deployment overrides
    apply); otherwise `cfg` is served."""
    from ray import serve

    adapters = adapters or {}
    schema = serve_config_file(config_file, port, adapters, overrides or []) if config_file else None
    if schema is not None:
        cfg = config_from_args(schema.applications[0].args or {})
        host, port = schema.http_options.host, schema.http_options.port
    else:
        assert cfg is not None
        cfg.adapters = {**cfg.adapters, **adapters}
        host, port = cfg.host, cfg.port if port is None else port
    with _ray_in_own_session(), ray_session(cluster_cpus(cfg)), _serve(host, port):
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own handlers
            signal.signal(sig, lambda *_: stop.set())
        if schema is not None:
            from ray.serve._private.api import serve_start

            serve_start().deploy_apps(schema)  # the call `serve run FILE` makes
            names = [a.name for a in schema.applications]
            prefixes = [a.route_prefix or "/" for a in schema.applications]
        else:
            serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
            names, prefixes = [APP_NAME], ["/"]
        _wait_running(names, timeout_s)
        base = _proxy_url()
        on_ready({"base_urls": [f"{base}{p.rstrip('/')}/v1" for p in prefixes], "applications": names})
        stop.wait()
        _drain(names, cfg.drain_timeout_s)
        for name in names:
            serve.delete(name)
