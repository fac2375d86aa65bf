"""Packed ternary checkpoints, format version 1: docs/formats.md in code.

The page is the specification; this module names its constants and holds the one writer and the
one reader of its fields, so that ``mmf.load_model`` (the core) and ``mmf pack`` / ``unpack`` /
``inspect`` (``mmf.converters.packing``) follow the same code. In short: a packed checkpoint is an
ordinary checkpoint directory (``mmf.checkpoint_layout``) of safetensors files
(``mmf.safetensors_io``) whose ``__metadata__`` names the format and version, and which holds, for
every BitLinear ``X`` of the MatMul-free model,

* ``X.weight``        U8, shape (N, ceil(K / G)): the ternary codes in the planar ``i2`` (G = 4) or
  ``tq1`` (G = 5) layout of ``mmf.ternary_codes``;
* ``X.weight_scale``  F32, shape (): s_w of docs/reference-semantics.md (w ~= code / s_w);
* metadata ``mmf.tensor.X.weight``: its logical shape, format, scale and code counts;

and every other tensor (embeddings, norms, lower bounds) as a plain float tensor. Quantising latent
weights into codes is conversion, not format: ``mmf.converters.ternary_quantization``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .checkpoint_layout import checkpoint_files, files_in_order
from .errors import CheckpointError
from .safetensors_io import SafetensorsReader, SafetensorsWriter, read_header
from .ternary_codes import GROUP, MAX_BYTE, packed_row_bytes, unpack_codes

# ---- constants (docs/formats.md sections 1, 3 and 4) ----------------------------------------------
FORMAT_KEY = "mmf.packed_format"          # "i2" | "tq1"; its presence marks a packed file (checkpoint.is_packed)
VERSION_KEY = "mmf.packed_version"        # "1"
KEEP_DTYPE_KEY = "mmf.keep_dtype"         # "F16" | "BF16" | "F32" | "F64": dtype of the tensors left unpacked
                                          # ("mixed" if they differ: each tensor's header entry says its own)
TENSOR_KEY_PREFIX = "mmf.tensor."         # + "<module>.weight" -> JSON {"format","shape","scale","counts"}
SCALE_SUFFIX = "_scale"                   # "<module>.weight" + "_scale" = "<module>.weight_scale"
FORMAT_VERSION = "1"
FORMATS = ("i2", "tq1")
QUANT_CONFIG_KEY = "quantization_config"  # config.json entry of a packed checkpoint (HF convention)
QUANT_METHOD = "mmf_ternary"
# The header is written before the data, so each packed tensor's entry is first written with the
# longest scale (a double's longest repr) and counts it can have; the writer pads the final, shorter
# header with spaces to the length reserved.
RESERVED_SCALE = -1.2345678901234567e-300
RESERVED_COUNT = 10**15


# ---- writing --------------------------------------------------------------------------------------

def file_metadata(fmt: str, keep_dtype: str) -> dict:
    """The file-level ``__metadata__`` of every shard (section 3); ``keep_dtype`` a safetensors dtype name
    (F32, BF16, F16, F64) or ``mixed``. Packed tensors add their entries (``write_packed_tensor``)."""
    return {"format": "pt", FORMAT_KEY: fmt, VERSION_KEY: FORMAT_VERSION, KEEP_DTYPE_KEY: keep_dtype}


def tensor_metadata(fmt: str, shape, scale: float, counts) -> str:
    """The metadata entry of one packed tensor (section 4): compact JSON, scale as Python's repr."""
    return json.dumps({"format": fmt, "shape": [int(s) for s in shape], "scale": scale,
                       "counts": [int(c) for c in counts]}, separators=(",", ":"))


def reserved_metadata(metadata: dict, fmt: str, shapes: dict) -> dict:
    """``metadata`` plus the longest entry each packed tensor (name -> logical (N, K)) can get: the
    header a writer reserves before the scales and counts are known."""
    reserved = dict(metadata)
    for name, shape in shapes.items():
        reserved[TENSOR_KEY_PREFIX + name] = tensor_metadata(fmt, shape, RESERVED_SCALE, [RESERVED_COUNT] * 3)
    return reserved


def packed_tensor_plan(name: str, fmt: str, shape) -> list:
    """The stored tensors of packed weight ``name`` of logical shape (N, K): [(name, dtype, shape), ...]."""
    n_rows, k = shape
    return [(name, torch.uint8, (n_rows, packed_row_bytes(k, fmt))), (name + SCALE_SUFFIX, torch.float32, ())]


def scale_follows_weight(previous, item) -> bool:
    """For ``checkpoint_layout.plan_shards``: a packed weight and its scale are always in the same shard."""
    return item[0] == previous[0] + SCALE_SUFFIX


def write_packed_tensor(writer: SafetensorsWriter, metadata: dict, name: str, fmt: str, shape,
                        packed: torch.Tensor, s_w: torch.Tensor, counts) -> None:
    """Write packed weight ``name`` (the codes, then the scale) and record its entry in ``metadata``."""
    writer.write(name, packed)
    writer.write(name + SCALE_SUFFIX, s_w.reshape(()))
    metadata[TENSOR_KEY_PREFIX + name] = tensor_metadata(fmt, shape, float(s_w), counts)


def quantization_config(fmt: str, keep_dtype: str) -> dict:
    """config.json's ``quantization_config`` (section 1); ``keep_dtype`` fp32|bf16|fp16|fp64|mixed."""
    return {"quant_method": QUANT_METHOD, "format": fmt, "version": int(FORMAT_VERSION), "keep_dtype": keep_dtype}


# ---- reading: every check of docs/formats.md, before anything is built from the bytes ---------------

def file_format(path: Path, metadata: dict) -> str:
    """The packed format a shard's ``__metadata__`` declares, refusing unknown formats and versions."""
    fmt = metadata.get(FORMAT_KEY)
    if fmt is None:
        raise CheckpointError(f"{path}: not a packed file (no {FORMAT_KEY} in its metadata) although other shards are")
    if fmt not in FORMATS:
        raise CheckpointError(f"{path}: unknown packed format {fmt!r} (this mmf reads {', '.join(FORMATS)}); "
                              "upgrade mmf or re-pack the checkpoint")
    ver = metadata.get(VERSION_KEY)
    if ver != FORMAT_VERSION:
        raise CheckpointError(f"{path}: packed format version {ver!r} is not supported (this mmf reads version "
                              f"{FORMAT_VERSION}); upgrade mmf or re-pack the checkpoint")
    return fmt


def is_packed_weight(name: str, metadata: dict) -> bool:
    """Whether tensor ``name`` of a shard with this ``__metadata__`` is a packed weight."""
    return TENSOR_KEY_PREFIX + name in metadata


def packed_tensor_meta(path: Path, name: str, metadata: dict, tensors: dict, fmt: str) -> dict:
    """Validate the metadata entry of packed tensor ``name`` against the file's tensors; return it."""
    raw = metadata[TENSOR_KEY_PREFIX + name]
    try:
        meta = json.loads(raw)
        shape = [int(s) for s in meta["shape"]]
        tfmt = meta["format"]
        scale = meta["scale"]
        counts = [int(c) for c in meta.get("counts", [])]
        if not (isinstance(meta["shape"], list) and all(type(s) is int for s in meta["shape"])):
            raise TypeError("shape must be a list of integers")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise TypeError("scale must be a number")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: metadata of packed tensor {name} is malformed ({type(e).__name__}: {e})") from None
    if tfmt != fmt:
        raise CheckpointError(f"{path}: tensor {name} is in format {tfmt!r} but the file says {fmt!r}")
    if len(shape) != 2 or min(shape) < 1:
        raise CheckpointError(f"{path}: tensor {name}: logical shape {shape} is not (N, K) with N, K >= 1")
    if name not in tensors:
        raise CheckpointError(f"{path}: metadata describes tensor {name} but the file does not hold it")
    info = tensors[name]
    want = (shape[0], packed_row_bytes(shape[1], fmt))
    if info.dtype != "U8" or tuple(info.shape) != want:
        raise CheckpointError(f"{path}: tensor {name}: stored as {info.dtype} {list(info.shape)} but a {fmt} tensor of "
                              f"logical shape {shape} must be U8 {list(want)}")
    sname = name + SCALE_SUFFIX
    if sname not in tensors or tensors[sname].dtype != "F32" or tensors[sname].numel != 1:
        raise CheckpointError(f"{path}: tensor {name}: its scale {sname} (F32, one value) is missing or malformed")
    if not (math.isfinite(scale) and scale > 0):
        raise CheckpointError(f"{path}: tensor {name}: scale {scale!r} is not a positive finite number")
    if counts and (len(counts) != 3 or sum(counts) != shape[0] * shape[1] or min(counts) < 0):
        raise CheckpointError(f"{path}: tensor {name}: code counts {counts} do not add up to {shape[0] * shape[1]}")
    return {"format": tfmt, "shape": shape, "scale": scale, "counts": counts}


def read_packed(reader: SafetensorsReader, name: str, meta: dict) -> tuple:
    """Read and check one packed tensor: returns (packed bytes, s_w fp32 0-d). Bad codes -> CheckpointError."""
    return check_packed(reader.path, name, meta, reader.read(name), reader.read(name + SCALE_SUFFIX))


def check_packed(path: Path, name: str, meta: dict, packed: torch.Tensor, scale: torch.Tensor) -> tuple:
    """``read_packed``'s checks of tensors already read: returns (packed, s_w fp32 0-d, a copy)."""
    fmt, k = meta["format"], meta["shape"][1]
    s_w = scale.reshape(()).clone()
    if not bool(s_w == torch.tensor(meta["scale"], dtype=torch.float64).to(torch.float32)):
        raise CheckpointError(f"{path}: tensor {name}: scale tensor {float(s_w)!r} differs from the metadata "
                              f"scale {meta['scale']!r}")
    if fmt == "i2":
        bad = bool(((packed >> 1) & packed & 0x55).any())  # a 2-bit field equal to 3
    else:
        bad = bool((packed > MAX_BYTE["tq1"]).any())
    if bad:
        raise CheckpointError(f"{path}: tensor {name}: bytes that are not valid {fmt} codes; the file is corrupt")
    g, p = GROUP[fmt], packed.shape[1]
    if g * p != k:  # row padding must hold code 1 (weight 0)
        tail = unpack_codes(packed, g * p, fmt)[:, k:]
        if bool((tail != 0).any()):
            raise CheckpointError(f"{path}: tensor {name}: padding digits are not code 1; the file is corrupt")
    return packed, s_w


def packed_files(path: Path) -> tuple:
    """(files, per-file (tensors, metadata), format) of a packed checkpoint directory, all checked."""
    files = checkpoint_files(path)
    heads = {}
    fmts = set()
    for p in files_in_order(files):
        tensors, metadata, _ = read_header(p)
        fmts.add(file_format(p, metadata))
        heads[p] = (tensors, metadata)
    if len(fmts) > 1:
        raise CheckpointError(f"{path}: shards disagree on the packed format ({', '.join(sorted(fmts))})")
    return files, heads, fmts.pop()
