"""`mmf bench`: memory and latency of the MatMul-free LM against Transformer++, side by side, in one run.

``run_bench(models=("13b",), device="cuda")`` builds, per size, random models of both architectures
directly in their final inference form, times greedy generation of each with the same protocol,
and returns a dict holding every raw figure, the machine, the versions and the protocol. Each
figure carries a label: ``measured``, ``computed`` (counted from tensor shapes), ``estimated``
(derived from measured figures, e.g. the bandwidth floor) or ``extrapolated from k1,k2/L layers``
(a model too large for the machine, measured at k1 and k2 layers and fitted linearly in the
number of layers).

Variants, per size:

* ``mmf``: the MatMul-free model, ternary weights held packed (``i2``: 2 bits per weight; ``tq1``:
  1.6 bits), fp32 scales, embeddings and norms in ``dtype``; decoding through ``mmf.kernels``
  (Triton on CUDA) inside one CUDA graph per token; on CPU through the table-lookup GEMV
  ``kernels.reference.bitlinear_i2_lut`` (exact, reads the packed bytes, no unpacked copy kept).
* ``transformer++``: ``mmf.llama_static.StaticLlama``: bf16/fp16 weights, fused QKV and gate-up,
  SDPA, static KV cache, one CUDA graph per token (eager on CPU).
* ``hf-llama`` (when ``transformers`` is installed): Hugging Face ``LlamaForCausalLM``, eager
  PyTorch with its default attention and ``DynamicCache``: the baseline most users run.

Protocol (the paper's: batch 1): random token prompt of ``prompt_len``, greedy decoding of
``gen_len`` tokens (one prefill that yields the first token, then ``gen_len - 1`` decode steps);
one untimed warm-up, then ``repeat`` timed repetitions; medians and min/max over repetitions.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmf.config import LlamaConfig, MMFConfig, model_preset
from mmf.errors import MMFError
from mmf.units import human_bytes

SCHEMA_VERSION = 1
BENCH_SIZES = ("370m", "1.3b", "2.7b", "13b")
VARIANTS = ("mmf", "transformer++", "hf-llama")
BASELINE = "transformer++"
GPU_DEFAULTS = dict(prompt_len=128, gen_len=128, repeat=5)
CPU_DEFAULTS = dict(prompt_len=8, gen_len=8, repeat=2)
MEMORY_SAFETY = 0.85  # build only if the estimate is below this share of the available memory
W_SCALE = 41.7  # s_w of the random ternary layers: w = code / s_w has mean |w| ~ 0.016, like N(0, 0.02)
GB = 1e9


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


# ---------------------------------------------------------------------------------------------- sizes
def bench_configs(size: str) -> tuple[MMFConfig, LlamaConfig]:
    return model_preset(size), model_preset(f"transformer++-{size}")


def mmf_matrices(cfg: MMFConfig) -> tuple[list, tuple]:
    """(per-layer BitLinear shapes (N, K), LM head shape)."""
    d, m = cfg.hidden_size, cfg.ffn_size
    return [(d, d)] * 4 + [(2 * m, d), (d, m)], (cfg.vocab_size, d)


def llama_matrices(cfg: LlamaConfig) -> tuple[list, tuple]:
    d, m, hd = cfg.hidden_size, cfg.ffn_size, cfg.dim_head
    h, hkv = cfg.num_attention_heads, cfg.n_kv_heads
    return [((h + 2 * hkv) * hd, d), (d, h * hd), (2 * m, d), (d, m)], (cfg.vocab_size, d)


def _packed_bytes(n: int, k: int, fmt: str) -> int:
    return n * -(-k // (4 if fmt == "i2" else 5))


def estimate_bytes(variant: str, cfg, layers: int, elt: int, fmt: str, batch: int, max_len: int,
                   prompt_len: int) -> dict:
    """Bytes a variant needs, from shapes: weights (fixed part + per layer), cache, workspace."""
    d, V = cfg.hidden_size, cfg.vocab_size
    if variant == "mmf":
        mats, head = mmf_matrices(cfg)
        per_layer = sum(_packed_bytes(n, k, fmt) + k * elt + 4 for n, k in mats) + 4 * d * elt
        fixed = V * d * elt + _packed_bytes(*head, fmt) + d * elt + 4 + d * elt
        cache_per_layer = batch * d * 4
        biggest = max(n * k for n, k in mats + [head])
        workspace = 2 * batch * prompt_len * (V + 4 * cfg.ffn_size) * 4 + biggest * 6 // 4
    else:
        mats, head = llama_matrices(cfg)
        per_layer = sum(n * k for n, k in mats) * elt + 2 * d * elt
        fixed = 2 * V * d * elt + d * elt
        cache_per_layer = 2 * batch * cfg.n_kv_heads * cfg.dim_head * max_len * elt
        workspace = 2 * batch * prompt_len * (V + 4 * cfg.ffn_size) * 4
        workspace += batch * cfg.num_attention_heads * prompt_len * prompt_len * 4
        if variant == "hf-llama":  # DynamicCache grows by concatenation: old and new cache live together
            cache_per_layer *= 2
    total = fixed + layers * (per_layer + cache_per_layer) + workspace
    return {"fixed_bytes": fixed, "per_layer_bytes": per_layer, "cache_per_layer_bytes": cache_per_layer,
            "workspace_bytes": workspace, "total_bytes": total, "layers": layers}


# ---------------------------------------------------------------------------------------------- builders
_VALID_I2 = None


def _valid_i2_bytes() -> torch.Tensor:
    """The 81 bytes whose four 2-bit digits are all codes in {0, 1, 2}."""
    global _VALID_I2
    if _VALID_I2 is None:
        _VALID_I2 = torch.tensor([b for b in range(256) if all((b >> (2 * s)) & 3 < 3 for s in range(4))],
                                 dtype=torch.uint8)
    return _VALID_I2


@torch.no_grad()
def random_packed(n: int, k: int, fmt: str, device, gen: torch.Generator) -> torch.Tensor:
    """Random ternary weights (each code uniform in {-1, 0, 1}) built packed, row chunk by row chunk."""
    from mmf.ternary_codes import pack_i2, pack_tq1

    g = 4 if fmt == "i2" else 5
    p = -(-k // g)
    if k % g:  # row padding must hold code 1: go through the one definition of the layout
        codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, device=device, generator=gen)
        return pack_i2(codes) if fmt == "i2" else pack_tq1(codes)
    out = torch.empty(n, p, dtype=torch.uint8, device=device)
    rows = max(1, (1 << 24) // p)
    valid = _valid_i2_bytes().to(device)
    for r in range(0, n, rows):
        rr = min(rows, n - r)
        if fmt == "i2":
            idx = torch.randint(0, 81, (rr, p), device=device, generator=gen)
            out[r:r + rr] = valid[idx]
        else:  # every byte 0..242 is a valid tq1 byte (five base-3 digits)
            out[r:r + rr] = torch.randint(0, 243, (rr, p), device=device, generator=gen).to(torch.uint8)
    return out


def _frozen_classes():
    from mmf.ternary_codes import unpack_tq1
    from mmf.kernels import reference
    from mmf.models import FrozenBitLinear
    from mmf import kernels

    class FrozenBitLinearTQ1(FrozenBitLinear):
        """Weights held as tq1 bytes; no kernel reads tq1, so each call unpacks (plain-torch reference)."""

        def __init__(self, in_features, out_features, packed, weight_scale, norm_weight):
            # the base class holds i2 bytes or int8 codes and checks which: build it with no codes, then
            # hold the tq1 bytes under the same name ``packed``
            super().__init__(in_features, out_features, codes=torch.empty(0, dtype=torch.int8, device=packed.device),
                             weight_scale=weight_scale, norm_weight=norm_weight)
            del self._buffers["codes"], self.packed
            self.codes = None
            self.register_buffer("packed", packed)

        def ternary_codes(self):
            return unpack_tq1(self.packed, self.in_features)

        def forward(self, x):
            codes = unpack_tq1(self.packed, self.in_features)
            return kernels.bitlinear_frozen(x, self.norm.weight, codes, self.weight_scale, self.bias)

        def extra_repr(self):
            return f"in={self.in_features}, out={self.out_features}, tq1"

    class FrozenBitLinearLUT(FrozenBitLinear):
        """i2 weights on CPU through the exact table-lookup GEMV of ``kernels.reference``."""

        def forward(self, x):
            return reference.bitlinear_i2_lut(x, self.norm.weight, self.packed, self.in_features,
                                              self.weight_scale, self.bias)

    return FrozenBitLinear, FrozenBitLinearTQ1, FrozenBitLinearLUT


def cpu_ternary_path() -> str:
    from mmf.kernels import reference

    return "lut" if hasattr(reference, "bitlinear_i2_lut") else "reference"


@torch.no_grad()
def build_mmf_random(cfg: MMFConfig, device="cpu", dtype=torch.bfloat16, fmt: str = "i2",
                     num_layers: Optional[int] = None, seed: int = 0, cpu_path: Optional[str] = None):
    """A frozen HGRNBit model with random packed ternary weights, built in its final form.

    The module tree is made on the meta device (no memory), then every BitLinear is replaced by a
    FrozenBitLinear holding random packed bytes and an fp32 scale, and the remaining parameters
    (embeddings, norms, lower bounds) are allocated in ``dtype``. No float weight matrix is ever made.
    """
    from mmf.models import BitLinear, build_model

    if num_layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=num_layers)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    Plain, TQ1, LUT = _frozen_classes()
    if fmt == "tq1":
        cls = TQ1
    elif device.type == "cpu" and (cpu_path or cpu_ternary_path()) == "lut":
        cls = LUT
    else:
        cls = Plain
    with torch.device("meta"):
        model = build_model(cfg)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BitLinear):
                n, k = child.out_features, child.in_features
                packed = random_packed(n, k, fmt, device, gen)
                frozen = cls(k, n, packed=packed, weight_scale=torch.tensor(W_SCALE, device=device),
                             norm_weight=torch.ones(k, device=device, dtype=dtype))
                setattr(parent, name, frozen)
    for mod in model.modules():
        for pname, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if pname == "weight" and isinstance(mod, nn.Embedding):
                t = torch.empty(p.shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)
            elif "lower_bounds" in pname:
                t = torch.empty(p.shape, device=device, dtype=dtype).normal_(0.0, 1.0, generator=gen)
            else:
                t = torch.ones(p.shape, device=device, dtype=dtype)
            mod._parameters[pname] = nn.Parameter(t, requires_grad=False)
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if bad:
        raise RuntimeError(f"unmaterialised tensors after build: {bad[:5]}")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def build_hf_llama_random(cfg: LlamaConfig, device="cpu", dtype=torch.bfloat16, num_layers: Optional[int] = None,
                          seed: int = 0):
    """Hugging Face ``LlamaForCausalLM`` of the same shape, built directly in ``dtype`` on ``device``."""
    import transformers

    d = cfg.to_hf_dict()
    d.pop("architectures", None)
    if num_layers is not None:
        d["num_hidden_layers"] = num_layers
    hcfg = transformers.LlamaConfig(**{k: v for k, v in d.items() if v is not None})
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(hcfg)
    finally:
        torch.set_default_dtype(prev)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.02, generator=gen)
        else:
            p.fill_(1.0)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- runners
class Runner:
    """Common interface: ``setup``, ``reset``, ``prefill(ids)``, ``step()``; figures of the model."""

    name = ""
    path = ""

    def weight_bytes(self) -> int: ...

    def state_bytes(self) -> int: ...

    def bytes_per_decode_token(self, prompt_len: int, gen_len: int) -> int: ...


def _module_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def fmt_of(model) -> str:
    return "tq1" if type(model.lm_head).__name__.endswith("TQ1") else "i2"


class MMFRunner(Runner):
    """The MatMul-free model decoding with its recurrent state; one CUDA graph per token on CUDA.

    Uses ``mmf.decode_graph`` (the kernels issue's whole-model decoder) when present; otherwise
    captures the model's own forward (which dispatches to the Triton kernels) in a graph here.
    """

    name = "mmf"

    def __init__(self, model, device):
        self.model, self.device = model, torch.device(device)
        self.cfg = model.config
        self.graph = None
        self.engine = None

    def setup(self, batch: int, max_len: int):
        dev = self.device
        self.batch = batch
        L, d = self.cfg.num_hidden_layers, self.cfg.hidden_size
        self.states = [torch.zeros(batch, d, dtype=torch.float32, device=dev) for _ in range(L)]
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)
        self.logits = torch.zeros(batch, self.cfg.vocab_size, dtype=torch.float32, device=dev)
        layer_kind = type(self.model.lm_head).__name__
        kern = "mmf.kernels dispatch (Triton on CUDA)" if dev.type == "cuda" else "plain torch"
        if layer_kind.endswith("LUT"):
            kern = "kernels.reference.bitlinear_i2_lut (table-lookup GEMV on the packed bytes, exact)"
        elif layer_kind.endswith("TQ1"):
            kern = "tq1 unpacked per call (plain-torch reference; no tq1 kernel)"
        elif dev.type == "cpu":
            kern = "kernels.reference.bitlinear_i2 (unpacks each matrix per call)"
        if os.environ.get("MMF_FORCE_REFERENCE", "") not in ("", "0"):
            kern += " [MMF_FORCE_REFERENCE=1: reference ops]"
        self.path = f"{kern}; eager step"
        if dev.type == "cuda" and fmt_of(self.model) == "i2":
            try:
                from mmf.decode_graph import GraphDecoder

                self.engine = GraphDecoder(self.model, batch)
                graph = "one CUDA graph per token" if self.engine.graph is not None else "no graph"
                self.path = (f"mmf.decode_graph.GraphDecoder: fused Triton GEMV/GEMM on i2 bytes, {graph}; "
                             "prefill: int8 tensor-core GEMM + chunked MLGRU scan")
                return self
            except Exception as e:  # fall back to the model's own forward in a graph, and say why
                self.engine = None
                why = f" (GraphDecoder failed: {type(e).__name__}: {str(e)[:100]})"
        else:
            why = ""
        if dev.type == "cuda":
            try:
                self._capture()
                self.path = f"{kern}; one CUDA graph per token (model forward captured in bench/model_bench.py){why}"
            except Exception as e:  # keep the run going: report the eager figure and why
                self.graph = None
                self.path = f"{kern}; eager (CUDA graph capture failed: {type(e).__name__}: {str(e)[:120]}){why}"
        return self

    def _step_body(self):
        from mmf.models import RecurrentCache

        out = self.model(self.tok[:, None], RecurrentCache(list(self.states), 0))
        for s, n in zip(self.states, out.cache.states):
            if n is not s:
                s.copy_(n)
        self.logits.copy_(out.logits[:, -1].float())
        self.tok.copy_(self.logits.argmax(-1))

    def _capture(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step_body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step_body()
        self.graph = graph
        self.reset()

    def reset(self):
        if self.engine is not None:
            self.engine.reset()
        for s in self.states:
            s.zero_()

    @torch.no_grad()
    def prefill(self, ids):
        if self.engine is not None:
            self.tok = self.engine.prefill(ids).argmax(-1)
            return
        out = self.model(ids)
        for s, n in zip(self.states, out.cache.states):
            s.copy_(n)
        self.logits.copy_(out.logits[:, -1].float())
        self.tok.copy_(self.logits.argmax(-1))

    @torch.no_grad()
    def step(self):
        if self.engine is not None:
            self.tok = self.engine.step(self.tok).argmax(-1)
        elif self.graph is not None:
            self.graph.replay()
        else:
            self._step_body()

    def weight_bytes(self):
        return _module_bytes(self.model)

    def state_bytes(self):
        if self.engine is not None:
            return self.engine.state.numel() * self.engine.state.element_size()
        return sum(s.numel() * s.element_size() for s in self.states)

    def bytes_per_decode_token(self, prompt_len, gen_len):
        emb = self.model.model.embeddings.weight
        rows = self.batch * emb.shape[1] * emb.element_size()
        return self.weight_bytes() - emb.numel() * emb.element_size() + rows + 2 * self.state_bytes()


class StaticLlamaRunner(Runner):
    name = "transformer++"

    def __init__(self, dec, device):
        self.dec, self.device = dec, torch.device(device)

    def setup(self, batch, max_len):
        self.batch = batch
        self.dec.setup(batch, max_len)
        graph = "one CUDA graph per token" if self.dec.graph is not None else "eager step (no CUDA graph on CPU)"
        self.path = (f"mmf.llama_static.StaticLlama: {str(self.dec.dtype).replace('torch.', '')} weights, fused "
                     f"QKV and gate-up, SDPA, static KV cache, {graph}")
        return self

    def reset(self):
        self.dec.reset()

    def prefill(self, ids):
        self.dec.prefill(ids)

    def step(self):
        self.dec.step()

    def weight_bytes(self):
        return self.dec.weight_bytes()

    def state_bytes(self):
        return self.dec.cache_bytes_used()

    def state_bytes_allocated(self):
        return self.dec.cache_bytes()

    def bytes_per_decode_token(self, prompt_len, gen_len):
        dec = self.dec
        emb = dec.embed
        w = dec.weight_bytes() - emb.numel() * emb.element_size() + self.batch * emb.shape[1] * emb.element_size()
        return w + _kv_read_bytes(dec.kv_bytes_per_position(), prompt_len, gen_len)


def _kv_read_bytes(per_pos: int, prompt_len: int, gen_len: int) -> int:
    """Mean KV bytes a decode step must read (positions 0..p) and write (position p) over the run."""
    steps = list(range(prompt_len, prompt_len + gen_len - 1)) or [prompt_len]
    return int(per_pos * (statistics.mean(p + 1 for p in steps) + 1))


class HFRunner(Runner):
    name = "hf-llama"

    def __init__(self, model, device):
        self.model, self.device = model, torch.device(device)
        self.cache = None

    def setup(self, batch, max_len):
        self.batch = batch
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        attn = getattr(self.model.config, "_attn_implementation", None) or "default"
        # transformers >= 5.25 renamed the cache argument and output `past_key_values` to `cache` and
        # warns (FutureWarning + a log line) at every use of the old name: pass whichever this version takes
        self.cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.path = (f"transformers {__import__('transformers').__version__} LlamaForCausalLM, eager PyTorch "
                     f"(no graph), attention '{attn}', DynamicCache")
        return self

    def reset(self):
        self.cache = None

    @torch.no_grad()
    def prefill(self, ids):
        out = self.model(input_ids=ids, use_cache=True)
        self.cache = out.get(self.cache_kw)
        self.tok = out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def step(self):
        out = self.model(input_ids=self.tok, use_cache=True, **{self.cache_kw: self.cache})
        self.cache = out.get(self.cache_kw)
        self.tok = out.logits[:, -1].argmax(-1, keepdim=True)

    def weight_bytes(self):
        return _module_bytes(self.model)

    def state_bytes(self):
        return _hf_cache_bytes(self.cache)

    def bytes_per_decode_token(self, prompt_len, gen_len):
        cfg = self.model.config
        emb = self.model.model.embed_tokens.weight
        w = self.weight_bytes() - emb.numel() * emb.element_size() + self.batch * emb.shape[1] * emb.element_size()
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_pos = 2 * cfg.num_hidden_layers * self.batch * cfg.num_key_value_heads * hd * emb.element_size()
        return w + _kv_read_bytes(per_pos, prompt_len, gen_len)


def _hf_cache_bytes(cache) -> int:
    if cache is None:
        return 0
    ts = []
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            ts += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    elif hasattr(cache, "key_cache"):
        ts = list(cache.key_cache) + list(cache.value_cache)
    else:  # legacy tuple of (k, v) per layer
        ts = [t for kv in cache for t in kv]
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


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


def _build_runner(variant, cfg_m, cfg_l, device, dtype, fmt, layers, seed):
    if variant == "mmf":
        return MMFRunner(build_mmf_random(cfg_m, device, dtype, fmt, layers, seed), device)
    if variant == "transformer++":
        from mmf.llama_static import StaticLlama

        return StaticLlamaRunner(StaticLlama.random(cfg_l, device, dtype, layers, seed), device)
    return HFRunner(build_hf_llama_random(cfg_l, device, dtype, layers, seed), device)


def measure_variant(variant, cfg_m, cfg_l, device, dtype, fmt, layers, batch, prompt, gen_len, repeat,
                    bandwidth, seed=0, tick=lambda: None) -> dict:
    """Build ``variant`` with ``layers`` layers, set it up, time it; every figure measured."""
    dev = torch.device(device)
    with MemoryMeter(device) as meter:
        _sync(device)
        t0 = time.perf_counter()
        runner = _build_runner(variant, cfg_m, cfg_l, device, dtype, fmt, layers, seed)
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
        "layers": layers, "path": runner.path, "build_s": build_s, "setup_s": setup_s, "timing": timing,
        "memory": mem, "weight_bytes": runner.weight_bytes(), "state_bytes_end": runner.state_bytes(),
        "bytes_per_decode_token": runner.bytes_per_decode_token(prompt.shape[1], gen_len),
    }
    if hasattr(runner, "state_bytes_allocated"):
        out["state_bytes_allocated"] = runner.state_bytes_allocated()
    if bandwidth:
        out["decode_floor_s"] = out["bytes_per_decode_token"] / bandwidth
    del runner
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    else:
        _malloc_trim()
    return out


def _headline(raw: dict, label: str, batch: int, gen_len: int, device: str, bandwidth) -> dict:
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
        f["decode_floor_ms"] = _fig(1e3 * raw["decode_floor_s"], "ms",
                                    "estimated (bytes per token / copy bandwidth measured in this run)" +
                                    ("; on CPU not a lower bound: read-only streams beat a copy" if device == "cpu"
                                     else ""))
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
    bw = result["copy_bandwidth"]["bytes_per_s"]
    batch, gen_len = result["protocol"]["batch"], result["protocol"]["gen_len"]
    for s in result["sizes"].values():
        for v in s["variants"].values():
            if v.get("status") != "extrapolated":
                continue
            (k1, a), (k2, b) = sorted(v["partial"].items(), key=lambda kv: int(kv[0]))
            raw = _extrapolate(a, b, v["num_layers"])
            raw["weight_bytes"], raw["weight_label"] = v["raw"]["weight_bytes"], v["raw"].get("weight_label")
            v["raw"] = raw
            v["figures"] = _headline(raw, v["label"], batch, gen_len, dev, bw)
        s["ratio_mmf_over_transformer++"] = _ratios(s["variants"])
    return result


def run_variant(variant, size, cfg_m, cfg_l, device, dtype, fmt, batch, prompt, gen_len, repeat, bandwidth,
                memory_limit=None, seed=0, tick=lambda: None) -> dict:
    """Measure a variant whole when it fits; else k1 and k2 of its layers and extrapolate; else say so."""
    cfg = cfg_m if variant == "mmf" else cfg_l
    L = cfg.num_hidden_layers
    elt = torch.empty((), dtype=dtype).element_size()
    est = estimate_bytes(variant, cfg, L, elt, fmt, batch, prompt.shape[1] + gen_len, prompt.shape[1])
    avail = available_bytes(device)
    if memory_limit is not None:
        avail = min(avail, memory_limit)
    budget = MEMORY_SAFETY * avail
    res = {"variant": variant, "size": size, "num_layers": L, "memory_estimate": est,
           "available_bytes": avail, "memory_safety": MEMORY_SAFETY}
    try:
        if est["total_bytes"] <= budget:
            raw = measure_variant(variant, cfg_m, cfg_l, device, dtype, fmt, None, batch, prompt, gen_len, repeat,
                                  bandwidth, seed, tick)
            res.update(status="measured", label="measured", raw=raw,
                       figures=_headline(raw, "measured", batch, gen_len, device, bandwidth))
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
        # weights and cache are exact counts from shapes, not fits
        raw["weight_bytes"] = est["fixed_bytes"] + L * est["per_layer_bytes"] if variant != "hf-llama" else \
            raw["weight_bytes"]
        raw["weight_label"] = "computed from shapes" if variant != "hf-llama" else label
        res.update(status="extrapolated", label=label, raw=raw, partial={str(k1): a, str(k2): b},
                   needs_bytes=est["total_bytes"],
                   figures=_headline(raw, label, batch, gen_len, device, bandwidth))
        return res
    except torch.cuda.OutOfMemoryError as e:
        res.update(status="error", label=f"out of memory: {str(e).splitlines()[0][:200]}")
    except Exception as e:  # report and go on with the other variants
        res.update(status="error", label=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------------- the bench
def _ratios(by_variant: dict) -> dict:
    """MatMul-free ÷ Transformer++ (static) for each headline figure both have."""
    a, b = by_variant.get("mmf", {}), by_variant.get(BASELINE, {})
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
            "description": (
                f"Random weights (same shapes as the presets), batch {batch}, a random prompt of {prompt_len} tokens, "
                f"greedy generation of {gen_len} tokens: one prefill (yields the first token) then {gen_len - 1} "
                f"decode steps. One untimed warm-up, then {repeat} timed repetitions; figures are medians "
                "(min and max kept). Host timer with a device synchronisation after prefill and after the last "
                "decode step only. Peak memory covers build and generation of that variant alone. "
                "Decode floor = bytes a decode step must read and write (all weights but the embedding table, "
                "one embedding row per sequence, the recurrent state or the KV cache) / copy bandwidth "
                "(read + write) measured at the start of this run."),
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
            result["sizes"][size] = {"variants": per, "ratio_mmf_over_transformer++": _ratios(per),
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


# ---------------------------------------------------------------------------------------------- output
def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else (f"{x:.1f}" if x >= 10 else f"{x:.3f}")


def _mark(label: str) -> str:
    if label == "measured":
        return ""
    if label.startswith("extrapolated"):
        return " (x)"
    if label.startswith("computed"):
        return ""
    return " (e)"


def table_rows(result: dict) -> list:
    """One row per (size, variant) and one ratio row per size, for ``print_table``.

    Marks: (x) extrapolated from k1,k2/L layers (see the JSON), (e) estimated.
    """
    rows = []
    cuda = result["protocol"]["device"] == "cuda"
    for size, s in result["sizes"].items():
        for variant, v in s["variants"].items():
            row = {"size": size, "model": variant}
            if "figures" not in v:
                row.update({"status": v["label"]})
                rows.append(row)
                continue
            f = v["figures"]

            def cell(key, fmt="{:.2f}", scale=1.0):
                x = f.get(key)
                return "-" if x is None else fmt.format(x["value"] * scale) + _mark(x["label"])

            def bcell(key):
                x = f.get(key)
                return "-" if x is None else human_bytes(x["value"]) + _mark(x["label"])

            row["weights"] = bcell("weight_bytes")
            row["peak mem"] = bcell("peak_memory_bytes")
            if cuda:
                row["reserved"] = bcell("peak_reserved_bytes")
            row["state"] = bcell("state_bytes_end")
            row["prefill ms"] = _ms(f["prefill_ms"]["value"]) + _mark(f["prefill_ms"]["label"])
            d = f["decode_ms_per_token"]
            row["decode ms/tok"] = (f"{_ms(d['value'])} [{_ms(f['decode_ms_per_token_min']['value'])}-"
                                    f"{_ms(f['decode_ms_per_token_max']['value'])}]" + _mark(d["label"]))
            if "decode_floor_ms" in f:
                row["floor ms"] = _ms(f["decode_floor_ms"]["value"]) + _mark(f["decode_floor_ms"]["label"])
            row["e2e s"] = cell("e2e_s", "{:.3f}")
            row["tok/s"] = cell("decode_tokens_per_s", "{:.1f}")
            row["build s"] = cell("build_s", "{:.1f}")
            row["status"] = v["label"] if v["status"] != "measured" else "measured"
            if v["status"] == "extrapolated":
                row["status"] += (f" (needs {human_bytes(v['needs_bytes'])}, {human_bytes(v['available_bytes'])} "
                                  "available)")
            rows.append(row)
        r = s.get("ratio_mmf_over_transformer++") or {}
        if r:
            row = {"size": size, "model": "mmf ÷ transformer++"}

            def rc(key):
                return f"{r[key]['value']:.3f}" if key in r else "-"

            row["weights"] = rc("weight_bytes")
            row["peak mem"] = rc("peak_memory_bytes")
            if cuda:
                row["reserved"] = rc("peak_reserved_bytes")
            row["state"] = rc("state_bytes_end")
            row["prefill ms"] = rc("prefill_ms")
            row["decode ms/tok"] = rc("decode_ms_per_token")
            if "decode_floor_ms" in r:
                row["floor ms"] = rc("decode_floor_ms")
            row["e2e s"] = rc("e2e_s")
            row["tok/s"] = rc("decode_tokens_per_s")
            row["build s"] = ""
            row["status"] = "ratio"
            rows.append(row)
    # equalise columns (does-not-fit rows have fewer)
    cols = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return [{c: r.get(c, "") for c in cols} for r in rows]


def paths_summary(result: dict) -> list:
    """Which code path each variant ran, one line per (size, variant)."""
    out = []
    for size, s in result["sizes"].items():
        for variant, v in s["variants"].items():
            path = (v.get("raw") or {}).get("path", "-")
            out.append(f"{size} {variant}: {path}")
    return out


def plot_figure(result: dict):
    """The chart: peak memory, decode and prefill latency by size, every variant; linear axes, each bar
    labelled with its value (a log axis with bars from the bottom makes a 3.9x gap look like 30x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(result["sizes"])
    variants = result["protocol"]["variants"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    peaks = [v["figures"]["peak_memory_bytes"]["value"] for s in result["sizes"].values()
             for v in s["variants"].values() if "peak_memory_bytes" in v.get("figures", {})]
    mem_unit, mem_scale = ("GB", GB) if max(peaks, default=GB) >= GB else ("MB", 1e6)
    panels = (("peak_memory_bytes", 1 / mem_scale, f"peak memory ({mem_unit})", lambda x: f"{x:.3g}"),
              ("decode_ms_per_token", 1.0, "decode latency (ms / token)", _ms),
              ("prefill_ms", 1.0, f"prefill latency (ms, {result['protocol']['prompt_len']} tokens)", _ms))
    width = 0.8 / max(1, len(variants))
    for ax, (key, scale, title, text) in zip(axes, panels):
        for i, v in enumerate(variants):
            xs, ys, hatch, labels = [], [], [], []
            for j, s in enumerate(sizes):
                f = result["sizes"][s]["variants"].get(v, {}).get("figures")
                if f and key in f:
                    xs.append(j + (i - (len(variants) - 1) / 2) * width)
                    ys.append(f[key]["value"] * scale)
                    hatch.append("//" if f[key]["label"].startswith("extrapolated") else "")
                    labels.append(text(f[key]["value"] * scale))
            bars = ax.bar(xs, ys, width, label=v)
            for b, h in zip(bars, hatch):
                b.set_hatch(h)
            ax.bar_label(bars, labels=labels, fontsize=7, padding=2, rotation=90)
            if key == "decode_ms_per_token" and v != "hf-llama":
                fl = [(x, result["sizes"][s]["variants"][v]["figures"].get("decode_floor_ms"))
                      for x, s in zip(xs, [s for s in sizes if "figures" in result["sizes"][s]["variants"].get(v, {})])]
                fx = [x for x, f in fl if f]
                fy = [f["value"] for x, f in fl if f]
                if fx:
                    ax.scatter(fx, fy, marker="_", s=300, color="black", zorder=3,
                               label="bandwidth floor" if v == "mmf" else None)
        ax.set_xticks(range(len(sizes)), sizes)
        top = max([b.get_height() for b in ax.patches] + [y for c in ax.collections for _, y in c.get_offsets()]
                  + [0.0])
        ax.set_ylim(0, 1.2 * top if top > 0 else 1)  # linear from 0, with room for the labels above the bars
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"mmf bench on {m.get('gpu') or m.get('cpu')} ({result['protocol']['device']}, batch "
                 f"{result['protocol']['batch']}, {result['protocol']['dtype']}, hatched = extrapolated)")
    fig.tight_layout()
    return fig


def write_plot(result: dict, path) -> None:
    """``plot_figure`` as a PNG: written to a temporary name beside ``path``, then renamed."""
    import matplotlib.pyplot as plt

    fig = plot_figure(result)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def table_title(result: dict) -> str:
    p = result["protocol"]
    bw = result["copy_bandwidth"]["bytes_per_s"]
    chosen = f" ({p['device_choice']})" if p.get("device_choice", "").startswith("--device auto") else ""
    return (f"mmf bench: {p['device']}{chosen}, batch {p['batch']}, prompt {p['prompt_len']}, {p['gen_len']} new "
            f"tokens, {p['dtype']}, {p['format']}, median of {p['repeat']} (min-max in brackets); copy bandwidth "
            f"{bw / 1e9:.1f} GB/s (measured); (x) extrapolated, (e) estimated, others measured")


def print_results(result: dict) -> None:
    """The table, which code path each variant ran, and the protocol, on stdout."""
    from mmf.cli.app import print_table

    print_table(table_rows(result), title=table_title(result))
    print("paths:")
    for line in paths_summary(result):
        print(f"  {line}")
    print("protocol: " + result["protocol"]["description"])


def run_train(models=("370m", "1.3b"), device="auto", batch=None, seq_len=2048, **kw) -> dict:
    """``mmf bench --train``: the training benchmark of the kernels issue (bench/train_bench.py)."""
    try:
        from mmf.bench import train_bench
    except ImportError:
        raise MMFError("the training benchmark (bench/train_bench.py, issue 5) is not installed in this "
                       "version of mmf; run the inference benchmark without --train") from None
    sizes = [s for s in resolve_sizes(models)]
    return train_bench.run_train_bench(sizes=tuple(sizes), device=device, batch=batch, seq_len=seq_len, **kw)


def print_train_results(res: dict) -> None:
    from mmf.bench.train_bench import print_results as print_train

    print_train(res)


# ---------------------------------------------------------------------------------------------- `mmf bench`
TRAIN_DEFAULTS = dict(seq_len=2048, steps=8)


def bench_command(models="370m", device="auto", batch_size=None, prompt_len=None, max_new_tokens=None,
                  dtype="bf16", fmt="i2", repeat=None, json_stdout=False, json_out=None, plot=None,
                  no_hf=False, train=False, seq_len=None, steps=None, command=None) -> dict:
    """``mmf bench`` whole: check the options and that every output can be written (before any
    measurement), run the benchmark, print its table (or, with ``json_stdout``, the JSON document
    instead), then write ``json_out`` (JSON) and ``plot`` (PNG). The table comes first, so that a
    write failing after minutes of measurement loses nothing on screen; such a failure is then one
    MMFError line. Returns the result dict."""
    from mmf.bench import check_output_path

    _check_bench_options(train, plot, prompt_len, max_new_tokens, repeat, no_hf, dtype, fmt, seq_len, steps)
    outputs = [(opt, check_output_path(p, opt)) for opt, p in (("--json-out", json_out), ("--plot", plot))
               if p is not None]
    if len(outputs) == 2 and os.path.abspath(outputs[0][1]) == os.path.abspath(outputs[1][1]):
        raise MMFError(f"--json-out and --plot both name {json_out}; give them different files")
    if plot is not None and Path(plot).suffix.lower() != ".png":
        raise MMFError(f"--plot {plot}: the chart is a PNG; name a .png file")
    if train:
        res = run_train(models if models != "all" else "370m,1.3b", device=device, batch=batch_size,
                        seq_len=TRAIN_DEFAULTS["seq_len"] if seq_len is None else seq_len,
                        steps=TRAIN_DEFAULTS["steps"] if steps is None else steps)
        res["command"] = command
    else:
        variants = [v for v in VARIANTS if not (no_hf and v == "hf-llama")]
        partial = _PartialWriter(json_out, plot)
        res = run_bench(models, device=device, batch=1 if batch_size is None else batch_size, prompt_len=prompt_len,
                        gen_len=max_new_tokens, dtype=dtype, fmt=fmt, repeat=repeat, variants=variants,
                        command=command, progress=True, on_size_done=partial)
    _say = (lambda m: print(m, file=sys.stderr)) if json_stdout else print
    if json_stdout:
        print(json.dumps(res, indent=2, default=str))
    elif train:
        print_train_results(res)
    else:
        print_results(res)
    failed = []
    for opt, path in outputs:
        try:
            if opt == "--json-out":
                import mmf.bench as bench_pkg

                bench_pkg.write_json(path, res)
            else:
                write_plot(res, path)
            _say(f"wrote {path}")
        except Exception as e:  # the figures are on screen already: say what failed, in one line
            failed.append((f"could not write {opt} {path}: {_why(e)}", e))
    if failed:
        where = "JSON" if json_stdout else "table"
        raise MMFError("; ".join(m for m, _ in failed) + f" (the figures are in the {where} above)") from failed[0][1]
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


def _why(e: BaseException) -> str:
    if isinstance(e, MMFError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _PartialWriter:
    """After each size, the JSON and chart so far (a run cut short keeps the sizes it measured). A
    failed write does not stop the measurements: it is said once on stderr, and tried again at the end."""

    def __init__(self, json_out, plot):
        self.json_out, self.plot = json_out, plot
        self.warned = False

    def __call__(self, res: dict) -> None:
        import mmf.bench as bench_pkg

        for opt, path, write in (("--json-out", self.json_out, lambda p: bench_pkg.write_json(p, res)),
                                 ("--plot", self.plot, lambda p: write_plot(res, p))):
            if path is None:
                continue
            try:
                write(path)
            except Exception as e:
                if not self.warned:
                    print(f"mmf: warning: could not write {opt} {path} ({_why(e)}); measuring goes on, the "
                          "write is tried again at the end", file=sys.stderr)
                    self.warned = True
