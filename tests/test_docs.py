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


SEMANTICS = ROOT / "docs" / "reference-semantics.md"
CODE_DIRS = ("mmf", "mmf_cli", "converters", "kernels", "bench", "fpga", "tests", "docs")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_citation_of_the_semantics_document_resolves():
    """The code, README and docs cite reference-semantics.md: it must exist at docs/, code must name it by that
    path, and Markdown links into it must name one of its headings."""
    assert SEMANTICS.is_file()
    text = SEMANTICS.read_text(encoding="utf-8")
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    files = [ROOT / "README.md"] + [p for d in CODE_DIRS for p in (ROOT / d).rglob("*")
                                    if p.suffix in (".py", ".md") and p not in (SEMANTICS, Path(__file__).resolve())]
    cited = 0
    for path in files:
        src = path.read_text(encoding="utf-8")
        for m in re.finditer(r"[\w/.\-]*reference-semantics\.md(#[\w\-]+)?", src):
            cited += 1
            where = f"{path.relative_to(ROOT)}: {m.group(0)}"
            if path.parent == ROOT / "docs":
                assert m.group(0).split("#")[0] in ("reference-semantics.md", "docs/reference-semantics.md"), where
            else:
                assert m.group(0).split("#")[0] == "docs/reference-semantics.md", where
            if m.group(1):
                assert m.group(1)[1:] in anchors, where
    assert cited >= 10
    for section in ("Comparing quantised models", "Hazard: a dequantised ternary tensor", "Numbers the paper reports"):
        assert re.search(rf"^#+ {re.escape(section)}", text, flags=re.M), section  # cited by name in code and README


def test_the_documents_bitlinear_is_the_reference_bit_for_bit():
    """The plain-torch BitLinear printed in reference-semantics.md equals kernels.reference.bitlinear_frozen."""
    import torch

    from mmf.kernels import reference as ref

    block = re.search(r"```python\n(.*?)```", SEMANTICS.read_text(encoding="utf-8"), flags=re.S).group(1)
    scope = {"torch": torch}
    exec(block, scope)
    torch.manual_seed(0)
    x = torch.randn(3, 9, 96) * 2
    w = torch.randn(40, 96) * 0.03
    norm_weight = torch.rand(96) + 0.5
    codes, s_w = ref.weight_quant(w)
    assert torch.equal(scope["bitlinear"](x, norm_weight, w), ref.bitlinear_frozen(x, norm_weight, codes, s_w))
