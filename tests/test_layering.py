"""Data flows one way: config -> model -> checkpoint -> pack -> (ONNX | FPGA | bench), CLI on top.

The core (every module under mmf/) and the kernels (kernels/, which the core calls) must never import
from converters/, bench/, fpga/ or mmf_cli/ (installed as mmf.converters, mmf.bench, mmf.fpga, mmf.cli),
neither at the top of a file nor inside a function; and the modules of converters/, fpga/ and kernels/
import each other one way (no circle such as fpga/image.py <-> fpga/sim.py). Read from the source with
``ast``, relative imports resolved, so an import that only runs on some code path is caught too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package it is installed as (pyproject.toml's package-dir)
PACKAGES = {"mmf": "mmf", "kernels": "mmf.kernels", "converters": "mmf.converters", "fpga": "mmf.fpga"}
LOWER = {"mmf": "mmf", "kernels": "mmf.kernels"}
UPPER = ("converters", "bench", "fpga", "cli")
FORBIDDEN = tuple(f"mmf.{name}" for name in UPPER) + ("converters", "bench", "fpga", "mmf_cli")


def module_name(path: Path, folder: str) -> str:
    parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGES[folder], *parts])


def imported_modules(source: str, module: str, is_package: bool = False) -> list:
    """(line, dotted name) of every module ``source`` imports, anywhere in the file.

    ``from a import b`` yields both ``a`` and ``a.b`` (b may be a submodule); relative imports are
    resolved against ``module``; ``importlib.import_module("x")`` and ``__import__("x")`` with a
    literal name count as imports of ``x``.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def upward_imports(source: str, module: str, is_package: bool = False) -> list:
    return [(line, name) for line, name in imported_modules(source, module, is_package)
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]


def lower_files():
    for folder in LOWER:
        yield from sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", list(lower_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_and_kernels_never_import_upward(path):
    folder = path.relative_to(ROOT).parts[0]
    bad = upward_imports(path.read_text(encoding="utf-8"), module_name(path, folder), path.name == "__init__.py")
    assert not bad, (f"{path.relative_to(ROOT)} imports {', '.join(f'{n} (line {l})' for l, n in bad)}: the core and "
                     "the kernels must not depend on converters/bench/fpga/mmf_cli; move the shared piece down into mmf/")


def test_every_core_module_is_checked():
    names = {p.relative_to(ROOT).as_posix() for p in lower_files()}
    assert {"mmf/checkpoint.py", "mmf/packed_format.py", "mmf/models/hgrn_bit.py", "kernels/__init__.py"} <= names


@pytest.mark.parametrize("source, module, is_package", [
    ("from mmf.converters.packing import load_packed_model", "mmf.checkpoint", False),
    ("def f():\n    from mmf.converters import ternary_codes\n", "mmf.decode_graph", False),
    ("from mmf import fpga", "mmf.info", False),
    ("import mmf.bench.model_bench as mb", "mmf.generate", False),
    ("import converters.onnx_export", "mmf.onnx_runtime", False),
    ("from mmf_cli.app import app", "mmf.train", False),
    ("from .. import cli", "mmf.models.hgrn_bit", False),
    ("from ..converters import packing", "mmf.kernels.reference", False),
    ("from . import converters", "mmf", True),
    ("import importlib\nimportlib.import_module('mmf.fpga.image')", "mmf.evaluate", False),
])
def test_the_check_catches_upward_imports(source, module, is_package):
    assert upward_imports(source, module, is_package)


@pytest.mark.parametrize("source, module", [
    ("from mmf.packed_format import read_packed", "mmf.checkpoint"),
    ("from .ternary_codes import pack_i2", "mmf.checkpoint"),
    ("from mmf import kernels", "mmf.models.hgrn_bit"),
    ("from . import reference", "mmf.kernels.ternary_gemv"),
    ("import benchmark_tools", "mmf.info"),  # a name that only starts like 'bench'
])
def test_the_check_allows_imports_within_the_core(source, module):
    assert upward_imports(source, module) == []


def import_cycles(folder: str) -> list:
    """The circles of imports among the modules of ``folder`` (strongly connected components > 1 module)."""
    modules = {module_name(p, folder): p for p in sorted((ROOT / folder).rglob("*.py")) if p.name != "__init__.py"}
    graph = {name: {m for _, m in imported_modules(p.read_text(encoding="utf-8"), name) if m in modules and m != name}
             for name, p in modules.items()}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


@pytest.mark.parametrize("folder", ["mmf", "converters", "fpga", "kernels"])
def test_no_import_circles(folder):
    assert import_cycles(folder) == []


def test_the_circle_check_finds_a_circle(tmp_path, monkeypatch):
    pkg = tmp_path / "fpga"
    pkg.mkdir()
    (pkg / "image.py").write_text("def build():\n    from .sim import verify_image\n")
    (pkg / "sim.py").write_text("from .image import build\n")
    (pkg / "formats.py").write_text("import numpy\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert import_cycles("fpga") == [["mmf.fpga.image", "mmf.fpga.sim"]]
