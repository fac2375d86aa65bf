"""The training config: presets, TOML files, --set overrides, strict validation, --print-config."""

from __future__ import annotations

import re

import pytest

from mmf.config import LlamaConfig, MMFConfig
from mmf.errors import ConfigError
from mmf.train_config import (build_model_config, config_to_toml, load_train_config, parse_override,
                              preset_names)


def test_every_model_preset_is_a_training_preset():
    for name in preset_names():
        cfg = load_train_config(name)
        m = build_model_config(cfg.model, vocab_size=1000)
        assert isinstance(m, LlamaConfig if name.startswith("transformer++") else MMFConfig)
        assert m.vocab_size == 1000
    assert load_train_config(None).model == {"preset": "tiny"}
    assert load_train_config("mmf-370m").schedule.type == "two_stage"


def test_overrides_are_typed_toml_values():
    assert parse_override("optim.lr=1e-3") == (["optim", "lr"], 1e-3)
    assert parse_override("train.steps=7") == (["train", "steps"], 7)
    assert parse_override("precision.compile=true") == (["precision", "compile"], True)
    assert parse_override("optim.betas=[0.8, 0.9]") == (["optim", "betas"], [0.8, 0.9])
    assert parse_override("schedule.type=two_stage") == (["schedule", "type"], "two_stage")
    assert parse_override('data.paths=["a b.txt"]') == (["data", "paths"], ["a b.txt"])
    cfg = load_train_config("tiny", ["train.steps=7", "optim.lr=1", "model.hidden_size=64"], data=["x.txt"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model == {"preset": "tiny", "hidden_size": 64} and cfg.data.paths == ["x.txt"]
    cfg = load_train_config("tiny", ["model.preset=transformer++-tiny"])
    assert build_model_config(cfg.model, 300).arch == "transformer++"


def test_unknown_keys_and_bad_values_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"unknown key 'lrr'; valid keys: betas, eps, grad_clip, lr, weight_decay"):
        load_train_config("tiny", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="unknown key 'optimizer'"):
        load_train_config("tiny", ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match="key 'steps' must be int"):
        load_train_config("tiny", ["train.steps=1.5"])
    with pytest.raises(ConfigError, match="unknown key 'hidden'"):
        load_train_config("tiny", ["model.hidden=3"])
    with pytest.raises(ConfigError, match="schedule.*two_stage"):
        load_train_config("tiny", ["schedule.type=linear"])
    with pytest.raises(ConfigError, match="unknown config 'huge'"):
        load_train_config("huge")
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        load_train_config("tiny", ["steps"])


def test_toml_file_with_base_preset_and_full_model_table(tmp_path):
    p = tmp_path / "small.toml"
    p.write_text('base = "tiny"\n[model]\narch = "transformer++"\nhidden_size = 64\nnum_hidden_layers = 2\n'
                 'num_attention_heads = 4\n[train]\nsteps = 9\n')
    cfg = load_train_config(str(p))
    assert cfg.name == "small" and cfg.train.steps == 9 and cfg.train.seq_len == 128
    assert build_model_config(cfg.model, 259).num_attention_heads == 4
    p.write_text('[train]\nstepz = 9\n')
    with pytest.raises(ConfigError, match=r"small.toml.*unknown key 'stepz'"):
        load_train_config(str(p))


def test_print_config_round_trips(tmp_path):
    cfg = load_train_config("transformer++-370m", ["optim.lr=2e-4", "data.paths=['a.txt']"])
    p = tmp_path / "c.toml"
    p.write_text(config_to_toml(cfg))
    assert load_train_config(str(p)) == cfg


def test_set_values_toml_cannot_read_get_the_toml_spelling():
    """Issue 16 item 12: `--set optim.lr=.001` was explained as a type error; TOML has no leading-dot floats."""
    for raw, fixed in ((".001", "0.001"), ("1.", "1.0"), ("-.5", "-0.5"), ("[.9, .95]", "[0.9, 0.95]")):
        key = "optim.betas" if raw.startswith("[") else "optim.lr"
        with pytest.raises(ConfigError, match="decimal point; write " + re.escape(f"{key}={fixed}") + "$"):
            load_train_config("tiny", [f"{key}={raw}"])
    cfg = load_train_config("tiny", ["optim.lr=1e-3", "schedule.type=two_stage", "data.cache_dir=./a.b"])
    assert cfg.optim.lr == 0.001 and cfg.schedule.type == "two_stage" and cfg.data.cache_dir == "./a.b"
    assert load_train_config("tiny", ["optim.lr=0.001"]).optim.lr == 0.001
