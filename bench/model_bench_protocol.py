"""How `mmf bench` measures: one protocol for every variant (``model_variants``), every figure labelled.

Protocol (the paper's: batch 1): random token prompt of ``prompt_len``, greedy decoding of
``gen_len`` tokens (one prefill that yields the first token, then ``gen_len - 1`` decode steps);
one untimed warm-up, then ``repeat`` timed repetitions (``time_generation``); medians and min/max
over repetitions. Peak memory covers the build and generation of one variant alone (``MemoryMeter``).
The decode floor is the bytes a decode step must move over a bandwidth measured at the start of
the run: on CPU the read bandwidth of a read-only stream at the run's thread count
(``read_bandwidth``: a decode step reads its weights and writes almost nothing), on CUDA, or on a
CPU without the native kernel, the device's copy bandwidth (``copy_bandwidth``).

Each figure carries a label: ``measured``, ``computed`` (counted from tensor shapes), ``estimated``
(derived from measured figures, e.g. the bandwidth floor) or ``extrapolated from k1,k2/L layers``
(``run_variant``: a model whose estimated bytes do not fit the machine is measured at k1 and k2
layers and fitted linearly in the number of layers; one where even two layers do not fit is
reported as ``does_not_fit``).
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional

import torch

from mmf.bench.model_variants import ONNX_VARIANT, Runner, build_runner, estimate_bytes
from mmf.units import human_bytes, plural

BASELINE = "transformer++"
MEMORY_SAFETY = 0.85  # build only if the estimate is below this share of the available memory


# ---------------------------------------------------------------------------------------------- protocol
FLOOR_BASES = {  # how the decode floor's bandwidth was measured, by the result's ``decode_floor_basis``
    "copy_bandwidth": "copy bandwidth (read + write) measured at the start of this run",
    "read_bandwidth": "read bandwidth (a read-only stream over a buffer larger than the caches, at this run's "
                      "thread count) measured at the start of this run",
}


def protocol_description(batch: int, prompt_len: int, gen_len: int, repeat: int,
                         floor_basis: str = "copy_bandwidth", onnx: bool = False) -> str:
    """The protocol in one paragraph, for the JSON document and under the table."""
    return (f"Random weights (same shapes as the presets), batch {batch}, a random prompt of {prompt_len} tokens, "
            f"greedy generation of {gen_len} tokens: one prefill (yields the first token) then "
            f"{plural(gen_len - 1, 'decode step')}. One untimed warm-up, then {plural(repeat, 'timed repetition')}; "
            "figures are medians "
            "(min and max kept). Host timer with a device synchronisation after prefill and after the last "
            "decode step only. Peak memory covers build and generation of that variant alone. "
            "Decode floor = bytes a decode step must read and write (all weights but the embedding table, "
            "one embedding row per sequence, the recurrent state or the KV cache"
            + ("; for ONNX Runtime its int8 weights as folded at load" if onnx else "")
            + f") / {FLOOR_BASES[floor_basis]}.")


# ---------------------------------------------------------------------------------------------- machine
def machine_info(device: str) -> dict:
    import psutil

    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_threads_torch": torch.get_num_threads(),
        "ram_total_bytes": psutil.virtual_memory().total,
        "ram_available_bytes_at_start": psutil.virtual_memory().available,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    from mmf import __version__ as mmf_version

    info["mmf"] = mmf_version
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_bytes=p.total_memory, gpu_sm_count=p.multi_processor_count,
                    cuda=torch.version.cuda)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def copy_bandwidth(device: str, nbytes: int = 2 * 1024**3, iters: int = 10) -> dict:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (bytes/s), median of ``iters``."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    del src, dst
    return {"bytes_per_s": 2 * n * 4 / t, "buffer_bytes": n * 4, "iters": iters, "median_s": t,
            "label": "measured"}


def read_bandwidth(nbytes: int = 512 * 1024**2, threads: Optional[int] = None, repeats: int = 3) -> dict:
    """CPU read bandwidth (bytes/s): the best of ``repeats`` read-only passes of the native kernel's stream
    (``kernels.cpu_ternary.read_bandwidth``) over a fresh ``nbytes`` buffer, at ``threads`` (None: torch's
    count). Without the native kernel: ``bytes_per_s`` None and a label saying why."""
    from mmf.kernels import cpu_ternary

    threads = torch.get_num_threads() if threads is None else threads
    if not cpu_ternary.available():
        return {"bytes_per_s": None, "label": "not measured: the native CPU kernel is unavailable "
                f"({cpu_ternary.info()['reason']}); the floor uses the copy bandwidth"}
    gbps = cpu_ternary.read_bandwidth(int(nbytes), threads=threads, repeats=repeats)
    return {"bytes_per_s": gbps * 1e9, "buffer_bytes": int(nbytes), "threads": threads, "repeats": repeats,
            "statistic": "best", "isa": cpu_ternary.isa(), "label": "measured"}


# ---------------------------------------------------------------------------------------------- memory
def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _read_hwm() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class MemoryMeter:
    """Peak memory of one phase. CUDA: ``max_memory_allocated``/``reserved`` after a reset.
    CPU: the process's peak RSS (VmHWM, reset through /proc/self/clear_refs; else a 5 ms sampler)."""

    def __init__(self, device: str):
        self.device = torch.device(device)

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base_alloc = torch.cuda.memory_allocated()
        else:
            _malloc_trim()
            self.base_rss = _rss()
            self.method = "VmHWM"
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                if _read_hwm() is None:
                    raise OSError
            except OSError:
                self._start_sampler()
        return self

    def _start_sampler(self):
        import threading

        self.method = "rss sampled every 5 ms"
        self.sampled_peak = self.base_rss
        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(0.005):
                self.sampled_peak = max(self.sampled_peak, _rss())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def read(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return {"peak_allocated_bytes": torch.cuda.max_memory_allocated() - self.base_alloc,
                    "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
                    "allocated_before_bytes": self.base_alloc}
        if self.method == "VmHWM":
            peak = _read_hwm()
        else:
            peak = max(self.sampled_peak, _rss())
        return {"peak_rss_bytes": peak, "rss_before_bytes": self.base_rss,
                "peak_rss_above_start_bytes": max(0, peak - self.base_rss), "method": self.method}

    def __exit__(self, *exc):
        if getattr(self, "_thread", None) is not None:
            self._stop.set()
            self._thread.join()
        return False


def available_bytes(device: str) -> int:
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0]
    import psutil

    _malloc_trim()
    return psutil.virtual_memory().available


# ---------------------------------------------------------------------------------------------- timing
def _stats(xs: list) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "values": list(xs)}


@torch.no_grad()
def time_generation(runner: Runner, prompt: torch.Tensor, gen_len: int, repeat: int, device,
                    warmup_steps: int = 2, tick: Callable[[], None] = lambda: None) -> dict:
    """One untimed warm-up, then ``repeat`` × (prefill + ``gen_len - 1`` decode steps), host-timed
    with a device synchronisation at each boundary (no synchronisation between decode steps)."""
    steps = max(gen_len - 1, 0)
    runner.reset()
    runner.prefill(prompt)
    for _ in range(min(warmup_steps, steps)):
        runner.step()
    _sync(device)
    pre, dec, e2e = [], [], []
    for _ in range(repeat):
        runner.reset()
        _sync(device)
        t0 = time.perf_counter()
        runner.prefill(prompt)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(steps):
            runner.step()
        _sync(device)
        t2 = time.perf_counter()
        pre.append(t1 - t0)
        dec.append((t2 - t1) / steps if steps else float("nan"))
        e2e.append(t2 - t0)
        tick()
    return {"prefill_s": _stats(pre), "decode_s_per_token": _stats(dec), "e2e_s": _stats(e2e),
            "decode_steps": steps}


# ---------------------------------------------------------------------------------------------- one variant
def _fig(value, unit: str, label: str) -> dict:
    return {"value": value, "unit": unit, "label": label}


def measure_variant(variant, cfg_m, cfg_l, device, dtype, fmt, layers, batch, prompt, gen_len, repeat,
                    bandwidth, seed=0, tick=lambda: None) -> dict:
    """Build ``variant`` with ``layers`` layers, set it up, time it; every figure measured."""
    dev = torch.device(device)
    with MemoryMeter(device) as meter:
        _sync(device)
        t0 = time.perf_counter()
        runner = build_runner(variant, cfg_m, cfg_l, device, dtype, fmt, layers, seed)
        _sync(device)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        runner.setup(batch, prompt.shape[1] + gen_len)
        _sync(device)
        setup_s = time.perf_counter() - t0
        tick()
        timing = time_generation(runner, prompt, gen_len, repeat, device, tick=tick)
        mem = meter.read()
    out = {
        "layers": layers, "path": runner.path, "path_name": runner.path_name, "build_s": build_s, "setup_s": setup_s,
        "timing": timing, "memory": mem, "weight_bytes": runner.weight_bytes(), "state_bytes_end": runner.state_bytes(),
        "bytes_per_decode_token": runner.bytes_per_decode_token(prompt.shape[1], gen_len),
    }
    if hasattr(runner, "state_bytes_allocated"):
        out["state_bytes_allocated"] = runner.state_bytes_allocated()
    if variant == ONNX_VARIANT:
        out["weight_label"] = "computed: the export's weight file (2-bit); ONNX Runtime holds int8 once folded"
    if bandwidth:
        out["decode_floor_s"] = out["bytes_per_decode_token"] / bandwidth
    runner.close()
    del runner
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    else:
        _malloc_trim()
    return out


def _headline(raw: dict, label: str, batch: int, gen_len: int, device: str, bandwidth,
              floor_basis: str = "copy_bandwidth") -> dict:
    """The labelled figures of one variant from its raw measurement (or extrapolation)."""
    t = raw["timing"]
    dec = t["decode_s_per_token"]["median"]
    e2e = t["e2e_s"]["median"]
    f = {
        "weight_bytes": _fig(raw["weight_bytes"], "B", raw.get("weight_label", label)),
        "state_bytes_end": _fig(raw["state_bytes_end"], "B", label),
        "build_s": _fig(raw["build_s"], "s", raw.get("build_label", label)),
        "prefill_ms": _fig(1e3 * t["prefill_s"]["median"], "ms", label),
        "prefill_ms_min": _fig(1e3 * t["prefill_s"]["min"], "ms", label),
        "prefill_ms_max": _fig(1e3 * t["prefill_s"]["max"], "ms", label),
        "decode_ms_per_token": _fig(1e3 * dec, "ms", label),
        "decode_ms_per_token_min": _fig(1e3 * t["decode_s_per_token"]["min"], "ms", label),
        "decode_ms_per_token_max": _fig(1e3 * t["decode_s_per_token"]["max"], "ms", label),
        "e2e_s": _fig(e2e, "s", label),
        "decode_tokens_per_s": _fig(batch / dec, "tok/s", label),
        "e2e_tokens_per_s": _fig(batch * gen_len / e2e, "tok/s", label),
    }
    mem = raw["memory"]
    if device == "cuda":
        f["peak_allocated_bytes"] = _fig(mem["peak_allocated_bytes"], "B", label)
        f["peak_reserved_bytes"] = _fig(mem["peak_reserved_bytes"], "B", label)
        f["peak_memory_bytes"] = f["peak_allocated_bytes"]
    else:
        f["peak_rss_bytes"] = _fig(mem["peak_rss_bytes"], "B", label)
        f["peak_rss_above_start_bytes"] = _fig(mem["peak_rss_above_start_bytes"], "B", label)
        f["peak_memory_bytes"] = f["peak_rss_above_start_bytes"]
    if "state_bytes_allocated" in raw:
        f["state_bytes_allocated"] = _fig(raw["state_bytes_allocated"], "B", label)
    if bandwidth:
        f["bytes_per_decode_token"] = _fig(raw["bytes_per_decode_token"], "B", "computed" if label == "measured"
                                           else label)
        what = "read" if floor_basis == "read_bandwidth" else "copy"
        f["decode_floor_ms"] = _fig(1e3 * raw["decode_floor_s"], "ms",
                                    f"estimated (bytes per token / {what} bandwidth measured in this run)" +
                                    ("; on CPU not a lower bound: read-only streams beat a copy"
                                     if device == "cpu" and what == "copy" else ""))
    return f


def _extrapolate(a: dict, b: dict, L: int) -> dict:
    """Linear fit in the number of layers through measurements ``a`` (k1 layers) and ``b`` (k2 layers)."""
    k1, k2 = a["layers"], b["layers"]

    def lin(x1, x2):  # a layer costs >= 0: a negative slope (noise between the two runs) counts as 0
        return x2 + (L - k2) * max(0.0, (x2 - x1) / (k2 - k1))

    def walk(x1, x2):
        if isinstance(x2, dict):
            return {k: walk(x1[k], x2[k]) for k in x2 if k in x1}
        if isinstance(x2, list) and x2 and isinstance(x2[0], (int, float)):
            return [lin(u, v) for u, v in zip(sorted(x1), sorted(x2))]
        if isinstance(x2, (int, float)) and not isinstance(x2, bool):
            return lin(x1, x2)
        return x2

    keys = ("timing", "memory", "weight_bytes", "state_bytes_end", "bytes_per_decode_token", "decode_floor_s",
            "state_bytes_allocated", "build_s")
    out = {k: walk(a[k], b[k]) for k in keys if k in a and k in b}
    for m in ("prefill_s", "decode_s_per_token", "e2e_s"):
        st = out["timing"][m]
        st["median"] = lin(a["timing"][m]["median"], b["timing"][m]["median"])
        st["min"], st["max"] = min(st["values"]), max(st["values"])  # of the extrapolated repetitions
    out["timing"]["decode_steps"] = b["timing"]["decode_steps"]
    out["layers"] = L
    out["path"] = b["path"]
    if "path_name" in b:
        out["path_name"] = b["path_name"]
    mem = out["memory"]
    for k in ("rss_before_bytes", "allocated_before_bytes", "method"):
        if k in b["memory"]:
            mem[k] = b["memory"][k]
    if "peak_rss_bytes" in mem:
        mem["peak_rss_bytes"] = mem["peak_rss_above_start_bytes"] + b["memory"]["rss_before_bytes"]
    return out


def refit(result: dict) -> dict:
    """Recompute every extrapolated variant of a saved result from its stored partial measurements."""
    dev = result["protocol"]["device"]
    basis = result.get("decode_floor_basis", "copy_bandwidth")
    bw = result[basis]["bytes_per_s"]
    batch, gen_len = result["protocol"]["batch"], result["protocol"]["gen_len"]
    for s in result["sizes"].values():
        for v in s["variants"].values():
            if v.get("status") != "extrapolated":
                continue
            (k1, a), (k2, b) = sorted(v["partial"].items(), key=lambda kv: int(kv[0]))
            raw = _extrapolate(a, b, v["num_layers"])
            raw["weight_bytes"], raw["weight_label"] = v["raw"]["weight_bytes"], v["raw"].get("weight_label")
            v["raw"] = raw
            v["figures"] = _headline(raw, v["label"], batch, gen_len, dev, bw, basis)
        for key in [k for k in s if k.startswith(RATIO_PREFIX)]:
            s[key] = ratios_mmf_over_baseline(s["variants"], key[len(RATIO_PREFIX):])
    return result


def onnx_skip_reason(est: dict, budget: float, avail: int) -> Optional[str]:
    """Why the ONNX Runtime row is not measured, or None: onnxruntime missing, or the export (memory while
    ONNX Runtime folds it, or its files in the temporary folder) would not fit."""
    import importlib.util
    import shutil
    import tempfile

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return "skipped: onnxruntime is not installed (pip install onnxruntime onnx; mmf's test extra has them)"
    if est["total_bytes"] > budget:
        return (f"skipped: needs {human_bytes(est['total_bytes'])} (estimated: ONNX Runtime folds the 2-bit weights "
                f"at load), {human_bytes(avail)} available")
    tmp = tempfile.gettempdir()
    free = shutil.disk_usage(tmp).free
    if est["disk_bytes"] > 0.9 * free:
        return f"skipped: the export needs {human_bytes(est['disk_bytes'])} of disk in {tmp}, {human_bytes(free)} free"
    return None


def run_variant(variant, size, cfg_m, cfg_l, device, dtype, fmt, batch, prompt, gen_len, repeat, bandwidth,
                memory_limit=None, seed=0, tick=lambda: None, floor_basis: str = "copy_bandwidth") -> dict:
    """Measure a variant whole when it fits; else k1 and k2 of its layers and extrapolate; else say so. The
    ONNX Runtime row is measured whole or skipped, with the reason."""
    cfg = cfg_l if variant in ("transformer++", "hf-llama") else cfg_m
    L = cfg.num_hidden_layers
    elt = torch.empty((), dtype=dtype).element_size()
    est = estimate_bytes(variant, cfg, L, elt, fmt, batch, prompt.shape[1] + gen_len, prompt.shape[1])
    avail = available_bytes(device)
    if memory_limit is not None:
        avail = min(avail, memory_limit)
    budget = MEMORY_SAFETY * avail
    res = {"variant": variant, "size": size, "num_layers": L, "memory_estimate": est,
           "available_bytes": avail, "memory_safety": MEMORY_SAFETY}
    if variant == ONNX_VARIANT:
        why = onnx_skip_reason(est, budget, avail)
        if why is not None:
            res.update(status="skipped", label=why)
            tick(), tick()
            return res
    try:
        if est["total_bytes"] <= budget:
            raw = measure_variant(variant, cfg_m, cfg_l, device, dtype, fmt, None, batch, prompt, gen_len, repeat,
                                  bandwidth, seed, tick)
            res.update(status="measured", label="measured", raw=raw,
                       figures=_headline(raw, "measured", batch, gen_len, device, bandwidth, floor_basis))
            return res
        per = est["per_layer_bytes"] + est["cache_per_layer_bytes"]
        k_fit = int((budget - est["fixed_bytes"] - est["workspace_bytes"]) // per)
        if k_fit < 2:
            res.update(status="does_not_fit", label=(
                f"does not fit: needs {human_bytes(est['total_bytes'])}, {human_bytes(avail)} available "
                f"(even {k_fit if k_fit > 0 else 0} layers of {L} would not leave room for two measurements)"))
            tick(), tick()
            return res
        k2 = min(k_fit, max(2, L // 10))
        k1 = max(1, k2 // 2)
        a = measure_variant(variant, cfg_m, cfg_l, device, dtype, fmt, k1, batch, prompt, gen_len, repeat,
                            bandwidth, seed, tick)
        b = measure_variant(variant, cfg_m, cfg_l, device, dtype, fmt, k2, batch, prompt, gen_len, repeat,
                            bandwidth, seed, tick)
        raw = _extrapolate(a, b, L)
        label = f"extrapolated from {k1},{k2}/{L} layers"
        flat = [m for m in ("prefill_s", "decode_s_per_token")
                if b["timing"][m]["median"] <= a["timing"][m]["median"]]
        if flat:  # more layers did not take longer: the fit says nothing about L layers
            label += (f"; UNRELIABLE: the {k2}-layer {' and '.join(m.split('_s')[0] for m in flat)} was not slower "
                      f"than the {k1}-layer one (a noisy machine): rerun")
        # weights and cache are exact counts from shapes, not fits
        raw["weight_bytes"] = est["fixed_bytes"] + L * est["per_layer_bytes"] if variant != "hf-llama" else \
            raw["weight_bytes"]
        raw["weight_label"] = "computed from shapes" if variant != "hf-llama" else label
        res.update(status="extrapolated", label=label, raw=raw, partial={str(k1): a, str(k2): b},
                   needs_bytes=est["total_bytes"],
                   figures=_headline(raw, label, batch, gen_len, device, bandwidth, floor_basis))
        return res
    except torch.cuda.OutOfMemoryError as e:
        res.update(status="error", label=f"out of memory: {str(e).splitlines()[0][:200]}")
    except Exception as e:  # report and go on with the other variants
        res.update(status="error", label=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------------- ratios
RATIO_PREFIX = "ratio_mmf_over_"


def ratios_mmf_over_baseline(by_variant: dict, baseline: str = BASELINE) -> dict:
    """MatMul-free ÷ ``baseline`` (default Transformer++, static) for each headline figure both have."""
    a, b = by_variant.get("mmf", {}), by_variant.get(baseline, {})
    if "figures" not in a or "figures" not in b:
        return {}
    out = {}
    for k, fa in a["figures"].items():
        fb = b["figures"].get(k)
        if fb and isinstance(fa["value"], (int, float)) and fb["value"]:
            lab = "measured" if fa["label"] == fb["label"] == "measured" else "derived from " + ", ".join(
                sorted({fa["label"], fb["label"]}))
            out[k] = {"value": fa["value"] / fb["value"], "label": lab}
    return out
