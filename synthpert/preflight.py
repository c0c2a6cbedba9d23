"""Pre-flight: what a pipeline run needs from outside, checked before anything is created or called.

A run that cannot finish should fail in seconds with the whole list, not after it has started a
Ray cluster, made folders and an MLflow run and paid for calls. Only what the pending stages
need is checked (a finished stage is skipped and needs nothing). The checks create nothing: no
folder, no Ray session (an existing cluster is only read when RAY_ADDRESS names one), no MLflow
run; a remote endpoint gets one `GET /models` with its key. Our own Serve endpoint, which the
pipeline starts itself, is not called: only the model it would serve is checked.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from synthpert.config import Config, EndpointConfig, TrackingConfig, TrainConfig
from synthpert.errors import SynthPertError
from synthpert.models import EMBEDDED_ALIASES, EMBEDDED_NAME, embedded_cached, embedded_gguf, model_name

PROBE_TIMEOUT_S = 5.0  # a healthy endpoint lists its models in well under a second
SHOWN_MODELS = 5


@dataclasses.dataclass(frozen=True)
class Check:
    """One thing the run needs; `subject` is the config key it comes from."""

    subject: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'FAIL'} {self.subject}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class Report:
    """The stages a run would compute and every check their needs got."""

    pending: list[str]
    checks: list[Check]
    cost: dict[str, dict] = dataclasses.field(default_factory=dict)  # estimate.for_stages, when every check passed
    size: dict = dataclasses.field(default_factory=dict)  # estimate.sizes: USD and GPU hours by evaluation set, likewise

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def text(self) -> str:
        stages = ", ".join(self.pending) or "none (every stage is done)"
        return "\n".join([f"pending stages: {stages}", *(c.line() for c in self.checks), *costs_text(self.cost, self.size)])


def run(cfg: Config) -> Report:
    """Every check the pending stages need, failed or not (the caller decides what to do)."""
    from synthpert.pipeline import pending

    todo = pending(cfg)
    g = cfg.generate
    training = any(stage.startswith("train-") for stage in todo)
    remote = {"generate.teacher": g.teacher} if "traces" in todo or "predict-teacher" in todo else {}
    remote |= {"generate.judge": g.judge} if "traces" in todo else {}
    # our own endpoint serves the students and the base model, and a teacher or judge without a URL
    ours = any(s.startswith("predict-") and s != "predict-teacher" for s in todo) or any(e.base_url is None for e in remote.values())
    probe = functools.cache(_listed_models)  # teacher and judge often share one endpoint and key
    checks = [writable("run_dir", cfg.run_dir)]
    checks += [endpoint(subject, e, probe) for subject, e in remote.items() if e.base_url is not None]
    cluster = cluster_resources() if training or ours else Cluster({}, "")
    tokenizer = functools.cache(_tokenizer)  # the served model is usually the base model
    if ours:
        served = model_path("serve.model", cfg.serve.model)
        checks += [served, *(scoring_template(cfg.serve.model, tokenizer) if served.ok else []), *serve_resources(cfg, cluster),
                   *serve_reach(cfg, cluster)]
    if training:
        base = model_path("train.base_model", cfg.train.base_model)
        checks += [base, *(training_template(cfg.train, tokenizer) if base.ok else []), *train_resources(cfg, cluster)]
        if cfg.train.storage_path and "://" not in cfg.train.storage_path:
            checks.append(writable("train.storage_path", Path(cfg.train.storage_path)))
        checks += tracking_reach(cfg.tracking, cluster)
    if training and ours and model_name(cfg.train.base_model) != model_name(cfg.serve.model):  # as the endpoint compares an adapter's
        checks.append(Check("serve.model", False, f"the adapters are trained on train.base_model ({cfg.train.base_model or 'embedded'}) "
                                                  f"but would be served on {cfg.serve.model or 'embedded'}"))
    cost, size = {}, {}
    # the estimate samples and renders every tuple (and imports openai): only for a paid or GPU run that can start
    if all(c.ok for c in checks) and (g.teacher.priced() or g.judge.priced() or cfg.train.use_gpu or cfg.serve.use_gpu):
        from synthpert.estimate import for_stages, sizes

        cost = for_stages(cfg, todo)
        size = sizes(cfg, todo, cost)
    base_ok = all(c.ok for c in checks if c.subject == "train.base_model")  # its shape sizes the checkpoints
    sized = [stage for stage in todo if base_ok or not stage.startswith("train-")]
    checks += disk_space(cfg, sized, cost.get("traces", {}).get("tuples", cfg.data.limit))
    return Report(todo, checks, cost, size)


def require(cfg: Config) -> Report:
    """The pre-flight report; every failure at once, one line each, as one SynthPertError."""
    report = run(cfg)
    if report.failures:
        lines = "\n".join(f"  {c.subject}: {c.detail}" for c in report.failures)
        raise SynthPertError(f"pre-flight: {len(report.failures)} problem(s), nothing was started or created:\n{lines}")
    return report


def costs_text(cost: dict[str, dict], size: dict | None = None) -> list[str]:
    """Each paid stage's estimate, then the run's USD and GPU hours by evaluation set (`size`)."""
    if not cost and not size:
        return []
    from synthpert.estimate import describe, describe_sizes

    return [*(describe(est, est["budget_usd"], stage) for stage, est in cost.items()), *describe_sizes(size or {})]


def confirm(cfg: Config, cost: dict[str, dict], yes: bool, size: dict | None = None) -> None:
    """Ask before a run whose paid calls may cost more than generate.confirm_above_usd (the upper
    end of the estimate, printed with the run's GPU hours, `size`); `yes` answers for the user.
    Nobody to ask (no terminal, CI, a Ray job): refuse in one line rather than wait or go ahead unasked."""
    threshold = cfg.generate.confirm_above_usd
    high = sum(est["usd"][1] for est in cost.values())
    if threshold is None or not cost or high <= threshold:
        return
    print("\n".join(costs_text(cost, size)), file=sys.stderr)
    asked = f"this run's paid calls may cost up to ${high:.2f}, above generate.confirm_above_usd=${threshold:.2f}"
    unattended = None if yes else unattended_reason()
    if unattended:
        from synthpert.estimate import BUDGETS

        # --yes alone would let the run spend whatever it ends up costing: name the caps not set
        caps = " ".join(f"--set {BUDGETS[stage]}=USD" for stage, est in cost.items() if est["budget_usd"] is None)
        raise SynthPertError(f"{asked}; not confirmed ({unattended}): re-run with --yes"
                             + (f" and a hard budget for each paid stage ({caps})" if caps else "") + ", or raise generate.confirm_above_usd")
    import typer

    if not yes and not typer.confirm(f"{asked}. Go ahead?", default=False, err=True):
        raise SynthPertError(f"{asked}; not confirmed: nothing was started")


def unattended_reason() -> str | None:
    """Why no one can answer a question here, or None when a terminal can."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR  # set in a submitted job's driver only

    if RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ:
        return "inside a Ray job"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return "in CI"
    if not sys.stdin or not sys.stdin.isatty():
        return "stdin is not a terminal"
    return None


def endpoint(subject: str, e: EndpointConfig, probe: Callable[[str, str | None], tuple[list[str], str | None]]) -> Check:
    """Its key variable is set, the endpoint accepts the key and lists the configured model."""
    key_var = f"${e.api_key_env}" if e.api_key_env else "no key"
    if e.api_key_env and not e.api_key():
        return Check(subject, False, f"{key_var} is not set (the key for {e.base_url})")
    listed, error = probe(e.base_url.rstrip("/"), e.api_key())
    if error:
        return Check(subject, False, f"{e.base_url}: {error} (with {key_var})")
    if e.model not in listed:
        shown = ", ".join(listed[:SHOWN_MODELS]) + (", ..." if len(listed) > SHOWN_MODELS else "")
        return Check(subject, False, f"{e.base_url} does not list model {e.model!r} (it has: {shown or 'none'})")
    return Check(subject, True, f"{e.base_url} accepts {key_var} and lists {e.model}")


def _listed_models(base_url: str, key: str | None) -> tuple[list[str], str | None]:
    """`GET /models` once, no retries: the model ids, or why there are none (never the key)."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=key or "EMPTY", max_retries=0, timeout=PROBE_TIMEOUT_S)
    try:
        return [m.id for m in client.models.list()], None
    except openai.AuthenticationError:
        return [], "401 Unauthorized: the key is not accepted"
    except openai.PermissionDeniedError:
        return [], "403 Forbidden: the key may not list models"
    except openai.APIStatusError as exc:
        return [], f"GET /models answered {exc.status_code}"
    except openai.APIConnectionError as exc:
        return [], f"does not answer ({type(exc).__name__})"
    finally:
        client.close()


def model_path(subject: str, value: str | None) -> Check:
    """A local model folder that loads as a config (no weights); the embedded model is bundled."""
    if value in EMBEDDED_ALIASES:
        if not (embedded_cached() / "config.json").is_file():
            try:
                embedded_gguf()  # converted on first use from the bundled file
            except SynthPertError as exc:
                return Check(subject, False, str(exc))
        return Check(subject, True, f"the embedded {EMBEDDED_NAME}")
    path = Path(value).expanduser()
    if not path.is_dir():
        return Check(subject, False, f"{path} {'is not a folder' if path.exists() else 'does not exist'}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # any reason it does not load is the user's to fix
        return Check(subject, False, f"{path} does not load as a model config: {str(exc).splitlines()[0]}")
    return Check(subject, True, f"{path} ({config.model_type})")


# a training row and an answer rendered through the models' chat templates
SAMPLE = {"cell_line": "k562", "pert": "GENE1", "gene": "GENE2", "label": "downregulated"}
SAMPLE_REASONING = "GENE1 activates GENE2, so knocking GENE1 down lowers GENE2."


def _tokenizer(value: str | None):
    """A model's tokenizer (no weights); None for the embedded model not converted yet: reading its
    GGUF file takes tens of seconds, and its plain template is tested (tests/test_chat_templates.py).
    From tokenizer.json where the folder has one: the same vocabulary and chat template, and 3 s
    to import where AutoTokenizer's import of every model class and torch took 13 s of each
    pre-flight on a 2-core box."""
    folder = embedded_cached() if value in EMBEDDED_ALIASES else Path(value).expanduser()
    if value in EMBEDDED_ALIASES and not (folder / "tokenizer_config.json").is_file():
        return None
    if (folder / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast as Tokenizer
    else:  # sentencepiece-only tokenizers
        from transformers import AutoTokenizer as Tokenizer

    return Tokenizer.from_pretrained(folder, local_files_only=True)


def _template_check(subject: str, value: str | None, tokenizer: Callable, render: Callable) -> list[Check]:
    """`render(tokenizer)` -> detail, as one check on `value`'s chat template: SynthPertError from
    synthpert.chat means the reasoning would be lost; any other error, that it does not render."""
    name = f"chat template of {f'the embedded {EMBEDDED_NAME}' if value in EMBEDDED_ALIASES else Path(value).expanduser()}"
    try:
        loaded = tokenizer(value)
        return [] if loaded is None else [Check(subject, True, f"{name} {render(loaded)}")]
    except SynthPertError as exc:
        return [Check(subject, False, f"{name} would lose the reasoning: {exc}")]
    except Exception as exc:  # a tokenizer or template that does not load or render is the user's to fix
        return [Check(subject, False, f"{name} does not load or render: {(str(exc) or type(exc).__name__).splitlines()[0]}")]


def training_template(t: TrainConfig, tokenizer: Callable) -> list[Check]:
    """One training row rendered as training renders it (synthpert.chat): by the template where it
    keeps the trace as written, else by the trainer itself; failing only when neither can."""
    from synthpert.chat import TEMPLATE, assistant_spans
    from synthpert.prompts import format_answer, student_messages
    from synthpert.train.collate import build_messages

    trace = f"<think>{SAMPLE_REASONING}</think>{format_answer(SAMPLE['label'])}"
    row = {**SAMPLE, "messages": [*student_messages(SAMPLE), {"role": "assistant", "content": trace}]}

    def render(loaded) -> str:
        if assistant_spans(loaded, build_messages(row, t.mode))[2] == TEMPLATE:
            return "keeps the assistant's turn as written"
        return "drops or rewrites the assistant's turn: training renders it itself (generation prompt, the trace as written, end of turn)"

    return _template_check("train.base_model", t.base_model, tokenizer, render)


def scoring_template(value: str | None, tokenizer: Callable) -> list[Check]:
    """One student prompt rendered for generation, and one answer continued up to `<answer>` as
    prediction scores the labels (synthpert.chat.continued_prompt), through the served model's template."""
    from synthpert.chat import continued_prompt
    from synthpert.prompts import ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, student_messages

    messages = student_messages(SAMPLE)

    def render(loaded) -> str:
        opens = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True).rstrip().endswith(THINK_OPEN)
        answer = ("" if opens else THINK_OPEN) + SAMPLE_REASONING + THINK_CLOSE + ANSWER_OPEN  # predict.answer_prefix's
        continued_prompt(loaded, [*messages, {"role": "assistant", "content": answer}])
        head = "opens <think> in its generation prompt: answers start inside it, and their" if opens else "renders the prompt, and answers'"
        return f"{head} labels are scored after their reasoning"

    return _template_check("serve.model", value, tokenizer, render)


def train_resources(cfg: Config, cluster: Cluster) -> list[Check]:
    """The training workers' GPUs and CPUs (see `_resources`)."""
    t = cfg.train
    need = {"GPU": t.num_workers if t.use_gpu else 0, "CPU": t.num_workers * t.cpus_per_worker}
    per = {"GPU": f"train.num_workers={t.num_workers} x 1 with train.use_gpu", "CPU": f"train.num_workers={t.num_workers} x {t.cpus_per_worker:g}"}
    return _resources("train", need, per, cluster)


def serve_resources(cfg: Config, cluster: Cluster) -> list[Check]:
    """Our endpoint's first replicas and the Ray Data stage that calls them, which run at once: on
    a cluster holding only the replicas' CPUs, the stage's tasks would wait forever."""
    from synthpert.serving.app import DATA_CPUS, replica_cpus

    s = cfg.serve.resolved()
    replicas, each = max(s.min_replicas, 1), replica_cpus(s)
    need = {"GPU": replicas if s.use_gpu else 0, "CPU": replicas * each + DATA_CPUS}
    per = {"GPU": f"{replicas} replica(s) with serve.use_gpu",
           "CPU": f"{replicas} replica(s) x {each:g} on {s.engine} + {DATA_CPUS} for the Ray Data stage calling them"}
    return _resources("serve", need, per, cluster)


def _resources(section: str, need: dict[str, float], per: dict[str, str], cluster: Cluster) -> list[Check]:
    """`need` against the cluster the pipeline will use (`cluster_resources`): on this node a
    private cluster is started with at least the CPUs asked for, so only its GPUs can be short.
    A cluster short now passes when its autoscaler can launch the rest: Ray Train and Serve wait
    for those nodes, and when a job is submitted to a `ray up` cluster only its head is up."""
    have, where, scale = cluster.have, cluster.where, cluster.autoscaler
    checks = []
    for resource, count in need.items():
        if not count or resource not in have:
            continue
        ok, detail = have[resource] >= count, f"{count:g} {resource}s needed ({per[resource]}), {where} has {have[resource]:g}"
        if not ok and scale:
            most = scale.most(resource)
            ok = most >= count
            detail += f" now and can launch {scale.text()}" + ("" if ok else f": {most:g} at most")
        checks.append(Check(f"{section}.{resource.lower()}s", ok, detail))
    return checks


AUTOSCALER_CONFIG = Path("~/ray_bootstrap_config.yaml")  # where `ray up` leaves the cluster's config, on the head node
AUTOSCALER_CONFIG_ENV = "SYNTHPERT_AUTOSCALER_CONFIG"  # another file in that format (another launcher's, a rehearsal's)


@dataclasses.dataclass(frozen=True)
class Autoscaler:
    """What a `ray up` cluster may grow to: its head, and up to `max_workers` worker nodes of the
    types in `workers` (name -> the resources of one, its max_workers)."""

    head: dict[str, float]
    workers: dict[str, tuple[dict[str, float], int]]
    max_workers: int

    def most(self, resource: str) -> float:
        """The most of `resource` the cluster can hold at once: the head and the richest workers."""
        total, left = self.head.get(resource, 0), self.max_workers
        for resources, count in sorted(self.workers.values(), key=lambda w: -w[0].get(resource, 0)):
            total += min(count, left) * resources.get(resource, 0)
            left -= min(count, left)
        return total

    def text(self) -> str:
        def shown(resources: dict[str, float]) -> str:
            return ", ".join(f"{key}: {resources[key]:g}" for key in ("GPU", "CPU") if key in resources)

        return ", ".join(f"{min(count, self.max_workers)} x {{{shown(resources)}}} ({name}, max_workers {count})"
                         for name, (resources, count) in self.workers.items())


def autoscaler() -> Autoscaler | None:
    """The autoscaler of the cluster this node heads (AUTOSCALER_CONFIG, with each node type's
    resources filled in from its instance type by `ray up`, or the file AUTOSCALER_CONFIG_ENV
    names); None on any other node, or when it may launch no worker."""
    path = Path(os.environ.get(AUTOSCALER_CONFIG_ENV) or AUTOSCALER_CONFIG).expanduser()
    if not path.is_file():
        return None
    import yaml

    config = yaml.safe_load(path.read_text())
    types, head = config["available_node_types"], config["head_node_type"]
    workers = {name: (t.get("resources", {}), t.get("max_workers", 0)) for name, t in types.items() if name != head and t.get("max_workers", 0)}
    return Autoscaler(types[head].get("resources", {}), workers, config.get("max_workers", 0)) if workers else None


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What a run would use: its resources (`have`), a description of it (`where`), what its
    autoscaler may add, and its live nodes' addresses (`nodes`, `here` the driver's), read once
    while connected: the checks run after the pre-flight has left the cluster."""

    have: dict[str, float]
    where: str
    autoscaler: Autoscaler | None = None
    nodes: frozenset[str] = frozenset()
    here: str = ""


def tracking_reach(t: TrackingConfig, cluster: Cluster) -> list[Check]:
    """Training's rank 0 logs every step to the tracking store from whichever node it lands on: a
    server named by a loopback address, or a sqlite/file store, is this machine's alone."""
    from urllib.parse import urlsplit

    url = urlsplit(t.tracking_uri)
    if url.scheme in ("http", "https"):
        mine, what = _loopback(url.hostname or "", cluster), "this machine's loopback"
    else:
        mine, what = url.scheme in ("", "sqlite", "file"), "a file on this machine"
    elsewhere = _elsewhere(cluster) if t.enabled and mine else ""
    if not elsewhere:
        return []
    return [Check("tracking.tracking_uri", False, f"{t.tracking_uri} is {what}, out of reach of training workers on {elsewhere}: "
                  "name a tracking server by an address they reach (cluster.yaml's head sets MLFLOW_TRACKING_URI to its own, "
                  "which tracking.tracking_uri: null reads)")]


def serve_reach(cfg: Config, cluster: Cluster) -> list[Check]:
    """The Ray Data actors that call our endpoint run on any node, and Serve's one proxy listens on
    the head at serve.host: a loopback host is out of their reach from every other machine."""
    elsewhere = _elsewhere(cluster) if _loopback(cfg.serve.host, cluster) else ""
    if not elsewhere:
        return []
    return [Check("serve.host", False, f"{cfg.serve.host} is this machine's loopback, out of reach of the actors calling our "
                  f"endpoint from {elsewhere}: serve.host: 0.0.0.0 (the endpoint is then handed out at the head's address)")]


def _loopback(host: str, cluster: Cluster) -> bool:
    """A loopback address other than a Ray node's own: the nodes reach each other at theirs (the
    simulated nodes of one box sit at 127.0.0.x addresses, a real cluster's never on loopback)."""
    import ipaddress

    try:
        return host == "localhost" or (ipaddress.ip_address(host).is_loopback and host not in cluster.nodes)
    except ValueError:  # a host name: resolved where it is used
        return False


def _elsewhere(cluster: Cluster) -> str:
    """The other machines a run's workers may land on: the cluster's live nodes at another address
    than the driver's, and the worker types its autoscaler can launch (a job is submitted while
    none is up); "" when every node is on this machine."""
    launchable = [f"the {name} nodes the autoscaler can launch" for name in (cluster.autoscaler.workers if cluster.autoscaler else {})]
    return ", ".join([*sorted(cluster.nodes - {cluster.here}), *launchable])


def cluster_resources() -> Cluster:
    """Resources of the cluster a run would use, what that cluster is and what its autoscaler may
    add, without starting one: the connected or RAY_ADDRESS one (read; a resource it does not list
    is 0), else this node (its GPUs only; a private cluster does not grow)."""
    import ray

    from synthpert.cluster import ray_address

    def connected(where: str) -> Cluster:
        nodes = frozenset(node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"])
        return Cluster({"CPU": 0.0, "GPU": 0.0, **ray.cluster_resources()}, where, autoscaler(), nodes, ray.util.get_node_ip_address())

    if ray.is_initialized():
        return connected("the connected Ray cluster")
    address = ray_address()
    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        try:
            return connected(f"the Ray cluster at {address}")
        finally:
            ray.shutdown()
    # what Ray itself would detect when starting a private cluster here (CUDA_VISIBLE_DEVICES, else NVML)
    from ray._private.accelerators import get_accelerator_manager_for_resource

    gpus = get_accelerator_manager_for_resource("GPU")
    visible = gpus.get_current_process_visible_accelerator_ids()
    return Cluster({"GPU": float(len(visible) if visible is not None else gpus.get_current_node_num_accelerators())}, "this node")


CHECKPOINT_BYTES_PER_PARAM = 4 + 4 + 8 + 4  # a LoRA weight in fp32, its master copy, AdamW's two moments, the adapter file
# bytes of text per output token; llm.client.CHARS_PER_TOKEN's figure, not imported: that module imports openai (seconds)
TRACE_BYTES_PER_TOKEN = 4
TRACE_FILES = 3  # a trace is written to the call cache, attempts.parquet and sft.parquet (uncompressed, at most)


def disk_space(cfg: Config, todo: list[str], tuples: int | None) -> list[Check]:
    """Free space where the pending stages write, against a rough upper figure: per training run
    (checkpoints_to_keep + 1 while a new one is written) checkpoints of the LoRA weights and their
    optimizer state, and the final adapter, in train.storage_path or run_dir; the traces (every
    output token of teacher and judge, TRACE_FILES times) in run_dir. `tuples` None: traces not
    counted (counting them would mean sampling the data). One line per file system."""
    t, g = cfg.train, cfg.generate
    needs: dict[Path, dict[str, float]] = {}
    runs = sum(stage.startswith("train-") for stage in todo)
    if runs:
        from synthpert.models import model_config

        trainable = lora_params(model_config(t.base_model), t.lora_r, t.target_modules)
        where = Path(t.storage_path) if t.storage_path and "://" not in t.storage_path else cfg.run_dir
        needs.setdefault(where, {})["checkpoints"] = runs * trainable * CHECKPOINT_BYTES_PER_PARAM * (t.checkpoints_to_keep + 2)
    if "traces" in todo and tuples:
        needs.setdefault(cfg.run_dir, {})["traces"] = tuples * (g.teacher.max_tokens + g.judge.max_tokens) * TRACE_BYTES_PER_TOKEN * TRACE_FILES
    by_disk: dict[int, tuple[Path, dict[str, float]]] = {}
    for path, parts in needs.items():
        existing = next(p for p in (Path(path).absolute(), *Path(path).absolute().parents) if p.exists())
        first, total = by_disk.setdefault(existing.stat().st_dev, (existing, {}))
        for part, size in parts.items():
            total[part] = total.get(part, 0) + size
    checks = []
    for where, parts in by_disk.values():
        need, free = sum(parts.values()), shutil.disk_usage(where).free
        detail = ", ".join(f"{part} {size / 2**30:.2f} GiB" for part, size in parts.items())
        ok = free >= need
        checks.append(Check("disk", ok, f"{where}: {need / 2**30:.2f} GiB needed ({detail}), {free / 2**30:.2f} GiB free"
                                        + ("" if ok else "; free space or lower train.checkpoints_to_keep")))
    return checks


def lora_params(config: dict, rank: int, target_modules: list[str]) -> int:
    """LoRA weights of a Llama-family model, from its config.json alone: `train.memory.model_shape`
    counts them exactly on a meta-device model, but importing torch and the model classes takes
    seconds to tens of seconds on a busy box, too slow for a pre-flight. An unknown module name
    counts as hidden -> hidden."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    q, kv, inter = heads * head_dim, config.get("num_key_value_heads", heads) * head_dim, config.get("intermediate_size", 4 * hidden)
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    return layers * rank * sum(sum(shapes.get(name.rsplit(".", 1)[-1], (hidden, hidden))) for name in target_modules)


def writable(subject: str, path: Path) -> Check:
    """A folder the run can write into, checked without creating it: it is a writable folder, or
    its nearest existing parent is. A relative path is created under the working directory as
    needed; an absolute one names a prepared place (a shared file system, a mounted disk), so its
    parent must exist: /mnt/shared/x on a node where /mnt/shared is not mounted would otherwise
    land on that node's local disk."""
    path = Path(path).expanduser()
    absolute = path.absolute()
    if absolute.exists():
        if not absolute.is_dir():
            return Check(subject, False, f"{absolute} is not a folder")
        ok = os.access(absolute, os.W_OK | os.X_OK)
        return Check(subject, ok, f"{absolute} {'is writable' if ok else 'is not writable'}")
    if path.is_absolute() and not absolute.parent.is_dir():
        top = next(p for p in reversed(absolute.parents) if not p.exists())
        return Check(subject, False, f"{absolute} is missing and so is {top} (not mounted here? create it first)")
    parent = next(p for p in absolute.parents if p.exists())
    ok = parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
    return Check(subject, ok, f"{absolute} will be created in {parent}" if ok else f"{absolute} cannot be created: {parent} is not writable")
