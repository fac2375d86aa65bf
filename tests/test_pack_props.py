"""Property tests (hypothesis): packing is lossless for any shape; the readers never crash on bad bytes."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mmf.converters.ternary_quantization import dequantize_exact, quantize_pack
from mmf.packed_format import FORMATS
from mmf.safetensors_io import SafetensorsReader, SafetensorsWriter, read_header
from mmf.ternary_codes import pack_i2, pack_tq1, unpack_codes, unpack_i2, unpack_tq1
from mmf.errors import MMFError
from mmf.kernels.reference import weight_quant

SETTINGS = settings(max_examples=int(__import__("os").environ.get("MMF_HYPOTHESIS_EXAMPLES", 40)), deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def ternary(draw, max_side=40):
    n = draw(st.integers(1, max_side))
    k = draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**31 - 1))
    p_zero = draw(st.sampled_from([0.0, 0.1, 0.35, 0.9]))
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    codes[torch.rand(n, k, generator=g) < p_zero] = 0
    return codes


@SETTINGS
@given(codes=ternary())
def test_codecs_round_trip_any_shape(codes):
    k = codes.shape[1]
    assert torch.equal(unpack_i2(pack_i2(codes), k), codes)
    assert torch.equal(unpack_tq1(pack_tq1(codes), k), codes)
    assert int(pack_tq1(codes).max()) <= 242


@st.composite
def latent(draw, max_side=40):
    """A latent weight tensor of any shape, scale and tail: what `mmf pack` reads."""
    n = draw(st.integers(1, max_side))
    k = draw(st.integers(1, max_side))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-7, 1e-4, 0.02, 1.0, 300.0]))
    w = torch.randn(n, k, generator=g) * scale
    if draw(st.booleans()):  # heavy tails: a few large weights, many that quantise to 0
        w = w * torch.rand(n, k, generator=g).pow(8) * 10
    return w.to(draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])))


@SETTINGS
@given(w=latent(), fmt=st.sampled_from(FORMATS))
def test_pack_unpack_pack_is_identity(w, fmt):
    """Latent weights -> packed -> exact float weights -> the same packed bytes and scale, bit for bit."""
    assume(bool(torch.isfinite(w.float()).all()))
    packed, s_w, _ = quantize_pack(w, fmt)
    codes = unpack_codes(packed, w.shape[1], fmt)
    flat = dequantize_exact(codes, s_w, torch.float32)
    c2, s2 = weight_quant(flat)
    assert torch.equal(c2, codes) and torch.equal(s2, s_w)
    packed2, s3, counts = quantize_pack(flat, fmt)
    assert torch.equal(packed2, packed) and torch.equal(s3, s_w)
    assert counts == tuple(int((codes == v).sum()) for v in (-1, 0, 1))


@SETTINGS
@given(data=st.binary(min_size=0, max_size=300))
def test_reader_random_bytes_fail_cleanly(tmp_path, data):
    path = tmp_path / "random.safetensors"
    path.write_bytes(data)
    try:
        tensors, _, _ = read_header(path)
    except MMFError:
        return
    # the rare valid file: every tensor must then read back without error
    with SafetensorsReader(path) as r:
        for name in tensors:
            r.read(name)


def _valid_file(path):
    plan = [("a.weight", torch.uint8, (3, 2)), ("a.weight_scale", torch.float32, ()), ("b", torch.float16, (4,))]
    with_meta = {"mmf.packed_format": "i2", "mmf.packed_version": "1"}
    w = SafetensorsWriter(path, plan, with_meta)
    w.write("a.weight", torch.full((3, 2), 0x55, dtype=torch.uint8))
    w.write("a.weight_scale", torch.tensor(2.0))
    w.write("b", torch.arange(4, dtype=torch.float16))
    w.close(with_meta)
    return path.read_bytes()


@SETTINGS
@given(pos=st.integers(0, 10**6), byte=st.integers(0, 255), cut=st.integers(0, 10**6))
def test_reader_mutated_or_truncated_files_fail_cleanly(tmp_path, pos, byte, cut):
    raw = bytearray(_valid_file(tmp_path / "ok.safetensors"))
    raw[pos % len(raw)] = byte
    raw = raw[: len(raw) - cut % 9]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(bytes(raw))
    try:
        tensors, _, _ = read_header(path)
        with SafetensorsReader(path) as r:
            for name in tensors:
                r.read(name)
    except MMFError:
        pass


@SETTINGS
@given(field=st.sampled_from(["shape", "data_offsets", "dtype", "header_len"]),
       value=st.one_of(st.integers(-2**63, 2**64), st.lists(st.integers(-2**40, 2**62), max_size=4),
                       st.text(max_size=5)))
def test_reader_absurd_header_sizes_fail_before_allocating(tmp_path, field, value):
    raw = _valid_file(tmp_path / "ok.safetensors")
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    if field == "header_len":
        assume(isinstance(value, int))
        new = struct.pack("<Q", value % 2**64) + raw[8:]
    else:
        header["b"][field] = value
        body = json.dumps(header).encode()
        new = struct.pack("<Q", len(body)) + body + raw[8 + n:]
    path = tmp_path / "absurd.safetensors"
    path.write_bytes(new)
    try:
        tensors, _, _ = read_header(path)
    except MMFError:
        return
    for t in tensors.values():  # anything accepted fits in the file
        assert t.end <= path.stat().st_size


def test_writer_output_loads_with_safetensors(tmp_path):
    from safetensors import safe_open

    _valid_file(tmp_path / "ok.safetensors")
    with safe_open(str(tmp_path / "ok.safetensors"), "pt") as f:
        assert f.metadata()["mmf.packed_format"] == "i2"
        assert torch.equal(f.get_tensor("b"), torch.arange(4, dtype=torch.float16))
        assert f.get_tensor("a.weight_scale").shape == ()
