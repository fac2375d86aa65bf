"""Packaging: the repository's top-level folders (kernels/, converters/, bench/, fpga/, mmf_cli/ -> mmf.kernels,
...) must not shadow installed packages of the same name when the repository root is on sys.path
(``python -m pytest``, ``python -m mmf.cli.main``, torchrun's ``-m``); see mmf/_toplevel.py. Every check runs
in a fresh interpreter started in the repository root, the way those commands run."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmf._toplevel import PACKAGES

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, extra_path=None, env=None, timeout=300):
    """``python -c code`` in the repository root (which Python puts first on sys.path, as with -m)."""
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        full_env["PYTHONPATH"] = str(extra_path)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def stand_ins(tmp_path) -> Path:
    """A folder of installed-looking packages named like our top-level folders, each with a marker and a
    submodule of the same name as one of ours (kernels.reference), which must come from the stand-in."""
    site = tmp_path / "site"
    for name in PACKAGES:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"MARKER = 'stand-in {name}'\nfrom . import reference\n")
        (site / name / "reference.py").write_text("STAND_IN = True\n")
    return site


def test_top_level_folders_are_exactly_the_guarded_packages():
    """Every top-level package folder of ours (pyproject's package-dir) is in mmf._toplevel.PACKAGES, and its
    __init__.py calls the guard before anything else runs."""
    text = (ROOT / "pyproject.toml").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("package-dir"))
    mapping = dict(ast.literal_eval("{" + line.split("{", 1)[1].replace(" = ", ": ")))
    outside = {folder: pkg for pkg, folder in mapping.items() if "/" not in folder and folder != "mmf"}
    assert outside == PACKAGES
    for folder in PACKAGES:
        tree = ast.parse((ROOT / folder / "__init__.py").read_text())
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
                and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
        assert isinstance(body[0], ast.ImportFrom) and body[0].module == "mmf._toplevel", folder
        call = body[1].value
        assert isinstance(call, ast.Call) and call.func.id == "_defer_bare_import", folder


def test_our_code_never_imports_the_bare_top_level_names():
    bad = []
    for folder in ["mmf", "tests", *PACKAGES]:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in PACKAGES]
    assert not bad


@pytest.mark.parametrize("mmf_first", [False, True], ids=["stand-ins-first", "mmf-first"])
def test_installed_packages_named_like_our_folders_win_from_the_repository_root(tmp_path, mmf_first):
    code = """
import importlib, json, sys
names = %r
order = ["mmf"] + names if %r else names + ["mmf"]
for n in order:
    importlib.import_module(n)
out = {}
for n in names:
    bare, ours = sys.modules[n], importlib.import_module(%r[n])
    out[n] = [bare.MARKER, bare.reference.STAND_IN, ours.__file__]
import mmf.kernels, mmf.bench
out["dispatch"] = [callable(mmf.kernels.rms_norm), mmf.kernels.reference.__name__, callable(mmf.bench.write_json)]
out["stray"] = sorted(k for k, m in sys.modules.items() if k.split(".")[0] in names
                      and (getattr(m, "__file__", None) or "").startswith(%r))
print(json.dumps(out))
""" % (list(PACKAGES), mmf_first, PACKAGES, str(ROOT))
    r = run_python(code, extra_path=stand_ins(tmp_path))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for name, pkg in PACKAGES.items():
        marker, stand_in_submodule, our_file = out[name]
        assert marker == f"stand-in {name}" and stand_in_submodule is True
        assert Path(our_file) == ROOT / name / "__init__.py", pkg
    assert out["dispatch"] == [True, "mmf.kernels.reference", True]
    assert out["stray"] == []  # nothing of ours was loaded under a bare name


def test_bare_name_without_an_installed_package_is_an_empty_namespace():
    """As for a folder without __init__.py: no __file__, no submodules of ours; availability checks that
    find the folder with find_spec and then import it (transformers' does) read it as not installed."""
    r = run_python("""
import importlib, importlib.util, json
m = importlib.import_module("mmf_cli")
out = {"file": getattr(m, "__file__", None), "path": list(m.__path__), "version": hasattr(m, "__version__")}
try:
    from mmf_cli import app
    out["app"] = "imported"
except ImportError as e:
    out["app"] = type(e).__name__
try:
    from transformers.utils.import_utils import _is_package_available
except ImportError:
    pass
else:
    out["transformers_check"] = [_is_package_available(n, return_version=True)[0] for n in ("fpga", "converters")]
import mmf.cli.app
out["ours"] = mmf.cli.app.__name__
print(json.dumps(out))
""")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["file"] is None and out["path"] == [] and out["version"] is False and out["app"] == "ImportError"
    assert out.get("transformers_check", [False, False]) == [False, False]
    assert out["ours"] == "mmf.cli.app"


def test_transformers_llama_imports_from_the_repository_root():
    """transformers >= 5.25 imports the PyPI package `kernels` (issue 16: it found our kernels/ instead)."""
    pytest.importorskip("transformers")
    r = run_python("from transformers import LlamaForCausalLM; import kernels; print(kernels.__file__)")
    assert r.returncode == 0, r.stderr
    # not our folder (a virtual environment inside the clone, such as .venv, holds the PyPI package under ROOT)
    assert not Path(r.stdout.strip()).resolve().is_relative_to((ROOT / "kernels").resolve())


def test_cli_help_runs_as_a_module_from_the_repository_root(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(stand_ins(tmp_path))
    r = subprocess.run([sys.executable, "-m", "mmf.cli.main", "--help"], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout and "train" in r.stdout


# ------------------------------------------------------------------------------------------------
# triton is not a dependency (CUDA builds of torch bring it): a CPU-only install works without it
# ------------------------------------------------------------------------------------------------
NO_TRITON = """import sys
sys.modules["triton"] = None  # as if triton were not installed: import fails, importlib.util.find_spec gives None
"""

PIPELINE = r"""
import sys, torch
from mmf.cli.main import main

def cli(*args):
    sys.argv = ["mmf", *map(str, args)]
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None), (args, e.code)

out = sys.argv[1]
small = ["tokenizer.type=byte", "model.hidden_size=32", "model.num_hidden_layers=1", "model.intermediate_size=64",
         "train.seq_len=32", "train.batch_size=4", "train.steps=2", "checkpoint.every=2", "logging.eval_every=2",
         "logging.eval_tokens=64", "logging.progress=false", "logging.plot=false", "data.builtin_bytes=20000",
         f"data.cache_dir={out}/cache"]
cli("train", "--out", f"{out}/run", *[a for s in small for a in ("--set", s)])
ckpt = f"{out}/run/step-0000002"
cli("generate", ckpt, "--prompt", "Hi", "--max-new-tokens", "4", "--seed", "0")
cli("pack", ckpt, "--out", f"{out}/packed")
cli("generate", f"{out}/packed", "--prompt", "Hi", "--max-new-tokens", "4", "--seed", "0")
cli("info", f"{out}/packed")

from mmf.bench import train_bench  # `mmf bench --train` on a CPU: a dry run of the reference code
res = train_bench.run_train_bench(("tiny",), device="cpu", batch=1, seq_len=16, steps=1, warmup=1,
                                  variants=("fused",), progress=False)
assert not any("error" in r for r in res["results"]), res

# A CUDA tensor would take a Triton kernel: pretend this CPU tensor is one.
import mmf.kernels as K
from mmf.errors import MMFError
K.use_reference = lambda *tensors, group=None: False
x = torch.randn(1, 8)
try:
    K.mlgru_step(x, x, x, torch.zeros(1, 8), torch.zeros(8), torch.ones(8), 1e-6)
except MMFError as e:
    print("MMFError:", e)
assert sys.modules["triton"] is None and "mmf.kernels.ternary_gemv" not in sys.modules
print("pipeline ok")
"""


def test_cli_pipeline_runs_without_triton(tmp_path):
    """train, generate, pack, generate from the pack, info and the CPU training benchmark with triton not
    installed; a CUDA tensor (simulated) then asks for triton in one MMFError line."""
    blocker = tmp_path / "no_triton"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_TRITON)
    check = run_python("import importlib.util; print(importlib.util.find_spec('triton'))", extra_path=blocker)
    assert check.stdout.strip() == "None", check.stderr  # the blocker works
    r = run_python(f"import sys; sys.argv[1:] = [{str(tmp_path)!r}]\n" + PIPELINE, extra_path=blocker, timeout=600,
                   env={"CUDA_VISIBLE_DEVICES": ""})  # a CPU-only machine, also where CI has a GPU
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "pipeline ok"
    (err,) = [ln for ln in lines if ln.startswith("MMFError:")]
    assert "triton cannot be imported" in err and "pip install triton" in err and "MMF_FORCE_REFERENCE=1" in err
    assert (tmp_path / "packed" / "model.safetensors").is_file()


def test_triton_kernels_loads_the_kernel_modules_when_triton_is_installed():
    """The GPU path: with triton present the dispatcher's helper gives the Triton kernel modules."""
    pytest.importorskip("triton")
    import mmf.kernels as K

    gemv = K.triton_kernels("ternary_gemv")
    assert gemv is sys.modules["mmf.kernels.ternary_gemv"] and callable(gemv.gemv)
    with pytest.raises(ModuleNotFoundError):  # a missing module of ours is not reported as missing triton
        K.triton_kernels("no_such_kernel")
