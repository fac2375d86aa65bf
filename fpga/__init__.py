"""FPGA export: memory images with an address map (``image``), their word encodings and file formats
(``formats``), and the reference ternary matrix-vector unit in ``rtl/`` proven by simulation (``sim``).
Both read the checkpoint through ``source`` and the image's manifest and checksums through ``manifest``.
docs/fpga.md is the specification."""

from mmf._toplevel import defer_bare_import as _defer_bare_import

_defer_bare_import(globals())  # imported as a top-level `fpga` from the repository root: see mmf/_toplevel.py
