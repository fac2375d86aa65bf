"""`mmf export-onnx`: prefill and decode-step ONNX graphs (2-bit weights for the MatMul-free model)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, print_table


@app.command("export-onnx")
def export_onnx(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (latent, float or packed; either architecture)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    weights: Optional[str] = typer.Option(
        None, "--weights", show_default="packed for MatMul-free, float for Transformer++",
        help="packed: 2-bit codes in uint8 initializers, unpacked in the graph (MatMul-free only); float: plain "
        "float initializers (the only choice for Transformer++)."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset, 18 to 21."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or fp16 (embeddings, float weights, activations)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it is a directory mmf wrote (never a file, "
                               "another directory, or a training checkpoint or run)."),
):
    """Export prefill.onnx and decode.onnx (+ shared weights, tokenizer, mmf_onnx.json) for ONNX Runtime."""
    from mmf.converters.onnx_export import export_onnx as run

    manifest = run(checkpoint, out, weights=weights, opset=opset, dtype=dtype, force=force)
    rows = [{"file": name, "bytes": f"{n:,}"} for name, n in manifest["file_bytes"].items()]
    rows.append({"file": "total", "bytes": f"{sum(manifest['file_bytes'].values()):,}"})
    print_table(rows, title=f"mmf export-onnx -> {out} ({manifest['arch']}, {manifest['weights']} weights, "
                            f"{manifest['dtype']}, opset {manifest['opset']})")
