"""Time to build a ``GraphDecoder`` (compile, tune, capture, refine) for a random model on one CUDA GPU,
and how many of its GEMV shapes were tuned in this process rather than read from the on-disk schedule
cache (``mmf.kernels.schedule_cache``).

    MMF_SCHEDULE_CACHE=/tmp/s.json python -m mmf.bench.decoder_build_time --model 370m

Run it twice, in separate processes with the same ``MMF_SCHEDULE_CACHE``, to see what the cache saves:
the first build tunes and stores, the second reads the schedules back (``tuned_here`` 0). Prints one
JSON line: build seconds, decode ms/token (best of 3 x 100 graph replays), shapes, tuned here, refined.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmf.bench.decoder_build_time",
                                 description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--model", default="370m", help="MatMul-free preset (default: 370m)")
    args = ap.parse_args(argv)
    from mmf.bench import mmf_preset_or_none

    cfg = mmf_preset_or_none("decoder_build_time", "--model", args.model)
    if cfg is None:
        return 2
    import torch

    if not torch.cuda.is_available():
        print("decoder_build_time: needs a CUDA GPU; run it on a machine with one", file=sys.stderr)
        return 2
    from mmf.bench.model_variants import build_mmf_random
    from mmf.decode_graph import GraphDecoder
    from mmf.kernels import ternary_gemv as tv

    model = build_mmf_random(cfg, "cuda", torch.float16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dec = GraphDecoder(model, 1)
    torch.cuda.synchronize()
    build = time.perf_counter() - t0
    nxt = torch.full((1,), 7, device="cuda")
    dec.step(nxt)
    ms = min(tv.event_times(lambda: dec.step(nxt), 3, 100))
    print(json.dumps(dict(model=args.model, build_s=round(build, 2), decode_ms_per_token=round(ms, 4),
                          shapes=len(dec._keys), tuned_here=sum(k in tv._RANKING for k in dec._keys),
                          refined=len(dec.refined), cache=os.environ.get("MMF_SCHEDULE_CACHE"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
