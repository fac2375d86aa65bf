"""Benchmarks: each prints a table and writes its raw figures as JSON (``write_json``)."""

from __future__ import annotations

from mmf._toplevel import defer_bare_import as _defer_bare_import

_defer_bare_import(globals())  # imported as a top-level `bench` from the repository root: see mmf/_toplevel.py

import contextlib
import json
import os
import sys
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
    """Refuse, before any work, an output file that could not be written later (``mmf.outputs.check_output_file``:
    a directory, or a parent that is a file), a path that exists but is not a regular file, and a folder
    that refuses a new file: probed by creating and removing a temporary file in the folder (or the
    nearest existing one above it, where ``write_json`` would create the rest)."""
    from mmf.outputs import check_output_file

    path = Path(path)
    check_output_file(path, option)
    if path.exists() and not path.is_file():
        raise MMFError(f"{option} {path}: exists and is not a regular file; name a file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    probe = folder / f".{path.name}.probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as e:
        raise MMFError(f"{option} {path}: cannot write in {folder} ({e.strerror or e}); choose a writable "
                       "folder") from None
    probe.unlink(missing_ok=True)
    return path


def resolve_device(device: str = "auto") -> tuple[str, str]:
    """``mmf.devices.resolve_device`` (auto: cuda when PyTorch sees a CUDA device, else cpu; an unknown
    device, or cuda without one, is one MMFError line), and how it was chosen, for the table title."""
    from mmf.devices import resolve_device as resolve

    dev = resolve(device)
    if str(device).strip().lower() == "auto":
        return str(dev), "--device auto: " + ("a CUDA device is visible" if dev.type == "cuda"
                                              else "no CUDA device is visible")
    return str(dev), f"--device {dev}"


def mmf_preset_or_none(prog: str, option: str, name: str):
    """The MatMul-free preset ``name`` given to ``prog``'s ``option``; None after one line on stderr where it is
    unknown or not a MatMul-free model (the caller exits with 2)."""
    from mmf.config import MMFConfig, model_preset

    try:
        cfg = model_preset(name)
    except MMFError as e:
        print(f"{prog}: {option}: {e}", file=sys.stderr)
        return None
    if not isinstance(cfg, MMFConfig):
        print(f"{prog}: {option} {name}: MatMul-free presets only (370m, 1.3b, 2.7b, 13b)", file=sys.stderr)
        return None
    return cfg


@contextlib.contextmanager
def overridden(settings: dict):
    """Set each ``(object, attribute) -> value`` of ``settings`` (module or class switches of a benchmark's
    variant) for the ``with`` block, and restore the values they had after it, in reverse order."""
    saved = []
    try:
        for (obj, attr), value in settings.items():
            saved.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)
