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


@pytest.mark.parametrize("override, words", [
    ("optim.eps=-1.0", "[optim]: eps must be a finite number > 0, got -1.0"),
    ("optim.eps=0.0", "[optim]: eps must be a finite number > 0, got 0.0"),
    ("optim.eps=nan", "[optim]: eps must be a finite number > 0, got nan"),
    ("optim.lr=inf", "[optim]: lr must be a finite number > 0, got inf"),
    ("optim.lr=nan", "[optim]: lr must be a finite number > 0, got nan"),
    ("optim.weight_decay=nan", "[optim]: weight_decay must be a finite number >= 0, got nan"),
    ("optim.weight_decay=-0.1", "[optim]: weight_decay must be a finite number >= 0, got -0.1"),
    ("optim.grad_clip=nan", "[optim]: grad_clip must be a finite number > 0, or 0 for no clipping, got nan"),
    ("optim.grad_clip=inf", "[optim]: grad_clip must be a finite number > 0, or 0 for no clipping, got inf"),
    ("optim.betas=[nan, 0.9]", "[optim]: betas must be two numbers in [0, 1)"),
    ("schedule.stage2_weight_decay=-5.0", "[schedule]: stage2_weight_decay must be a finite number >= 0, got -5.0"),
    ("schedule.stage2_weight_decay=nan", "[schedule]: stage2_weight_decay must be a finite number >= 0, got nan"),
    ("schedule.min_lr_ratio=nan", "[schedule]: need warmup_steps >= 0, 0 <= min_lr_ratio <= 1"),
    ("train.seed=-1", "[train]: seed must be in [0, 2**63), got -1"),
    ("train.seed=99999999999999999999", "[train]: seed must be in [0, 2**63), got 99999999999999999999"),
    ("train.seed=9223372036854775808", "[train]: seed must be in [0, 2**63), got 9223372036854775808"),
    ("data.builtin_seed=-1", "[data]: builtin_seed must be in [0, 2**63), got -1"),
    ("data.val_fraction=nan", "[data]: val_fraction must be in (0, 0.5), got nan"),
    ("tokenizer.min_frequency=-3", "[tokenizer]: min_frequency must be >= 0, got -3"),
    ("model.max_position_embeddings=-5", "[model]: max_position_embeddings must be positive, got -5"),
    ("model.use_cache=true", "[model]: unknown key 'use_cache'; valid keys: "),
    ("model.initializer_range=0.5", "[model]: unknown key 'initializer_range'; valid keys: "),
])
def test_out_of_range_numbers_are_one_line_errors(override, words):
    with pytest.raises(ConfigError) as e:
        load_train_config("tiny", [override])
    assert "\n" not in str(e.value) and str(e.value).startswith("preset tiny (with --set) " + words)


@pytest.mark.parametrize("override, words", [
    ("model.head_dim=-2", "head_dim must be positive or null, got -2"),
    ("model.num_key_value_heads=-1", "num_key_value_heads must be positive or null, got -1"),
    ("model.rope_theta=-1.0", "rope_theta must be a positive number, got -1.0"),
    ("model.max_position_embeddings=-5", "max_position_embeddings must be positive, got -5"),
    ("model.attention_dropout=0.1", "attention_dropout = 0.1 is not supported; mmf applies no dropout (0.0)"),
    ("model.dtype='bf16'", "unknown key 'dtype'; valid keys: "),
])
def test_out_of_range_transformer_pp_values_are_one_line_errors(tmp_path, override, words):
    p = tmp_path / "t.toml"
    p.write_text('base = "transformer++-tiny"\n[model]\nhidden_size = 64\n')
    with pytest.raises(ConfigError) as e:
        load_train_config(str(p), [override])
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{p} (with --set) [model]: {words}")
    assert build_model_config(load_train_config(str(p), ["model.attention_dropout=0.0"]).model, 259).hidden_size == 64


def test_edge_values_that_stay_accepted():
    cfg = load_train_config("tiny", ["optim.grad_clip=0.0", "optim.weight_decay=0.0", "train.seed=9223372036854775807",
                                     "tokenizer.min_frequency=0", "schedule.stage2_weight_decay=0.0"])
    assert cfg.optim.grad_clip == 0.0 and cfg.train.seed == 2**63 - 1 and cfg.tokenizer.min_frequency == 0


def test_inert_config_json_keys_in_a_toml_model_table_are_unknown_keys(tmp_path):
    p = tmp_path / "inert.toml"
    p.write_text('base = "tiny"\n[model]\nhidden_size = 32\ndtype = "bf16"\ninitializer_range = 0.5\n'
                 'temperature = 0.1\n')
    with pytest.raises(ConfigError, match=r"inert.toml \[model\]: unknown key 'dtype'; valid keys: .*hidden_size"):
        load_train_config(str(p))


@pytest.mark.parametrize("spec", ["tiny", "file"])
def test_set_base_is_refused_with_the_way_to_change_the_preset(tmp_path, spec):
    """`--set base=PRESET` came after the preset was merged and so changed nothing but the printed name."""
    if spec == "file":
        spec = str(tmp_path / "base.toml")
        (tmp_path / "base.toml").write_text('base = "tiny"\n[model]\nhidden_size = 32\n')
    with pytest.raises(ConfigError) as e:
        load_train_config(spec, ["base=transformer++-tiny"])
    assert str(e.value) == ("--set 'base=transformer++-tiny': base, the preset a config starts from, cannot be changed "
                            'by --set; give the preset with -c/--config PRESET, or base = "PRESET" in the TOML file')
    (tmp_path / "b.toml").write_text('base = "transformer++-tiny"\n[model]\nhidden_size = 32\n')
    cfg = load_train_config(str(tmp_path / "b.toml"))
    assert cfg.base == "transformer++-tiny" and build_model_config(cfg.model, 259).arch == "transformer++"


@pytest.mark.parametrize("text", ["a\nb", "tab\there", "cr\r\nlf", "\b\f", "nul\x00 unit\x1f del\x7f",
                                  'quote " and back\\slash \\n', "ünïcödé ✓ \u2028", ""])
def test_strings_with_control_characters_round_trip(tmp_path, text):
    cfg = load_train_config("tiny", ["train.steps=7"])
    cfg.name = text
    cfg.data.text_field = text
    cfg.data.paths = [text, "x.txt"]
    p = tmp_path / "c.toml"
    p.write_text(config_to_toml(cfg), encoding="utf-8")
    back = load_train_config(str(p))
    assert back == cfg and back.name == text and back.data.paths == [text, "x.txt"]


def test_set_string_with_a_control_character_writes_readable_toml(tmp_path):
    cfg = load_train_config("tiny", ['name="a\\nb"'])
    assert cfg.name == "a\nb"
    p = tmp_path / "train_config.toml"
    p.write_text(config_to_toml(cfg))
    assert 'name = "a\\nb"\n' in p.read_text() and load_train_config(str(p)) == cfg


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_written_as_toml_reads_back_strictly(tmp_path, preset):
    cfg = load_train_config(preset)
    p = tmp_path / "train_config.toml"
    p.write_text(config_to_toml(cfg))
    assert load_train_config(str(p)) == cfg


def test_every_key_the_readme_documents_loads(tmp_path):
    """The tables and keys README "mmf train" lists, all in one file."""
    p = tmp_path / "readme.toml"
    p.write_text('base = "tiny"\nname = "r"\n'
                 '[model]\npreset = "transformer++-tiny"\nhidden_size = 64\n'
                 '[data]\npaths = ["a.txt"]\nval_fraction = 0.05\ntext_field = "body"\n'
                 '[tokenizer]\ntype = "bpe"\nvocab_size = 512\n'
                 '[optim]\nlr = 1e-3\nbetas = [0.9, 0.95]\nweight_decay = 0.1\ngrad_clip = 1.0\n'
                 '[schedule]\ntype = "two_stage"\nstage2_lr_ratio = 0.5\n'
                 '[train]\nsteps = 9\nbatch_size = 8\ngrad_accum = 2\nseq_len = 64\nseed = 3\n'
                 '[precision]\ndtype = "auto"\ncompile = true\n'
                 '[checkpoint]\nevery = 5\nkeep = 1\n'
                 '[logging]\nevery = 1\neval_every = 3\neval_tokens = 1024\n'
                 '[distributed]\nstrategy = "fsdp"\n')
    cfg = load_train_config(str(p), ["optim.betas=[0.9,0.95]", "schedule.type=two_stage", "optim.lr=1e-3"])
    assert (cfg.data.text_field, cfg.tokenizer.vocab_size, cfg.train.seed) == ("body", 512, 3)
    assert cfg.schedule.type == "two_stage" and cfg.distributed.strategy == "fsdp" and cfg.precision.compile
    assert build_model_config(cfg.model, 512).hidden_size == 64
    assert load_train_config(str(p), ["tokenizer.type=file", "tokenizer.path=t.json"]).tokenizer.path == "t.json"
    p.write_text('[model]\narch = "mmf"\nhidden_size = 64\nnum_hidden_layers = 2\n')
    assert build_model_config(load_train_config(str(p)).model, 300).arch == "mmf"
