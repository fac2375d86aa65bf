"""The Typer app and the output helpers shared by the command modules."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from mmf import __version__

app = typer.Typer(
    name="mmf",
    help="MatMul-free language models: train, generate, pack, export and benchmark ternary LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"debug": False}


def _version(value: bool):
    if value:
        typer.echo(f"mmf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
):
    """MatMul-free language models: train, generate, pack, export and benchmark ternary LMs."""
    _state["debug"] = debug


def print_table(rows: list[dict], title: Optional[str] = None) -> None:
    """A rich table on a terminal, plain text (tabulate) otherwise."""
    if not rows:
        return
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for col in rows[0]:
            table.add_column(str(col))
        for r in rows:
            table.add_row(*[str(v) for v in r.values()])
        Console().print(table)
    else:
        from tabulate import tabulate

        if title:
            typer.echo(title)
        typer.echo(tabulate(rows, headers="keys"))
