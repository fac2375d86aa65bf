"""Peak GPU memory of real ``mmf train`` steps beside ``mmf.memory.training_memory``'s estimate.

The CUDA check in ``mmf/memory.py``'s docstring: two optimiser steps of a preset at a given
micro-batch and sequence length (vocabulary 32000 whatever the tokenizer learns), through
``mmf.train.train`` itself; prints one JSON line (peak allocated and reserved, the estimate)::

    python -m mmf.bench.train_memory_check PRESET MICRO_BATCH SEQ_LEN

Its H200 run: ``bench/results/train_memory_check_h200.jsonl``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> dict:
    import torch

    from mmf.memory import available_bytes, planned_model, training_memory
    from mmf.train import train
    from mmf.train_config import load_train_config

    spec, micro, T = argv[0], int(argv[1]), int(argv[2])
    sets = ["train.steps=2", f"train.batch_size={2 * micro}", "train.grad_accum=2", f"train.seq_len={T}",
            "checkpoint.every=1000", "logging.eval_every=1000", "logging.eval_tokens=2048", "logging.plot=false",
            "logging.progress=false", "data.cache_dir=/tmp/mmfcache", "model.vocab_size=32000"]
    cfg = load_train_config(spec, sets)
    mcfg, n = planned_model(cfg)
    est = training_memory(mcfg, n, micro, T, "cuda")
    avail = available_bytes("cuda")
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    r = train(cfg, Path(f"/tmp/run-{spec}-{micro}-{T}"), log=lambda *a: None)
    peak = torch.cuda.max_memory_allocated()
    return {"spec": spec, "micro": micro, "T": T, "params": n, "vocab": mcfg.vocab_size,
            "peak_allocated": peak, "peak_reserved": torch.cuda.max_memory_reserved(),
            "estimate_total": est.total, "estimate_without_C": est.total - est.runtime,
            "ratio_est_wo_C_to_peak": (est.total - est.runtime) / peak, "available_before": avail,
            "seconds": time.time() - t0, "tokens_per_s": r.tokens_per_s}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
