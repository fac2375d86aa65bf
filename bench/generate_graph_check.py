"""``mmf generate --graph`` against the eager path on one CUDA GPU: greedy tokens and wall time.

    python -m mmf.bench.generate_graph_check [--models 370m transformer++-370m] [--max-new-tokens 256]
        [--checkpoint TRAINED_DIR] [--json-out generate_graph_check.json]

Random models (MatMul-free frozen to i2, Transformer++), fp16, a 32-token prompt: greedy tokens of both
paths and the wall time of ``generate_ids`` for N new tokens. The graph path's first call includes
building the decoder (compiling, tuning and capturing); its second call in the same process reuses the
tuned schedules and the compiled kernels; the eager path is called twice, its first call compiles and
tunes. Random weights give near-tied logits, so greedy tokens part after a rounding difference;
``--checkpoint`` adds ``mmf generate -t 0`` with and without ``--graph`` on a trained checkpoint (e.g.
from a bare ``mmf train``), whose texts should be the same.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmf.bench.generate_graph_check",
                                 description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--models", nargs="+", default=["370m", "transformer++-370m"],
                    help="presets with random weights (default: 370m transformer++-370m)")
    ap.add_argument("--max-new-tokens", "--gen-len", type=int, default=256, dest="max_new_tokens",
                    help="tokens generated per call (default: 256)")
    ap.add_argument("--checkpoint", default=None, metavar="DIR",
                    help="a trained checkpoint to compare `mmf generate` with and without --graph on "
                         "(default: none, random models only)")
    ap.add_argument("--json-out", default="generate_graph_check.json", metavar="FILE",
                    help="write every figure as JSON here (default: generate_graph_check.json)")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        print(f"generate_graph_check: --max-new-tokens {args.max_new_tokens}: give 1 or more", file=sys.stderr)
        return 2
    if args.checkpoint and not os.path.isdir(args.checkpoint):
        print(f"generate_graph_check: --checkpoint {args.checkpoint}: no such directory; give a checkpoint "
              "directory (e.g. runs/<name>/step-0000300)", file=sys.stderr)
        return 2
    from mmf.config import model_preset
    from mmf.errors import MMFError

    try:
        configs = {name: model_preset(name) for name in args.models}
    except MMFError as e:
        print(f"generate_graph_check: --models: {e}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("generate_graph_check: needs a CUDA GPU; run it on a machine with one", file=sys.stderr)
        return 2
    from mmf.bench import write_json
    from mmf.bench.model_variants import build_mmf_random
    from mmf.generate import generate_ids
    from mmf.models import build_model

    n = args.max_new_tokens

    def timed(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn()
        torch.cuda.synchronize()
        return r, time.perf_counter() - t0

    rows = []
    prompt = torch.randint(3, 250, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    for name, cfg in configs.items():
        if cfg.arch == "mmf":  # frozen, random packed ternary weights, fp32 scales
            model = build_mmf_random(cfg, "cuda", torch.float16)
        else:
            torch.manual_seed(0)
            with torch.device("cuda"):
                model = build_model(cfg)
            model.init_weights()
            model = model.half()
        model.eval()
        _, t_eager1 = timed(lambda: generate_ids(model, prompt, n, device="cuda"))  # compiles, tunes
        eager, t_eager = timed(lambda: generate_ids(model, prompt, n, device="cuda"))
        graph1, t_graph1 = timed(lambda: generate_ids(model, prompt, n, device="cuda", graph=True))
        graph2, t_graph2 = timed(lambda: generate_ids(model, prompt, n, device="cuda", graph=True))
        same = sum(a == b for a, b in zip(eager, graph2))
        first_diff = next((i for i, (a, b) in enumerate(zip(eager, graph2)) if a != b), None)
        rows.append(dict(model=name, new_tokens=n, prompt_tokens=len(prompt), eager_first_call_s=t_eager1,
                         eager_s=t_eager, graph_first_call_s=t_graph1, graph_second_call_s=t_graph2,
                         same_greedy_tokens=same, first_difference_at=first_diff, graph_calls_agree=graph1 == graph2))
        print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    # end to end through the CLI, greedy, on a trained checkpoint: random weights give near-tied logits,
    # where any rounding difference changes the greedy pick
    cli = None
    if args.checkpoint:
        cmd = [sys.executable, "-m", "mmf.cli.main", "generate", args.checkpoint, "--prompt", "Once upon a time",
               "--max-new-tokens", "200", "--temperature", "0", "--device", "cuda"]
        outs = {}
        for flag in ([], ["--graph"]):
            t0 = time.perf_counter()
            p = subprocess.run(cmd + flag, capture_output=True, text=True, timeout=600)
            outs["graph" if flag else "eager"] = dict(rc=p.returncode, wall_s=time.perf_counter() - t0,
                                                      stdout=p.stdout[-1200:], stderr=p.stderr[-400:])
        cli = dict(command=" ".join(cmd[1:]), same_text=outs["eager"]["stdout"] == outs["graph"]["stdout"], **outs)
        print(f"mmf generate on {args.checkpoint}: same text with and without --graph: {cli['same_text']}")
    print(f"\n{'model':24s} {'N':>4s} {'eager s':>8s} {'graph 1st s':>11s} {'graph 2nd s':>11s} {'same tokens':>11s}")
    for r in rows:
        print(f"{r['model']:24s} {r['new_tokens']:4d} {r['eager_s']:8.2f} {r['graph_first_call_s']:11.2f} "
              f"{r['graph_second_call_s']:11.2f} {r['same_greedy_tokens']:>6d}/{r['new_tokens']}")
    write_json(args.json_out, dict(command="python -m mmf.bench.generate_graph_check "
                                   + " ".join(sys.argv[1:] if argv is None else argv),
                                   device=torch.cuda.get_device_name(0), torch=torch.__version__, rows=rows, cli=cli),
               indent=1)
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
