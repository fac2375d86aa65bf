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


def test_dispatch_cpu_takes_the_reference():
    """CPU tensors go to the torch reference (the model never knows which ran)."""
    import torch

    from mmf import kernels
    from mmf.ternary_codes import pack_i2
    from mmf.kernels import reference

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-1, 2, (7, 13), generator=g, dtype=torch.int8)
    x, nw = torch.randn(3, 13, generator=g), torch.rand(13, generator=g) + 0.5
    s_w = torch.tensor(1.3)
    assert torch.equal(kernels.bitlinear_i2(x, nw, pack_i2(codes), 13, s_w),
                       reference.bitlinear_frozen(x, nw, codes, s_w))
    ip, fp, gp = (torch.randn(2, 9, generator=g) for _ in range(3))
    st, lb, w = torch.randn(2, 9, generator=g), torch.rand(9, generator=g), torch.rand(9, generator=g) + 0.5
    o, s = kernels.mlgru_step(ip, fp, gp, st, lb, w, 1e-6)
    o_ref, s_ref = reference.mlgru_step_ref(ip, fp, gp, st, lb, w, 1e-6)
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)
    i, f = reference.mlgru_gates(ip, fp, lb)
    assert torch.allclose(s, f * st + i)  # the step is the recurrence with T = 1


def test_gemv_row_pieces_cover_rows_without_waste():
    """Each packed row is held as <= 3 power-of-two register tiles: they cover the row, only the
    last may be padded, 5120-wide rows (320 words) have no padding, and rows that fit in three
    128-word pieces take such pieces unless that would add padding."""
    pytest.importorskip("triton")
    from mmf.kernels.ternary_gemv import row_pieces

    assert row_pieces(320) == (128, 128, 64)
    assert row_pieces(320, 0) == (256, 64, 0)
    assert row_pieces(864) == (512, 256, 128)
    assert row_pieces(352) == (256, 64, 32)  # capped would be 128+128+128: padded, so not taken
    for pw in range(1, 1500):
        w = [x for x in row_pieces(pw) if x]
        assert 1 <= len(w) <= 3 and all(x & (x - 1) == 0 for x in w), (pw, w)
        assert sum(w[:-1]) < pw <= sum(w), (pw, w)  # every piece but the last is all row
        assert sum(w) <= sum(row_pieces(pw, 0)), (pw, w)  # never more padding than uncapped
        assert sum(w) - pw < w[-1], (pw, w)  # padding only inside the last piece


def test_refine_schedules_keeps_what_the_whole_step_measures_faster(monkeypatch):
    """Coordinate descent over each shape's tuner ranking, decided by a measurement of the whole step:
    a runner-up replaces the tuner's choice only when the step gets faster by more than the margin."""
    pytest.importorskip("triton")
    from mmf.kernels import ternary_gemv as tv

    monkeypatch.setattr(tv, "_TUNED", {"a": (8, 4, 2), "b": (16, 16, 1)})
    monkeypatch.setattr(tv, "_RANKING", {"a": [(8, 4, 2), (16, 8, 1), (32, 16, 1), (4, 4, 4)],
                                         "b": [(16, 16, 1), (8, 8, 1)]})
    cost = {("a", (8, 4, 2)): 5.0, ("a", (16, 8, 1)): 4.0, ("a", (32, 16, 1)): 4.5, ("a", (4, 4, 4)): 1.0,
            ("b", (16, 16, 1)): 3.0, ("b", (8, 8, 1)): 2.99}
    calls = []

    def measure():  # ms of the "step": the sum of its two shapes' costs
        calls.append(dict(tv._TUNED))
        return sum(cost[(k, c)] for k, c in tv._TUNED.items())

    changes = tv.refine_schedules(["a", "b"], measure, top=3, margin=0.01)
    # a: the 2nd candidate wins (8 -> 7 ms), the 3rd (7.5 ms) does not; the 4th is past top=3
    # b: its runner-up saves 0.01 ms of 7, under the 1 % margin: the tuner's choice stays
    assert tv._TUNED == {"a": (16, 8, 1), "b": (16, 16, 1)}
    assert changes == [("a", (8, 4, 2), (16, 8, 1), 8.0, 7.0), ("b", (16, 16, 1), (16, 16, 1), 7.0, 7.0)]
    assert len(calls) == 1 + 2 + 1  # the start, a's two runners-up, b's one


def test_record_keys_collects_the_shapes_launched():
    pytest.importorskip("triton")
    from mmf.kernels import ternary_gemv as tv

    with tv.record_keys() as keys:
        tv._SEEN.add(("gemv", 1))
    assert keys == {("gemv", 1)} and tv._SEEN is None
