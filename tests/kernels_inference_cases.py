"""Inference kernels vs their references, run under TRITON_INTERPRET=1 (on CPU).

Collected through ``test_kernels_inference.py``, which runs this file in a subprocess with
TRITON_INTERPRET=1 set before triton is imported (the rest of the suite imports torch normally).
The same checks run on a real GPU in ``bench/kernel_bench.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guarded by the wrapper
    pytest.skip("run through test_kernels_inference.py (needs TRITON_INTERPRET=1)", allow_module_level=True)

from mmf.ternary_codes import pack_i2  # noqa: E402
from mmf.kernels import reference  # noqa: E402
from mmf.kernels import ternary_gemm, ternary_gemv  # noqa: E402
from mmf.kernels.mlgru_step import mlgru_gated_scan, mlgru_step  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def rand_codes(n, k, g):
    return torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)


class _Launches:
    """Stands in for a Triton kernel: launches it, keeping each launch's keyword arguments (its constexprs)."""

    def __init__(self, kernel):
        self.kernel, self.kw = kernel, []

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.kw.append(kw)
            return self.kernel[grid](*args, **kw)
        return run


def check_rows(y, ref, dtype, max_bad_rows=0):
    """Relative error per row; quantisation can flip one rounding in a rare row (docs/reference-semantics.md)."""
    errs = ((y.double() - ref.double()).norm(dim=-1) / ref.double().norm(dim=-1).clamp_min(1e-30))
    bad = (errs > TOL[dtype]).sum().item()
    assert bad <= max_bad_rows, f"{bad} rows over {TOL[dtype]}: {errs.tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# k = 100 and 228: GEMV rows of 7 and 15 words, three pieces (4 + 2 + 1; 8 + 4 + 4, the last padded)
@pytest.mark.parametrize("m,n,k", [(1, 37, 70), (3, 20, 64), (2, 9, 131), (6, 33, 77), (1, 5, 2), (2, 7, 100),
                                   (1, 9, 228)])
def test_bitlinear_i2_matches_reference(dtype, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    codes = rand_codes(n, k, g)
    packed = pack_i2(codes)
    x = torch.randn(m, k, generator=g).to(dtype) * 3
    nw = (torch.rand(k, generator=g) + 0.5).to(dtype)
    s_w = torch.tensor(1.7)
    y = ternary_gemm.bitlinear_i2(x, nw, packed, k, s_w)
    ref = reference.bitlinear_i2(x, nw, packed, k, s_w)
    assert y.dtype == dtype and y.shape == ref.shape
    check_rows(y, ref, dtype)


@pytest.mark.parametrize("config", [(8, 4, 1), (4, 4, 3)])
def test_gemv_persistent_schedules(config):
    """(BN, warps, programs): one program over every row block, and three programs in turn."""
    g = torch.Generator().manual_seed(5)
    m, n, k = 2, 19, 141  # 36 bytes, 9 words per row; 19 rows: a partial last block
    codes = rand_codes(n, k, g)
    x = torch.randn(m, k, generator=g).to(torch.float16)
    nw = (torch.rand(1, k, generator=g) + 0.5).to(torch.float16)
    s_w = torch.tensor([0.8])
    out = torch.full((m, n), float("nan"), dtype=torch.float16)
    ternary_gemv.gemv(x, [pack_i2(codes)], s_w, nw, out, config=config)
    check_rows(out, reference.bitlinear_frozen(x, nw[0], codes, s_w[0]), torch.float16)


@pytest.mark.parametrize("swap", [0, 1])
def test_gemm_operand_orders(swap):
    """The GEMM with activations (swap 0) or weights (swap 1) as the left operand, against the
    reference, plain and GLU pair; two K blocks (the second partial), partial row/column tiles."""
    g = torch.Generator().manual_seed(21 + swap)
    m, n, k = 5, 23, 150  # 38 bytes per row: two BK = 32 blocks
    x = torch.randn(m, k, generator=g).to(torch.float16)
    nw = (torch.rand(1, k, generator=g) + 0.5).to(torch.float16)
    codes = rand_codes(2 * n, k, g)
    sw = torch.tensor([0.9])
    sc = ternary_gemv.Scratch(1, m, k, "cpu")
    ternary_gemm.quantize(x, nw, sc)
    ref = reference.bitlinear_frozen(x, nw[0], codes, sw[0])
    assert ternary_gemm.decode_row_tile(m, least=4) == 8
    for bm in (16, 8):  # the 16-row tile and the least tile for 5 rows (rows 5-7 of it padding)
        cfg = (bm, 64, 32, 4, 1, swap)
        out = torch.full((m, 2 * n), float("nan"), dtype=torch.float16)
        ternary_gemm.gemm(sc, [pack_i2(codes)], sw, out, k=k, config=cfg)
        check_rows(out, ref, torch.float16)
        glu = torch.full((m, n), float("nan"), dtype=torch.float16)
        ternary_gemm.gemm(sc, [pack_i2(codes)], sw, glu, k=k, epi=ternary_gemv.EPI_GLU, config=cfg)
        check_rows(glu, _glu_ref(ref, torch.float16), torch.float16)


@pytest.mark.parametrize("m,n,k", [(19, 23, 150), (33, 13, 37)])
def test_gemm_unpacked_int_mm(m, n, k):
    """The many-rows GEMM (codes unpacked to int8; Triton int8 GEMM with the epilogue, or torch._int_mm
    and one epilogue pass) equals the fused
    ternary_gemm.gemm bit for bit, plain, 3 segments, residual and GLU pair; odd N (int8 rows padded to
    8) and K % 4 != 0; the unpacked codes equal the i2 layout's, planar."""
    from mmf.ternary_codes import unpack_i2

    g = torch.Generator().manual_seed(60 + m)
    x = torch.randn(m, k, generator=g).to(torch.float16)
    nw = (torch.rand(3, k, generator=g) + 0.5).to(torch.float16)
    codes = [rand_codes(2 * n, k, g) for _ in range(3)]
    packed = [pack_i2(c) for c in codes]
    sw = torch.tensor([0.9, 1.1, 0.7])
    res = torch.randn(m, 3 * 2 * n, generator=g).to(torch.float16)
    sc = ternary_gemv.Scratch(3, m, k, "cpu")
    ternary_gemm.quantize(x, nw, sc, nseg=3)
    pb, p = 4 * sc.pw, packed[0].shape[1]
    scratch = torch.empty(ternary_gemm.unpacked_nbytes(2 * n, pb), dtype=torch.int8)
    wu = ternary_gemm.unpack_codes(packed[0], pb, out=scratch)
    planar = wu[:2 * n].view(2 * n, 4, pb)
    assert int(planar[:, :, p:].abs().sum()) == 0
    got = planar[:, :, :p].reshape(2 * n, 4 * p)[:, :k].long() - 1
    assert torch.equal(got, unpack_i2(packed[0], k).long())
    for epi, nseg, width in ((ternary_gemv.EPI_STORE, 3, 6 * n), (ternary_gemv.EPI_RESIDUAL, 3, 6 * n),
                             (ternary_gemv.EPI_GLU, 1, n)):
        kw = dict(k=k, epi=epi, residual=res if epi == ternary_gemv.EPI_RESIDUAL else None)
        want = torch.full((m, width), float("nan"), dtype=torch.float16)
        ternary_gemm.gemm(sc, packed[:nseg], sw[:nseg], want, config=(16, 64, 32, 4, 1), **kw)
        for mode in ("triton", "int_mm"):
            out = torch.full_like(want, float("nan"))
            ternary_gemm.gemm_unpacked(sc, packed[:nseg], sw[:nseg], out, mode=mode, **kw)
            assert torch.equal(out, want), (epi, mode, (out.float() - want.float()).abs().max())
    ref = reference.bitlinear_frozen(x, nw[0], codes[0], sw[0])
    check_rows(out, _glu_ref(ref, torch.float16), torch.float16)


def test_many_rows_path_choice(monkeypatch):
    """Many rows: a forced path is taken as given; "auto" times the two paths only where it can (a GPU,
    outside a capture), and otherwise takes the unpacked path without running either."""
    out = torch.empty(300, 8)
    calls = []
    for forced in ("fused", "unpacked"):
        monkeypatch.setattr(ternary_gemm, "MANY_ROWS_PATH", forced)
        assert ternary_gemm.many_rows_path(300, [torch.empty(8, 4)], out, 16, 0, calls.append) == forced
    monkeypatch.setattr(ternary_gemm, "MANY_ROWS_PATH", "auto")
    assert ternary_gemm.many_rows_path(300, [torch.empty(8, 4)], out, 16, 0, calls.append) == "unpacked"
    assert calls == []
    monkeypatch.setattr(ternary_gemm, "MANY_ROWS_PATH", "int_mm")
    with pytest.raises(ValueError, match="auto, fused or unpacked"):
        ternary_gemm.many_rows_path(300, [torch.empty(8, 4)], out, 16, 0, calls.append)


def test_integer_accumulation_is_exact():
    """In fp32 the whole chain is the reference's arithmetic: equal to rounding of the last divide."""
    g = torch.Generator().manual_seed(7)
    k, n = 203, 40
    codes = rand_codes(n, k, g)
    x = torch.randn(2, k, generator=g)
    nw = torch.rand(k, generator=g) + 0.5
    s_w = torch.tensor(0.37)
    xn = reference.rms_norm(x, nw, 1e-6, torch.float32)
    xq, s_x = reference.activation_quant(xn)
    acc = xq @ codes.float().T
    for m in (2, 5):  # gemv and gemm paths
        xx = torch.cat([x] * (m // 2 + 1))[:m]
        y = ternary_gemm.bitlinear_i2(xx, nw, pack_i2(codes), k, s_w)
        back = y[:2] * (s_x * s_w)  # undo the scale: the integer sums
        assert torch.allclose(back, acc, rtol=1e-6, atol=1e-3)


def _glu_ref(v, dtype):
    gate, up = v.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,chunks", [(1, None), (2, None), (3, None), (7, None), (3, 4), (7, 2)])
def test_fused_prologues_and_epilogues(dtype, m, chunks):
    """Block norm prologue + 3 segments; MLGRU prologue + residual; GLU epilogue; gated pre-pass (its rows
    whole in one program, or split over ``chunks`` programs)."""
    g = torch.Generator().manual_seed(11 + m)
    d, ffn, eps = 48, 36, 1e-6

    def lin():
        c = rand_codes(d, d, g)
        return c, pack_i2(c), torch.tensor(0.5 + torch.rand(1, generator=g).item() * 2)

    def nrm(k):
        return (torch.rand(k, generator=g) + 0.5).to(dtype)

    x = (torch.randn(m, d, generator=g) * 2).to(dtype)
    attn_w, lb, gnw = nrm(d), torch.rand(d, generator=g) * 0.5, nrm(d)
    state = torch.randn(m, d, generator=g)
    (ci, pi, si), (cf, pf, sf), (cg, pg, sg), (co, po, so) = lin(), lin(), lin(), lin()
    bw3 = torch.stack([nrm(d), nrm(d), nrm(d)])
    bwo = nrm(d)[None]
    # reference composition
    h = reference.rms_norm(x, attn_w, eps)
    ri = reference.bitlinear_frozen(h, bw3[0], ci, si)
    rf = reference.bitlinear_frozen(h, bw3[1], cf, sf)
    rg = reference.bitlinear_frozen(h, bw3[2], cg, sg)
    o_ref, s_ref = reference.mlgru_step_ref(ri, rf, rg, state, lb, gnw, eps)
    r_ref = x + reference.bitlinear_frozen(o_ref, bwo[0], co, so)
    cgu = rand_codes(2 * ffn, d, g)
    sgu = torch.tensor(1.3)
    bgu = nrm(d)[None]
    v_ref = _glu_ref(reference.bitlinear_frozen(r_ref, bgu[0], cgu, sgu), dtype)
    # kernels
    ifg = torch.empty(m, 3 * d, dtype=dtype)
    sc3 = ternary_gemv.Scratch(3, m, d, "cpu")
    sc1 = ternary_gemv.Scratch(1, m, d, "cpu")
    s_out = torch.empty(m, d)
    r = torch.empty(m, d, dtype=dtype)
    v = torch.empty(m, ffn, dtype=dtype)
    scales = torch.stack([si, sf, sg]).float()
    if m <= ternary_gemv.GEMV_MAX_ROWS:
        ternary_gemv.gemv(x, [pi, pf, pg], scales, bw3, ifg, pro=ternary_gemv.PRO_NORM, norm_weight=attn_w,
                          scratch=sc3)
        ternary_gemv.gemv(ifg, [po], so.reshape(1), bwo, r, pro=ternary_gemv.PRO_MLGRU, k=d, norm_weight=gnw,
                          s_in=state, s_out=s_out, lower_bound=lb, residual=x, epi=ternary_gemv.EPI_RESIDUAL,
                          scratch=sc1)
        ternary_gemv.gemv(r, [pack_i2(cgu)], sgu.reshape(1), bgu, v, pro=ternary_gemv.PRO_NORM,
                          norm_weight=attn_w * 0 + 1, epi=ternary_gemv.EPI_GLU, scratch=ternary_gemv.Scratch(1, m, d, "cpu"))
    else:
        ternary_gemm.quantize(x, bw3, sc3, nseg=3, pro=ternary_gemv.PRO_NORM, norm_weight=attn_w, chunks=chunks)
        ternary_gemm.gemm(sc3, [pi, pf, pg], scales, ifg, k=d)
        ternary_gemm.quantize(ifg, bwo, sc1, pro=ternary_gemv.PRO_MLGRU, k=d, norm_weight=gnw, s_in=state,
                              s_out=s_out, lower_bound=lb, chunks=chunks)
        ternary_gemm.gemm(sc1, [po], so.reshape(1), r, k=d, epi=ternary_gemv.EPI_RESIDUAL, residual=x)
        sc = ternary_gemv.Scratch(1, m, d, "cpu")
        ternary_gemm.quantize(r, bgu, sc, pro=ternary_gemv.PRO_NORM, norm_weight=attn_w * 0 + 1, chunks=chunks)
        ternary_gemm.gemm(sc, [pack_i2(cgu)], sgu.reshape(1), v, k=d, epi=ternary_gemv.EPI_GLU)
    check_rows(ifg[:, :d], ri, dtype)
    check_rows(ifg[:, 2 * d:], rg, dtype)
    assert rel(s_out, s_ref) < 1e-5 if dtype == torch.float32 else rel(s_out, s_ref) < 2e-2
    check_rows(r, r_ref, dtype, max_bad_rows=1 if dtype != torch.float32 else 0)
    # GLU input: r from the kernel, so the check isolates the GLU epilogue
    h2 = reference.rms_norm(r, attn_w * 0 + 1, eps)
    check_rows(v, _glu_ref(reference.bitlinear_frozen(h2, bgu[0], cgu, sgu), dtype), dtype)


def _xq_bytes(sc, k):
    """(NSEG, M, K) int8 quantised activations from the scratch's planar words."""
    p = ternary_gemv.packed_bytes(k)
    b = sc.xq.view(torch.int8).reshape(sc.xq.shape[0], sc.xq.shape[1], 4, -1)[..., :p]
    return b.reshape(sc.xq.shape[0], sc.xq.shape[1], -1)[..., :k]


@pytest.mark.parametrize("pro", [ternary_gemv.PRO_PLAIN, ternary_gemv.PRO_NORM, ternary_gemv.PRO_GATED,
                                 ternary_gemv.PRO_MLGRU])
@pytest.mark.parametrize("m,k,nseg,chunks", [(3, 300, 1, 4), (2, 77, 3, 2), (5, 1000, 2, 8), (1, 4100, 1, 16)])
# the interpreter's barrier emulation: a launch before the last reads the parts the launch before it left,
# which may be stale (NaN in a max); the last launch reads only parts of complete reductions
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_quantize_split_rows_match_whole_rows(pro, m, k, nseg, chunks):
    """The pre-pass with each row split over ``chunks`` programs (partial reductions met in fixed order)
    against whole rows: same s_x (to fp32 rounding), int8 values within one rounding flip, sum(xq)
    consistent with them, the same MLGRU state; odd K (padded words, chunks with no weight column)."""
    g = torch.Generator().manual_seed(pro * 100 + k)
    width = 3 * k if pro == ternary_gemv.PRO_MLGRU else k
    x = torch.randn(m, width, generator=g) * 2
    gate = torch.randn(m, k, generator=g)
    bn = torch.rand(nseg, k, generator=g) + 0.5
    kw = dict(nseg=nseg, pro=pro, k=k, norm_weight=torch.rand(k, generator=g) + 0.5,
              g=gate if pro == ternary_gemv.PRO_GATED else None, s_in=torch.randn(m, k, generator=g),
              lower_bound=torch.rand(k, generator=g) * 0.5 if pro == ternary_gemv.PRO_MLGRU else None)
    runs = []
    for c in (1, chunks):
        sc = ternary_gemv.Scratch(nseg, m, k, "cpu")
        s_out = torch.zeros(m, k)
        ternary_gemm.quantize(x, bn, sc, s_out=s_out, chunks=c, **kw)
        runs.append((sc, s_out))
    (whole, s_whole), (split, s_split) = runs
    assert torch.allclose(split.sx, whole.sx, rtol=1e-6, atol=0)
    qa, qb = _xq_bytes(whole, k).int(), _xq_bytes(split, k).int()
    assert (qa - qb).abs().max().item() <= 1 and (qa != qb).float().mean().item() < 0.01
    assert torch.equal(split.row_sums(), qb.sum(-1).int()) and torch.equal(whole.row_sums(), qa.sum(-1).int())
    if pro == ternary_gemv.PRO_MLGRU:
        assert torch.equal(s_split, s_whole)
    # every barrier moves a row's counter by 16 whatever the split, so the next launch may split rows
    # differently (the plain prologue has one barrier, the others two)
    assert (split.ctr % ternary_gemv.QUANT_MAX_CHUNKS == 0).all() and (split.ctr > 0).all()
    if pro == ternary_gemv.PRO_PLAIN:
        for c in (2, 16):
            ternary_gemm.quantize(x, bn, split, s_out=torch.zeros(m, k), chunks=c, **kw)
            assert (split.ctr % ternary_gemv.QUANT_MAX_CHUNKS == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mlgru_step_matches_composition(dtype):
    g = torch.Generator().manual_seed(3)
    B, D = 3, 67
    ip, fp, gp = (torch.randn(B, D, generator=g).to(dtype) for _ in range(3))
    state = torch.randn(B, D, generator=g)
    lb = torch.rand(D, generator=g) * 0.8
    w = (torch.rand(D, generator=g) + 0.5).to(dtype)
    for lower in (lb, None):
        o, s = mlgru_step(ip, fp, gp, state, lower, w, 1e-6)
        o_ref, s_ref = reference.mlgru_step_ref(ip, fp, gp, state, lower, w, 1e-6)
        assert s.dtype == torch.float32 and o.dtype == dtype
        assert rel(s, s_ref) < 1e-6
        assert rel(o, o_ref) < TOL[dtype]


# chunked: the interpreter's chunks are 8 steps (SCAN_BT) and its carry pass takes 4 at a time (SCAN_BC): T = 21
# and 40 cross several chunks, 40 two carry blocks; 70 channels are two channel blocks
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("T", [1, 5, 21, 40])
def test_gated_scan_matches_composition(T, chunked):
    g = torch.Generator().manual_seed(T)
    B, D = 2, 70
    ifp = torch.randn(B, T, 3 * D, generator=g)
    ip, fp = ifp[..., :D], ifp[..., D:2 * D]
    lb = torch.rand(D, generator=g) * 0.8
    s0 = torch.randn(B, D, generator=g)
    for state, lower in ((None, lb), (s0, lb), (s0, None)):
        S, last = mlgru_gated_scan(ip, fp, lower, state, chunked=chunked)
        i, f = reference.mlgru_gates(ip, fp, lower)
        S_ref, last_ref = reference.mlgru_scan(i, f, state)
        assert rel(S, S_ref) < 1e-5 and rel(last, last_ref) < 1e-5


def _rel_rows(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm(dim=-1) / b.norm(dim=-1))


@pytest.mark.parametrize("batch,packed", [(2, False), (3, True)])
def test_graph_decoder_matches_eager_model(batch, packed):
    """GraphDecoder (GEMV path for batch <= 2, GEMM path above) vs the eager reference model."""
    from conftest import small_model

    from mmf.ternary_codes import pack_i2
    from mmf.decode_graph import GraphDecoder
    from mmf.models.hgrn_bit import FrozenBitLinear

    model = small_model("mmf", seed=batch, intermediate_size=90).freeze()
    if packed:  # the form a packed checkpoint loads into
        for mod in model.modules():
            if isinstance(mod, FrozenBitLinear):
                mod.packed, mod.codes = pack_i2(mod.codes), None
    torch.manual_seed(batch)
    ids = torch.randint(3, 259, (batch, 7))
    dec = GraphDecoder(model, batch)
    assert dec.graph is None  # no graph on the CPU
    logits = dec.prefill(ids)
    ref = model(ids)
    assert _rel_rows(logits, ref.logits[:, -1]).max() < 1e-4
    cache, tokens, ref_tokens = ref.cache, [], []
    ref_logits = ref.logits[:, -1]
    for _ in range(2 if batch <= 2 else 1):
        nxt = ref_logits.argmax(-1)
        ref_tokens.append(nxt)
        tokens.append(logits.argmax(-1))
        logits = dec.step(tokens[-1]).clone()
        out = model(nxt[:, None], cache)
        cache, ref_logits = out.cache, out.logits[:, -1]
        assert _rel_rows(logits, ref_logits).median() < 1e-4
    assert torch.equal(torch.stack(tokens), torch.stack(ref_tokens))
    if batch <= 2:
        gen = dec.generate(ids, 2)
        assert gen.shape == (batch, 9) and torch.equal(gen[:, 7:], torch.stack(ref_tokens, 1))


def test_graph_decoder_timing_pools():
    """Every GEMV shape is tuned over at least ``TIMING_POOL`` weight sets of its shape: the layers' own
    and, for the LM head (one set) and shapes of fewer layers, disjoint views of the embedding
    table's memory (nothing allocated)."""
    from conftest import small_model

    from mmf.decode_graph import GraphDecoder

    dec = GraphDecoder(small_model("mmf", seed=4).freeze(), 1)
    emb = dec.emb
    lo, hi = emb.data_ptr(), emb.data_ptr() + emb.numel() * emb.element_size()
    assert sorted(dec._tune_pools) == ["down", "gu", "head", "ifg", "o"]
    spans = []
    for key, pool in dec._tune_pools.items():
        assert len(pool) == GraphDecoder.TIMING_POOL, key
        own = 1 if key == "head" else dec.L
        for entry in pool:
            assert [w.shape for w in entry] == [w.shape for w in pool[0]]
        if key == "head":
            assert pool[0][0] is dec.head.packed
        else:  # the layers' own weights first
            assert all(pool[l][0] is (ly["ifg"][0] if key == "ifg" else ly[key].packed) for l, ly in enumerate(dec.layers))
        for entry in pool[own:]:
            for w in entry:
                assert w.dtype == torch.uint8 and lo <= w.data_ptr() and w.data_ptr() + w.numel() <= hi
                spans.append((key, w.data_ptr(), w.data_ptr() + w.numel()))
    for key in {k for k, _, _ in spans}:  # within one shape's pool the stand-ins do not overlap
        s = sorted((a, b) for k, a, b in spans if k == key)
        assert all(b0 <= a1 for (_, b0), (a1, _) in zip(s, s[1:])), key


def test_generate_graph_path_matmul_free():
    """generate_ids(graph=True) on a frozen MatMul-free model drives GraphDecoder (its Triton kernels;
    no graph on the CPU): with a seed, the eager path's sampled tokens (greedy agreement of the
    decoder itself: test_graph_decoder_matches_eager_model)."""
    from conftest import small_model

    from mmf.generate import generate_ids

    model = small_model("mmf", seed=4, intermediate_size=90).freeze()
    prompt = torch.randint(3, 259, (3,), generator=torch.Generator().manual_seed(4)).tolist()
    kw = dict(temperature=0.8, top_p=0.9, seed=1)
    assert generate_ids(model, prompt, 2, graph=True, **kw) == generate_ids(model, prompt, 2, **kw)


def test_quant_chunks_fit_the_gpu_and_the_decoder_splits_only_wide_small_batches():
    """Split rows: a power of two, at least 64 words a program, the whole grid resident at once; the
    decoder asks for a split only where it measured faster (wide rows, small batches)."""
    for rows in (1, 3, 4, 12, 16, 48, 64, 192):
        for pw in (3, 96, 256, 320, 512, 1280, 3456):
            c = ternary_gemm.quant_chunks(rows, pw)
            assert c & (c - 1) == 0 and c <= ternary_gemv.QUANT_MAX_CHUNKS
            assert c == 1 or (rows * c <= ternary_gemm.QUANT_PROGRAMS and pw >= c * 64)
    assert ternary_gemm.quant_chunks(4, 3456) == 16 and ternary_gemm.quant_chunks(192, 3456) == 1
    assert ternary_gemm.decode_quant_chunks(4, 5120) is None
    assert ternary_gemm.decode_quant_chunks(64, 5120) == 1 and ternary_gemm.decode_quant_chunks(4, 2048) == 1


@pytest.mark.parametrize("swap", [0, 1])
def test_gemm_split_k(swap):
    """Split-K (K in 2 or 3 parts per tile, met in a workspace by the tile's last program): the same output
    bit for bit as one part, plain with 2 segments, residual and GLU pair; partial tiles, a short last part;
    the counters are left at zero for the next launch. The split launches run on the least row tile for 3 rows
    (``decode_row_tile``: 4), the one-part launches on 16 rows: the integer sums, so the outputs, are the same."""
    g = torch.Generator().manual_seed(31 + swap)
    m, n, k = 3, 70, 530  # 133 bytes: five BK = 32 blocks (the last partial); 70 rows: two tiles of 64
    x = torch.randn(m, k, generator=g).to(torch.float16)
    nw = (torch.rand(2, k, generator=g) + 0.5).to(torch.float16)
    codes = [rand_codes(2 * n, k, g) for _ in range(2)]
    packed = [pack_i2(c) for c in codes]
    sw = torch.tensor([0.9, 1.3])
    res = torch.randn(m, 4 * n, generator=g).to(torch.float16)
    sc = ternary_gemv.Scratch(2, m, k, "cpu")
    ternary_gemm.quantize(x, nw, sc, nseg=2)
    for split in (2, 3):
        assert ternary_gemm.split_parts(133, 32, split)[0] == split
        for epi, kw, shape in ((ternary_gemv.EPI_STORE, {}, (m, 4 * n)),
                               (ternary_gemv.EPI_RESIDUAL, {"residual": res}, (m, 4 * n)),
                               (ternary_gemv.EPI_GLU, {}, (m, n))):
            ws = packed if epi != ternary_gemv.EPI_GLU else packed[:1]
            sws = sw if epi != ternary_gemv.EPI_GLU else sw[:1]
            want = torch.full(shape, float("nan"), dtype=torch.float16)
            got = torch.full(shape, float("nan"), dtype=torch.float16)
            ternary_gemm.gemm(sc, ws, sws, want, k=k, epi=epi, config=(16, 64, 32, 4, 1, swap), **kw)
            ternary_gemm.gemm(sc, ws, sws, got, k=k, epi=epi, config=(ternary_gemm.decode_row_tile(m, 4), 64, 32, 4, 1,
                                                                       swap, split), **kw)
            assert torch.equal(got, want), (split, epi)
            assert int(ternary_gemm._SPLIT_BUF["cpu"][1].abs().sum()) == 0
    ref = reference.bitlinear_frozen(x, nw[0], codes[0], sw[0])
    check_rows(want, _glu_ref(ref, torch.float16), torch.float16)


@pytest.mark.parametrize("swap", [0, 1])
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the NaN statistics at the end
def test_gemm_row_stats_feed_the_next_pre_pass(swap):
    """A GEMM's epilogue leaves its output's per-tile row statistics (``RowStats``): sum(out^2) of one
    segment, and max|out * w| for a plain pre-pass; the pre-pass that reads them instead of reducing the
    row quantises as the one that does (s_x to fp32 rounding, int8 values within one rounding flip, the
    same MLGRU state), with rows whole or split, for the MLGRU, norm and plain prologues; two column tiles
    (70 rows in tiles of 64) and a split-K schedule."""
    g = torch.Generator().manual_seed(41 + swap)
    m, d, k = 3, 70, 530
    x = torch.randn(m, k, generator=g).to(torch.float16)
    nw = (torch.rand(3, k, generator=g) + 0.5).to(torch.float16)
    packed = [pack_i2(rand_codes(2 * d, k, g)) for _ in range(3)]
    sw = torch.tensor([0.9, 1.3, 1.1])
    sc = ternary_gemv.Scratch(3, m, k, "cpu")
    ternary_gemm.quantize(x, nw, sc, nseg=3)
    bw = (torch.rand(1, d, generator=g) + 0.5).to(torch.float16)
    state, lb = torch.randn(m, d, generator=g), torch.rand(d, generator=g) * 0.5
    res = torch.randn(m, d, generator=g).to(torch.float16)
    for cfg in ((16, 64, 32, 4, 1, swap), (4, 64, 32, 4, 1, swap, 3)):  # 16 rows; the least tile for 3 rows
        cases = (  # (producer kwargs, output shape, stats weight, segment, consumer prologue kwargs)
            (dict(weights=[p[:d] for p in packed], scales=sw), (m, 3 * d), None, 2,
             dict(pro=ternary_gemv.PRO_MLGRU, s_in=state, lower_bound=lb, norm_weight=nw[0, :d])),
            (dict(weights=[packed[0][:d]], scales=sw[:1], epi=ternary_gemv.EPI_RESIDUAL, residual=res), (m, d), None,
             0, dict(pro=ternary_gemv.PRO_NORM, norm_weight=nw[1, :d])),
            (dict(weights=[packed[1]], scales=sw[1:2], epi=ternary_gemv.EPI_GLU), (m, d), bw[0], 0, {}))
        for prod, shape, w, seg, pro_kw in cases:
            out = torch.full(shape, float("nan"), dtype=torch.float16)
            st = ternary_gemm.RowStats(m, d, "cpu")
            ternary_gemm.gemm(sc, prod.pop("weights"), prod.pop("scales"), out, k=k, config=cfg,
                              stats_out=(st, w, seg), **prod)
            assert st.nt == 2
            o = out[:, seg * d:(seg + 1) * d].float()
            parts = st.buf[:2 * 2 * m].view(2, 2, m)
            assert torch.allclose(parts[0].sum(0), (o * o).sum(-1), rtol=1e-5)
            if w is not None:
                assert torch.equal(parts[1].max(0).values, (o * w.float()).abs().max(-1).values)
            inp = out if pro_kw.get("pro") == ternary_gemv.PRO_MLGRU else o.to(torch.float16)
            for chunks in (1, 2):
                runs = []
                for stats in (None, st):
                    q = ternary_gemv.Scratch(1, m, d, "cpu")
                    s_out = torch.zeros(m, d)
                    ternary_gemm.quantize(inp, bw, q, k=d, s_out=s_out, chunks=chunks, stats=stats, **pro_kw)
                    runs.append((q, s_out))
                (a, sa), (b, sb) = runs
                assert torch.allclose(b.sx, a.sx, rtol=1e-5, atol=0), (cfg, seg, chunks)
                qa, qb = _xq_bytes(a, d).int(), _xq_bytes(b, d).int()
                assert (qa - qb).abs().max().item() <= 1 and (qa != qb).float().mean().item() < 0.02
                assert torch.equal(b.row_sums(), qb.sum(-1).int())
                assert torch.equal(sa, sb)
            st.buf.fill_(float("nan"))  # the statistics are read (a wrong scale would cancel in the norms)
            ternary_gemm.quantize(inp, bw, b, k=d, s_out=torch.zeros(m, d), stats=st, **pro_kw)
            assert not torch.allclose(b.sx, a.sx, rtol=1e-3), (cfg, seg)


def _decode_like_eager(dec, model, ids, steps=2):
    """``dec``'s greedy tokens and logits follow the eager model's for ``steps`` steps after the prefill."""
    logits = dec.prefill(ids)
    out = model(ids)
    cache, ref_logits = out.cache, out.logits[:, -1]
    for _ in range(steps):
        nxt = ref_logits.argmax(-1)
        assert torch.equal(logits.argmax(-1), nxt)
        logits = dec.step(nxt).clone()
        out = model(nxt[:, None], cache)
        cache, ref_logits = out.cache, out.logits[:, -1]
        assert _rel_rows(logits, ref_logits).median() < 1e-4


def test_graph_decoder_with_row_stats(monkeypatch):
    """The decoder path whose pre-passes read their producers' row statistics (the one for wide rows at
    small batches, forced here on a small model) gives the eager model's greedy tokens; so does the GPU
    benchmarks' comparison with the decoder that keeps none."""
    from conftest import small_model

    from mmf.bench.kernel_bench import _decoder_pair, row_stats_errors
    from mmf.decode_graph import GraphDecoder

    monkeypatch.setattr(ternary_gemm, "QUANT_SPLIT_MIN_K", 1)
    model = small_model("mmf", seed=5, intermediate_size=90).freeze()
    torch.manual_seed(5)
    ids = torch.randint(3, 259, (3, 7))
    dec = GraphDecoder(model, 3)
    assert dec.row_stats is not None
    _decode_like_eager(dec, model, ids)
    errs = row_stats_errors(dec)  # what the last step left, against its buffers (the GPU benchmarks' check)
    assert set(errs) == {"g_sumsq_max_rel_err", "r_sumsq_max_rel_err", "v_sumsq_max_rel_err", "x_sumsq_max_rel_err",
                         "v_maxabs_exact"}
    assert errs["v_maxabs_exact"] and max(v for k, v in errs.items() if k.endswith("err")) < 1e-5
    res = _decoder_pair(model, 3, dict(ROW_STATS="always"), dict(ROW_STATS="never"), steps=2)
    assert res["greedy_same_vs_without"] == "6/6" and res["greedy_same_vs_eager"] == "6/6"
    assert res["median_rel_err_vs_eager"] < 1e-4 and res["v_maxabs_exact"]
    monkeypatch.setattr(GraphDecoder, "ROW_STATS", "never")
    assert GraphDecoder(model, 3).row_stats is None
    monkeypatch.setattr(ternary_gemm, "QUANT_SPLIT_MIN_K", 1 << 30)  # whole rows: statistics only if "always"
    assert GraphDecoder(model, 3).row_stats is None
    monkeypatch.setattr(GraphDecoder, "ROW_STATS", "always")
    assert GraphDecoder(model, 3).row_stats is not None


def test_decode_gemm_chain_rows(monkeypatch):
    """``decode_gemm_chain.measure_shape`` (the GPU benchmark of the (pre-pass, GEMM) pairs) run on the
    interpreter with its CUDA-graph timer replaced by one call of each launch: every schedule's output equal
    to the first's, and the pair chain two launches per weight set, for a residual and a GLU shape."""
    from mmf.bench import decode_gemm_chain

    def one_call_each(fns):
        for fn in fns:
            fn()
        return 1e-3

    monkeypatch.setattr(ternary_gemv, "chain_ms", one_call_each)
    gen = torch.Generator().manual_seed(3)
    for name, epi, n in (("o", ternary_gemv.EPI_RESIDUAL, 70), ("gate/up", ternary_gemv.EPI_GLU, 40)):
        (row,) = decode_gemm_chain.measure_shape(name, 1, n, 130, epi, [4], 2, 4.2e12, 130, gen, dev="cpu")
        assert row["all_equal"] and row["pair_us"] == 2.0 and row["quant_us"] == 1.0, row


def test_graph_decoder_with_the_early_weights(monkeypatch):
    """The decoder with ``EARLY_WEIGHTS`` (here: the interpreter's schedule with one K block per program, its
    weights loaded before the wait) gives logits equal bit for bit to the decoder without them, over a prefill
    and two steps at batch 3, and the kernels were launched with them; so does the one whose steps run the
    4-row tile (``DECODE_ROW_TILE_MIN`` 4, the default; the others run the 16-row tile it replaced). By default
    (``EARLY_WEIGHTS`` None) the decoder asks for the weights-early schedules up to ``EARLY_WEIGHTS_MAX_D`` wide
    and not beyond."""
    from conftest import small_model

    from mmf.decode_graph import GraphDecoder

    model = small_model("mmf", seed=8, intermediate_size=90).freeze()
    torch.manual_seed(8)
    ids = torch.randint(3, 259, (3, 5))
    launches = _Launches(ternary_gemm._gemm_kernel)
    monkeypatch.setattr(ternary_gemm, "_gemm_kernel", launches)
    # (settings, the decoder's widest model for weights-early schedules, WEARLY expected in prefill and steps):
    # forced on, every GEMM of 16 rows or less takes them (the prefill's 15 rows too); asked for by the decoder,
    # its decode steps only; and with the least row tile 4 (``DECODE_ROW_TILE_MIN``), the steps' 3 rows on a
    # 4-row tile
    t16, t4 = {"DECODE_ROW_TILE_MIN": 16}, {"DECODE_ROW_TILE_MIN": 4}
    settings = (({"EARLY_WEIGHTS": True} | t16, 0, (True, True)),
                ({"EARLY_WEIGHTS": None} | t16, model.config.hidden_size - 1, (False, False)),
                ({"EARLY_WEIGHTS": None} | t16, GraphDecoder.EARLY_WEIGHTS_MAX_D, (False, True)),
                ({"EARLY_WEIGHTS": True} | t4, 0, (True, True)))
    assert model.config.hidden_size <= GraphDecoder.EARLY_WEIGHTS_MAX_D
    decs = []
    for st, max_d, _ in settings:
        for k, v in st.items():
            monkeypatch.setattr(ternary_gemm, k, v)
        decs.append(GraphDecoder(model, 3))
        decs[-1].EARLY_WEIGHTS_MAX_D = max_d
    assert not decs[0].gemv_path
    tok = None
    for step in range(3):
        outs = []
        for (st, _, wearly), dec in zip(settings, decs):
            for k, v in st.items():  # read at each launch
                monkeypatch.setattr(ternary_gemm, k, v)
            launches.kw.clear()
            outs.append(dec.prefill(ids) if step == 0 else dec.step(tok))
            assert launches.kw and all(kw["WEARLY"] == wearly[step > 0] for kw in launches.kw), (step, wearly)
            bm = st["DECODE_ROW_TILE_MIN"]  # 3 rows: the steps, and the prefill's head (its last tokens)
            want = [bm] * len(launches.kw) if step > 0 else [16] * (len(launches.kw) - 1) + [bm]
            assert [kw["BM"] for kw in launches.kw] == want, (step, st)
        assert torch.isfinite(outs[0]).all() and all(torch.equal(outs[0], o) for o in outs[1:]), step
        tok = outs[0].argmax(-1)


def test_decode_breakdown_gemm_variants_do_what_they_say():
    """decode_breakdown's batched variants are text edits of ternary_gemm: each builds a kernel that runs, and
    removes the work its name says (the interpreter has no programmatic dependent launch, so ``nowait``'s
    output is the base's there)."""
    from mmf.bench import decode_breakdown

    variants = decode_breakdown._Variants(ternary_gemm, {}, gemm=True)
    g = torch.Generator().manual_seed(77)
    m, n, k = 5, 23, 150
    x = torch.randn(m, k, generator=g) * 2
    nw = torch.rand(1, k, generator=g) + 0.5
    packed = pack_i2(rand_codes(n, k, g))
    sw = torch.tensor([0.9])

    def run(mod):
        sc = ternary_gemv.Scratch(1, m, k, "cpu")
        sc.xq.fill_(0x01020301)  # codes of a stale scratch: what a pre-pass that does not run leaves
        sc.sx.fill_(3.0)
        sc.sumx.fill_(11)
        before = (sc.xq.clone(), sc.sx.clone(), sc.sumx.clone())
        mod.quantize(x, nw, sc)
        untouched = all(torch.equal(a, b) for a, b in zip(before, (sc.xq, sc.sx, sc.sumx)))
        out = torch.full((m, n), float("nan"))
        mod.gemm(sc, [packed], sw, out, k=k)
        return out, untouched, sc

    base, untouched, sc = run(ternary_gemm)
    assert not untouched and torch.isfinite(base).all()
    outs = {}
    for name in decode_breakdown.GEMM_VARIANTS:
        outs[name] = run(variants.module(name))
    assert torch.equal(outs["base"][0], base) and torch.equal(outs["nowait"][0], base)
    for name in ("noprepass", "noquant"):  # the stale scratch read as it was
        out, untouched, _ = outs[name]
        assert untouched and torch.isfinite(out).all() and not torch.equal(out, base), name
    out = outs["nounpack"][0]
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    # without the epilogue's loads the output is the integer sum itself: base * s_x * s_w + sum(xq)
    acc = base.double() * sc.sx[0, :, None].double() * sw.double() + sc.sumx[0, :, None].double()
    assert torch.allclose(outs["noepiload"][0].double(), acc, rtol=1e-4, atol=1e-2)
    assert torch.isnan(outs["nogemm"][0]).all()  # the output never written


@pytest.mark.parametrize("chunks", [1, 2])
def test_gemm_early_weights_are_bit_equal(monkeypatch, chunks):
    """The ``EARLY_WEIGHTS`` schedules (one K block per program, its weights loaded before the wait, no loop)
    give their K loop's output bit for bit, through the GPU check's comparison (``kernel_bench.gemm_pair_cases``):
    every epilogue, both operand orders, odd K over two blocks (so two programs per tile), and with ``chunks`` 2
    sum(xq) in the parts a split pre-pass leaves."""
    from mmf.bench import kernel_bench as kb

    pairs = kb.early_weight_pairs([(16, 64, 32, 4, 1, 0, 0, 1), (8, 32, 32, 4, 1, 1, 0, 1)])  # 16 rows; the least for 5
    launches = _Launches(ternary_gemm._gemm_kernel)
    monkeypatch.setattr(ternary_gemm, "_gemm_kernel", launches)
    rows = kb.gemm_pair_cases([(70, 150)], (5,), pairs, "cpu", chunks=chunks)
    # the schedules reached the kernel: 4 shapes x (2 launches with WEARLY, 2 without)
    assert [kw["WEARLY"] for kw in launches.kw] == [False, True] * (4 * 2)
    assert len(rows) == 4 * len(pairs) and all(r["pre_pass_programs_per_row"] == chunks for r in rows)
    bad = [r for r in rows if not (r["bit_equal"] and r["outputs_written"])]
    assert not bad, bad
