# Experiment: 13b/370m decode with PDL, then 13b prefill (128 tokens) timed and profiled per kernel.
# On the device machine: pip install --no-deps . ; cd /tmp ; python <repo>/bench/experiments/prefill_profile.py
import json, os, sys, time
import torch, triton
from mmf.bench import kernel_bench as kb
from mmf.kernels import ternary_gemv as tv, ternary_gemm as tg
from mmf.config import model_preset
from mmf.decode_graph import GraphDecoder
t0 = time.time()
OUT = os.environ.get("OUT", "/tmp")
bw = kb.copy_bandwidth()
res = {"bw": bw}
for size in ("370m", "13b"):
    r, model, d = kb.decode_bench(size, torch.float16, bw, steps=100)
    res[f"decode_{size}"] = r
    print(f"[{time.time()-t0:.0f}s] decode {size} pdl={tv.PDL}: {r['ms_per_token']:.3f} ms (floor {r['floor_ms']:.3f}) peak {r['peak_allocated_GB']:.2f}", flush=True)
    if size == "13b":
        ids = torch.randint(3, 32000, (1, 128), device="cuda")
        d.prefill(ids); torch.cuda.synchronize()
        ms = kb.cuda_time(lambda: d.prefill(ids), iters=5)
        print(f"prefill 13b 128: {ms:.2f} ms", flush=True)
        res["prefill_ms"] = ms
        print("gemm tuned", tg._TUNED, flush=True)
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            d.prefill(ids); torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
    del model, d
    torch.cuda.empty_cache()
json.dump(res, open(f"{OUT}/gpu3.json", "w"), indent=1, default=str)
