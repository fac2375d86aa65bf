"""The GPU measurement scripts that reproduce committed figures (decode_breakdown, decoder_build_time,
generate_graph_check, batched_decode, decode_gemm_chain) are runnable modules: ``--help`` works without a GPU, bad arguments are one line
and exit 2 before any GPU work, and decode_breakdown's variants still apply to the installed kernel; the
offline compile report (kernel_compile_report) runs without one."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mmf.bench import batched_decode, decode_breakdown, decode_gemm_chain, decoder_build_time, generate_graph_check

MODULES = {"decode_breakdown": decode_breakdown, "decoder_build_time": decoder_build_time,
           "generate_graph_check": generate_graph_check, "batched_decode": batched_decode,
           "decode_gemm_chain": decode_gemm_chain}


def test_help_runs_as_a_module():
    p = subprocess.run([sys.executable, "-m", "mmf.bench.decode_breakdown", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: python -m mmf.bench.decode_breakdown")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        MODULES[name].main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m mmf.bench.{name}") and "(default:" in out


@pytest.mark.parametrize("name, argv, words", [
    ("decode_breakdown", ["--variants", "base", "pipe4"], "unknown variant 'pipe4'"),
    ("decode_breakdown", ["--extra", "/nonexistent/tv.py"], "no such file"),
    ("decode_breakdown", ["--sizes", "transformer++-370m"], "MatMul-free presets"),
    ("decode_breakdown", ["--batch", "1,65"], "give batches 1-64"),
    ("decode_breakdown", ["--batch", "4", "--gemm-variants", "base", "nopro"], "--gemm-variants: unknown variant"),
    ("decoder_build_time", ["--model", "99b"], "unknown preset"),
    ("generate_graph_check", ["--max-new-tokens", "0"], "give 1 or more"),
    ("generate_graph_check", ["--models", "99b"], "unknown preset"),
    ("batched_decode", ["--sizes", "99b"], "unknown preset"),
    ("batched_decode", ["--batches", "1,65"], "give batches 1-64"),
    ("batched_decode", ["--variants", "default,split-rows+fast"], "split-rows+fast: unknown"),
    ("decode_gemm_chain", ["--size", "99b"], "unknown preset"),
    ("decode_gemm_chain", ["--size", "transformer++-370m"], "MatMul-free presets"),
    ("decode_gemm_chain", ["--rows", "0,4"], "give batches 1-64"),
    ("decode_gemm_chain", ["--pool", "1"], "a pool of 2 or more"),
])
def test_bad_arguments_are_one_line_and_exit_2(name, argv, words, capsys):
    assert MODULES[name].main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no GPU is visible")
@pytest.mark.parametrize("name", sorted(MODULES))
def test_without_a_gpu_says_so(name, capsys):
    assert MODULES[name].main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("gemm", [False, True])
def test_decode_breakdown_variants_apply_to_the_installed_kernel(gemm):
    """Each variant is a text edit of kernels/ternary_gemv.py (batch 1) or kernels/ternary_gemm.py (batches
    above 1); an edit that no longer matches the kernel would time the unedited kernel under the variant's
    name, so building it must fail instead, and so must a variant only some of whose edits apply. (What the
    batched variants' kernels do: tests/kernels_inference_cases.py.)"""
    from mmf.kernels import ternary_gemm as tg
    from mmf.kernels import ternary_gemv as tv

    real = tg if gemm else tv
    variants = decode_breakdown._Variants(real, {}, gemm=gemm)
    names = decode_breakdown.GEMM_VARIANTS if gemm else decode_breakdown.EDITED_VARIANTS
    sources = {}
    for name in names:
        mod = variants.module(name)  # raises SystemExit where an edit does not apply
        assert callable(mod.gemm if gemm else mod.gemv) and mod is not real
        sources[name] = open(mod.__file__).read()
    assert sources["base"] == variants.src
    assert len(set(sources.values())) == len(sources), "two variants built the same kernel source"
    variants.use("base", {})  # a variant in use, then the installed functions back
    assert (real.gemm is not variants.saved[1]) if gemm else (real.gemv is not variants.saved[0])
    variants.restore()
    assert ((real.quantize, real.gemm) if gemm else (real.gemv,)) == variants.saved
    if gemm:  # noepiload's two edits: the kernel without the second's text must not pass
        variants.src = variants.src.replace("    return sumx, sx, tl.load(SW + seg)\n", "")
        variants.mods.clear()
        with pytest.raises(SystemExit, match="edits do not apply"):
            variants.module("noepiload")
    variants.src = "def gemv(): pass\n"  # a kernel the edits do not fit
    variants.mods.clear()
    with pytest.raises(SystemExit, match="edits do not apply"):
        variants.module("nounpack" if gemm else "nopro")


def test_batched_decode_variants_set_and_restore_the_decoders_choices():
    """A joined variant sets each part's attributes while the decoder is built and restores them after."""
    from mmf.decode_graph import GraphDecoder
    from mmf.kernels import ternary_gemm as tg

    before = (tg.QUANT_SPLIT_MIN_K, tg.QUANT_SPLIT_MAX_ROWS, GraphDecoder.ROW_STATS)
    with batched_decode.variant("split-rows+no-row-stats"):
        assert tg.decode_quant_chunks(64, 1024) is None and GraphDecoder.ROW_STATS == "never"
    assert (tg.QUANT_SPLIT_MIN_K, tg.QUANT_SPLIT_MAX_ROWS, GraphDecoder.ROW_STATS) == before
    with batched_decode.variant("whole-rows"):
        assert tg.decode_quant_chunks(4, 5120) == 1
    assert tg.decode_quant_chunks(4, 5120) is None
    for name, attrs in batched_decode.VARIANTS.items():  # every variant names attributes that exist
        for (where, attr) in attrs:
            mod, _, cls = where.partition(":")
            obj = __import__(mod, fromlist=["_"])
            assert hasattr(getattr(obj, cls) if cls else obj, attr), (name, attr)


def test_kernel_compile_report_compiles_for_a_gpu_that_is_not_here(tmp_path, capsys, monkeypatch):
    """``kernel_compile_report`` compiles the decode GEMM for sm_90a with the installed Triton and reads
    registers and spills from its bundled ptxas, with no GPU: the default kernel and the one whose epilogue
    also leaves row statistics with max|out w|, at the first 16-row schedule with the residual epilogue, and a
    schedule that loads its weights before the wait at the split count of 13b's down projection (no pipeline
    buffers in shared memory, no spills); bad arguments are one line."""
    import json

    from mmf.bench import kernel_compile_report as kcr

    if kcr.ptxas_path() is None:
        pytest.skip("the installed Triton bundles no ptxas")
    out = tmp_path / "r.json"
    assert kcr.main(["--rows", "16", "--max-schedules", "1", "--epilogues", "residual", "--variants",
                     "default,stats-max", "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["default", "stats-max"]
    assert all(0 < r["registers"] <= 255 and r["spill_bytes"] == 0 for r in rows), rows
    assert rows[1]["ptx_instructions"] > rows[0]["ptx_instructions"]
    cases = kcr.early_weight_cases(("13b",))  # 13b: 5 and 3 blocks at d, 14 and 7 at ffn
    assert sorted({split for _, _, split in cases}) == [3, 5, 7, 14]
    monkeypatch.setattr(kcr, "early_weight_cases", lambda: [c for c in cases if c[2] == 14 and c[1] == 1][:1])
    assert kcr.main(["--variants", "default", "--early-weights", "--json-out", str(out)]) == 0
    early = json.loads(out.read_text())["rows"]  # weights before the wait, no K loop: no pipeline buffers
    assert [r["schedule"] for r in early] == ["(4, 64, 256, 4, 1, 0, 0, 1) x14"], early  # the least row tile
    assert all(r["spill_bytes"] == 0 and r["shared_bytes"] <= 32768 for r in early), early
    # the least row tile of 4 (ternary_gemm.DECODE_ROW_TILE_MIN) at 3 rows: fewer instructions than 16 rows'
    assert kcr.main(["--rows", "3", "--row-tile", "4", "--max-schedules", "1", "--epilogues", "residual",
                     "--variants", "default", "--json-out", str(out)]) == 0
    small = json.loads(out.read_text())["rows"]
    assert [r["schedule"] for r in small] == ["(4," + rows[0]["schedule"][len("(16,"):]], (small, rows)
    assert small[0]["ptx_instructions"] < rows[0]["ptx_instructions"] and small[0]["barriers"] > 0, (small, rows)
    capsys.readouterr()
    assert kcr.main(["--variants", "fast"]) == 2
    err = capsys.readouterr().err
    assert "fast: give variants of default" in err and err.count("\n") == 1
