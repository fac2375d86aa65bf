"""The files that describe an FPGA image directory: its manifest, Verilog header, resource report and
checksums (docs/fpga.md). The builder (``fpga.image``) writes them; the simulation (``fpga.sim``) checks
an image against them before it reads a bank.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mmf.errors import MMFError

FORMAT_NAME = "mmf-fpga-image"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HEADER = "mmf_image.vh"
RESOURCES = "resources.json"
CHECKSUMS = "SHA256SUMS"


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_checksums(image_dir: Path, manifest: dict) -> None:
    """Every file the manifest lists exists and has its recorded SHA-256 (one line naming the first that differs)."""
    for rel, info in manifest["files"].items():
        path = Path(image_dir) / rel
        if not path.is_file():
            raise MMFError(f"{path}: listed in manifest.json but missing; rebuild the image with mmf fpga-image")
        if sha256_file(path) != info["sha256"]:
            raise MMFError(f"{path}: sha256 differs from manifest.json (the file was changed or truncated); "
                           "rebuild the image with mmf fpga-image")
