"""`mmf pack`, `mmf unpack` and `mmf inspect`: thin wrappers over mmf.converters.packing."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .app import app, print_table


@app.command()
def pack(
    checkpoint: Path = typer.Argument(..., help="Latent (training) MatMul-free checkpoint directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for the packed checkpoint."),
    fmt: str = typer.Option("i2", "--format", help="i2 (2 bits/weight) or tq1 (1.6 bits/weight)."),
    dtype: str = typer.Option(
        "source", "--dtype", "--keep-dtype", help="dtype of the tensors that stay unpacked (embeddings, norms, "
        "lower bounds): source (each keeps its dtype in CHECKPOINT, so the packed model gives the source's logits "
        "exactly), fp32, bf16 or fp16 (smaller; rounds an fp32 source). --keep-dtype: old spelling."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it is a directory mmf wrote (never a file, "
                               "another directory, or a training checkpoint or run)."),
    verify: bool = typer.Option(False, "--verify", help="Check the packed model against the source model after "
                                "freeze() (both fp32, 48 random positions): codes and scales must be equal, logits "
                                "bit-identical up to the --dtype rounding; prints the errors."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Quantise a checkpoint's BitLinear weights to ternary (absmean) and store them packed.

    Sizes are those of the weight files on disk.
    """
    from mmf.converters.packing import pack_checkpoint

    summary = pack_checkpoint(checkpoint, out, fmt=fmt, dtype=dtype, force=force, verify=verify,
                              progress=sys.stderr.isatty())
    _report(summary, as_json, f"mmf pack {checkpoint} -> {out}")


@app.command()
def unpack(
    packed: Path = typer.Argument(..., help="Packed checkpoint directory (written by `mmf pack`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for the float checkpoint."),
    dtype: str = typer.Option("fp32", "--dtype", help="dtype of the ternary weights written: fp32 (always exact), bf16, fp16."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it is a directory mmf wrote (never a file, "
                               "another directory, or a training checkpoint or run)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Write a float checkpoint (published hgrn_bit layout) that re-quantises to exactly the packed model.

    Sizes are those of the weight files on disk.
    """
    from mmf.converters.packing import unpack_checkpoint

    summary = unpack_checkpoint(packed, out, force=force, dtype=dtype, progress=sys.stderr.isatty())
    _report(summary, as_json, f"mmf unpack {packed} -> {out}")


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="Checkpoint directory, packed or not."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    no_stats: bool = typer.Option(False, "--no-stats", help="Float checkpoints: headers only, skip quantising to count codes."),
):
    """Per tensor: shape, dtype or packed format, bytes, share of -1/0/+1, scale; totals and compression."""
    from mmf.converters.packing import inspect_checkpoint

    data = inspect_checkpoint(path, stats=not no_stats)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    rows = []
    for t in data["tensors"]:
        rows.append({
            "tensor": t["name"], "shape": "x".join(str(s) for s in t["shape"]), "stored": t["stored"],
            "data bytes": f"{t['bytes']:,}",
            "-1": _pct(t.get("share_-1")), "0": _pct(t.get("share_0")), "+1": _pct(t.get("share_+1")),
            "scale": f"{t['scale']:.6g}" if "scale" in t else "",
        })
    what = f"packed {data['format']}" if data["packed"] else "float"
    print_table(rows, title=f"mmf inspect {path} ({data['model_type']}, {what})")
    tot = data["totals"]
    summary = [
        {"total": "parameters", "value": f"{tot['parameters']:,}"},
        {"total": "weight files on disk (bytes)", "value": _bytes(tot["file_bytes"])},
        {"total": "tensor data (bytes)", "value": _bytes(tot["tensor_bytes"])},
        {"total": "tensor data as fp16 (bytes)", "value": _bytes(tot["fp16_bytes"])},
        {"total": "compression vs fp16 (tensor data)", "value": f"{tot['compression_vs_fp16']:.2f}x"},
        {"total": "ternary parameters", "value": f"{tot['ternary_parameters']:,}"},
        {"total": "bits per ternary weight", "value": "" if tot["bits_per_ternary_weight"] is None
         else f"{tot['bits_per_ternary_weight']:.3f}"},
    ]
    print_table(summary, title="totals")


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


# labels of the summary fields whose name alone does not say what they measure
_LABELS = {"input_bytes": "input weight files on disk", "output_bytes": "output weight files on disk",
           "compression_vs_input": "compression (input / output files)",
           "ternary_share": "share of ternary weights"}


def _bytes(n: int) -> str:
    from mmf.units import human_bytes

    return f"{n:,} ({human_bytes(n)})"


def _value(k: str, v) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "no", None: "-"}[v]
    if k.endswith("_bytes") and isinstance(v, int):
        return _bytes(v)
    if isinstance(v, float):
        return f"{v:.3g}" + ("x" if k.startswith("compression") else "")
    if isinstance(v, list):
        return ", ".join(map(str, v)) if len(v) <= 3 else f"{v[0]} … {v[-1]} ({len(v)} files)"
    return str(v)


def _report(summary: dict, as_json: bool, title: str) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    rows = []
    for k, v in summary.items():
        if k == "ternary_share" and v:
            v = ", ".join(f"{a}: {100 * b:.1f}%" for a, b in v.items())
        if isinstance(v, dict):  # --verify: one row per figure
            rows += [{"field": f"{k}: {a.replace('_', ' ')}", "value": _value(a, b)} for a, b in v.items()]
            continue
        rows.append({"field": _LABELS.get(k, k), "value": _value(k, v)})
    print_table(rows, title=title)
