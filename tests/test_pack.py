"""`mmf pack` / `unpack` / `inspect` and the packed-model loader: exactness, round trips, bad input."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch

import mmf
from conftest import median_rel_err, small_model
from mmf import packed_format
from mmf.checkpoint import is_packed, load_model, load_packed_model
from mmf.converters import packing, ternary_quantization
from mmf.converters.packing import inspect_checkpoint, pack_checkpoint, unpack_checkpoint
from mmf.converters.ternary_quantization import dequantize_exact, quantize_pack
from mmf.packed_format import FORMAT_KEY, TENSOR_KEY_PREFIX, VERSION_KEY
from mmf.safetensors_io import SafetensorsReader, read_header
from mmf.ternary_codes import pack_i2, pack_tq1, packed_row_bytes
from mmf.errors import CheckpointError, MMFError
from mmf.kernels.reference import weight_quant
from mmf.models.hgrn_bit import FrozenBitLinear

# K = 30 and m = 43 are not multiples of 4 or 5: every row of some tensors is padded in both formats
ODD = dict(vocab_size=67, hidden_size=30, num_hidden_layers=2, intermediate_size=43)


def cli(capsys, *args):
    """Run the `mmf` entry point in-process; returns (exit code, stdout, stderr)."""
    from mmf.cli.main import main

    old = sys.argv
    sys.argv = ["mmf", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def odd_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("pack") / "odd"
    mmf.save_checkpoint(small_model("mmf", seed=3, **ODD), path, tokenizer=mmf.ByteTokenizer(), dtype=torch.float16)
    return path


@pytest.fixture(scope="module")
def packed_i2(odd_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "i2"
    summary = pack_checkpoint(odd_ckpt, out, fmt="i2", keep_dtype="fp32", verify=True, max_shard_bytes=4000)
    return out, summary


def ids_for(cfg, seed=0, shape=(2, 12)):
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 8), (9, 31), (64, 130)])
def test_quantize_pack_is_weight_quant_then_pack(dtype, shape):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])) * 0.02).to(dtype)
    codes, s_w = weight_quant(w)
    for fmt, ref in (("i2", pack_i2), ("tq1", pack_tq1)):
        packed, scale, counts = quantize_pack(w, fmt)
        assert torch.equal(packed, ref(codes)) and torch.equal(scale, s_w)
        assert counts == tuple(int((codes == v).sum()) for v in (-1, 0, 1))


def test_quantize_pack_rejects_nan_and_inf():
    w = torch.randn(4, 8)
    w[2, 3] = float("nan")
    with pytest.raises(CheckpointError, match="blk.w.*NaN or inf"):
        quantize_pack(w, "i2", name="blk.w")
    w[2, 3] = float("inf")
    with pytest.raises(CheckpointError, match="NaN or inf"):
        quantize_pack(w.half(), "tq1")


def test_pack_verify_bit_identical_and_layout(odd_ckpt, packed_i2):
    out, summary = packed_i2
    assert summary["verify"]["bit_identical"] and summary["verify"]["median_rel_error"] == 0.0
    assert len(summary["files"]) > 1 and (out / "model.safetensors.index.json").exists()
    assert (out / "mmf_tokenizer.json").exists() and is_packed(out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "i2"
    metas = [read_header(out / f)[1] for f in summary["files"]]
    assert all(m[FORMAT_KEY] == "i2" and m[VERSION_KEY] == "1" for m in metas)
    entry = json.loads(next(m for m in metas if TENSOR_KEY_PREFIX + "lm_head.weight" in m)[
        TENSOR_KEY_PREFIX + "lm_head.weight"])
    assert entry["shape"] == [67, 30] and entry["format"] == "i2" and sum(entry["counts"]) == 67 * 30


def test_packed_model_is_frozen_i2_and_matches_freeze(odd_ckpt, packed_i2):
    out, _ = packed_i2
    model = mmf.load_model(out)
    ref = load_model(odd_ckpt, frozen=True)
    frozen = [m for m in model.modules() if isinstance(m, FrozenBitLinear)]
    assert len(frozen) == 2 * 6 + 1 and model.is_frozen and not model.training
    for m in frozen:
        assert m.codes is None and "packed" in dict(m.named_buffers()) and m.packed.dtype == torch.uint8
        assert m.weight_scale.dtype == torch.float32 and m.packed.shape[1] == math.ceil(m.in_features / 4)
    assert not any(p.requires_grad for p in model.parameters())
    ids = ids_for(model.config)
    assert torch.equal(model(ids).logits, ref(ids).logits)
    # the model is the same when loaded in bf16 (norms/embeddings cast, scales stay fp32)
    bf = mmf.load_model(out, dtype=torch.bfloat16)
    assert bf.lm_head.weight_scale.dtype == torch.float32 and bf.model.embeddings.weight.dtype == torch.bfloat16


def test_tq1_loads_to_the_same_model(odd_ckpt, packed_i2, tmp_path):
    out = tmp_path / "tq1"
    pack_checkpoint(odd_ckpt, out, fmt="tq1", keep_dtype="fp32")
    a, b = mmf.load_model(out), mmf.load_model(packed_i2[0])
    ids = ids_for(a.config, 1)
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert torch.equal(a.lm_head.packed, b.lm_head.packed)
    info = inspect_checkpoint(out)
    assert info["format"] == "tq1" and info["totals"]["bits_per_ternary_weight"] < 1.8


def test_unpack_load_and_repack_are_exact(packed_i2, tmp_path):
    out, _ = packed_i2
    flat = tmp_path / "unpacked"
    unpack_checkpoint(out, flat)
    assert not is_packed(flat) and "quantization_config" not in json.loads((flat / "config.json").read_text())
    packed_model = mmf.load_model(out)
    ids = ids_for(packed_model.config, 2)
    want = packed_model(ids).logits
    # a loader that quantises once (frozen) gets exactly the packed model
    assert torch.equal(load_model(flat, frozen=True)(ids).logits, want)
    # the training form (fake quantisation in float) is the same model up to summation order
    assert median_rel_err(load_model(flat)(ids).logits, want) < 1e-5
    # pack -> unpack -> pack: the same codes and scales, bit for bit
    again = tmp_path / "repacked"
    pack_checkpoint(flat, again, fmt="i2", keep_dtype="fp32", max_shard_bytes=4000)
    first, second = _packed_tensors(out), _packed_tensors(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _packed_tensors(path):
    files, heads, _ = packed_format.packed_files(path)
    tensors = {}
    for p in set(files.values()):
        with SafetensorsReader(p) as r:
            for k in r.keys():
                tensors[k] = r.read(k)
    return tensors


def test_naive_dequantisation_has_the_scale_hazard_and_ours_does_not():
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(5)) * 0.05
    codes, s_w = weight_quant(w)
    naive_codes, naive_scale = weight_quant(codes.float() / s_w)
    assert torch.equal(naive_codes, codes) and not torch.isclose(naive_scale, s_w, rtol=0.05)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        c2, s2 = weight_quant(dequantize_exact(codes, s_w, dtype))
        assert torch.equal(c2, codes) and torch.equal(s2, s_w)


def test_tied_embeddings_pack_and_unpack(tmp_path):
    src = tmp_path / "tied"
    mmf.save_checkpoint(small_model("mmf", seed=1, tie_word_embeddings=True, **ODD), src)
    out = tmp_path / "tied-packed"
    summary = pack_checkpoint(src, out, keep_dtype="fp32", verify=True)
    assert summary["verify"]["bit_identical"]
    flat = tmp_path / "tied-flat"
    unpack_checkpoint(out, flat)
    assert json.loads((flat / "config.json").read_text())["tie_word_embeddings"] is False
    ids = ids_for(load_model(src).config, 3)
    assert torch.equal(load_model(flat, frozen=True)(ids).logits, mmf.load_model(out)(ids).logits)


def test_cli_pack_inspect_unpack_generate(capsys, tiny_mmf_ckpt, tmp_path):
    out = tmp_path / "p"
    code, stdout, err = cli(capsys, "pack", tiny_mmf_ckpt, "--out", out, "--format", "tq1", "--verify", "--json")
    assert code == 0, err
    assert json.loads(stdout)["verify"]["bit_identical"] is True
    code, stdout, err = cli(capsys, "pack", tiny_mmf_ckpt, "--out", out)
    assert code == 2 and "already exists" in err and "--force" in err and len(err.strip().splitlines()) == 1
    code, stdout, err = cli(capsys, "pack", tiny_mmf_ckpt, "--out", out, "--force", "--keep-dtype", "bf16")
    assert code == 0, err
    code, stdout, _ = cli(capsys, "inspect", out, "--json")
    data = json.loads(stdout)
    assert data["packed"] and data["format"] == "i2" and data["totals"]["compression_vs_fp16"] > 3
    rows = {t["name"]: t for t in data["tensors"]}
    lm = rows["lm_head.weight"]
    assert lm["stored"] == "i2" and abs(lm["share_-1"] + lm["share_0"] + lm["share_+1"] - 1) < 1e-9
    assert rows["model.embeddings.weight"]["stored"] == "BF16"
    code, stdout, _ = cli(capsys, "inspect", tiny_mmf_ckpt)  # float checkpoint: shares computed by quantising
    assert code == 0 and "lm_head.weight" in stdout and "compression vs fp16" in stdout
    code, stdout, err = cli(capsys, "unpack", out, "--out", tmp_path / "u")
    assert code == 0, err
    code, stdout, err = cli(capsys, "generate", out, "-p", "The cat", "-n", "8", "-t", "0")
    assert code == 0 and stdout.startswith("The cat"), err
    code, stdout2, _ = cli(capsys, "generate", tmp_path / "u", "-p", "The cat", "-n", "8", "-t", "0")
    assert code == 0


def test_llama_checkpoint_cannot_be_packed(capsys, tiny_llama_ckpt, tmp_path):
    code, _, err = cli(capsys, "pack", tiny_llama_ckpt, "--out", tmp_path / "x")
    assert code == 2 and "only MatMul-free (hgrn_bit) checkpoints can be packed" in err
    assert not (tmp_path / "x").exists()
    info = inspect_checkpoint(tiny_llama_ckpt)  # inspect works on any checkpoint
    assert not info["packed"] and info["totals"]["ternary_parameters"] == 0


def test_bad_options(odd_ckpt, tmp_path):
    with pytest.raises(MMFError, match="unknown --format 'q4'"):
        pack_checkpoint(odd_ckpt, tmp_path / "x", fmt="q4")
    with pytest.raises(MMFError, match="--dtype 'int8'"):
        pack_checkpoint(odd_ckpt, tmp_path / "x", keep_dtype="int8")
    with pytest.raises(MMFError, match="--dtype 'int8'; use one of source, fp32, bf16, fp16"):
        pack_checkpoint(odd_ckpt, tmp_path / "x", dtype="int8")
    with pytest.raises(MMFError, match="is the input checkpoint"):
        pack_checkpoint(odd_ckpt, odd_ckpt, force=True)
    with pytest.raises(MMFError, match="not a packed checkpoint"):
        unpack_checkpoint(odd_ckpt, tmp_path / "y")
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        pack_checkpoint(tmp_path / "missing", tmp_path / "z")
    assert not any(tmp_path.iterdir())


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_nan_weight_names_the_tensor_and_leaves_no_output(tmp_path):
    model = small_model("mmf", seed=2, **ODD)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    src = tmp_path / "nan"
    mmf.save_checkpoint(model, src)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*NaN"):
        pack_checkpoint(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 0.0
        model.model.norm.weight[3] = float("inf")
    mmf.save_checkpoint(model, src, overwrite=True)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*NaN or inf"):
        pack_checkpoint(src, tmp_path / "out")


def test_truncated_and_missing_files(packed_i2, odd_ckpt, tmp_path):
    bad = _copy(odd_ckpt, tmp_path / "trunc")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors.*(truncated|cover)"):
        pack_checkpoint(bad, tmp_path / "o1")
    shard = _copy(packed_i2[0], tmp_path / "missing-shard")
    (shard / packed_i2[1]["files"][1]).unlink()
    with pytest.raises(CheckpointError, match="shard named in model.safetensors.index.json is missing"):
        mmf.load_model(shard)
    with pytest.raises(CheckpointError, match="no such file"):
        read_header(tmp_path / "nope.safetensors")


def _rewrite_meta(path, edit):
    """Rewrite a safetensors file's header metadata with ``edit(meta)`` (data unchanged)."""
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["__metadata__"].update({FORMAT_KEY: "q4_k"}), "unknown packed format 'q4_k'"),
    (lambda h: h["__metadata__"].update({VERSION_KEY: "7"}), "version '7' is not supported"),
    (lambda h: h["__metadata__"].update({TENSOR_KEY_PREFIX + "lm_head.weight": "{oops"}), "lm_head.weight.*malformed"),
    (lambda h: h["__metadata__"].update({TENSOR_KEY_PREFIX + "lm_head.weight": json.dumps(
        {"format": "i2", "shape": [67, 34], "scale": 1.0})}), "lm_head.weight.*must be U8"),
    (lambda h: h["__metadata__"].update({TENSOR_KEY_PREFIX + "lm_head.weight": json.dumps(
        {"format": "i2", "shape": [67, 30], "scale": 2.5})}), "differs from the metadata scale"),
    (lambda h: h["lm_head.weight"].update({"shape": [10**12, 10**12]}), "needs .* bytes but data_offsets span"),
    (lambda h: h["lm_head.weight"].update({"data_offsets": [0, 2**60]}), "outside the"),
])
def test_bad_packed_headers(odd_ckpt, tmp_path, edit, message):
    out = tmp_path / "p"
    pack_checkpoint(odd_ckpt, out, keep_dtype="fp32")
    _rewrite_meta(out / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=message):
        load_packed_model(out, mmf.checkpoint.load_config(out))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        mmf.load_model(out)


def test_invalid_codes_and_padding_are_rejected(odd_ckpt, tmp_path):
    out = tmp_path / "p"
    pack_checkpoint(odd_ckpt, out, keep_dtype="fp32")
    f = out / "model.safetensors"
    tensors, _, start = read_header(f)
    info = tensors["model.layers.0.attn.i_proj.weight"]
    raw = bytearray(f.read_bytes())
    raw[start + info.begin] = 0xFF  # every 2-bit field = 3: not a code
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="i_proj.weight: bytes that are not valid i2 codes"):
        mmf.load_model(out)
    raw[start + info.begin] = 0x55
    raw[start + info.begin + 7] = 0x00  # K = 30, P = 8: byte 7 holds padding in digits 3 (k = 31), keep it
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="padding digits are not code 1"):
        mmf.load_model(out)


def test_unreachable_scale_is_a_clear_error():
    with pytest.raises(CheckpointError, match="all codes are 0"):
        dequantize_exact(torch.zeros(3, 4, dtype=torch.int8), torch.tensor(7.0))
    zero = dequantize_exact(torch.zeros(3, 4, dtype=torch.int8), 1.0 / torch.tensor(0.0).clamp(min=1e-5))
    assert torch.equal(zero, torch.zeros(3, 4))


def test_shape_that_does_not_match_the_config(odd_ckpt, tmp_path):
    bad = _copy(odd_ckpt, tmp_path / "shape")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 44
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+(\.norm)?\.weight' has shape .* but config.json implies"):
        pack_checkpoint(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- the fast paths of pack/unpack (pairwise quantiser, exact unpack in bits, O_DIRECT I/O) ---------------

def _threshold_heavy(shape, dtype, seed):
    """Random weights plus, in every row, weights exactly at and one bit either side of the zero threshold."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    k = min(shape[1], 8)
    signs = torch.where(torch.rand(shape[0], k, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    for _ in range(20):  # the edge values move the mean, hence the threshold: iterate to the fixed point
        tb = ternary_quantization.zero_threshold_bits(dtype, weight_quant(w)[1])
        edge = torch.tensor([tb - 1, tb, tb + 1, 0], dtype=torch.int16).view(dtype)
        w[:, :k] = edge.repeat(2)[:k] * signs
        w[0, 0] = -0.0
        if ternary_quantization.zero_threshold_bits(dtype, weight_quant(w)[1]) == tb:
            return w
    raise AssertionError("no fixed point")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,fmt", [((37, 40), "i2"), ((3, 6), "i2"), ((50, 18), "tq1"), ((7, 20), "tq1"),
                                       ((33, 8), "i2")])
def test_pairwise_quantiser_is_weight_quant_then_pack(monkeypatch, dtype, shape, fmt):
    """The int32 two-weights-a-word path (taken for 16-bit floats with K and P even; padded rows included)
    gives weight_quant's codes, packed, and the same counts; several chunks per tensor."""
    monkeypatch.setattr(ternary_quantization, "CHUNK_ELEMENTS", 64)
    w = _threshold_heavy(shape, dtype, seed=shape[0])
    codes, s_w = weight_quant(w)
    ref = pack_i2 if fmt == "i2" else pack_tq1
    k, p = shape[1], packed_row_bytes(shape[1], fmt)
    assert k % 2 == 0 and p % 2 == 0  # the pairwise path
    out = torch.empty(shape[0], p, dtype=torch.uint8)
    n_plus, n_minus = ternary_quantization._codes_pairwise(w, fmt, ternary_quantization.zero_threshold_bits(dtype, s_w), out)
    assert torch.equal(out, ref(codes))
    assert (n_minus, n_plus) == (int((codes == -1).sum()), int((codes == 1).sum()))
    packed, scale, counts = quantize_pack(w, fmt)
    assert torch.equal(packed, ref(codes)) and torch.equal(scale, s_w)
    assert counts == tuple(int((codes == v).sum()) for v in (-1, 0, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantize_exact_with_reused_scratch(dtype):
    """unpack's form (signed values built from the codes, in a scratch reused across tensors) re-quantises exactly."""
    scratch = torch.empty(64 * 200, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    for shape in ((64, 200), (30, 17)):  # the second call reuses the first one's scratch
        w = torch.randn(shape, generator=g) * 0.02
        codes, s_w = weight_quant(w)
        flat = dequantize_exact(codes, s_w, dtype, scratch=scratch)
        assert flat.dtype == dtype and flat.shape == shape
        c2, s2 = weight_quant(flat)
        assert torch.equal(c2, codes) and torch.equal(s2, s_w)
        assert torch.equal(flat, dequantize_exact(codes, s_w, dtype))  # same values without the scratch


def _mixed_file(path, seed=0):
    """A file whose F16 tensors start at odd offsets (after a 3-byte U8 tensor) as well as aligned ones."""
    from mmf.safetensors_io import SafetensorsWriter

    g = torch.Generator().manual_seed(seed)
    tensors = {"a": torch.randn(300, 40, generator=g).half(), "odd": torch.arange(3, dtype=torch.uint8),
               "b": torch.randn(128, 96, generator=g).half(), "c": torch.randn(5, generator=g),
               "d": torch.randn(1000, 9, generator=g).to(torch.bfloat16), "e": torch.zeros(0, 4)}
    w = SafetensorsWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], {"format": "pt"})
    for n, t in tensors.items():
        w.write(n, t)
    w.close({"format": "pt"})
    return tensors


@pytest.mark.parametrize("direct,buffer_bytes", [(True, None), (False, None), (True, 5000)])
def test_prefetch_returns_the_tensors_a_plain_read_gives(monkeypatch, tmp_path, direct, buffer_bytes):
    from mmf import safetensors_io as sio
    from safetensors import safe_open

    monkeypatch.setattr(sio, "USE_DIRECT_IO", direct)
    monkeypatch.setattr(sio, "PREFETCH_SMALL_BYTES", 1000)  # most tensors take one of the two reused buffers
    files = {tmp_path / "x.safetensors": _mixed_file(tmp_path / "x.safetensors", 0),
             tmp_path / "y.safetensors": _mixed_file(tmp_path / "y.safetensors", 1)}
    items = [(p, n) for p, ts in files.items() for n in ts] + [(tmp_path / "x.safetensors", "a")]
    got = 0
    for (p, n), t in sio.prefetch_tensors(items, buffer_bytes):  # 5000: larger tensors get buffers of their own
        assert torch.equal(t, files[p][n]) and t.dtype == files[p][n].dtype
        got += 1
    assert got == len(items)
    with safe_open(str(tmp_path / "y.safetensors"), "pt") as f:  # the writer's files are standard safetensors
        assert all(torch.equal(f.get_tensor(n), t) for n, t in files[tmp_path / "y.safetensors"].items())


def test_prefetched_read_error_is_one_clear_line(monkeypatch, tmp_path):
    """A file that goes bad while earlier tensors are being worked on: the error arrives at its tensor, naming the file."""
    from mmf import safetensors_io as sio

    monkeypatch.setattr(sio, "PREFETCH_SMALL_BYTES", 0)
    _mixed_file(tmp_path / "x.safetensors")
    _mixed_file(tmp_path / "y.safetensors", 1)
    items = [(tmp_path / "x.safetensors", n) for n in ("a", "b", "d")] + [(tmp_path / "y.safetensors", "b")]
    it = sio.prefetch_tensors(items)
    next(it)  # the thread is now at most one large tensor ahead: y is not open yet
    with open(tmp_path / "y.safetensors", "r+b") as f:
        f.truncate(200)
    next(it), next(it)
    with pytest.raises(CheckpointError, match=r"y\.safetensors: .*(truncated|corrupt)") as e:
        next(it)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("direct", [True, False])
def test_writer_stages_converts_and_writes_behind(monkeypatch, tmp_path, direct):
    """Staging buffers smaller than a tensor, dtype conversion at odd offsets, both I/O modes: the same file."""
    from mmf import safetensors_io as sio
    from safetensors import safe_open

    monkeypatch.setattr(sio, "USE_DIRECT_IO", direct)
    monkeypatch.setattr(sio.SafetensorsWriter, "STAGE_BYTES", 2 * sio.IO_ALIGN)
    monkeypatch.setattr(sio.SafetensorsWriter, "CONVERT_CHUNK", 1000)
    g = torch.Generator().manual_seed(2)
    src = {"odd": (torch.arange(5, dtype=torch.uint8), torch.uint8), "w": (torch.randn(70, 90, generator=g), torch.float16),
           "v": (torch.randn(33, generator=g), torch.bfloat16), "x": (torch.randn(3001, generator=g), torch.float32)}
    path = tmp_path / "out.safetensors"
    w = sio.SafetensorsWriter(path, [(n, dt, tuple(t.shape)) for n, (t, dt) in src.items()], {"format": "pt", "k": "vvvv"})
    for n, (t, _) in src.items():
        w.write(n, t)
    w.close({"format": "pt", "k": "v"})
    assert path.stat().st_size == w.total_bytes
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
        for n, (t, dt) in src.items():
            assert torch.equal(f.get_tensor(n), t.to(dt))


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full")
def test_writer_background_error_is_raised():
    from mmf.safetensors_io import SafetensorsWriter

    w = SafetensorsWriter("/dev/full", [("a", torch.float32, (1000,))])
    with pytest.raises(OSError):
        w.write("a", torch.zeros(1000))
        w.close()


def test_elementwise_thread_choice_changes_no_bit(monkeypatch):
    """One intra-op thread for the elementwise passes (what the tuner picks under load) gives the same bytes,
    scale and exact unpack, and leaves torch's thread count as it was."""
    before = torch.get_num_threads()
    w = (torch.randn(300, 64, generator=torch.Generator().manual_seed(9)) * 0.02).half()
    codes, s_w = weight_quant(w)
    want = quantize_pack(w, "i2")
    monkeypatch.setattr(ternary_quantization, "_ELEMENTWISE_THREADS", 1)
    got = quantize_pack(w, "i2")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
    flat = dequantize_exact(codes, s_w, torch.float16)
    assert [torch.equal(a, b) for a, b in zip(weight_quant(flat), (codes, s_w))] == [True, True]
    assert torch.get_num_threads() == before


def test_thread_tuner_uses_the_faster_setting_and_retries_the_other():
    tuner = ternary_quantization.ThreadTuner()
    tuner.full = 2
    picks = []
    for i in range(40):
        with tuner.run("shape", 1000):
            picks.append(ternary_quantization._ELEMENTWISE_THREADS)
        tuner.seconds_per_element[("shape", 1)] = 1.0  # one thread measured faster
        tuner.seconds_per_element[("shape", 2)] = 2.0
    assert picks[:2] == [2, 1] and picks.count(2) == 1 + sum(1 for k in range(3, 41) if k % tuner.RETRY == 0)
    assert ternary_quantization._ELEMENTWISE_THREADS is None


# ---- issue 16: the default keeps the source's dtype, verify says what it compares, one size, safe outputs ----

def _stored_dtypes(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update({n: t.dtype for n, t in read_header(f)[0].items()})
    return out


def test_default_dtype_keeps_the_source_dtype_and_its_logits(tiny_mmf_ckpt, odd_ckpt, tmp_path):
    out = tmp_path / "p32"
    summary = pack_checkpoint(tiny_mmf_ckpt, out, verify=True)  # an fp32 checkpoint, default --dtype
    assert summary["dtype"] == "source" and summary["unpacked_dtype"] == "F32"
    stored = _stored_dtypes(out)
    assert stored["model.embeddings.weight"] == "F32" and stored["model.norm.weight"] == "F32"
    assert read_header(out / "model.safetensors")[1]["mmf.keep_dtype"] == "F32"
    ids = ids_for(load_model(tiny_mmf_ckpt).config, 7, (3, 17))
    ref = load_model(tiny_mmf_ckpt, frozen=True)(ids).logits
    assert torch.equal(mmf.load_model(out)(ids).logits, ref)  # fp16 embeddings/norms gave ~3e-2 here before
    v = summary["verify"]
    assert v["bit_identical"] and v["max_rel_error"] == 0 and v["same_next_token"] == v["positions"] == 48
    assert v["unpacked_rounded_to"] is None and "exact_after_rounding" not in v
    assert "after freeze()" in v["compared"] and "48 positions" in v["compared"]
    assert 0 < v["median_rel_error_vs_unfrozen_source"] < 1e-3  # summation order only (docs/reference-semantics.md)
    half = tmp_path / "p16"  # an fp16 checkpoint stays fp16
    pack_checkpoint(odd_ckpt, half)
    assert _stored_dtypes(half)["model.embeddings.weight"] == "F16"


def test_mixed_source_dtypes_are_kept_per_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "mixed"
    mmf.save_checkpoint(small_model("mmf", seed=4, **ODD), src)
    state = load_file(src / "model.safetensors")
    state["model.embeddings.weight"] = state["model.embeddings.weight"].to(torch.bfloat16)
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "p"
    summary = pack_checkpoint(src, out, verify=True)
    stored = _stored_dtypes(out)
    assert stored["model.embeddings.weight"] == "BF16" and stored["model.norm.weight"] == "F32"
    assert summary["unpacked_dtype"] == "mixed" and summary["verify"]["bit_identical"]


def test_verify_with_a_rounding_dtype_labels_what_differs(tiny_mmf_ckpt, tmp_path):
    summary = pack_checkpoint(tiny_mmf_ckpt, tmp_path / "p", dtype="fp16", verify=True)
    v = summary["verify"]
    # not bit-identical to the fp32 source, and it says so; exact once the source is rounded the same way
    assert v["bit_identical"] is False and v["unpacked_rounded_to"] == "fp16" and v["exact_after_rounding"] is True
    assert 0 < v["median_rel_error"] <= v["max_rel_error"] and v["same_next_token"] <= v["positions"]


def test_verify_failure_is_reported(tiny_mmf_ckpt, tmp_path, monkeypatch):
    real = packing.load_packed_model

    def damaged(*a, **k):
        model = real(*a, **k)
        with torch.no_grad():
            model.model.norm.weight.mul_(1.5)
        return model

    monkeypatch.setattr(packing, "load_packed_model", damaged)
    with pytest.raises(MMFError, match="verify failed: the packed logits differ from the frozen source"):
        pack_checkpoint(tiny_mmf_ckpt, tmp_path / "p", verify=True)
    assert not (tmp_path / "p").exists()


def test_cli_dtype_and_its_old_spelling(capsys, tiny_mmf_ckpt, tmp_path):
    code, stdout, _ = cli(capsys, "pack", "--help")
    assert code == 0 and "--dtype" in stdout and "--keep-dtype: old spelling" in stdout and "source" in stdout
    code, stdout, err = cli(capsys, "pack", tiny_mmf_ckpt, "--out", tmp_path / "a", "--keep-dtype", "bf16", "--json")
    assert code == 0, err
    assert json.loads(stdout)["unpacked_dtype"] == "BF16"
    code, stdout, err = cli(capsys, "pack", tiny_mmf_ckpt, "--out", tmp_path / "b", "--verify")
    assert code == 0, err
    assert "verify: compared" in stdout and "after freeze()" in stdout and "bit identical" in stdout
    assert "input weight files on disk" in stdout


def test_pack_inspect_unpack_report_one_size(capsys, tiny_mmf_ckpt, tmp_path):
    def on_disk(d):
        return sum(p.stat().st_size for p in d.glob("*.safetensors"))

    out, flat = tmp_path / "p", tmp_path / "u"
    packed = pack_checkpoint(tiny_mmf_ckpt, out, max_shard_bytes=20000)
    assert len(packed["files"]) > 1
    info = inspect_checkpoint(out)
    unpacked = unpack_checkpoint(out, flat)
    assert packed["input_bytes"] == on_disk(tiny_mmf_ckpt) == inspect_checkpoint(tiny_mmf_ckpt)["totals"]["file_bytes"]
    assert packed["output_bytes"] == info["totals"]["file_bytes"] == unpacked["input_bytes"] == on_disk(out)
    assert unpacked["output_bytes"] == on_disk(flat)
    assert info["totals"]["tensor_bytes"] == sum(t["bytes"] for t in info["tensors"]) < info["totals"]["file_bytes"]
    code, stdout, _ = cli(capsys, "inspect", out)
    assert f"{packed['output_bytes']:,}" in stdout and "weight files on disk" in stdout and "data bytes" in stdout


@pytest.mark.parametrize("command", ["pack", "unpack"])
def test_force_never_deletes_a_file_or_a_foreign_directory(capsys, tiny_mmf_ckpt, tmp_path, command):
    src = tiny_mmf_ckpt
    if command == "unpack":
        src = tmp_path / "packed"
        pack_checkpoint(tiny_mmf_ckpt, src)
    notes = tmp_path / "notes.txt"
    notes.write_text("x\n")
    code, _, err = cli(capsys, command, src, "--out", notes, "--force")
    assert code == 2 and "is a file, not a directory that mmf wrote" in err and len(err.strip().splitlines()) == 1
    assert notes.read_text() == "x\n"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "data.csv").write_text("1,2\n")
    code, _, err = cli(capsys, command, src, "--out", theirs, "--force")
    assert code == 2 and "mmf did not write" in err and (theirs / "data.csv").exists()
    code, _, err = cli(capsys, command, src, "--out", tmp_path / "mine")
    assert code == 0, err
    code, _, err = cli(capsys, command, src, "--out", tmp_path / "mine", "--force")  # its own output: replaced
    assert code == 0, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("command", ["pack", "unpack"])
def test_full_disk_is_one_line_and_touches_nothing(capsys, monkeypatch, tiny_mmf_ckpt, tmp_path, command):
    import errno
    import hashlib

    from mmf import safetensors_io

    src = tiny_mmf_ckpt
    if command == "unpack":
        src = tmp_path / "packed"
        pack_checkpoint(tiny_mmf_ckpt, src)

    def digest(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}

    before = digest(src)

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", full)
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, command, src, "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "internal error" not in err
    assert f"no space left on device writing {out}" in err and "choose another --out" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert digest(src) == before


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_pack_and_unpack_outputs_follow_the_umask(tiny_mmf_ckpt, tmp_path, mask):
    import os
    import stat

    old = os.umask(mask)
    try:
        pack_checkpoint(tiny_mmf_ckpt, tmp_path / "p")
        unpack_checkpoint(tmp_path / "p", tmp_path / "u")
    finally:
        os.umask(old)
    for d in (tmp_path / "p", tmp_path / "u"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask
        for f in d.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_out_inside_the_input_is_refused(tiny_mmf_ckpt, tmp_path):
    with pytest.raises(MMFError, match="overlaps the input checkpoint"):
        pack_checkpoint(tiny_mmf_ckpt, tiny_mmf_ckpt / "packed")
    assert not (tiny_mmf_ckpt / "packed").exists()
