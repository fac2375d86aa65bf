"""The llama.cpp TQ2_0 anchor (issue 18 item 6): what can be checked without llama-cpp-python.

The GGUF writer needs the ``gguf`` package, which is not an mmf dependency: those tests skip where it is missing.
The timing itself needs llama-cpp-python and is not run in CI.
"""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from mmf.bench import anchor
from mmf.bench import llamacpp_anchor as A

HAS_GGUF = importlib.util.find_spec("gguf") is not None
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="the gguf package (gguf-py) is not installed; mmf does not "
                                                    "depend on it (the anchor's separate venv has it)")


@pytest.mark.parametrize("rows,k", [(1, 256), (3, 512), (5, 1024)])
def test_tq2_0_pack_matches_the_documented_layout_and_unpacks_exactly(rows, k):
    rng = np.random.default_rng(rows * k)
    codes = rng.integers(-1, 2, size=(rows, k), dtype=np.int8)
    raw = A.pack_tq2_0(codes, 0.125)
    assert raw.shape == (rows, k // 256 * 66) and raw.dtype == np.uint8
    # ggml-common.h block_tq2_0 = {qs[64], fp16 d}: weight 128h + 32l + m is bits 2l.. of qs[32h + m], code w + 1
    blocks = raw.reshape(rows, k // 256, 66)
    for r, b, j in [(0, 0, 0), (rows - 1, k // 256 - 1, 255), (rows // 2, 0, 161), (0, k // 256 - 1, 100)]:
        h, l, m = j // 128, (j % 128) // 32, j % 32
        assert ((blocks[r, b, 32 * h + m] >> (2 * l)) & 3) == codes[r, 256 * b + j] + 1
    assert (blocks[:, :, 64:].copy().view("<f2") == np.float16(0.125)).all()
    got, d = A.unpack_tq2_0(raw, k)
    assert got.dtype == np.int8 and np.array_equal(got, codes)
    assert d.shape == (rows, k // 256) and (d == 0.125).all()


def test_tq2_0_refuses_bad_shapes_and_the_unused_code():
    with pytest.raises(A.AnchorError, match="multiple of 256"):
        A.pack_tq2_0(np.zeros((2, 100), np.int8), 1.0)
    with pytest.raises(A.AnchorError, match="-1, 0 or 1"):
        A.pack_tq2_0(np.full((1, 256), 2, np.int8), 1.0)
    raw = A.pack_tq2_0(np.zeros((1, 256), np.int8), 1.0)
    with pytest.raises(A.AnchorError, match="do not hold"):
        A.unpack_tq2_0(raw[:, :-1], 256)
    raw[0, 7] |= 0b11000000
    with pytest.raises(A.AnchorError, match="unused code 3"):
        A.unpack_tq2_0(raw, 256)


def test_shapes_follow_mmf_presets():
    from mmf.config import model_preset

    for size in ("370m", "1.3b", "2.7b", "13b"):
        s, llama, mmf = A.SHAPES[size], model_preset(f"transformer++-{size}"), model_preset(size)
        assert (s.hidden, s.layers, s.vocab, s.heads, s.ffn) == (
            llama.hidden_size, llama.num_hidden_layers, llama.vocab_size, llama.num_attention_heads, llama.ffn_size)
        assert s.ffn == mmf.ffn_size  # the MatMul-free model of that size has the same FFN width


@needs_gguf
def test_gguf_tq2_0_blocks_decode_to_the_ternary_weights_written(tmp_path):
    import gguf

    shape = A.SHAPES["test"]
    path = tmp_path / "m.gguf"
    info = A.write_gguf(path, shape, seed=7)
    assert info["bytes"] == path.stat().st_size and not list(tmp_path.glob(".*tmp*"))
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("llama.feed_forward_length").contents() == shape.ffn
    assert len(reader.get_field("tokenizer.ggml.tokens").contents()) == shape.vocab
    names = {t.name: t for t in reader.tensors}
    plan = A.tensor_plan(shape)
    assert list(names) == [n for n, _, _ in plan]
    n_tq2 = 0
    for index, (name, shp, kind) in enumerate(plan):
        t = names[name]
        assert tuple(int(x) for x in reversed(t.shape)) == shp
        if kind != "tq2_0":
            assert t.tensor_type == (gguf.GGMLQuantizationType.F16 if kind == "f16" else gguf.GGMLQuantizationType.F32)
            continue
        n_tq2 += 1
        assert t.tensor_type == gguf.GGMLQuantizationType.TQ2_0
        codes, d = A.unpack_tq2_0(np.asarray(t.data), shp[1])
        written = A.ternary_weight(7, index, *shp)
        assert np.array_equal(codes, written), name
        assert (d == np.float32(np.float16(1 / A.W_SCALE))).all()
        # gguf-py's own TQ2_0 dequantizer reads the same values
        deq = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType.TQ2_0)
        assert np.array_equal(deq, written.astype(np.float32) * np.float32(np.float16(1 / A.W_SCALE)))
    assert n_tq2 == 7 * shape.layers + 1  # q k v o gate up down per layer, and the output head


@needs_gguf
def test_write_gguf_never_overwrites(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"keep")
    with pytest.raises(A.AnchorError, match="never overwritten"):
        A.write_gguf(path, A.SHAPES["test"])
    assert path.read_bytes() == b"keep"


def test_script_help_and_bad_input_without_llama_cpp():
    r = subprocess.run([sys.executable, str(anchor.SCRIPT), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--threads" in r.stdout and "TQ2_0" in r.stdout
    r = subprocess.run([sys.executable, str(anchor.SCRIPT), "--threads", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--threads" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(HAS_LLAMA_CPP, reason="this interpreter has llama_cpp; the test needs one without it")
def test_run_llamacpp_anchor_names_the_missing_llama_cpp_and_the_install():
    with pytest.raises(anchor.AnchorError) as e:
        anchor.run_llamacpp_anchor(sys.executable, threads=1, size="test", new_tokens=1, repeat=1, prefill_len=0)
    msg = str(e.value)
    assert "\n" not in msg and "llama_cpp" in msg and "pip install" in msg and "python3 -m venv" in msg


def test_run_llamacpp_anchor_refuses_a_missing_interpreter_and_bad_threads(tmp_path):
    with pytest.raises(anchor.AnchorError, match="not found"):
        anchor.run_llamacpp_anchor(str(tmp_path / "no-python"), threads=1)
    with pytest.raises(anchor.AnchorError, match="threads"):
        anchor.run_llamacpp_anchor(sys.executable, threads=0)
