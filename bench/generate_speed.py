"""Decode speed of ``mmf generate``'s own loop on the CPU, native paths against the plain-torch reference (issue 18).

Loads a checkpoint as ``mmf generate`` does (frozen at load, fp32), then times ``generate_ids`` (greedy, the
sampling loop included) for ``--new-tokens`` tokens after a prompt, in one process: first with every native
path (the whole-model decode step where it applies), then under ``MMF_FORCE_REFERENCE`` (the plain-torch
reference, what mmf ran on a CPU before the native kernel). Prints a table; ``--json-out`` writes the figures.

    python -m mmf.bench.generate_speed runs/tiny-.../step-0000300 --new-tokens 200 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def time_generate(checkpoint, new_tokens: int, prompt_len: int, repeats: int) -> dict:
    from mmf import kernels
    from mmf.checkpoint import load_model
    from mmf.generate import generate_ids

    model = load_model(checkpoint, device="cpu", dtype="fp32", frozen=True)
    prompt = torch.randint(3, model.config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    out = {}
    prev = kernels._FORCE_REFERENCE
    try:
        for name, forced in (("native", False), ("reference", True)):
            kernels.force_reference(forced)
            generate_ids(model, prompt, max_new_tokens=4)  # warm-up (builds the native plan)
            times, tokens = [], None
            for _ in range(repeats):
                t0 = time.perf_counter()
                tokens = generate_ids(model, prompt, max_new_tokens=new_tokens)
                times.append(time.perf_counter() - t0)
            best = min(times)
            out[name] = {"seconds": best, "ms_per_token": 1e3 * best / new_tokens, "tokens": tokens}
    finally:
        kernels.force_reference(prev)
    out["speedup"] = out["reference"]["seconds"] / out["native"]["seconds"]
    out["same_tokens"] = out["native"].pop("tokens") == out["reference"].pop("tokens")
    cfg = model.config
    out["model"] = {"layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size}
    out["protocol"] = {"new_tokens": new_tokens, "prompt_len": prompt_len, "repeats": repeats, "best_of": repeats,
                       "threads": torch.get_num_threads(), "greedy": True}
    return out


def main(argv=None) -> int:
    from tabulate import tabulate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json-out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = time_generate(a.checkpoint, a.new_tokens, a.prompt_len, a.repeats)
    rows = [[k, f"{res[k]['ms_per_token']:.3f}", f"{res[k]['seconds']:.3f}"] for k in ("native", "reference")]
    print(tabulate(rows, headers=["path", "ms/token", "seconds"]))
    print(f"native is {res['speedup']:.1f}x the reference; same greedy tokens: {res['same_tokens']}; "
          f"{res['protocol']['threads']} threads, best of {a.repeats}")
    if a.json_out:
        tmp = a.json_out.with_name(a.json_out.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        tmp.replace(a.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
