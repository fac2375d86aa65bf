"""Triton training kernels vs their plain-torch references, on CPU through TRITON_INTERPRET=1.

Fused BitLinear (forward + straight-through gradients for input, weight, norm weight, bias) and
its GLU form (silu(gate) * up fed to the down projection without being stored), the
weight-quantisation cache, RMSNorm and gated RMSNorm with backward, and the fused MLGRU
(gates + scan; gradients for both pre-activations, the lower bound and the initial state) and the
plain scan: fresh random inputs, odd shapes, fp32/bf16/fp16, relative-error bounds per precision.

TRITON_INTERPRET must be set before triton is first imported, and other test modules import it
normally, so the cases run once in a subprocess (tests/_kernels_training_cases.py) and each test
here checks its share of the results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CASES = Path(__file__).with_name("_kernels_training_cases.py")
BOUND = {"torch.float32": 1e-5, "torch.float16": 3e-3, "torch.bfloat16": 2.5e-2}


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1", MMF_FORCE_REFERENCE="0")
    proc = subprocess.run([sys.executable, str(CASES)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(results, prefix, bound=None):
    names = [k for k in results if k.startswith(prefix)]
    assert names, f"no case ran for {prefix}"
    for name in names:
        b = bound
        if b is None:
            b = next(v for k, v in BOUND.items() if k in name)
        for qty, err in results[name].items():
            assert err <= b, f"{name} {qty}: relative error {err:.3e} > {b:.0e}"
    return names


def test_bitlinear_forward_and_gradients(results):
    names = _check(results, "bitlinear/torch.")
    assert len(names) == 9  # 3 shapes x 3 dtypes
    for name in names:  # output, then gradients of x, norm weight, weight
        assert set(results[name]) == {"out0", "grad0", "grad1", "grad2"}


def test_bitlinear_autocast_bias_and_blocked_rows(results):
    _check(results, "bitlinear/autocast-bf16", 2.5e-2)
    # under autocast the norm and its gradients stay fp32: only the products round to bf16
    assert results["bitlinear/autocast-bf16"]["grad0"] < 1e-5
    assert results["bitlinear/autocast-bf16"]["grad1"] < 1e-5
    _check(results, "bitlinear/bias", 1e-5)
    assert "grad3" in results["bitlinear/bias"]
    _check(results, "bitlinear/blocked-k", 1e-5)


def test_bitlinear_glu_down_projection(results):
    names = _check(results, "bitlinear_glu/torch.")
    assert len(names) == 3
    _check(results, "bitlinear_glu/blocked-k", 1e-5)


def test_bitlinear_int8_forward(results):
    # ternary x int8 summed exactly in int32: the output is closer to exact than the bf16 product
    names = _check(results, "bitlinear_int8")
    assert len(names) == 4


def test_weight_quantised_once_per_step(results):
    r = results["weight_cache"]
    assert r["reused_when_unchanged"] == 1.0
    assert r["recomputed_after_step"] == 1.0
    assert r["recomputed_after_fused_adamw"] == 1.0
    assert r["out_after_step"] < 1e-5
    assert r["out_after_fused_adamw"] < 1e-5
    # s_w from a different summation order than torch's mean: equal to rounding, same codes
    assert r["quantised_weight"] < 1e-6
    assert r["s_w"] < 1e-6
    assert r["codes_differ"] == 0.0


def test_rms_norms(results):
    _check(results, "rms_norm/")
    _check(results, "gated_rms_norm/torch.")
    _check(results, "gated_rms_norm/blocked-k", 1e-5)


def test_mlgru_fused_gates_and_scan(results):
    names = _check(results, "mlgru/")
    assert len(names) == 8
    assert set(results["mlgru/torch.float32/lb+state"]) == {"out0", "out1", "grad0", "grad1", "grad2", "grad3"}
    # the final state is fp32 whatever the input dtype
    for name in names:
        assert results[name]["out1"] < 1e-5, name


def test_mlgru_plain_scan(results):
    names = _check(results, "mlgru_scan/")
    assert len(names) == 8


def test_bitlinear_recomputes_its_norm_input(results):
    """A BitLinear fed by an RMSNorm (plain or gated) does not keep the norm's output for backward:
    it recomputes it, and outputs and gradients are bit-equal to storing it."""
    for name in ("recompute/plain", "recompute/gated"):
        r = results[name]
        assert r["out_max_abs_diff"] == 0 and r["grad_max_abs_diff"] == 0, (name, r)
        assert r["norm_output_kept_with_recompute"] == 0 and r["norm_output_kept_without"] == 1, (name, r)
        # recomputed once in backward, though three BitLinears read the plain norm's output
        assert results[f"{name}/forward_passes_in_backward/True"]["count"] == 1
        assert results[f"{name}/forward_passes_in_backward/False"]["count"] == 0
