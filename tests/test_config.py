"""config.json in every spelling found in the wild."""

import json
from pathlib import Path

import pytest

from herd.config import ConfigError, load_config, parse_config, parse_text_config
from herd.model.llama4 import param_count

FIXTURES = Path(__file__).parent / "fixtures" / "configs"


def _published(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def test_maverick_published_config():
    cfg = parse_config(_published("maverick_published.json"))
    t = cfg.text
    assert cfg.is_multimodal and cfg.dtype == "bfloat16"
    assert cfg.image_token_id == 200092
    assert t.moe_layers == list(range(1, 48, 2))  # odd layers MoE, even dense
    # `no_rope_layers: []` means the default: every 4th layer is NoPE (global).
    assert [i for i in range(48) if not t.uses_rope(i)] == list(range(3, 48, 4))
    assert [i for i in range(48) if not t.is_chunked(i)] == list(range(3, 48, 4))
    assert t.attn_temperature_tuning is True  # given as the int 4
    assert t.rope_scaling is None and t.rope_theta == 500000.0
    assert t.eos_token_id == [200001, 200007, 200008]
    assert not t.use_qk_norm and t.num_local_experts == 128
    # ~400B parameters in the text decoder (Meta: 400B total, 17B active).
    assert 380e9 < param_count(t) < 410e9


def test_scout_published_config():
    t = parse_config(_published("scout_published.json")).text
    assert t.moe_layers == list(range(48))
    assert t.rope_scaling is not None and t.rope_scaling.factor == 16.0
    assert t.rope_scaling.low_freq_factor == t.rope_scaling.high_freq_factor == 1.0
    assert t.use_qk_norm
    assert 100e9 < param_count(t) < 110e9


def test_transformers5_spelling_equals_published():
    published = _published("scout_published.json")["text_config"]
    new = dict(published)
    scaling = new.pop("rope_scaling")
    new["rope_parameters"] = dict(scaling, rope_theta=new.pop("rope_theta"))
    new["dtype"] = new.pop("torch_dtype")
    new["attn_temperature_tuning"] = True
    assert parse_text_config(new) == parse_text_config(published)


def test_bare_text_config_and_dtype_spellings(tmp_path):
    text = dict(_published("maverick_published.json")["text_config"], architectures=["Llama4ForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(text))
    cfg = load_config(tmp_path)
    assert cfg.architecture == "Llama4ForCausalLM" and not cfg.is_multimodal
    assert cfg.dtype == "bfloat16"
    text["dtype"] = text.pop("torch_dtype")
    assert parse_config(text).dtype == "bfloat16"


def test_explicit_layer_lists():
    t = parse_text_config(dict(num_hidden_layers=4, moe_layers=[0, 2], no_rope_layers=[1, 0, 1, 0]))
    assert [t.is_moe(i) for i in range(4)] == [True, False, True, False]
    assert [t.is_chunked(i) for i in range(4)] == [True, False, True, False]
    t = parse_text_config(dict(num_hidden_layers=4, attention_chunk_size=None))
    assert not any(t.is_chunked(i) for i in range(4))


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model_type": "llama", "hidden_size": 8}, "not a Llama 4 config"),
        ({"architectures": ["MixtralForCausalLM"], "model_type": "llama4_text"}, "unsupported architecture"),
        ({"model_type": "llama4_text", "num_hidden_layers": 2, "rope_scaling": {"rope_type": "yarn"}}, "yarn"),
        ({"model_type": "llama4_text", "num_hidden_layers": 4, "no_rope_layers": [1, 0]}, "no_rope_layers"),
        ({"model_type": "llama4_text", "num_hidden_layers": 2, "moe_layers": [5]}, "moe_layers"),
    ],
)
def test_bad_configs_are_clear_errors(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
