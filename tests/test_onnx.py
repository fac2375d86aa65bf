"""`mmf export-onnx` and `mmf generate --onnx`: graphs valid, ONNX Runtime equal to torch, bad input refused.

Tiny random models of both architectures (conftest.small_model: d 64, 2 layers; Transformer++
with grouped KV heads). Equality per docs/reference-semantics.md: median per-position relative error
of the logits, and greedy generation token for token (prefill.onnx then decode.onnx).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

import mmf
from mmf.converters import onnx_export
from mmf.converters.onnx_export import DATA_FILE, DECODE_FILE, MANIFEST_FILE, PREFILL_FILE, export_model
from mmf.ternary_codes import pack_i2
from mmf.errors import MMFError
from mmf.generate import generate_ids
from mmf.models import FrozenBitLinear

from conftest import main_in_process, median_rel_err, run_cli, small_model

ort = pytest.importorskip("onnxruntime")
from mmf.onnx_runtime import OnnxCausalLM  # noqa: E402

GEN_TOKENS = 16


def _ids(batch=3, seq=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (batch, seq), generator=g)


def _model(arch, **kw):
    m = small_model(arch, **kw)
    return m.freeze() if arch == "mmf" else m


def _with_packed_buffers(model):
    """The frozen model as `mmf pack` loads it: FrozenBitLinears holding i2 bytes, not int8 codes."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FrozenBitLinear):
                setattr(parent, name, FrozenBitLinear(
                    child.in_features, child.out_features, weight_scale=child.weight_scale.clone(),
                    norm_weight=child.norm.weight.detach().clone(), packed=pack_i2(child.ternary_codes())))
    return model


CASES = {  # name: (arch, weights, build)
    "mmf-packed": ("mmf", "packed", lambda: _model("mmf")),
    "mmf-float": ("mmf", "float", lambda: _model("mmf")),
    "mmf-k-not-multiple-of-4": ("mmf", "packed", lambda: _model("mmf", hidden_size=66, intermediate_size=94)),
    "mmf-packed-buffers": ("mmf", "packed", lambda: _with_packed_buffers(_model("mmf"))),
    "llama": ("transformer++", "float", lambda: _model("transformer++")),
    "llama-tied": ("transformer++", "float", lambda: _model("transformer++", tie_word_embeddings=True)),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(case, dtype="fp32", opset=18):
        key = (case, dtype, opset)
        if key not in cache:
            arch, weights, build = CASES[case]
            model = build()
            out = tmp_path_factory.mktemp("onnx") / f"{case}-{dtype}-{opset}"
            manifest = export_model(model, out, mmf.ByteTokenizer(), weights=weights, dtype=dtype, opset=opset)
            cache[key] = (model, out, manifest)
        return cache[key]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_checker_and_ort_match_torch(exported, case):
    model, out, manifest = exported(case)
    for f in (PREFILL_FILE, DECODE_FILE):
        onnx.checker.check_model(str(out / f), full_check=True)
    ort_model = OnnxCausalLM(out)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
    got = ort_model(ids)
    assert got.logits.shape == ref.logits.shape
    err = median_rel_err(got.logits, ref.logits)
    assert err <= 1e-3, err
    assert err <= 1e-5, f"{err}: a correct fp32 graph lands near 1e-7"
    # state shapes as the manifest says; decode several tokens on top of the prefill
    if manifest["arch"] == "mmf":
        assert all(a.shape == (3, model.config.hidden_size) and a.dtype == np.float32
                   for a in got.cache.tensors.values())
    else:
        k = got.cache.tensors["past.0.key"]
        assert k.shape == (3, model.config.n_kv_heads, 13, model.config.dim_head)
    nxt = _ids(3, 4, seed=2)
    with torch.no_grad():
        ref2 = model(nxt, ref.cache)
    got2 = ort_model(nxt, got.cache)
    assert median_rel_err(got2.logits, ref2.logits) <= 1e-5


@pytest.mark.parametrize("case", ["mmf-packed", "llama"])
def test_decode_only_from_empty_state(exported, case):
    """decode.onnx alone, from an empty state (zeros / a KV cache of length 0), gives the prefill's logits."""
    model, out, _ = exported(case)
    ids = _ids(2, 7)
    with torch.no_grad():
        ref = model(ids).logits
    got = OnnxCausalLM(out, decode_only=True)
    assert "prefill" not in got.sessions
    assert median_rel_err(got(ids).logits, ref) <= 1e-5


@pytest.mark.parametrize("case", ["mmf-packed", "llama"])
def test_greedy_generation_token_for_token(exported, case):
    model, out, _ = exported(case)
    prompt = [3 + b for b in b"The quick brown fox"]
    want = generate_ids(model, prompt, GEN_TOKENS, temperature=0.0)
    got = generate_ids(OnnxCausalLM(out), prompt, GEN_TOKENS, temperature=0.0)
    assert got == want and len(got) == GEN_TOKENS


def test_dynamic_batch_and_length(exported):
    model, out, _ = exported("mmf-packed")
    sess = ort.InferenceSession(str(out / PREFILL_FILE), providers=["CPUExecutionProvider"])
    for b, t in ((1, 1), (2, 7), (5, 31)):
        ids = _ids(b, t, seed=b + t)
        logits = sess.run(["logits"], {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            ref = model(ids).logits
        assert logits.shape == (b, t, model.config.vocab_size)
        assert median_rel_err(torch.from_numpy(logits), ref) <= 1e-5


def test_packed_weights_are_the_i2_bytes_and_small(exported):
    model, out, manifest = exported("mmf-packed")
    _, out_f, manifest_f = exported("mmf-float")
    graph = onnx.load(str(out / PREFILL_FILE), load_external_data=True).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    codes = model.model.layers[1].attn.f_proj.ternary_codes()
    packed_t = inits["model.layers.1.attn.f_proj.packed_t"]
    assert packed_t.dtype == np.uint8 and packed_t.shape == (-(-codes.shape[1] // 4), codes.shape[0])
    assert np.array_equal(packed_t.T, pack_i2(codes).numpy())
    # no float copy of any ternary weight anywhere in the graph
    assert not any(name.endswith(("codes_t", ".weight")) and a.ndim == 2 and name != "model.embeddings.weight"
                   for name, a in inits.items())
    ternary = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, FrozenBitLinear))
    packed_bytes = sum(a.nbytes for n, a in inits.items() if n.endswith(".packed_t"))
    assert packed_bytes == sum(-(-m.in_features // 4) * m.out_features for m in model.modules()
                               if isinstance(m, FrozenBitLinear)) and packed_bytes < ternary / 3.9
    # the shared data file holds each weight once; both graphs point into it
    data = (out / DATA_FILE).stat().st_size
    emb = model.model.embeddings.weight.numel() * 4
    assert data <= emb + packed_bytes + 64 * 64 + 8192
    assert manifest_f["file_bytes"][DATA_FILE] > 3 * data  # float export: 4 bytes per ternary weight
    assert manifest["weights"] == "packed" and manifest_f["weights"] == "float"


def test_manifest_names_inputs_outputs_and_config(exported):
    model, out, manifest = exported("llama")
    on_disk = json.loads((out / MANIFEST_FILE).read_text())
    assert on_disk["config"] == model.config.to_hf_dict()
    dec = on_disk["graphs"]["decode"]
    names = [i["name"] for i in dec["inputs"]]
    assert names[0] == "input_ids" and "past.1.value" in names
    past = next(i for i in dec["inputs"] if i["name"] == "past.0.key")
    assert past["shape"] == ["batch", model.config.n_kv_heads, "past_seq", model.config.dim_head]
    sess = ort.InferenceSession(str(out / DECODE_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == names
    assert [o.name for o in sess.get_outputs()] == [o["name"] for o in dec["outputs"]]
    assert (out / on_disk["files"]["tokenizer"]).exists()


def test_folding_off_and_float_weights_give_identical_logits(exported):
    """The same arithmetic three ways (int8 GEMM on folded weights, on weights unpacked per call,
    fp32 GEMM on float codes: integer sums, exact in both): bit-equal logits."""
    _, out, _ = exported("mmf-packed")
    _, out_f, _ = exported("mmf-float")
    ids = _ids(2, 9)
    a = OnnxCausalLM(out)(ids).logits
    assert torch.equal(a, OnnxCausalLM(out, fold_constants=False)(ids).logits)
    assert torch.equal(a, OnnxCausalLM(out_f)(ids).logits)


@pytest.mark.parametrize("case,bound", [("llama", 3e-3), ("mmf-packed", 0.1)])
def test_fp16_export(exported, case, bound):
    """fp16 activations. Transformer++ lands near fp16 rounding. For the tiny random MatMul-free
    model, fp16 activations flip int8 rounding decisions in most positions: torch's own fp16 model
    sits about 3 % from its fp32 logits, so the bound is loose; the graph still must not be far off."""
    model, out, manifest = exported(case, dtype="fp16")
    _, out32, _ = exported(case)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    got = OnnxCausalLM(out)(ids)
    assert got.logits.dtype == torch.float16
    assert median_rel_err(got.logits.float(), ref) <= bound
    data16, data32 = (out / DATA_FILE).stat().st_size, (out32 / DATA_FILE).stat().st_size
    assert data16 < 0.75 * data32


def test_opset_21(exported):
    model, out, manifest = exported("mmf-packed", opset=21)
    assert onnx.load(str(out / PREFILL_FILE), load_external_data=False).opset_import[0].version == 21
    ids = _ids(2, 6)
    with torch.no_grad():
        ref = model(ids).logits
    assert median_rel_err(OnnxCausalLM(out)(ids).logits, ref) <= 1e-5


# ---------------------------------------------------------------------------------------------- bad input

def test_unsupported_opset_and_packed_llama_refused(tmp_path):
    with pytest.raises(MMFError, match="opset 13 is not supported"):
        export_model(_model("mmf"), tmp_path / "a", opset=13)
    with pytest.raises(MMFError, match="no ternary weights"):
        export_model(_model("transformer++"), tmp_path / "b", weights="packed")
    with pytest.raises(MMFError, match="use fp32 or fp16"):
        export_model(_model("mmf"), tmp_path / "c", dtype="bf16")
    assert list(tmp_path.iterdir()) == []


def test_unrepresentable_checkpoints_refused(tmp_path):
    big = _model("transformer++")
    with torch.no_grad():
        big.model.layers[0].mlp.up_proj.weight[0, 0] = 1e6
    with pytest.raises(MMFError, match="beyond fp16's range"):
        export_model(big, tmp_path / "fp16", dtype="fp16")
    bad = _with_packed_buffers(_model("mmf"))
    bad.model.layers[0].attn.i_proj.packed[0, 0] = 0xFF  # code 3 = weight +2: not ternary
    with pytest.raises(MMFError, match="not ternary"):
        export_model(bad, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", boom)
    with pytest.raises(OSError):
        export_model(_model("mmf"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []




def test_cli_export_generate_and_errors(tiny_mmf_ckpt, tmp_path, monkeypatch, capsys):
    from mmf.generate import generate_text

    out = tmp_path / "onnx"
    code, stdout, err = main_in_process(capsys, "export-onnx", tiny_mmf_ckpt, "--out", out)
    assert code == 0, err
    assert "weights.onnx_data" in stdout and (out / PREFILL_FILE).exists()
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["weights"] == "packed" and manifest["files"]["tokenizer"] == "mmf_tokenizer.json"
    r = run_cli("generate", "--onnx", out, "--prompt", "Once upon", "--max-new-tokens", "12", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    want = generate_text(tiny_mmf_ckpt, "Once upon", 12, temperature=0.0)
    assert r.stdout == "Once upon" + want + "\n" and len(want) > 0
    before = sorted(p.name for p in out.iterdir())
    for args, msg in (((tiny_mmf_ckpt, "--out", out, "--opset", "17"), "opset 17 is not supported"),
                      ((tiny_mmf_ckpt, "--out", out), "already exists; choose another --out or pass --force"),
                      ((tiny_mmf_ckpt, "--out", tiny_mmf_ckpt / "sub", "--force"), "overlaps the checkpoint")):
        code, _, err = main_in_process(capsys, "export-onnx", *args)
        assert code == 2 and msg in err and err.count("\n") == 1 and err.startswith("mmf: error: ")
    assert sorted(p.name for p in out.iterdir()) == before
    assert not (tiny_mmf_ckpt / "sub").exists()
    code, _, err = main_in_process(capsys, "generate", "--prompt", "x")
    assert code == 2 and "--onnx DIR" in err


def test_cli_llama_float_checkpoint(tiny_llama_ckpt, tmp_path):
    out = tmp_path / "llama-onnx"
    manifest = onnx_export.export_onnx(tiny_llama_ckpt, out)
    assert manifest["weights"] == "float" and manifest["arch"] == "transformer++"
    model = mmf.load_model(tiny_llama_ckpt)
    prompt = [3 + b for b in b"abc"]
    assert generate_ids(OnnxCausalLM(out), prompt, 8) == generate_ids(model, prompt, 8)


def test_packed_checkpoint_from_mmf_pack(tiny_mmf_ckpt, tmp_path):
    """A checkpoint written by `mmf pack` (i2): its bytes go into the graph; ORT equals the torch model."""
    from mmf.converters.packing import pack_checkpoint

    packed = tmp_path / "packed"
    pack_checkpoint(tiny_mmf_ckpt, packed)
    out = tmp_path / "onnx"
    manifest = onnx_export.export_onnx(packed, out)
    model = mmf.load_model(packed)
    ids = _ids(2, 11)
    with torch.no_grad():
        ref = model(ids).logits
    ort_model = OnnxCausalLM(out)
    assert median_rel_err(ort_model(ids).logits, ref) <= 1e-5
    prompt = [3 + b for b in b"hello"]
    assert generate_ids(ort_model, prompt, 10) == generate_ids(model, prompt, 10)
    graph = onnx.load(str(out / PREFILL_FILE), load_external_data=True).graph
    got = next(onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name == "lm_head.packed_t")
    assert np.array_equal(got.T, model.lm_head.packed.numpy())
    # the embeddings come in the pack's dtype (the source's fp32, `mmf pack`'s default) and are stored as
    # fp32, so the data file is the packed checkpoint's size give or take the small tensors
    ckpt_bytes = sum(p.stat().st_size for p in packed.iterdir())
    assert manifest["file_bytes"][DATA_FILE] < 1.1 * ckpt_bytes


def test_ort_folds_the_unpacking_once(exported, tmp_path):
    """What ONNX Runtime does with the in-graph unpacking: with its default optimisations the
    BitShift/BitwiseAnd chain is constant-folded at load into int8 (K, N) weights; with
    ConstantFolding disabled the 2-bit bytes stay and the chain runs at every call."""
    from mmf.converters.onnx_graph import INLINE_MAX_BYTES

    _, out, _ = exported("mmf-packed")
    stored = onnx.load(str(out / DECODE_FILE), load_external_data=False).graph
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in stored.initializer
               if np.prod(t.dims) * (1 if t.data_type in (2, 3) else 4) >= INLINE_MAX_BYTES)
    ops = {}
    for fold in (True, False):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"opt-{fold}.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(out / DECODE_FILE), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=[] if fold else ["ConstantFolding"])
        g = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
        ops[fold] = ({n.op_type for n in g.node}, {t.data_type for t in g.initializer if len(t.dims) == 2})
    int8 = onnx.TensorProto.INT8
    assert "BitShift" not in ops[True][0] and "MatMulInteger" in ops[True][0] and int8 in ops[True][1]
    assert "BitShift" in ops[False][0] and int8 not in ops[False][1]


# ---- issue 16: help shows the defaults, --force replaces only mmf outputs, full disk, umask, bad options ----

def test_help_shows_the_weights_default(monkeypatch, capsys):
    code, stdout, _ = main_in_process(capsys, "export-onnx", "--help")
    assert code == 0 and "packed for MatMul-free, float for Transformer++" in " ".join(stdout.replace("│", " ").split())


def test_force_replaces_only_an_export(tiny_llama_ckpt, tmp_path, monkeypatch, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("x\n")
    code, _, err = main_in_process(capsys, "export-onnx", tiny_llama_ckpt, "--out", notes, "--force")
    assert code == 2 and "is a file, not a directory that mmf wrote" in err and err.count("\n") == 1
    assert notes.read_text() == "x\n"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.onnx").write_text("someone else's")
    code, _, err = main_in_process(capsys, "export-onnx", tiny_llama_ckpt, "--out", theirs, "--force")
    assert code == 2 and "mmf did not write" in err and (theirs / "model.onnx").exists()
    out = tmp_path / "onnx"
    onnx_export.export_onnx(tiny_llama_ckpt, out)
    onnx_export.export_onnx(tiny_llama_ckpt, out, dtype="fp16", force=True)  # an export (mmf_onnx.json): replaced
    assert json.loads((out / MANIFEST_FILE).read_text())["dtype"] == "fp16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_full_disk_is_one_line(tiny_llama_ckpt, tmp_path, monkeypatch, capsys):
    import errno
    import hashlib

    def digest(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}

    before = digest(tiny_llama_ckpt)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full)
    out = tmp_path / "onnx"
    code, _, err = main_in_process(capsys, "export-onnx", tiny_llama_ckpt, "--out", out)
    assert code == 2 and err.count("\n") == 1 and "internal error" not in err
    assert f"no space left on device writing {out}" in err and "choose another --out" in err
    assert list(tmp_path.iterdir()) == [] and digest(tiny_llama_ckpt) == before


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_export_follows_the_umask(tiny_llama_ckpt, tmp_path, mask):
    import os
    import stat

    old = os.umask(mask)
    try:
        onnx_export.export_onnx(tiny_llama_ckpt, tmp_path / "onnx")
    finally:
        os.umask(old)
    out = tmp_path / "onnx"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~mask}


@pytest.mark.parametrize("opset", ["17", "22", "-1"])
def test_opset_out_of_range(tiny_llama_ckpt, tmp_path, monkeypatch, capsys, opset):
    code, _, err = main_in_process(capsys, "export-onnx", tiny_llama_ckpt, "--out", tmp_path / "o", "--opset", opset)
    assert code == 2 and f"opset {opset} is not supported; use --opset 18 to 21" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_a_damaged_weights_file_is_one_line_on_stderr(exported, tmp_path, capfd):
    """ONNX Runtime's own error log stays quiet (only fatal messages): mmf reports the failure in one line."""
    _, out, _ = exported("mmf-packed")
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    data = damaged / "weights.onnx_data"
    data.write_bytes(data.read_bytes()[:100])
    code, stdout, err = main_in_process(capfd, "generate", "--onnx", damaged, "-p", "hi", "-n", "2")  # fd 2: ORT's log
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1 and "ONNX Runtime cannot load" in err
