# Experiment: where the 13b decode step's time goes, and A/B tests of decode-GEMV variants in one run.
# Variants of the installed kernel module (text edits, same schedules: tuned once, on the real kernel):
#   base           the kernel as installed
#   nopro          no prologue: the activations already in the scratch are used (stale; timing only)
#   nowait         no gdc_wait: each kernel starts without waiting for the previous one (results
#                  wrong; timing only): what the dependency between kernels costs
#   nopro_nowait   both: the weight stream, launches and epilogues alone
#   late           PARAMS_EARLY = False: the prologue's constant loads after the wait
#   nostats        the decoder's ``Stats`` ignored: every prologue reduces its whole input row (only
#                  meaningful with patches/gemv_stats_from_producer.diff applied)
#   nostore        the prologue's scratch stores masked off (timing only); nostore_nobar also drops
#                  the barrier after them
#   ahead2         AHEAD = 2: two row blocks in flight per program, both issued before the wait
#                  (needs patches/gemv_ahead2.diff)
#   pipeS          STAGES = S: batch-1 GEMVs as one software-pipelined loop of S stages, the
#                  prologue in its first iteration (needs patches/gemv_pipelined.diff)
#   pfM_dD         L2 prefetch of the next D row blocks, mode M (needs patches/gemv_l2_prefetch.diff)
# EXTRA=path[,path] adds other kernel modules (e.g. an earlier ternary_gemv.py) as variants
# "extra:<file name>", tuned afresh. CHECK=1 (default) first runs kernel_bench's quick correctness
# checks on the installed kernels. SWEEP=name,... first times every candidate schedule of those
# variants on the 13b shapes, with the compiled kernel's registers and spills. DECODE=name,... picks
# the variants timed in whole-model decode (default: base, nopro, nowait, nopro_nowait, the EXTRAs,
# base again); SIZES= (empty) skips it. Every decode variant starts from the zero state, so the first
# step's logits are compared with the first variant's (equal unless the variant is a timing-only one).
# On the device machine: pip install --no-deps . ; cd /tmp ; python <repo>/bench/experiments/decode_breakdown.py
# Prints a table and writes $OUT/decode_breakdown.json.
import importlib.util
import json
import os
import re
import tempfile
import time

import torch

from mmf.bench import kernel_bench as kb
from mmf.bench.model_bench import build_mmf_random
from mmf.config import model_preset
from mmf.decode_graph import GraphDecoder
from mmf.kernels import schedule_cache
from mmf.kernels import ternary_gemv as tv

t0 = time.time()
OUT = os.environ.get("OUT", "/tmp")
SIZES = [x for x in os.environ.get("SIZES", "13b").split(",") if x]
SHAPES = [(5120, 5120, "norm"), (5120, 5120, "res"), (13824, 5120, "glu"), (5120, 13824, "res")]
SRC = open(tv.__file__).read()
NOPRO = [("    if PRO != 4:\n", "    if PRO == 99:\n"),  # kernels up to 346b7fb, and since
         ("    if PRO == 4:  # already quantised", "    if True:  # already quantised")]  # (a variant)
EDITS = {"base": [], "nopro": NOPRO, "nowait": [(re.compile(r"^(\s*)gdc_wait\(\)$", re.M), r"\1pass")],
         "late": [(re.compile(r"^PARAMS_EARLY = .*$", re.M), "PARAMS_EARLY = False")]}
EDITS["nopro_nowait"] = EDITS["nopro"] + EDITS["nowait"]
# nostore: the prologue computes everything but does not store its quantised activations (the main loop
# reads the stale ones; timing only): what the round trip through the scratch costs; nostore_nobar also
# drops the barrier between the prologue's stores and the loads
EDITS["nostore"] = [("word, mask=w2 < PW)", "word, mask=(w2 < PW) & (M < 0))")]
EDITS["nostore_nobar"] = EDITS["nostore"] + [("        tl.debug_barrier()\n", "")]
# nostats: every prologue reduces its whole input row itself (no ``Stats`` from the previous GEMV;
# patches/gemv_stats_from_producer.diff)
EDITS["nostats"] = [("    m = out.shape[0]\n    nseg = len(weights)\n",
                     "    stats_in = stats_out = next_norm = None\n    m = out.shape[0]\n    nseg = len(weights)\n")]
EDITS["ahead2"] = [(re.compile(r"^AHEAD = .*$", re.M), "AHEAD = 2")]
for _st in (2, 3, 4, 6):
    EDITS[f"pipe{_st}"] = [(re.compile(r"^STAGES = .*$", re.M), f"STAGES = {_st}")]
for _mode in (1, 2):
    for _depth in (1, 2, 4):
        EDITS[f"pf{_mode}_d{_depth}"] = [(re.compile(r"^PF_MODE = .*$", re.M), f"PF_MODE = {_mode}"),
                                          (re.compile(r"^PF_DEPTH = .*$", re.M), f"PF_DEPTH = {_depth}")]
EXTRAS = {"extra:" + os.path.basename(p): p for p in filter(None, os.environ.get("EXTRA", "").split(","))}
MODS = {}
REAL_GEMV = tv.gemv
# Every variant, "base" too, is a loaded copy of the kernel module running the schedules given to it
# (``use``); the decoder's refinement would act on the installed module only, so it stays off.
GraphDecoder.REFINE = False
schedule_cache.ENABLED = False  # every variant is tuned in this run, never read from an earlier one


def log(*a):
    print(f"[{time.time() - t0:5.0f}s]", *a, flush=True)


def _load(name, src):
    ident = re.sub(r"[^A-Za-z0-9_]", "_", name)
    path = os.path.join(tempfile.mkdtemp(), f"tv_{ident}.py")
    open(path, "w").write(src)
    spec = importlib.util.spec_from_file_location(f"mmf.kernels.tv_{ident}", path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "mmf.kernels"
    spec.loader.exec_module(mod)
    return mod


def module(name):
    """The kernel module of variant ``name``, built on first use."""
    if name not in MODS:
        if name in EXTRAS:
            MODS[name] = _load(name, open(EXTRAS[name]).read())
        else:
            src, n = SRC, 0
            for a, b in EDITS[name]:
                if isinstance(a, str):
                    n += src.count(a)
                    src = src.replace(a, b)
                else:
                    src, k = a.subn(b, src)
                    n += k
            if EDITS[name] and not n:
                raise SystemExit(f"variant {name}: its edits do not apply to {tv.__file__}")
            MODS[name] = _load(name, src)
    return MODS[name]


def use(name, tuned):
    """The decoder calls variant ``name``; edited variants run the base's schedules, EXTRA kernels are
    tuned afresh, as the decoder would tune them."""
    mod = module(name)
    mod._TUNED.clear()
    if name in EDITS:
        mod._TUNED.update(tuned)
    tv.gemv = mod.gemv


class _Recorder:
    """Stands in for a module's ``_gemv_kernel`` and keeps the compiled kernel of the last launch."""

    def __init__(self, kernel):
        self.kernel, self.last = kernel, None

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            self.last = launch(*args, **kw)
            return self.last
        return run


def sweep(names, bw, res):
    """Every candidate schedule of each kernel module on the 13b shapes: registers, spills, time."""
    for name in names:
        mod = module(name)
        rec = _Recorder(mod._gemv_kernel)
        mod._gemv_kernel = rec
        tv.gemv = mod.gemv
        for n, k, kind in SHAPES:
            for cfg in mod._configs(1, mod.words_per_row(k)):
                row = dict(variant=name, shape=f"{k}->{n}", kind=kind, config=str(cfg))
                try:
                    r = kb.time_gemv(n, k, kind, 1, torch.float16, bw, copies_bytes=128 << 20, config=cfg)
                    ck = rec.last
                    row.update(us=r["us"], pct_copy_bw=r["pct_copy_bw"], regs=getattr(ck, "n_regs", None),
                               spills=getattr(ck, "n_spills", None), smem=getattr(ck.metadata, "shared", None))
                except Exception as e:  # noqa: BLE001 - a schedule that does not fit is reported
                    row["error"] = repr(e)[:120]
                res["sweep"].append(row)
                log(f"sweep {name:22s} {row['shape']:>11s} {kind:5s} {row['config']:12s} "
                    + (f"{row['us']:7.2f} us {row['pct_copy_bw']:5.1f} % regs {row['regs']} spills {row['spills']}"
                       if "us" in row else row["error"]))
        mod._gemv_kernel = rec.kernel
    tv.gemv = REAL_GEMV


def decode_ms(dec, nxt):
    """ms per token in each of 3 runs of 100 decode steps."""
    torch.cuda.synchronize()
    return tv.event_times(lambda: dec.step(nxt), 3, 100)


def main():
    res = {"copy_GB_s": None, "decode": [], "gemv": [], "sweep": []}
    if os.environ.get("CHECK", "1") == "1":  # the installed kernels against the references, quick shapes
        tv.TUNE = False
        res["checks"] = kb.check_kernels(True) + kb.check_decoder(True)
        kb.table(res["checks"], "correctness: Triton vs torch reference on the GPU (installed kernels)")
        tv.TUNE = True
        tv._TUNED.clear()
    bw = kb.copy_bandwidth()
    res["copy_GB_s"] = bw / 1e9
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    if os.environ.get("SWEEP"):
        sweep(os.environ["SWEEP"].split(","), bw, res)
    default = ["base", "nopro", "nowait", "nopro_nowait"] + list(EXTRAS) + ["base"]
    names = [x for x in os.environ.get("DECODE", ",".join(default)).split(",") if x]
    for size in SIZES:
        cfg = model_preset(size)
        model = build_mmf_random(cfg, "cuda", torch.float16)
        nxt = torch.full((1,), 7, device="cuda")
        tv.gemv = REAL_GEMV  # tune on the real kernel, in the decoder's setting, once
        tv._TUNED.clear()
        dec = GraphDecoder(model, 1, use_graph=False)
        dec.step(nxt)
        if size == "13b":
            for n, k, kind in SHAPES:
                kb.time_gemv(n, k, kind, 1, torch.float16, bw, copies_bytes=256 << 20)
        tuned = dict(tv._TUNED)
        del dec
        log(f"{size}: tuned " + "; ".join(f"{k[2]}x{k[3]}/{k[4]}/{k[5]}/{k[6]}: {v}" for k, v in tuned.items()))
        ref_logits = None
        for name in names:
            use(name, tuned)
            torch.cuda.empty_cache()
            dec = GraphDecoder(model, 1)
            first = dec.step(nxt).clone()
            ref_logits = first if ref_logits is None else ref_logits
            for _ in range(4):
                dec.step(nxt)
            ts = decode_ms(dec, nxt)
            floor = dec.bytes_per_token() / bw * 1e3
            same = bool(torch.equal(first, ref_logits))
            res["decode"].append(dict(model=size, variant=name, ms_per_token=min(ts), runs=ts, floor_ms=floor,
                                      first_logits_equal_first_variant=same,
                                      tuned={str(k): v for k, v in module(name)._TUNED.items()}))
            log(f"decode {size} {name:24s} {min(ts):.3f} ms/token (runs {', '.join(f'{t:.3f}' for t in ts)}; "
                f"floor {floor:.3f}; first logits equal the first variant's: {same})")
            del dec
            if size == "13b":
                for n, k, kind in SHAPES:
                    r = kb.time_gemv(n, k, kind, 1, torch.float16, bw, copies_bytes=256 << 20)
                    r["variant"] = name
                    res["gemv"].append(r)
                    log(f"  gemv {r['shape']:>14s} {kind:5s} {r['us']:7.2f} us {r['pct_copy_bw']:5.1f} %")
        del model
        torch.cuda.empty_cache()
    tv.gemv = REAL_GEMV
    json.dump(res, open(f"{OUT}/decode_breakdown.json", "w"), indent=1, default=str)
    print(f"\n{'variant':26s} {'model':5s} {'ms/token':>9s}")
    for r in res["decode"]:
        print(f"{r['variant']:26s} {r['model']:5s} {r['ms_per_token']:9.3f}  floor {r['floor_ms']:.3f}")
    for r in res["sweep"]:
        print(f"{r['variant']:22s} {r['shape']:>11s} {r['kind']:5s} {r['config']:12s} "
              + (f"{r['us']:7.2f} {r['pct_copy_bw']:5.1f} regs {r['regs']} spills {r['spills']}" if "us" in r
                 else "error"))
    print(f"{'variant':26s} {'shape':>14s} {'kind':5s} {'us':>7s} {'%bw':>5s}")
    for r in res["gemv"]:
        print(f"{r['variant']:26s} {r['shape']:>14s} {r['kind']:5s} {r['us']:7.2f} {r['pct_copy_bw']:5.1f}")
    log("done")


if __name__ == "__main__":
    main()
