"""Training throughput of ``mmf train`` itself (tokens/s): data pipeline, model, AdamW, clipping, schedule.

Each case runs the real trainer (``mmf.train.train``) for ``--steps`` steps on the embedded corpus and
reads the tokens/s of its metrics.jsonl intervals, leaving out the first (warm-up, allocator,
compilation). ``bench/train_bench.py`` times the bare model step on random tokens instead; this one
answers "how fast does `mmf train` go".

    python -m mmf.bench.train_throughput --presets tiny --device cpu --out bench/results/train_throughput_cpu.json
    python -m mmf.bench.train_throughput --presets 370m transformer++-370m --device cuda \\
        --batch 8 --seq-len 2048 --set model.vocab_size=32000 --out bench/results/train_throughput_gpu_h100.json
    OMP_NUM_THREADS=1 python -m mmf.bench.train_throughput --scan-share --out bench/results/train_scan_share_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmf.errors import MMFError
from mmf.bench import write_json


def run_case(preset: str, device: str, steps: int, every: int, batch, seq_len, overrides: list, workdir: Path) -> dict:
    from mmf.train import train
    from mmf.train_config import load_train_config

    sets = [f"train.steps={steps}", f"logging.every={every}", f"logging.eval_every={10 * steps}",
            "logging.eval_tokens=4096", f"checkpoint.every={10 * steps}", "checkpoint.keep=1",
            "logging.progress=false", "logging.plot=false", f"precision.device={device}",
            f"data.cache_dir={workdir / 'cache'}", "schedule.warmup_steps=2"]
    if batch:
        sets.append(f"train.batch_size={batch}")
    if seq_len:
        sets.append(f"train.seq_len={seq_len}")
    cfg = load_train_config(preset, sets + list(overrides))
    out = workdir / f"run-{preset.replace('+', 'p')}"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    r = train(cfg, out, log=lambda s: print(s, file=sys.stderr))
    wall = time.time() - t0
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [x["tokens_per_s"] for x in recs if "tokens_per_s" in x]
    steady = tps[1:] or tps
    return {
        "preset": preset, "arch": "transformer++" if preset.startswith("transformer++") else "mmf",
        "device": device, "params": r.params, "batch": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
        "dtype": "bf16 autocast" if (device == "cuda" and cfg.precision.dtype != "fp32") else "fp32",
        "threads": torch.get_num_threads(), "steps": steps,
        "tokens_per_s": round(statistics.median(steady), 1), "tokens_per_s_intervals": [round(x, 1) for x in tps],
        "step_s": round(cfg.train.batch_size * cfg.train.seq_len / statistics.median(steady), 4),
        "final_loss": r.losses[-1], "wall_s_including_setup_and_checkpoint": round(wall, 1),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None,
    }


def scan_share(preset: str = "tiny", batch: int = 16, seq_len: int = 128, vocab: int = 936, reps: int = 4) -> dict:
    """CPU seconds of one training step of ``preset`` and of the MLGRU reference scan (a Python loop over
    time, ``kernels.reference.mlgru_scan``) forward + backward on the same shapes, once per layer."""
    from mmf.config import model_preset
    from mmf.kernels import reference
    from mmf.models import build_model

    torch.manual_seed(0)
    cfg = model_preset(preset)
    cfg.vocab_size = vocab
    model = build_model(cfg).init_weights()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randint(3, vocab, (batch, seq_len + 1))

    def step():
        logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    def scans():
        for _ in range(cfg.num_hidden_layers):
            i = torch.randn(batch, seq_len, cfg.hidden_size, requires_grad=True)
            f = torch.rand(batch, seq_len, cfg.hidden_size, requires_grad=True)
            reference.mlgru_scan(i, f)[0].sum().backward()

    def cpu_time(fn):
        fn()
        t = time.process_time()
        for _ in range(reps):
            fn()
        return (time.process_time() - t) / reps

    st, sc = cpu_time(step), cpu_time(scans)
    return {"preset": preset, "batch": batch, "seq_len": seq_len, "threads": torch.get_num_threads(),
            "step_cpu_s": round(st, 4), "scan_cpu_s": round(sc, 4), "scan_share": round(sc / st, 4)}


def print_table(rows: list[dict]) -> None:
    from tabulate import tabulate

    cols = ["preset", "device", "dtype", "params", "batch", "seq_len", "tokens_per_s", "step_s", "final_loss",
            "peak_mem_gb"]
    print(tabulate([[r.get(c) for c in cols] for r in rows], headers=cols, floatfmt=".4g"))


def print_table_plain(r: dict) -> None:
    from tabulate import tabulate

    print(tabulate([list(r.values())], headers=list(r)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=10, help="steps per timed interval (the first is left out)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: the preset's)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    ap.add_argument("--workdir", default=None, help="where runs and the token cache go (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--scan-share", action="store_true",
                    help="instead: the share of the MLGRU reference scan in a tiny CPU training step")
    a = ap.parse_args(argv)
    if a.scan_share:
        r = scan_share()
        print_table_plain(r)
        if a.out:
            write_json(a.out, {**r, "command": "python -m mmf.bench.train_throughput "
                               + " ".join(argv if argv is not None else sys.argv[1:]),
                               "load_avg_at_end": os.getloadavg()}, indent=1)
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmf-train-bench-") as tmp:
        work = Path(a.workdir) if a.workdir else Path(tmp)
        for preset in a.presets:
            try:
                rows.append(run_case(preset, a.device, a.steps, a.every, a.batch, a.seq_len, a.overrides, work))
            except MMFError as e:
                print(f"mmf: error: {e}", file=sys.stderr)
                return 2
            except Exception as e:  # out of memory or a kernel failure: report it and go on with the next preset
                msg = str(e).splitlines()[0] if str(e) else ""
                rows.append({"preset": preset, "device": a.device, "error": f"{type(e).__name__}: {msg}"})
            if a.device == "cuda":
                torch.cuda.empty_cache()
    print_table([r for r in rows if "error" not in r])
    for r in rows:
        if "error" in r:
            print(f"{r['preset']}: {r['error']}")
    result = {
        "benchmark": "train_throughput", "rows": rows,
        "command": "python -m mmf.bench.train_throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if a.out:
        write_json(a.out, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
