"""`mmf bench` on CPU with tiny shapes: fields, schema, extrapolation, does-not-fit, the static baseline."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mmf.bench import model_bench as mb
from mmf.bench.anchor import DEFAULT_VENV_PYTHON
from mmf.bench import model_bench_protocol as protocol
from mmf.bench import model_bench_report as report
from mmf.bench import model_variants
from mmf.ternary_codes import pack_i2, unpack_i2, unpack_tq1
from mmf.generate import generate_ids
from mmf.kernels import reference
from mmf.llama_static import StaticLlama

from conftest import small_model

TINY = dict(prompt_len=3, gen_len=3, repeat=1, progress=False, bandwidth_bytes=1 << 20)
CPU_FIGURES = {
    "weight_bytes", "state_bytes_end", "build_s", "prefill_ms", "prefill_ms_min", "prefill_ms_max",
    "decode_ms_per_token", "decode_ms_per_token_min", "decode_ms_per_token_max", "e2e_s", "decode_tokens_per_s",
    "e2e_tokens_per_s", "peak_rss_bytes", "peak_rss_above_start_bytes", "peak_memory_bytes", "bytes_per_decode_token",
    "decode_floor_ms",
}
TABLE_COLUMNS = ["size", "model", "weights", "peak mem", "state", "prefill ms", "decode ms/tok", "floor ms", "e2e s",
                 "tok/s", "build s", "status"]


# --------------------------------------------------------------------------------------- the JSON's shape
# The JSON document of `mmf bench` on a CPU, key by key, as written down from a run of the single-file
# bench/model_bench.py before its split into protocol, variants and report (issue 17 item 2): the
# split, and any later change that is not meant to change the document, keeps it. Values differ run
# to run; the shape does not. `a/{b,c}` stands for `a/b` and `a/c`; `x[]` for the items of a list.
def _expand(pattern: str) -> list[str]:
    i = pattern.find("{")
    if i < 0:
        return [pattern]
    j = pattern.index("}", i)
    return [x for alt in pattern[i + 1:j].split(",") for x in _expand(pattern[:i] + alt + pattern[j + 1:])]


def _paths(*patterns: str, under: str = "") -> set[str]:
    return {under + p for pattern in patterns for p in _expand(pattern)}


def _leaf_paths(x, prefix: str = "") -> set[str]:
    """The path to every value of a JSON document (its shape): `a/b` for a key, `a[]` for a list's items."""
    if isinstance(x, dict) and x:
        return set().union(*(_leaf_paths(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in x.items()))
    if isinstance(x, list) and x:
        return set().union(*(_leaf_paths(v, prefix + "[]") for v in x))
    return {prefix + ("{}" if x == {} else "[]" if x == [] else "")}


DOC_HEAD = _paths(
    "{schema_version,command,started_utc,finished_utc}",
    "machine/{hostname,platform,python,torch,cpu,cpu_cores_logical,cpu_threads_torch,ram_total_bytes,"
    "ram_available_bytes_at_start,load_average_at_start[],triton,transformers,mmf}",
    "protocol/{device,device_choice,batch,prompt_len,gen_len,repeat,dtype,format,seed,variants[],description,"
    "memory_limit_bytes}",
    "protocol/defaults_used/{prompt_len,gen_len,repeat}",
    "copy_bandwidth/{bytes_per_s,buffer_bytes,iters,median_s,label}")
VARIANT_HEAD = _paths("{variant,size,num_layers,status,label,available_bytes,memory_safety}",
                      "memory_estimate/{fixed_bytes,per_layer_bytes,cache_per_layer_bytes,workspace_bytes,total_bytes,"
                      "layers}")
RAW_TIMING = _paths("timing/decode_steps", "timing/{prefill_s,decode_s_per_token,e2e_s}/{median,min,max,values[]}")
RAW_MEASURED = RAW_TIMING | _paths(
    "{layers,path,build_s,setup_s,weight_bytes,state_bytes_end,bytes_per_decode_token,decode_floor_s}",
    "memory/{peak_rss_bytes,rss_before_bytes,peak_rss_above_start_bytes,method}")
RAW_EXTRAPOLATED = RAW_TIMING | _paths(
    "{layers,path,build_s,weight_bytes,weight_label,state_bytes_end,bytes_per_decode_token,decode_floor_s}",
    "memory/{peak_rss_bytes,rss_before_bytes,peak_rss_above_start_bytes,method}")

# Added on purpose by issue 18 items 4-5 (CPU runs; a CUDA document is unchanged): the read bandwidth measured
# at the start (the floor's basis, with the thread count), the short name of each variant's code path (the
# table's model column), the ONNX Runtime row (its memory estimate adds the export's disk bytes, its raw the
# label of its weight bytes) and the mmf ÷ mmf-onnxruntime ratios.
DOC_HEAD_CPU = _paths("read_bandwidth/{bytes_per_s,buffer_bytes,threads,repeats,statistic,isa,label}",
                      "decode_floor_basis", "protocol/threads")
RAW_MEASURED |= {"path_name"}
RAW_EXTRAPOLATED |= {"path_name"}
ONNX = model_variants.ONNX_VARIANT
ONNX_EXTRA = {"memory_estimate/disk_bytes", "raw/weight_label"}


def _figure_paths(names, under="figures/", keys="{value,unit,label}") -> set[str]:
    return {p for n in names for p in _paths(f"{n}/{keys}", under=under)}


def variant_shape(variant: str, status: str = "measured") -> set[str]:
    """The paths of one variant's entry on a CPU: the Transformer++ static cache adds what it allocated."""
    if status in ("does_not_fit", "skipped"):
        return VARIANT_HEAD | ({"memory_estimate/disk_bytes"} if variant == ONNX else set())
    static = variant == "transformer++"
    allocated = {"state_bytes_allocated"} if static else set()
    shape = VARIANT_HEAD | _figure_paths(CPU_FIGURES | allocated)
    if status == "measured":
        return shape | {"raw/" + p for p in RAW_MEASURED | allocated} | (ONNX_EXTRA if variant == ONNX else set())
    partial = {f"partial/{k}/{p}" for k in ("1", "2") for p in RAW_MEASURED | allocated}
    return shape | {"needs_bytes"} | partial | {"raw/" + p for p in RAW_EXTRAPOLATED | allocated}


def document_shape(variants, statuses=None) -> set[str]:
    """The paths of a whole CPU document at size tiny, every variant measured (or as ``statuses`` says), the
    configs left out."""
    statuses = statuses or {}
    size = "sizes/tiny/"
    shape = DOC_HEAD | DOC_HEAD_CPU
    shape |= _figure_paths(CPU_FIGURES, under=size + "ratio_mmf_over_transformer++/", keys="{value,label}")
    if ONNX in variants:
        measured = statuses.get(ONNX, "measured") == "measured"
        shape |= _figure_paths(CPU_FIGURES, under=size + f"ratio_mmf_over_{ONNX}/", keys="{value,label}") \
            if measured else {size + f"ratio_mmf_over_{ONNX}{{}}"}
    return shape | {f"{size}variants/{v}/{p}" for v in variants for p in variant_shape(v, statuses.get(v, "measured"))}


def onnx_status() -> str:
    """What the ONNX Runtime row is on this machine: measured, or skipped without onnxruntime (the test extra)."""
    import importlib.util

    return "measured" if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx") else "skipped"


def shape_of(doc: dict) -> set[str]:
    """``_leaf_paths`` of a document, less the two config dicts, which must be the presets' configs whole."""
    import dataclasses

    for size, s in doc["sizes"].items():
        cfg_m, cfg_l = model_variants.bench_configs(size)
        assert s["config_mmf"] == json.loads(json.dumps(dataclasses.asdict(cfg_m)))
        assert s["config_transformer++"] == json.loads(json.dumps(dataclasses.asdict(cfg_l)))
    return {p for p in _leaf_paths(doc) if "/config_" not in p}


# --------------------------------------------------------------------------------------- static baseline
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_static_llama_greedy_equals_eager(kv_heads):
    model = small_model("transformer++", num_key_value_heads=kv_heads)
    dec = StaticLlama.from_model(model).setup(batch=1, max_len=40)
    prompt = torch.randint(3, 259, (1, 9), generator=torch.Generator().manual_seed(kv_heads))
    got = dec.generate(prompt, 16)[0].tolist()
    want = generate_ids(model, prompt[0].tolist(), 16, temperature=0)
    assert got == want
    out = model(prompt)  # prefill logits agree with the eager forward
    dec.reset()
    dec.prefill(prompt)
    assert torch.allclose(dec.logits, out.logits[:, -1].float(), rtol=1e-4, atol=1e-5)
    assert dec.cache_bytes_used() == dec.kv_bytes_per_position() * 9 > 0


def test_static_llama_batch_rows_independent():
    model = small_model("transformer++")
    dec = StaticLlama.from_model(model).setup(batch=2, max_len=20)
    prompt = torch.randint(3, 259, (2, 5), generator=torch.Generator().manual_seed(3))
    got = dec.generate(prompt, 6)
    for b in range(2):
        assert got[b].tolist() == generate_ids(model, prompt[b].tolist(), 6, temperature=0)


def test_static_llama_random_is_built_in_dtype():
    cfg = model_variants.bench_configs("tiny")[1]
    dec = StaticLlama.random(cfg, "cpu", torch.bfloat16, num_layers=2)
    assert dec.num_layers == 2 and dec.embed.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for layer in dec.layers for t in layer.values())
    d, m = cfg.hidden_size, cfg.ffn_size
    assert dec.weight_bytes() == 2 * (2 * cfg.vocab_size * d + d + 2 * (2 * d + 4 * d * d + 3 * d * m))
    dec.setup(1, 8)
    assert dec.generate(torch.tensor([[5, 6, 7]]), 4).shape == (1, 4)


# --------------------------------------------------------------------------------------- CPU ternary path
@pytest.mark.parametrize("n,k,shape,dtype", [(37, 29, (1, 1, 29), torch.float32), (64, 64, (2, 3, 64), torch.bfloat16),
                                             (100, 130, (1, 9, 130), torch.float16), (513, 256, (1, 256), torch.float32)])
def test_bitlinear_i2_lut_equals_frozen(n, k, shape, dtype):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
    x = torch.randn(*shape, generator=g).to(dtype)
    nw = torch.rand(k, generator=g) + 0.5
    s_w = torch.tensor(37.3)
    got = reference.bitlinear_i2_lut(x, nw, pack_i2(codes), k, s_w, row_chunk=50)
    assert torch.equal(got, reference.bitlinear_frozen(x, nw, codes, s_w))


# --------------------------------------------------------------------------------------- builders
def test_random_packed_holds_valid_uniform_codes():
    g = torch.Generator().manual_seed(0)
    for k in (64, 30):  # 30: row padding goes through pack_i2
        codes = unpack_i2(model_variants.random_packed(200, k, "i2", "cpu", g), k)
        assert set(codes.unique().tolist()) == {-1, 0, 1}
        assert abs((codes == 0).float().mean().item() - 1 / 3) < 0.03
    codes = unpack_tq1(model_variants.random_packed(200, 65, "tq1", "cpu", g), 65)
    assert set(codes.unique().tolist()) == {-1, 0, 1}


@pytest.mark.parametrize("fmt", ["i2", "tq1"])
def test_build_mmf_random_is_packed_final_form(fmt):
    from mmf.memory import module_bytes
    from mmf.models import BitLinear, FrozenBitLinear

    cfg = model_variants.bench_configs("tiny")[0]
    model = model_variants.build_mmf_random(cfg, "cpu", torch.bfloat16, fmt)
    assert not any(isinstance(m, BitLinear) for m in model.modules())
    frozen = [m for m in model.modules() if isinstance(m, FrozenBitLinear)]
    assert len(frozen) == 6 * cfg.num_hidden_layers + 1
    g = 4 if fmt == "i2" else 5
    for m in frozen:
        assert m.packed.dtype == torch.uint8 and m.packed.shape == (m.out_features, -(-m.in_features // g))
        assert m.weight_scale.dtype == torch.float32
    big_float = [n for n, p in model.named_parameters() if p.dim() == 2 and "embeddings" not in n and
                 "lower_bounds" not in n]
    assert big_float == []
    est = model_variants.estimate_bytes("mmf", cfg, cfg.num_hidden_layers, 2, fmt, 1, 8, 4)
    assert est["fixed_bytes"] + cfg.num_hidden_layers * est["per_layer_bytes"] == module_bytes(model)
    out = model(torch.tensor([[5, 6, 7]]))
    assert out.logits.shape == (1, 3, cfg.vocab_size) and torch.isfinite(out.logits).all()


def test_mmf_runner_decodes_like_the_model():
    """The runner's prefill + steps give the model's own greedy tokens."""
    cfg = model_variants.bench_configs("tiny")[0]
    model = model_variants.build_mmf_random(cfg, "cpu", torch.float32, "i2", num_layers=2)
    prompt = torch.randint(3, 259, (1, 5), generator=torch.Generator().manual_seed(1))
    r = model_variants.MMFRunner(model, "cpu").setup(1, 12)
    r.prefill(prompt)
    got = [int(r.tok)]
    for _ in range(4):
        r.step()
        got.append(int(r.tok))
    assert got == generate_ids(model, prompt[0].tolist(), 5, temperature=0)


# --------------------------------------------------------------------------------------- the bench
def _check_figures(figs: dict, expected: set):
    assert set(figs) == expected
    for name, f in figs.items():
        assert set(f) == {"value", "unit", "label"}, name
        assert isinstance(f["value"], (int, float)) and f["value"] > 0, (name, f)
        assert f["label"], name


@pytest.fixture(scope="module")
def tiny_result():
    """One tiny CPU run of every variant, shared by the tests that only read it."""
    return mb.run_bench(["tiny"], device="cpu", **TINY)


def test_run_bench_tiny_every_field(tmp_path, tiny_result):
    res = json.loads(json.dumps(tiny_result))  # JSON-serialisable as it stands
    assert res["schema_version"] == mb.SCHEMA_VERSION
    assert {"command", "started_utc", "finished_utc", "machine", "protocol", "copy_bandwidth", "sizes"} <= set(res)
    for key in ("torch", "python", "cpu", "ram_total_bytes", "mmf"):
        assert res["machine"][key]
    assert res["protocol"]["prompt_len"] == 3 and res["protocol"]["gen_len"] == 3 and res["protocol"]["batch"] == 1
    assert res["copy_bandwidth"]["bytes_per_s"] > 0
    s = res["sizes"]["tiny"]
    assert list(s["variants"]) == list(res["protocol"]["variants"])
    assert {"mmf", ONNX, "transformer++"} <= set(s["variants"])
    for name, v in s["variants"].items():
        if name == ONNX and onnx_status() == "skipped":
            assert v["status"] == "skipped" and v["label"].startswith("skipped: onnxruntime is not installed")
            continue
        assert v["status"] == "measured" and v["label"] == "measured", (name, v["label"])
        _check_figures(v["figures"], CPU_FIGURES | ({"state_bytes_allocated"} if name == "transformer++" else set()))
        raw = v["raw"]
        assert raw["path"] and raw["timing"]["decode_steps"] == 2
        assert len(raw["timing"]["decode_s_per_token"]["values"]) == 1
    # state at the end: mmf holds L x d fp32 per sequence, the static cache the written positions
    cfg_m, cfg_l = model_variants.bench_configs("tiny")
    mmf_state = s["variants"]["mmf"]["figures"]["state_bytes_end"]["value"]
    assert mmf_state == cfg_m.num_hidden_layers * cfg_m.hidden_size * 4
    kv = s["variants"]["transformer++"]["figures"]["state_bytes_end"]["value"]
    assert kv == 2 * cfg_l.num_hidden_layers * cfg_l.hidden_size * 2 * (3 + 2)  # prompt 3 + 2 decode steps
    ratios = s["ratio_mmf_over_transformer++"]
    assert ratios["weight_bytes"]["value"] < 0.5 and ratios["weight_bytes"]["label"] == "measured"
    rows = report.table_rows(res)
    ratio_rows = 1 + (onnx_status() == "measured")
    assert len(rows) == len(s["variants"]) + ratio_rows and len({tuple(r) for r in rows}) == 1
    png = tmp_path / "b.png"
    report.write_plot(res, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_run_names_its_path_and_floors_on_read_bandwidth(tiny_result):
    """On CPU the MatMul-free row runs the plain FrozenBitLinear through kernels.bitlinear_i2 (the native kernel
    where it is built) and the table names it, with the thread count; the floor is bytes per token over the read
    bandwidth measured at the start (with the same threads), labelled estimated."""
    from mmf import kernels
    from mmf.kernels import cpu_ternary

    res = tiny_result
    threads = res["protocol"]["threads"]
    assert threads == res["machine"]["cpu_threads_torch"] >= 1
    mmf_row = res["sizes"]["tiny"]["variants"]["mmf"]
    want = model_variants.cpu_ternary_path("i2", threads)
    native = cpu_ternary.available() and not kernels._FORCE_REFERENCE
    name = f"{want['name']}, one call per step" if native else want["name"]  # the whole-step decode names itself
    assert mmf_row["raw"]["path_name"] == name and mmf_row["raw"]["path"].startswith(want["detail"])
    if native:
        assert want["name"] == f"i2, native {cpu_ternary.isa()}, {threads} thread{'s' if threads != 1 else ''}"
        assert "mmf_hgrn_step" in mmf_row["raw"]["path"]
    rows = report.table_rows(res)
    assert rows[0]["model"] == f"mmf ({name})"
    rb = res["read_bandwidth"]
    if cpu_ternary.available():
        assert rb["label"] == "measured" and rb["bytes_per_s"] > 0 and rb["threads"] == threads
        assert res["decode_floor_basis"] == "read_bandwidth"
        bw, what = rb["bytes_per_s"], "read"
        assert f"read bandwidth {rb['bytes_per_s'] / 1e9:.1f} GB/s (measured, {threads} thread" in \
            report.table_title(res)
    else:
        assert rb["bytes_per_s"] is None and rb["label"].startswith("not measured")
        bw, what = res["copy_bandwidth"]["bytes_per_s"], "copy"
    raw, floor = mmf_row["raw"], mmf_row["figures"]["decode_floor_ms"]
    assert raw["decode_floor_s"] == raw["bytes_per_decode_token"] / bw
    assert floor["label"].startswith(f"estimated (bytes per token / {what} bandwidth") and "(e)" in rows[0]["floor ms"]
    assert f"/ {what} bandwidth" in res["protocol"]["description"]


def test_onnx_runtime_row_decodes_the_same_weights():
    """The ONNX Runtime row exports the mmf row's random weights (same seed) and decodes them through
    OnnxCausalLM with mmf generate --onnx's settings: its greedy tokens are the torch model's."""
    pytest.importorskip("onnxruntime")
    cfg_m, cfg_l = model_variants.bench_configs("tiny")
    prompt = torch.randint(3, 259, (1, 4), generator=torch.Generator().manual_seed(2))
    runners = [model_variants.build_runner(v, cfg_m, cfg_l, "cpu", torch.float32, "i2", 2, 0) for v in ("mmf", ONNX)]
    tokens = []
    for r in runners:
        r.setup(1, 12)
        r.prefill(prompt)
        got = [int(r.tok)]
        for _ in range(4):
            r.step()
            got.append(int(r.tok))
        tokens.append(got)
    onnx = runners[1]
    assert tokens[0] == tokens[1]
    assert onnx.lm.sessions.keys() == {"prefill", "decode"} and onnx.threads == torch.get_num_threads()
    assert onnx.path_name.startswith("ONNX Runtime ") and onnx.weight_bytes() > 0
    folder = onnx.tmp.name
    onnx.close()
    assert not os.path.exists(folder)


def test_onnx_runtime_row_is_skipped_with_the_reason(monkeypatch):
    """Without onnxruntime, or where its load would not fit, the row says so instead of being measured."""
    import importlib.util

    cfg_m = model_variants.bench_configs("370m")[0]
    est = model_variants.estimate_bytes(ONNX, cfg_m, cfg_m.num_hidden_layers, 2, "i2", 1, 16, 8)
    assert est["total_bytes"] > model_variants.ORT_LOAD_PEAK_BYTES_PER_WEIGHT * model_variants.ternary_weights(cfg_m)
    why = protocol.onnx_skip_reason(est, budget=est["total_bytes"] / 2, avail=int(est["total_bytes"] / 1.7))
    assert why.startswith(f"skipped: needs {protocol.human_bytes(est['total_bytes'])} (estimated")
    res = mb.run_bench(["tiny"], device="cpu", variants=(ONNX,), memory_limit=1_000_000, **TINY)
    v = res["sizes"]["tiny"]["variants"][ONNX]
    assert v["status"] == "skipped" and v["label"].startswith("skipped: needs ") and "figures" not in v
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else
                        find_spec(name, *a))
    res = mb.run_bench(["tiny"], device="cpu", variants=("mmf", ONNX), **TINY)
    v = res["sizes"]["tiny"]["variants"][ONNX]
    assert v["label"] == ("skipped: onnxruntime is not installed (pip install onnxruntime onnx; mmf's test extra "
                          "has them)")
    assert _leaf_paths(json.loads(json.dumps(v))) == variant_shape(ONNX, "skipped")
    rows = report.table_rows(res)
    assert rows[1]["model"] == ONNX and rows[1]["status"] == v["label"] and len(rows) == 2  # no ratio row


def test_bench_document_and_table_keep_their_shape(tiny_result, capsys):
    """The JSON document has exactly the keys it had before the split of bench/model_bench.py (see
    DOC_HEAD), and the table the same columns and rows, whatever the figures."""
    res = json.loads(json.dumps(tiny_result))
    variants = res["protocol"]["variants"]
    with_hf = res["machine"]["transformers"] is not None
    assert variants == ["mmf", ONNX, "transformer++"] + (["hf-llama"] if with_hf else [])
    assert shape_of(res) == document_shape(variants, {ONNX: onnx_status()})
    rows = report.table_rows(res)
    assert [list(r) for r in rows] == [TABLE_COLUMNS] * len(rows)
    named = [report.model_cell(v, res["sizes"]["tiny"]["variants"][v]) for v in variants]
    assert all(n.startswith(f"{v} (") for n, v in zip(named, variants) if v != ONNX or onnx_status() == "measured")
    ratios = ["mmf ÷ transformer++"] + ([f"mmf ÷ {ONNX}"] if onnx_status() == "measured" else [])
    assert [r["model"] for r in rows] == named + ratios and {r["size"] for r in rows} == {"tiny"}
    report.print_results(res)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == report.table_title(res)
    assert lines[0].startswith("mmf bench: cpu, batch 1, prompt 3, 3 new tokens")
    assert lines[1].split() == " ".join(TABLE_COLUMNS).split()
    assert lines[3 + len(rows)] == "paths:" and lines[-1].startswith("protocol: Random weights")


def test_plot_bars_are_linear_and_labelled(tiny_result):
    """Each panel's bars stand on a linear axis from 0 and carry their values (a log axis with bars
    from the bottom made a 3.9x gap look like 30x)."""
    import matplotlib.pyplot as plt

    res = tiny_result
    variants = [v for v, x in res["sizes"]["tiny"]["variants"].items() if "figures" in x]
    fig = report.plot_figure(res)
    try:
        for ax in fig.axes:
            assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
            heights = [b.get_height() for b in ax.patches]
            assert len(heights) == len(variants) and max(heights) < ax.get_ylim()[1]
        figs = {v: res["sizes"]["tiny"]["variants"][v]["figures"] for v in variants}
        mem = [t.get_text() for t in fig.axes[0].texts]
        assert mem == [f"{figs[v]['peak_memory_bytes']['value'] / 1e6:.3g}" for v in figs]  # tiny: in MB
        assert fig.axes[0].get_title() == "peak memory (MB)"
        assert [t.get_text() for t in fig.axes[1].texts] == [report._ms(figs[v]["decode_ms_per_token"]["value"])
                                                            for v in figs]
    finally:
        plt.close(fig)


def test_hf_runner_uses_the_cache_argument_of_this_transformers():
    """The Hugging Face baseline passes its cache under the name this transformers takes (`cache`
    since 5.25, `past_key_values` before): no FutureWarning on every bench, and the cache grows."""
    pytest.importorskip("transformers")
    cfg = model_variants.bench_configs("tiny")[1]
    model = model_variants.build_hf_llama_random(cfg, "cpu", torch.float32, num_layers=2)
    r = model_variants.HFRunner(model, "cpu").setup(1, 8)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r.prefill(torch.tensor([[5, 6, 7]]))
        after_prefill = r.state_bytes()
        r.step()
    assert not [w for w in seen if issubclass(w.category, FutureWarning)], [str(w.message) for w in seen]
    assert 0 < after_prefill < r.state_bytes()


def test_run_bench_extrapolates_when_the_model_does_not_fit():
    cfg_m, cfg_l = model_variants.bench_configs("tiny")
    est = model_variants.estimate_bytes("transformer++", cfg_l, 2, 2, "i2", 1, 6, 3)
    limit = int(est["total_bytes"] / protocol.MEMORY_SAFETY) + 1000  # room for 2 of the 4 layers, not 4
    res = mb.run_bench(["tiny"], device="cpu", variants=("transformer++",), memory_limit=limit, **TINY)
    v = res["sizes"]["tiny"]["variants"]["transformer++"]
    assert v["status"] == "extrapolated" and v["label"].startswith("extrapolated from 1,2/4 layers")
    assert set(v["partial"]) == {"1", "2"}
    assert v["partial"]["2"]["weight_bytes"] > v["partial"]["1"]["weight_bytes"]
    figs = v["figures"]
    assert figs["decode_ms_per_token"]["label"] == v["label"]
    assert figs["weight_bytes"]["label"] == "computed from shapes"
    full = model_variants.estimate_bytes("transformer++", cfg_l, 4, 2, "i2", 1, 6, 3)
    assert figs["weight_bytes"]["value"] == full["fixed_bytes"] + 4 * full["per_layer_bytes"]
    assert figs["state_bytes_end"]["value"] == 2 * 4 * cfg_l.hidden_size * 2 * 5  # exact: linear in layers
    assert all(f["value"] > 0 for f in figs.values())
    assert "(x)" in report.table_rows(res)[0]["decode ms/tok"]
    assert _leaf_paths(json.loads(json.dumps(v))) == variant_shape("transformer++", "extrapolated")
    assert list(report.table_rows(res)[0]) == TABLE_COLUMNS


def test_an_extrapolation_whose_larger_run_was_not_slower_is_labelled_unreliable(monkeypatch):
    """A noisy machine can time the k2-layer model no slower than the k1-layer one; the fit then says nothing
    about L layers, and the label says so (13b Transformer++ once came out below its own bandwidth floor)."""
    cfg_m, cfg_l = model_variants.bench_configs("tiny")
    est = model_variants.estimate_bytes("transformer++", cfg_l, 2, 2, "i2", 1, 6, 3)
    limit = int(est["total_bytes"] / protocol.MEMORY_SAFETY) + 1000
    measure, runs = protocol.measure_variant, []

    def flat(*a, **kw):  # the second (larger) run gets the first run's decode timing
        r = measure(*a, **kw)
        runs.append(r)
        if len(runs) == 2:
            r["timing"]["decode_s_per_token"] = runs[0]["timing"]["decode_s_per_token"]
        return r

    monkeypatch.setattr(protocol, "measure_variant", flat)
    res = mb.run_bench(["tiny"], device="cpu", variants=("transformer++",), memory_limit=limit, **TINY)
    v = res["sizes"]["tiny"]["variants"]["transformer++"]
    assert v["status"] == "extrapolated" and "UNRELIABLE" in v["label"]
    # decode was made flat; on a loaded machine the prefill can come out no slower as well, and the label says so
    assert re.search(r"2-layer (prefill and )?decode was not slower", v["label"]), v["label"]
    assert v["figures"]["decode_ms_per_token"]["label"] == v["label"]


def test_run_bench_does_not_fit_says_so():
    res = mb.run_bench(["tiny"], device="cpu", variants=("mmf", "transformer++"), memory_limit=100_000, **TINY)
    for v in res["sizes"]["tiny"]["variants"].values():
        assert v["status"] == "does_not_fit" and "figures" not in v
        assert v["label"].startswith("does not fit: needs ") and "available" in v["label"]
        assert v["memory_estimate"]["total_bytes"] > v["available_bytes"] == 100_000
    assert res["sizes"]["tiny"]["ratio_mmf_over_transformer++"] == {}
    rows = report.table_rows(res)
    assert rows[0]["status"].startswith("does not fit")
    for name, v in res["sizes"]["tiny"]["variants"].items():
        assert _leaf_paths(json.loads(json.dumps(v))) == variant_shape(name, "does_not_fit")
    assert [list(r) for r in rows] == [["size", "model", "status"]] * 2


def test_bad_arguments_are_one_line_errors():
    from mmf.errors import MMFError

    with pytest.raises(MMFError, match="unknown model size"):
        mb.run_bench(["7b"], device="cpu")
    with pytest.raises(MMFError, match="--max-new-tokens"):
        mb.run_bench(["tiny"], device="cpu", gen_len=1)
    with pytest.raises(MMFError, match="--device 'tpu' is not a device mmf runs on"):
        mb.run_bench(["tiny"], device="tpu")
    with pytest.raises(MMFError, match="--format"):
        mb.run_bench(["tiny"], device="cpu", fmt="q4")
    assert mb.resolve_sizes("all") == list(mb.BENCH_SIZES)
    assert mb.resolve_sizes("13b,370m") == ["13b", "370m"]


def _mmf(monkeypatch, capsys, *args):
    """Run `mmf ARGS` in this process through the real entry point (error lines, exit codes);
    the bench's copy-bandwidth probe is shrunk to 1 MiB to keep the test fast."""
    from mmf.cli.main import main

    copy_bandwidth, read_bandwidth = mb.copy_bandwidth, mb.read_bandwidth
    monkeypatch.setattr(mb, "copy_bandwidth", lambda device, nbytes, iters=10: copy_bandwidth(device, 1 << 20, 2))
    monkeypatch.setattr(mb, "read_bandwidth", lambda nbytes, threads: read_bandwidth(1 << 20, threads, 1))
    monkeypatch.setattr(sys, "argv", ["mmf", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    return e.value.code or 0, out, err


TINY_CLI = ("bench", "--model", "tiny", "--prompt-len", "2", "--repeat", "1", "--no-hf")


def test_cli_bench_json_flag_json_out_png_and_device_auto(tmp_path, monkeypatch, capsys):
    """`--json` prints the JSON document on stdout instead of the table (the "wrote" lines go to
    stderr); `--json-out` writes the same document, creating a missing folder; `--plot` a PNG, creating a
    missing folder too (it failed after the whole benchmark, "No such file or directory"); no temporary file
    is left. `--device` defaults to auto, which takes the CPU when no CUDA device is
    visible and says so. Old spellings `--gen-len` and `--batch` still work."""
    from mmf.bench import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    js, png = tmp_path / "new" / "r.json", tmp_path / "charts" / "sub" / "r.png"
    code, out, err = _mmf(monkeypatch, capsys, *TINY_CLI, "--gen-len", "2", "--batch", "1", "--json",
                          "--json-out", js, "--plot", png)
    assert code == 0, err
    assert "warning" not in err and "error" not in err, err  # the chart written after the size did not fail either
    data = json.loads(out)  # stdout is the document alone
    assert json.loads(js.read_text()) == data
    assert f"wrote {js}" in err and f"wrote {png}" in err
    assert isinstance(data["command"], str)
    assert list(data["sizes"]["tiny"]["variants"]) == ["mmf", ONNX, "transformer++"]
    # `mmf bench`'s document keeps its shape
    assert shape_of(data) == document_shape(["mmf", ONNX, "transformer++"], {ONNX: onnx_status()})
    p = data["protocol"]
    assert p["gen_len"] == 2 and p["batch"] == 1
    assert p["device"] == "cpu" and p["device_choice"] == "--device auto: no CUDA device is visible"
    assert report.table_title(data).startswith("mmf bench: cpu (--device auto: no CUDA device is visible), batch 1")
    assert resolve_device("auto")[0] == "cpu"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["r.json", "r.png"]


@pytest.mark.parametrize("args,message", [
    (["--json-out", "{tmp}"], "--json-out {tmp} is a directory"),
    (["--plot", "{tmp}/notes.txt/r.png"], "--plot {tmp}/notes.txt/r.png: {tmp}/notes.txt is a file, not a directory"),
    (["--plot", "{tmp}/r.txt"], "--plot {tmp}/r.txt: the chart is a PNG; name a .png file"),
    (["--json-out", "{tmp}/r.png", "--plot", "{tmp}/r.png"], "--json-out and --plot both name"),
    (["--train", "--plot", "{tmp}/r.png"], "--plot: for the inference benchmark only, not --train"),
    (["--train", "--repeat", "2"], "--repeat: for the inference benchmark only"),
    (["--steps", "3"], "--steps: for --train only; add --train or drop it"),
])
def test_cli_bench_refuses_bad_outputs_before_measuring(tmp_path, monkeypatch, capsys, args, message):
    """An output that cannot be written (or an option the benchmark would ignore) is refused in one
    line, exit 2, before anything is measured."""
    from mmf.bench import train_bench

    def measured(*a, **k):
        raise AssertionError("measured before the outputs were checked")

    monkeypatch.setattr(mb, "run_bench", measured)
    monkeypatch.setattr(train_bench, "run_train_bench", measured)
    (tmp_path / "notes.txt").write_text("x")
    code, out, err = _mmf(monkeypatch, capsys, "bench", "--model", "tiny", "--device", "cpu",
                          *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and out == ""
    assert err.startswith("mmf: error: " + message.format(tmp=tmp_path)) and err.count("\n") == 1, err
    assert (tmp_path / "notes.txt").read_text() == "x" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_check_output_path_probes_the_folder(tmp_path):
    from mmf.bench import check_output_path
    from mmf.errors import MMFError

    assert check_output_path(tmp_path / "a" / "b" / "r.json", "--json-out") == tmp_path / "a" / "b" / "r.json"
    assert os.listdir(tmp_path) == []  # probed where write_json would start; nothing created or left
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root: modes do not bind; sysfs refuses new files even to root
        ro = Path("/sys")
    try:
        with pytest.raises(MMFError, match=f"--plot {ro}/r.png: (cannot write in {ro} |{ro} is not writable)"):
            check_output_path(ro / "r.png", "--plot")
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_cli_bench_late_write_failure_keeps_the_table(tmp_path, monkeypatch, capsys):
    """A write that fails after measuring (disk full, a broken chart) comes after the table: the
    figures are on screen, the failure is one line, exit non-zero; the JSON written after each size
    is still there."""
    import mmf.bench as bench_pkg

    write_json = bench_pkg.write_json

    def full_disk_at_the_end(path, data, **kw):
        if "finished_utc" in data:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_json(path, data, **kw)

    def broken_plot(result, path):
        raise RuntimeError("no renderer")

    monkeypatch.setattr(bench_pkg, "write_json", full_disk_at_the_end)
    monkeypatch.setattr(report, "write_plot", broken_plot)
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    code, out, err = _mmf(monkeypatch, capsys, *TINY_CLI, "--device", "cpu", "--max-new-tokens", "2",
                          "--json-out", js, "--plot", png)
    assert code == 2
    assert "mmf ÷ transformer++" in out and "paths:" in out and "wrote" not in out  # the table, first
    errors = [line for line in err.splitlines() if line.startswith("mmf: error:")]
    assert errors == [f"mmf: error: could not write --json-out {js}: No space left on device; could not write "
                      f"--plot {png}: RuntimeError: no renderer (the figures are in the table above)"]
    assert f"mmf: warning: could not write --plot {png} (RuntimeError: no renderer); measuring goes on" in err
    assert "internal error" not in err and "Traceback" not in err
    partial = json.loads(js.read_text())  # written after the size, before the end
    assert set(partial["sizes"]) == {"tiny"} and "finished_utc" not in partial
    assert not png.exists()


def test_cli_bench_train_calls_the_training_benchmark(tmp_path, monkeypatch):
    """`mmf bench --train` hands its options to bench/train_bench.run_train_bench and writes its result."""
    from typer.testing import CliRunner

    from mmf.bench import train_bench
    from mmf.cli.main import app

    seen = {}

    def fake(sizes, device, batch, seq_len, steps, **kw):
        seen.update(sizes=sizes, device=device, batch=batch, seq_len=seq_len, steps=steps)
        return {"env": {}, "results": [{"size": sizes[0], "variant": "fused", "batch": batch, "step_s": 0.5}],
                "ratios": {}}

    monkeypatch.setattr(train_bench, "run_train_bench", fake)
    js = tmp_path / "t.json"
    r = CliRunner().invoke(app, ["bench", "--train", "--model", "370m", "--device", "cpu", "--batch", "2",
                                 "--seq-len", "64", "--steps", "3", "--json-out", str(js), "--json"])
    assert r.exit_code == 0, r.output
    assert seen == dict(sizes=("370m",), device="cpu", batch=2, seq_len=64, steps=3)
    assert json.loads(js.read_text())["results"][0]["step_s"] == 0.5
    assert json.loads(r.stdout) == json.loads(js.read_text())  # --json: the document instead of the table


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_static_llama_cuda_graph_greedy_equals_eager(kv_heads):
    """On a GPU: the CUDA-graph decode of StaticLlama gives the eager model's greedy tokens (fp32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = small_model("transformer++", num_key_value_heads=kv_heads).cuda()
    dec = StaticLlama.from_model(model).setup(batch=1, max_len=64)
    assert dec.graph is not None
    prompt = torch.randint(3, 259, (1, 11), generator=torch.Generator().manual_seed(kv_heads))
    got = dec.generate(prompt.cuda(), 32)[0].tolist()
    want = generate_ids(model, prompt[0].tolist(), 32, temperature=0, device="cuda")
    assert got == want
    again = dec.generate(prompt.cuda(), 32)[0].tolist()  # replays from a reset state
    assert again == want


def test_reference_ops_select_one_operator_group(monkeypatch):
    """`reference_ops` / MMF_REFERENCE_OPS send one operator group to the torch reference (the
    training benchmark's unfused-BitLinear baseline); other groups keep their kernels; a bad name is
    one clear error that lists the valid ones."""
    from types import SimpleNamespace

    from mmf import kernels
    from mmf.errors import MMFError

    gpu = SimpleNamespace(is_cuda=True)  # stands in for a CUDA tensor: only .is_cuda is read
    prev = kernels.reference_ops({"bitlinear"})
    try:
        assert kernels.use_reference(gpu, group="bitlinear")
        assert not kernels.use_reference(gpu, group="mlgru") and not kernels.use_reference(gpu, group="norm")
        assert not kernels.use_reference(gpu)
    finally:
        kernels.reference_ops(prev)
    assert not kernels.use_reference(gpu, group="bitlinear")
    monkeypatch.setenv("MMF_REFERENCE_OPS", "mlgru")
    assert kernels.use_reference(gpu, group="mlgru") and not kernels.use_reference(gpu, group="bitlinear")
    monkeypatch.setenv("MMF_REFERENCE_OPS", "bitlinear,attention")
    with pytest.raises(MMFError, match="attention.*valid: bitlinear, norm, mlgru"):
        kernels.use_reference(gpu, group="bitlinear")
    with pytest.raises(MMFError, match="valid"):
        kernels.reference_ops({"matmul"})


def test_train_bench_variants_and_ratios_on_cpu(capsys):
    """Every training-benchmark variant runs (tiny model, CPU: all of them take the reference, so their
    first losses agree exactly) and the ratios name both unfused baselines; the run says, in the JSON
    and under the table, that on CPU it is a dry run whose fused/unfused ratios measure nothing."""
    from mmf.bench import train_bench

    res = train_bench.run_train_bench(("tiny",), device="cpu", batch=2, seq_len=16, steps=1, warmup=1,
                                      progress=False)
    assert res["dry_run"] is True and "same plain-torch reference" in res["dry_run_note"]
    assert res["env"]["device_type"] == "cpu" and res["env"]["device_choice"] == "--device cpu"
    train_bench.print_results(res)
    lines = capsys.readouterr().out.splitlines()
    note = lines.index("note: " + res["dry_run_note"])
    assert any("unfused-bitlinear" in line for line in lines[:note])  # under the table
    assert lines[note + 1].startswith("tiny {")  # the ratios follow it
    rows = {r["variant"]: r for r in res["results"]}
    assert set(rows) == set(train_bench.VARIANTS) and not any("error" in r for r in rows.values())
    losses = {rows[v]["loss_step0"] for v in ("fused", "unfused-bitlinear", "unfused")}
    assert len(losses) == 1 and math.isfinite(losses.pop())
    r = res["ratios"]["tiny"]
    for base in ("unfused-bitlinear", "unfused"):
        sfx = base.replace("-", "_")
        assert r[f"batch_compared_{sfx}"] == 2 and r[f"loss_step0_rel_diff_fused_vs_{sfx}"] == 0
        # the same arithmetic on CPU, so only the definition is checked, not a speed-up
        assert r[f"step_time_reduction_vs_{sfx}"] == round(1 - rows["fused"]["step_s"] / rows[base]["step_s"], 4)
    assert r["tokens_per_s_fused_over_transformer++"] > 0


def test_generate_graph_path_gives_the_eager_tokens():
    """generate_ids(graph=True) drives the static decoder (here StaticLlama, eager on the CPU) with the
    eager path's sampling: same greedy tokens, and with a seed the same sampled ones."""
    model = small_model("transformer++", num_key_value_heads=2)
    prompt = torch.randint(3, 259, (11,), generator=torch.Generator().manual_seed(5)).tolist()
    assert generate_ids(model, prompt, 12, graph=True) == generate_ids(model, prompt, 12)
    kw = dict(temperature=0.9, top_k=50, seed=3)
    assert generate_ids(model, prompt, 12, graph=True, **kw) == generate_ids(model, prompt, 12, **kw)



# --------------------------------------------------------------------------------------- llama.cpp anchor
def _anchor_doc(threads: int, new_tokens: int, prompt_len: int) -> dict:
    """A document of bench/llamacpp_anchor.py's shape (as it wrote one for its `test` shape), one run."""
    stats = lambda m: {"median": m, "min": 0.9 * m, "max": 1.2 * m, "n": new_tokens}  # noqa: E731
    return {"schema_version": 1, "kind": "llamacpp_tq2_0_anchor", "versions": {"llama_cpp_python": "0.3.36"},
            "gguf": {"bytes": 753984, "write_s": 0.03, "ternary_weights": 1835008, "ternary_bytes": 473088},
            "runs": [{"threads": threads, "load_s": 0.005, "decode_ms_per_token": stats(0.13),
                      "decode_ms_per_token_wall": stats(0.16), "decode_tokens_per_s": 1e3 / 0.13,
                      "llama_model_desc": "llama ?B TQ2_0 - 2.06 bpw ternary", "llama_model_size_bytes": 740352,
                      "prefill_len": prompt_len, "prefill_ms": stats(0.25), "prefill_ms_wall": stats(0.28)}]}


def test_llamacpp_anchor_is_a_row_of_the_run(monkeypatch):
    """--llamacpp-python runs bench/anchor.py at the run's thread count, prompt, decode steps and repetitions, and
    its llama.cpp TQ2_0 timing becomes a row of the anchor's size, with the mmf ÷ llama.cpp ratios; a failing
    anchor is that row's status, not the run's end."""
    from mmf.bench import anchor

    calls = []

    def fake(python, threads, size, prompt_len, new_tokens, repeat, prefill_len, prefill_repeat, seed, **kw):
        calls.append(dict(python=python, threads=threads, size=size, prompt_len=prompt_len, new_tokens=new_tokens,
                          repeat=repeat, prefill_len=prefill_len, prefill_repeat=prefill_repeat))
        return _anchor_doc(threads[0], new_tokens, prompt_len)

    monkeypatch.setattr(mb, "ANCHOR_SIZE", "tiny")  # the anchor's size is 1.3b; tiny keeps the test fast
    monkeypatch.setattr(anchor, "run_llamacpp_anchor", fake)
    res = mb.run_bench(["tiny"], device="cpu", variants=("mmf",), llamacpp_python=sys.executable, **TINY)
    threads = torch.get_num_threads()
    assert calls == [dict(python=sys.executable, threads=[threads], size="tiny", prompt_len=3, new_tokens=2, repeat=1,
                          prefill_len=3, prefill_repeat=1)]
    assert res["protocol"]["llamacpp_python"] == sys.executable
    s = res["sizes"]["tiny"]
    row = s["variants"][mb.ANCHOR_VARIANT]
    assert row["status"] == "measured" and row["raw"]["anchor"]["runs"][0]["threads"] == threads
    f = row["figures"]
    assert f["decode_ms_per_token"]["value"] == 0.16 and f["decode_ms_per_token_llama_cpp"]["value"] == 0.13
    assert f["prefill_ms"]["value"] == 0.28 and f["weight_bytes"]["value"] == 740352
    ratio = s[f"ratio_mmf_over_{mb.ANCHOR_VARIANT}"]["decode_ms_per_token"]["value"]
    assert ratio == s["variants"]["mmf"]["figures"]["decode_ms_per_token"]["value"] / 0.16
    rows = report.table_rows(res)
    assert [r["model"] for r in rows][1:] == [f"{mb.ANCHOR_VARIANT} (TQ2_0, llama.cpp, {threads} thread"
                                              f"{'s' if threads != 1 else ''})", f"mmf ÷ {mb.ANCHOR_VARIANT}"]
    assert rows[1]["peak mem"] == "-" and rows[1]["decode ms/tok"].startswith("0.160 [0.144-0.192]")

    def broken(*a, **kw):
        raise anchor.AnchorError("llama.cpp anchor (x): llama_cpp is not installed")

    monkeypatch.setattr(anchor, "run_llamacpp_anchor", broken)
    res = mb.run_bench(["tiny"], device="cpu", variants=("mmf",), llamacpp_python=sys.executable, **TINY)
    row = res["sizes"]["tiny"]["variants"][mb.ANCHOR_VARIANT]
    assert row["status"] == "error" and row["label"] == "llama.cpp anchor (x): llama_cpp is not installed"


@pytest.mark.skipif(not os.access(DEFAULT_VENV_PYTHON, os.X_OK),
                    reason=f"the anchor's separate environment ({DEFAULT_VENV_PYTHON}) is not there")
def test_llamacpp_anchor_runs_for_real_where_its_environment_is(monkeypatch):
    """With the anchor's environment present: the real script, at its small `test` shape, gives a measured row."""
    from mmf.bench import anchor

    run = anchor.run_llamacpp_anchor
    monkeypatch.setattr(mb, "ANCHOR_SIZE", "tiny")
    monkeypatch.setattr(anchor, "run_llamacpp_anchor", lambda python, **kw: run(python, **{**kw, "size": "test"}))
    res = mb.run_bench(["tiny"], device="cpu", variants=("mmf",), llamacpp_python=DEFAULT_VENV_PYTHON, **TINY)
    row = res["sizes"]["tiny"]["variants"][mb.ANCHOR_VARIANT]
    assert row["status"] == "measured", row["label"]
    assert row["figures"]["decode_ms_per_token"]["value"] > 0 and "TQ2_0" in row["raw"]["path"]


@pytest.mark.parametrize("args,message", [
    (["--model", "370m", "--llamacpp-python", sys.executable], "--llamacpp-python: the llama.cpp anchor is timed at "
                                                               "1.3b; add 1.3b to --model or drop it"),
    (["--model", "1.3b", "--llamacpp-python", "/no/such/python"], "--llamacpp-python /no/such/python: no such "
                                                                  "interpreter; create the anchor's environment"),
    (["--train", "--llamacpp-python", sys.executable], "--llamacpp-python: for the inference benchmark only"),
    (["--train", "--no-onnx"], "--no-onnx: for the inference benchmark only"),
])
def test_cli_bench_refuses_a_misplaced_anchor_before_measuring(monkeypatch, capsys, args, message):
    from mmf.bench import train_bench

    def measured(*a, **k):
        raise AssertionError("measured before the options were checked")

    monkeypatch.setattr(mb, "run_bench", measured)
    monkeypatch.setattr(train_bench, "run_train_bench", measured)
    code, out, err = _mmf(monkeypatch, capsys, "bench", "--device", "cpu", *args)
    assert code == 2 and out == ""
    assert err.startswith("mmf: error: " + message) and err.count("\n") == 1, err


# --------------------------------------------------------------------------------------- sweeps (issue 19)
def test_cli_bench_batch_and_prompt_len_sweeps(tmp_path, monkeypatch, capsys):
    """`--batch 1,2` runs the benchmark once per batch for MatMul-free and Transformer++: a sweep document whose
    points are single-run documents of the usual shape, a table row per (size, batch, variant) with the floor,
    a PNG. (Next test: `--prompt-len 2,3` the same over prompt lengths; two lists at once, or a list with
    --train, is one line.)"""
    from mmf.bench import model_bench_sweep as sweep

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    js, png = tmp_path / "s.json", tmp_path / "s.png"
    base = ("bench", "--model", "tiny", "--max-new-tokens", "2", "--repeat", "1")
    code, out, err = _mmf(monkeypatch, capsys, *base, "--prompt-len", "2", "--batch", "1,2", "--json-out", js,
                          "--plot", png)
    assert code == 0, err
    doc = json.loads(js.read_text())
    assert doc["kind"] == "sweep" and doc["sweep"] == {"axis": "batch", "values": [1, 2]}
    assert [p["protocol"]["batch"] for p in doc["points"]] == [1, 2]
    for p in doc["points"]:
        assert list(p["sizes"]["tiny"]["variants"]) == list(sweep.SWEEP_VARIANTS)
        assert shape_of(p) == document_shape(list(sweep.SWEEP_VARIANTS))
    rows = sweep.sweep_rows(doc)
    assert [(r["batch"], r["model"]) for r in rows] == [(1, "mmf"), (1, "transformer++"), (2, "mmf"),
                                                        (2, "transformer++")]
    for r, (p, v) in zip(rows, [(p, v) for p in doc["points"] for v in sweep.SWEEP_VARIANTS]):
        f = p["sizes"]["tiny"]["variants"][v]["figures"]
        assert r["floor ms"] == f"{f['decode_floor_ms']['value']:.3f}"
        assert r["tok/s"] == f"{p['protocol']['batch'] * 1e3 / f['decode_ms_per_token']['value']:.1f}"
    assert out.splitlines()[0].startswith("mmf bench sweep over --batch 1,2: cpu, prompt 2")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_prompt_len_sweep_and_bad_lists(monkeypatch, capsys):
    from mmf.bench import model_bench_sweep as sweep

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ("bench", "--model", "tiny", "--max-new-tokens", "2", "--repeat", "1")
    code, out, err = _mmf(monkeypatch, capsys, *base, "--prompt-len", "2,3", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["sweep"] == {"axis": "prompt_len", "values": [2, 3]}
    assert [p["protocol"]["prompt_len"] for p in doc["points"]] == [2, 3]
    assert [r["prompt len"] for r in sweep.sweep_rows(doc)] == [2, 2, 3, 3]
    for args, message in ((("--batch", "1,2", "--prompt-len", "2,3"), "both comma lists"),
                          (("--batch", "1,x"), "--batch-size 1,x: give a whole number or a comma list"),
                          (("--batch", "2,2"), "2 is given twice"),
                          (("--train", "--batch", "1,2"), "--train takes one value")):
        code, out, err = _mmf(monkeypatch, capsys, "bench", "--model", "tiny", *args)
        assert code == 2 and out == "" and message in err and err.count("\n") == 1, err


def test_batch_beyond_memory_is_refused_before_building(monkeypatch):
    """On a GPU a batch at which neither architecture fits even at two layers is refused before any model is
    built, in one line with the memory needed and available (checked here on the CPU with a made-up amount
    of available memory); at a batch that fits nothing is said."""
    from mmf.errors import MMFError

    cfg_m, cfg_l = model_variants.bench_configs("tiny")
    two = {}
    for v, cfg in (("mmf", cfg_m), ("transformer++", cfg_l)):
        e = model_variants.estimate_bytes(v, cfg, cfg.num_hidden_layers, 2, "i2", 8, 6, 4)
        two[v] = e["fixed_bytes"] + e["workspace_bytes"] + 2 * (e["per_layer_bytes"] + e["cache_per_layer_bytes"])
    avail = int(min(two.values()) / protocol.MEMORY_SAFETY) - 1  # batch 8 just misses
    monkeypatch.setattr(mb, "available_bytes", lambda device: avail)
    args = (["tiny"], 8, 4, 2, "cuda", torch.bfloat16, "i2", ["mmf", "transformer++"])
    with pytest.raises(MMFError) as e:
        mb.check_batch_fits(*args)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--batch 8 at tiny (prompt 4, 2 new tokens) needs about ")
    from mmf.units import human_bytes

    assert human_bytes(min(two.values())) in msg and f"but {human_bytes(avail)} is available" in msg
    assert "the largest batch that fits is about 7" in msg
    mb.check_batch_fits(["tiny"], 7, 4, 2, "cuda", torch.bfloat16, "i2", ["mmf", "transformer++"])
