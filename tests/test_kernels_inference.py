"""Inference kernels (ternary GEMV/GEMM, fused MLGRU step, GraphDecoder) against their references.

The Triton kernels run on the CPU through the interpreter, which must be switched on before
triton is first imported; the rest of the suite imports torch and triton normally. So the cases
(``kernels_inference_cases.py``) run in a subprocess with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def test_inference_kernels_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "MMF_FORCE_REFERENCE": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(HERE / "kernels_inference_cases.py")],
        cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
