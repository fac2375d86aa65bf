"""docs/formats.md is the spec: its worked example and its named constants are checked against the code."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch

from mmf import packed_format
from mmf.converters.ternary_quantization import quantize_pack
from mmf.packed_format import (FORMAT_KEY, KEEP_DTYPE_KEY, SCALE_SUFFIX, TENSOR_KEY_PREFIX, VERSION_KEY,
                               packed_tensor_meta, read_packed)
from mmf.safetensors_io import MAX_HEADER_BYTES, SafetensorsReader, read_header
from mmf.ternary_codes import unpack_codes
from packed_file import write_packed_file
from mmf.kernels.reference import weight_quant

DOC = Path(__file__).resolve().parents[1] / "docs" / "formats.md"
W = torch.tensor([[0.30, -0.05, 0.00, -0.40, 0.20, 0.10],
                  [-0.20, 0.60, -0.10, 0.05, 0.00, -0.30]])
NORM = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0, 1.0])


def _doc():
    return DOC.read_text(encoding="utf-8")


def _example_section():
    return _doc().split("## 9. Worked example", 1)[1]


def _blocks(text, lang):
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _hex(block):
    return bytes(int(b, 16) for b in block.split())


def test_doc_example_inputs_are_the_test_inputs():
    text = _blocks(_example_section(), "text")[0]
    assert "[[ 0.30, -0.05,  0.00, -0.40,  0.20,  0.10]" in text and "norm = [1.0, 0.5, 2.0, 1.0, 1.0, 1.0]" in text


def test_doc_scale_codes_and_bytes():
    sec = _example_section()
    codes, s_w = weight_quant(W)
    assert f"s_w = 1 / mean = **{float(s_w)!r}**" in sec
    assert f"fp32 bits 0x{s_w.numpy().tobytes()[::-1].hex().upper()}" in sec
    assert f"mean|W| = {float(W.abs().mean())!r} in fp32" in sec
    for fmt in ("i2", "tq1"):
        packed, scale, counts = quantize_pack(W, fmt)
        assert counts == (4, 4, 4) and torch.equal(scale, s_w)
        lines = [l for l in sec.split(f"**{fmt}**", 1)[1].splitlines() if l.startswith("row ")][:4]
        doc_bytes = [int(l.split("= 0x")[1], 16) for l in lines]
        assert doc_bytes == packed.flatten().tolist(), fmt
        # the digit lists in the doc are the codes + 1 in planar order, padding 1
        g, p = (4, 2) if fmt == "i2" else (5, 2)
        for line, (n, j) in zip(lines, [(0, 0), (0, 1), (1, 0), (1, 1)]):
            digits = [int(d) for d in line.split("c = ")[1].split(" ->")[0].split(",")]
            want = [int(codes[n, s * p + j]) + 1 if s * p + j < 6 else 1 for s in range(g)]
            assert digits == want
        assert torch.equal(unpack_codes(packed, 6, fmt), codes)


def test_doc_file_bytes_are_what_the_writer_writes(tmp_path):
    path = tmp_path / "example.safetensors"
    write_packed_file(path, {"proj.weight": W, "proj.norm.weight": NORM}, "i2", "fp16")
    raw = path.read_bytes()
    sec = _example_section()
    hex_blocks = _blocks(sec, "text")
    length, data = _hex(hex_blocks[-2]), _hex(hex_blocks[-1])
    (n,) = struct.unpack("<Q", length)
    assert raw[:8] == length and f"{len(raw)} bytes" in sec and f"N = {n}" in sec
    header_json = _blocks(sec, "json")[0].strip()
    assert raw[8:8 + n] == header_json.encode() + b" " * (n - len(header_json.encode()))
    assert raw[8 + n:] == data and len(raw) == 8 + n + len(data)
    # and the reader follows the same spec back
    tensors, meta, _ = read_header(path)
    entry = packed_tensor_meta(path, "proj.weight", meta, tensors, "i2")
    assert entry == {"format": "i2", "shape": [2, 6], "scale": float(weight_quant(W)[1]), "counts": [4, 4, 4]}
    with SafetensorsReader(path) as r:
        packed, s_w = read_packed(r, "proj.weight", entry)
        assert torch.equal(unpack_codes(packed, 6, "i2"), weight_quant(W)[0])
        assert torch.equal(r.read("proj.norm.weight"), NORM.half())


def test_doc_names_the_code_constants():
    doc = _doc()
    for const, value in [("FORMAT_KEY", FORMAT_KEY), ("VERSION_KEY", VERSION_KEY), ("KEEP_DTYPE_KEY", KEEP_DTYPE_KEY),
                         ("TENSOR_KEY_PREFIX", TENSOR_KEY_PREFIX), ("SCALE_SUFFIX", SCALE_SUFFIX)]:
        assert f"`{value.rstrip('.')}" in doc and f"(`{const}`" in doc, const
    assert f'`"{packed_format.FORMAT_VERSION}"` (`FORMAT_VERSION`)' in doc
    assert "100 MiB" in doc and MAX_HEADER_BYTES == 100 * 1024 * 1024
    assert json.dumps(packed_format.QUANT_METHOD) in doc
    assert all(f"`{name}`" in doc for name in ("block_tq1_0", "block_tq2_0", "TQ1_0", "TQ2_0"))
