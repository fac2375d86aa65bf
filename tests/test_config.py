"""Config system: presets, TOML and config.json loading, strict validation."""

from __future__ import annotations

import json
import math

import pytest

from mmf.config import (HF_INERT_KEYS, LlamaConfig, MMFConfig, model_config_from_dict, model_preset, preset_names,
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
                                  "transformers_version": "4.40"}, "x", hf=True)
    assert cfg.rope_theta == 500000.0 and isinstance(cfg.rope_theta, float)


# The generic attributes transformers 4.x writes into a full config.json (`to_json_file(use_diff=False)`),
# with their default values (PretrainedConfig.__init__ of 4.40-4.55); 5.x writes a subset plus `dtype`.
TRANSFORMERS_4_GENERIC = {
    "return_dict": True, "output_hidden_states": False, "output_attentions": False, "torchscript": False,
    "torch_dtype": "float32", "use_bfloat16": False, "tf_legacy_loss": False, "pruned_heads": {},
    "tie_word_embeddings": False, "chunk_size_feed_forward": 0, "is_encoder_decoder": False, "is_decoder": False,
    "cross_attention_hidden_size": None, "add_cross_attention": False, "tie_encoder_decoder": False,
    "max_length": 20, "min_length": 0, "do_sample": False, "early_stopping": False, "num_beams": 1,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0,
    "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None, "num_return_sequences": 1, "output_scores": False, "return_dict_in_generate": False,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
    "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "architectures": None, "finetuning_task": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "tokenizer_class": None, "prefix": None, "bos_token_id": 1,
    "pad_token_id": None, "eos_token_id": 2, "sep_token_id": None, "decoder_start_token_id": None,
    "task_specific_params": None, "problem_type": None, "_name_or_path": "", "_commit_hash": None,
    "_attn_implementation_internal": None, "_attn_implementation_autoset": True, "transformers_version": "4.48.0",
    "use_cache": True, "initializer_range": 0.02, "quantization_config": None,
}


def _generic_keys() -> dict:
    keys = dict(TRANSFORMERS_4_GENERIC)
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers comes with the test extra
        return keys
    return {**keys, **transformers.PretrainedConfig().to_dict()}


@pytest.mark.parametrize("model_type", ["hgrn_bit", "llama"])
def test_every_generic_transformers_key_is_known_and_inert(model_type, capsys):
    small = {"model_type": model_type, "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2}
    generic = {k: v for k, v in _generic_keys().items() if k != "model_type"}
    plain = model_config_from_dict(small, "plain.json", hf=True)
    full = model_config_from_dict({**generic, **small}, "full.json", hf=True)
    assert full == plain and dict(full.ignored_keys) == {}  # every key known: none left over as unknown
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("model_type", ["hgrn_bit", "llama"])
@pytest.mark.parametrize("key,value", [("dtype", "bf16"), ("torch_dtype", "float32"), ("initializer_range", 0.5),
                                       ("temperature", 0.1), ("attention_dropout", 0.1), ("max_length", 20),
                                       ("use_cache", True), ("transformers_version", "4.48.0")])
def test_inert_config_json_keys_are_unknown_keys_in_mmf_toml(model_type, key, value):
    """mmf's own [model] table is strict: a config.json's inert key is an error there, listing the valid keys."""
    data = {"model_type": model_type, "hidden_size": 64, "num_attention_heads": 4, key: value}
    if model_type == "hgrn_bit":
        del data["num_attention_heads"]
    assert key in HF_INERT_KEYS
    if model_type == "llama" and key == "attention_dropout":  # a LlamaConfig field: accepted as 0 only
        msg = r"m.toml \[model\]: attention_dropout = 0.1 is not supported; mmf applies no dropout \(0.0\)$"
        assert model_config_from_dict(data, "c.json", hf=True).attention_dropout == 0.1  # inert in a config.json
        assert model_config_from_dict({**data, key: 0.0}, "m.toml [model]").attention_dropout == 0.0
    else:
        msg = rf"m.toml \[model\]: unknown key '{key}'; valid keys: .*hidden_size"
        assert model_config_from_dict(data, "c.json", hf=True).hidden_size == 64
    with pytest.raises(ConfigError, match=msg):
        model_config_from_dict(data, "m.toml [model]")


@pytest.mark.parametrize("preset", ["tiny", "transformer++-tiny"])
def test_what_mmf_writes_reads_back(preset):
    """A checkpoint's config.json and an ONNX manifest hold to_hf_dict(), read as a config.json (hf=True); the
    same dict in mmf's own TOML would be refused for its `architectures` key."""
    cfg = model_preset(preset)
    assert model_config_from_dict(cfg.to_hf_dict(), "mmf_onnx.json", hf=True).to_hf_dict() == cfg.to_hf_dict()
    with pytest.raises(ConfigError, match="unknown key 'architectures'"):
        model_config_from_dict(cfg.to_hf_dict(), "m.toml [model]")


def test_unknown_config_json_keys_are_accepted_and_recorded_as_transformers_does(capsys):
    data = {"model_type": "hgrn_bit", "hidden_size": 64, "my_fork_setting": [1, 2], "hiden_size": 32}
    cfg = model_config_from_dict(data, "c.json", hf=True)
    assert cfg.hidden_size == 64 and dict(cfg.ignored_keys) == {"my_fork_setting": [1, 2], "hiden_size": 32}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'hiden_size'" in err and "did you mean 'hidden_size'" in err
    with pytest.raises(ConfigError, match="unknown key 'my_fork_setting'; valid keys:"):
        model_config_from_dict(data, "m.toml [model]")  # mmf's own configs stay strict


@pytest.mark.parametrize("data,key", [
    ({"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config"),
    ({"model_type": "hgrn_bit", "quantization_config": {"quant_method": "bitnet"}}, "quantization_config"),
    ({"model_type": "llama", "pruned_heads": {"0": [1]}}, "pruned_heads"),
    ({"model_type": "llama", "per_layer_config": {"0": {"intermediate_size": 64}}}, "per_layer_config"),
    ({"model_type": "hgrn_bit", "use_short_conv": True}, "use_short_conv"),
    ({"model_type": "hgrn_bit", "expand_ratio": 2}, "expand_ratio"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_parameters"),
])
@pytest.mark.parametrize("hf", [True, False])
def test_settings_that_change_the_arithmetic_are_refused_in_one_line(data, key, hf):
    with pytest.raises(ConfigError) as e:
        model_config_from_dict(data, "c.json", hf=hf)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"c.json: {key} = {json.dumps(data[key])} is not supported; mmf supports ")


def test_hgrn_bit_values_the_released_code_reads_as_defaults(capsys):
    """A published hgrn_bit config.json: hidden_ratio null is 4 and 4.0 is 4 (the released HGRNBitMLP), and
    hidden_act is never applied there (its forward always computes swiglu): read as swish with a warning. mmf's
    own TOML configs stay strict."""
    base = {"model_type": "hgrn_bit", "hidden_size": 64}
    assert model_config_from_dict({**base, "hidden_ratio": None}, "c.json", hf=True).ffn_size == 256
    assert model_config_from_dict({**base, "hidden_ratio": 4.0}, "c.json", hf=True).hidden_ratio == 4
    cfg = model_config_from_dict({**base, "hidden_act": "gelu"}, "c.json", hf=True)
    err = capsys.readouterr().err
    assert cfg.hidden_act == "swish" and err.count("\n") == 1 and "hidden_act 'gelu' is not used by hgrn_bit" in err
    with pytest.raises(ConfigError, match="hidden_act = \"gelu\" is not supported"):
        model_config_from_dict({**base, "hidden_act": "gelu"}, "m.toml [model]")
    with pytest.raises(ConfigError, match="key 'hidden_ratio' must be int"):
        model_config_from_dict({**base, "hidden_ratio": 4.0}, "m.toml [model]")


def test_default_ffn_width_is_the_released_rule():
    """int(d * ratio * 2/3) rounded up to 256 (truncation first): equal to the ceil form for every preset,
    different where d * ratio * 2/3 lies just above a multiple of 256."""
    from mmf.config import default_intermediate_size

    assert default_intermediate_size(55, 7) == 256  # 256.67: the released code truncates to 256
    for d in (256, 1024, 2048, 2560, 5120):
        assert default_intermediate_size(d) == 256 * math.ceil(d * 4 * 2 / 3 / 256)
    assert default_intermediate_size(1024) == 2816 and default_intermediate_size(2048) == 5632


@pytest.mark.parametrize("change, words", [
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a positive number"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps must be a positive number"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be positive or null, got 0"),
    ({"head_dim": 0}, "head_dim must be positive or null, got 0"),
    ({"rope_theta": 0.0}, "rope_theta must be a positive number"),
    ({"rope_theta": -1.0}, "rope_theta must be a positive number, got -1.0"),
    ({"rope_theta": float("inf")}, "rope_theta must be a positive number, got inf"),
    ({"num_key_value_heads": -1}, "num_key_value_heads must be positive or null, got -1"),
    ({"head_dim": -2}, "head_dim must be positive or null, got -2"),
    ({"intermediate_size": -1}, "intermediate_size must be positive or null, got -1"),
    ({"max_position_embeddings": -5}, "max_position_embeddings must be positive, got -5"),
    ({"attention_dropout": float("nan")}, r"attention_dropout must be a number in \[0, 1\), got nan"),
    ({"attention_dropout": -0.5}, r"attention_dropout must be a number in \[0, 1\), got -0.5"),
])
@pytest.mark.parametrize("hf", [True, False])
def test_nonsense_llama_values_are_refused(change, words, hf):
    with pytest.raises(ConfigError, match=words):
        model_config_from_dict({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, **change},
                               "c.json", hf=hf)


@pytest.mark.parametrize("change, words", [
    ({"max_position_embeddings": -5}, "max_position_embeddings must be positive, got -5"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be positive, got 0"),
    ({"conv_size": -1}, "conv_size must be positive, got -1"),
])
@pytest.mark.parametrize("hf", [True, False])
def test_nonsense_hgrn_bit_values_are_refused(change, words, hf):
    with pytest.raises(ConfigError, match=words + "$"):
        model_config_from_dict({"model_type": "hgrn_bit", "hidden_size": 64, **change}, "c.json", hf=hf)


def test_rope_theta_inside_rope_scaling_is_used_as_transformers_does():
    cfg = model_config_from_dict({"model_type": "llama", "rope_theta": 10000.0,
                                  "rope_scaling": {"rope_type": "default", "rope_theta": 5e5}}, "c.json", hf=True)
    assert cfg.theta == 5e5
    assert model_config_from_dict({"model_type": "llama", "rope_theta": 7e4}, "c.json", hf=True).theta == 7e4


def test_accepted_values_of_checked_settings():
    ok = [
        {"model_type": "hgrn_bit", "quantization_config": {"quant_method": "mmf_ternary", "format": "i2"}},
        {"model_type": "hgrn_bit", "use_short_conv": False, "conv_size": 8, "share_conv_kernel": False},
        {"model_type": "llama", "hidden_act": "swish", "pretraining_tp": 2, "rope_scaling": None,
         "quantization_config": None, "pruned_heads": {}, "per_layer_config": None},
        {"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
    ]
    for data in ok:
        model_config_from_dict(data, "c.json", hf=True)
    assert model_config_from_dict(ok[-1], "c.json", hf=True).theta == 5e5
