"""Human-readable quantities for messages and tables (the JSON outputs keep raw numbers)."""

from __future__ import annotations

import math
from typing import Optional

_DECIMAL = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
_BINARY = (("TiB", 2.0**40), ("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10))


def human_bytes(n: Optional[float], binary: bool = False) -> str:
    """A byte count in the largest unit that keeps it at least 1: ``3.21 GB``, ``12.4 MB``, ``812 kB``, ``17 B``.

    Three significant digits (whole numbers from 100 up); decimal units (kB, MB, GB, TB) by default,
    binary ones (KiB, MiB, GiB, TiB) with ``binary=True``. ``None`` gives ``-``.
    """
    if n is None:
        return "-"
    for unit, scale in _BINARY if binary else _DECIMAL:
        if abs(n) >= scale * 0.9995:  # 999.7 MB is "1 GB", not "1000 MB"
            x = n / scale
            return f"{x:.0f} {unit}" if abs(x) >= 99.95 else f"{x:.3g} {unit}"
    return f"{n:.0f} B"


def plural(n: int, noun: str) -> str:
    """``1 step``, ``2 steps``, ``1,024 steps``: a number and its noun, plural unless the number is 1."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def human_seconds(s: float) -> str:
    """``42 s``, ``12 min``, ``5.2 hours``, ``3.1 days``, ``2.4 years``."""
    if not math.isfinite(s):
        return "-"
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600)):
        if s >= size:
            return f"{s / size:.2g} {unit}" if s / size < 10 else f"{s / size:,.0f} {unit}"
    return f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"
