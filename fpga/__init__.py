"""FPGA export: memory images with an address map (``image``), their word encodings and file formats
(``formats``), and the reference ternary matrix-vector unit in ``rtl/`` proven by simulation (``sim``).
docs/fpga.md is the specification."""
