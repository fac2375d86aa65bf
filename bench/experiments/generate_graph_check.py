# Check on a GPU: `mmf generate --graph` (mmf.generate with graph=True) against the eager path.
# Random models (MatMul-free frozen to i2, Transformer++), fp16: greedy tokens of both paths, and
# wall time of generate_ids for N new tokens (the graph path's first call includes building the
# decoder: compiling, tuning and capturing; its second call in the same process reuses the tuned
# schedules and the compiled kernels; the eager path is called twice, its first call compiles and
# tunes). Random weights give near-tied logits, so greedy tokens part after a rounding difference;
# CKPT=<trained checkpoint dir> adds `mmf generate -t 0` with and without --graph on it, compared.
# On the device: pip install --no-deps . ; cd /tmp ; python <repo>/bench/experiments/generate_graph_check.py
# Prints a table and writes $OUT/generate_graph_check.json.
import json
import os
import subprocess
import sys
import time

import torch

from mmf.bench.model_bench import build_mmf_random
from mmf.config import model_preset
from mmf.generate import generate_ids
from mmf.models import build_model

OUT = os.environ.get("OUT", "/tmp")
N = int(os.environ.get("N", "256"))


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return r, time.perf_counter() - t0


def main():
    rows = []
    prompt = torch.randint(3, 250, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    for size in os.environ.get("SIZES", "370m,transformer++-370m").split(","):
        cfg = model_preset(size)
        if cfg.arch == "mmf":  # frozen, random packed ternary weights, fp32 scales
            model = build_mmf_random(cfg, "cuda", torch.float16)
        else:
            torch.manual_seed(0)
            with torch.device("cuda"):
                model = build_model(cfg)
            model.init_weights()
            model = model.half()
        model.eval()
        _, t_eager1 = timed(lambda: generate_ids(model, prompt, N, device="cuda"))  # compiles, tunes
        eager, t_eager = timed(lambda: generate_ids(model, prompt, N, device="cuda"))
        graph1, t_graph1 = timed(lambda: generate_ids(model, prompt, N, device="cuda", graph=True))
        graph2, t_graph2 = timed(lambda: generate_ids(model, prompt, N, device="cuda", graph=True))
        same = sum(a == b for a, b in zip(eager, graph2))
        first_diff = next((i for i, (a, b) in enumerate(zip(eager, graph2)) if a != b), None)
        rows.append(dict(model=size, new_tokens=N, prompt_tokens=len(prompt), eager_first_call_s=t_eager1,
                         eager_s=t_eager, graph_first_call_s=t_graph1, graph_second_call_s=t_graph2,
                         same_greedy_tokens=same, first_difference_at=first_diff, graph_calls_agree=graph1 == graph2))
        print(json.dumps(rows[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    # end to end through the CLI, greedy, on a trained checkpoint (CKPT=dir, e.g. from `mmf train`):
    # random weights give near-tied logits, where any rounding difference changes the greedy pick
    cli = None
    if os.environ.get("CKPT"):
        cmd = [sys.executable, "-m", "mmf.cli.main", "generate", os.environ["CKPT"], "-p", "Once upon a time",
               "-n", "200", "-t", "0", "--device", "cuda"]
        outs = {}
        for flag in ([], ["--graph"]):
            t0 = time.perf_counter()
            p = subprocess.run(cmd + flag, capture_output=True, text=True, timeout=600)
            outs["graph" if flag else "eager"] = dict(rc=p.returncode, wall_s=time.perf_counter() - t0,
                                                      stdout=p.stdout[-1200:], stderr=p.stderr[-400:])
        cli = dict(command=" ".join(cmd[1:]), same_text=outs["eager"]["stdout"] == outs["graph"]["stdout"], **outs)
        print(json.dumps(cli)[:3000])
    print(f"\n{'model':24s} {'N':>4s} {'eager s':>8s} {'graph 1st s':>11s} {'graph 2nd s':>11s} {'same tokens':>11s}")
    for r in rows:
        print(f"{r['model']:24s} {r['new_tokens']:4d} {r['eager_s']:8.2f} {r['graph_first_call_s']:11.2f} "
              f"{r['graph_second_call_s']:11.2f} {r['same_greedy_tokens']:>6d}/{r['new_tokens']}")
    json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, rows=rows, cli=cli),
              open(f"{OUT}/generate_graph_check.json", "w"), indent=1)


if __name__ == "__main__":
    main()
