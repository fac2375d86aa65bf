"""Checkpoints: round trips, sharding, and the published hgrn_bit and llama layouts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mmf
from mmf.checkpoint import save_checkpoint
from mmf.info import checkpoint_info
from mmf.checkpoint_layout import INDEX_FILE
from mmf.errors import CheckpointError, ConfigError

from conftest import median_rel_err, small_model
from hgrn_bit_original import hgrn_bit_logits

# The config.json of a published MMfreeLM model, shrunk (same keys, Hugging Face bookkeeping included).
PUBLISHED_HGRN_BIT_CONFIG = {
    "_name_or_path": "ridger/MMfreeLM-370M", "architectures": ["HGRNBitForCausalLM"], "attn_mode": "fused_recurrent",
    "bos_token_id": 1, "conv_size": 4, "eos_token_id": 2, "expand_ratio": 1, "fuse_cross_entropy": True,
    "hidden_act": "swish", "hidden_ratio": 4, "hidden_size": 64, "initializer_range": 0.02,
    "intermediate_size": None, "max_position_embeddings": 2048, "model_type": "hgrn_bit", "num_heads": 1,
    "num_hidden_layers": 3, "rms_norm_eps": 1e-06, "share_conv_kernel": True, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.40.1", "use_cache": True, "use_lower_bound": True,
    "use_short_conv": False, "vocab_size": 300,
}


def published_hgrn_bit_dir(tmp_path, dtype):
    """A directory in the published layout, written without mmf's own saver."""
    cfg = PUBLISHED_HGRN_BIT_CONFIG
    d, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    m = 256  # 256 * ceil(64 * 4 * 2/3 / 256)
    g = torch.Generator().manual_seed(11)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm(n):
        return (1 + 0.3 * torch.randn(n, generator=g)).to(dtype)

    sd = {"model.embeddings.weight": rnd(V, d, std=1.0), "model.lower_bounds": rnd(L, d, std=1.0),
          "model.norm.weight": norm(d), "lm_head.weight": rnd(V, d), "lm_head.norm.weight": norm(d)}
    for l in range(L):
        p = f"model.layers.{l}."
        sd[p + "attn_norm.weight"] = norm(d)
        sd[p + "mlp_norm.weight"] = norm(d)
        for proj in "ifgo":
            sd[p + f"attn.{proj}_proj.weight"] = rnd(d, d)
            sd[p + f"attn.{proj}_proj.norm.weight"] = norm(d)
        sd[p + "attn.g_norm.weight"] = norm(d)
        sd[p + "mlp.gate_proj.weight"] = rnd(2 * m, d)
        sd[p + "mlp.gate_proj.norm.weight"] = norm(d)
        sd[p + "mlp.down_proj.weight"] = rnd(d, m)
        sd[p + "mlp.down_proj.norm.weight"] = norm(m)
    path = tmp_path / f"mmfreelm-{str(dtype)[6:]}"
    path.mkdir()
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg))
    return path, sd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_published_hgrn_bit_directory_gives_original_logits(tmp_path, dtype):
    path, sd = published_hgrn_bit_dir(tmp_path, dtype)
    model = mmf.load_model(path)  # computes in fp32
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        ours = model(ids).logits
        original = hgrn_bit_logits(sd, PUBLISHED_HGRN_BIT_CONFIG, ids)
    assert model.config.ffn_size == 256
    assert median_rel_err(ours, original) < 1e-3
    # and the frozen (int8 codes) inference form too
    with torch.no_grad():
        frozen = mmf.load_model(path, frozen=True)(ids).logits
    assert median_rel_err(frozen, original) < 1e-3


def test_hugging_face_llama_directory_gives_transformers_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(12)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "llama")
    model = mmf.load_model(tmp_path / "llama")
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert median_rel_err(model(ids).logits, hf(ids).logits) < 1e-5
        # the KV-cache continuation matches Hugging Face too
        a = model(ids[:, :10])
        b = model(ids[:, 10:], a.cache)
        assert median_rel_err(torch.cat([a.logits, b.logits], 1), hf(ids).logits) < 1e-5
    # and it moves back: mmf's saved directory loads in transformers with the same logits
    mmf.save_checkpoint(model, tmp_path / "llama-mmf")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama-mmf").eval()
    with torch.no_grad():
        assert median_rel_err(back(ids).logits, hf(ids).logits) < 1e-6


@pytest.mark.parametrize("arch", ["mmf", "transformer++"])
def test_save_load_round_trip_is_bit_exact(tmp_path, arch):
    model = small_model(arch, seed=13)
    save_checkpoint(model, tmp_path / "c", tokenizer=mmf.ByteTokenizer())
    loaded = mmf.load_model(tmp_path / "c")
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    ids = torch.randint(0, 259, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_sharded_checkpoint_round_trip(tmp_path):
    model = small_model("mmf", seed=14)
    save_checkpoint(model, tmp_path / "c", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "c" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded = mmf.load_model(tmp_path / "c")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_tied_embeddings_stored_once(tmp_path):
    model = small_model("transformer++", seed=15, tie_word_embeddings=True)
    save_checkpoint(model, tmp_path / "c")
    keys = load_file(str(tmp_path / "c" / "model.safetensors")).keys()
    assert "lm_head.weight" not in keys
    loaded = mmf.load_model(tmp_path / "c")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_save_refuses_to_overwrite_and_leaves_no_temporary(tmp_path):
    model = small_model("mmf")
    save_checkpoint(model, tmp_path / "c")
    with pytest.raises(mmf.MMFError, match="already exists"):
        save_checkpoint(model, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_load_errors_name_the_problem(tmp_path, tiny_mmf_ckpt):
    import shutil

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        mmf.load_model(tmp_path / "missing")
    bad = tmp_path / "truncated"
    shutil.copytree(tiny_mmf_ckpt, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        mmf.load_model(bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        mmf.load_model(bad)
    shape = tmp_path / "shape"
    shutil.copytree(tiny_mmf_ckpt, shape)
    cfg = json.loads((shape / "config.json").read_text())
    cfg["hidden_size"] = 32
    (shape / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape"):
        mmf.load_model(shape)
    cfg["hidden_size"] = 64
    cfg["use_short_conv"] = True
    (shape / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="use_short_conv = true is not supported; mmf supports false"):
        mmf.load_model(shape)


# --- config.json as transformers writes it in full (issue 16 item 2) -------------------------------------------

def _original_hgrn_bit_config_class(transformers):
    """HGRNBitConfig as the released code defines it (ridger/MMfreeLM, fla/models/hgrn_bit), on transformers."""

    class HGRNBitConfig(transformers.PretrainedConfig):
        model_type = "hgrn_bit"
        keys_to_ignore_at_inference = ["past_key_values"]

        def __init__(self, vocab_size=32000, hidden_size=2048, num_hidden_layers=24, attn_mode="fused_recurrent",
                     num_heads=1, expand_ratio=1, use_short_conv=False, conv_size=4, share_conv_kernel=True,
                     use_lower_bound=True, hidden_ratio=4, intermediate_size=None, hidden_act="swish",
                     max_position_embeddings=2048, rms_norm_eps=1e-6, use_cache=True, pad_token_id=None,
                     bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.02,
                     fuse_cross_entropy=True, **kwargs):
            self.vocab_size = vocab_size
            self.max_position_embeddings = max_position_embeddings
            self.hidden_size = hidden_size
            self.num_hidden_layers = num_hidden_layers
            self.attn_mode = attn_mode
            self.num_heads = num_heads
            self.expand_ratio = expand_ratio
            self.use_short_conv = use_short_conv
            self.conv_size = conv_size
            self.share_conv_kernel = share_conv_kernel
            self.use_lower_bound = use_lower_bound
            self.hidden_ratio = hidden_ratio
            self.intermediate_size = intermediate_size
            self.hidden_act = hidden_act
            self.rms_norm_eps = rms_norm_eps
            self.use_cache = use_cache
            self.initializer_range = initializer_range
            self.fuse_cross_entropy = fuse_cross_entropy
            super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                             tie_word_embeddings=tie_word_embeddings, **kwargs)

    return HGRNBitConfig


@pytest.mark.parametrize("arch", ["mmf", "transformer++"])
def test_full_transformers_config_json_loads_with_identical_logits(tmp_path, arch):
    """transformers' full config.json (4.x generic keys merged in, 5.x written by the installed version) beside
    mmf's own weights: `mmf info/generate/pack` read it, and the logits are bit-identical."""
    transformers = pytest.importorskip("transformers")
    from test_config import TRANSFORMERS_4_GENERIC

    from mmf.info import checkpoint_info

    model = small_model(arch, seed=21)
    save_checkpoint(model, tmp_path / "mmf", tokenizer=mmf.ByteTokenizer())
    c = model.config
    if arch == "mmf":
        hf_cfg = _original_hgrn_bit_config_class(transformers)(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
            intermediate_size=c.intermediate_size, rms_norm_eps=c.rms_norm_eps, architectures=["HGRNBitForCausalLM"])
    else:
        hf_cfg = transformers.LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
            intermediate_size=c.intermediate_size, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
            max_position_embeddings=c.max_position_embeddings, architectures=["LlamaForCausalLM"])
    full = tmp_path / "full"
    shutil.copytree(tmp_path / "mmf", full)
    hf_cfg.to_json_file(str(full / "config.json"), use_diff=False)
    written = json.loads((full / "config.json").read_text())
    assert "chunk_size_feed_forward" in written and "id2label" in written  # what used to be refused
    (full / "config.json").write_text(json.dumps({**TRANSFORMERS_4_GENERIC, **written}, indent=2))

    loaded = mmf.load_model(full)
    if arch == "mmf":
        assert loaded.config == model.config
    else:  # 5.x spells out head_dim and rope_parameters; same values
        assert (loaded.config.dim_head, loaded.config.theta) == (c.dim_head, c.theta)
    ids = torch.randint(0, c.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert checkpoint_info(full)["hidden_size"] == c.hidden_size
    if arch == "mmf":
        from mmf.converters.packing import pack_checkpoint

        pack_checkpoint(full, tmp_path / "packed")
        assert mmf.load_model(tmp_path / "packed").config == model.config


def test_published_hgrn_bit_full_config_gives_original_logits(tmp_path):
    """The released code's config written in full by transformers, with the original forward as reference."""
    transformers = pytest.importorskip("transformers")
    path, sd = published_hgrn_bit_dir(tmp_path, torch.float32)
    kwargs = {k: v for k, v in PUBLISHED_HGRN_BIT_CONFIG.items() if k not in ("model_type", "transformers_version")}
    _original_hgrn_bit_config_class(transformers)(**kwargs).to_json_file(str(path / "config.json"), use_diff=False)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        ours = mmf.load_model(path)(ids).logits
        original = hgrn_bit_logits(sd, PUBLISHED_HGRN_BIT_CONFIG, ids)
    assert median_rel_err(ours, original) < 1e-3


# --- silent damage (issue 16 item 10) ---------------------------------------------------------------------------

def _damaged_copy(src, dst, name, value):
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    sd = load_file(str(f))
    sd[name] = sd[name].clone()
    sd[name].view(-1)[3] = value
    save_file(sd, str(f), metadata=meta)
    return dst


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_weights_are_refused_at_load(tmp_path, tiny_mmf_ckpt, tiny_llama_ckpt, value):
    from mmf.generate import generate_text

    for ck, name in ((tiny_mmf_ckpt, "model.layers.1.attn.f_proj.weight"), (tiny_llama_ckpt, "model.norm.weight")):
        bad = _damaged_copy(ck, tmp_path / f"bad-{ck.name}", name, value)
        with pytest.raises(CheckpointError, match=f"tensor '{name}' holds 1 NaN or inf values .*earlier checkpoint"):
            mmf.load_model(bad)
        with pytest.raises(CheckpointError, match=f"tensor '{name}'"):  # generate and eval load through it
            generate_text(bad, "hi", max_new_tokens=2)


def test_nan_in_a_packed_checkpoint_is_refused_at_load(tmp_path, tiny_mmf_ckpt):
    from mmf.converters.packing import pack_checkpoint

    pack_checkpoint(tiny_mmf_ckpt, tmp_path / "packed")
    bad = _damaged_copy(tmp_path / "packed", tmp_path / "bad", "model.norm.weight", float("nan"))
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' holds 1 NaN"):
        mmf.load_model(bad)


def test_values_that_overflow_the_load_dtype_are_refused_with_the_fix(tmp_path, tiny_llama_ckpt):
    big = _damaged_copy(tiny_llama_ckpt, tmp_path / "big", "model.norm.weight", 1e6)
    assert torch.isfinite(mmf.load_model(big).model.norm.weight).all()  # fine in fp32 and bf16
    mmf.load_model(big, dtype="bf16")
    with pytest.raises(CheckpointError, match="beyond the range of float16 .*--dtype fp32 or bf16"):
        mmf.load_model(big, dtype="fp16")


def _wordlevel_tokenizer(n: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, tiny_mmf_ckpt):
    from mmf.evaluate import evaluate_checkpoint
    from mmf.generate import generate_text

    ck = tmp_path / "ck"
    shutil.copytree(tiny_mmf_ckpt, ck)
    (ck / "mmf_tokenizer.json").unlink()
    data = tmp_path / "d.txt"
    data.write_text("w1 w2 w3 w4 " * 20)
    _wordlevel_tokenizer(300).save(str(ck / "tokenizer.json"))  # ids up to 299, model vocab 259
    msg = "tokenizer vocab 300 > model vocab_size 259: .*own tokenizer.json"
    with pytest.raises(CheckpointError, match=msg):
        generate_text(ck, "w1 w2", max_new_tokens=2)  # although this prompt's ids would fit
    with pytest.raises(CheckpointError, match=msg):
        evaluate_checkpoint(ck, [str(data)], seq_len=8)
    _wordlevel_tokenizer(259).save(str(ck / "tokenizer.json"))  # as large as the model: fine
    assert isinstance(generate_text(ck, "w1 w2", max_new_tokens=2, temperature=0), str)
    assert evaluate_checkpoint(ck, [str(data)], seq_len=8)["tokens"] > 0


def test_outputs_without_a_tokenizer_warn_at_write_and_are_refused_with_the_fix(tmp_path, tiny_mmf_ckpt, capfd):
    from mmf.converters.onnx_export import export_onnx
    from mmf.converters.packing import pack_checkpoint
    from mmf.evaluate import evaluate_checkpoint
    from mmf.generate import generate_text

    bare = tmp_path / "bare"
    shutil.copytree(tiny_mmf_ckpt, bare)
    (bare / "mmf_tokenizer.json").unlink()
    pack_checkpoint(bare, tmp_path / "packed")
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "warning:" in err and f"so {tmp_path / 'packed'} has none" in err
    assert "copy the model's tokenizer.json into" in err
    export_onnx(bare, tmp_path / "onnx", check=False)
    assert f"so {tmp_path / 'onnx'} has none" in capfd.readouterr().err
    data = tmp_path / "d.txt"
    data.write_text("hello " * 10)
    for run in (lambda: generate_text(tmp_path / "packed", "hi", max_new_tokens=2),
                lambda: evaluate_checkpoint(tmp_path / "packed", [str(data)])):
        with pytest.raises(CheckpointError, match="no tokenizer found .*copy the model's tokenizer.json"):
            run()
    # with a tokenizer nothing is said
    pack_checkpoint(tiny_mmf_ckpt, tmp_path / "packed2")
    assert capfd.readouterr().err == ""


def test_load_model_serves_large_allocations_from_mmap(tiny_mmf_ckpt):
    """load_model fixes glibc's mmap threshold (a packed 13b load peaked at 6.5 GB of RSS with the moving
    threshold, 4.5 GB with it fixed): after a load the setting has been applied, where the C library is glibc."""
    import platform

    from mmf import checkpoint

    mmf.load_model(tiny_mmf_ckpt)
    assert len(checkpoint._MMAP_THRESHOLD_SET) == 1
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert checkpoint._MMAP_THRESHOLD_SET == [True] and checkpoint.map_large_allocations()


# --- Hugging Face directories as transformers reads them (found by trying published layouts) -------------------

def _rename_tensor(directory, old, new):
    sd = load_file(str(directory / "model.safetensors"))
    sd[new] = sd.pop(old)
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("arch, emb", [("transformer++", "model.embed_tokens.weight"),
                                       ("mmf", "model.embeddings.weight")])
def test_tied_weights_stored_under_the_head_name_load(tmp_path, arch, emb):
    """``safetensors.torch.save_model`` keeps a tied pair under the name that sorts first, ``lm_head.weight``:
    transformers loads that, so does mmf."""
    model = small_model(arch, seed=16, tie_word_embeddings=True)
    save_checkpoint(model, tmp_path / "c")
    _rename_tensor(tmp_path / "c", emb, "lm_head.weight")
    loaded = mmf.load_model(tmp_path / "c")
    ids = torch.randint(0, 259, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    _rename_tensor(tmp_path / "c", "lm_head.weight", "model.other.weight")
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.other.weight'"):
        mmf.load_model(tmp_path / "c")


def test_model_safetensors_is_read_before_an_index(tmp_path):
    """A directory holding both ``model.safetensors`` and an index gives the single file's weights, as
    transformers reads it."""
    sharded, single = small_model("mmf", seed=17), small_model("mmf", seed=18)
    save_checkpoint(sharded, tmp_path / "c", max_shard_bytes=60_000)
    save_checkpoint(single, tmp_path / "one")
    shutil.copy(tmp_path / "one" / "model.safetensors", tmp_path / "c" / "model.safetensors")
    assert (tmp_path / "c" / INDEX_FILE).exists()
    loaded = mmf.load_model(tmp_path / "c")
    assert all(torch.equal(a, b) for a, b in zip(single.state_dict().values(), loaded.state_dict().values()))


def test_bad_index_config_and_sizes_are_one_line_errors(tmp_path):
    model = small_model("transformer++", seed=19)
    save_checkpoint(model, tmp_path / "c", max_shard_bytes=60_000)
    index_path = tmp_path / "c" / INDEX_FILE
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    for weight_map, words in ((list(index["weight_map"].values()), "not a valid safetensors index"),
                              ({**index["weight_map"], "lm_head.weight": 1}, "not a valid safetensors index"),
                              ({**index["weight_map"], "lm_head.weight": "/etc/passwd"}, "must be a plain file name"),
                              ({**index["weight_map"], "model.embed_tokens.weight": shards[-1]}, "is not in this shard")):
        index_path.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=words):
            mmf.load_model(tmp_path / "c")
        with pytest.raises(CheckpointError, match=words):
            checkpoint_info(tmp_path / "c")
    index_path.write_text(json.dumps(index))
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "c" / "config.json").write_text(json.dumps({**cfg, "vocab_size": 10**9}))
    with pytest.raises(CheckpointError, match=r"'model.embed_tokens.weight' has shape \(259, 64\) but config.json "
                                              r"implies \(1000000000, 64\)"):
        mmf.load_model(tmp_path / "c")  # from the headers: nothing of 256 GB is allocated
    (tmp_path / "c" / "config.json").unlink()
    (tmp_path / "c" / "config.json").mkdir()
    with pytest.raises(ConfigError, match="config.json: is a directory"):
        mmf.load_model(tmp_path / "c")
