"""cluster.yaml against Ray's own autoscaler schema and defaults (offline: no AWS call)."""

import copy

import jsonschema
import pytest
import yaml

from synthpert.config import load_config
from tests.conftest import REPO

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
