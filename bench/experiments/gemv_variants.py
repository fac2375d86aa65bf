# Experiment (not part of the package): time the whole-row GEMV (with PDL) against a K-chunked variant.
# Usage on the device machine: pip install --no-deps . ; cd /tmp ; python <repo>/bench/experiments/gemv_variants.py <repo>
import json, os, sys, time, importlib.util
import torch, triton
import mmf.kernels
from mmf.bench import kernel_bench as kb
from mmf.kernels import ternary_gemv as tv_old  # the committed whole-row kernel (with PDL)
t0 = time.time()
OUT = os.environ.get("OUT", "/tmp")
spec = importlib.util.spec_from_file_location("gemv_kloop", os.path.join(sys.argv[1], "bench/experiments/gemv_kloop_variant.py"))
tv_new = importlib.util.module_from_spec(spec); spec.loader.exec_module(tv_new)

def use(mod):
    sys.modules["mmf.kernels.ternary_gemv"] = mod
    mmf.kernels.ternary_gemv = mod

bw = kb.copy_bandwidth()
print("copy bw", bw / 1e9, flush=True)
shapes = [(5120, 5120, "norm"), (13824, 5120, "glu"), (5120, 13824, "res")]
res = {"bw": bw, "rows": []}
use(tv_old)
for n, k, kind in shapes:
    tv_old._TUNED.clear()
    r = kb.time_gemv(n, k, kind, 1, torch.float16, bw, copies_bytes=256 << 20)
    r["variant"] = "old+pdl tuned"; res["rows"].append(r)
use(tv_new)
cfgs = []
for bn, bk, nw in [(16, 128, 4), (32, 64, 8), (32, 128, 8), (8, 256, 4), (16, 256, 8)]:
    for per_sm in (1, 2):
        for ns in (0, 3):
            for acc1 in (0, 1):
                cfgs.append((bn, bk, nw, per_sm, ns, acc1))
print(len(cfgs), "configs", flush=True)
for n, k, kind in shapes:
    best = None
    for cfg in cfgs:
        if time.time() - t0 > 540:
            break
        try:
            r = kb.time_gemv(n, k, kind, 1, torch.float16, bw, copies_bytes=128 << 20, config=cfg)
        except Exception as e:
            r = dict(shape=f"{k}->{n}", kind=kind, config=str(cfg), error=repr(e)[:100])
        r["variant"] = "new"; res["rows"].append(r)
        if "us" in r and (best is None or r["us"] < best["us"]):
            best = r
    print(f"[{time.time()-t0:.0f}s] best {k}->{n} {kind}: {best}", flush=True)
    json.dump(res, open(f"{OUT}/gpu2.json", "w"), indent=1)
rows = sorted([r for r in res["rows"] if "us" in r], key=lambda r: (r["shape"], r["kind"], r["us"]))
kb.table([{k: r[k] for k in ("variant", "shape", "kind", "config", "us", "pct_copy_bw")} for r in rows], "all")
