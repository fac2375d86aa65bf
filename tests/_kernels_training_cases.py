"""Cases for tests/test_kernels_training.py, run in a subprocess with TRITON_INTERPRET=1.

The Triton training kernels (kernels/bitlinear_fused.py, kernels/mlgru_fused.py) are compared with
their plain-torch references on fresh random inputs (seeded), odd shapes and fp32/bf16/fp16.
Prints one JSON object: case name -> {quantity: relative error ||a - b|| / ||b||}.
TRITON_INTERPRET must be set before triton is imported, which is why this runs in its own process.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from mmf.kernels import bitlinear_fused as BF  # noqa: E402
from mmf.kernels import mlgru_fused as MS  # noqa: E402
from mmf.kernels import reference as R  # noqa: E402


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def run_pair(fn_a, fn_b, inputs, n_out, seed):
    """Forward both on copies of ``inputs``, backprop one shared random cotangent; rel errors."""
    res = {}
    outs, grads = [], []
    for fn in (fn_a, fn_b):
        leaves = [_leaf(t) if t is not None else None for t in inputs]
        out = fn(*leaves)
        out = out if isinstance(out, tuple) else (out,)
        out = out[:n_out]
        gen = torch.Generator().manual_seed(seed)
        loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in out)
        want = [t for t in leaves if t is not None]
        g = torch.autograd.grad(loss, want)
        outs.append(out)
        grads.append(g)
    for k, (a, b) in enumerate(zip(*outs)):
        res[f"out{k}"] = rel(a, b)
    for k, (a, b) in enumerate(zip(*grads)):
        res[f"grad{k}"] = rel(a, b)
    return res


def bitlinear_cases(results):
    shapes = [((7, 45), 13), ((2, 5, 33), 17), ((3, 130), 9)]
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for si, (xs, n) in enumerate(shapes):
            g = torch.Generator().manual_seed(100 + si)
            k = xs[-1]
            x = torch.randn(xs, generator=g).to(dt)
            nw = (1 + 0.2 * torch.randn(k, generator=g)).to(dt)
            w = (0.05 * torch.randn(n, k, generator=g)).to(dt)
            results[f"bitlinear/{dt}/{xs}x{n}"] = run_pair(
                BF.bitlinear_train_fused, R.bitlinear_train, [x, nw, w], 1, 7 + si)
    # the GLU's down projection: BitLinear of silu(gate) * up, u = [gate | up]
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        g = torch.Generator().manual_seed(200)
        u = torch.randn(2, 5, 2 * 23, generator=g).to(dt)
        nw = (1 + 0.2 * torch.randn(23, generator=g)).to(dt)
        w = (0.05 * torch.randn(11, 23, generator=g)).to(dt)
        results[f"bitlinear_glu/{dt}"] = run_pair(BF.bitlinear_glu_train_fused, BF.bitlinear_glu_train_ref,
                                                  [u, nw, w], 1, 10)
    # autocast: fp32 master weights, bf16 products (the training setup of the benchmark)
    g = torch.Generator().manual_seed(5)
    x, nw, w = torch.randn(6, 40, generator=g), 1 + 0.2 * torch.randn(40, generator=g), 0.05 * torch.randn(11, 40, generator=g)

    def autocast(fn):
        def f(*a):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*a)
        return f

    results["bitlinear/autocast-bf16"] = run_pair(autocast(BF.bitlinear_train_fused), autocast(R.bitlinear_train),
                                                  [x, nw, w], 1, 3)
    # with a bias
    b = torch.randn(11, generator=g)
    results["bitlinear/bias"] = run_pair(BF.bitlinear_train_fused, R.bitlinear_train, [x, nw, w, b], 1, 4)
    # feature dimension looped in blocks (rows wider than one block)
    old = BF.MAX_BLOCK_K
    BF.MAX_BLOCK_K = 16
    try:
        results["bitlinear/blocked-k"] = run_pair(BF.bitlinear_train_fused, R.bitlinear_train, [x, nw, w], 1, 5)
        u = torch.randn(3, 80, generator=g)
        results["bitlinear_glu/blocked-k"] = run_pair(BF.bitlinear_glu_train_fused, BF.bitlinear_glu_train_ref,
                                                      [u, nw, w], 1, 5)
        gate = torch.randn(6, 40, generator=g)
        results["gated_rms_norm/blocked-k"] = run_pair(
            lambda a, b, c: BF.gated_rms_norm_train(a, b, c, 1e-6),
            lambda a, b, c: R.gated_rms_norm(a, b, c, 1e-6), [x, nw, gate], 1, 6)
    finally:
        BF.MAX_BLOCK_K = old


def int8_cases(results):
    """The int8 tensor-core forward (used on CUDA) through the interpreter: one small tile config."""
    from mmf.kernels import int8_matmul as I8

    old_cfg, old_flag = I8._int8_mm_kernel.configs, BF.INT8_FORWARD
    I8._int8_mm_kernel.configs = [c for c in old_cfg if c.kwargs["BM"] == 64]
    BF.INT8_FORWARD = "1"
    try:
        for dt in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(300)
            x = torch.randn(2, 35, 40, generator=g).to(dt)
            nw = (1 + 0.2 * torch.randn(40, generator=g)).to(dt)
            w = (0.05 * torch.randn(13, 40, generator=g)).to(dt)
            results[f"bitlinear_int8/{dt}"] = run_pair(BF.bitlinear_train_fused, R.bitlinear_train, [x, nw, w], 1, 14)
            u = torch.randn(2, 35, 80, generator=g).to(dt)
            results[f"bitlinear_int8_glu/{dt}"] = run_pair(BF.bitlinear_glu_train_fused, BF.bitlinear_glu_train_ref,
                                                           [u, nw, w], 1, 15)
    finally:
        I8._int8_mm_kernel.configs, BF.INT8_FORWARD = old_cfg, old_flag


def weight_cache_case(results):
    """Quantised weights are reused while the weight is unchanged and recomputed after a step."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 24, generator=g)
    nw = torch.nn.Parameter(1 + 0.1 * torch.randn(24, generator=g))
    w = torch.nn.Parameter(0.05 * torch.randn(10, 24, generator=g))
    BF.bitlinear_train_fused(x, nw, w).sum().backward()
    q1 = BF.quantized_weight(w, torch.float32)
    q1_again = BF.quantized_weight(w, torch.float32)
    codes, s_w = BF.quantized_codes(w)
    ref_codes, ref_sw = R.weight_quant(w.detach())
    torch.optim.SGD([w, nw], lr=0.5).step()  # in place: bumps the version counter
    y = BF.bitlinear_train_fused(x, nw, w)
    err_sgd = rel(y, R.bitlinear_train(x, nw, w))
    q2 = BF.quantized_weight(w, torch.float32)
    # fused AdamW updates in place without bumping version counters: the step hook must catch it
    BF.bitlinear_train_fused(x, nw, w).sum().backward()
    torch.optim.AdamW([w, nw], lr=0.1, fused=True).step()
    y3 = BF.bitlinear_train_fused(x, nw, w)
    q3 = BF.quantized_weight(w, torch.float32)
    results["weight_cache"] = {
        "reused_when_unchanged": float(q1_again is q1),
        "recomputed_after_step": float(q2 is not q1),
        "recomputed_after_fused_adamw": float(q3 is not q2),
        "out_after_step": err_sgd,
        "out_after_fused_adamw": rel(y3, R.bitlinear_train(x, nw, w)),
        "codes_differ": float((codes != ref_codes).sum()),
        "s_w": rel(s_w, ref_sw.reshape(1)),
        "quantised_weight": rel(q3, (lambda c, s: c.float() / s)(*R.weight_quant(w.detach()))),
    }


def norm_cases(results):
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        g = torch.Generator().manual_seed(21)
        x = torch.randn(3, 7, 37, generator=g).to(dt)
        w = (1 + 0.2 * torch.randn(37, generator=g)).to(dt)
        gate = torch.randn(3, 7, 37, generator=g).to(dt)
        results[f"rms_norm/{dt}"] = run_pair(lambda a, b: BF.rms_norm_train(a, b, 1e-6),
                                             lambda a, b: R.rms_norm(a, b, 1e-6), [x, w], 1, 8)
        results[f"gated_rms_norm/{dt}"] = run_pair(lambda a, b, c: BF.gated_rms_norm_train(a, b, c, 1e-6),
                                                   lambda a, b, c: R.gated_rms_norm(a, b, c, 1e-6),
                                                   [x, w, gate], 1, 9)


def mlgru_cases(results):
    old = MS.CHUNK_T
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for name, (B, T, D), with_lb, with_h0, chunk in [
            ("lb+state", (2, 37, 19), True, True, 64),
            ("chunks", (2, 37, 19), True, True, 8),
            ("plain", (3, 11, 5), False, False, 4),
            ("T=1", (2, 1, 9), True, True, 64),
        ]:
            if dt != torch.float32 and name not in ("chunks", "T=1"):
                continue  # half precisions: the multi-chunk and single-step cases suffice
            g = torch.Generator().manual_seed(31)
            ip = torch.randn(B, T, D, generator=g).to(dt)
            fp = torch.randn(B, T, D, generator=g).to(dt)
            lb = torch.rand(D, generator=g) if with_lb else None
            h0 = torch.randn(B, D, generator=g) if with_h0 else None
            MS.CHUNK_T = chunk
            try:
                results[f"mlgru/{dt}/{name}"] = run_pair(
                    lambda a, b, c, d: MS.mlgru_fused(a, b, c, d),
                    lambda a, b, c, d: MS.mlgru_fused_ref(a, b, c, d), [ip, fp, lb, h0], 2, 12)
                i = torch.randn(B, T, D, generator=g).to(dt)
                f = torch.rand(B, T, D, generator=g).to(dt)
                results[f"mlgru_scan/{dt}/{name}"] = run_pair(MS.mlgru_scan_fused, R.mlgru_scan, [i, f, h0], 2, 13)
            finally:
                MS.CHUNK_T = old


def _saved_storages(fn, leaves):
    """Run fn under saved-tensor hooks: the storages (data pointers) autograd keeps for backward."""
    ptrs = set()

    def pack(t):
        ptrs.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*leaves)
    return out, ptrs


def recompute_cases(results):
    """A BitLinear fed by an RMSNorm (plain: fp32 residual stream; gated: the MLGRU output) recomputes
    the norm's output in its backward instead of storing it: same outputs and gradients, bit for
    bit, as with the output stored (BF.RECOMPUTE_NORM = False), and the output's storage is not kept."""
    g = torch.Generator().manual_seed(300)
    x = torch.randn(2, 5, 37, generator=g)
    bw = 1 + 0.2 * torch.randn(37, generator=g)
    nw = 1 + 0.2 * torch.randn(37, generator=g)
    w = 0.05 * torch.randn(19, 37, generator=g)
    gg = torch.randn(2, 5, 37, generator=g).to(torch.bfloat16)
    s = torch.randn(2, 5, 37, generator=g).to(torch.bfloat16)

    def plain(x, bw, nw, w):  # three BitLinears read one norm output, as i, f and g do
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = BF.rms_norm_train(x, bw, 1e-6)
            y = BF.bitlinear_train_fused(h, nw, w)
            return y + BF.bitlinear_train_fused(h, nw * 0.5, w) * BF.bitlinear_train_fused(h, nw, -w), h

    def gated(gg, s, bw, nw, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o = BF.gated_rms_norm_train(gg, bw, s, 1e-6)
            return BF.bitlinear_train_fused(o, nw, w), o

    for name, fn, inputs in (("plain", plain, [x, bw, nw, w]), ("gated", gated, [gg, s, bw, nw, w])):
        runs = {}
        for flag in (True, False):
            BF.RECOMPUTE_NORM = flag
            try:
                leaves = [_leaf(t) for t in inputs]
                (y, h), ptrs = _saved_storages(fn, leaves)
                gen = torch.Generator().manual_seed(9)
                loss = (y.float() * torch.randn(y.shape, generator=gen)).sum()
                src = getattr(h, BF._SOURCE_ATTR, None)
                calls, real_fwd = [], BF._fwd
                BF._fwd = lambda *a, **k: calls.append(1) or real_fwd(*a, **k)
                try:
                    grads = torch.autograd.grad(loss, leaves)
                finally:
                    BF._fwd = real_fwd
                results[f"recompute/{name}/forward_passes_in_backward/{flag}"] = {"count": float(len(calls))}
                if flag:  # the shared recomputed output was made once and dropped after its last use
                    assert src is not None and src[-1].uses == 0 and src[-1].out is None
                runs[flag] = (y, grads, h.untyped_storage().data_ptr() in ptrs)
            finally:
                BF.RECOMPUTE_NORM = True
        (y1, g1, kept1), (y0, g0, kept0) = runs[True], runs[False]
        results[f"recompute/{name}"] = {
            "out_max_abs_diff": (y1.float() - y0.float()).abs().max().item(),
            "grad_max_abs_diff": max((a - b).abs().max().item() for a, b in zip(g1, g0)),
            "norm_output_kept_with_recompute": float(kept1),
            "norm_output_kept_without": float(kept0)}


def main():
    which = sys.argv[1:] or ["bitlinear", "int8", "cache", "norm", "mlgru", "recompute"]
    results = {}
    if "bitlinear" in which:
        bitlinear_cases(results)
    if "int8" in which:
        int8_cases(results)
    if "cache" in which:
        weight_cache_case(results)
    if "norm" in which:
        norm_cases(results)
    if "mlgru" in which:
        mlgru_cases(results)
    if "recompute" in which:
        recompute_cases(results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
