# Experiment: is a persistent decode kernel with grid barriers worth building? Streams the bytes of
# one 13b decode step (the 161 projections' packed weights, 3.2 GB) with no arithmetic but a sum,
# in five forms, and times each per "token" in a CUDA graph:
#   launches           one kernel per projection, back to back with PDL, no dependency
#                      (the weight stream with its launches: decode_breakdown's nopro_nowait)
#   launches+wait      the same with gdc_wait at each kernel's start, after its first block's
#                      loads are issued (the dependency between kernels, no prologue)
#   launches+wait+prologue  the same with a stand-in for the GEMV prologue after the wait (a
#                      4096-vector from L2, three dependent reductions, scratch store and reload)
#   persistent+barrier one kernel, one program per SM, a grid barrier (atomic counter) between
#                      projections; each program issues its next projection's first block
#                      before it arrives at the barrier
#   persistent         the same without barriers (one stream)
# and the floor (bytes / copy bandwidth). BLOCKS= (int32 words per program per step, i.e. what each
# program has in flight), WARPS= (8), NO_PERSISTENT=1 skips the persistent forms. On the device:
#   pip install --no-deps . ; cd /tmp ; python <repo>/bench/experiments/barrier_stream.py
# Prints a line per form and writes $OUT/barrier_stream_w<WARPS>.json. Results and what they say:
# bench/results/kernel_bench_h100.md (fifth session), barrier_stream_h100.json.
import json
import os

import torch
import triton
import triton.language as tl

from mmf.kernels.ternary_gemv import HAS_GDC, event_times, gdc_launch_dependents, gdc_wait

OUT = os.environ.get("OUT", "/tmp")
BLOCKS = [int(x) for x in os.environ.get("BLOCKS", "4096,8192,16384").split(",")]  # int32 words per program per step
WARPS = int(os.environ.get("WARPS", "8"))


@triton.jit
def _fake_prologue(XB, SCR, pid, PRO: tl.constexpr):
    """About what the decode GEMV's prologue does after the wait: load a 5120-vector (L2), three
    dependent block-wide reductions, quantise, store to a scratch, barrier, reload, one more sum."""
    k = tl.arange(0, PRO)
    x = tl.load(XB + k)
    r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / PRO + 1e-6)
    v = x * r
    r2 = 1.0 / tl.sqrt(tl.sum(v * v, 0) / PRO + 1e-6)
    xn = v * r2
    sx = 127.0 / tl.maximum(tl.max(tl.abs(xn), 0), 1e-5)
    q = (xn * sx).to(tl.int32)
    tl.store(SCR + pid * PRO + k, q)
    tl.debug_barrier()
    return tl.sum(tl.load(SCR + pid * PRO + k), 0)


@triton.jit
def _stream_one(W, off, n, pid, NPROG, acc, XB, SCR, BLOCK: tl.constexpr, WAIT: tl.constexpr, PRO: tl.constexpr):
    """Sum this program's blocks pid, pid + NPROG, ... of W[off: off + n], one block in flight ahead."""
    r = tl.arange(0, BLOCK)
    nb = tl.cdiv(n, BLOCK)
    c = tl.load(W + off + pid * BLOCK + r, mask=pid * BLOCK + r < n, other=0, eviction_policy="evict_first")
    if WAIT:
        gdc_wait()
    gdc_launch_dependents()
    if PRO > 0:
        acc += _fake_prologue(XB, SCR, pid, PRO)
    for b in range(pid, nb, NPROG):
        nxt = (b + NPROG) * BLOCK + r
        t = tl.load(W + off + nxt, mask=nxt < n, other=0, eviction_policy="evict_first")
        acc += c
        c = t
    return acc


@triton.jit
def _launch_kernel(W, OFFS, NS, ph, OUT, NPROG, XB, SCR, BLOCK: tl.constexpr, WAIT: tl.constexpr,
                   PRO: tl.constexpr):
    pid = tl.program_id(0)
    off = tl.load(OFFS + ph)
    n = tl.load(NS + ph)
    acc = _stream_one(W, off, n, pid, NPROG, tl.zeros((BLOCK,), tl.int32), XB, SCR, BLOCK, WAIT, PRO)
    tl.store(OUT + pid, tl.sum(acc, 0))


@triton.jit
def _persistent_kernel(W, OFFS, NS, NPH, BAR, OUT, NPROG, BLOCK: tl.constexpr, BARRIER: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.int32)
    off = tl.load(OFFS)
    n = tl.load(NS)
    c = tl.load(W + off + pid * BLOCK + r, mask=pid * BLOCK + r < n, other=0, eviction_policy="evict_first")
    for ph in range(0, NPH):
        nb = tl.cdiv(n, BLOCK)
        for b in range(pid, nb, NPROG):
            nxt = (b + NPROG) * BLOCK + r
            t = tl.load(W + off + nxt, mask=nxt < n, other=0, eviction_policy="evict_first")
            acc += c
            c = t
        # the next projection's first block, in flight through the barrier
        nph = tl.minimum(ph + 1, NPH - 1)
        off = tl.load(OFFS + nph)
        n = tl.load(NS + nph)
        c = tl.load(W + off + pid * BLOCK + r, mask=(pid * BLOCK + r < n) & (ph + 1 < NPH), other=0,
                    eviction_policy="evict_first")
        if BARRIER:
            tl.debug_barrier()
            tl.atomic_add(BAR, 1, sem="release", scope="gpu")
            target = (ph + 1) * NPROG
            seen = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
            while seen < target:
                seen = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
            tl.debug_barrier()
    tl.store(OUT + pid, tl.sum(acc, 0))


def main():
    dev = torch.device("cuda")
    nsm = torch.cuda.get_device_properties(dev).multi_processor_count
    d, m, L, V = 5120, 13824, 40, 32000
    words = []  # int32 words per projection: rows x ceil(K / 4) bytes / 4
    for _ in range(L):
        words += [3 * d * d // 16, d * d // 16, 2 * m * d // 16, d * m // 16]
    words.append(V * d // 16)
    offs = [0]
    for w in words[:-1]:
        offs.append(offs[-1] + w)
    total = sum(words)
    W = torch.randint(-2**31, 2**31 - 1, (total,), dtype=torch.int32, device=dev)
    OFFS = torch.tensor(offs, dtype=torch.int64, device=dev)
    NS = torch.tensor(words, dtype=torch.int64, device=dev)
    out = torch.zeros(nsm, dtype=torch.int32, device=dev)
    bar = torch.zeros(1, dtype=torch.int32, device=dev)
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    bw = 2 * a.numel() / (min(event_times(lambda: b.copy_(a), 5)) / 1e3)  # bytes read + written per s
    del a, b
    floor = total * 4 / bw * 1e3
    pdl = {"launch_pdl": True} if HAS_GDC and torch.cuda.get_device_capability(dev)[0] >= 9 else {}

    xb = torch.randn(8192, device=dev)
    scr = torch.zeros(nsm * 8192, dtype=torch.int32, device=dev)

    def launches(wait, block, pro=0):
        def run():
            for ph in range(len(words)):
                _launch_kernel[(nsm,)](W, OFFS, NS, ph, out, nsm, xb, scr, BLOCK=block, WAIT=wait, PRO=pro,
                                       num_warps=WARPS, **pdl)
        return run

    def persistent(barrier, block):
        def run():
            bar.zero_()
            _persistent_kernel[(nsm,)](W, OFFS, NS, len(words), bar, out, nsm, BLOCK=block, BARRIER=barrier,
                                       num_warps=WARPS)
        return run

    rows = []
    for block in BLOCKS:
        forms = [("launches", launches(False, block)), ("launches+wait", launches(True, block)),
                 ("launches+wait+prologue", launches(True, block, 4096))]
        if not os.environ.get("NO_PERSISTENT"):
            forms += [("persistent+barrier", persistent(True, block)), ("persistent", persistent(False, block))]
        for name, fn in forms:
            fn()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            g.replay()
            ts = event_times(g.replay, 5, 10)
            ms = min(ts)
            rows.append(dict(form=name, block_words=block, ms_per_token=ms, runs=ts, floor_ms=floor,
                             pct_of_floor=100 * floor / ms, phases=len(words)))
            print(f"{name:24s} block {block:5d} {ms:7.3f} ms/token  (floor {floor:.3f}, {100 * floor / ms:5.1f} %)",
                  flush=True)
            del g
    res = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, triton=triton.__version__,
               copy_GB_s=bw / 1e9, bytes_per_token=total * 4, sms=nsm, warps=WARPS, rows=rows)
    json.dump(res, open(f"{OUT}/barrier_stream_w{WARPS}.json", "w"), indent=1)


if __name__ == "__main__":
    main()
