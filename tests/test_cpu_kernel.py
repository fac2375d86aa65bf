"""The native CPU kernel (kernels/cpu_ternary.py, kernels/cpu/ternary_cpu.c) against the torch reference.

Integer accumulators must be bit-identical; outputs must be within a median per-row relative error
of 1e-6 of ``kernels.reference.bitlinear_i2`` (and are expected to be bit-identical: the prologue
repeats torch's order); every instruction path this CPU has, 1 and 2 threads, odd shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from conftest import median_rel_err, small_model
from mmf import kernels
from mmf.ternary_codes import pack_i2, unpack_i2
from mmf.errors import CheckpointError, MMFError
from mmf.kernels import cpu_ternary as ct
from mmf.kernels import reference as ref
from mmf.models.hgrn_bit import FrozenBitLinear

if not ct.available():
    pytest.skip(f"native CPU kernel unavailable: {ct.info().get('reason')}", allow_module_level=True)

PATHS = [p for p in ct.ISAS if p in ct.supported_isas()]
ALL_PATHS = [pytest.param(p, marks=pytest.mark.skipif(p not in PATHS, reason=f"this CPU lacks {p}"))
             for p in ct.ISAS]
KS = (1, 3, 5, 17, 63, 65, 130, 257, 1000)
NS = (1, 3, 7, 129)
MS = (1, 2, 3, 5, 9, 17)


@pytest.fixture
def isa_path(request):
    """Run under one instruction path, with tiny shapes split across threads too."""
    prev = ct.set_isa(request.param)
    ct.set_min_parallel_bytes(1)
    yield request.param
    ct.set_isa(prev)
    ct.set_min_parallel_bytes(64 * 1024)


def random_ternary(n, k, gen):
    return (torch.randint(0, 3, (n, k), generator=gen) - 1).to(torch.int8)


@pytest.mark.parametrize("isa_path", ALL_PATHS, indirect=True)
def test_integer_accumulators_bit_identical(isa_path):
    gen = torch.Generator().manual_seed(1)
    for k in KS:
        for n in NS:
            w = random_ternary(n, k, gen)
            packed = pack_i2(w)
            for m in MS:
                xq = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
                want = (xq.long() @ w.long().T).int()
                for threads in (1, 2):
                    got = ct.i2_gemm_int(xq, packed, k, threads=threads)
                    assert torch.equal(got, want), (isa_path, k, n, m, threads)


@pytest.mark.parametrize("isa_path", ALL_PATHS, indirect=True)
def test_integer_accumulators_at_the_extremes(isa_path):
    """Long rows of +1 weights against -128 and +127 activations: the largest sums each path's
    accumulators see (AVX2 adds 16 steps in int16 before widening: -32768 exactly)."""
    k, n = 4 * 1100 + 3, 9
    w = torch.ones(n, k, dtype=torch.int8)
    w[1] = -1
    w[2, ::3] = 0
    packed = pack_i2(w)
    for value in (-128, 127):
        xq = torch.full((5, k), value, dtype=torch.int8)
        want = (xq.long() @ w.long().T).int()
        for threads in (1, 2):
            assert torch.equal(ct.i2_gemm_int(xq, packed, k, threads=threads), want), (value, threads)


@pytest.mark.parametrize("isa_path", ALL_PATHS, indirect=True)
def test_bitlinear_matches_reference(isa_path):
    gen = torch.Generator().manual_seed(2)
    cases = same = 0
    for k in KS:
        for n in NS:
            packed = pack_i2(random_ternary(n, k, gen))
            norm_w = torch.rand(k, generator=gen) + 0.5
            s_w = torch.tensor(1.0 / (0.2 + torch.rand((), generator=gen).item()))
            bias = torch.randn(n, generator=gen) if (k + n) % 2 else None
            for m in MS:
                x = torch.randn(m, k, generator=gen) * (torch.rand(m, 1, generator=gen) * 5 + 0.01)
                want = ref.bitlinear_i2(x, norm_w, packed, k, s_w, bias)
                for threads in (1, 2):
                    got = ct.bitlinear_i2(x, norm_w, packed, k, s_w, bias, threads=threads)
                    assert got.shape == want.shape and got.dtype == torch.float32
                    cases += 1
                    if torch.equal(got, want):
                        same += 1
                    else:
                        assert median_rel_err(got, want) <= 1e-6, (isa_path, k, n, m, threads)
    # the prologue repeats torch's roundings: expect (nearly) every case bit-identical
    assert same / cases >= 0.95, f"only {same}/{cases} bit-identical"


def test_bitlinear_model_shapes_dtypes_and_batches():
    """Model-sized rows, 3-d inputs, bf16 and fp16 inputs (output in x's dtype), prefill of 40 rows."""
    gen = torch.Generator().manual_seed(3)
    for k, n, lead, dtype in [(2048, 96, (1, 1), torch.float32), (5120, 33, (2, 3), torch.bfloat16),
                              (1000, 70, (40,), torch.float16), (13824, 8, (1,), torch.float32)]:
        packed = pack_i2(random_ternary(n, k, gen))
        norm_w = torch.rand(k, generator=gen) + 0.5
        x = torch.randn(*lead, k, generator=gen).to(dtype)
        want = ref.bitlinear_i2(x, norm_w, packed, k, torch.tensor(3.0))
        got = ct.bitlinear_i2(x, norm_w, packed, k, torch.tensor(3.0))
        assert got.dtype == dtype and got.shape == (*lead, n)
        assert torch.equal(got, want), (k, n, lead, dtype)


@pytest.mark.parametrize("isa_path", ALL_PATHS, indirect=True)
def test_prologue_bit_identical_to_torch(isa_path):
    """RMSNorm in fp32 (torch's cascade sum order), absmax scale, round half to even: same int8 and s_x."""
    gen = torch.Generator().manual_seed(4)
    for k in (1, 2, 7, 8, 9, 64, 1000, 2048, 5120, 13824):
        x = torch.randn(6, k, generator=gen) * torch.logspace(-3, 3, 6)[:, None]
        norm_w = torch.rand(k, generator=gen) + 0.5
        xq, s_x = ct.quantize(x, norm_w)
        want_q, want_s = ref.activation_quant(ref.rms_norm(x, norm_w, ref.BITLINEAR_NORM_EPS, torch.float32))
        assert torch.equal(s_x, want_s[:, 0]), k
        assert torch.equal(xq, want_q.to(torch.int8)), k


def test_non_finite_rows_give_nan_like_the_reference():
    gen = torch.Generator().manual_seed(5)
    k, n = 70, 5
    packed = pack_i2(random_ternary(n, k, gen))
    x = torch.randn(4, k, generator=gen)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    want = ref.bitlinear_i2(x, torch.ones(k), packed, k, torch.tensor(2.0))
    got = ct.bitlinear_i2(x, torch.ones(k), packed, k, torch.tensor(2.0))
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[1:3]).all()
    assert torch.equal(got[[0, 3]], want[[0, 3]])


def test_threads_give_identical_results_and_concurrent_calls_are_safe():
    gen = torch.Generator().manual_seed(6)
    k, n = 3000, 301
    packed = pack_i2(random_ternary(n, k, gen))
    norm_w = torch.rand(k, generator=gen) + 0.5
    x = torch.randn(3, k, generator=gen)
    want = ct.bitlinear_i2(x, norm_w, packed, k, torch.tensor(2.0), threads=1)
    for threads in (2, 3, 1, 4, 2):  # the pool grows and shrinks its share between calls
        assert torch.equal(ct.bitlinear_i2(x, norm_w, packed, k, torch.tensor(2.0), threads=threads), want)
    errors = []

    def worker():
        for _ in range(20):
            if not torch.equal(ct.bitlinear_i2(x, norm_w, packed, k, torch.tensor(2.0), threads=2), want):
                errors.append("mismatch")

    pool = [threading.Thread(target=worker) for _ in range(3)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in pool)


def test_works_in_a_forked_child():
    """The pool's workers do not survive fork(): the child starts its own."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    gen = torch.Generator().manual_seed(7)
    k, n = 2000, 64
    packed = pack_i2(random_ternary(n, k, gen))
    x = torch.randn(2, k, generator=gen)
    want = ref.bitlinear_i2(x, torch.ones(k), packed, k, torch.tensor(2.0))
    ct.bitlinear_i2(x, torch.ones(k), packed, k, torch.tensor(2.0), threads=2)  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        ok = torch.equal(ct.bitlinear_i2(x, torch.ones(k), packed, k, torch.tensor(2.0), threads=2), want)
        os._exit(0 if ok else 1)
    import time

    deadline = time.time() + 120
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("the forked child hung")


def test_shapes_dtypes_and_devices_checked_before_any_memory_is_touched():
    k, n = 10, 4
    packed = pack_i2(torch.zeros(n, k, dtype=torch.int8))
    x, nw, s_w = torch.randn(2, k), torch.ones(k), torch.tensor(1.0)
    with pytest.raises(ValueError, match="ceil"):
        ct.bitlinear_i2(x, nw, packed[:, :2], k, s_w)
    with pytest.raises(ValueError, match="uint8"):
        ct.bitlinear_i2(x, nw, packed.to(torch.int8), k, s_w)
    with pytest.raises(ValueError, match="last dimension"):
        ct.bitlinear_i2(torch.randn(2, k + 1), nw, packed, k, s_w)
    with pytest.raises(ValueError, match="norm weight"):
        ct.bitlinear_i2(x, torch.ones(k - 1), packed, k, s_w)
    with pytest.raises(ValueError, match="bias"):
        ct.bitlinear_i2(x, nw, packed, k, s_w, bias=torch.zeros(n + 1))
    with pytest.raises(ValueError, match="int8"):
        ct.i2_gemm_int(torch.zeros(2, k, dtype=torch.int16), packed, k)
    # a non-contiguous weight view is copied, not misread
    wide = pack_i2(torch.ones(n, 2 * k + 2, dtype=torch.int8))
    view = wide[:, : (k + 3) // 4]
    assert not view.is_contiguous()
    assert torch.equal(ct.bitlinear_i2(x, nw, view, k, s_w), ref.bitlinear_i2(x, nw, view.contiguous(), k, s_w))
    with pytest.raises(CheckpointError, match="expected uint8"):
        FrozenBitLinear(k, n, packed=packed[:, :2])


def test_invalid_packed_bytes_are_counted():
    gen = torch.Generator().manual_seed(8)
    for k in (1, 6, 64, 333):
        packed = pack_i2(random_ternary(17, k, gen))
        assert ct.i2_invalid_count(packed, k) == 0
        bad = packed.clone()
        bad[3, 0] |= 0b1100  # digit 1 of byte 0 becomes 0b11
        assert ct.i2_invalid_count(bad, k) >= 1
        if 4 * packed.shape[1] != k:  # a padding digit that is not code 1
            pad = packed.clone()
            last = k  # element k is padding: slice k // P, byte k % P
            p = packed.shape[1]
            pad[5, last % p] &= ~(0b11 << (2 * (last // p))) & 0xFF
            assert ct.i2_invalid_count(pad, k) == 1
            assert torch.equal(unpack_i2(pad, k), unpack_i2(packed, k))


@pytest.mark.parametrize("isa_path", ALL_PATHS, indirect=True)
def test_read_bandwidth_runs(isa_path):
    assert ct.read_bandwidth(1 << 22, threads=2, repeats=1) > 0.1


def test_isa_selection_refuses_unknown_or_missing_paths(monkeypatch):
    monkeypatch.setenv("MMF_CPU_ISA", "sse9")
    with pytest.raises(MMFError, match="not an instruction path"):
        ct.isa()
    for name in ct.ISAS:
        monkeypatch.setenv("MMF_CPU_ISA", name)
        if name in PATHS:
            assert ct.isa() == name
        else:
            with pytest.raises(MMFError, match="lacks"):
                ct.isa()
    monkeypatch.delenv("MMF_CPU_ISA")
    assert ct.isa() == PATHS[-1]
    with pytest.raises(MMFError):
        ct.set_isa("nope")


@torch.no_grad()
def greedy(model, ids, steps):
    out = model(ids)
    logits, tokens, cache = [out.logits], [], out.cache
    for _ in range(steps):
        nxt = logits[-1][:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        out = model(nxt, cache=cache)
        logits.append(out.logits)
        cache = out.cache
    return torch.cat(tokens, 1), torch.cat(logits, 1)


def test_model_native_path_equals_reference_path(monkeypatch):
    """A small frozen model, int8 codes and packed i2: the native path gives the reference path's tokens
    and logits (and it really ran)."""
    calls = []
    native = ct.bitlinear_i2
    monkeypatch.setattr(ct, "bitlinear_i2", lambda *a, **kw: calls.append(1) or native(*a, **kw))
    model = small_model("mmf", seed=3, intermediate_size=90).freeze()
    ids = torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(9))
    prev = kernels._FORCE_REFERENCE  # CI also runs the suite with MMF_FORCE_REFERENCE=1
    kernels.force_reference(False)
    try:
        tokens, logits = greedy(model, ids, 6)
        assert calls, "the native kernel did not run"
        for mod in model.modules():  # the form a packed checkpoint loads into
            if isinstance(mod, FrozenBitLinear):
                mod.packed, mod.codes = pack_i2(mod.codes), None
        tokens_p, logits_p = greedy(model, ids, 6)
        kernels.force_reference(True)
        n = len(calls)
        tokens_r, logits_r = greedy(model, ids, 6)
        assert len(calls) == n, "MMF_FORCE_REFERENCE did not bypass the native kernel"
    finally:
        kernels.force_reference(prev)
    assert torch.equal(tokens, tokens_r) and torch.equal(tokens_p, tokens_r)
    assert median_rel_err(logits, logits_r) <= 1e-6 and median_rel_err(logits_p, logits_r) <= 1e-6


FALLBACK_SCRIPT = """
import torch
from mmf import kernels
from mmf.ternary_codes import pack_i2
from mmf.kernels import reference
torch.manual_seed(0)
packed = pack_i2((torch.randint(0, 3, (9, 40)) - 1).to(torch.int8))
x = torch.randn(3, 40)
for _ in range(3):
    y = kernels.bitlinear_i2(x, torch.ones(40), packed, 40, torch.tensor(2.0))
assert torch.equal(y, reference.bitlinear_i2(x, torch.ones(40), packed, 40, torch.tensor(2.0)))
print("native" if kernels.cpu_native(x, packed) else "torch")
"""


@pytest.mark.parametrize("force", [False, True])
def test_no_compiler_falls_back_with_one_line(tmp_path, force):
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "MMF_CACHE_DIR": str(tmp_path / "cache"),
           "MMF_FORCE_REFERENCE": "1" if force else "0"}
    r = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "torch"
    lines = [ln for ln in r.stderr.splitlines() if "native CPU kernel" in ln]
    if force:  # the reference is forced: the kernel is never built, nothing is said
        assert lines == []
    else:
        assert len(lines) == 1 and "no-such-cc" in lines[0] and "torch path" in lines[0], r.stderr


def test_build_into_a_fresh_cache_from_two_threads(tmp_path, monkeypatch):
    """Concurrent first builds write to temporary names and rename: both end with one loadable file."""
    monkeypatch.setenv("MMF_CACHE_DIR", str(tmp_path))
    paths, errors = [], []

    def run():
        try:
            paths.append(ct.build(force=True))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors and len(paths) == 2 and paths[0] == paths[1]
    assert sorted(p.name for p in (tmp_path / "cpu").iterdir()) == [paths[0].name]
    assert ct.build() == paths[0]  # cached: no second compile
    import ctypes

    assert ctypes.CDLL(str(paths[0])).mmf_cpu_abi_version() == ct.ABI_VERSION


def test_cpu_kernel_bench_smoke(tmp_path, capsys):
    from mmf.bench import cpu_kernel_bench

    out = tmp_path / "r.json"
    assert cpu_kernel_bench.main(["--model", "tiny", "--threads", "1,2", "--isa", "best", "--pool-mb", "2",
                                  "--stream-mb", "4", "--repeats", "1", "--json-out", str(out)]) == 0
    import json

    res = json.loads(out.read_text())
    assert {r["shape"] for r in res["shapes"]} == {"i/f/g/o", "gate_proj (gate|up)", "down_proj", "lm_head"}
    assert all(r["weight_gbs"] > 0 and r["isa"] == PATHS[-1] for r in res["shapes"])
    assert len(res["per_token"]) == 2 and set(res["read_bandwidth_gbs"]) == {"1", "2"}
    assert "% read BW" in capsys.readouterr().out
    assert cpu_kernel_bench.main(["--model", "transformer++-tiny"]) == 2
    assert cpu_kernel_bench.main(["--isa", "sse9", "--model", "tiny"]) == 2
    assert "not available on this CPU" in capsys.readouterr().err
