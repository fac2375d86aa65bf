"""`mmf info`: what a checkpoint holds, read from headers only (no tensor data is loaded)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .checkpoint import load_config, open_safetensors
from .checkpoint_layout import checkpoint_files
from .packed_format import SCALE_SUFFIX


def tensor_group(arch: str, name: str) -> str:
    if "embed" in name:
        return "embeddings"
    if name.endswith("norm.weight"):
        return "norms"
    if name.endswith(("_proj.weight", "lm_head.weight")):
        return "ternary" if arch == "mmf" else "dense"
    return "other"


def checkpoint_info(path) -> dict:
    path = Path(path)
    cfg = load_config(path)
    files = checkpoint_files(path)
    groups: Counter = Counter()
    bytes_by_dtype: Counter = Counter()
    by_file: dict = {}
    for k, p in files.items():
        by_file.setdefault(p, []).append(k)
    for p, keys in by_file.items():
        with open_safetensors(p) as f:
            meta = f.metadata() or {}
            for k in keys:
                sl = f.get_slice(k)
                n = 1
                for s in sl.get_shape():
                    n *= s
                dt = sl.get_dtype()
                packed = meta.get(f"mmf.tensor.{k}")  # a packed ternary tensor: count its logical weights
                if not (k.endswith(SCALE_SUFFIX) and f"mmf.tensor.{k[:-len(SCALE_SUFFIX)]}" in meta):
                    groups[tensor_group(cfg.arch, k)] += _logical_numel(packed) if packed else n  # (a scale is none)
                bytes_by_dtype[dt] += n * _DTYPE_BYTES.get(dt, 4)
    total = sum(groups.values())
    return {
        "path": str(path),
        "architecture": cfg.arch,
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        "parameters": total,
        "parameters_by_group": dict(groups),
        "ternary_share": groups.get("ternary", 0) / total if total else 0.0,
        "bytes_by_dtype": dict(bytes_by_dtype),
        "files": sorted({p.name for p in files.values()}),
    }


def info_rows(data: dict) -> list[dict]:
    """``checkpoint_info``'s result as ``field``/``value`` rows for a table: counts with thousands separators and
    a short form (370.1 M), shares as percentages, bytes also in MiB/GiB, lists joined (the JSON stays raw)."""
    rows = []
    for k, v in data.items():
        if k == "parameters_by_group":
            rows += [{"field": f"parameters[{g}]", "value": _count(n)} for g, n in v.items()]
        elif k == "bytes_by_dtype":
            rows += [{"field": f"bytes[{d}]", "value": _bytes(n)} for d, n in v.items()]
        elif k == "ternary_share":
            rows.append({"field": k, "value": f"{100 * v:.1f} %"})
        elif k == "parameters":
            rows.append({"field": k, "value": _count(v)})
        else:
            rows.append({"field": k, "value": _plain(v)})
    return rows


def _plain(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_plain(x) for x in v)
    return str(v)


def _count(n: int) -> str:
    """1234567 -> '1,234,567 (1.235 M)'; below a thousand just the number."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n:,} ({n / div:.4g} {unit})"
    return f"{n:,}"


def _bytes(n: int) -> str:
    """1234567 -> '1,234,567 (1.177 MiB)'."""
    for div, unit in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if n >= div:
            return f"{n:,} ({n / div:.4g} {unit})"
    return f"{n:,}"


def _logical_numel(entry: str) -> int:
    import json
    import math

    try:
        return math.prod(int(x) for x in json.loads(entry)["shape"])
    except (ValueError, KeyError, TypeError):
        return 0


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
