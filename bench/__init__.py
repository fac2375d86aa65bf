"""Benchmarks: each prints a table and writes its raw figures as JSON (``write_json``)."""

from __future__ import annotations

from mmf._toplevel import defer_bare_import as _defer_bare_import

_defer_bare_import(globals())  # imported as a top-level `bench` from the repository root: see mmf/_toplevel.py

import json
import os
from pathlib import Path


def write_json(path, data, indent: int = 2) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (temporary name, then rename); creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=indent, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
