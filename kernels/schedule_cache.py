"""Tuned kernel schedules kept on disk, so that a new process skips the timing runs.

The decode GEMV (``ternary_gemv``) and the int8 GEMM (``ternary_gemm``) pick a schedule per shape
by timing candidates on first use; ``GraphDecoder`` then refines the GEMV choices in the whole
captured step. That takes tens of seconds for a large model. The choices are stored in one JSON
file, under a context that names everything they depend on: the GPU (name and compute capability),
the torch and Triton versions and a hash of the kernel module's source. A different GPU, library
version or kernel edit finds nothing and tunes afresh; a stored schedule the kernel no longer
offers is ignored. ``GraphDecoder`` stores its schedules after refining them, and does not refine
schedules read back (they were refined when stored).

File: ``$MMF_SCHEDULE_CACHE`` if set (``0`` or ``off`` switches the cache off), else
``$XDG_CACHE_HOME/mmf/schedules.json`` (``~/.cache/mmf/schedules.json``). Written atomically
(temporary file, then rename); an unreadable or corrupt file is treated as empty and replaced. The
benchmarks, which time tuning and building, run without it (``disabled()``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

ENABLED = True
_MEMORY: dict = {}  # path -> the file's content, read once per process


class disabled:
    """``with disabled():`` tune afresh and store nothing (benchmarks that measure tuning or build time)."""

    def __enter__(self):
        global ENABLED
        self.prev, ENABLED = ENABLED, False
        return self

    def __exit__(self, *exc):
        global ENABLED
        ENABLED = self.prev


def cache_path():
    """The cache file, or None when the cache is off."""
    env = os.environ.get("MMF_SCHEDULE_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "false", "no") else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmf" / "schedules.json"


@functools.lru_cache(maxsize=16)
def _source_hash(source_file: str) -> str:
    return hashlib.sha1(Path(source_file).read_bytes()).hexdigest()[:16]


def context(device, source_file: str) -> str:
    """What a stored schedule is valid for: GPU, compute capability, torch, Triton, kernel source."""
    import triton

    i = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(i)
    return (f"{torch.cuda.get_device_name(i)} sm{major}{minor} torch {torch.__version__} triton {triton.__version__} "
            f"src {_source_hash(source_file)}")


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _load(path: Path) -> dict:
    if path not in _MEMORY:
        _MEMORY[path] = _read(path)
    return _MEMORY[path]


def lookup(table: str, key, ctx: str):
    """The stored schedule (a tuple) of ``key`` in ``table`` under context ``ctx``, or None."""
    path = cache_path() if ENABLED else None
    if path is None:
        return None
    hit = _load(path).get(ctx, {}).get(table, {}).get(str(key))
    return tuple(hit) if isinstance(hit, list) else None


def store(table: str, entries: dict, ctx: str) -> None:
    """Merge ``{key: schedule}`` into ``table`` under ``ctx`` and rewrite the file atomically. A cache
    that cannot be written (read-only home, full disk) is skipped: tuning works without it."""
    path = cache_path() if ENABLED else None
    if path is None or not entries:
        return
    data = _read(path)  # afresh: another process may have added entries since this one read it
    data.setdefault(ctx, {}).setdefault(table, {}).update({str(k): list(v) for k, v in entries.items()})
    _MEMORY[path] = data
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def pick(table: str, key, device, source_file: str, candidates: list, time_of):
    """The schedule of ``key``: the stored one if the kernel still offers it, else the fastest of
    ``candidates`` by ``time_of(schedule)`` (a candidate that raises, e.g. one that does not fit in
    registers or shared memory, is skipped), which is then stored. Returns ``(schedule, ranking)``:
    ``ranking`` lists the candidates timed, fastest first (empty when the schedule was read back)."""
    ctx = context(device, source_file)
    stored = lookup(table, key, ctx)
    if stored in candidates:
        return stored, []
    timed = []
    for cfg in candidates:
        try:
            timed.append((time_of(cfg), cfg))
        except Exception:  # noqa: BLE001 - any launch failure rules the candidate out
            continue
    ranking = [cfg for _, cfg in sorted(timed, key=lambda r: r[0])]
    if not ranking:
        return candidates[0], []
    store(table, {key: ranking[0]}, ctx)
    return ranking[0], ranking
