"""The model variants `mmf bench` compares, built with random weights directly in their final inference
form, the bytes each holds counted from its shapes, and the runner that decodes with each.

* ``mmf``: the MatMul-free model, ternary weights held packed (``i2``: 2 bits per weight; ``tq1``:
  1.6 bits), fp32 scales, embeddings and norms in ``dtype``; decoding through ``mmf.kernels``
  (Triton on CUDA) inside one CUDA graph per token; on CPU the plain ``FrozenBitLinear`` through
  ``kernels.bitlinear_i2``, i.e. what ``mmf generate`` runs: the native kernel (``kernels/cpu_ternary.py``)
  where it is built, else the exact table-lookup GEMV ``kernels.reference.bitlinear_i2_lut``
  (``cpu_ternary_path`` names which). Built by ``build_mmf_random``, run by ``MMFRunner``.
* ``mmf-onnxruntime`` (CPU only): the same random MatMul-free model exported with ``mmf export-onnx``'s
  library function (2-bit weights, fp32) into a temporary directory and decoded by
  ``mmf.onnx_runtime.OnnxCausalLM`` as ``mmf generate --onnx`` runs it (both graphs, constant folding
  on, ONNX Runtime's CPU provider at the run's thread count). Run by ``OnnxRunner``.
* ``transformer++``: ``mmf.llama_static.StaticLlama``: bf16/fp16 weights, fused QKV and gate-up,
  SDPA, static KV cache, one CUDA graph per token (eager on CPU). Run by ``StaticLlamaRunner``.
* ``hf-llama`` (when ``transformers`` is installed): Hugging Face ``LlamaForCausalLM``, eager
  PyTorch with its default attention and ``DynamicCache``: the baseline most users run. Built by
  ``build_hf_llama_random``, run by ``HFRunner``.

Every runner has the same interface (``setup``, ``reset``, ``prefill``, ``step`` and its byte
counts), which is all the measuring protocol (``model_bench_protocol``) sees; ``build_runner``
makes one by name. Other benchmarks (kernel_bench, decode_breakdown, ...) build their models here too.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import statistics
from typing import Optional

import torch
from torch import nn

from mmf.config import LlamaConfig, MMFConfig, model_preset
from mmf.memory import module_bytes

W_SCALE = 41.7  # s_w of the random ternary layers: w = code / s_w has mean |w| ~ 0.016, like N(0, 0.02)
ONNX_VARIANT = "mmf-onnxruntime"
# ONNX Runtime's peak resident memory while it loads an export with constant folding on (both sessions: the
# 2-bit initializers unpacked to int8 through temporaries), per ternary weight. 370m (onnx_cpu.json @ 42fee1b;
# bench/results/model_bench_cpu.json's mmf-onnxruntime row: 2.29 GB): 2.32 GB peak for 341 M ternary weights and two fp32 copies of the embedding table, ~6.0 B/weight; 7 leaves room.
ORT_LOAD_PEAK_BYTES_PER_WEIGHT = 7


# ---------------------------------------------------------------------------------------------- shapes
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


def ternary_weights(cfg: MMFConfig, layers: Optional[int] = None) -> int:
    """The number of ternary weights of a MatMul-free model (every BitLinear, the LM head included)."""
    mats, (nh, kh) = mmf_matrices(cfg)
    return (cfg.num_hidden_layers if layers is None else layers) * sum(n * k for n, k in mats) + nh * kh


def estimate_bytes(variant: str, cfg, layers: int, elt: int, fmt: str, batch: int, max_len: int,
                   prompt_len: int) -> dict:
    """Bytes a variant needs, from shapes: weights (fixed part + per layer), cache, workspace.

    ``mmf-onnxruntime``: the larger of the export (the random model, its initializers copied out) and
    ONNX Runtime's load (``ORT_LOAD_PEAK_BYTES_PER_WEIGHT``), plus ``disk_bytes``, the export's files."""
    d, V = cfg.hidden_size, cfg.vocab_size
    if variant == ONNX_VARIANT:
        mats, head = mmf_matrices(cfg)
        per_weight = ORT_LOAD_PEAK_BYTES_PER_WEIGHT
        per_layer = sum(n * k for n, k in mats) * per_weight + 4 * d * 4
        fixed = head[0] * head[1] * per_weight + 2 * V * d * 4  # each session holds the fp32 embedding table
        export = 2 * (layers * sum(_packed_bytes(n, k, "i2") for n, k in mats) + _packed_bytes(*head, "i2")) + \
            V * d * (elt + 4)
        cache_per_layer = 2 * batch * d * 4
        workspace = 2 * batch * prompt_len * (V + 4 * cfg.ffn_size) * 4
        total = max(fixed + layers * (per_layer + cache_per_layer) + workspace, export)
        disk = layers * sum(_packed_bytes(n, k, "i2") + 4 * k for n, k in mats) + _packed_bytes(*head, "i2") + \
            V * d * 4
        return {"fixed_bytes": fixed, "per_layer_bytes": per_layer, "cache_per_layer_bytes": cache_per_layer,
                "workspace_bytes": workspace, "total_bytes": total, "layers": layers, "disk_bytes": disk}
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

    return FrozenBitLinear, FrozenBitLinearTQ1


def cpu_ternary_path(fmt: str = "i2", threads: Optional[int] = None) -> dict:
    """What runs the MatMul-free model's BitLinears on this CPU, as ``kernels.bitlinear_i2`` dispatches:
    ``kind`` native | lut | reference, ``name`` (short, for the table), ``detail`` (for the paths list)."""
    from mmf import kernels
    from mmf.kernels import cpu_ternary

    threads = torch.get_num_threads() if threads is None else threads
    if fmt == "tq1":
        return {"kind": "reference", "name": "tq1, unpacked per call (torch reference)",
                "detail": "tq1 unpacked per call (plain-torch reference; no tq1 kernel)"}
    if kernels._FORCE_REFERENCE:
        return {"kind": "reference", "name": "i2, torch reference (MMF_FORCE_REFERENCE=1)",
                "detail": "kernels.reference.bitlinear_i2 (unpacks each matrix per call) [MMF_FORCE_REFERENCE=1]"}
    info = cpu_ternary.info()
    if not info["available"]:
        return {"kind": "lut", "name": f"i2, torch table lookup (native kernel unavailable: {info['reason']})",
                "detail": "kernels.reference.bitlinear_i2_lut (table-lookup GEMV on the packed bytes, exact): the "
                          f"native CPU kernel is unavailable ({info['reason']})"}
    many = "s" if threads != 1 else ""
    return {"kind": "native", "isa": info["isa"], "threads": threads,
            "name": f"i2, native {info['isa']}, {threads} thread{many}",
            "detail": f"kernels.cpu_ternary: native {info['isa']} kernel (kernels/cpu/ternary_cpu.c, fused norm, int8 "
                      f"quantisation, exact ternary product) on the i2 bytes, {threads} thread{many}"}


def native_decode_step(model) -> bool:
    """True when ``model``'s CPU decode steps run as one native call (kernels/cpu_decode.py)."""
    from mmf.kernels import cpu_decode
    from mmf.models import FrozenBitLinear

    return cpu_decode.plan_for(model, FrozenBitLinear) is not None


@torch.no_grad()
def build_mmf_random(cfg: MMFConfig, device="cpu", dtype=torch.bfloat16, fmt: str = "i2",
                     num_layers: Optional[int] = None, seed: int = 0):
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
    Plain, TQ1 = _frozen_classes()
    cls = TQ1 if fmt == "tq1" else Plain
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
    path = ""  # the code path, in a sentence (the list under the table)
    path_name = ""  # the same, short (the table's model column)

    def close(self) -> None:
        """Release what the runner holds beyond its memory (files)."""

    def weight_bytes(self) -> int: ...

    def state_bytes(self) -> int: ...

    def bytes_per_decode_token(self, prompt_len: int, gen_len: int) -> int: ...


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
        fmt = fmt_of(self.model)
        if dev.type == "cpu":
            cpu = cpu_ternary_path(fmt)
            self.path, self.path_name = f"{cpu['detail']}; eager step", cpu["name"]
            if cpu["kind"] == "native" and native_decode_step(self.model):
                self.path = (f"{cpu['detail']}; fp32 activations; decode: kernels.cpu_decode, the whole model's step "
                             "as one native call (mmf_hgrn_step); prefill: the eager forward on the native BitLinear")
                self.path_name = f"{cpu['name']}, one call per step"
            return self
        kern = "mmf.kernels dispatch (Triton on CUDA)"
        self.path_name = f"{fmt}, Triton"
        if fmt == "tq1":
            kern = "tq1 unpacked per call (plain-torch reference; no tq1 kernel)"
            self.path_name = "tq1, unpacked per call (torch reference)"
        if os.environ.get("MMF_FORCE_REFERENCE", "") not in ("", "0"):
            kern += " [MMF_FORCE_REFERENCE=1: reference ops]"
            self.path_name = f"{fmt}, torch reference (MMF_FORCE_REFERENCE=1)"
        self.path = f"{kern}; eager step"
        if dev.type == "cuda" and fmt_of(self.model) == "i2":
            try:
                from mmf.decode_graph import GraphDecoder

                self.engine = GraphDecoder(self.model, batch)
                graph = "one CUDA graph per token" if self.engine.graph is not None else "no graph"
                self.path = (f"mmf.decode_graph.GraphDecoder: fused Triton GEMV/GEMM on i2 bytes, {graph}; "
                             "prefill: int8 tensor-core GEMM + chunked MLGRU scan")
                self.path_name = "i2, Triton GraphDecoder"
                return self
            except Exception as e:  # fall back to the model's own forward in a graph, and say why
                self.engine = None
                why = f" (GraphDecoder failed: {type(e).__name__}: {str(e)[:100]})"
        else:
            why = ""
        if dev.type == "cuda":
            try:
                self._capture()
                self.path = f"{kern}; one CUDA graph per token (model forward captured in bench/model_variants.py){why}"
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
        return module_bytes(self.model)

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
        dt = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(str(self.dec.dtype).replace("torch.", ""),
                                                                          str(self.dec.dtype))
        self.path = (f"mmf.llama_static.StaticLlama: {str(self.dec.dtype).replace('torch.', '')} weights, fused "
                     f"QKV and gate-up, SDPA, static KV cache, {graph}")
        self.path_name = f"{dt}, StaticLlama" + (f", {_threads_text()}" if self.device.type == "cpu" else "")
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
        self.path_name = "transformers, eager" + (f", {_threads_text()}" if self.device.type == "cpu" else "")
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
        return module_bytes(self.model)

    def state_bytes(self):
        return _hf_cache_bytes(self.cache)

    def bytes_per_decode_token(self, prompt_len, gen_len):
        cfg = self.model.config
        emb = self.model.model.embed_tokens.weight
        w = self.weight_bytes() - emb.numel() * emb.element_size() + self.batch * emb.shape[1] * emb.element_size()
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_pos = 2 * cfg.num_hidden_layers * self.batch * cfg.num_key_value_heads * hd * emb.element_size()
        return w + _kv_read_bytes(per_pos, prompt_len, gen_len)


def _threads_text(threads: Optional[int] = None) -> str:
    n = torch.get_num_threads() if threads is None else threads
    return f"{n} thread{'s' if n != 1 else ''}"


class OnnxRunner(Runner):
    """The MatMul-free model exported to ONNX (``mmf export-onnx``'s library function, 2-bit weights, fp32) into
    a temporary directory, decoded by ``mmf.onnx_runtime.OnnxCausalLM`` as ``mmf generate --onnx`` runs it: both
    graphs loaded (prefill.onnx for the prompt, decode.onnx per token), constant folding on (the in-graph
    unpacking runs once at load, int8 weights held), the CPU provider at torch's thread count."""

    name = ONNX_VARIANT

    def __init__(self, model, dtype: str = "fp32"):
        import tempfile

        from mmf.converters.onnx_export import export_model

        self.cfg = model.config
        self.dtype = dtype
        self.tmp = tempfile.TemporaryDirectory(prefix="mmf-bench-onnx-")
        self.dir = os.path.join(self.tmp.name, "export")
        try:
            self.manifest = export_model(model, self.dir, weights="packed", dtype=dtype, check=False)
        except BaseException:
            self.tmp.cleanup()
            raise
        self.lm = None

    def setup(self, batch, max_len):
        import onnxruntime

        from mmf.onnx_runtime import OnnxCausalLM

        self.batch = batch
        self.threads = torch.get_num_threads()
        self.lm = OnnxCausalLM(self.dir, threads=self.threads)  # mmf generate --onnx's defaults
        self.cache = None
        self.tok = torch.zeros(batch, dtype=torch.long)
        self.path = (f"mmf.onnx_runtime.OnnxCausalLM (what mmf generate --onnx runs): ONNX Runtime "
                     f"{onnxruntime.__version__} CPUExecutionProvider, {_threads_text(self.threads)}; {self.dtype} "
                     "export of the same random weights (2-bit initializers, unpacked to int8 by constant folding "
                     "at load); prefill.onnx for the prompt, decode.onnx per token")
        self.path_name = f"ONNX Runtime {onnxruntime.__version__}, {self.dtype} export, {_threads_text(self.threads)}"
        return self

    def reset(self):
        self.cache = None

    def _take(self, out):
        self.cache = out.cache
        self.tok = out.logits[:, -1].float().argmax(-1)

    def prefill(self, ids):
        self._take(self.lm(ids))

    def step(self):
        self._take(self.lm(self.tok[:, None], self.cache))

    def weight_bytes(self):
        """The export's weight file (2-bit ternary initializers, embeddings, norms, scales)."""
        return self.manifest["file_bytes"][self.manifest["files"]["data"]]

    def state_bytes(self):
        return 0 if self.cache is None else self.cache.nbytes()

    def bytes_per_decode_token(self, prompt_len, gen_len):
        """What decode.onnx reads per token once folded: one byte per ternary weight, the fp32 norms, one
        embedding row per sequence, the state in and out."""
        d, L = self.cfg.hidden_size, self.cfg.num_hidden_layers
        mats, _ = mmf_matrices(self.cfg)
        norms = L * (sum(k for _, k in mats) + 3 * d) + d + self.cfg.hidden_size
        return ternary_weights(self.cfg) + 4 * norms + self.batch * d * 4 + 2 * self.batch * L * d * 4

    def close(self):
        self.lm = None
        self.tmp.cleanup()


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


def build_runner(variant: str, cfg_m: MMFConfig, cfg_l: LlamaConfig, device, dtype, fmt: str,
                 layers: Optional[int], seed: int) -> Runner:
    """The runner of ``variant`` (mmf, mmf-onnxruntime, transformer++ or hf-llama) around a random model of
    ``layers`` layers (None: the config's)."""
    if variant == "mmf":  # on the CPU in fp32 activations: the native whole-model decode step's form
        cpu = torch.device(device).type == "cpu"
        return MMFRunner(build_mmf_random(cfg_m, device, torch.float32 if cpu else dtype, fmt, layers, seed), device)
    if variant == ONNX_VARIANT:  # the same random weights as ``mmf``'s (i2 bytes, same seed), exported
        return OnnxRunner(build_mmf_random(cfg_m, "cpu", dtype, "i2", layers, seed))
    if variant == "transformer++":
        from mmf.llama_static import StaticLlama

        return StaticLlamaRunner(StaticLlama.random(cfg_l, device, dtype, layers, seed), device)
    return HFRunner(build_hf_llama_random(cfg_l, device, dtype, layers, seed), device)
