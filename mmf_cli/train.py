"""`mmf train` and `mmf eval`."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import List, Optional

import typer

from .app import app, print_table


@app.command()
def train(
    config: Optional[str] = typer.Option(None, "--config", "-c",
                                         help="A preset (tiny, 370m, transformer++-tiny, ...) or a TOML file. Default: tiny."),
    data: Optional[List[str]] = typer.Option(None, "--data", "-d",
                                             help="Text file, directory or .jsonl (repeatable). Default: the embedded corpus."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory. Default: runs/<name>-<time>."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "--batch", show_default=False,
                                             help="Sequences per optimiser step, all ranks and micro-steps "
                                                  "(train.batch_size). Default: the config's."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", show_default=False,
                                          help="Tokens per training sequence (train.seq_len). Default: the config's."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", "-s",
                                                  help="Override a key: SECTION.KEY=VALUE (value read as TOML), repeatable."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as TOML and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the run's summary as JSON on stdout instead of the table."),
):
    """Train a MatMul-free or Transformer++ model; a bare `mmf train` trains `tiny` on the embedded corpus."""
    from mmf.train import resolve_config, run_train
    from mmf.train_config import config_to_toml

    if print_config:
        typer.echo(config_to_toml(resolve_config(config, data, out, resume, overrides, batch_size, seq_len)), nl=False)
        return
    r = run_train(config, data, out, resume, overrides, log=lambda s: typer.echo(s, err=True), batch_size=batch_size,
                  seq_len=seq_len)
    if r.checkpoint is None or not r.is_main:
        return
    s = r.summary()
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        if r.interrupted:
            raise typer.Exit(130)
        return
    val = "not measured (interrupted before the first validation)"
    if s["val_loss"] is not None:
        val = f"{s['val_loss']:.4f}" + (f" (at step {s['val_step']})" if s["val_step"] != s["steps"] else "")
    rows = [
        {"metric": "steps", "value": f"{r.step}"},
        {"metric": "training loss (last step)", "value": f"{r.losses[-1]:.4f}" if r.losses else "-"},
        {"metric": "validation loss (nats/token)", "value": val},
        {"metric": "validation perplexity", "value": f"{s['val_perplexity']:.2f}" if s["val_loss"] is not None else "-"},
        {"metric": "unigram entropy of the corpus (nats/token)", "value": f"{r.unigram_entropy:.4f}"},
        {"metric": "tokens this run", "value": f"{r.tokens:,}"},
        {"metric": "training time (s)", "value": f"{r.seconds:.1f}"},
        {"metric": "tokens/s (mean over this run)", "value": f"{r.tokens_per_s:,.0f}"},
        {"metric": "parameters", "value": f"{r.params:,}"},
        {"metric": "checkpoint", "value": str(r.checkpoint)},
    ]
    print_table(rows, title="mmf train")
    if r.interrupted:
        if r.resume_command():
            typer.echo(f"Continue with: {r.resume_command()}")
        raise typer.Exit(130)
    if math.isfinite(r.val_loss) and math.isfinite(r.unigram_entropy):
        where = "below" if r.val_loss < r.unigram_entropy else "NOT below"
        typer.echo(f"Validation loss {r.val_loss:.4f} nats/token is {where} the corpus's unigram entropy "
                   f"{r.unigram_entropy:.4f} nats/token (what predicting token frequencies alone would give).")
    typer.echo(f"Loss curve: {r.out / 'loss_curve.png'}   metrics: {r.out / 'metrics.jsonl'}")
    typer.echo("Try it:")
    typer.echo(f"  mmf generate {shlex.quote(str(r.checkpoint))} --prompt \"Once upon a time\" --max-new-tokens 120 --seed 0")


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    data: List[str] = typer.Option(..., "--data", "-d", help="Text file, directory or .jsonl (repeatable)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per scored window."),
    batch_size: int = typer.Option(8, "--batch-size", "--batch", help="Windows per forward pass."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", show_default=False,
                                             help="Score at most this many tokens (a positive number). Default: all the data."),
    text_field: str = typer.Option("text", "--text-field", help="JSONL field holding the text."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16."),
    threads: Optional[int] = typer.Option(None, "--threads", show_default=False,
                                          help="CPU threads, >= 1 (torch and the native CPU kernel; default: "
                                          "torch's own, usually the number of physical cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout instead of the table."),
):
    """Loss (nats/token) and perplexity of a checkpoint on text."""
    from mmf.evaluate import evaluate_checkpoint

    r = evaluate_checkpoint(checkpoint, data, seq_len, batch_size, max_tokens, device, dtype, text_field, threads)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    print_table([{"field": k, "value": (f"{v:.4f}" if isinstance(v, float) else v)} for k, v in r.items()],
                title=f"mmf eval {checkpoint}")
