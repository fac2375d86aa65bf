"""`mmf bench`: memory and latency of MatMul-free vs Transformer++ (and `--train`: training steps)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from .app import app, print_table
from mmf.bench import write_json


@app.command()
def bench(
    model: str = typer.Option("370m", "--model", "-m", help="370m, 1.3b, 2.7b, 13b, all, or a comma list."),
    device: str = typer.Option("cuda", "--device", help="cuda or cpu."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Sequences per batch (default 1; --train: the "
                                        "training benchmark's default)."),
    prompt_len: Optional[int] = typer.Option(None, "--prompt-len", help="Prompt tokens (default 128 on CUDA, 8 on CPU)."),
    gen_len: Optional[int] = typer.Option(None, "--gen-len", help="New tokens (default 128 on CUDA, 8 on CPU)."),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16 or fp16: Transformer++ weights, MatMul-free activations."),
    fmt: str = typer.Option("i2", "--format", help="Ternary storage: i2 (2 bits, kernels read it) or tq1 (1.6 bits, "
                            "unpacked per call)."),
    repeat: Optional[int] = typer.Option(None, "--repeat", help="Timed repetitions (default 5 on CUDA, 2 on CPU)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every raw figure to this JSON file."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG chart (memory and latency by size)."),
    no_hf: bool = typer.Option(False, "--no-hf", help="Skip the Hugging Face Llama baseline."),
    train: bool = typer.Option(False, "--train", help="Benchmark training steps instead (fused vs unfused BitLinear "
                               "vs Transformer++)."),
    seq_len: int = typer.Option(2048, "--seq-len", help="--train only: sequence length."),
    steps: int = typer.Option(8, "--steps", help="--train only: timed training steps."),
):
    """Memory and latency of the MatMul-free LM vs Transformer++ per size, one run, every figure labelled.

    Random weights in final form (packed ternary; bf16 Transformer++). Prints a table (and which code
    path ran), writes JSON with the machine, versions and protocol, and a PNG chart.
    """
    from mmf.bench import model_bench

    command = "mmf " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if train:
        res = model_bench.run_train(model if model != "all" else "370m,1.3b", device=device, batch=batch,
                                    seq_len=seq_len, steps=steps)
        res["command"] = command
        model_bench.print_train_results(res)
        _write_json(res, json_out)
        return
    variants = [v for v in model_bench.VARIANTS if not (no_hf and v == "hf-llama")]
    res = model_bench.run_bench(model, device=device, batch=batch or 1, prompt_len=prompt_len, gen_len=gen_len,
                                dtype=dtype, fmt=fmt, repeat=repeat, variants=variants, command=command,
                                progress=True, on_size_done=lambda r: _write_partial(r, json_out, plot))
    p = res["protocol"]
    bw = res["copy_bandwidth"]["bytes_per_s"]
    print_table(model_bench.table_rows(res), title=(
        f"mmf bench: {p['device']}, batch {p['batch']}, prompt {p['prompt_len']}, {p['gen_len']} new tokens, "
        f"{p['dtype']}, {p['format']}, median of {p['repeat']} (min-max in brackets); copy bandwidth "
        f"{bw / 1e9:.1f} GB/s (measured); (x) extrapolated, (e) estimated, others measured"))
    typer.echo("paths:")
    for line in model_bench.paths_summary(res):
        typer.echo(f"  {line}")
    typer.echo("protocol: " + p["description"])
    _write_json(res, json_out)
    if plot is not None:
        model_bench.write_plot(res, plot)
        typer.echo(f"wrote {plot}")


def _write_partial(res, json_out: Optional[Path], plot: Optional[Path]) -> None:
    """After each size: the JSON and chart so far (a run cut short keeps the sizes it measured)."""
    from mmf.bench import model_bench

    _write_json(res, json_out, quiet=True)
    if plot is not None:
        model_bench.write_plot(res, plot)


def _write_json(res, path: Optional[Path], quiet: bool = False) -> None:
    if path is None:
        return
    write_json(path, res)
    if not quiet:
        typer.echo(f"wrote {path}")
