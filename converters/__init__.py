"""converters"""

from mmf._toplevel import defer_bare_import as _defer_bare_import

_defer_bare_import(globals())  # imported as a top-level `converters` from the repository root: see mmf/_toplevel.py
