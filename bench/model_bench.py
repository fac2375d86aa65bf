"""`mmf bench`: memory and latency of the MatMul-free LM against Transformer++, side by side, in one run.

``run_bench(models=("13b",), device="cuda")`` builds, per size, random models of both architectures
directly in their final inference form, times greedy generation of each with the same protocol,
and returns a dict holding every raw figure, the machine, the versions and the protocol.
``bench_command`` is `mmf bench` whole: options checked, outputs probed, the run, the table, the files.

The work is in three modules beside this one:

* ``model_variants``: what is measured: the builders of the variants (``mmf`` packed i2 / tq1,
  ``transformer++`` StaticLlama, ``hf-llama`` Hugging Face Llama), their byte counts from shapes and
  the runners that decode with them;
* ``model_bench_protocol``: how: timing of prefill, decode and end to end, peak memory, the copy
  bandwidth behind the decode floor, the memory-fit check and the k1/k2-layer extrapolation, every
  figure labelled (measured, computed, estimated, extrapolated);
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
from mmf.bench.model_bench_protocol import (available_bytes, copy_bandwidth, machine_info, protocol_description,
                                            ratios_mmf_over_baseline, run_variant)
from mmf.bench.model_variants import bench_configs
from mmf.errors import MMFError

SCHEMA_VERSION = 1
BENCH_SIZES = ("370m", "1.3b", "2.7b", "13b")
VARIANTS = ("mmf", "transformer++", "hf-llama")
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
              on_size_done: Optional[Callable[[dict], None]] = None) -> dict:
    """Benchmark both architectures at each size in ``models``; returns every raw figure as a dict.

    ``device``: cuda, cpu or auto (cuda when one is visible). Defaults: on CUDA prompt 128, 128 new
    tokens, 5 repetitions; on CPU prompt 8, 8 new tokens, 2 repetitions (so that 13B stays practical
    on a few cores). ``memory_limit`` (bytes) caps the
    memory the bench believes it may use (to exercise the extrapolation and does-not-fit paths).
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
    device = dev.type

    result = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(device),
        "protocol": {
            "device": device, "device_choice": device_choice, "batch": batch, "prompt_len": prompt_len,
            "gen_len": gen_len, "repeat": repeat, "dtype": dtype, "format": fmt, "seed": seed, "variants": variants,
            "defaults_used": {k: defaults[k] for k in defaults},
            "description": protocol_description(batch, prompt_len, gen_len, repeat),
            "memory_limit_bytes": memory_limit,
        },
        "sizes": {},
    }
    _preimport(variants, device)  # so that no variant's peak memory holds the first import of a library
    bar = _Progress(progress, total=1 + len(sizes) * len(variants) * (repeat + 1))
    from mmf.kernels.schedule_cache import disabled

    with bar, disabled():  # kernels tuned in this run: its build times do not depend on earlier runs
        bar.describe("measuring copy bandwidth")
        nb = bandwidth_bytes or (2 * 1024**3 if device == "cuda" else 256 * 1024**2)
        nb = int(min(nb, 0.2 * available_bytes(device)))
        bw = copy_bandwidth(device, nb)
        result["copy_bandwidth"] = bw
        bar.advance()
        for size in sizes:
            cfg_m, cfg_l = bench_configs(size)
            gen = torch.Generator().manual_seed(seed)
            prompt = torch.randint(3, cfg_l.vocab_size, (batch, prompt_len), generator=gen).to(device)
            per = {}
            for variant in variants:
                bar.describe(f"{size} {variant}")
                per[variant] = run_variant(variant, size, cfg_m, cfg_l, device, tdtype, fmt, batch, prompt,
                                           gen_len, repeat, bw["bytes_per_s"], memory_limit, seed, bar.advance)
            result["sizes"][size] = {"variants": per, "ratio_mmf_over_transformer++": ratios_mmf_over_baseline(per),
                                     "config_mmf": dataclasses.asdict(cfg_m), "config_transformer++":
                                     dataclasses.asdict(cfg_l)}
            if on_size_done is not None:  # e.g. write the JSON so far: a long run that is cut keeps its sizes
                on_size_done(result)
    result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return result


def _preimport(variants, device):
    import importlib

    mods = ["mmf.models", "mmf.llama_static", "mmf.ternary_codes", "mmf.kernels.reference"]
    if device == "cuda":
        mods += ["mmf.decode_graph", "mmf.kernels.ternary_gemv", "mmf.kernels.ternary_gemm", "mmf.kernels.mlgru_step"]
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
                  no_hf=False, train=False, seq_len=None, steps=None, threads=None, command=None) -> dict:
    """``mmf bench`` whole: check the options and that every output can be written (before any
    measurement), run the benchmark, print its table (or, with ``json_stdout``, the JSON document
    instead), then write ``json_out`` (JSON) and ``plot`` (PNG). The table comes first, so that a
    write failing after minutes of measurement loses nothing on screen; such a failure is then one
    MMFError line. Returns the result dict."""
    from mmf.bench import check_output_path
    from mmf.devices import set_threads

    set_threads(threads)
    _check_bench_options(train, plot, prompt_len, max_new_tokens, repeat, no_hf, dtype, fmt, seq_len, steps)
    outputs = [(opt, check_output_path(p, opt)) for opt, p in (("--json-out", json_out), ("--plot", plot))
               if p is not None]
    if len(outputs) == 2 and os.path.abspath(outputs[0][1]) == os.path.abspath(outputs[1][1]):
        raise MMFError(f"--json-out and --plot both name {json_out}; give them different files")
    if plot is not None and Path(plot).suffix.lower() != ".png":
        raise MMFError(f"--plot {plot}: the chart is a PNG; name a .png file")
    if train:
        from mmf.bench import train_bench

        sizes = resolve_sizes(models if models != "all" else "370m,1.3b")
        res = train_bench.run_train_bench(sizes=tuple(sizes), device=device, batch=batch_size,
                                          seq_len=TRAIN_DEFAULTS["seq_len"] if seq_len is None else seq_len,
                                          steps=TRAIN_DEFAULTS["steps"] if steps is None else steps)
        res["command"] = command
    else:
        variants = [v for v in VARIANTS if not (no_hf and v == "hf-llama")]
        partial = report.PartialWriter(json_out, plot)
        res = run_bench(models, device=device, batch=1 if batch_size is None else batch_size, prompt_len=prompt_len,
                        gen_len=max_new_tokens, dtype=dtype, fmt=fmt, repeat=repeat, variants=variants,
                        command=command, progress=True, on_size_done=partial)
    say = (lambda m: print(m, file=sys.stderr)) if json_stdout else print
    if json_stdout:
        print(json.dumps(res, indent=2, default=str))
    elif train:
        train_bench.print_results(res)
    else:
        report.print_results(res)
    report.write_outputs(res, outputs, say, where="JSON" if json_stdout else "table")
    return res


def _check_bench_options(train, plot, prompt_len, max_new_tokens, repeat, no_hf, dtype, fmt, seq_len, steps):
    """Refuse options that the chosen benchmark would ignore."""
    if train:
        given = [name for name, v in (("--plot", plot), ("--prompt-len", prompt_len), ("--max-new-tokens",
                 max_new_tokens), ("--repeat", repeat), ("--no-hf", no_hf or None)) if v is not None]
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
