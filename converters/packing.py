"""Packed ternary checkpoints: ``mmf pack`` / ``unpack`` / ``inspect`` and the packed-model loader.

The file format is specified byte by byte in docs/formats.md; the names below are that spec's
constants, and every reader check below is one sentence of it. In short: a packed checkpoint is
an ordinary checkpoint directory whose ``model.safetensors`` (or shards) holds, for every BitLinear
``X`` of the MatMul-free model,

* ``X.weight``        U8, shape (N, ceil(K / G)): the ternary codes in the planar ``i2`` (G = 4) or
  ``tq1`` (G = 5) layout of ``mmf.ternary_codes``;
* ``X.weight_scale``  F32, shape (): s_w of docs/reference-semantics.md (w ~= code / s_w);

and every other tensor (embeddings, norms, lower bounds) in the dtype it has in the source, or in
F32/BF16/F16 (``--dtype``; ``--keep-dtype`` is its old spelling). The
header ``__metadata__`` names the format and version and describes each packed tensor (logical
shape, format, scale, code counts), so the file is self-describing.

Everything streams: one tensor is quantised while the next is read (``prefetch_tensors``, O_DIRECT
into two reused buffers, no mmap) and the previous one is written (``SafetensorsWriter``'s
write-behind), so peak memory is set by the largest tensor, not by the model, and the disk and the
CPU work at the same time.
"""

from __future__ import annotations

import json
import math
import contextlib
import functools
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from mmf.checkpoint import (CONFIG_FILE, DEFAULT_SHARD_BYTES, IGNORED_KEY_SUFFIXES, INDEX_FILE, WEIGHTS_FILE,
                            atomic_directory, load_config, parse_dtype, write_index)
from mmf.errors import CheckpointError, MMFError
from mmf.kernels.reference import WEIGHT_CLAMP_MIN
from mmf.outputs import check_output
from mmf.tokenizer import warn_if_no_tokenizer

from mmf.safetensors_io import (IO_ALIGN, ST_DTYPES, ST_NAMES, ST_SIZES, SafetensorsReader, SafetensorsWriter,
                             prefetch_tensors, read_header)
from mmf.ternary_codes import (BASE_CODE_BYTE, DIGIT_WEIGHT, GROUP, MAX_BYTE, i2_from_packed, packed_row_bytes,
                               unpack_codes)

# ---- format constants (docs/formats.md section 2) -------------------------------------------------
FORMAT_KEY = "mmf.packed_format"          # "i2" | "tq1"; its presence marks a packed file (checkpoint.is_packed)
VERSION_KEY = "mmf.packed_version"        # "1"
KEEP_DTYPE_KEY = "mmf.keep_dtype"         # "F16" | "BF16" | "F32" | "F64": dtype of the tensors left unpacked
                                          # ("mixed" if they differ: each tensor's header entry says its own)
TENSOR_KEY_PREFIX = "mmf.tensor."         # + "<module>.weight" -> JSON {"format","shape","scale","counts"}
SCALE_SUFFIX = "_scale"                   # "<module>.weight" + "_scale" = "<module>.weight_scale"
FORMAT_VERSION = "1"
FORMATS = ("i2", "tq1")
KEEP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PACK_DTYPES = ("source", "fp32", "bf16", "fp16")  # --dtype of pack: "source" keeps each tensor's own dtype
_NAME_OF = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
QUANT_CONFIG_KEY = "quantization_config"   # config.json entry of a packed checkpoint (HF convention)
QUANT_METHOD = "mmf_ternary"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "mmf_tokenizer.json", "generation_config.json", "vocab.json", "merges.txt")
CHUNK_ELEMENTS = 1 << 20                   # weights per step of the quantiser; each torch op on a chunk runs on
                                           # torch's intra-op threads. 13b-shaped tensors, 2 idle cores, ns/weight:
                                           # 2^18: 1.2, 2^20: 1.1, 2^22: 1.2; the same ops spread over Python
                                           # threads (2^18 chunks) took 2.5-3.4 (GIL hand-offs between short ops)

_SIGN_BIT = {torch.int16: -(1 << 15), torch.int32: -(1 << 31)}
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
_MAX_FINITE_BITS = {torch.float16: 0x7BFF, torch.bfloat16: 0x7F7F, torch.float32: 0x7F7FFFFF}
_ST_OF = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
_TORCH_OF = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


# ---- torch threads for the elementwise passes ------------------------------------------------------

_ELEMENTWISE_THREADS: Optional[int] = None  # set per tensor by pack's _ThreadTuner; None: torch's own


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


class _ThreadTuner:
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
    g = GROUP[fmt]
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


# ---- checkpoint plumbing --------------------------------------------------------------------------

def checkpoint_files(directory: Path) -> dict:
    """name -> file for a checkpoint directory, validating headers (never mmap, never panics)."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: a checkpoint is a directory with config.json and model.safetensors")
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map names to file names")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {}
        for fname in sorted(set(weight_map.values())):
            if Path(fname).name != fname:
                raise CheckpointError(f"{index}: shard name {fname!r} must be a plain file name")
            path = directory / fname
            if not path.exists():
                raise CheckpointError(f"{path}: shard named in {INDEX_FILE} is missing")
            tensors, _, _ = read_header(path)
            for k, v in weight_map.items():
                if v == fname and k not in tensors:
                    raise CheckpointError(f"{path}: tensor {k} listed in {INDEX_FILE} is not in this shard")
            files.update({k: path for k in tensors})
        return files
    single = directory / WEIGHTS_FILE
    if not single.exists():
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}; is this a checkpoint directory?")
    tensors, _, _ = read_header(single)
    return {k: single for k in tensors}


def _files_in_order(files: dict) -> list:
    return sorted(set(files.values()))


def weight_file_bytes(files: dict) -> int:
    """The size on disk of a checkpoint's weight files (``checkpoint_files``' values: every .safetensors
    shard, headers included): the one size pack, unpack and inspect report for a checkpoint."""
    return sum(p.stat().st_size for p in set(files.values()))


def _check_not_input(src: Path, out: Path) -> None:
    """Refuse an ``out`` that is, holds or lies inside the input checkpoint (inputs are never overwritten)."""
    s, d = src.resolve(), out.resolve()
    if d == s:
        raise MMFError(f"--out {out} is the input checkpoint; choose another directory (inputs are never overwritten)")
    if s in d.parents or d in s.parents:
        raise MMFError(f"--out {out} overlaps the input checkpoint {src}; choose a separate directory "
                       "(inputs are never overwritten)")


def _mmf_version() -> str:
    from mmf import __version__

    return __version__


def _ternary_modules(cfg) -> dict:
    """'<module>.weight' -> (N, K) for every BitLinear of the MatMul-free model of ``cfg``."""
    from mmf.models import build_model
    from mmf.models.hgrn_bit import BitLinear

    with torch.device("meta"):
        model = build_model(cfg)
    shapes = {}
    for mname, m in model.named_modules():
        if isinstance(m, BitLinear):
            shapes[f"{mname}.weight"] = (m.out_features, m.in_features)
    params = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        params[pname] = tuple(p.shape)
    return shapes, params


def _require_mmf(path: Path, verb: str):
    cfg = load_config(path)
    if cfg.arch != "mmf":
        raise MMFError(f"{path}: a {cfg.model_type} (Transformer++) checkpoint has full-precision weights, not ternary "
                       f"ones; only MatMul-free (hgrn_bit) checkpoints can be {verb}")
    return cfg


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _plan_shards(items: list, max_shard_bytes: int) -> list:
    """Split [(name, dtype, shape, nbytes), ...] into shards of at most max_shard_bytes (>= 1 tensor each)."""
    shards, size = [[]], 0
    for it in items:
        if shards[-1] and size + it[3] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it[3]
    return shards


def _shard_names(count: int) -> list:
    if count == 1:
        return [WEIGHTS_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


@contextlib.contextmanager
def _shard_writer(path: Path, shard: list, header_meta: dict, summary: dict, weight_map: dict):
    """A SafetensorsWriter for one planned shard ``[(name, dtype, shape, nbytes), ...]``.

    The body writes every tensor and closes the writer (with its final metadata); on any error the
    partial file is aborted. On success the shard's bytes (``summary["output_bytes"]``, header included)
    and names are recorded.
    """
    writer = SafetensorsWriter(path, [(n, dt, shape) for n, dt, shape, _ in shard], header_meta)
    try:
        yield writer
    except BaseException:
        writer.abort()
        raise
    summary["output_bytes"] += writer.total_bytes
    weight_map.update({n: path.name for n, _, _, _ in shard})


def _write_shard_index(tmp: Path, shards: list, weight_map: dict, **metadata) -> None:
    """The model.safetensors.index.json of a checkpoint written in more than one shard."""
    if len(shards) > 1:
        write_index(tmp, weight_map, sum(it[3] for shard in shards for it in shard), **metadata)


def _tensor_meta(fmt: str, shape, scale: float, counts) -> str:
    return json.dumps({"format": fmt, "shape": [int(s) for s in shape], "scale": scale,
                       "counts": [int(c) for c in counts]}, separators=(",", ":"))


def _progress(enabled: bool, total: int, description: str):
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    prog = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), transient=True, disable=not enabled)
    return prog, total, description


def _dtype_numbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---- pack -----------------------------------------------------------------------------------------

def pack_checkpoint(src, out, fmt: str = "i2", dtype: str = "source", force: bool = False,
                    verify: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False,
                    log: Optional[Callable[[str], None]] = None, keep_dtype: Optional[str] = None) -> dict:
    """Pack a latent (training) MatMul-free checkpoint directory ``src`` into ``out``. Returns a summary.

    ``dtype`` is that of the tensors that stay unpacked (embeddings, norms, lower bounds): ``source``
    (default) keeps each one's dtype in ``src``, so the packed model gives exactly the logits of the
    source model after ``freeze()``; fp32, bf16 or fp16 convert them (fp16/bf16 round an fp32 source).
    ``input_bytes`` and ``output_bytes`` of the summary are the sizes of the weight files on disk.
    ``keep_dtype`` is the old name of ``dtype`` (it wins when given).
    """
    src, out = Path(src), Path(out)
    dtype = keep_dtype if keep_dtype is not None else dtype
    if fmt not in FORMATS:
        raise MMFError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    if dtype not in PACK_DTYPES:
        raise MMFError(f"unknown --dtype {dtype!r}; use one of {', '.join(PACK_DTYPES)} (source keeps the "
                       "checkpoint's own dtype)")
    _check_not_input(src, out)
    check_output(out, force)
    cfg = _require_mmf(src, "packed")
    files = checkpoint_files(src)
    if any(FORMAT_KEY in read_header(p)[1] for p in _files_in_order(files)):
        raise MMFError(f"{src}: already packed ({FORMAT_KEY} in its metadata); `mmf unpack` it first to repack")
    ternary, params = _ternary_modules(cfg)
    headers = {p: read_header(p)[0] for p in _files_in_order(files)}
    for k, p in files.items():
        if k.endswith(IGNORED_KEY_SUFFIXES):
            continue
        if k not in params:
            raise CheckpointError(f"{p}: unexpected tensor {k!r} for a hgrn_bit model with this config.json")
        shape = headers[p][k].shape
        if tuple(shape) != params[k]:
            raise CheckpointError(f"{p}: tensor {k!r} has shape {tuple(shape)} but config.json implies {params[k]}")
        if headers[p][k].dtype not in ("F16", "BF16", "F32", "F64"):
            raise CheckpointError(f"{p}: tensor {k!r} has dtype {headers[p][k].dtype}; latent weights must be floats")
    keep_of = {}  # unpacked tensor -> its dtype in the packed file
    for k, p in files.items():
        keep_of[k] = ST_DTYPES[headers[p][k].dtype] if dtype == "source" else KEEP_DTYPES[dtype]
    # what to write, in source order (sequential reads), tied lm_head last
    jobs = []  # (out name, source name, kind)
    for p in _files_in_order(files):
        for info in sorted(headers[p].values(), key=lambda t: t.begin):
            if info.name.endswith(IGNORED_KEY_SUFFIXES):
                continue
            jobs.append((info.name, info.name, "ternary" if info.name in ternary else "keep"))
    have = {j[0] for j in jobs}
    for name in params:
        if name not in have:
            if name == "lm_head.weight" and cfg.tie_word_embeddings and "model.embeddings.weight" in have:
                jobs.append((name, "model.embeddings.weight", "ternary"))
                have.add(name)
            else:
                raise CheckpointError(f"{src}: missing tensor {name}")
    items = []
    for name, sname, kind in jobs:
        if kind == "ternary":
            n_rows, k = ternary[name]
            pb = packed_row_bytes(k, fmt)
            items.append((name, torch.uint8, (n_rows, pb), n_rows * pb))
            items.append((name + SCALE_SUFFIX, torch.float32, (), 4))
        else:
            shape = params[name]
            items.append((name, keep_of[sname], shape, math.prod(shape) * _dtype_numbytes(keep_of[sname])))
    # keep a packed weight and its scale in one shard
    grouped, i = [], 0
    while i < len(items):
        if i + 1 < len(items) and items[i + 1][0] == items[i][0] + SCALE_SUFFIX:
            grouped.append(items[i:i + 2])
            i += 2
        else:
            grouped.append([items[i]])
            i += 1
    shards, size = [[]], 0
    for grp in grouped:
        nb = sum(it[3] for it in grp)
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(grp)
        size += nb
    names = _shard_names(len(shards))
    by_name = {j[0]: j for j in jobs}
    src_bytes = sum(headers[files[s]][s].nbytes for _, s, _ in jobs)
    largest = max(headers[files[s]][s].numel for _, s, k in jobs if k == "ternary")
    scratch = torch.empty(largest, dtype=torch.float32)  # reused: no page faults after the first tensor
    kept = sorted({ST_NAMES[it[1]] for it in items if it[1] != torch.uint8 and not it[0].endswith(SCALE_SUFFIX)})
    kept_dtype = kept[0] if len(kept) == 1 else "mixed"
    summary = {"source": str(src), "out": str(out), "format": fmt, "dtype": dtype, "unpacked_dtype": kept_dtype,
               "files": names, "tensors": 0, "ternary_tensors": 0, "input_bytes": weight_file_bytes(files),
               "output_bytes": 0}
    counts_total = [0, 0, 0]
    base_meta = {"format": "pt", FORMAT_KEY: fmt, VERSION_KEY: FORMAT_VERSION, KEEP_DTYPE_KEY: kept_dtype}
    t0 = time.perf_counter()
    prog, _, _ = _progress(progress, src_bytes, "pack")
    # every source tensor in write order, read one ahead on a background thread while this one is packed
    reads = [(files[by_name[name][1]], by_name[name][1], name) for shard in shards for name, _, _, _ in shard
             if name in by_name]
    source = prefetch_tensors(reads, max(headers[p][s].nbytes for p, s, _ in reads) + 2 * IO_ALIGN)
    tuner = _ThreadTuner()

    with atomic_directory(out, force, need_bytes=sum(it[3] for it in items)) as tmp, prog:
        task = prog.add_task(f"pack {fmt}", total=src_bytes)
        weight_map = {}
        try:
            for fname, shard in zip(names, shards):
                template = dict(base_meta)
                for name, dt, shape, _ in shard:
                    if dt == torch.uint8:
                        template[TENSOR_KEY_PREFIX + name] = _tensor_meta(
                            fmt, ternary[name], -1.2345678901234567e-300, [10**15] * 3)
                meta = dict(base_meta)
                with _shard_writer(tmp / fname, shard, template, summary, weight_map) as writer:
                    for name, dt, shape, _ in shard:
                        if name.endswith(SCALE_SUFFIX) and name not in by_name:
                            continue  # written together with its weight
                        _, sname, kind = by_name[name]
                        (spath, _, _), w = next(source)
                        if kind == "ternary":
                            with tuner.run(tuple(w.shape), w.numel()):
                                packed, s_w, counts = quantize_pack(w, fmt, f"{sname} ({spath.name})", scratch)
                            writer.write(name, packed)
                            writer.write(name + SCALE_SUFFIX, s_w.reshape(()))
                            meta[TENSOR_KEY_PREFIX + name] = _tensor_meta(fmt, ternary[name], float(s_w), counts)
                            counts_total = [a + b for a, b in zip(counts_total, counts)]
                            summary["ternary_tensors"] += 1
                        else:
                            if w.is_floating_point() and not _all_finite(w):
                                raise CheckpointError(f"tensor {sname} ({spath.name}): contains NaN or inf; "
                                                      "the checkpoint is damaged, retrain or re-export it")
                            kept = w.to(dt)
                            if w.is_floating_point() and not _all_finite(kept):
                                raise CheckpointError(f"tensor {sname}: values overflow {_NAME_OF[dt]}; "
                                                      "use --dtype source or fp32")
                            writer.write(name, kept)
                            del kept
                        summary["tensors"] += 1
                        prog.advance(task, headers[spath][sname].nbytes)
                        del w
                    writer.close(meta)
        finally:
            source.close()
        _write_shard_index(tmp, shards, weight_map, **{FORMAT_KEY: fmt})
        config = json.loads((src / CONFIG_FILE).read_text())
        config[QUANT_CONFIG_KEY] = {"quant_method": QUANT_METHOD, "format": fmt, "version": int(FORMAT_VERSION),
                                    "keep_dtype": _NAME_OF[ST_DTYPES[kept_dtype]] if kept_dtype in ST_DTYPES
                                    else kept_dtype}
        config["mmf_version"] = _mmf_version()
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        _copy_side_files(src, tmp)
        summary["seconds"] = time.perf_counter() - t0
        if verify:
            summary["verify"] = verify_packed(src, tmp)
    warn_if_no_tokenizer(src, out)
    total = sum(counts_total)
    summary["ternary_share"] = {"-1": counts_total[0] / total, "0": counts_total[1] / total,
                                "+1": counts_total[2] / total} if total else {}
    summary["compression_vs_input"] = (summary["input_bytes"] / summary["output_bytes"]
                                       if summary["output_bytes"] else 0.0)
    return summary


def _all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    if t.dtype in _INT_VIEW:  # in chunks: no temporary the size of an embedding matrix
        iv = t.reshape(-1).view(_INT_VIEW[t.dtype])
        mask = 0x7FFF if iv.dtype == torch.int16 else 0x7FFFFFFF
        return all(int((iv[a:a + chunk] & mask).max()) <= _MAX_FINITE_BITS[t.dtype] for a in range(0, iv.numel(), chunk))
    return bool(torch.isfinite(t).all())


# ---- reading packed checkpoints -------------------------------------------------------------------

def _file_format(path: Path, metadata: dict) -> str:
    fmt = metadata.get(FORMAT_KEY)
    if fmt is None:
        raise CheckpointError(f"{path}: not a packed file (no {FORMAT_KEY} in its metadata) although other shards are")
    if fmt not in FORMATS:
        raise CheckpointError(f"{path}: unknown packed format {fmt!r} (this mmf reads {', '.join(FORMATS)}); "
                              "upgrade mmf or re-pack the checkpoint")
    ver = metadata.get(VERSION_KEY)
    if ver != FORMAT_VERSION:
        raise CheckpointError(f"{path}: packed format version {ver!r} is not supported (this mmf reads version "
                              f"{FORMAT_VERSION}); upgrade mmf or re-pack the checkpoint")
    return fmt


def packed_tensor_meta(path: Path, name: str, metadata: dict, tensors: dict, fmt: str) -> dict:
    """Validate the metadata entry of packed tensor ``name`` against the file's tensors; return it."""
    raw = metadata[TENSOR_KEY_PREFIX + name]
    try:
        meta = json.loads(raw)
        shape = [int(s) for s in meta["shape"]]
        tfmt = meta["format"]
        scale = meta["scale"]
        counts = [int(c) for c in meta.get("counts", [])]
        if not (isinstance(meta["shape"], list) and all(type(s) is int for s in meta["shape"])):
            raise TypeError("shape must be a list of integers")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise TypeError("scale must be a number")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: metadata of packed tensor {name} is malformed ({type(e).__name__}: {e})") from None
    if tfmt != fmt:
        raise CheckpointError(f"{path}: tensor {name} is in format {tfmt!r} but the file says {fmt!r}")
    if len(shape) != 2 or min(shape) < 1:
        raise CheckpointError(f"{path}: tensor {name}: logical shape {shape} is not (N, K) with N, K >= 1")
    if name not in tensors:
        raise CheckpointError(f"{path}: metadata describes tensor {name} but the file does not hold it")
    info = tensors[name]
    want = (shape[0], packed_row_bytes(shape[1], fmt))
    if info.dtype != "U8" or tuple(info.shape) != want:
        raise CheckpointError(f"{path}: tensor {name}: stored as {info.dtype} {list(info.shape)} but a {fmt} tensor of "
                              f"logical shape {shape} must be U8 {list(want)}")
    sname = name + SCALE_SUFFIX
    if sname not in tensors or tensors[sname].dtype != "F32" or tensors[sname].numel != 1:
        raise CheckpointError(f"{path}: tensor {name}: its scale {sname} (F32, one value) is missing or malformed")
    if not (math.isfinite(scale) and scale > 0):
        raise CheckpointError(f"{path}: tensor {name}: scale {scale!r} is not a positive finite number")
    if counts and (len(counts) != 3 or sum(counts) != shape[0] * shape[1] or min(counts) < 0):
        raise CheckpointError(f"{path}: tensor {name}: code counts {counts} do not add up to {shape[0] * shape[1]}")
    return {"format": tfmt, "shape": shape, "scale": scale, "counts": counts}


def read_packed(reader: SafetensorsReader, name: str, meta: dict) -> tuple:
    """Read and check one packed tensor: returns (packed bytes, s_w fp32 0-d). Bad codes -> CheckpointError."""
    return check_packed(reader.path, name, meta, reader.read(name), reader.read(name + SCALE_SUFFIX))


def check_packed(path: Path, name: str, meta: dict, packed: torch.Tensor, scale: torch.Tensor) -> tuple:
    """``read_packed``'s checks of tensors already read: returns (packed, s_w fp32 0-d, a copy)."""
    fmt, (n_rows, k) = meta["format"], meta["shape"]
    s_w = scale.reshape(()).clone()
    if not bool(s_w == torch.tensor(meta["scale"], dtype=torch.float64).to(torch.float32)):
        raise CheckpointError(f"{path}: tensor {name}: scale tensor {float(s_w)!r} differs from the metadata "
                              f"scale {meta['scale']!r}")
    if fmt == "i2":
        bad = bool(((packed >> 1) & packed & 0x55).any())  # a 2-bit field equal to 3
    else:
        bad = bool((packed > MAX_BYTE["tq1"]).any())
    if bad:
        raise CheckpointError(f"{path}: tensor {name}: bytes that are not valid {fmt} codes; the file is corrupt")
    g, p = GROUP[fmt], packed.shape[1]
    if g * p != k:  # row padding must hold code 1 (weight 0)
        tail = unpack_codes(packed, g * p, fmt)[:, k:]
        if bool((tail != 0).any()):
            raise CheckpointError(f"{path}: tensor {name}: padding digits are not code 1; the file is corrupt")
    return packed, s_w


def packed_files(path: Path) -> tuple:
    """(files, per-file (tensors, metadata), format) of a packed checkpoint directory, all checked."""
    files = checkpoint_files(path)
    heads = {}
    fmts = set()
    for p in _files_in_order(files):
        tensors, metadata, _ = read_header(p)
        fmts.add(_file_format(p, metadata))
        heads[p] = (tensors, metadata)
    if len(fmts) > 1:
        raise CheckpointError(f"{path}: shards disagree on the packed format ({', '.join(sorted(fmts))})")
    return files, heads, fmts.pop()


def load_packed_model(path, cfg, device="cpu", dtype=torch.float32):
    """A frozen ``HGRNBitForCausalLM`` (eval mode) from a packed checkpoint directory.

    Built on the meta device and filled tensor by tensor; every BitLinear becomes a
    ``FrozenBitLinear`` holding i2 bytes in its ``packed`` buffer (tq1 files are converted at load
    time) and s_w in ``weight_scale`` (fp32). The fp32 latent model is never materialised.
    """
    from mmf.models import build_model
    from mmf.models.hgrn_bit import BitLinear, FrozenBitLinear

    path = Path(path)
    dtype = parse_dtype(dtype)
    if cfg.arch != "mmf":
        raise CheckpointError(f"{path}: packed checkpoints hold MatMul-free models; config.json says {cfg.model_type}")
    files, heads, fmt = packed_files(path)
    with torch.device("meta"):
        model = build_model(cfg)
    bitlinears = {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}
    params = dict(model.named_parameters(remove_duplicate=False))
    done = set()
    readers = {}
    try:
        for p in _files_in_order(files):
            tensors, metadata = heads[p]
            r = readers.setdefault(p, SafetensorsReader(p))
            for name, info in sorted(tensors.items(), key=lambda kv: kv[1].begin):
                if name.endswith(IGNORED_KEY_SUFFIXES) or name.endswith(".weight" + SCALE_SUFFIX):
                    continue
                mname = name[: -len(".weight")] if name.endswith(".weight") else None
                if mname in bitlinears:
                    if TENSOR_KEY_PREFIX + name not in metadata:
                        raise CheckpointError(f"{p}: tensor {name} is a BitLinear weight but has no "
                                              f"{TENSOR_KEY_PREFIX}{name} metadata; the file is not a valid packed file")
                    meta = packed_tensor_meta(p, name, metadata, tensors, fmt)
                    bl = bitlinears[mname]
                    if tuple(meta["shape"]) != (bl.out_features, bl.in_features):
                        raise CheckpointError(f"{p}: tensor {name} has logical shape {tuple(meta['shape'])} but "
                                              f"config.json implies {(bl.out_features, bl.in_features)}")
                    packed, s_w = read_packed(r, name, meta)
                    packed = i2_from_packed(packed, bl.in_features, fmt)
                    _replace_module(model, mname, FrozenBitLinear(
                        bl.in_features, bl.out_features, packed=packed.to(device), weight_scale=s_w.to(device),
                        norm_weight=torch.empty(bl.in_features, device="meta")))  # filled below; missing = error
                    done.add(name)
                    continue
                if name not in params:
                    raise CheckpointError(f"{p}: unexpected tensor {name!r} for a hgrn_bit model with this config.json")
                if tuple(info.shape) != tuple(params[name].shape):
                    raise CheckpointError(f"{p}: tensor {name!r} has shape {tuple(info.shape)} but config.json implies "
                                          f"{tuple(params[name].shape)}")
                if info.dtype not in ("F16", "BF16", "F32", "F64"):
                    raise CheckpointError(f"{p}: tensor {name!r} has dtype {info.dtype}; expected a float tensor")
                done.add(name)
        # second pass: float tensors (norms of BitLinears need their FrozenBitLinear to exist)
        for p in _files_in_order(files):
            tensors, _ = heads[p]
            r = readers[p]
            for name, info in sorted(tensors.items(), key=lambda kv: kv[1].begin):
                if name in done and not _is_packed_weight(name, heads[p][1]):
                    _set_tensor(model, name, r.read(name).to(device=device, dtype=dtype))
    finally:
        for r in readers.values():
            r.close()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        more = f" and {len(leftover) - 3} more" if len(leftover) > 3 else ""
        raise CheckpointError(f"{path}: missing tensors {', '.join(leftover[:3])}{more}")
    model.requires_grad_(False)
    model.eval()
    return model


def _is_packed_weight(name: str, metadata: dict) -> bool:
    return TENSOR_KEY_PREFIX + name in metadata


def _replace_module(model, dotted: str, new) -> None:
    parent_name, _, attr = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _set_tensor(model, dotted: str, value: torch.Tensor) -> None:
    parent_name, _, attr = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, torch.nn.Parameter(value, requires_grad=False))


# ---- unpack ---------------------------------------------------------------------------------------

def unpack_checkpoint(src, out, force: bool = False, dtype: Optional[str] = None,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False) -> dict:
    """Packed checkpoint -> float checkpoint in the published hgrn_bit layout whose run-time
    re-quantisation gives back exactly the packed codes and scales (see ``dequantize_exact``).

    ``dtype`` (fp32|bf16|fp16) defaults to fp32, which is always exact; fp16 and bf16 are exact for
    real-sized tensors but a tiny tensor can have no such weights (a clear error then).
    ``input_bytes`` and ``output_bytes`` of the summary are the sizes of the weight files on disk.
    """
    src, out = Path(src), Path(out)
    _check_not_input(src, out)
    check_output(out, force)
    cfg = _require_mmf(src, "unpacked")
    files = checkpoint_files(src)
    if not any(FORMAT_KEY in read_header(p)[1] for p in _files_in_order(files)):
        raise MMFError(f"{src}: not a packed checkpoint (no {FORMAT_KEY} metadata); nothing to unpack")
    files, heads, fmt = packed_files(src)
    out_dtype = parse_dtype(dtype or "fp32")
    ternary, params = _ternary_modules(cfg)
    jobs = []  # (name, file, kind)
    for p in _files_in_order(files):
        tensors, metadata = heads[p]
        for info in sorted(tensors.values(), key=lambda t: t.begin):
            name = info.name
            if name.endswith(".weight" + SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in ternary:
                continue
            if name in ternary:
                if TENSOR_KEY_PREFIX + name not in metadata:
                    raise CheckpointError(f"{p}: BitLinear weight {name} has no {TENSOR_KEY_PREFIX}{name} metadata")
                meta = packed_tensor_meta(p, name, metadata, tensors, fmt)
                if tuple(meta["shape"]) != ternary[name]:
                    raise CheckpointError(f"{p}: tensor {name} has logical shape {tuple(meta['shape'])} but config.json "
                                          f"implies {ternary[name]}")
                jobs.append((name, p, meta))
            elif name in params:
                if tuple(info.shape) != params[name]:
                    raise CheckpointError(f"{p}: tensor {name!r} has shape {tuple(info.shape)} but config.json implies "
                                          f"{params[name]}")
                jobs.append((name, p, None))
            elif not name.endswith(IGNORED_KEY_SUFFIXES):
                raise CheckpointError(f"{p}: unexpected tensor {name!r} for a hgrn_bit model with this config.json")
    have = {j[0] for j in jobs}
    missing = [n for n in params if n not in have]
    if missing:
        raise CheckpointError(f"{src}: missing tensors {', '.join(missing[:3])}")
    items = []
    for name, p, meta in jobs:
        shape = tuple(meta["shape"]) if meta else params[name]
        dt = out_dtype if meta else _TORCH_OF.get(heads[p][0][name].dtype, torch.float32)
        items.append((name, dt, shape, math.prod(shape) * _dtype_numbytes(dt)))
    shards = _plan_shards(items, max_shard_bytes)
    names = _shard_names(len(shards))
    in_bytes = sum(heads[p][0][n].nbytes for n, p, _ in jobs)  # tensor data read (the progress bar's total)
    summary = {"source": str(src), "out": str(out), "format": fmt, "dtype": _ST_OF[out_dtype], "files": names,
               "tensors": len(jobs), "input_bytes": weight_file_bytes(files), "output_bytes": 0}
    by_name = {j[0]: j for j in jobs}
    t0 = time.perf_counter()
    prog, _, _ = _progress(progress, in_bytes, "unpack")
    # the inputs in write order (a packed weight's scale first), read ahead while the previous one is unpacked
    reads = []
    for shard in shards:
        for name, _, _, _ in shard:
            _, p, meta = by_name[name]
            reads += [(p, name + SCALE_SUFFIX), (p, name)] if meta else [(p, name)]
    # buffers sized for the packed weights; a larger float tensor (the embeddings) gets one of its own
    packed_bytes = max((heads[p][0][n].nbytes for n, p, meta in jobs if meta), default=None)
    source = prefetch_tensors(reads, packed_bytes and packed_bytes + 2 * IO_ALIGN)
    largest = max((math.prod(meta["shape"]) for _, _, meta in jobs if meta), default=0)
    scratch = torch.empty(largest, dtype=torch.float32)  # reused by every tensor: no page faults after the first
    codes_buf = torch.empty(largest, dtype=torch.int8)
    # no _ThreadTuner here: on idle cores it cost 12% (13b: 0.407 vs 0.463 GB/s), its gain under load unmeasured
    with atomic_directory(out, force, need_bytes=sum(it[3] for it in items)) as tmp, prog:
        task = prog.add_task("unpack", total=in_bytes)
        weight_map = {}
        try:
            for fname, shard in zip(names, shards):
                with _shard_writer(tmp / fname, shard, {"format": "pt"}, summary, weight_map) as writer:
                    for name, dt, shape, _ in shard:
                        _, p, meta = by_name[name]
                        if meta:
                            scale = next(source)[1].clone()
                            packed, s_w = check_packed(p, name, meta, next(source)[1], scale)
                            codes = unpack_codes_chunked(packed, meta["shape"][1], fmt, codes_buf)
                            del packed
                            w = dequantize_exact(codes, s_w, dt, f"{name} ({p.name})", scratch=scratch)
                            del codes
                            writer.write(name, w)
                            del w
                        else:
                            writer.write(name, next(source)[1])
                        prog.advance(task, heads[p][0][name].nbytes)
                    writer.close({"format": "pt"})
        finally:
            source.close()
        _write_shard_index(tmp, shards, weight_map)
        config = json.loads((src / CONFIG_FILE).read_text())
        config.pop(QUANT_CONFIG_KEY, None)
        if config.get("tie_word_embeddings"):
            config["tie_word_embeddings"] = False  # lm_head now has its own (exactly re-quantising) weights
        config["mmf_version"] = _mmf_version()
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        _copy_side_files(src, tmp)
    summary["seconds"] = time.perf_counter() - t0
    return summary


# ---- verify ---------------------------------------------------------------------------------------

def median_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Median over (sequence, position) of ||a - b|| / ||b|| of the logit vectors (docs/reference-semantics.md)."""
    return float(_rel_errors(a, b).median())


@torch.no_grad()
def verify_packed(src, packed, batch: int = 2, seq_len: int = 24, seed: int = 0) -> dict:
    """Compare the logits of the packed model with those of the source model after ``model.freeze()``.

    Both run in fp32 on the same ``batch`` x ``seq_len`` random token ids. Packing must be exact: the
    codes and scales must equal the source's ``weight_quant``, and the logits must equal, bit for bit,
    those of the frozen source whose unpacked tensors are rounded to the dtype they have in the packed
    file (with ``--dtype source`` nothing is rounded). Anything else raises MMFError. The report then
    says how far the packed model is from the unrounded frozen source (non-zero only where ``--dtype``
    rounded the embeddings and norms) and, for orientation, from the source without ``freeze()``
    (quantised at every call; a different summation order, so rounding-level differences:
    docs/reference-semantics.md, "Comparing quantised models").
    """
    from mmf.checkpoint import load_model
    from mmf.models.hgrn_bit import FrozenBitLinear

    src, packed = Path(src), Path(packed)
    cfg = load_config(src)
    ref = load_model(src, dtype=torch.float32)
    model = load_packed_model(packed, cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)
    unfrozen = ref(ids).logits
    ref.freeze()
    raw = ref(ids).logits
    got = model(ids).logits
    for (n1, m1), (n2, m2) in zip(ref.named_modules(), model.named_modules()):
        if isinstance(m1, FrozenBitLinear):
            if not (torch.equal(m1.ternary_codes(), m2.ternary_codes()) and torch.equal(m1.weight_scale, m2.weight_scale)):
                raise MMFError(f"verify failed: {n1} codes or scale differ from the source's weight_quant")
    stored = {}  # unpacked tensor -> its dtype in the packed file
    for p in _files_in_order(checkpoint_files(packed)):
        stored.update({n: ST_DTYPES[t.dtype] for n, t in read_header(p)[0].items() if t.dtype in _TORCH_OF})
    rounded_to = set()
    for name, prm in ref.named_parameters():
        dt = stored.get(name, torch.float32)
        r = prm.data.to(dt).to(torch.float32)
        if not torch.equal(r, prm.data):
            rounded_to.add(_NAME_OF[dt])
            prm.data = r
    rounded = ref(ids).logits if rounded_to else raw
    if not torch.equal(got, rounded):
        what = f"with its unpacked tensors rounded to {', '.join(sorted(rounded_to))}" if rounded_to else ""
        raise MMFError(f"verify failed: the packed logits differ from the frozen source's {what} (median relative "
                       f"error {median_rel_error(got, rounded):.2e}); packing should be exact, please report this")
    err = _rel_errors(got, raw)
    n = batch * seq_len
    result = {
        "compared": f"packed model vs source model after freeze(), both fp32, {n} positions "
                    f"({batch} x {seq_len} random token ids, seed {seed})",
        "positions": n,
        "bit_identical": bool(torch.equal(got, raw)),
        "max_rel_error": float(err.max()),
        "median_rel_error": float(err.median()),
        "same_next_token": int((got.argmax(-1) == raw.argmax(-1)).sum()),
        "unpacked_rounded_to": ", ".join(sorted(rounded_to)) or None,
        "median_rel_error_vs_unfrozen_source": float(_rel_errors(got, unfrozen).median()),
    }
    if rounded_to:
        result["exact_after_rounding"] = True  # equal bit for bit to the frozen source with the same rounding
    return result


def _rel_errors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a - b|| / ||b|| per (sequence, position) of the logit vectors, flattened (float64)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-30)).flatten()


# ---- inspect --------------------------------------------------------------------------------------

def inspect_checkpoint(path, stats: bool = True) -> dict:
    """Per-tensor name, shape, stored dtype or packed format, bytes, ternary shares and scale; totals.

    Works on packed checkpoints (reads headers and the scale tensors only) and on float checkpoints
    (a MatMul-free one is quantised tensor by tensor to report what packing would produce; ``stats``
    False skips that and reads headers only).

    Sizes: a row's ``bytes`` are its tensor data (a packed weight's codes plus its scale); the totals'
    ``file_bytes`` are the weight files on disk (headers included: the figure pack and unpack report)
    and ``tensor_bytes`` the sum of the rows; ``compression_vs_fp16`` compares tensor data with the same
    parameters stored as fp16.
    """
    path = Path(path)
    cfg = load_config(path)
    files = checkpoint_files(path)
    ternary = _ternary_modules(cfg)[0] if cfg.arch == "mmf" else {}
    rows = []
    totals = {"parameters": 0, "file_bytes": weight_file_bytes(files), "tensor_bytes": 0, "fp16_bytes": 0,
              "ternary_parameters": 0, "ternary_bytes": 0}
    fmt_seen = set()
    scratch = None
    for p in _files_in_order(files):
        tensors, metadata, _ = read_header(p)
        fmt = _file_format(p, metadata) if FORMAT_KEY in metadata else None
        with SafetensorsReader(p) as r:
            for name, info in sorted(tensors.items(), key=lambda kv: kv[1].begin):
                row = {"name": name, "file": p.name}
                if fmt and _is_packed_weight(name, metadata):
                    meta = packed_tensor_meta(p, name, metadata, tensors, fmt)
                    fmt_seen.add(fmt)
                    numel = meta["shape"][0] * meta["shape"][1]
                    nbytes = info.nbytes + tensors[name + SCALE_SUFFIX].nbytes
                    counts = meta["counts"]
                    row.update(shape=meta["shape"], stored=fmt, bytes=nbytes, scale=meta["scale"])
                    if not counts:
                        packed, _ = read_packed(r, name, meta)
                        c = unpack_codes(packed, meta["shape"][1], fmt)
                        counts = [int((c == -1).sum()), int((c == 0).sum()), int((c == 1).sum())]
                    _shares(row, counts)
                    totals["ternary_parameters"] += numel
                    totals["ternary_bytes"] += nbytes
                elif fmt and name.endswith(".weight" + SCALE_SUFFIX) and _is_packed_weight(name[:-len(SCALE_SUFFIX)],
                                                                                            metadata):
                    continue  # counted with its weight
                else:
                    numel = info.numel
                    nbytes = info.nbytes
                    row.update(shape=list(info.shape), stored=info.dtype, bytes=nbytes)
                    if name in ternary or (cfg.arch == "mmf" and name == "lm_head.weight"):
                        totals["ternary_parameters"] += numel
                        totals["ternary_bytes"] += nbytes
                        if stats and info.dtype in ("F16", "BF16", "F32", "F64"):
                            w = r.read(name)
                            if scratch is None or scratch.numel() < w.numel():
                                scratch = torch.empty(w.numel(), dtype=torch.float32)
                            _, s_w, counts = quantize_pack(w, "i2", f"{name} ({p.name})", scratch)
                            del w
                            row["scale"] = float(s_w)
                            _shares(row, counts)
                totals["parameters"] += numel
                totals["tensor_bytes"] += nbytes
                totals["fp16_bytes"] += 2 * numel
                rows.append(row)
    if cfg.arch == "mmf" and cfg.tie_word_embeddings and not any(r["name"] == "lm_head.weight" for r in rows):
        totals["note"] = "lm_head is tied to the embeddings"
    totals["compression_vs_fp16"] = totals["fp16_bytes"] / totals["tensor_bytes"] if totals["tensor_bytes"] else 0.0
    totals["bits_per_ternary_weight"] = (8 * totals["ternary_bytes"] / totals["ternary_parameters"]
                                         if totals["ternary_parameters"] else None)
    return {"path": str(path), "model_type": cfg.model_type, "packed": bool(fmt_seen),
            "format": fmt_seen.pop() if fmt_seen else None, "tensors": rows, "totals": totals}


def _shares(row: dict, counts) -> None:
    total = sum(counts) or 1
    row["share_-1"], row["share_0"], row["share_+1"] = (c / total for c in counts)


# ---- one packed file from tensors in memory (the worked example of docs/formats.md, small tools) ----

def write_packed_file(path, tensors: dict, fmt: str = "i2", keep_dtype: str = "fp32") -> dict:
    """Write one packed safetensors file: every 2-D tensor whose name ends in ``.weight`` is packed
    (``<name>`` U8 + ``<name>_scale`` F32 + metadata entry), every other tensor kept in ``keep_dtype``.

    Same fields, order and code path as ``pack_checkpoint`` writes per shard. Returns the metadata.
    """
    keep = KEEP_DTYPES[keep_dtype]
    plan, packed = [], {}
    for name, t in tensors.items():
        if t.dim() == 2 and name.endswith(".weight"):
            plan += [(name, torch.uint8, (t.shape[0], packed_row_bytes(t.shape[1], fmt))),
                     (name + SCALE_SUFFIX, torch.float32, ())]
        else:
            plan.append((name, keep, tuple(t.shape)))
    meta = {"format": "pt", FORMAT_KEY: fmt, VERSION_KEY: FORMAT_VERSION, KEEP_DTYPE_KEY: _ST_OF[keep]}
    template = dict(meta)
    for name, t in tensors.items():
        if t.dim() == 2 and name.endswith(".weight"):
            template[TENSOR_KEY_PREFIX + name] = _tensor_meta(fmt, t.shape, -1.2345678901234567e-300, [10**15] * 3)
    writer = SafetensorsWriter(Path(path), plan, template)
    try:
        for name, t in tensors.items():
            if t.dim() == 2 and name.endswith(".weight"):
                b, s_w, counts = quantize_pack(t, fmt, name)
                writer.write(name, b)
                writer.write(name + SCALE_SUFFIX, s_w.reshape(()))
                meta[TENSOR_KEY_PREFIX + name] = _tensor_meta(fmt, t.shape, float(s_w), counts)
            else:
                writer.write(name, t.to(keep))
        writer.close(meta)
    except BaseException:
        writer.abort()
        raise
    return meta
