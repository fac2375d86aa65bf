"""Ternary quantisation of latent weights into packed codes, and its exact inverse.

``quantize_pack`` is ``kernels.reference.weight_quant`` (docs/reference-semantics.md: s_w = 1 / max(mean|W|,
1e-5), w = clamp(round(W * s_w), -1, 1)) followed by the packing of ``mmf.ternary_codes``, bit for bit,
streamed over cache-sized row chunks. ``dequantize_exact`` goes back: float weights that re-quantise to
the same codes and the same s_w (docs/formats.md section 7; the naive ``codes / s_w`` does not).
``mmf pack``, ``unpack`` and ``inspect`` (``mmf.converters.packing``) use both; the file format they
write and read is ``mmf.packed_format``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import Optional

import torch

from mmf.errors import CheckpointError, MMFError
from mmf.kernels.reference import WEIGHT_CLAMP_MIN
from mmf.packed_format import FORMATS
from mmf.ternary_codes import BASE_CODE_BYTE, DIGIT_WEIGHT, GROUP, packed_row_bytes, unpack_codes

CHUNK_ELEMENTS = 1 << 20                   # weights per step of the quantiser; each torch op on a chunk runs on
                                           # torch's intra-op threads. 13b-shaped tensors, 2 idle cores, ns/weight:
                                           # 2^18: 1.2, 2^20: 1.1, 2^22: 1.2; the same ops spread over Python
                                           # threads (2^18 chunks) took 2.5-3.4 (GIL hand-offs between short ops)

_SIGN_BIT = {torch.int16: -(1 << 15), torch.int32: -(1 << 31)}
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
_MAX_FINITE_BITS = {torch.float16: 0x7BFF, torch.bfloat16: 0x7F7F, torch.float32: 0x7F7FFFFF}


# ---- torch threads for the elementwise passes ------------------------------------------------------

_ELEMENTWISE_THREADS: Optional[int] = None  # set per tensor by pack's ThreadTuner; None: torch's own


def _elementwise(fn):
    """Run ``fn`` (elementwise torch ops only: no reduction whose rounding depends on the thread count)
    with ``_ELEMENTWISE_THREADS`` intra-op threads, restoring the caller's count afterwards."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        n, old = _ELEMENTWISE_THREADS, torch.get_num_threads()
        if n is None or n == old:
            return fn(*args, **kwargs)
        torch.set_num_threads(n)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(old)
    return run


class ThreadTuner:
    """Per tensor shape, whether the elementwise passes run on all of torch's threads or on one.

    On 2 idle cores two threads are ~1.8x faster (13b shapes: 1.0-1.15 vs 0.56-0.62 GB/s), but while
    another process keeps a core busy they are slower than one (each op's barrier waits for the
    descheduled thread; 1.3b pack with a busy-loop beside it: 0.19 GB/s on 2 threads, 0.35 on 1).
    So (in ``pack``) each shape is timed with both and one thread is used only where it was clearly
    faster (by ``MARGIN``: per-tensor timings are noisy while the disk works, and one thread alone
    cannot keep up with the disk), the other setting re-tried every ``RETRY``-th time. 13b pack: idle,
    0.660 GB/s tuned vs 0.657 on all threads; beside a busy loop, 0.361 vs 0.226. The absmean
    ``.mean()`` always runs with the caller's thread count (its fp32 summation order depends on it;
    ``_elementwise`` wraps only passes without reductions).
    """

    RETRY = 16
    MARGIN = 1.4  # all threads unless one thread took less than 1 / MARGIN of their time

    def __init__(self):
        self.full = torch.get_num_threads()
        self.seconds_per_element: dict = {}
        self.seen: dict = {}

    def _choose(self, key) -> int:
        k = self.seen[key] = self.seen.get(key, 0) + 1
        a, b = self.seconds_per_element.get((key, self.full)), self.seconds_per_element.get((key, 1))
        if self.full <= 1 or a is None:
            return self.full
        if b is None:
            return 1
        best, other = (self.full, 1) if a <= b * self.MARGIN else (1, self.full)
        return other if k % self.RETRY == 0 else best

    @contextlib.contextmanager
    def run(self, key, elements: int):
        """Context manager: the elementwise passes of one tensor, timed."""
        global _ELEMENTWISE_THREADS
        n = _ELEMENTWISE_THREADS = self._choose(key)
        t0 = time.perf_counter()
        try:
            yield
            self.seconds_per_element[(key, n)] = (time.perf_counter() - t0) / max(elements, 1)
        finally:
            _ELEMENTWISE_THREADS = None


# ---- quantisation: exactly kernels.reference.weight_quant, streamed over row chunks ---------------

def absmean_scale(w: torch.Tensor, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """s_w = 1 / max(mean|float(w)|, 1e-5), the same torch ops on the same values as ``weight_quant``.

    ``scratch`` (fp32, at least ``w.numel()``) is reused across tensors to avoid page faults.
    """
    n = w.numel()
    if scratch is None or scratch.numel() < n:
        scratch = torch.empty(n, dtype=torch.float32)
    wf = scratch[:n].view(w.shape)
    _abs_float(w, wf)
    # the reduction itself is torch's, over the whole tensor, as in weight_quant (its summation order
    # depends on the tensor's size and the thread count, so it is not re-implemented here)
    return 1.0 / wf.mean().clamp(min=WEIGHT_CLAMP_MIN)


@_elementwise
def _abs_float(w: torch.Tensor, wf: torch.Tensor) -> None:
    """wf = |float(w)| (fp32), by row chunks that stay in cache: elementwise, so chunking cannot change a bit."""
    if w.dim() == 2 and w.is_contiguous():
        rows = max(1, CHUNK_ELEMENTS // max(w.shape[1], 1))
        for a in range(0, w.shape[0], rows):
            torch.abs(wf[a:a + rows].copy_(w[a:a + rows]), out=wf[a:a + rows])
    else:
        wf.copy_(w)
        wf.abs_()


def zero_threshold_bits(dtype: torch.dtype, s_w: torch.Tensor) -> int:
    """The largest magnitude bit pattern b of ``dtype`` with fl32(value(b) * s_w) <= 0.5.

    ``round(clamp(x * s_w))`` is non-zero exactly when |x| > value(b): rounding is half-to-even,
    so 0.5 itself rounds to 0, and fl32 multiplication is monotone and symmetric in sign.
    """
    iv = _INT_VIEW[dtype]
    lo, hi = 0, _MAX_FINITE_BITS[dtype]

    def small(bits: int) -> bool:
        x = torch.tensor([bits], dtype=iv).view(dtype).float()
        return bool((x * s_w)[0] <= 0.5)

    if small(hi):
        return hi
    while hi - lo > 1:  # invariant: small(lo), not small(hi)
        mid = (lo + hi) // 2
        if small(mid):
            lo = mid
        else:
            hi = mid
    return lo


def quantize_pack(w: torch.Tensor, fmt: str, name: str = "tensor", scratch: Optional[torch.Tensor] = None):
    """Ternary-quantise a latent (N, K) weight and pack it.

    Returns ``(packed uint8 (N, ceil(K/G)), s_w fp32 0-d, counts (n_minus, n_zero, n_plus))`` with
    codes and s_w bit-identical to ``kernels.reference.weight_quant(w)`` followed by
    ``ternary_codes.pack_<fmt>``. Raises CheckpointError naming ``name`` on NaN/inf.
    """
    if fmt not in FORMATS:
        raise MMFError(f"unknown packed format {fmt!r}; use one of {', '.join(FORMATS)}")
    if w.dim() != 2:
        raise CheckpointError(f"tensor {name}: a BitLinear weight must be 2-D (N, K), got shape {tuple(w.shape)}")
    if w.dtype not in _INT_VIEW:
        w = w.float()  # weight_quant's first step
    w = w.contiguous()
    n_rows, k = w.shape
    s_w = absmean_scale(w, scratch)
    if not (bool(torch.isfinite(s_w)) and float(s_w) > 0):
        raise CheckpointError(f"tensor {name}: contains NaN or inf (mean|W| is not finite); "
                              "the checkpoint is damaged, retrain or re-export it")
    p = packed_row_bytes(k, fmt)
    tb = zero_threshold_bits(w.dtype, s_w)
    out = torch.empty(n_rows, p, dtype=torch.uint8)
    if _INT_VIEW[w.dtype] == torch.int16 and k % 2 == 0 and p % 2 == 0 and w.data_ptr() % 4 == 0:
        n_plus, n_minus = _codes_pairwise(w, fmt, tb, out)
    else:
        n_plus, n_minus = _codes_compare(w, fmt, tb, out)
    return out, s_w, (n_minus, n_rows * k - n_plus - n_minus, n_plus)


@_elementwise
def _codes_compare(w: torch.Tensor, fmt: str, tb: int, out: torch.Tensor) -> tuple:
    """Codes by comparing each weight's bit pattern with the threshold (any float dtype, any K)."""
    n_rows, k = w.shape
    g, p = GROUP[fmt], out.shape[1]
    iv = w.view(_INT_VIEW[w.dtype])
    sign = _SIGN_BIT[iv.dtype]
    rows = max(1, CHUNK_ELEMENTS // max(k, 1))
    weights = DIGIT_WEIGHT[fmt]
    base = BASE_CODE_BYTE[fmt]
    pad = g * p - k
    n_pos = n_neg = 0
    for a in range(0, n_rows, rows):
        b = min(a + rows, n_rows)
        c = iv[a:b]
        pos = c > tb
        neg = torch.bitwise_xor(c, sign) > tb  # flips the sign bit: -|x| becomes +|x|, +x becomes negative
        n_pos += int(pos.sum())  # code counts come from the same comparisons, no extra pass
        n_neg += int(neg.sum())
        d = pos.view(torch.uint8) - neg.view(torch.uint8)  # code - 1 mod 256: 255, 0 or 1
        if pad:
            d = torch.nn.functional.pad(d, (0, pad))
        d = d.view(-1, g, p)
        o = out[a:b]
        torch.add(d[:, 0], base, out=o)  # byte = base + sum_s (code_s - 1) * weight_s  (mod 256)
        for s_ in range(1, g):
            o.add_(d[:, s_], alpha=weights[s_])
    return n_pos, n_neg


_PAIR = 0x00010001  # one in each 16-bit half of an int32 word


@_elementwise
def _codes_pairwise(w: torch.Tensor, fmt: str, tb: int, out: torch.Tensor) -> tuple:
    """Codes of a 16-bit float tensor two weights at a time, as the halves of int32 words.

    Integer ops only (torch's int16 comparisons and bool sums are 5-10x slower than its int32
    arithmetic). Per half h of a word: magnitude bits |h| = h & 0x7FFF; |h| + (0x7FFF - tb) reaches
    bit 15 exactly when |h| > tb (no carry leaves the half), which is ``round(clamp(x * s_w)) != 0``
    (see ``zero_threshold_bits``); the sign is bit 15 of h. With nz, neg in {0, 1} per half the code
    is nz - 2 * neg, and a packed byte is base + sum_s weight_s * code_s: every operation is linear in
    the two halves and each final half lies in [0, 242], so borrows between the halves cancel out and
    the int32 result holds two exact bytes.
    Needs K and P = ceil(K / G) even (words must not straddle rows or planes).
    """
    n_rows, k = w.shape
    g, p = GROUP[fmt], out.shape[1]
    kw, pw = k // 2, p // 2
    x = w.view(torch.int16).view(torch.int32)  # (N, K / 2): element 2j in the low half, 2j + 1 in the high half
    add = (0x7FFF - tb) * _PAIR
    weights = DIGIT_WEIGHT[fmt]
    base = BASE_CODE_BYTE[fmt] * _PAIR
    rows = max(1, min(CHUNK_ELEMENTS // k, 16384))  # per-column counts of one chunk stay below 2^15 per half
    m = torch.zeros(min(rows, n_rows), g * pw, dtype=torch.int32)  # the tail past kw stays 0: padding, code 0
    neg = torch.empty(m.shape[0], kw, dtype=torch.int32)
    o = torch.empty(m.shape[0], pw, dtype=torch.int32)
    acc_nz = torch.zeros(k, dtype=torch.int64)
    acc_neg = torch.zeros(k, dtype=torch.int64)
    for a in range(0, n_rows, rows):
        b = min(a + rows, n_rows)
        xc, nz, ng = x[a:b], m[: b - a, :kw], neg[: b - a]
        torch.bitwise_and(xc, 0x7FFF7FFF, out=nz)
        nz.add_(add)
        nz.bitwise_right_shift_(15)  # bit 15 of each half -> bit 0 (and bit 16); higher bits are masked next
        nz.bitwise_and_(_PAIR)
        torch.bitwise_right_shift(xc, 15, out=ng)
        ng.bitwise_and_(nz)  # sign bit of a non-zero weight
        acc_nz.add_(torch.sum(nz, dim=0, dtype=torch.int32).view(torch.int16))
        acc_neg.add_(torch.sum(ng, dim=0, dtype=torch.int32).view(torch.int16))
        nz.sub_(ng, alpha=2)  # code in {-1, 0, 1} per half
        d = m[: b - a].view(b - a, g, pw)
        oc = o[: b - a]
        torch.add(d[:, 0], base, out=oc)
        for s_ in range(1, g):
            oc.add_(d[:, s_], alpha=weights[s_])
        out[a:b].copy_(oc.view(torch.int16))  # each half is one byte value in [0, 242]
    n_nz, n_neg = int(acc_nz.sum()), int(acc_neg.sum())
    return n_nz - n_neg, n_neg


@_elementwise
def unpack_codes_chunked(packed: torch.Tensor, k: int, fmt: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``unpack_codes`` of a large (N, P) tensor by row blocks (its temporaries stay in cache: 2x faster),
    into ``out`` (int8, at least N * K elements, reused across tensors) when given."""
    n_rows = packed.shape[0]
    if out is not None and out.dtype == torch.int8 and out.numel() >= n_rows * k:
        codes = out.reshape(-1)[: n_rows * k].view(n_rows, k)
    else:
        codes = torch.empty(n_rows, k, dtype=torch.int8)
    rows = max(1, CHUNK_ELEMENTS // max(k, 1))

    for a in range(0, n_rows, rows):
        codes[a:a + rows] = unpack_codes(packed[a:a + rows], k, fmt)
    return codes


# ---- the exact inverse: float weights that re-quantise to given codes AND scale -------------------

def _clamp_scale() -> torch.Tensor:
    return 1.0 / torch.zeros((), dtype=torch.float32).clamp(min=WEIGHT_CLAMP_MIN)


def _scale_of_mean(m: torch.Tensor) -> torch.Tensor:
    return 1.0 / m.clamp(min=WEIGHT_CLAMP_MIN)


def _bits_value(bits: int, dtype: torch.dtype) -> float:
    return float(torch.tensor([bits], dtype=_INT_VIEW[dtype]).view(dtype)[0])


def _value_bits(x: float, dtype: torch.dtype) -> int:
    return int(torch.tensor([x], dtype=torch.float64).to(dtype).view(_INT_VIEW[dtype])[0])


def dequantize_exact(codes: torch.Tensor, s_w: torch.Tensor, dtype: torch.dtype = torch.float32,
                     name: str = "tensor", max_evals: int = 64, keep_fp32: bool = False,
                     scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A float tensor W (``dtype``) with ``weight_quant(W) == (codes, s_w)``, both bit for bit.

    The naive ``codes / s_w`` re-quantises to the scale ``s_w / share_nonzero`` (the hazard of
    docs/reference-semantics.md). Here every non-zero weight gets magnitude ~ ``1 / (s_w * share)`` so that
    mean|W| = 1 / s_w; to make torch's fp32 mean land on a value whose reciprocal is exactly s_w, a
    prefix of the non-zero weights is raised by one ulp of ``dtype`` and the prefix length is searched
    (torch's sum is monotone in every element), each candidate checked with the same torch ops as
    ``weight_quant``. The check is exact for this torch build and thread count; another reduction
    order (a GPU, another thread count) can move s_w by one ulp (relative 6e-8). ``keep_fp32`` returns
    the same values still in fp32 (exactly representable in ``dtype``; the writer converts them in chunks).
    ``scratch`` (fp32, at least ``codes.numel()``) is reused across tensors (no page faults); the result
    may then be a view into it, valid until the next call with the same scratch.
    """
    s_w = s_w.detach().to(torch.float32).reshape(())
    if dtype not in _INT_VIEW:
        raise MMFError(f"unpack dtype must be fp32, bf16 or fp16, got {dtype}")
    if not torch.isfinite(s_w) or float(s_w) <= 0:
        raise CheckpointError(f"tensor {name}: scale {float(s_w)!r} is not a positive finite number")
    n = codes.numel()
    nz = torch.bitwise_and(codes, 1).view(torch.bool)  # codes -1, 0, 1 -> True, False, True (no comparison pass)
    nnz = int(torch.count_nonzero(codes))
    clamp = _clamp_scale()
    if nnz == 0:
        if bool(s_w == clamp) or n == 0:
            return torch.zeros(codes.shape, dtype=dtype)
        raise CheckpointError(f"tensor {name}: all codes are 0 but the scale {float(s_w)!r} is not the clamp value "
                              f"{float(clamp)!r}; no latent weights quantise to this, so it cannot be unpacked exactly")
    # the fp32 means m with 1 / max(m, 1e-5) == s_w form one interval [m_lo, m_hi]
    m0 = (1.0 / s_w).reshape(1)
    cands = [m0]
    up, down = m0, m0
    for _ in range(4):
        up = torch.nextafter(up, torch.tensor([math.inf]))
        down = torch.nextafter(down, torch.tensor([0.0]))
        cands += [up, down]
    ok = [float(c[0]) for c in cands if bool(_scale_of_mean(c)[0] == s_w)]
    if not ok:
        raise CheckpointError(f"tensor {name}: scale {float(s_w)!r} is not 1/m for any fp32 mean m; it was not "
                              "produced by absmean quantisation, so it cannot be unpacked exactly")
    m_lo, m_hi = min(ok), max(ok)
    if bool(s_w == clamp):  # every mean <= 1e-5 gives the clamp scale; aim just below the clamp
        m_lo, m_c = 0.0, m_hi * (1 - 1 / 1024)
    else:
        m_c = (m_lo + m_hi) / 2
    a = m_c * n / nnz  # ideal magnitude of each non-zero weight (float64)
    b0 = _value_bits(a, dtype)
    if _bits_value(b0, dtype) > a:
        b0 -= 1
    if b0 < 1 or b0 + 2 > _MAX_FINITE_BITS[dtype]:
        raise CheckpointError(f"tensor {name}: weights of magnitude {a:.3g} do not fit {dtype}; unpack to fp32")
    nz2 = nz.reshape(nz.shape[0], -1) if codes.dim() >= 2 else nz.reshape(1, -1)
    u8 = nz2.view(torch.uint8)
    rows_n, cols_n = nz2.shape
    if scratch is not None and scratch.dtype == torch.float32 and scratch.numel() >= n:
        absw = scratch.reshape(-1)[:n].view(nz2.shape)
    else:
        absw = torch.empty(nz2.shape, dtype=torch.float32)
    last = [None]

    def build(t: int) -> torch.Tensor:
        """Non-zeros at flat positions < t % n get the next value up: monotone in t."""
        if last[0] == t:
            return absw
        base = b0 + t // n
        _fill_scaled(absw, u8, t % n, _bits_value(base, dtype), _bits_value(base + 1, dtype))
        last[0] = t
        return absw

    def ok(m: float) -> bool:
        return m_lo <= m <= m_hi and bool(_scale_of_mean(torch.tensor(m, dtype=torch.float32)) == s_w)

    ulp = _bits_value(b0 + 1, dtype) - _bits_value(b0, dtype)
    t0 = round((m_c * n - nnz * _bits_value(b0, dtype)) / ulp * n / nnz)
    valid = lambda t: 1 <= b0 + t // n and b0 + t // n + 2 <= _MAX_FINITE_BITS[dtype]  # noqa: E731
    found, lo_t, hi_t = _bracket_search(lambda t: float(build(t).mean()), ok, t0, ulp * nnz / n / n, m_c,
                                        max_evals, valid)
    tweak = None
    if found is None and lo_t is not None:
        # The fp32 sum moved past the target in one step. Keep a configuration below the target and
        # move ONE weight through the values of ``dtype`` in a range (the mean is monotone in it): a
        # zero-coded weight within (-0.5/s_w, 0.5/s_w) if there is one, else a non-zero one up to a few
        # ulps higher. The lattice of reachable sums depends on the rest of the tensor (and on the lane
        # of the vectorised reduction the weight falls in), so several prefixes and positions are tried.
        use_zero = nnz < n
        pick_rows = sorted({rows_n - 1, 0, rows_n // 2, rows_n // 3, (2 * rows_n) // 3, rows_n // 5})
        picks = []
        for r in pick_rows:
            row_mask = ~nz2[r] if use_zero else nz2[r]
            cols = row_mask.nonzero().flatten()
            take = cols[-8:] if r == rows_n - 1 else cols[-1:]
            picks += [r * cols_n + int(c) for c in take]
        absw_flat = absw.view(-1)
        for back in range(24):
            if found is not None or not valid(lo_t - back * max(1, n // max(nnz, 1))):
                break
            t_base = lo_t - back * max(1, n // max(nnz, 1))
            snapshot = build(t_base).clone()
            for e in sorted(set(picks)):
                if use_zero:
                    lo_b, hi_b = 0, zero_threshold_bits(dtype, s_w)
                else:
                    lo_b = _value_bits(float(snapshot.view(-1)[e]), dtype)
                    hi_b = min(lo_b + 64 * (back + 1), _MAX_FINITE_BITS[dtype])

                def mean_e(bits: int, e=e, snapshot=snapshot) -> float:
                    absw.copy_(snapshot)
                    absw_flat[e] = _bits_value(bits, dtype)
                    last[0] = None
                    return float(absw.mean())

                lo, hi = lo_b, hi_b  # smallest bits with mean >= m_lo, by bisection
                if mean_e(hi) < m_lo:
                    continue
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if mean_e(mid) >= m_lo:
                        hi = mid
                    else:
                        lo = mid
                if ok(mean_e(hi)):
                    found, tweak = t_base, (mean_e, hi)
                    break
    if found is None:
        hint = "unpack with --dtype fp32" if dtype != torch.float32 else "pack the latent checkpoint instead"
        raise CheckpointError(f"tensor {name}: found no {dtype} weights whose absmean reproduces scale "
                              f"{float(s_w)!r} exactly; {hint}")
    base = b0 + found // n
    for bits in (base, base + 1):  # every non-zero magnitude must quantise to code +-1
        if not bool(_bits_value(bits, dtype) * s_w > 0.5):
            raise CheckpointError(f"tensor {name}: cannot place weights that quantise to +-1 with scale {float(s_w)!r}")
    if tweak is None:  # signed values straight from the codes: code * value is exact in ``dtype``
        del nz, nz2, u8
        out_dtype = torch.float32 if keep_fp32 else dtype
        flat = absw.view(-1).view(out_dtype)[:n]  # absw's storage is no longer needed: no new allocation
        _fill_scaled(flat, codes.reshape(-1), found % n, _bits_value(base, dtype), _bits_value(base + 1, dtype))
        return flat.view(codes.shape)
    tweak[0](tweak[1])  # leaves the chosen configuration in absw
    signs = torch.where(nz, codes, torch.ones((), dtype=codes.dtype))  # the moved zero-coded weight: +
    del nz, nz2, u8
    w = absw.view(codes.shape)
    w.mul_(signs)  # in place: fp32 * int8 stays fp32; every value is exactly representable in ``dtype``
    return w if keep_fp32 else w.to(dtype)


@_elementwise
def _fill_scaled(dst: torch.Tensor, src: torch.Tensor, pos: int, v0: float, v1: float) -> None:
    """dst = src * (v1 at flat positions < pos, else v0), exactly (src in {-1, 0, 1}; v0, v1 exact in dst's
    dtype), in cache-sized chunks: one conversion and one multiply per chunk instead of two passes over RAM."""
    d, c = dst.reshape(-1), src.reshape(-1)
    bits = d.dtype in (torch.float16, torch.bfloat16) and c.dtype == torch.int8
    if bits:  # torch's int8 -> half conversion is slow: build sign | (code != 0) * bits(v) in int16
        d = d.view(torch.int16)
        tmp = torch.empty(min(CHUNK_ELEMENTS, d.numel()), dtype=torch.int16)
        sign = torch.empty_like(tmp)
        vb = {v: _value_bits(v, dst.dtype) for v in (v0, v1)}
    for a in range(0, d.numel(), CHUNK_ELEMENTS):
        b = min(a + CHUNK_ELEMENTS, d.numel())
        for lo, hi, v in ((a, min(b, pos), v1), (max(a, pos), b, v0)):
            if lo >= hi:
                continue
            if bits:
                t, sg = tmp[: hi - lo], sign[: hi - lo]
                t.copy_(c[lo:hi])  # -1, 0, 1 -> 0xFFFF, 0, 1
                torch.bitwise_and(t, _SIGN_BIT[torch.int16], out=sg)
                t.bitwise_and_(1).mul_(vb[v])
                torch.bitwise_or(t, sg, out=d[lo:hi])
            else:
                d[lo:hi].copy_(c[lo:hi]).mul_(v)


def _bracket_search(mean_of, ok, t, unit: float, target: float, max_evals: int, valid):
    """Find an integer t with ok(mean_of(t)), mean_of monotone non-decreasing in t.

    Starts at the estimate ``t`` (one step of t moves the mean by about ``unit``), walks towards
    ``target`` with doubling steps until bracketed, then bisects. Returns (t or None, lo, hi).
    """
    lo_t = hi_t = None
    grow = 1
    for _ in range(max_evals):
        if not valid(t):
            break
        m = mean_of(t)
        if ok(m):
            return t, lo_t, hi_t
        step = max(1, round(abs(target - m) / unit))
        if m < target:
            grow = grow * 2 if lo_t is not None and hi_t is None else 1
            lo_t = t
        else:
            grow = grow * 2 if hi_t is not None and lo_t is None else 1
            hi_t = t
        if lo_t is not None and hi_t is not None:
            if hi_t - lo_t <= 1:
                break
            t = (lo_t + hi_t) // 2
        elif lo_t is not None:
            t = lo_t + step * grow
        else:
            t = hi_t - step * grow
    return None, lo_t, hi_t


# ---- float checks by bit pattern ---------------------------------------------------------------

def all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """No NaN or inf in ``t``: for 16/32-bit floats by comparing magnitude bit patterns, in chunks."""
    if t.dtype in _INT_VIEW:  # in chunks: no temporary the size of an embedding matrix
        iv = t.reshape(-1).view(_INT_VIEW[t.dtype])
        mask = 0x7FFF if iv.dtype == torch.int16 else 0x7FFFFFFF
        return all(int((iv[a:a + chunk] & mask).max()) <= _MAX_FINITE_BITS[t.dtype] for a in range(0, iv.numel(), chunk))
    return bool(torch.isfinite(t).all())

