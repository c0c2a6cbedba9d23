import json

import pytest

from synthpert.config import Config, load_config
from synthpert.errors import SynthPertError
from tests.conftest import run_cli

pytestmark = pytest.mark.unit


def test_defaults_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lora_r: 8\ndata:\n  cell_lines: [k562]\n")
    cfg = load_config(path, ["train.lora_r=16", "generate.teacher.base_url=http://127.0.0.1:9/v1", "data.fraction=0.15"])
    assert cfg.train.lora_r == 16
    assert cfg.data.cell_lines == ["k562"]
    assert cfg.data.fraction == 0.15
    assert cfg.generate.teacher.base_url == "http://127.0.0.1:9/v1"
    assert cfg.train.lora_alpha == Config().train.lora_alpha


def test_digest_tracks_content():
    a, b = load_config(None), load_config(None, ["train.lora_r=8"])
    assert a.digest("data") == b.digest("data")
    assert a.digest("train") != b.digest("train")


@pytest.mark.parametrize(
    "override, message",
    [("train.lora_rr=3", "lora_rr"), ("train.zero_stage=4", "zero_stage"), ("nonsense", "key.path=value")],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(SynthPertError, match=message):
        load_config(None, [override])


def test_api_key_comes_from_environment_only(monkeypatch):
    cfg = load_config(None, ["generate.teacher.api_key_env=MY_TEACHER_KEY"])
    monkeypatch.setenv("MY_TEACHER_KEY", "sk-secret-value")
    assert cfg.generate.teacher.api_key() == "sk-secret-value"
    assert "sk-secret-value" not in json.dumps(cfg.model_dump(mode="json"))


def test_cli_config_show_and_bad_file(tmp_path):
    ok = run_cli("config", "show", "--set", "train.lora_r=7", check=True)
    assert "lora_r: 7" in ok.stdout
    bad = run_cli("config", "show", "--config", str(tmp_path / "missing.yaml"))
    assert bad.returncode == 2 and "config file not found" in bad.stderr
