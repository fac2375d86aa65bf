"""The documentation holds together: its Markdown tables are well formed (issue 16 item 16)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])


def _cells(line: str) -> int:
    """Cells of a table row; ``\\|`` is a literal pipe inside a cell."""
    return len(re.split(r"(?<!\\)\|", line.strip()[1:-1]))


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.name)
def test_markdown_tables_are_well_formed(path):
    """From a header row and its |---| separator to the next blank line, every line is a table row with the
    header's number of cells (stray lines of plain text inside the README's H100 table broke it)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    in_code = False
    for n, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            in_code = not in_code
        if in_code or n + 1 >= len(lines):
            continue
        sep = lines[n + 1].strip()
        if not (line.strip().startswith("|") and sep.startswith("|") and set(sep) <= set("|-: ")):
            continue
        width = _cells(line)
        for m in range(n + 2, len(lines)):
            row = lines[m]
            if not row.strip():
                break
            assert row.strip().startswith("|") and row.strip().endswith("|"), \
                f"{path.name}:{m + 1}: not a table row inside the table starting at line {n + 1}: {row!r}"
            assert _cells(row) == width, f"{path.name}:{m + 1}: {_cells(row)} cells, the header has {width}"
