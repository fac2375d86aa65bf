"""`mmf generate` and `mmf info`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from mmf.errors import MMFError

from .app import app, print_table


@app.command()
def generate(
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint directory (latent, float or packed)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from a UTF-8 file."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", "-n", help="Tokens to generate."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Generate through ONNX Runtime from an `mmf export-onnx` "
                                        "directory (instead of CHECKPOINT)."),
    graph: bool = typer.Option(False, "--graph", help="With --device cuda: each decode step is one CUDA-graph replay "
                               "of a static decoder (MatMul-free: the fused Triton kernels, compiled and tuned at "
                               "start, tens of seconds; pays off on long generations)."),
):
    """Sample text from a checkpoint, streaming it as it is produced (O(1) memory per token)."""
    from mmf.generate import generate_text
    from mmf.onnx_runtime import generate_onnx_text, onnx_source

    onnx = onnx_source(checkpoint, onnx)
    if graph and onnx is not None:
        raise MMFError("--graph and --onnx do not go together: ONNX Runtime runs its own graph; drop one")
    text = read_prompt(prompt, prompt_file)
    sys.stdout.write(text)
    sys.stdout.flush()

    def write(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    if onnx is not None:
        generate_onnx_text(onnx, text, max_new_tokens, temperature, top_k, top_p, seed, write)
    else:
        generate_text(checkpoint, text, max_new_tokens, temperature, top_k, top_p, seed, device, dtype, write, graph)
    sys.stdout.write("\n")


def read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    if prompt_file is not None:
        if prompt is not None:
            raise MMFError("give either --prompt or --prompt-file, not both")
        try:
            return prompt_file.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise MMFError(f"{prompt_file}: no such prompt file") from None
        except UnicodeDecodeError as e:
            raise MMFError(f"{prompt_file}: not UTF-8 text (byte {e.start}); convert it with iconv -t UTF-8") from None
    if prompt is None:
        raise MMFError("no prompt: pass --prompt TEXT or --prompt-file PATH")
    return prompt


@app.command()
def info(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Architecture, parameter counts by group, ternary share and bytes by dtype of a checkpoint."""
    from mmf.info import checkpoint_info

    data = checkpoint_info(checkpoint)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    rows = [{"field": k, "value": v} for k, v in data.items() if not isinstance(v, dict)]
    rows += [{"field": f"parameters[{g}]", "value": f"{n:,}"} for g, n in data["parameters_by_group"].items()]
    rows += [{"field": f"bytes[{d}]", "value": f"{n:,}"} for d, n in data["bytes_by_dtype"].items()]
    print_table(rows, title=f"mmf info {checkpoint}")
