"""The `mmf` command: thin Typer wrappers, each parsing arguments and calling one library function.

Each command lives in its own module of this package and registers itself on ``app``.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from mmf.errors import MMFError

from .app import app
# Imported in pipeline order; `mmf --help` lists them in that order whatever the import order (app.PIPELINE_ORDER).
from . import train  # noqa: F401  (registers train, eval)
from . import generate  # noqa: F401  (registers generate, info)
from . import pack  # noqa: F401  (registers pack, unpack, inspect)
from . import export_onnx  # noqa: F401
from . import fpga  # noqa: F401  (registers fpga-image)
from . import bench  # noqa: F401  (registers bench)


def split_debug_flag(args: list[str]) -> tuple[list[str], bool]:
    """``--debug`` is accepted anywhere before a ``--`` (``mmf generate ... --debug`` as well as ``mmf --debug
    generate ...``): returns the arguments with it moved to the front, where the root command parses it."""
    end = args.index("--") if "--" in args else len(args)
    debug = "--debug" in args[:end]
    if not debug:
        return list(args), False
    rest = [a for a in args[:end] if a != "--debug"] + list(args[end:])
    return ["--debug", *rest], True


#: commands whose ``--json`` took a file before it became the stdout flag that every command shares
JSON_WAS_A_PATH = ("bench", "fpga-image")


def check_old_json_path(args: list[str]) -> None:
    """``mmf bench --json FILE`` (the old spelling) would otherwise be Typer's "unexpected extra argument"."""
    end = args.index("--") if "--" in args else len(args)
    if not any(a in JSON_WAS_A_PATH for a in args[:end]):
        return
    for opt, value in zip(args[:end], args[1:end]):
        if opt == "--json" and not value.startswith("-"):
            raise MMFError(f"--json {value}: --json is now a flag that prints the JSON on stdout; write it to a file "
                           f"with --json-out {value}")


def _click_error_classes() -> tuple:
    """(UsageError, ClickException) of the click that Typer uses: its own copy (``typer._click``) from 0.29 on,
    the separately installed click before."""
    names = {c.__name__: c for c in typer.BadParameter.__mro__}
    return names["UsageError"], names["ClickException"]


def usage_error_line(e) -> str:
    """A Typer usage error (an unknown or missing option, a bad value) as one line, where Typer prints a box of
    six: the problem as click words it (with its "Did you mean" hint), and where the options are listed."""
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None and ctx.command_path else "mmf"
    msg = " ".join(e.format_message().split()).rstrip(".")
    return f"{msg}; see `{where} -h`"


def main(argv: Optional[list[str]] = None) -> None:
    args, debug = split_debug_flag(sys.argv[1:] if argv is None else list(argv))
    usage_error, click_error = _click_error_classes()
    try:
        check_old_json_path(args)
        # not standalone, so that usage errors reach us as exceptions; --help, --version and typer.Exit return a code
        code = app(args=args, prog_name="mmf", standalone_mode=False)
        sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)  # as standalone Typer exits
    except usage_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare `mmf`: the help, which rich has printed already
            text = e.format_message()  # the help itself where Typer formats it without rich (else empty)
            if text.strip():
                sys.stdout.write(text + "\n")
            sys.exit(e.exit_code)
        if debug:
            raise
        sys.stderr.write(f"mmf: error: {usage_error_line(e)}\n")
        sys.exit(e.exit_code)
    except click_error as e:  # click's other errors (a file it could not open, ...): one line as well
        if debug:
            raise
        sys.stderr.write(f"mmf: error: {' '.join(e.format_message().split())}\n")
        sys.exit(e.exit_code)
    except MMFError as e:
        if debug:
            raise
        sys.stderr.write(f"mmf: error: {e}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("mmf: interrupted\n")
        sys.exit(130)
    except Exception as e:  # an unexpected failure: still one line unless --debug
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        sys.stderr.write(f"mmf: internal error: {type(e).__name__}: {msg} (add --debug for the traceback)\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
