import json

import pytest

from synthpert.errors import SynthPertError
from synthpert.models import EMBEDDED_CONFIG, embedded_gguf, resolve_model


@pytest.mark.slow
def test_embedded_model_is_a_plain_hf_folder(embedded_model):
    assert embedded_gguf().is_file()
    assert resolve_model(None) == embedded_model == resolve_model("embedded")
    assert (embedded_model / "model.safetensors").is_file()
    assert (embedded_model / "chat_template.jinja").is_file() or "chat_template" in (embedded_model / "tokenizer_config.json").read_text()
    # what the pre-flight sizes a run by before the model is converted: the converted model's own config
    converted = json.loads((embedded_model / "config.json").read_text())
    assert json.loads(EMBEDDED_CONFIG.read_text()) == {k: v for k, v in converted.items() if k != "transformers_version"}


@pytest.mark.unit
def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(SynthPertError, match="not a model directory"):
        resolve_model(tmp_path / "nope")
