# Time to build a GraphDecoder (compile, tune, capture, refine) for a random model, and how many of
# its GEMV shapes were tuned in this process rather than read from the on-disk schedule cache
# (kernels/schedule_cache.py). Run it twice in separate processes with the same MMF_SCHEDULE_CACHE
# to see what the cache saves. On the device: pip install --no-deps . ; cd /tmp ;
#   MMF_SCHEDULE_CACHE=/tmp/s.json SIZE=370m python <repo>/bench/experiments/decoder_build_time.py
import json
import os
import time

import torch

from mmf.bench.model_bench import build_mmf_random
from mmf.config import model_preset
from mmf.decode_graph import GraphDecoder
from mmf.kernels import ternary_gemv as tv

size = os.environ.get("SIZE", "370m")
model = build_mmf_random(model_preset(size), "cuda", torch.float16)
torch.cuda.synchronize()
t0 = time.perf_counter()
dec = GraphDecoder(model, 1)
torch.cuda.synchronize()
build = time.perf_counter() - t0
nxt = torch.full((1,), 7, device="cuda")
dec.step(nxt)
ms = min(tv.event_times(lambda: dec.step(nxt), 3, 100))
print(json.dumps(dict(model=size, build_s=round(build, 2), decode_ms_per_token=round(ms, 4),
                      shapes=len(dec._keys), tuned_here=sum(k in tv._RANKING for k in dec._keys),
                      refined=len(dec.refined), cache=os.environ.get("MMF_SCHEDULE_CACHE"))))
