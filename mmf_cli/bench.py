"""`mmf bench`: memory and latency of MatMul-free vs Transformer++ (and `--train`: training steps)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from .app import app


@app.command()
def bench(
    model: str = typer.Option("370m", "--model", "-m", help="370m, 1.3b, 2.7b, 13b, all, or a comma list."),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu (auto: cuda when PyTorch sees a CUDA "
                               "device, else cpu; the table title says which ran)."),
    batch_size: Optional[str] = typer.Option(None, "--batch-size", "--batch", show_default=False,
                                             help="Sequences per batch (default 1; with --train 8 at 370m, 4 at "
                                             "1.3b, 2 at 2.7b, 1 at 13b); a comma list (1,4,16,64) sweeps it: "
                                             "MatMul-free and Transformer++ at each, one table, --plot tokens/s and "
                                             "step time against batch with their floors. (--batch: old spelling)"),
    prompt_len: Optional[str] = typer.Option(None, "--prompt-len", show_default=False,
                                             help="Prompt tokens (default 128 on CUDA, 8 on CPU); a comma list "
                                             "(128,2048,8192) sweeps it, --plot prefill time against length."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "--gen-len", show_default=False,
                                                 help="New tokens generated (default 128 on CUDA, 8 on CPU). "
                                                 "(--gen-len: old spelling)"),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16 or fp16: Transformer++ weights, MatMul-free activations."),
    fmt: str = typer.Option("i2", "--format", help="Ternary storage: i2 (2 bits, kernels read it) or tq1 (1.6 bits, "
                            "unpacked per call)."),
    repeat: Optional[int] = typer.Option(None, "--repeat", show_default=False,
                                         help="Timed repetitions (default 5 on CUDA, 2 on CPU)."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON document (every raw figure) on stdout "
                                 "instead of the table."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", show_default=False,
                                            help="Also write the JSON document to this file (default: none; this "
                                            "was --json FILE before: --json is now a flag)."),
    plot: Optional[Path] = typer.Option(None, "--plot", show_default=False,
                                        help="Write a PNG chart, memory and latency by size (default: none)."),
    no_hf: bool = typer.Option(False, "--no-hf", help="Skip the Hugging Face Llama baseline."),
    no_onnx: bool = typer.Option(False, "--no-onnx", help="CPU: skip the ONNX Runtime row (the MatMul-free model "
                                 "exported with mmf export-onnx, decoded as mmf generate --onnx does)."),
    llamacpp_python: Optional[Path] = typer.Option(None, "--llamacpp-python", show_default=False,
                                                   help="CPU, with 1.3b in --model: add llama.cpp TQ2_0 on a Llama of "
                                                   "the 1.3b shape as a row, run by this interpreter of a separate "
                                                   "environment holding numpy, gguf and llama-cpp-python "
                                                   "(bench/llamacpp_anchor.py says how to make it; default: no "
                                                   "anchor)."),
    threads: Optional[int] = typer.Option(None, "--threads", show_default=False,
                                          help="CPU threads, >= 1 (torch, the native CPU kernel, the read-bandwidth "
                                          "stream and ONNX Runtime; default: torch's own, usually the number of "
                                          "physical cores)."),
    train: bool = typer.Option(False, "--train", help="Benchmark training steps instead (fused vs unfused BitLinear "
                               "vs Transformer++; on CPU a dry run: every variant runs the same torch code)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", show_default=False,
                                          help="--train only: sequence length (default 2048)."),
    steps: Optional[int] = typer.Option(None, "--steps", show_default=False,
                                        help="--train only: timed training steps (default 8; with --nproc 20)."),
    nproc: Optional[str] = typer.Option(None, "--nproc", show_default=False,
                                        help="--train only: run the training step under torchrun on N processes "
                                        "(a comma list sweeps, e.g. 1,2,4,8; NCCL on GPUs, gloo on the CPU): tokens/s "
                                        "per GPU, scaling efficiency, loss vs one process, peak memory per rank."),
    strategy: str = typer.Option("ddp", "--strategy", help="--train --nproc only: ddp or fsdp."),
):
    """Memory and latency of the MatMul-free LM vs Transformer++ per size, one run, every figure labelled.

    Random weights in final form (packed ternary; bf16 Transformer++). Prints a table (and which code
    path ran); optionally writes JSON with the machine, versions and protocol, and a PNG chart. The
    output files are checked before anything is measured. On the CPU the decode floor is the weight
    bytes over a read-only stream's bandwidth, and the ONNX Runtime export is a row of its own.
    """
    from mmf.bench import model_bench

    model_bench.bench_command(
        model, device=device, batch_size=batch_size, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
        dtype=dtype, fmt=fmt, repeat=repeat, json_stdout=as_json, json_out=json_out, plot=plot, no_hf=no_hf,
        train=train, seq_len=seq_len, steps=steps, threads=threads, no_onnx=no_onnx, llamacpp_python=llamacpp_python,
        nproc=nproc, strategy=strategy,
        command="mmf " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
