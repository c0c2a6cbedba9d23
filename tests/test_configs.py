"""configs/: local (embedded defaults), paper and its RPE1 hold-out, and the `extends` mechanism."""

import pytest
import yaml

from synthpert.config import load_config
from synthpert.errors import SynthPertError
from tests.conftest import REPO

pytestmark = pytest.mark.unit

CONFIGS = REPO / "configs"
PAPER = ("paper.yaml", "paper_rpe1.yaml")


def _local_paths(tree: dict, prefix: str = "") -> dict[str, str]:
    """Dotted key -> value for every string that names a local path (has a '/', is no URL)."""
    found = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            found.update(_local_paths(value, f"{prefix}{key}."))
        elif isinstance(value, str) and "/" in value and "://" not in value:
            found[f"{prefix}{key}"] = value
    return found


def test_local_config_is_the_embedded_cpu_setting():
    cfg = load_config(CONFIGS / "local.yaml")
    assert cfg.generate.teacher.base_url is None and cfg.generate.judge.base_url is None  # our endpoint
    assert cfg.train.base_model is None and cfg.serve.model is None  # embedded SmolLM2
    assert cfg.data.data_dir is None  # bundled data
    assert not cfg.train.use_gpu and cfg.train.num_workers <= 2 and cfg.serve.engine == "auto"  # vLLM where installed
    assert cfg.tracking.tracking_uri.startswith("sqlite:///") and not cfg.tracking.tracking_uri.startswith("sqlite:////")
    assert cfg.data.limit and cfg.evaluate.limit and cfg.train.max_steps  # a bounded sample
    assert cfg.evaluate.max_tokens is None  # the students reason up to the teacher's 128 tokens


def test_paper_config_is_the_papers_setting():
    cfg = load_config(CONFIGS / "paper.yaml")
    for endpoint in (cfg.generate.teacher, cfg.generate.judge):
        assert endpoint.model == "o4-mini" and endpoint.base_url == "https://api.openai.com/v1"
        assert endpoint.api_key_env == "OPENAI_API_KEY"
    assert cfg.data.fraction == 0.15 and cfg.data.split == "perturbqa"
    assert cfg.generate.keep == ["excellent"] and cfg.generate.require_answer_match
    assert not cfg.generate.judge_sees_label and cfg.generate.teacher_principles == "builtin"  # SynthPert's critic and teacher
    assert cfg.train.loss_on == "all" and cfg.evaluate.direction == "separate" and cfg.train.lora_dropout == 0
    assert (cfg.train.lora_r, cfg.train.lora_alpha, cfg.train.zero_stage) == (32, 32, 3)
    assert cfg.train.use_gpu and cfg.serve.engine == "vllm" and cfg.serve.use_gpu
    assert isinstance(cfg.train.base_model, str) and cfg.train.base_model  # a path the user sets
    # sized: a declared subset of whole read-out genes (every pair with evaluate.limit=null), reasoning
    # bounded at prediction, and room for o4-mini's hidden reasoning beside its written output
    assert cfg.evaluate.limit and load_config(CONFIGS / "paper.yaml", ["evaluate.limit=null"]).evaluate.limit is None
    assert cfg.evaluate.max_tokens and cfg.evaluate.max_tokens < cfg.generate.teacher.max_tokens
    assert cfg.generate.teacher.reasoning_tokens and cfg.generate.judge.reasoning_tokens


def test_rpe1_holdout_differs_from_paper_only_in_split_neighbours_and_outputs():
    paper = load_config(CONFIGS / "paper.yaml").model_dump(mode="json")
    rpe1 = load_config(CONFIGS / "paper_rpe1.yaml").model_dump(mode="json")
    assert rpe1["data"].pop("split") == "holdout:rpe1" and paper["data"].pop("split") == "perturbqa"
    # no RPE1 row trains: same-line neighbours would exist for training prompts only
    assert rpe1["data"]["knowledge"].pop("cross_cell_line") and not paper["data"]["knowledge"].pop("cross_cell_line")
    for tree in (paper, rpe1):
        tree.pop("run_dir")
        tree["tracking"].pop("experiment")
        for section in ("generate", "train", "evaluate"):
            tree[section].pop("output_dir")
    assert rpe1 == paper


@pytest.mark.parametrize("name", PAPER)
def test_every_local_path_in_the_paper_configs_is_a_parameter(name):
    cfg = load_config(CONFIGS / name)
    paths = _local_paths(cfg.model_dump(mode="json"))
    assert {"train.base_model", "serve.model", "run_dir", "train.output_dir"} <= set(paths)
    overridden = load_config(CONFIGS / name, [f"{key}=/elsewhere/{i}" for i, key in enumerate(paths)])
    assert _local_paths(overridden.model_dump(mode="json")) == {key: f"/elsewhere/{i}" for i, key in enumerate(paths)}
    code = "\n".join(p.read_text() for p in (REPO / "synthpert").rglob("*.py"))
    assert not [value for value in paths.values() if value in code]  # nothing hard-wired in the library


def test_configs_hold_no_secret_values():
    for path in CONFIGS.glob("*.yaml"):
        text = path.read_text()
        assert "sk-" not in text and "api_key:" not in text, path


def test_extends_merges_sections_and_rejects_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  cell_lines: [k562, rpe1]\n  fraction: 0.5\ntrain:\n  lora_r: 4\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ndata:\n  cell_lines: [jurkat]\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.lora_r=6"])
    assert cfg.data.cell_lines == ["jurkat"] and cfg.data.fraction == 0.5 and cfg.train.lora_r == 6
    (tmp_path / "loop.yaml").write_text("extends: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text(yaml.safe_dump({"extends": "loop.yaml"}))
    with pytest.raises(SynthPertError, match="cycle"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(SynthPertError, match="nowhere.yaml"):
        load_config(tmp_path / "orphan.yaml")
