"""bench/results indexes itself: its README's table lists exactly the files in the folder, the files are
named by what they measure (never by session or run), nothing under bench/ is a patch, and every result
path that the README, the docs, the result notes and the code cite exists."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
NOT_INDEXED = {"README.md", "EXPERIMENTS.md"}  # the index itself, and the record of what is gone
CODE_DIRS = ("mmf", "mmf_cli", "converters", "kernels", "bench", "fpga")
# names that say when or which attempt, not what: a session, a "before X", a numbered run, ...
WHEN_NAME = re.compile(r"session|before|previous|_run\d|run\d+[._]|_again|_quiet|_old[._]|_new[._]", re.I)
# a cited path under bench/results or bench/experiments, as written in prose, markdown or a docstring
CITED = re.compile(r"bench/(?:results|experiments)/[\w./{},*-]*")
OUTPUT_OPTION = re.compile(r"--(?:out|json|json-out|plot)[ =]$")  # a path a command writes is not a citation


def _table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("| `"):
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


def _listed_files() -> list[str]:
    names = []
    for row in _table_rows((RESULTS / "README.md").read_text(encoding="utf-8")):
        names += re.findall(r"`([^`]+)`", row[0])
    return names


def _result_files() -> set[str]:
    return {p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*")
            if p.is_file() and p.relative_to(RESULTS).as_posix() not in NOT_INDEXED}


def _expand(pattern: str) -> list[str]:
    """``a.{json,log}`` -> ``a.json``, ``a.log`` (one level of braces, as the docs write them)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [x for alt in m.group(1).split(",") for x in _expand(pattern[:m.start()] + alt + pattern[m.end():])]


def _exists(rel: str) -> bool:
    return any(glob.glob(str(ROOT / p)) if "*" in p else (ROOT / p).exists() for p in _expand(rel))


def _cited_paths(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    out = []
    for m in CITED.finditer(text):
        if OUTPUT_OPTION.search(text[max(0, m.start() - 12):m.start()]):
            continue
        out.append(m.group(0).rstrip(".,"))
    return out


def test_table_lists_every_result_file_and_only_those():
    listed = _listed_files()
    assert listed, "bench/results/README.md has no table rows (| `file` | ... |)"
    assert len(listed) == len(set(listed)), f"listed twice: {sorted(n for n in listed if listed.count(n) > 1)}"
    files = _result_files()
    assert not files - set(listed), f"in bench/results but not in its README's table: {sorted(files - set(listed))}"
    assert not set(listed) - files, f"in the README's table but not in bench/results: {sorted(set(listed) - files)}"


def test_table_rows_say_what_command_machine_date_commit():
    rows = _table_rows((RESULTS / "README.md").read_text(encoding="utf-8"))
    for row in rows:
        assert len(row) == 6, f"row needs file | what | command | machine | date | commit: {row[0]}"
        file, what, command, machine, date, commit = row
        assert what and command and machine, f"empty cell in the row of {file}"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date), f"{file}: date {date!r} is not YYYY-MM-DD"
        assert re.fullmatch(r"[0-9a-f]{7,40}", commit), f"{file}: commit {commit!r} is not a commit hash"


def test_result_files_are_named_by_what_they_measure():
    bad = sorted(n for n in _result_files() | NOT_INDEXED if WHEN_NAME.search(Path(n).name))
    assert not bad, f"named by session or run, not by what they measure and where: {bad}"


def test_nothing_under_bench_is_a_patch():
    patches = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "bench").rglob("*")
                     if p.suffix in (".diff", ".patch"))
    assert not patches, f"patches under bench/ (record them in bench/results/EXPERIMENTS.md instead): {patches}"


def _citing_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    files += sorted(p for p in RESULTS.glob("*.md") if p.name != "EXPERIMENTS.md")  # it names what is gone
    for d in CODE_DIRS:
        files += sorted((ROOT / d).rglob("*.py"))
    return [f for f in files if f.is_file()]


def test_every_cited_result_path_exists():
    missing = [f"{f.relative_to(ROOT)}: {p}" for f in _citing_files() for p in _cited_paths(f) if not _exists(p)]
    assert not missing, "cited but not in the tree:\n" + "\n".join(missing)


@pytest.mark.parametrize("note", sorted(p.name for p in RESULTS.glob("*.md") if p.name not in NOT_INDEXED))
def test_result_notes_cite_files_that_exist(note):
    """kernel_bench_h100.md, TRAINING.md, ... name result files bare (`train_bench_h100.json`)."""
    text = (RESULTS / note).read_text(encoding="utf-8")
    cited = [t for t in re.findall(r"`([^`\s/]+)`", text)
             if re.search(r"\.(json|log|txt|png|md|\*)$|\}$", t) and "_" in t]
    assert cited, f"{note} cites no result file"
    missing = [t for t in cited if not _exists(f"bench/results/{t}")]
    assert not missing, f"{note} cites files that are not in bench/results: {missing}"


def test_the_check_catches_a_missing_citation(tmp_path):
    """The citation scan finds paths in prose, docstrings and brace lists, and skips output paths."""
    doc = tmp_path / "doc.md"
    doc.write_text("see `bench/results/model_bench_h100.{json,png}` and bench/results/gone_h100.json.\n"
                   "``bench/experiments/old.py``; python -m x --out bench/results/new.json\n", encoding="utf-8")
    cited = _cited_paths(doc)
    assert cited == ["bench/results/model_bench_h100.{json,png}", "bench/results/gone_h100.json",
                     "bench/experiments/old.py"]
    assert [_exists(p) for p in cited] == [True, False, False]
