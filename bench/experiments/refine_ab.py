# Experiment: GraphDecoder's schedule refinement (each GEMV shape's runners-up tried in the whole
# captured step, ``ternary_gemv.refine_schedules``) against the tuner's choices alone, in one run:
# build without refinement, with it (from the same tuning), and without again (drift).
# On the device machine: pip install --no-deps . ; cd /tmp ; python <repo>/bench/experiments/refine_ab.py
# Prints a table and writes $OUT/refine_ab.json. SIZES=13b,370m by default.
import json
import os
import time

import torch

from mmf.bench import kernel_bench as kb
from mmf.bench.model_bench import build_mmf_random
from mmf.config import model_preset
from mmf.decode_graph import GraphDecoder
from mmf.kernels import ternary_gemv as tv

from decode_breakdown import decode_ms  # noqa: E402 - beside this script (bench/experiments)

OUT = os.environ.get("OUT", "/tmp")
res = {"copy_GB_s": kb.copy_bandwidth() / 1e9, "rows": []}
for size in os.environ.get("SIZES", "13b,370m").split(","):
    model = build_mmf_random(model_preset(size), "cuda", torch.float16)
    nxt = torch.full((1,), 7, device="cuda")
    tv._TUNED.clear()
    tuned = None
    for name, refine in (("tuned", False), ("refined", True), ("tuned again", False)):
        if tuned is not None and not refine:
            tv._TUNED.clear()
            tv._TUNED.update(tuned)
        GraphDecoder.REFINE = refine
        torch.cuda.synchronize()
        t0 = time.time()
        dec = GraphDecoder(model, 1)
        build_s = time.time() - t0
        tuned = tuned or dict(tv._TUNED)
        for _ in range(5):
            dec.step(nxt)
        ts = decode_ms(dec, nxt)
        row = dict(model=size, variant=name, ms_per_token=min(ts), runs=ts, build_s=build_s,
                   changes=[(str(k), b, a, mb, ma) for k, b, a, mb, ma in dec.refined])
        res["rows"].append(row)
        print(f"{size:5s} {name:12s} {min(ts):.3f} ms/token (runs {', '.join(f'{t:.3f}' for t in ts)}), build {build_s:.1f} s",
              flush=True)
        for k, b, a, mb, ma in dec.refined:
            print(f"    {k[2]}x{k[3]}/{k[4]}/{k[5]}/{k[6]}: {b} -> {a}  ({mb:.3f} -> {ma:.3f} ms)", flush=True)
        del dec
        torch.cuda.empty_cache()
    del model
json.dump(res, open(f"{OUT}/refine_ab.json", "w"), indent=1, default=str)
