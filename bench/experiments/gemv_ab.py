# Experiment: variants of the decode GEMV A/B-tested in one run (SETUPS below): each row split into
# power-of-two pieces (no lanes on padding; PIECE_CAP 128: pieces of at most 128 words, whole rows
# per warp), schedules tuned one launch at a time (do_bench) or in a graph over every layer's
# weights (the decoder's tune_pool), and the kernel before (OLD_GEMV: the path of a copy of it,
# ``git show 2b1dab4:kernels/ternary_gemv.py > old_gemv.py``). VARIANTS=a,b,... picks them.
# On the device machine: pip install --no-deps . ; cd /tmp ; OLD_GEMV=old_gemv.py python <repo>/bench/experiments/gemv_ab.py
# Prints a table and writes $OUT/gemv_ab.json.
import importlib.util
import json
import os
import time

import torch

from mmf.bench import kernel_bench as kb
from mmf.bench.model_bench import build_mmf_random
from mmf.config import model_preset
from mmf.decode_graph import GraphDecoder
from mmf.kernels import reference
from mmf.kernels import ternary_gemv as tv

from decode_breakdown import decode_ms  # noqa: E402 - beside this script (bench/experiments)

t0 = time.time()
OUT = os.environ.get("OUT", "/tmp")
SIZES = os.environ.get("SIZES", "13b,370m").split(",")
OLD = os.environ.get("OLD_GEMV")  # path of the previous kernel module, for an A/B in the same run
res = {"rows": [], "decode": [], "checks": []}
NEW_GEMV = tv.gemv
old = None
if OLD:
    spec = importlib.util.spec_from_file_location("mmf.kernels.tv_old", OLD)
    old = importlib.util.module_from_spec(spec)
    old.__package__ = "mmf.kernels"
    spec.loader.exec_module(old)


def log(*a):
    print(f"[{time.time() - t0:5.0f}s]", *a, flush=True)


def _no_pool(*args, tune_pool=None, **kw):
    return NEW_GEMV(*args, **kw)


# name -> (gemv the decoder calls, tv.PIECE_CAP); VARIANTS picks them (env, comma list). The
# L2-prefetch variants of the run in bench/results/gemv_pieces128_pf_h100.json (PF_BLOCKS 2 and 4:
# each program's next row blocks prefetched before the prologue) were removed with their code.
def _old(*args, tune_pool=None, **kw):
    return old.gemv(*args, **kw)


SETUPS = {"old": (_old, 128), "pieces/do_bench": (_no_pool, 0), "pieces": (NEW_GEMV, 0), "pieces128": (NEW_GEMV, 128)}


def variant(name):
    """Switch the gemv the decoder calls and the kernel options; each switch tunes afresh."""
    tv.gemv, tv.PIECE_CAP = SETUPS[name]
    tv._TUNED.clear()
    if old:
        old._TUNED.clear()


bw = kb.copy_bandwidth()
a = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()
read_ms = kb.cuda_time(lambda: a.sum(), iters=20)
res["copy_GB_s"], res["read_sum_GB_s"] = bw / 1e9, a.numel() * 4 / (read_ms * 1e-3) / 1e9
del a
log(f"copy bandwidth {bw / 1e9:.0f} GB/s, read-only (torch sum, 1 GiB) {res['read_sum_GB_s']:.0f} GB/s")
VARIANTS = os.environ.get("VARIANTS", ",".join((["old"] if old else []) + ["pieces/do_bench", "pieces"])).split(",")

# correctness: every variant computes the same integer sums, so outputs must be bit-equal, and match the reference
g = torch.Generator(device="cuda").manual_seed(1)
for (n, k, nseg, pro, epi, m) in [(1000, 1027, 1, tv.PRO_PLAIN, tv.EPI_STORE, 1), (515, 2050, 3, tv.PRO_NORM, tv.EPI_STORE, 2),
                                   (5120, 5120, 3, tv.PRO_NORM, tv.EPI_STORE, 1), (13824, 5120, 1, tv.PRO_NORM, tv.EPI_GLU, 1),
                                   (5120, 13824, 1, tv.PRO_PLAIN, tv.EPI_RESIDUAL, 2), (32000, 5120, 1, tv.PRO_NORM, tv.EPI_STORE, 1)]:
    rows = 2 * n if epi == tv.EPI_GLU else n
    ws = [kb.rand_packed(rows, k) for _ in range(nseg)]
    x = torch.randn(m, k, device="cuda", generator=g).half()
    bnw = (torch.rand(nseg, k, device="cuda", generator=g) + 0.5).half()
    nw = (torch.rand(k, device="cuda", generator=g) + 0.5).half()
    sw = torch.rand(nseg, device="cuda", generator=g) * 50 + 10
    res_t = torch.randn(m, nseg * n, device="cuda", generator=g).half()
    outs = []
    for name in VARIANTS:
        variant(name)
        out = torch.empty(m, n if epi == tv.EPI_GLU else nseg * n, device="cuda", dtype=torch.float16)
        tv.gemv(x, ws, sw, bnw, out, pro=pro, epi=epi, norm_weight=nw,
                residual=res_t if epi == tv.EPI_RESIDUAL else None, config=(4, 4, 2))
        outs.append(out)
    torch.cuda.synchronize()
    same = all(torch.equal(outs[0], o) for o in outs[1:])
    ok = True
    if epi == tv.EPI_STORE and pro == tv.PRO_PLAIN:  # against the plain reference
        ref = torch.cat([reference.bitlinear_i2(x.float(), bnw[i].float(), w, k, sw[i:i + 1])
                         for i, w in enumerate(ws)], 1)
        err = ((outs[0].float() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
        ok = err < 2e-3
    res["checks"].append(dict(shape=f"{m}x{k}->{nseg}x{n}", pro=pro, epi=epi, bit_equal=same, ref_ok=ok))
    log(f"check {m}x{k}->{nseg}x{n} pro {pro} epi {epi}: variants bit-equal {same}, reference ok {ok}")

# single projections, back to back over distinct weight copies
for name in VARIANTS:
    variant(name)
    for (n, k, kind) in [(5120, 5120, "norm"), (13824, 5120, "glu"), (5120, 13824, "res"), (32000, 5120, "norm")]:
        r = kb.time_gemv(n, k, kind, 1, torch.float16, bw)
        r["variant"] = name
        res["rows"].append(r)
        log(f"gemv {name:15s} {r['shape']:>14s} {kind:5s} {r['us']:7.2f} us {r['pct_copy_bw']:5.1f} % of copy bw")

# whole-model decode
for size in SIZES:
    cfg = model_preset(size)
    model = build_mmf_random(cfg, "cuda", torch.float16)
    nxt = torch.full((1,), 7, device="cuda")
    for name in VARIANTS + VARIANTS[:1]:  # the first again: drift within the run, and a new tuning
        variant(name)
        torch.cuda.empty_cache()
        dec = GraphDecoder(model, 1)
        for _ in range(5):
            dec.step(nxt)
        ts = decode_ms(dec, nxt)
        floor = dec.bytes_per_token() / bw * 1e3
        r = dict(model=size, variant=name, ms_per_token=min(ts), runs=ts, floor_ms=floor,
                 tuned={str(k): v for k, v in (old._TUNED if name == "old" else tv._TUNED).items()})
        res["decode"].append(r)
        log(f"decode {size} {name:15s} {min(ts):.3f} ms/token (runs {', '.join(f'{t:.3f}' for t in ts)}; floor {floor:.3f})")
        del dec
    del model
    torch.cuda.empty_cache()
json.dump(res, open(f"{OUT}/gemv_ab.json", "w"), indent=1, default=str)
log("done")
