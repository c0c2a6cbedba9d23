"""cluster.yaml against Ray's own autoscaler schema and defaults, and its shell steps run against
stand-ins for `aws` and `ray` (offline: no AWS call)."""

import copy
import fnmatch
import json
import os
import re
import subprocess

import jsonschema
import pytest
import yaml

from synthpert.config import load_config
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.unit


def _prepared(raw: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))  # Ray's AWS defaults merged in, as `ray up` does
    validate_config(config)  # ray-schema.json + Ray's cross-field checks
    return config


def test_cluster_yaml_is_a_valid_ray_cluster_for_the_paper_job():
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config = _prepared(raw)
    assert config["provider"]["type"] == "aws"
    head = config["head_node_type"]
    (gpu,) = [name for name in config["available_node_types"] if name != head]
    group = config["available_node_types"][gpu]
    assert group["min_workers"] == 0 < group["max_workers"] <= config["max_workers"]  # autoscaling
    assert group["node_config"]["InstanceType"].startswith(("g5.", "p4d.", "p5."))

    setup = "\n".join(config["setup_commands"])
    assert "torch==2.13.0" in setup and '-e ".[gpu]"' in setup and "-c constraints/gpu.txt" in setup
    assert any("--dashboard-port=8265" in c for c in config["head_start_ray_commands"])
    assert (REPO / config["file_mounts"]["/home/ubuntu/synthpert"]).resolve() == REPO
    assert "/home/ubuntu/synthpert/ray_jobs" not in config["file_mounts"]  # one mount carries all

    # the model folder the nodes fetch is the one configs/paper.yaml names, and its outputs are on
    # the file system every node mounts
    paper = load_config(REPO / "configs" / "paper.yaml")
    fetched = setup.split("--local-dir ")[1].split()[0].replace("~", "/home/ubuntu")
    assert paper.train.base_model == paper.serve.model == fetched
    # the paper's base model, by a command of its own: a failed download fails the setup
    (download,) = [c for c in config["setup_commands"] if "--local-dir" in c]
    assert download == f"~/venv/bin/hf download {PAPER_MODEL} --local-dir ~/models/base-8b"
    assert PAPER_MODEL in (REPO / "configs" / "paper.yaml").read_text()
    shared = setup.split("mountpoint -q ")[1].split()[0]
    outputs = [paper.run_dir, paper.generate.output_dir, paper.train.output_dir, paper.evaluate.output_dir]
    assert all(str(path).startswith(f"{shared}/") for path in outputs)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(head_node_typ="head"),  # a typo'd top-level key
        lambda c: c["available_node_types"]["gpu_worker"].update(min_workers="zero"),
        lambda c: c.update(head_node_type="gpu"),  # not one of the node types
    ],
    ids=["typo-key", "bad-type", "unknown-head"],
)
def test_the_validator_rejects_broken_variants(mutate):
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    mutate(raw)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _prepared(raw)


PAPER_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"  # SynthPert's base model
SECRET_READ = re.compile(r"(\w+)=\$\(bash (?:~/synthpert/)?aws/secret\.sh ([\w/-]+)\) && export \1 &&")


def _commands(config: dict, node: str) -> list[str]:
    """What `ray up` runs on the head (`node` == head_node_type) or on a worker, in order."""
    role = "head" if node == config["head_node_type"] else "worker"
    return [*config["setup_commands"], *config[f"{role}_setup_commands"], *config[f"{role}_start_ray_commands"]]


def test_every_node_type_reads_its_secrets_loudly_with_a_profile_that_grants_them():
    """Ray's default role (EC2, S3) goes to the head only, so every node type names an instance
    profile; each secret a node's commands read goes through aws/secret.sh (which fails on an
    empty one) as an assignment chained with &&, and that node type's policy in aws/ grants it."""
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config = _prepared(raw)
    text = (REPO / "cluster.yaml").read_text()
    assert "secretsmanager" not in "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "2>/dev/null" not in text
    profiles = {}
    for node, node_type in raw["available_node_types"].items():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        profile = re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/synthpert-(\w+)", arn).group(1)
        profiles[node] = profile
        policy = json.loads((REPO / "aws" / f"{profile}-policy.json").read_text())
        granted = [r for st in policy["Statement"] if st["Action"] == "secretsmanager:GetSecretValue" for r in st["Resource"]]
        commands = " ".join(_commands(config, node))
        reads = SECRET_READ.findall(commands)
        assert len(reads) == commands.count("secret.sh") and reads, (node, commands)
        for _, secret in reads:
            arn = f"arn:aws:secretsmanager:us-west-2:123456789012:secret:{secret}-AbCdEf"  # AWS appends 6 characters
            assert any(fnmatch.fnmatchcase(arn, pattern) for pattern in granted), (node, secret)
    assert sorted(profiles.values()) == ["head", "worker"]
    # the head launches the workers with their profile: it may pass their role (named as the profile)
    head = json.loads((REPO / "aws" / "head-policy.json").read_text())
    passed = [st["Resource"] for st in head["Statement"] if st["Action"] == "iam:PassRole"]
    assert any(fnmatch.fnmatchcase("arn:aws:iam::123456789012:role/synthpert-worker", r) for r in passed)


def _stand_ins(tmp_path, secret: str | None) -> dict[str, str]:
    """HOME with ~/synthpert (the repository) and a PATH whose `aws` answers `secret` (None: access
    denied) and whose `ray` records the key it was started with; what Ray's updater runs, here."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir(exist_ok=True)
    bin_dir.mkdir(exist_ok=True)
    if not (home / "synthpert").exists():
        (home / "synthpert").symlink_to(REPO)
    answer = 'echo "An error occurred (AccessDeniedException) when calling the GetSecretValue operation" >&2; exit 254' if secret is None \
        else f"printf '%s\\n' {secret!r}"
    (bin_dir / "aws").write_text(f"#!/usr/bin/env bash\n{answer}\n")
    (bin_dir / "ray").write_text('#!/usr/bin/env bash\necho "ray $1 OPENAI_API_KEY=${OPENAI_API_KEY-unset} '
                                 'MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI-unset}" >> "$HOME/ray.log"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # mlflow.set_tracking_uri exports it
    return {**inherited, "HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("secret", [None, "", "None", "sk-test-value"], ids=["denied", "empty", "no-string", "set"])
def test_a_secret_a_node_cannot_read_stops_its_start_command(tmp_path, secret):
    """The head's and the workers' start commands, as written in cluster.yaml (`ulimit` aside:
    raising it needs privileges CI lacks), against a stand-in `aws`: without a readable, non-empty
    secret they fail before `ray start` or the MLflow server, saying which secret; with one, `ray
    start` gets it. The value itself is never printed."""
    config = _prepared(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    env = _stand_ins(tmp_path, secret)
    starts = [c for c in [*config["head_start_ray_commands"], *config["worker_start_ray_commands"]] if c != "ray stop"]
    assert len(starts) == 3  # the head's ray start and MLflow server, the workers' ray start
    for command in starts:
        proc = subprocess.run(["bash", "-c", f"ulimit() {{ :; }}; {command}"], env=env, capture_output=True, text=True, timeout=60)
        assert "sk-test-value" not in proc.stdout + proc.stderr
        if secret == "sk-test-value":  # past the secret: `ray start` ran, or the MLflow start (no env file here)
            assert proc.returncode == 0 if "ray start" in command else "mlflow/start.sh:" in proc.stderr, proc.stderr
            continue
        assert proc.returncode != 0, (command, proc.stderr)
        read = SECRET_READ.search(command).group(2)
        reason = f"cannot read secret {read}" if secret is None else f"secret {read} is empty"
        assert f"aws/secret.sh: {reason}" in proc.stderr, proc.stderr
        assert "mlflow/start.sh:" not in proc.stderr, proc.stderr
    log = tmp_path / "home" / "ray.log"
    started = log.read_text().splitlines() if log.exists() else []
    # the head's jobs log to its MLflow server by the head's own (here: this box's) first address, never loopback
    head_uri = f"http://{subprocess.run(['hostname', '-I'], capture_output=True, text=True).stdout.split()[0]}:5000"
    assert not head_uri.startswith("http://127.")
    expected = [f"ray start OPENAI_API_KEY=sk-test-value MLFLOW_TRACKING_URI={head_uri}",
                "ray start OPENAI_API_KEY=sk-test-value MLFLOW_TRACKING_URI=unset"]
    assert started == (expected if secret == "sk-test-value" else [])


def test_mlflow_start_fails_loudly_without_its_env_file_or_a_server(tmp_path):
    """The head's MLflow server starts or `ray up` stops, saying why: the env file missing (it
    ships as cluster.env.example), or a server that exits at once (here: no Python)."""
    env = {**os.environ, "HOME": str(tmp_path)}
    start = ["bash", str(REPO / "mlflow" / "start.sh")]
    missing = subprocess.run([*start, str(tmp_path / "cluster.env")], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1
    assert f"{tmp_path}/cluster.env is missing: cp mlflow/cluster.env.example" in missing.stderr
    env_file = tmp_path / "cluster.env"
    env_file.write_text(f"MLFLOW_HOST=127.0.0.1\nMLFLOW_PORT={free_port()}\n")
    dead = subprocess.run([*start, str(env_file), str(tmp_path / "server.log")], env={**env, "PYTHON": "false"},
                          capture_output=True, text=True, timeout=60)
    assert dead.returncode == 1 and f"the MLflow server exited; the end of {tmp_path}/server.log" in dead.stderr


def test_the_documented_paper_job_runs_unattended_within_budgets():
    """A Ray job cannot answer the cost question: every documented submission of the paper's run
    carries --yes and both hard budgets (generate.max_cost_usd, evaluate.max_cost_usd)."""
    submissions = []
    for doc in ("README.md", "cluster.yaml", "configs/paper.yaml"):
        text = (REPO / doc).read_text()
        submissions += [(doc, c) for c in re.findall(r"ray job submit(?:[^\n]*\\\n)*[^\n]*", text) if "configs/paper" in c]
    assert {doc for doc, _ in submissions} == {"README.md", "cluster.yaml", "configs/paper.yaml"}
    for doc, command in submissions:
        assert "--yes" in command.split() and re.search(r"--set generate\.max_cost_usd=\d", command), (doc, command)
        assert re.search(r"--set evaluate\.max_cost_usd=\d", command), (doc, command)
