"""`mmf info`: what a checkpoint holds, read from headers only (no tensor data is loaded)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .checkpoint import load_config, open_safetensors, weight_files


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
    files = weight_files(path)
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
                groups[tensor_group(cfg.arch, k)] += _logical_numel(packed) if packed else n
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


def _logical_numel(entry: str) -> int:
    import json
    import math

    try:
        return math.prod(int(x) for x in json.loads(entry)["shape"])
    except (ValueError, KeyError, TypeError):
        return 0


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
