"""The OpenAI-compatible Ray Serve application: one FastAPI ingress in front of one engine.

    client --HTTP--> OpenAIIngress (auth, validation, chat template, guided_choice, errors)
                        --handle, multiplexed_model_id=<adapter>--> engine deployment `Engine`:
                           HFServer (transformers, @serve.batch)  or  VllmServer (ray.serve.llm)

The ingress does everything that must behave the same whatever the engine: the model list,
API-key auth, OpenAI-style errors, the context-length check, `guided_choice` (scored through
the engine's `loglikelihoods`), admission by expected wait (synthpert.serving.admission), draining
on shutdown and Prometheus metrics at `/metrics` (synthpert.serving.metrics). Engines implement three methods: `complete(body, prompt_ids)`,
`complete_stream(body, prompt_ids)` (SSE lines) and `loglikelihoods(model, prompt_text, prompt_ids,
choices)` -> [(summed log-probability, tokens)] per choice.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from synthpert.cluster import code_env
from synthpert.config import ServeConfig, load_config
from synthpert.models import resolve_model
from synthpert.serving.adapters import check_adapter_names
from synthpert.serving.admission import Admission
from synthpert.serving.metrics import IngressMetrics
from synthpert.serving.protocol import APIError, ChatRequest, Delta, assemble, check_supported, sse

# the engine deployment's name whichever engine serves: one Serve config file's `deployments`
# section fits both, as `serve.engine: auto` may pick either
ENGINE = "Engine"
# logical CPUs for a Ray Data stage that calls the endpoint (its read and map tasks ask a whole CPU)
DATA_CPUS = 1
# the ingress is one replica: on the head (with the proxy and Serve's controller) it is lost only
# with the whole cluster; on a worker node, that node's loss failed every request until Serve
# restarted it elsewhere (tests/test_multinode.py). Every Ray head node has this resource.
ON_HEAD = {"node:__internal_head__": 0.001}
# no /docs or /openapi.json: every route but /healthz is behind the API key when one is set
api = FastAPI(title="SynthPert OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
CHAT = "/v1/chat/completions"


def context_length(model_dir: Path, max_model_len: int) -> int:
    """The usable context: the configured length, capped by the model's position embeddings."""
    config = json.loads((model_dir / "config.json").read_text())
    return min(max_model_len, config.get("max_position_embeddings") or max_model_len)


def prepare(body: Any, tokenizer: Any, max_model_len: int,
            known_models: list[str] | None = None) -> tuple[ChatRequest, str, list[int]]:
    """Validate a request body, render its prompt and check it fits the context.

    Returns the request (max_tokens filled in when absent), the prompt text and its token ids.
    """
    check_supported(body)
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as exc:
        raise APIError(400, _validation_message(exc)) from None
    if req.logit_bias and max(map(int, req.logit_bias)) >= len(tokenizer):
        raise APIError(400, f"logit_bias names a token id beyond the vocabulary ({len(tokenizer)} tokens)",
                       param="logit_bias")
    if known_models is not None and req.model not in known_models:
        raise APIError(404, f"model {req.model!r} does not exist; available: {', '.join(known_models)}",
                       param="model", type_="not_found_error")
    text = req.prompt_text(tokenizer)
    prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
    room = max_model_len - len(prompt_ids)
    if room <= 0 or (req.token_limit or 0) > room:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens; the prompt has "
                            f"{len(prompt_ids)} and max_tokens asks for {req.token_limit or 'at least 1'} more",
                       param="messages")
    if req.token_limit is None:
        req.max_tokens = room
    return req, text, prompt_ids


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _validation_message(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()]
    return "invalid request: " + "; ".join(parts)


@serve.deployment(name="OpenAIIngress", ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, server: DeploymentHandle, serve_cfg: dict[str, Any]):
        from transformers import AutoTokenizer

        cfg = ServeConfig.model_validate(serve_cfg)
        model_dir = resolve_model(cfg.model)
        self.cfg, self.server = cfg, server
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_model_len = context_length(model_dir, cfg.max_model_len)
        self.created = int(time.time())
        # read in the replica: the key reaches it through the cluster's environment, never the config
        self.api_key = os.environ.get(cfg.api_key_env) or None
        self.admission = Admission(cfg.max_queue_wait_s)
        self.metrics = IngressMetrics()

    def _authorize(self, request: Request) -> None:
        """Constant-time check of `Authorization: Bearer <key>` when a key is configured."""
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                           type_="authentication_error")

    # ---- routes ---------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Any:
        """Prometheus text format (behind the API key like every route but /healthz)."""
        try:
            self._authorize(request)
        except APIError as exc:
            return _error(exc)
        if self.cfg.engine == "transformers":
            try:  # a saturated engine answers late: keep its last snapshot rather than block the scrape
                snap = await asyncio.wait_for(self.server.metrics_snapshot.remote(), timeout=2.0)
                self.metrics.engine[snap["replica"]] = snap
            except Exception:  # noqa: BLE001 - the scrape still reports everything else
                pass
        body = self.metrics.render(self.admission.in_flight, self.admission.rate())
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        try:
            self._authorize(request)
        except APIError as exc:
            return self._count("/v1/models", "", _error(exc))
        base = self.cfg.served_model_name
        cards = [{"id": base, "object": "model", "created": self.created, "owned_by": "synthpert",
                  "root": base, "parent": None, "max_model_len": self.max_model_len}]
        cards += [{"id": name, "object": "model", "created": self.created, "owned_by": "synthpert",
                   "root": name, "parent": base, "max_model_len": self.max_model_len}
                  for name in self.cfg.adapters]
        return self._count("/v1/models", "", JSONResponse({"object": "list", "data": cards}))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        arrived, model = time.monotonic(), ""
        try:
            self._authorize(request)
            req, text, prompt_ids = await self._parse(request)
            model = req.model
            return self._count(CHAT, model, await self._admitted(req, text, prompt_ids, arrived))
        except RayActorError:  # the engine replica died under this request (its node was lost)
            return self._count(CHAT, model, _error(APIError(
                503, "the model replica serving this request was lost; retry (other replicas answer)",
                type_="server_unavailable", headers={"Retry-After": "1"})))
        except BackPressureError as exc:  # only when a Serve file bounds the engine's queue again
            retry = self.admission.retry_after_s()
            return self._count(CHAT, model, _error(APIError(
                503, f"the server is at capacity, retry in {retry} s ({exc.message})",
                type_="server_overloaded", headers={"Retry-After": str(retry)})))
        except Exception as exc:
            cause = getattr(exc, "cause", exc)  # engine errors arrive wrapped in RayTaskError
            if isinstance(cause, APIError):
                return self._count(CHAT, model, _error(cause))
            self.metrics.requests.labels(CHAT, model, "500").inc()
            raise

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests (503) and wait up to `timeout_s` for the admitted ones to finish;
        returns how many are still in flight. Called by `synthpert serve` on SIGTERM/SIGINT."""
        self.admission.draining = True
        deadline = time.monotonic() + timeout_s
        while self.admission.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.admission.in_flight

    # ---- work -----------------------------------------------------------------------------
    def _known_models(self) -> list[str]:
        return [self.cfg.served_model_name, *self.cfg.adapters]

    def _count(self, route: str, model: str, response: Response) -> Response:
        self.metrics.requests.labels(route, model, str(response.status_code)).inc()
        return response

    async def _parse(self, request: Request) -> tuple[ChatRequest, str, list[int]]:
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}") from None
        return prepare(body, self.tokenizer, self.max_model_len, self._known_models())

    async def _admitted(self, req: ChatRequest, text: str, prompt_ids: list[int], arrived: float) -> Response:
        """Run a valid request once admitted; it counts in flight until its answer (or stream) ends."""
        self.admission.admit()
        try:
            out = await self._generate(req, text, prompt_ids)
        except BaseException:
            self.admission.release(completed=False)
            raise
        if isinstance(out, dict):
            self.admission.release(completed=True)
            self.metrics.ttft.labels(req.model, "false").observe(time.monotonic() - arrived)
            self.metrics.usage(req.model, out.get("usage"))
            return JSONResponse(out)
        watched = self._watched(out, req.model, arrived)
        first = await watched.__anext__()  # started now: abandoned unsent, asyncio still closes it

        async def whole() -> AsyncIterator[str]:
            yield first
            async for line in watched:
                yield line

        return StreamingResponse(whole(), media_type="text/event-stream")

    async def _watched(self, lines: AsyncIterator[str], model: str, arrived: float) -> AsyncIterator[str]:
        """An SSE stream that records time to first text and usage, and releases its admission."""
        completed, timed = False, False
        try:
            async for line in lines:
                if not timed and '"content": "' in line and '"content": ""' not in line:
                    self.metrics.ttft.labels(model, "true").observe(time.monotonic() - arrived)
                    timed = True
                if '"usage": {' in line:
                    self.metrics.usage(model, json.loads(line.removeprefix("data: ")).get("usage"))
                yield line
            completed = True
        finally:
            self.admission.release(completed)

    async def _generate(self, req: ChatRequest, text: str, prompt_ids: list[int]) -> dict[str, Any] | AsyncIterator[str]:
        """The engine's answer: a chat.completion body, or (stream) its SSE lines."""
        adapter = "" if req.model == self.cfg.served_model_name else req.model
        server = self.server.options(multiplexed_model_id=adapter)
        if req.guided_choice:
            return await self._guided(req, text, prompt_ids, server)
        body = req.model_dump(exclude_none=True)
        if req.stream:
            lines = server.options(stream=True).complete_stream.remote(body, prompt_ids)
            first = await lines.__anext__()  # surfaces load errors as a proper status

            async def rest() -> AsyncIterator[str]:
                yield first
                async for line in lines:
                    yield line

            return rest()
        return await server.complete.remote(body, prompt_ids)

    async def _guided(self, req: ChatRequest, text: str, prompt_ids: list[int],
                      server: DeploymentHandle) -> dict[str, Any] | AsyncIterator[str]:
        """Score every choice as a continuation of the prompt; answer with the likeliest (or a sample)."""
        choices = req.guided_choice or []
        longest = max(len(self.tokenizer(c, add_special_tokens=False).input_ids) for c in choices)
        if len(prompt_ids) + longest > self.max_model_len:
            raise APIError(400, f"the prompt plus the longest choice exceed the context of {self.max_model_len} tokens",
                           param="messages")
        scored = await server.loglikelihoods.remote(req.model, text, prompt_ids, choices)
        scores = [s for s, _ in scored]
        if req.temperature == 0:
            picks = [max(range(len(scores)), key=scores.__getitem__)] * req.n
        else:
            top = max(scores)
            weights = [math.exp((s - top) / req.temperature) for s in scores]
            picks = random.Random(req.seed).choices(range(len(choices)), weights=weights, k=req.n)
        deltas = [Delta(i, choices[c], scored[c][1], [], "stop") for i, c in enumerate(picks)]
        extra = {"choice_logprobs": dict(zip(choices, scores))}

        async def once() -> Any:
            yield deltas

        if req.stream:
            return sse(once(), req, len(prompt_ids), **extra)
        return await assemble(once(), req, len(prompt_ids), **extra)


# ---- building and running the application -------------------------------------------------
def engine_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve options of the engine deployment (a Serve config file may override them). Its queue is
    unbounded: the ingress admits by expected wait, and Serve's autoscaler counts the queued
    requests at the handle (with ongoing ones) against target_ongoing_requests."""
    return {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": -1,
        "graceful_shutdown_timeout_s": cfg.drain_timeout_s,
        "autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                               "target_ongoing_requests": cfg.target_ongoing_requests,
                               "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s},
    }


def resolve_engine(cfg: ServeConfig) -> ServeConfig:
    """`cfg` with `auto` engine and dtype decided for this machine, saying which and why (one line)."""
    from synthpert import console

    resolved, why = cfg.resolution()
    console.note(why)
    return resolved


def build_app(cfg: ServeConfig) -> Any:
    """The bound application for a ServeConfig: ingress + the configured engine."""
    check_adapter_names(cfg.adapters, cfg.served_model_name)
    cfg = resolve_engine(cfg)
    dumped = cfg.model_dump(mode="json")
    if cfg.engine == "vllm":
        from synthpert.serving.vllm_engine import build_vllm_server

        server = build_vllm_server(cfg, engine_options(cfg), code_env())
    else:
        from synthpert.serving.hf_engine import HFServer

        actor = {"num_cpus": cfg.cpus_per_replica, "num_gpus": 1 if cfg.use_gpu else 0, "runtime_env": code_env()}
        server = serve.deployment(HFServer, name=ENGINE, ray_actor_options=actor, **engine_options(cfg)).bind(dumped)
    # the ingress is cheap (async); every request waits in it for admission, so beyond its own
    # limit (requests held at once) the proxy answers 503 + Retry-After (the expected-wait bound)
    ingress = OpenAIIngress.options(max_ongoing_requests=cfg.ingress_max_ongoing_requests,
                                    max_queued_requests=cfg.ingress_max_ongoing_requests,
                                    graceful_shutdown_timeout_s=cfg.drain_timeout_s,
                                    backpressure_config={"status_code": 503, "retry_after_s": cfg.max_queue_wait_s},
                                    ray_actor_options={"num_cpus": 0, "resources": ON_HEAD, "runtime_env": code_env()})
    return ingress.bind(server, dumped)


def config_from_args(args: dict[str, Any]) -> ServeConfig:
    """The ServeConfig for a Serve config file's `args`: `config` (a synthpert YAML file or null),
    `set` (dotted overrides), `adapters` ({name: local dir or models:/ URI})."""
    cfg = load_config(args.get("config"), list(args.get("set") or [])).serve
    cfg.adapters = {**cfg.adapters, **(args.get("adapters") or {})}
    return cfg


def app_builder(args: dict[str, Any]) -> Any:
    """Entry for Serve config files: `import_path: synthpert.serving.app:app_builder`."""
    return build_app(config_from_args(args))


def replica_cpus(cfg: ServeConfig) -> float:
    """Logical CPUs one engine replica holds (vLLM's engine process asks one more)."""
    return cfg.cpus_per_replica + (1 if cfg.resolved().engine == "vllm" else 0)


def cluster_cpus(cfg: ServeConfig) -> int:
    """Logical CPUs a local cluster needs so every replica can be scheduled, with a Ray Data stage
    calling them beside (else its tasks wait forever behind a replica that holds every CPU)."""
    return max(os.cpu_count() or 1, math.ceil(replica_cpus(cfg) * cfg.max_replicas) + DATA_CPUS)
