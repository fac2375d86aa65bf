"""Config system: presets, TOML and config.json loading, strict validation."""

from __future__ import annotations

import pytest

from mmf.config import (LlamaConfig, MMFConfig, model_config_from_dict, model_preset, preset_names,
                        resolve_model_config)
from mmf.errors import ConfigError


@pytest.mark.parametrize("size", ["tiny", "370m", "1.3b", "2.7b", "13b"])
def test_presets_exist_for_both_architectures(size):
    a, b = model_preset(size), model_preset(f"transformer++-{size}")
    assert isinstance(a, MMFConfig) and isinstance(b, LlamaConfig)
    assert (a.hidden_size, a.num_hidden_layers, a.vocab_size) == (b.hidden_size, b.num_hidden_layers, b.vocab_size)
    assert model_preset(f"mmf-{size}") == a
    assert f"mmf-{size}" in preset_names()


def test_released_shapes():
    assert (model_preset("370m").hidden_size, model_preset("370m").num_hidden_layers) == (1024, 24)
    assert model_preset("1.3b").ffn_size == 5632
    assert model_preset("13b").ffn_size == 13824 == model_preset("transformer++-13b").ffn_size


def test_toml_model_table(tmp_path):
    p = tmp_path / "m.toml"
    p.write_text('[model]\narch = "transformer++"\nhidden_size = 128\nnum_hidden_layers = 2\nnum_attention_heads = 4\n')
    cfg = resolve_model_config(str(p))
    assert isinstance(cfg, LlamaConfig) and cfg.hidden_size == 128 and cfg.dim_head == 32


@pytest.mark.parametrize("data,message", [
    ({"model_type": "hgrn_bit", "hidden_sise": 3}, "unknown key 'hidden_sise'; valid keys:"),
    ({"model_type": "hgrn_bit", "hidden_size": "big"}, "key 'hidden_size' must be int"),
    ({"model_type": "hgrn_bit", "use_lower_bound": 1}, "key 'use_lower_bound' must be bool"),
    ({"model_type": "hgrn_bit", "use_short_conv": True}, "use_short_conv"),
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"model_type": "llama", "hidden_size": 100, "num_attention_heads": 3}, "not divisible"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "not supported"),
])
def test_strict_validation(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        model_config_from_dict(data, "test")


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="valid presets: tiny"):
        model_preset("7b")


def test_floats_accept_ints_and_bookkeeping_keys_are_ignored():
    cfg = model_config_from_dict({"model_type": "llama", "rope_theta": 500000, "torch_dtype": "bfloat16",
                                  "transformers_version": "4.40"}, "x")
    assert cfg.rope_theta == 500000.0 and isinstance(cfg.rope_theta, float)
