"""Training on several processes: DDP or FSDP under torchrun, tokens/s per GPU against the GPU count.

``mmf bench --train --nproc 1,2,4,8`` (``run_scaling``) launches, for each N, ``torchrun --standalone
--nproc_per_node=N -m mmf.bench.train_scaling --worker ...`` (NCCL on GPUs, gloo on the CPU) and, for
each N > 1, one process that takes the same GLOBAL batch in N micro-steps (gradient accumulation), so
that the loss at steps 1..S of N processes can be set against one process's on the same data:

* every step's global batch is a pure function of (seed, step): ``batch x N`` sequences of random
  tokens from the first 512 ids of the vocabulary (so the loss falls, from ln V towards ln 512, and
  a divergence would show); rank r takes rows ``[r b, (r + 1) b)``; the one-process reference takes
  the same rows in N micro-steps and divides its loss by N, as ``mmf train`` does with grad_accum;
* a step is what ``mmf train`` runs: bf16 autocast on CUDA (fp32 on the CPU), fp32 master weights,
  AdamW (foreach on CUDA), the model wrapped in DDP, or ``fully_shard`` per layer and at the root for
  FSDP, even for N = 1 (so that the N = 1 base pays the same wrapper); the process group is created
  for N = 1 too (a world-size-1 NCCL run is a real NCCL smoke);
* timing: the median of the steps after ``warmup``; tokens/s per GPU = micro-batch x seq_len / step
  time; scaling efficiency = tokens/s per GPU at N / tokens/s at N = 1 (same per-GPU batch);
* memory per rank: ``torch.cuda.max_memory_allocated`` after the model is wrapped (the full model
  that every rank builds before FSDP shards it is not counted) against 80 % of the GPU's memory; on
  the CPU the process's peak RSS (``ru_maxrss``), labelled as such: it includes the torch runtime.

Before any process starts, ``mmf.memory.training_memory`` predicts one rank's peak for the
strategy at N ranks and the run is refused (one line with the fix) when it exceeds 80 % of a GPU's
memory; N larger than the GPUs visible is refused too (on the CPU, N gloo processes are allowed, for
testing). Writes a table, JSON (``--json-out``) and a PNG (``--plot``): tokens/s per GPU against N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmf.errors import MMFError

SUB_VOCAB = 512  # random tokens come from the first SUB_VOCAB ids
GPU_FRACTION = 0.8  # the memory budget per GPU that the issue sets
DEFAULT_BATCH = {"tiny": 4, "370m": 8, "1.3b": 4, "2.7b": 2, "13b": 1}


# ------------------------------------------------------------------------------------------------ worker
def _global_batch(seed: int, step: int, rows: int, seq_len: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, min(vocab, SUB_VOCAB), (rows, seq_len + 1), generator=g)


def _model_config(size: str, overrides: dict):
    from mmf.config import model_preset

    cfg = model_preset(size)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def worker(a) -> dict:
    """One rank's run (under torchrun); rank 0 returns the result of the whole world."""
    import torch.distributed as dist

    from mmf.distributed import all_mean, init_world, shutdown
    from mmf.models import build_model

    world = init_world(a.device, group_of_one=True)
    try:
        dev = world.device
        cfg = _model_config(a.size, json.loads(a.overrides))
        torch.manual_seed(a.seed)  # every rank builds the same weights (FSDP does not broadcast them)
        with torch.device(dev):
            base = build_model(cfg)
        base.init_weights()
        lb = getattr(base.model, "lower_bounds", None)
        if lb is not None and len(base.model.layers) == 1:
            lb.requires_grad_(False)  # as mmf train: layer 0's lower bound gets no gradient
        n_params = sum(p.numel() for p in base.parameters())
        if a.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in base.model.layers:
                fully_shard(layer)
            fully_shard(base)
            model = base
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(base, device_ids=[dev.index] if dev.type == "cuda" else None)
        opt = torch.optim.AdamW(base.parameters(), lr=a.lr, foreach=dev.type == "cuda")
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        use_bf16 = dev.type == "cuda"
        b, A, T, W = a.batch, a.accum, a.seq_len, world.size
        V = cfg.vocab_size
        losses, times = [], []
        for step in range(a.steps):
            t0 = time.perf_counter()
            rows = _global_batch(a.seed, step, b * A * W, T, V)
            loss_sum = torch.zeros((), device=dev)
            for m in range(A):
                start = (world.rank * A + m) * b
                x = rows[start:start + b].to(dev, non_blocking=True)
                sync = model.no_sync() if (A > 1 and m < A - 1 and hasattr(model, "no_sync")) else _null()
                with sync:
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                        logits = model(x[:, :-1]).logits
                    loss = F.cross_entropy(logits.float().reshape(-1, V), x[:, 1:].reshape(-1))
                    (loss / A).backward()
                loss_sum += loss.detach()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(all_mean(world, loss_sum / A)))  # .item() synchronises the device
            times.append(time.perf_counter() - t0)
        timed = times[a.warmup:] or times
        step_s = statistics.median(timed)
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated(dev)
            total = torch.cuda.get_device_properties(dev).total_memory
            mem = {"peak_bytes": peak, "peak_kind": "torch.cuda.max_memory_allocated", "device_bytes": total,
                   "peak_over_80pct_budget": round(peak / (GPU_FRACTION * total), 4)}
        else:
            mem = {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   "peak_kind": "CPU peak RSS (ru_maxrss, includes the torch runtime)"}
        mem.update(rank=world.rank, step_s=step_s)
        per_rank = [mem]
        if world.size > 1 or dist.is_initialized():
            per_rank = [None] * world.size
            dist.all_gather_object(per_rank, mem)
        res = {"nproc": W, "strategy": a.strategy, "size": a.size, "params": n_params, "micro_batch": b,
               "accum": A, "global_batch": b * A * W, "seq_len": T, "steps": a.steps, "warmup": a.warmup,
               "losses": losses, "step_s": round(step_s, 5), "step_s_min": round(min(timed), 5),
               "step_s_max": round(max(timed), 5),
               "tokens_per_s_per_gpu": round(b * A * T / step_s, 1), "tokens_per_s_total": round(b * A * T * W / step_s, 1),
               "backend": dist.get_backend() if dist.is_initialized() else None, "device_type": dev.type,
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "autocast": "bfloat16" if use_bf16 else None, "memory_per_rank": per_rank}
        if world.is_main and a.result:
            Path(a.result).write_text(json.dumps(res))
        return res
    finally:
        shutdown(world)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------ driver
def parse_nproc(text) -> list:
    try:
        ns = [int(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        ns = []
    if not ns or any(n < 1 for n in ns):
        raise MMFError(f"--nproc {text}: give process counts >= 1, e.g. --nproc 2 or --nproc 1,2,4,8")
    return sorted(set(ns))


def predicted_peak(size: str, overrides: dict, micro: int, seq_len: int, device_type: str, nproc: int,
                   strategy: str) -> float:
    """``mmf.memory.training_memory``'s estimate of one rank's peak (bytes)."""
    from mmf.memory import training_memory
    from mmf.models import build_model

    cfg = _model_config(size, overrides)
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(cfg).parameters())
    est = training_memory(cfg, n, micro, seq_len, device_type, world_size=nproc, strategy=strategy)
    return est.state + est.activations + est.runtime


def check_fits(size, overrides, micro, seq_len, device_type, nproc, strategy, budget_bytes) -> float:
    """Refuse, in one line with the fix, a run whose predicted peak per rank exceeds ``budget_bytes``."""
    from mmf.units import human_bytes

    need = predicted_peak(size, overrides, micro, seq_len, device_type, nproc, strategy)
    if need <= budget_bytes:
        return need
    fits = [n for n in (2, 4, 8, 16, 32, 64) if (n > nproc or (n == nproc and strategy != "fsdp")) and
            predicted_peak(size, overrides, micro, seq_len, device_type, n, "fsdp") <= budget_bytes]
    fix = (f"shard over more GPUs: --strategy fsdp --nproc {fits[0]}" if fits else "use a smaller --model")
    if micro > 1:
        fix += f", or a smaller --batch-size than {micro}"
    raise MMFError(f"{size} {strategy} on {nproc} process(es), {micro} x {seq_len} tokens each: one rank needs about "
                   f"{human_bytes(need)} (mmf.memory estimate) but the budget is {human_bytes(budget_bytes)} "
                   f"({int(GPU_FRACTION * 100)} % of a GPU); {fix}")


def _launch(n: int, args: list, env: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="mmf-scaling-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "mmf.bench.train_scaling", "--worker", "--result", str(result), *args]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0 or not result.exists():
            tail = " | ".join(l for l in (p.stderr or p.stdout).strip().splitlines()[-6:])
            raise MMFError(f"the {n}-process run failed (exit {p.returncode}): {tail[-600:]}")
        return json.loads(result.read_text())


def run_scaling(nprocs=(1, 2), size="1.3b", strategy="ddp", device="auto", batch=None, seq_len=2048, steps=20,
                warmup=3, overrides=None, lr=3e-4, seed=0, reference=True, timeout=3600, progress=print) -> dict:
    """Launch each N of ``nprocs`` under torchrun (plus the one-process references); return
    {"env", "runs", "references", "summary", "command"}. See the module docstring."""
    from mmf.bench import resolve_device

    if strategy not in ("ddp", "fsdp"):
        raise MMFError(f"--strategy {strategy}: use ddp or fsdp")
    for name, v in (("--batch-size", batch), ("--seq-len", seq_len), ("--steps", steps)):
        if v is not None and v < 1:
            raise MMFError(f"{name} must be >= 1, got {v}")
    dev_s, choice = resolve_device(device)
    dev = torch.device(dev_s)
    overrides = dict(overrides or {})
    b = batch or DEFAULT_BATCH.get(size, 1)
    nprocs = sorted(set(int(n) for n in nprocs))
    if dev.type == "cuda":
        have = torch.cuda.device_count()
        if max(nprocs) > have:
            raise MMFError(f"--nproc {max(nprocs)} but {have} GPU(s) are visible; give at most {have} "
                           f"(or --device cpu for gloo processes, for testing)")
        budget = GPU_FRACTION * torch.cuda.get_device_properties(0).total_memory
        for n in nprocs:
            check_fits(size, overrides, b, seq_len, "cuda", n, strategy, budget)
        if reference:  # the one-process reference holds the whole model and one micro-batch at a time
            for n in nprocs:
                if n > 1 and predicted_peak(size, overrides, b, seq_len, "cuda", 1, strategy) > budget:
                    reference = False  # (13b: one GPU cannot hold it; the runs are still measured)
    env = {**os.environ}
    if dev.type == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (the device README asks it)
    common = ["--size", size, "--strategy", strategy, "--device", dev.type, "--batch", str(b), "--seq-len",
              str(seq_len), "--steps", str(steps), "--warmup", str(warmup), "--lr", str(lr), "--seed", str(seed),
              "--overrides", json.dumps(overrides)]
    runs, refs = [], []
    for n in nprocs:
        progress(f"{size} {strategy}: {n} process(es) x {b} x {seq_len} tokens, {steps} steps ...")
        runs.append(_launch(n, [*common, "--accum", "1"], env, timeout))
        if reference and n > 1:
            progress(f"  one-process reference: the same global batch in {n} micro-steps ...")
            refs.append(_launch(1, [*common, "--accum", str(n)], env, timeout))
    base = next((r for r in runs if r["nproc"] == 1), None)
    summary = []
    for r in runs:
        s = {"nproc": r["nproc"], "tokens_per_s_per_gpu": r["tokens_per_s_per_gpu"],
             "tokens_per_s_total": r["tokens_per_s_total"], "step_s": r["step_s"],
             "peak_bytes_max_rank": max(m["peak_bytes"] for m in r["memory_per_rank"]),
             "peak_kind": r["memory_per_rank"][0]["peak_kind"],
             "predicted_peak_bytes": round(predicted_peak(size, overrides, b, seq_len, dev.type, r["nproc"],
                                                          strategy))}
        if dev.type == "cuda":
            s["peak_over_80pct_budget"] = max(m["peak_over_80pct_budget"] for m in r["memory_per_rank"])
        if base:
            s["scaling_efficiency"] = round(r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"], 4)
        ref = next((x for x in refs if x["global_batch"] == r["global_batch"]), None)
        if ref:
            rel = [abs(x - y) / abs(y) for x, y in zip(r["losses"], ref["losses"])]
            s["loss_max_rel_diff_vs_one_process"] = max(rel)
            s["loss_first_rel_diff_vs_one_process"] = rel[0]
        summary.append(s)
    env_info = {"torch": torch.__version__, "device_type": dev.type, "device_choice": choice,
                "device": runs[0]["device"], "backend": runs[0]["backend"], "strategy": strategy, "size": size,
                "micro_batch_per_process": b, "seq_len": seq_len, "steps": steps, "warmup": warmup,
                "data": f"random tokens from the first {SUB_VOCAB} ids, a pure function of (seed, step)",
                "loss_bound_of_the_gloo_test": 2e-3, "cpu_count": os.cpu_count()}
    if dev.type == "cpu":
        env_info["note"] = ("CPU gloo processes share this machine's cores: tokens/s and efficiency here test the "
                            "code path, they do not measure GPU scaling")
    return {"env": env_info, "runs": runs, "references": refs, "summary": summary}


def print_results(res: dict) -> None:
    from mmf.units import human_bytes

    e = res["env"]
    print(f"training scaling: {e['size']} {e['strategy']}, {e['micro_batch_per_process']} x {e['seq_len']} tokens "
          f"per process, {e['steps']} steps ({e['warmup']} untimed), {e['device']} ({e['backend']})")
    head = ["N", "tokens/s per GPU", "total tokens/s", "step s", "efficiency", "loss rel diff vs 1 proc",
            "peak mem/rank", "predicted"]
    print("  ".join(f"{h:>14}" for h in head))
    for s in res["summary"]:
        cells = [s["nproc"], f"{s['tokens_per_s_per_gpu']:.1f}", f"{s['tokens_per_s_total']:.1f}", f"{s['step_s']:.4f}",
                 f"{s['scaling_efficiency']:.1%}" if "scaling_efficiency" in s else "-",
                 f"{s['loss_max_rel_diff_vs_one_process']:.2e}" if "loss_max_rel_diff_vs_one_process" in s else "-",
                 human_bytes(s["peak_bytes_max_rank"]) + (f" ({s['peak_over_80pct_budget']:.0%} of 80%)"
                                                          if "peak_over_80pct_budget" in s else ""),
                 human_bytes(s["predicted_peak_bytes"])]
        print("  ".join(f"{str(c):>14}" for c in cells))
    print(f"peak memory: {res['summary'][0]['peak_kind']}")
    if "note" in e:
        print("note: " + e["note"])


def plot_scaling(res: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmf.bench.model_bench_report import save_png

    s = res["summary"]
    n = [x["nproc"] for x in s]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(n, [x["tokens_per_s_per_gpu"] for x in s], "o-", label="measured")
    base = next((x for x in s if x["nproc"] == 1), None)
    if base:
        ax.plot(n, [base["tokens_per_s_per_gpu"]] * len(n), "--", color="grey", label="perfect scaling")
    ax.set_xlabel("GPUs (processes)")
    ax.set_ylabel("tokens/s per GPU")
    ax.set_xticks(n)
    e = res["env"]
    ax.set_title(f"{e['size']} {e['strategy']}, {e['micro_batch_per_process']}x{e['seq_len']} tokens/GPU, {e['device']}",
                 fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def scaling_command(models="1.3b", nproc="1,2", strategy="ddp", device="auto", batch_size=None, seq_len=None,
                    steps=None, json_stdout=False, json_out=None, plot=None, command=None) -> dict:
    """``mmf bench --train --nproc N[,N...]``: check the outputs, run, print, write JSON and PNG."""
    from mmf.bench import check_output_path, write_json

    sizes = [m.strip() for m in str(models).split(",") if m.strip()]
    if len(sizes) != 1 or sizes[0] == "all":
        raise MMFError(f"--model {models}: --nproc measures one size at a time; give one, e.g. --model 1.3b")
    for opt, p in (("--json-out", json_out), ("--plot", plot)):
        if p is not None:
            check_output_path(p, opt)
    if plot is not None and Path(plot).suffix.lower() != ".png":
        raise MMFError(f"--plot {plot}: the chart is a PNG; name a .png file")
    say = (lambda m: print(m, file=sys.stderr)) if json_stdout else print
    res = run_scaling(parse_nproc(nproc), sizes[0], strategy, device, batch_size,
                      2048 if seq_len is None else seq_len, 20 if steps is None else steps, progress=say)
    res["command"] = command
    if json_stdout:
        print(json.dumps(res, indent=2, default=str))
    else:
        print_results(res)
    if json_out is not None:
        write_json(json_out, res, indent=1)
        say(f"wrote {json_out}")
    if plot is not None:
        plot_scaling(res, plot)
        say(f"wrote {plot}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help="(internal) one rank, under torchrun")
    ap.add_argument("--result", default=None)
    ap.add_argument("--size", default="1.3b")
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overrides", default="{}", help="JSON of model config fields to override (tests)")
    ap.add_argument("--nproc", default="1,2")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--plot", default=None)
    a = ap.parse_args(argv)
    try:
        if a.worker:
            a.batch = a.batch or DEFAULT_BATCH.get(a.size, 1)
            worker(a)
            return 0
        scaling_command(a.size, a.nproc, a.strategy, a.device, a.batch, a.seq_len, a.steps, json_out=a.json_out,
                        plot=a.plot, command="python -m mmf.bench.train_scaling " + " ".join(
                            argv if argv is not None else sys.argv[1:]))
    except MMFError as e:
        print(f"mmf: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
