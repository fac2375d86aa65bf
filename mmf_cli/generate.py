"""`mmf generate` and `mmf info`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .app import app, print_table


@app.command()
def generate(
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint directory (latent, float or packed); or give "
                                                "--onnx DIR instead."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="Prompt text (or --prompt-file); "
                                               "repeat it for several prompts, decoded as one batch."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from a UTF-8 file, the "
                                               "whole file one prompt (instead of --prompt)."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", show_default=False,
                                                help="Several prompts from a UTF-8 file, one per line (blank lines "
                                                "skipped), after any --prompt; decoded as one batch."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", "-n", help="Tokens to generate, >= 0."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help=">= 0; 0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens, >= 0 (0 = all)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1] (1 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling (default: random, so "
                                       "sampled text differs between runs; greedy -t 0 needs none)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto (cuda when a GPU is visible); "
                               "--onnx runs on the CPU."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32, bf16 or fp16 (default: fp32; with --onnx the "
                                        "export's own dtype)."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Generate through ONNX Runtime from an `mmf export-onnx` "
                                        "directory (instead of CHECKPOINT)."),
    graph: bool = typer.Option(False, "--graph", help="With --device cuda: each decode step is one CUDA-graph replay "
                               "of a static decoder (MatMul-free: the fused Triton kernels, compiled and tuned at "
                               "start, tens of seconds; pays off on long generations)."),
    threads: Optional[int] = typer.Option(None, "--threads", show_default=False,
                                          help="CPU threads, >= 1 (torch, the native CPU kernel and ONNX Runtime; "
                                          "default: torch's own, usually the number of physical cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (each prompt, its generated text, "
                                 "new tokens, how the batch ran) instead of the text."),
):
    """Sample text from a checkpoint, streaming it as it is produced (O(1) memory per token).

    Several prompts (--prompt repeated, --prompts-file) are decoded as one batch and printed when done, each
    under a '=== prompt i of n ===' line; with --seed S, prompt i samples with seed S + i - 1."""
    from mmf.generate import run_generate

    def write(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    run_generate(checkpoint, onnx, prompt, prompt_file, max_new_tokens, temperature, top_k, top_p, seed, device, dtype,
                 graph, write, threads=threads, prompts_file=prompts_file, as_json=as_json)
    write("\n")


@app.command()
def info(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (raw numbers) on stdout instead of the table."),
):
    """Architecture, parameter counts by group, ternary share and bytes by dtype of a checkpoint."""
    from mmf.info import checkpoint_info, info_rows

    data = checkpoint_info(checkpoint)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    print_table(info_rows(data), title=f"mmf info {checkpoint}")
