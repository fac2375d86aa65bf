"""`mmf bench`: memory and latency of the MatMul-free LM against Transformer++, side by side, in one run.

``run_bench(models=("13b",), device="cuda")`` builds, per size, random models of both architectures
directly in their final inference form, times greedy generation of each with the same protocol,
and returns a dict holding every raw figure, the machine, the versions and the protocol.
``bench_command`` is `mmf bench` whole: options checked, outputs probed, the run, the table, the files.

The work is in three modules beside this one:

* ``model_variants``: what is measured: the builders of the variants (``mmf`` packed i2 / tq1,
  ``mmf-onnxruntime`` its ONNX export on ONNX Runtime (CPU only), ``transformer++`` StaticLlama,
  ``hf-llama`` Hugging Face Llama), their byte counts from shapes and the runners that decode with them;
* ``model_bench_protocol``: how: timing of prefill, decode and end to end, peak memory, the read (CPU)
  or copy bandwidth behind the decode floor, the memory-fit check and the k1/k2-layer extrapolation,
  every figure labelled (measured, computed, estimated, extrapolated);
* ``anchor`` (``--llamacpp-python``, CPU): llama.cpp's TQ2_0 kernels on a Llama of the 1.3b shape, run
  in a separate environment, as one more row of the 1.3b size;
* ``model_bench_report``: what is shown and written: the table, the chart, the JSON and PNG files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from mmf.bench import model_bench_report as report
from mmf.bench.model_bench_protocol import (MEMORY_SAFETY, RATIO_PREFIX, available_bytes, copy_bandwidth, machine_info,
                                            protocol_description, ratios_mmf_over_baseline, read_bandwidth,
                                            run_variant)
from mmf.bench.model_variants import ONNX_VARIANT, bench_configs
from mmf.errors import MMFError

SCHEMA_VERSION = 1
BENCH_SIZES = ("370m", "1.3b", "2.7b", "13b")
VARIANTS = ("mmf", ONNX_VARIANT, "transformer++", "hf-llama")  # mmf-onnxruntime: CPU only
ANCHOR_VARIANT = "llama.cpp-tq2_0"
ANCHOR_SIZE = "1.3b"
GPU_DEFAULTS = dict(prompt_len=128, gen_len=128, repeat=5)
CPU_DEFAULTS = dict(prompt_len=8, gen_len=8, repeat=2)
TRAIN_DEFAULTS = dict(seq_len=2048, steps=8)


# ---------------------------------------------------------------------------------------------- the bench
def resolve_sizes(models) -> list:
    if isinstance(models, str):
        models = [models]
    out = []
    for m in models:
        for part in str(m).split(","):
            part = part.strip().lower()
            if part == "all":
                out += [s for s in BENCH_SIZES if s not in out]
            elif part in BENCH_SIZES or part == "tiny":
                if part not in out:
                    out.append(part)
            else:
                raise MMFError(f"unknown model size {part!r}; use one of {', '.join(BENCH_SIZES)}, all (or tiny)")
    return out


def run_bench(models=("370m",), device: str = "auto", batch: int = 1, prompt_len: Optional[int] = None,
              gen_len: Optional[int] = None, dtype: str = "bf16", fmt: str = "i2", repeat: Optional[int] = None,
              variants=VARIANTS, memory_limit: Optional[int] = None, seed: int = 0, progress: bool = True,
              bandwidth_bytes: Optional[int] = None, command: Optional[str] = None,
              on_size_done: Optional[Callable[[dict], None]] = None, llamacpp_python: Optional[str] = None) -> dict:
    """Benchmark both architectures at each size in ``models``; returns every raw figure as a dict.

    ``device``: cuda, cpu or auto (cuda when one is visible). Defaults: on CUDA prompt 128, 128 new
    tokens, 5 repetitions; on CPU prompt 8, 8 new tokens, 2 repetitions (so that 13B stays practical
    on a few cores). ``memory_limit`` (bytes) caps the
    memory the bench believes it may use (to exercise the extrapolation and does-not-fit paths).
    On CPU the run starts with a read-only stream (the decode floor's bandwidth) and adds the ONNX
    Runtime row (``mmf-onnxruntime``, when in ``variants``); ``llamacpp_python``, the interpreter of
    the anchor's separate environment, adds llama.cpp TQ2_0 at 1.3b (``bench/anchor.py``).
    """
    from mmf.checkpoint import parse_dtype

    from mmf.bench import resolve_device

    sizes = resolve_sizes(models)
    device, device_choice = resolve_device(device)
    dev = torch.device(device)
    if dev.index is not None:  # cuda:N: the runners place tensors on "cuda", the current device
        torch.cuda.set_device(dev)
    tdtype = parse_dtype(dtype)
    if tdtype not in (torch.bfloat16, torch.float16):
        raise MMFError(f"--dtype must be bf16 or fp16 for the benchmark, got {dtype}")
    if fmt not in ("i2", "tq1"):
        raise MMFError(f"--format must be i2 or tq1, got {fmt!r}")
    defaults = GPU_DEFAULTS if dev.type == "cuda" else CPU_DEFAULTS
    prompt_len = defaults["prompt_len"] if prompt_len is None else prompt_len
    gen_len = defaults["gen_len"] if gen_len is None else gen_len
    repeat = defaults["repeat"] if repeat is None else repeat
    for name, v, lo in (("--batch-size", batch, 1), ("--prompt-len", prompt_len, 1), ("--max-new-tokens", gen_len, 2),
                        ("--repeat", repeat, 1)):
        if v < lo:
            raise MMFError(f"{name} must be >= {lo}, got {v}")
    variants = list(variants)
    if "hf-llama" in variants:
        try:
            import transformers  # noqa: F401
        except ImportError:
            variants.remove("hf-llama")
    if dev.type != "cpu" and ONNX_VARIANT in variants:  # ONNX Runtime runs on the CPU provider
        variants.remove(ONNX_VARIANT)
    if llamacpp_python is not None:
        _check_anchor(llamacpp_python, dev.type, sizes)
    if dev.type == "cuda":  # on the CPU a model too large is extrapolated or reported, row by row
        check_batch_fits(sizes, batch, prompt_len, gen_len, dev.type, tdtype, fmt, variants, memory_limit)
    device = dev.type
    threads = torch.get_num_threads()

    result = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(device),
        "protocol": {
            "device": device, "device_choice": device_choice, "batch": batch, "prompt_len": prompt_len,
            "gen_len": gen_len, "repeat": repeat, "dtype": dtype, "format": fmt, "seed": seed, "variants": variants,
            "defaults_used": {k: defaults[k] for k in defaults},
            "description": protocol_description(batch, prompt_len, gen_len, repeat,
                                                "read_bandwidth" if device == "cpu" else "copy_bandwidth",
                                                ONNX_VARIANT in variants),
            "memory_limit_bytes": memory_limit,
        },
        "sizes": {},
    }
    if device == "cpu":
        result["protocol"]["threads"] = threads
    if llamacpp_python is not None:
        result["protocol"]["llamacpp_python"] = str(llamacpp_python)
    _preimport(variants, device)  # so that no variant's peak memory holds the first import of a library
    bar = _Progress(progress, total=1 + len(sizes) * len(variants) * (repeat + 1))
    from mmf.kernels.schedule_cache import disabled

    with bar, disabled():  # kernels tuned in this run: its build times do not depend on earlier runs
        floor_bw = None
        if device == "cpu":
            bar.describe("measuring read bandwidth")
            nb = int(min(bandwidth_bytes or 512 * 1024**2, 0.2 * available_bytes(device)))
            result["read_bandwidth"] = read_bandwidth(nb, threads)
            floor_bw = result["read_bandwidth"]["bytes_per_s"]
        bar.describe("measuring copy bandwidth")
        nb = bandwidth_bytes or (2 * 1024**3 if device == "cuda" else 256 * 1024**2)
        nb = int(min(nb, 0.2 * available_bytes(device)))
        bw = copy_bandwidth(device, nb)
        result["copy_bandwidth"] = bw
        basis = "read_bandwidth" if floor_bw else "copy_bandwidth"
        if device == "cpu":
            result["decode_floor_basis"] = basis
            if basis == "copy_bandwidth":
                result["protocol"]["description"] = protocol_description(batch, prompt_len, gen_len, repeat,
                                                                         onnx=ONNX_VARIANT in variants)
        floor_bw = floor_bw or bw["bytes_per_s"]
        bar.advance()
        for size in sizes:
            cfg_m, cfg_l = bench_configs(size)
            gen = torch.Generator().manual_seed(seed)
            prompt = torch.randint(3, cfg_l.vocab_size, (batch, prompt_len), generator=gen).to(device)
            per = {}
            for variant in variants:
                bar.describe(f"{size} {variant}")
                per[variant] = run_variant(variant, size, cfg_m, cfg_l, device, tdtype, fmt, batch, prompt,
                                           gen_len, repeat, floor_bw, memory_limit, seed, bar.advance, basis)
            if llamacpp_python is not None and size == ANCHOR_SIZE:
                bar.describe(f"{size} {ANCHOR_VARIANT}")
                per[ANCHOR_VARIANT] = anchor_variant(llamacpp_python, threads, prompt_len, gen_len, repeat, seed,
                                                     batch)
            entry = {"variants": per, "ratio_mmf_over_transformer++": ratios_mmf_over_baseline(per)}
            for other in (ONNX_VARIANT, ANCHOR_VARIANT):
                if other in per:
                    entry[RATIO_PREFIX + other] = ratios_mmf_over_baseline(per, other)
            entry.update({"config_mmf": dataclasses.asdict(cfg_m), "config_transformer++": dataclasses.asdict(cfg_l)})
            result["sizes"][size] = entry
            if on_size_done is not None:  # e.g. write the JSON so far: a long run that is cut keeps its sizes
                on_size_done(result)
    result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return result


def check_batch_fits(sizes, batch: int, prompt_len: int, gen_len: int, device: str, dtype, fmt: str, variants,
                     memory_limit: Optional[int] = None) -> None:
    """Refuse, before any model is built, a batch (or prompt length) at which no variant of some size would fit
    even at the two layers an extrapolation needs: one line with the memory needed (``estimate_bytes``: weights,
    per-row state or KV cache, logits and activations, from shapes) and the memory available."""
    from mmf.bench.model_variants import estimate_bytes
    from mmf.units import human_bytes

    avail = available_bytes(device)
    if memory_limit is not None:
        avail = min(avail, memory_limit)
    budget = MEMORY_SAFETY * avail
    elt = torch.empty((), dtype=dtype).element_size()
    arch = [v for v in variants if v in ("mmf", "transformer++")]
    for size in sizes:
        cfg_m, cfg_l = bench_configs(size)

        def two_layers(v, b):
            cfg = cfg_m if v == "mmf" else cfg_l
            e = estimate_bytes(v, cfg, cfg.num_hidden_layers, elt, fmt, b, prompt_len + gen_len, prompt_len)
            return e["fixed_bytes"] + e["workspace_bytes"] + 2 * (e["per_layer_bytes"] + e["cache_per_layer_bytes"])

        if not arch or any(two_layers(v, batch) <= budget for v in arch):
            continue
        need = min(two_layers(v, batch) for v in arch)
        fit = next((b for b in range(batch - 1, 0, -1) if any(two_layers(v, b) <= budget for v in arch)), 0)
        how = f"the largest batch that fits is about {fit}" if fit else "give a shorter --prompt-len"
        raise MMFError(f"--batch {batch} at {size} (prompt {prompt_len}, {gen_len} new tokens) needs about "
                       f"{human_bytes(need)} of {device} memory even at 2 layers (weights, per-row state or KV cache, "
                       f"logits and activations, estimated from shapes; {MEMORY_SAFETY:.0%} of the available memory "
                       f"may be used) but {human_bytes(avail)} is available; {how}")


def _check_anchor(python: str, device: str, sizes: list) -> None:
    """``--llamacpp-python``: refused in one line, before anything is measured, where the anchor cannot run."""
    import shutil

    if device != "cpu":
        raise MMFError("--llamacpp-python: the llama.cpp anchor runs on the CPU; add --device cpu or drop it")
    if ANCHOR_SIZE not in sizes:
        raise MMFError(f"--llamacpp-python: the llama.cpp anchor is timed at {ANCHOR_SIZE}; add {ANCHOR_SIZE} to "
                       "--model or drop it")
    if shutil.which(str(python)) is None:
        raise MMFError(f"--llamacpp-python {python}: no such interpreter; create the anchor's environment: python3 -m "
                       "venv /tmp/llamacpp-venv && /tmp/llamacpp-venv/bin/pip install numpy gguf llama-cpp-python "
                       "(bench/llamacpp_anchor.py), or drop the option")


def anchor_variant(python: str, threads: int, prompt_len: int, gen_len: int, repeat: int, seed: int,
                   batch: int) -> dict:
    """llama.cpp TQ2_0 on a Llama of the 1.3b shape (``bench/anchor.py``), as a variant entry of this run: the same
    prompt length, decode steps, repetitions and thread count. Its headline decode time is the wall clock around
    each one-token call and the argmax, as this bench times its own variants; llama.cpp's own counter is kept
    beside it. A failure is the entry's status, not the run's end."""
    from mmf.bench.anchor import run_llamacpp_anchor

    res = {"variant": ANCHOR_VARIANT, "size": ANCHOR_SIZE}
    if batch != 1:
        res.update(status="skipped", label="skipped: the llama.cpp anchor times batch 1 only")
        return res
    try:
        doc = run_llamacpp_anchor(python, threads=[threads], size=ANCHOR_SIZE, prompt_len=prompt_len,
                                  new_tokens=max(1, gen_len - 1), repeat=repeat, prefill_len=prompt_len,
                                  prefill_repeat=repeat, seed=seed)
    except MMFError as e:
        res.update(status="error", label=str(e).splitlines()[0][:300])
        return res
    run = doc["runs"][0]
    wall, own = run["decode_ms_per_token_wall"], run["decode_ms_per_token"]
    label = "measured"
    own_label = "measured by llama.cpp (llama_perf_context: inside llama_decode)"

    def fig(value, unit, lab=label):
        return {"value": value, "unit": unit, "label": lab}

    figures = {
        "weight_bytes": fig(run["llama_model_size_bytes"], "B", "computed (llama.cpp's model size: TQ2_0 weights, "
                                                                 "F16 embedding, F32 norms)"),
        "build_s": fig((doc["gguf"].get("write_s") or 0.0) + run["load_s"], "s"),
        "decode_ms_per_token": fig(wall["median"], "ms"),
        "decode_ms_per_token_min": fig(wall["min"], "ms"),
        "decode_ms_per_token_max": fig(wall["max"], "ms"),
        "decode_ms_per_token_llama_cpp": fig(own["median"], "ms", own_label),
        "decode_tokens_per_s": fig(1e3 / wall["median"], "tok/s"),
    }
    if "prefill_ms" in run:
        pre = run["prefill_ms_wall"]
        figures.update(prefill_ms=fig(pre["median"], "ms"), prefill_ms_min=fig(pre["min"], "ms"),
                       prefill_ms_max=fig(pre["max"], "ms"))
    path = (f"bench/llamacpp_anchor.py in {python}: llama-cpp-python {doc['versions'].get('llama_cpp_python')}, "
            f"{run['llama_model_desc']}, random ternary TQ2_0 Llama of the {ANCHOR_SIZE} shape, {threads} thread"
            f"{'s' if threads != 1 else ''}; decode: wall clock per one-token Llama.eval + argmax")
    res.update(status="measured", label=label, figures=figures,
               raw={"path": path, "path_name": f"TQ2_0, llama.cpp, {threads} thread{'s' if threads != 1 else ''}",
                    "anchor": doc})
    return res


def _preimport(variants, device):
    import importlib

    mods = ["mmf.models", "mmf.llama_static", "mmf.ternary_codes", "mmf.kernels.reference"]
    if device == "cuda":
        mods += ["mmf.decode_graph", "mmf.kernels.ternary_gemv", "mmf.kernels.ternary_gemm", "mmf.kernels.mlgru_step"]
    if ONNX_VARIANT in variants:
        mods += ["onnx", "onnxruntime", "mmf.onnx_runtime", "mmf.converters.onnx_export"]
    if "hf-llama" in variants:
        mods += ["transformers", "transformers.models.llama.modeling_llama"]
    for m in mods:
        try:
            importlib.import_module(m)
        except Exception:  # a missing optional module shows up later, in that variant's status
            pass


class _Progress:
    """A rich progress bar on stderr (or nothing)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total
        self.p = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.p = Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                              TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self.p.__enter__()
            self.task = self.p.add_task("mmf bench", total=self.total)
        return self

    def describe(self, text):
        if self.p:
            self.p.update(self.task, description=text)

    def advance(self):
        if self.p:
            self.p.advance(self.task)

    def __exit__(self, *exc):
        if self.p:
            self.p.update(self.task, completed=self.total)
            self.p.__exit__(*exc)
        return False


# ---------------------------------------------------------------------------------------------- `mmf bench`
def bench_command(models="370m", device="auto", batch_size=None, prompt_len=None, max_new_tokens=None,
                  dtype="bf16", fmt="i2", repeat=None, json_stdout=False, json_out=None, plot=None,
                  no_hf=False, train=False, seq_len=None, steps=None, threads=None, command=None,
                  no_onnx=False, llamacpp_python=None, nproc=None, strategy="ddp") -> dict:
    """``mmf bench`` whole: check the options and that every output can be written (before any
    measurement), run the benchmark, print its table (or, with ``json_stdout``, the JSON document
    instead), then write ``json_out`` (JSON) and ``plot`` (PNG). The table comes first, so that a
    write failing after minutes of measurement loses nothing on screen; such a failure is then one
    MMFError line. Returns the result dict."""
    from mmf.bench import check_output_path
    from mmf.devices import set_threads

    from mmf.bench import model_bench_sweep as sweep

    set_threads(threads)
    batches = sweep.parse_values("--batch-size", batch_size)
    lens = sweep.parse_values("--prompt-len", prompt_len)
    axis = "batch" if batches and len(batches) > 1 else "prompt_len" if lens and len(lens) > 1 else None
    if batches and len(batches) > 1 and lens and len(lens) > 1:
        raise MMFError("--batch-size and --prompt-len are both comma lists: sweep one at a time (the other one "
                       "value)")
    if axis is not None and train:
        raise MMFError(f"{sweep.AXES[axis]} {batch_size if axis == 'batch' else prompt_len}: a comma list sweeps the "
                       "inference benchmark; --train takes one value")
    batch_size = None if batches is None else batches[0]
    prompt_len = None if lens is None else lens[0]
    if nproc is not None or strategy != "ddp":  # training under torchrun: bench/train_scaling.py
        if not train:
            raise MMFError("--nproc and --strategy: for --train only; add --train or drop them")
        from mmf.bench import train_scaling

        return train_scaling.scaling_command(models, nproc or "1", strategy, device, batch_size, seq_len, steps,
                                             json_stdout, json_out, plot, command)
    _check_bench_options(train, plot, prompt_len, max_new_tokens, repeat, no_hf, dtype, fmt, seq_len, steps,
                         no_onnx, llamacpp_python)
    outputs = [(opt, check_output_path(p, opt)) for opt, p in (("--json-out", json_out), ("--plot", plot))
               if p is not None]
    if len(outputs) == 2 and os.path.abspath(outputs[0][1]) == os.path.abspath(outputs[1][1]):
        raise MMFError(f"--json-out and --plot both name {json_out}; give them different files")
    if plot is not None and Path(plot).suffix.lower() != ".png":
        raise MMFError(f"--plot {plot}: the chart is a PNG; name a .png file")
    if llamacpp_python is not None and not train:
        from mmf.bench import resolve_device

        _check_anchor(llamacpp_python, torch.device(resolve_device(device)[0]).type, resolve_sizes(models))
    if axis is not None:
        return _sweep_command(models, axis, batches if axis == "batch" else lens, device, batch_size, prompt_len,
                              max_new_tokens, dtype, fmt, repeat, json_stdout, outputs, command)
    if train:
        from mmf.bench import train_bench

        sizes = resolve_sizes(models if models != "all" else "370m,1.3b")
        res = train_bench.run_train_bench(sizes=tuple(sizes), device=device, batch=batch_size,
                                          seq_len=TRAIN_DEFAULTS["seq_len"] if seq_len is None else seq_len,
                                          steps=TRAIN_DEFAULTS["steps"] if steps is None else steps)
        res["command"] = command
    else:
        variants = [v for v in VARIANTS if not (no_hf and v == "hf-llama") and not (no_onnx and v == ONNX_VARIANT)]
        partial = report.PartialWriter(json_out, plot)
        res = run_bench(models, device=device, batch=1 if batch_size is None else batch_size, prompt_len=prompt_len,
                        gen_len=max_new_tokens, dtype=dtype, fmt=fmt, repeat=repeat, variants=variants,
                        command=command, progress=True, on_size_done=partial, llamacpp_python=llamacpp_python)
    say = (lambda m: print(m, file=sys.stderr)) if json_stdout else print
    if json_stdout:
        print(json.dumps(res, indent=2, default=str))
    elif train:
        train_bench.print_results(res)
    else:
        report.print_results(res)
    report.write_outputs(res, outputs, say, where="JSON" if json_stdout else "table")
    return res


def _sweep_command(models, axis, values, device, batch, prompt_len, max_new_tokens, dtype, fmt, repeat, json_stdout,
                   outputs, command) -> dict:
    """`mmf bench --batch 1,4,16` / `--prompt-len 128,2048`: ``run_bench`` once per value, MatMul-free and
    Transformer++ (``model_bench_sweep``); the sweep table (or JSON), then the files, written after each
    point too (``report.PartialWriter`` and ``report.write_outputs`` with the sweep's chart)."""
    from mmf.bench import model_bench_sweep as sweep

    files = dict(outputs)

    def point(v):
        kw = {"batch": v, "prompt_len": prompt_len} if axis == "batch" else {"batch": batch or 1, "prompt_len": v}
        return run_bench(models, device=device, gen_len=max_new_tokens, dtype=dtype, fmt=fmt, repeat=repeat,
                         variants=sweep.SWEEP_VARIANTS, command=command, progress=True, **kw)

    doc = sweep.run_sweep(models, axis, values, run_point=point, command=command,
                          on_point_done=report.PartialWriter(files.get("--json-out"), files.get("--plot"),
                                                             plot_writer=sweep.write_sweep_plot))
    say = (lambda m: print(m, file=sys.stderr)) if json_stdout else print
    if json_stdout:
        print(json.dumps(doc, indent=2, default=str))
    else:
        sweep.print_sweep(doc)
    report.write_outputs(doc, outputs, say, where="JSON" if json_stdout else "table",
                         plot_writer=sweep.write_sweep_plot)
    return doc


def _check_bench_options(train, plot, prompt_len, max_new_tokens, repeat, no_hf, dtype, fmt, seq_len, steps,
                         no_onnx=False, llamacpp_python=None):
    """Refuse options that the chosen benchmark would ignore."""
    if train:
        given = [name for name, v in (("--plot", plot), ("--prompt-len", prompt_len), ("--max-new-tokens",
                 max_new_tokens), ("--repeat", repeat), ("--no-hf", no_hf or None), ("--no-onnx", no_onnx or None),
                 ("--llamacpp-python", llamacpp_python)) if v is not None]
        if dtype != "bf16":
            given.append("--dtype (training runs bf16 autocast)")
        if fmt != "i2":
            given.append("--format")
        if given:
            raise MMFError(f"{', '.join(given)}: for the inference benchmark only, not --train; drop "
                           f"{'it' if len(given) == 1 else 'them'} or --train")
    else:
        given = [name for name, v in (("--seq-len", seq_len), ("--steps", steps)) if v is not None]
        if given:
            raise MMFError(f"{' and '.join(given)}: for --train only; add --train or drop "
                           f"{'it' if len(given) == 1 else 'them'}")
