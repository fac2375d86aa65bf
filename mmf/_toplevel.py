"""Keep the repository's top-level folders from shadowing installed packages of the same name.

``kernels/``, ``converters/``, ``bench/``, ``fpga/`` and ``mmf_cli/`` sit at the repository root and
install as ``mmf.kernels``, ``mmf.converters``, ... (``package-dir`` in pyproject.toml). Whenever the
repository root is on ``sys.path`` -- ``python -m pytest``, ``python -m mmf.cli.main`` and torchrun's
``-m mmf.cli.main`` put the current directory first -- ``import kernels`` in another library (transformers
imports the PyPI package ``kernels``) would find our folder before the installed package.

Each of those folders' ``__init__.py`` therefore starts with ``defer_bare_import(globals())``. Under the
package's own name (``mmf.kernels``) that does nothing. Under a bare top-level name (``kernels``) it loads
the installed package of that name from ``sys.path`` without the repository root and puts it in
``sys.modules``, which is what the import statement then returns. With no such package it gives what Python
gives for a folder without ``__init__.py``: an empty namespace package (no ``__file__``, no submodules), which
availability checks read as "not installed" (transformers' does: it finds the folder with find_spec, then
imports it; raising there would break ``import transformers``). The rest of our ``__init__.py`` still
runs once in the discarded module object (Python cannot end a module early); its relative imports are
pointed at ``mmf.<name>``, so that run only repeats the file's definitions.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys

#: top-level folder -> the package it installs as; must agree with ``package-dir`` in pyproject.toml
PACKAGES = {"kernels": "mmf.kernels", "converters": "mmf.converters", "bench": "mmf.bench", "fpga": "mmf.fpga",
            "mmf_cli": "mmf.cli"}


def defer_bare_import(module_globals: dict) -> None:
    """Call first in a top-level folder's ``__init__.py``; see the module docstring."""
    name = module_globals["__name__"]
    if name not in PACKAGES:  # mmf.kernels etc.: the normal case
        return
    folder = os.path.dirname(os.path.realpath(module_globals["__file__"]))
    spec = _installed_spec(name, folder)
    if spec is None:  # nothing installed: an empty namespace package
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if spec.loader is not None:
        spec.loader.exec_module(module)
    # The import of `name` returns sys.modules[name] (the installed package or the namespace). What follows the call in our
    # __init__.py runs in the discarded module: send its relative imports to our package.
    module_globals["__package__"] = PACKAGES[name]
    module_globals["__spec__"] = importlib.util.find_spec(PACKAGES[name])


def _installed_spec(name: str, folder: str):
    """The spec that ``import name`` would find if the repository root were not on ``sys.path``."""
    root = os.path.dirname(folder)
    path = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    for finder in sys.meta_path:
        if isinstance(finder, type) and issubclass(finder, importlib.machinery.PathFinder):
            spec = finder.find_spec(name, path)
        elif hasattr(finder, "find_spec"):
            spec = finder.find_spec(name, None)
        else:
            continue
        if spec is not None and not _is_ours(spec, folder):
            return spec
    return None


def _is_ours(spec, folder: str) -> bool:
    places = [spec.origin] if spec.origin and spec.has_location else []
    places += list(spec.submodule_search_locations or [])
    return any(os.path.realpath(p) == folder or os.path.realpath(p).startswith(folder + os.sep) for p in places)
