"""CPU evidence for the native ternary kernel: read bandwidth, then GB/s per projection shape.

    python -m mmf.bench.cpu_kernel_bench [--model 13b] [--threads 1,2] [--isa all] [--json-out FILE]

One run prints a table (``--json``: the JSON instead) and can write the JSON (``--json-out FILE``):

1. the read bandwidth of this machine per thread count: a read-only stream (each thread XORs its own
   contiguous share of a buffer larger than the caches; nothing written), the best of a few passes.
   It is the divisor of every "% of read bandwidth" below and of the decode floor;
2. for each projection shape of the model (per layer: i/f/g/o d x d, the fused GLU input projection
   2m x d, the down projection d x m; and the LM head vocab x d), each instruction path and thread
   count: ``cpu_ternary.bitlinear_i2`` at ``--tokens`` rows (1 = decode), whole (RMSNorm, int8
   quantisation, the ternary product, scales). Each call reads a different copy of the packed weights,
   cycling through a pool of ``--pool-mb`` so that weights come from memory as in a real decode, not
   from the caches. Reported: time per call, weight bytes read per second, % of read bandwidth;
3. per path and thread count, the sum over one decode step of the model's projections (the kernel's
   share of a token) beside the floor: the packed weight bytes of a token / read bandwidth.

Weights are random i2 codes built directly (no full-precision model is made). The results come from
whatever else the machine runs at the time: the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from mmf.errors import MMFError


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                           cwd=Path(__file__).resolve().parent)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def projection_shapes(preset: str) -> list:
    """(name, N out, K in, calls per decode step) of every BitLinear of the preset's MatMul-free model."""
    from mmf.config import model_preset

    cfg = model_preset(preset)
    if cfg.arch != "mmf":
        raise MMFError(f"--model {preset}: the CPU kernel benchmark needs a MatMul-free preset (e.g. 13b)")
    d, m, v, layers = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size, cfg.num_hidden_layers
    return [("i/f/g/o", d, d, 4 * layers), ("gate_proj (gate|up)", 2 * m, d, layers),
            ("down_proj", d, m, layers), ("lm_head", v, d, 1)]


def random_packed(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(n, ceil(k/4)) uint8 of random i2 codes in {0, 1, 2} (padding digits included: only timing)."""
    p = (k + 3) // 4
    out = torch.randint(0, 3, (n, p), dtype=torch.uint8, generator=gen)
    for s in range(1, 4):
        out |= torch.randint(0, 3, (n, p), dtype=torch.uint8, generator=gen) << (2 * s)
    return out


def time_shape(ct, n: int, k: int, tokens: int, threads: int, pool_bytes: int, repeats: int,
               gen: torch.Generator) -> dict:
    """Seconds per call of the kernel on (tokens, k) inputs, each call on another copy of the weights."""
    first = random_packed(n, k, gen)
    copies = [first] + [first.clone() for _ in range(max(1, -(-pool_bytes // first.numel())) - 1)]
    x = torch.randn(tokens, k, generator=gen)
    norm_w = torch.rand(k, generator=gen) + 0.5
    s_w = torch.tensor(2.0)
    out = ct.bitlinear_i2(x, norm_w, first, k, s_w, threads=threads)  # warm-up (and the pool's threads)
    assert out.shape == (tokens, n) and torch.isfinite(out).all()
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for w in copies:
            ct.bitlinear_i2(x, norm_w, w, k, s_w, threads=threads)
        best = min(best, (time.perf_counter() - t0) / len(copies))
    return {"s_per_call": best, "copies": len(copies), "weight_bytes": first.numel()}


def run(model: str = "13b", threads=(1, 2), isas=("all",), tokens: int = 1, pool_mb: int = 512,
        stream_mb: int = 1024, repeats: int = 3, progress=None) -> dict:
    """The whole benchmark as a dict (see the module docstring)."""
    from mmf.kernels import cpu_ternary as ct

    if not ct.available():
        raise MMFError(f"the native CPU kernel is unavailable ({ct.info()['reason']}); install gcc and retry")
    have = ct.supported_isas()
    if list(isas) == ["all"]:
        paths = have
    elif list(isas) == ["best"]:
        paths = [have[-1]]
    else:
        bad = [p for p in isas if p not in have]
        if bad:
            raise MMFError(f"--isa {','.join(bad)}: not available on this CPU; choose from {', '.join(have)}, all or best")
        paths = list(isas)
    threads = sorted({int(t) for t in threads})
    if not threads or threads[0] < 1:
        raise MMFError("--threads: give one or more thread counts >= 1, e.g. 1,2")
    shapes = projection_shapes(model)
    say = progress or (lambda *_: None)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    gen = torch.Generator().manual_seed(0)

    bandwidth = {}
    for t in threads:
        bandwidth[t] = ct.read_bandwidth(stream_mb << 20, threads=t, repeats=repeats)
        say(f"read bandwidth, {t} thread(s): {bandwidth[t]:.1f} GB/s")

    rows = []
    prev = ct.set_isa(None)
    try:
        for name, n, k, per_token in shapes:
            for path in paths:
                ct.set_isa(path)
                for t in threads:
                    r = time_shape(ct, n, k, tokens, t, pool_mb << 20, repeats, gen)
                    gbs = r["weight_bytes"] / r["s_per_call"] / 1e9
                    rows.append(dict(shape=name, n=n, k=k, calls_per_token=per_token, tokens=tokens, isa=path,
                                     threads=t, ms_per_call=r["s_per_call"] * 1e3, weight_bytes=r["weight_bytes"],
                                     weight_gbs=gbs, pct_read_bw=100 * gbs / bandwidth[t],
                                     gops=2 * n * k * tokens / r["s_per_call"] / 1e9, pool_copies=r["copies"]))
                    say(f"{name} {n}x{k} {path} {t}t: {r['s_per_call'] * 1e3:.3f} ms, {gbs:.1f} GB/s")
    finally:
        ct.set_isa(prev)

    step_bytes = sum(((k + 3) // 4) * n * c for _, n, k, c in shapes)
    per_token = []
    for path in paths:
        for t in threads:
            ms = sum(r["ms_per_call"] * r["calls_per_token"] for r in rows if r["isa"] == path and r["threads"] == t)
            floor_ms = step_bytes / (bandwidth[t] * 1e9) * 1e3
            per_token.append(dict(isa=path, threads=t, ms=ms, floor_ms=floor_ms, pct_of_floor=100 * floor_ms / ms))
    return {
        "benchmark": "cpu_kernel_bench", "model": model, "tokens": tokens, "commit": _commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": _cpu_name(), "cores": os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "kernel": ct.info(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "protocol": {"pool_mb": pool_mb, "stream_mb": stream_mb, "repeats": repeats,
                     "timing": "best of repeats of the mean call time over one pass of the weight pool"},
        "read_bandwidth_gbs": {str(t): bw for t, bw in bandwidth.items()},
        "step_weight_bytes": step_bytes,
        "shapes": rows,
        "per_token": per_token,
    }


def format_tables(res: dict) -> str:
    from tabulate import tabulate

    bw = ", ".join(f"{t} thread(s) {v:.1f} GB/s" for t, v in res["read_bandwidth_gbs"].items())
    head = (f"CPU kernel benchmark: {res['model']}, {res['tokens']} token(s) per call, {res['cpu']} "
            f"({res['cores']} cores), load average {res['load_average_before']}\nread bandwidth: {bw}")
    shapes = tabulate([[r["shape"], f"{r['n']}x{r['k']}", r["isa"], r["threads"], f"{r['ms_per_call']:.3f}",
                        f"{r['weight_gbs']:.1f}", f"{r['pct_read_bw']:.0f}%", f"{r['gops']:.0f}"]
                       for r in res["shapes"]],
                      headers=["projection", "N x K", "path", "threads", "ms/call", "GB/s", "% read BW", "Gop/s"])
    step = tabulate([[p["isa"], p["threads"], f"{p['ms']:.1f}", f"{p['floor_ms']:.1f}", f"{p['pct_of_floor']:.0f}%"]
                     for p in res["per_token"]],
                    headers=["path", "threads", "projections ms/token", "floor ms", "% of floor"])
    return f"{head}\n\n{shapes}\n\n{res['step_weight_bytes'] / 1e9:.2f} GB of packed weights per token\n{step}"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (the CLI's convention)
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    ap = _Parser(prog="python -m mmf.bench.cpu_kernel_bench", description=__doc__.splitlines()[0],
                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="13b", help="MatMul-free preset whose projection shapes are timed")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--isa", default="all", help="comma-separated paths (avx512vnni, avxvnni, avx2, scalar), all, or best")
    ap.add_argument("--tokens", "--batch-size", type=int, default=1, help="rows per call (1 = decode)")
    ap.add_argument("--pool-mb", type=int, default=512, help="MiB of weight copies cycled through per shape")
    ap.add_argument("--stream-mb", type=int, default=1024, help="MiB of the read-bandwidth buffer")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes; the best is kept")
    ap.add_argument("--json", action="store_true", help="print the JSON on stdout instead of the table")
    ap.add_argument("--json-out", metavar="FILE", default=None, help="also write the JSON to FILE (None: not written)")
    a = ap.parse_args(argv)
    try:
        from mmf.bench import check_output_path, write_json

        for name, v in (("--tokens", a.tokens), ("--pool-mb", a.pool_mb), ("--stream-mb", a.stream_mb),
                        ("--repeats", a.repeats)):
            if v < 1:
                raise MMFError(f"{name} {v}: must be at least 1")
        try:
            threads = [int(t) for t in a.threads.split(",") if t.strip()]
        except ValueError:
            raise MMFError(f"--threads {a.threads!r}: give comma-separated integers, e.g. 1,2") from None
        if a.json_out:
            check_output_path(a.json_out, "--json-out")
        res = run(a.model, threads, [s.strip() for s in a.isa.split(",") if s.strip()], a.tokens, a.pool_mb,
                  a.stream_mb, a.repeats, progress=None if a.json else (lambda m: print(m, file=sys.stderr, flush=True)))
    except MMFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        import json

        print(json.dumps(res, indent=2, default=str))
    else:
        print(format_tables(res))
    if a.json_out:
        write_json(a.json_out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
