"""Device names given on the command line (``--device``), checked in one place.

``resolve_device`` turns ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` into a ``torch.device`` and refuses,
with one line naming the fix, a name torch would reject (``tpu``) or a GPU this machine or this torch
build does not have; torch itself would fail later with an AssertionError or a RuntimeError.
"""

from __future__ import annotations

import re
from typing import Optional, Union

import torch

from .errors import MMFError

DEVICE_NAMES = "cpu, cuda, cuda:N or auto"


def set_threads(threads: Optional[int], option: str = "--threads") -> int:
    """Apply ``--threads N``: ``torch.set_num_threads(N)``, which the native CPU kernel follows too (ONNX
    Runtime is given the same count by its callers). None keeps torch's default. Returns the count in
    effect; N < 1 is one MMFError line."""
    if threads is None:
        return torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise MMFError(f"{option} {threads}: give a number of CPU threads >= 1, or leave it out for torch's "
                       f"default ({torch.get_num_threads()} here)")
    torch.set_num_threads(threads)
    return threads


def resolve_device(name: Union[str, torch.device], option: str = "--device") -> torch.device:
    """``name`` as a ``torch.device`` that exists here. ``auto`` is ``cuda`` when a CUDA GPU is visible,
    else ``cpu``; ``option`` names the command-line option in the error message."""
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m is None:
        raise MMFError(f"{option} {name!r} is not a device mmf runs on; use {DEVICE_NAMES}")
    if not torch.cuda.is_available():
        why = ("this torch was built without CUDA (a CPU-only wheel)" if torch.version.cuda is None
               else "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
        raise MMFError(f"{option} {name}: {why}; use {option} cpu, or {option} auto to take a GPU when there is one")
    if m.group(1) is None:
        return torch.device("cuda")
    index, count = int(m.group(1)), torch.cuda.device_count()
    if index >= count:
        raise MMFError(f"{option} {name}: this machine has {count} CUDA GPU{'s' if count != 1 else ''} "
                       f"(cuda:0 to cuda:{count - 1}); pick one of those")
    return torch.device("cuda", index)
