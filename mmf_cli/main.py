"""The `mmf` command: thin Typer wrappers, each parsing arguments and calling one library function.

Each command lives in its own module of this package and registers itself on ``app``.
"""

from __future__ import annotations

import sys

from mmf.errors import MMFError

from .app import app
from . import generate  # noqa: F401  (registers generate, info)
from . import pack  # noqa: F401  (registers pack, unpack, inspect)
from . import train  # noqa: F401  (registers train, eval)
from . import fpga  # noqa: F401  (registers fpga-image)
from . import export_onnx  # noqa: F401
from . import bench  # noqa: F401  (registers bench)


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        app(prog_name="mmf")
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
        sys.stderr.write(f"mmf: internal error: {type(e).__name__}: {msg} (run with --debug for the traceback)\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
