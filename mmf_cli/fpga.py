"""`mmf fpga-image`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .app import app, print_table


@app.command("fpga-image")
def fpga_image(
    checkpoint: Path = typer.Argument(..., help="MatMul-free checkpoint directory (float, latent or packed)."),
    out: Path = typer.Option(..., "--out", "-o", help="Image directory to create."),
    word_bits: int = typer.Option(64, "--word-bits", help="Memory word width: 64, 72, 128, 256, 512 (any even width 32-4096)."),
    bank_words: int = typer.Option(4096, "--bank-words", help="Words per bank (one memory each; 4096 = one UltraRAM deep)."),
    formats: str = typer.Option("mem,coe,mif,bin", "--formats", help="Comma list of mem, coe, mif, bin."),
    layers: str = typer.Option("all", "--layers", help="all, or a comma list of layer numbers (3), ranges (0-2), lm_head, embeddings."),
    split_rows: bool = typer.Option(False, "--split-rows", help="Let a weight row continue into the next bank."),
    dtype: str = typer.Option("fp16", "--dtype", "--param-encoding", help="Encoding of the non-ternary parameters "
                              "(embeddings, norms, lower bounds): fp16, bf16, fp32. --param-encoding: old spelling."),
    on_chip_mib: float = typer.Option(32.0, "--on-chip-mib", help="Regions larger than this are placed off-chip (DDR/HBM)."),
    verify: bool = typer.Option(False, "--verify", help="Simulate the reference RTL on the image (Icarus Verilog) before keeping it."),
    verify_rows: int = typer.Option(64, "--verify-rows", help="Rows simulated per tensor, half from each end: 1 or "
                                    "more, or 0 for every row."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random int8 activations used by --verify (0 to 2^32-1)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it is a directory mmf wrote (never a file, "
                               "another directory, or a training checkpoint or run)."),
    as_json: bool = typer.Option(False, "--json", help="Print the resource and verify report as JSON on stdout "
                                 "instead of the tables."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", show_default="not written", help="Also write that JSON "
                                            "report to this file (was --json FILE before)."),
):
    """FPGA memory images (.mem/.coe/.mif/.bin banks, address map, Verilog header); --verify simulates them.

    Writes the banks of a MatMul-free checkpoint in every requested format, manifest.json with the address map
    and checksums, a Verilog header and a resource report; --verify proves them with Icarus Verilog.
    """
    from mmf.fpga.image import ImageOptions, build_image, parse_formats, report_document, resource_rows

    opt = ImageOptions(word_bits=word_bits, bank_words=bank_words, formats=parse_formats(formats), layers=layers,
                       split_rows=split_rows, param_encoding=dtype, on_chip_mib=on_chip_mib)
    report = build_image(checkpoint, out, opt, overwrite=force, verify=verify, verify_rows=verify_rows, seed=seed,
                         json_out=json_out)
    if as_json:
        typer.echo(json.dumps(report_document(report, out), indent=2))
        return
    manifest = report["manifest"]
    print_table(resource_rows(manifest), title=f"mmf fpga-image {out}: {manifest['word_bits']}-bit words, "
                                               f"{manifest['bank_words']} words per bank (estimates)")
    if report["verify"] is not None:
        v = report["verify"]
        rows = [{"tensor": r["tensor"], "shape": f"{r['rows']}x{r['columns']}", "rows simulated": r["simulated_rows"],
                 "cycles": r["cycles"], "mismatches": r["mismatches"], "status": r["status"]} for r in v["tensors"]]
        print_table(rows, title=f"verify: {v['simulator']}, seed {v['seed']}, {v['seconds']} s")
        n = sum(r["simulated_rows"] for r in v["tensors"])
        typer.echo(f"verified: {n} accumulators of {len(rows)} tensors equal the torch reference bit for bit")
