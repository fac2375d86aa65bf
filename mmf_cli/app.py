"""The Typer app and the output helpers shared by the command modules."""

from __future__ import annotations

import inspect
import sys
from typing import Optional

import typer
from typer.core import TyperCommand, TyperGroup

from mmf import __version__

# `mmf --help` lists the commands in the order of the pipeline, whatever order their modules were imported in.
PIPELINE_ORDER = ("train", "eval", "generate", "info", "pack", "unpack", "inspect", "export-onnx", "fpga-image", "bench")


class _FlagsWithoutMetavar:
    """Boolean flags take no value, so their help shows none.

    Recent typer (0.29.2, what pip resolves today) carries its own copy of click (``typer._click``; the
    separately installed click, 8.5.1, is not used) and its rich help panel
    (``rich_utils._print_options_panel``) asks every option for its type label, flags included, so each
    flag (``--help`` too) showed as ``--graph <bool>``; its plain-text help skips flags. An empty
    metavar makes the rich panel print nothing there, under older typer versions too.
    """

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if (getattr(p, "is_flag", False) or getattr(p, "count", False)) and p.metavar is None:
                p.metavar = ""
        return params


def one_line_per_paragraph(text: Optional[str]) -> Optional[str]:
    """A docstring's paragraphs each as one line (a paragraph starting with ``\\b`` kept as it is).

    Typer 0.29's rich help keeps the single line breaks of every paragraph after the first, so a docstring
    wrapped at 100 columns showed ragged on an 80-column terminal (a long line, then a stub of a few words);
    one line per paragraph lets rich wrap it to the terminal's width.
    """
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)


class _ReflowedHelp:
    """The command's help text as ``one_line_per_paragraph`` gives it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = one_line_per_paragraph(self.help)


class MMFCommand(_ReflowedHelp, _FlagsWithoutMetavar, TyperCommand):
    """Every `mmf` command (see ``_ReflowedHelp`` and ``_FlagsWithoutMetavar``)."""


class MMFGroup(_ReflowedHelp, _FlagsWithoutMetavar, TyperGroup):
    """The `mmf` group: commands listed in pipeline order (``PIPELINE_ORDER``, then any others)."""

    def list_commands(self, ctx):
        names = super().list_commands(ctx)
        rank = {n: i for i, n in enumerate(PIPELINE_ORDER)}
        return sorted(names, key=lambda n: rank.get(n, len(rank)))


class _Typer(typer.Typer):
    """``app.command()`` builds an ``MMFCommand`` unless told otherwise."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or MMFCommand, **kwargs)


app = _Typer(
    name="mmf",
    cls=MMFGroup,
    help="MatMul-free language models: train, generate, pack, export and benchmark ternary LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command's context
)
_state = {"debug": False}


def _version(value: bool):
    if value:
        typer.echo(f"mmf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors (accepted anywhere on the "
                               "command line, e.g. `mmf generate ... --debug`)."),
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
