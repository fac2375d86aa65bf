"""Benchmarks: each prints a table and writes its raw figures as JSON (``write_json``)."""

from __future__ import annotations

from mmf._toplevel import defer_bare_import as _defer_bare_import

_defer_bare_import(globals())  # imported as a top-level `bench` from the repository root: see mmf/_toplevel.py

import json
import os
from pathlib import Path

from mmf.errors import MMFError


def write_json(path, data, indent: int = 2) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (temporary name, then rename); creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=indent, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_output_path(path, option: str) -> Path:
    """Refuse, before any work, an output file that could not be written later: ``path`` is a directory,
    or its folder (or the nearest existing folder above it, where ``write_json`` would create the rest)
    is not a directory or refuses a file. Probes by creating and removing a temporary file there."""
    path = Path(path)
    if path.is_dir():
        example = path / ("bench.png" if option == "--plot" else "bench.json")
        raise MMFError(f"{option} {path}: is a directory; name a file in it, e.g. {example}")
    if path.exists() and not path.is_file():
        raise MMFError(f"{option} {path}: exists and is not a regular file; name a file")
    folder = path.parent
    while not folder.exists():  # write_json creates missing folders: check where it would start
        folder = folder.parent
    if not folder.is_dir():
        raise MMFError(f"{option} {path}: {folder} is a file, not a folder; choose another path")
    probe = folder / f".{path.name}.probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as e:
        raise MMFError(f"{option} {path}: cannot write in {folder} ({e.strerror or e}); choose a writable "
                       "folder") from None
    probe.unlink(missing_ok=True)
    return path


def resolve_device(device: str) -> tuple[str, str]:
    """``auto``: cuda when PyTorch sees a CUDA device, else cpu. Returns (device, how it was chosen);
    an unknown device, or cuda without one, is one MMFError line."""
    import torch

    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda", "--device auto: a CUDA device is visible"
        return "cpu", "--device auto: no CUDA device is visible"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise MMFError(f"--device {device}: unknown device; use auto, cuda or cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise MMFError(f"--device {device} but no CUDA device is visible to PyTorch; use --device cpu (or auto)")
    return name, f"--device {name}"
