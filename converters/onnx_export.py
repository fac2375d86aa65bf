"""`mmf export-onnx`: prefill and decode-step ONNX graphs of either architecture, built op by op.

The graphs are written directly with ``onnx.helper`` (no tracing): every op is the arithmetic of
docs/reference-semantics.md, in the order the torch model does it.

* ``prefill.onnx``: ``input_ids`` (batch x seq) -> ``logits`` (batch x seq x vocab) and the state:
  MatMul-free: ``present.{l}.state`` (batch x d, fp32), the MLGRU recurrence run by an ONNX ``Scan``;
  Transformer++: ``present.{l}.key`` / ``present.{l}.value`` (batch x kv_heads x seq x head_dim).
* ``decode.onnx``: ``input_ids`` (batch x 1) + ``past.{l}.*`` -> ``logits`` + ``present.{l}.*``.
* ``weights.onnx_data``: every weight once, shared by both graphs (ONNX external data).
* ``mmf_onnx.json``: inputs, outputs, shapes, the state mapping and the model config;
  the tokenizer file of the checkpoint.

BitLinear with ``--weights packed`` (the MatMul-free default): the ternary weights are the i2
planar bytes of ``mmf.ternary_codes.pack_i2`` in uint8 initializers, stored transposed
(``{name}.packed_t``: ceil(K/4) x N, byte (j, n) = ``pack_i2(w)[n, j]``). Inside the graph
``BitShift``/``BitwiseAnd``/``Reshape``/``Cast``/``Sub`` turn them into int8 weights {-1, 0, 1}
(4 ceil(K/4) x N; the activations are padded to that length when K % 4 != 0); the activations are rms-normed (eps
1e-6), quantised per token to int8 (absmax, ``Round`` is half-to-even like torch.round), offered
to ``MatMulInteger`` as uint8 ``xq + 128`` with zero point 128 (ONNX Runtime's fast u8 x s8 GEMM;
s8 x u8 runs a kernel about 40x slower), which computes ``acc = xq @ w^T`` exactly in int32 (equal
to the fp32 sum of the reference while K * 128 < 2^24); then ``y = acc / (s_x * s_w)``. All of the
unpacking depends on initializers only, so ONNX Runtime's constant folding (on by default) runs it
once at load and keeps the int8 weights (1 byte per weight) in memory; with folding disabled it
keeps the 2-bit bytes and unpacks at every call.

``--weights float`` stores the ternary values {-1, 0, 1} as plain float initializers (K x N) with
the scale ``s_w`` beside them, and uses a float ``MatMul``: the same numbers, for tools that want
float weights. Transformer++ always exports float weights.

``--dtype fp16`` stores embeddings and float weights in fp16 and carries the activations between
layers in fp16 (as the torch model does in fp16); norms, quantisation, the recurrence and the
attention softmax run in fp32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mmf.errors import MMFError

from .onnx_graph import NP_TO_ONNX, GraphBuilder, make_model, value_info, write_shared_data
from mmf.ternary_codes import pack_i2

SUPPORTED_OPSETS = (18, 19, 20, 21)
DEFAULT_OPSET = 18
PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
DATA_FILE = "weights.onnx_data"
MANIFEST_FILE = "mmf_onnx.json"
FORMAT_VERSION = 1
WEIGHT_MODES = ("packed", "float")
DTYPES = {"fp32": np.float32, "fp16": np.float16}
BITLINEAR_EPS = 1e-6
I64 = 7  # TensorProto.INT64
FLOAT = 1


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

def check_options(arch: str, weights: Optional[str], opset: int, dtype: str) -> str:
    """Validate the export options for ``arch``; returns the weight mode to use."""
    if opset not in SUPPORTED_OPSETS:
        raise MMFError(f"ONNX opset {opset} is not supported; use --opset {SUPPORTED_OPSETS[0]} to "
                       f"{SUPPORTED_OPSETS[-1]} (default {DEFAULT_OPSET})")
    if dtype not in DTYPES:
        raise MMFError(f"--dtype {dtype!r} is not supported for ONNX export; use fp32 or fp16")
    if weights is None:
        weights = "packed" if arch == "mmf" else "float"
    if weights not in WEIGHT_MODES:
        raise MMFError(f"--weights {weights!r} is not supported; use packed or float")
    if weights == "packed" and arch != "mmf":
        raise MMFError("a Transformer++ checkpoint has no ternary weights to store as 2-bit codes; "
                       "use --weights float")
    return weights


def _fits_dtype(name: str, t: torch.Tensor, np_dtype) -> None:
    if np_dtype == np.float16 and t.is_floating_point():
        m = t.detach().float().abs().max().item() if t.numel() else 0.0
        if not math.isfinite(m) or m > 65504.0:
            raise MMFError(f"tensor {name} holds {m:g}, beyond fp16's range (65504); export with --dtype fp32")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise MMFError(f"tensor {name} holds inf or NaN; ONNX Runtime would propagate it: fix the checkpoint")


# ----------------------------------------------------------------------------------------------
# graph pieces shared by both architectures
# ----------------------------------------------------------------------------------------------

class _Ops:
    """Graph-building helpers bound to one graph and the export dtype."""

    def __init__(self, g: GraphBuilder, np_dtype):
        self.g = g
        self.half = np_dtype == np.float16
        self.T = NP_TO_ONNX[np.dtype(np_dtype)]

    def up(self, x):  # activation dtype -> fp32
        return self.g.op("Cast", x, to=FLOAT) if self.half else x

    def down(self, x):  # fp32 -> activation dtype
        return self.g.op("Cast", x, to=self.T) if self.half else x

    def rms_norm(self, xf, weight: Optional[str], eps: float):
        """fp32 in, fp32 out: x / sqrt(mean(x^2) + eps) * weight."""
        g = self.g
        ms = g.op("ReduceMean", g.op("Mul", xf, xf), g.i64(-1), keepdims=1)
        y = g.op("Mul", xf, g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, g.f32(eps)))))
        return g.op("Mul", y, g.weight(weight)) if weight else y

    # sigmoid and silu as 1 / (1 + exp(-x)) and x / (1 + exp(-x)), like torch's CPU kernels: ONNX
    # Runtime's Sigmoid is an approximation (up to 4e-3 relative error in the tails) whose differences
    # flip int8 rounding decisions downstream; through Exp they agree with torch to ~1 ulp.
    # fp32 in, fp32 out.
    def _one_plus_exp_neg(self, x):
        return self.g.op("Add", self.g.op("Exp", self.g.op("Neg", x)), self.g.f32(1.0))

    def sigmoid(self, x):
        return self.g.op("Div", self.g.f32(1.0), self._one_plus_exp_neg(x))

    def silu(self, x):
        return self.g.op("Div", x, self._one_plus_exp_neg(x))

    def slice_last(self, x, start: int, end: int):
        return self.g.op("Slice", x, self.g.i64(start), self.g.i64(end), self.g.i64(-1))

    def batch_dim(self, ids):
        return self.g.op("Slice", self.g.op("Shape", ids), self.g.i64(0), self.g.i64(1))


# ----------------------------------------------------------------------------------------------
# MatMul-free (HGRNBit)
# ----------------------------------------------------------------------------------------------

def _mmf_weights(model, np_dtype, mode: str) -> tuple[dict, dict]:
    """Initializer arrays of a frozen HGRNBit model, and per BitLinear (in, out, has_bias)."""
    from mmf.models import FrozenBitLinear

    W: dict = {}
    lin: dict = {}

    def fp32(name, t):
        _fits_dtype(name, t, np_dtype)
        # values rounded to the export dtype first, as a model of that dtype would hold them
        W[name] = t.detach().to(torch.float16 if np_dtype == np.float16 else torch.float32).float().cpu().numpy()

    def act(name, t):
        _fits_dtype(name, t, np_dtype)
        W[name] = t.detach().float().cpu().numpy().astype(np_dtype)

    def bitlinear(prefix, m):
        if not isinstance(m, FrozenBitLinear):
            raise MMFError(f"module {prefix} is {type(m).__name__}, not a frozen BitLinear; "
                           "ONNX export needs the model's inference form")
        if mode == "packed" and getattr(m, "packed", None) is not None:
            packed = m.packed.detach().cpu()
            if bool((((packed.unsqueeze(0) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1, 1)) & 3)
                     == 3).any()):
                raise MMFError(f"{prefix}: packed weights hold code 3 (weight +2), not ternary; "
                               "the checkpoint is corrupt or not an i2 pack")
        else:
            codes = m.ternary_codes().detach().cpu()
            if codes.numel() and (codes.min() < -1 or codes.max() > 1):
                raise MMFError(f"{prefix}: weights are not ternary (codes outside -1..1); "
                               "ONNX BitLinear export needs ternary codes")
            packed = pack_i2(codes.to(torch.int8)) if mode == "packed" else None
        if mode == "packed":  # the pack_i2 bytes, stored transposed: (P, N), so no transpose in the graph
            W[f"{prefix}.packed_t"] = packed.t().contiguous().numpy()
        else:
            W[f"{prefix}.codes_t"] = codes.t().contiguous().to(torch.float16 if np_dtype == np.float16
                                                               else torch.float32).numpy()
        s_w = m.weight_scale.detach().float().cpu().reshape(())
        if not (torch.isfinite(s_w) and s_w > 0):
            raise MMFError(f"{prefix}: weight scale {s_w.item()} is not a positive finite number")
        W[f"{prefix}.weight_scale"] = s_w.numpy().astype(np.float32)
        fp32(f"{prefix}.norm.weight", m.norm.weight)
        if m.bias is not None:
            W[f"{prefix}.bias"] = m.bias.detach().float().cpu().numpy()
        lin[prefix] = (m.in_features, m.out_features, m.bias is not None)

    mm = model.model
    act("model.embeddings.weight", mm.embeddings.weight)
    _fp16_if_lossless(W, "model.embeddings.weight")
    lbs = mm.layer_lower_bounds()
    for l, layer in enumerate(mm.layers):
        p = f"model.layers.{l}"
        fp32(f"{p}.attn_norm.weight", layer.attn_norm.weight)
        fp32(f"{p}.mlp_norm.weight", layer.mlp_norm.weight)
        fp32(f"{p}.attn.g_norm.weight", layer.attn.g_norm.weight)
        if lbs[l] is not None:
            W[f"{p}.attn.lower_bound"] = lbs[l].detach().float().cpu().numpy()
        for name in ("i_proj", "f_proj", "g_proj", "o_proj"):
            bitlinear(f"{p}.attn.{name}", getattr(layer.attn, name))
        bitlinear(f"{p}.mlp.gate_proj", layer.mlp.gate_proj)
        bitlinear(f"{p}.mlp.down_proj", layer.mlp.down_proj)
    fp32("model.norm.weight", mm.norm.weight)
    bitlinear("lm_head", model.lm_head)
    return W, lin


def _fp16_if_lossless(W: dict, name: str) -> None:
    """Store an fp32 embedding table as fp16 when every value is exactly an fp16 (e.g. it came from a
    packed or fp16 checkpoint): half the bytes, the same numbers; the graph casts the gathered rows."""
    a = W[name]
    if a.dtype == np.float32:
        h = a.astype(np.float16)
        if np.array_equal(h.astype(np.float32), a):
            W[name] = h


def _embed(o: _Ops, name: str, ids: str):
    x = o.g.op("Gather", o.g.weight(name), ids, axis=0)
    if o.g.weights[name].dtype == np.float16 and not o.half:
        x = o.g.op("Cast", x, to=FLOAT)
    return x


def _bitlinear(o: _Ops, x, prefix: str, lin: dict, mode: str):
    """y = (xq @ codes^T) / (s_x * s_w) of docs/reference-semantics.md; x and y in the activation dtype."""
    g = o.g
    k, n, has_bias = lin[prefix]
    xn = o.rms_norm(o.up(x), f"{prefix}.norm.weight", BITLINEAR_EPS)
    amax = g.op("ReduceMax", g.op("Abs", xn), g.i64(-1), keepdims=1)
    s_x = g.op("Div", g.f32(127.0), g.op("Max", amax, g.f32(1e-5)))
    xq = g.op("Clip", g.op("Round", g.op("Mul", xn, s_x)), g.f32(-128.0), g.f32(127.0))
    if mode == "packed":
        packed_t = g.weight(f"{prefix}.packed_t")  # (P, N) uint8: byte (j, n) holds k = j, P+j, 2P+j, 3P+j
        p = g.weights[packed_t].shape[0]
        shifts = g.const(np.array([0, 2, 4, 6], np.uint8).reshape(4, 1, 1), np.uint8)
        planes = g.op("BitwiseAnd", g.op("BitShift", packed_t, shifts, direction="RIGHT"), g.const(3, np.uint8))
        # (4, P, N) -> (4P, N): row s*P + j is k = s*P + j, the planar order; rows k >= K hold code 1
        w_t = g.op("Sub", g.op("Cast", g.op("Reshape", planes, g.i64(4 * p, n)), to=3), g.const(1, np.int8))
        # activations as uint8 xq + 128 with zero point 128: ONNX Runtime's fast u8 x s8 integer GEMM
        xu = g.op("Cast", g.op("Add", xq, g.f32(128.0)), to=2)
        if 4 * p != k:  # pad the activations to 4P (the padding meets weight 0)
            xu = g.op("Pad", xu, g.i64(0, 0, 0, 0, 0, 4 * p - k), g.const(128, np.uint8))
        acc = g.op("Cast", g.op("MatMulInteger", xu, w_t, g.const(128, np.uint8)), to=FLOAT)
    else:
        acc = g.op("MatMul", xq, o.up(g.weight(f"{prefix}.codes_t")))
    y = g.op("Div", acc, g.op("Mul", s_x, g.weight(f"{prefix}.weight_scale")))
    if has_bias:
        y = g.op("Add", y, g.weight(f"{prefix}.bias"))
    return o.down(y)


def _scan_body(d: int) -> "onnx.GraphProto":
    from onnx import helper

    nodes = [helper.make_node("Mul", ["f_t", "s_prev"], ["fs"]), helper.make_node("Add", ["fs", "i_t"], ["s_next"]),
             helper.make_node("Identity", ["s_next"], ["s_out"])]
    ins = [value_info("s_prev", FLOAT, ["batch", d]), value_info("i_t", FLOAT, ["batch", d]),
           value_info("f_t", FLOAT, ["batch", d])]
    outs = [value_info("s_next", FLOAT, ["batch", d]), value_info("s_out", FLOAT, ["batch", d])]
    return helper.make_graph(nodes, "mlgru_step", ins, outs)


def _mmf_graph(cfg, W, lin, mode, np_dtype, decode: bool):
    """Build prefill (decode=False) or decode graph; returns (builder, inputs, outputs)."""
    g = GraphBuilder("mmf_decode" if decode else "mmf_prefill", W)
    o = _Ops(g, np_dtype)
    d, L, V, m = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.ffn_size
    seq = 1 if decode else "seq"
    inputs = [value_info("input_ids", I64, ["batch", seq])]
    outputs = [value_info("logits", o.T, ["batch", seq, V])]
    x = _embed(o, "model.embeddings.weight", "input_ids")
    if not decode:
        zeros = g.op("ConstantOfShape", g.op("Concat", o.batch_dim("input_ids"), g.i64(d), axis=0),
                     value=_tensor(np.zeros(1, np.float32)))
    present = []
    for l in range(L):
        p = f"model.layers.{l}"
        h = o.down(o.rms_norm(o.up(x), f"{p}.attn_norm.weight", cfg.rms_norm_eps))
        i_pre = _bitlinear(o, h, f"{p}.attn.i_proj", lin, mode)
        f_pre = _bitlinear(o, h, f"{p}.attn.f_proj", lin, mode)
        f = o.sigmoid(o.up(f_pre))
        if f"{p}.attn.lower_bound" in W:
            lb = g.weight(f"{p}.attn.lower_bound")
            f = g.op("Add", lb, g.op("Mul", g.op("Sub", g.f32(1.0), lb), f))
        i = g.op("Mul", o.silu(o.up(i_pre)), g.op("Sub", g.f32(1.0), f))
        if decode:
            inputs.append(value_info(f"past.{l}.state", FLOAT, ["batch", d]))
            s_last = g.op("Add", g.op("Mul", g.op("Squeeze", f, g.i64(1)), f"past.{l}.state"),
                          g.op("Squeeze", i, g.i64(1)), out_names=[f"present.{l}.state"])
            s_all = g.op("Unsqueeze", s_last, g.i64(1))
        else:
            s_last, s_all = g.op("Scan", zeros, i, f, out_names=[f"present.{l}.state", g.fresh("mlgru_states")],
                                 body=_scan_body(d), num_scan_inputs=2, scan_input_axes=[1, 1],
                                 scan_output_axes=[1])
        outputs.append(value_info(f"present.{l}.state", FLOAT, ["batch", d]))
        present.append(f"present.{l}.state")
        gp = _bitlinear(o, h, f"{p}.attn.g_proj", lin, mode)
        gated = o.down(g.op("Mul", o.rms_norm(o.up(gp), f"{p}.attn.g_norm.weight", cfg.rms_norm_eps), o.silu(s_all)))
        r = g.op("Add", x, _bitlinear(o, gated, f"{p}.attn.o_proj", lin, mode))
        h2 = o.down(o.rms_norm(o.up(r), f"{p}.mlp_norm.weight", cfg.rms_norm_eps))
        u = _bitlinear(o, h2, f"{p}.mlp.gate_proj", lin, mode)
        mid = g.op("Mul", o.down(o.silu(o.up(o.slice_last(u, 0, m)))), o.slice_last(u, m, 2 * m))
        x = g.op("Add", r, _bitlinear(o, mid, f"{p}.mlp.down_proj", lin, mode))
    xn = o.down(o.rms_norm(o.up(x), "model.norm.weight", cfg.rms_norm_eps))
    logits = _bitlinear(o, xn, "lm_head", lin, mode)
    g.op("Identity", logits, out_names=["logits"])
    return g, inputs, outputs


def _tensor(arr):
    from onnx import numpy_helper

    return numpy_helper.from_array(arr)


# ----------------------------------------------------------------------------------------------
# Transformer++ (Llama)
# ----------------------------------------------------------------------------------------------

def _llama_weights(model, np_dtype) -> tuple[dict, dict]:
    W: dict = {}
    lin: dict = {}
    cfg = model.config

    def act(name, t):
        _fits_dtype(name, t, np_dtype)
        W[name] = t.detach().float().cpu().numpy().astype(np_dtype)

    def norm(name, t):
        _fits_dtype(name, t, np_dtype)
        W[name] = t.detach().to(torch.float16 if np_dtype == np.float16 else torch.float32).float().cpu().numpy()

    def linear(prefix, m):
        act(f"{prefix}.weight_t", m.weight.t().contiguous())
        if m.bias is not None:
            act(f"{prefix}.bias", m.bias)
        lin[prefix] = (m.in_features, m.out_features, m.bias is not None)

    mm = model.model
    act("model.embed_tokens.weight", mm.embed_tokens.weight)
    if model.lm_head.weight is not mm.embed_tokens.weight:
        _fp16_if_lossless(W, "model.embed_tokens.weight")
    for l, layer in enumerate(mm.layers):
        p = f"model.layers.{l}"
        norm(f"{p}.input_layernorm.weight", layer.input_layernorm.weight)
        norm(f"{p}.post_attention_layernorm.weight", layer.post_attention_layernorm.weight)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear(f"{p}.self_attn.{name}", getattr(layer.self_attn, name))
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear(f"{p}.mlp.{name}", getattr(layer.mlp, name))
    norm("model.norm.weight", mm.norm.weight)
    if model.lm_head.weight is mm.embed_tokens.weight:
        lin["lm_head"] = "tied"
    else:
        linear("lm_head", model.lm_head)
    hd = cfg.dim_head
    inv_freq = 1.0 / (cfg.theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    W["rope.inv_freq"] = inv_freq.reshape(1, -1).numpy().astype(np.float32)
    return W, lin


def _linear(o: _Ops, x, prefix: str, lin: dict):
    g = o.g
    if lin[prefix] == "tied":
        return g.op("MatMul", x, g.op("Transpose", g.weight("model.embed_tokens.weight"), perm=[1, 0]))
    y = g.op("MatMul", x, g.weight(f"{prefix}.weight_t"))
    if lin[prefix][2]:
        y = g.op("Add", y, g.weight(f"{prefix}.bias"))
    return y


def _llama_graph(cfg, W, lin, np_dtype, decode: bool):
    g = GraphBuilder("llama_decode" if decode else "llama_prefill", W)
    o = _Ops(g, np_dtype)
    L, V = cfg.num_hidden_layers, cfg.vocab_size
    H, Hkv, hd = cfg.num_attention_heads, cfg.n_kv_heads, cfg.dim_head
    rep = H // Hkv
    seq = 1 if decode else "seq"
    total = "total_seq" if decode else "seq"
    inputs = [value_info("input_ids", I64, ["batch", seq])]
    outputs = [value_info("logits", o.T, ["batch", seq, V])]
    if decode:
        for l in range(L):
            for kv in ("key", "value"):
                inputs.append(value_info(f"past.{l}.{kv}", o.T, ["batch", Hkv, "past_seq", hd]))
        past_len = g.op("Gather", g.op("Shape", "past.0.key"), g.i64(2), axis=0)  # (1,)
    else:
        past_len = g.i64(0)
    t_len = g.op("Gather", g.op("Shape", "input_ids"), g.i64(1), axis=0)  # (1,)
    s_len = g.op("Add", past_len, t_len)
    scalar = lambda v: g.op("Squeeze", v, g.i64(0))  # noqa: E731
    pos = g.op("Range", scalar(past_len), scalar(s_len), g.const(1, np.int64))
    freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=FLOAT), g.i64(1)), g.weight("rope.inv_freq"))
    emb = g.op("Concat", freqs, freqs, axis=-1)
    cos, sin = o.down(g.op("Cos", emb)), o.down(g.op("Sin", emb))
    rows = g.op("Add", g.op("Unsqueeze", g.op("Range", g.const(0, np.int64), scalar(t_len), g.const(1, np.int64)),
                            g.i64(1)), past_len)
    cols = g.op("Unsqueeze", g.op("Range", g.const(0, np.int64), scalar(s_len), g.const(1, np.int64)), g.i64(0))
    allowed = g.op("LessOrEqual", cols, rows)  # (T, S): key j visible to query i iff j <= past + i
    neg_inf = g.f32(-np.inf)
    scale = g.f32(1.0 / math.sqrt(hd))
    half = hd // 2

    def heads(y, n):
        return g.op("Transpose", g.op("Reshape", y, g.i64(0, 0, n, hd)), perm=[0, 2, 1, 3])

    def rope(y):
        rot = g.op("Concat", g.op("Neg", o.slice_last(y, half, hd)), o.slice_last(y, 0, half), axis=-1)
        return g.op("Add", g.op("Mul", y, cos), g.op("Mul", rot, sin))

    x = _embed(o, "model.embed_tokens.weight", "input_ids")
    for l in range(L):
        p = f"model.layers.{l}"
        h = o.down(o.rms_norm(o.up(x), f"{p}.input_layernorm.weight", cfg.rms_norm_eps))
        q = rope(heads(_linear(o, h, f"{p}.self_attn.q_proj", lin), H))
        k = rope(heads(_linear(o, h, f"{p}.self_attn.k_proj", lin), Hkv))
        v = heads(_linear(o, h, f"{p}.self_attn.v_proj", lin), Hkv)
        if decode:
            k = g.op("Concat", f"past.{l}.key", k, axis=2, out_names=[f"present.{l}.key"])
            v = g.op("Concat", f"past.{l}.value", v, axis=2, out_names=[f"present.{l}.value"])
        else:
            k = g.op("Identity", k, out_names=[f"present.{l}.key"])
            v = g.op("Identity", v, out_names=[f"present.{l}.value"])
        for kv in ("key", "value"):
            outputs.append(value_info(f"present.{l}.{kv}", o.T, ["batch", Hkv, total, hd]))
        # attention in fp32; query heads grouped by the kv head they share: (B, Hkv, rep, T, hd)
        qg = g.op("Reshape", o.up(q), g.i64(0, Hkv, rep, -1, hd))
        kg = g.op("Transpose", g.op("Unsqueeze", o.up(k), g.i64(2)), perm=[0, 1, 2, 4, 3])
        vg = g.op("Unsqueeze", o.up(v), g.i64(2))
        scores = g.op("Where", allowed, g.op("Mul", g.op("MatMul", qg, kg), scale), neg_inf)
        att = g.op("MatMul", g.op("Softmax", scores, axis=-1), vg)
        att = g.op("Reshape", g.op("Transpose", g.op("Reshape", att, g.i64(0, H, -1, hd)), perm=[0, 2, 1, 3]),
                   g.i64(0, 0, H * hd))
        x = g.op("Add", x, _linear(o, o.down(att), f"{p}.self_attn.o_proj", lin))
        h2 = o.down(o.rms_norm(o.up(x), f"{p}.post_attention_layernorm.weight", cfg.rms_norm_eps))
        mid = g.op("Mul", o.down(o.silu(o.up(_linear(o, h2, f"{p}.mlp.gate_proj", lin)))),
                   _linear(o, h2, f"{p}.mlp.up_proj", lin))
        x = g.op("Add", x, _linear(o, mid, f"{p}.mlp.down_proj", lin))
    xn = o.down(o.rms_norm(o.up(x), "model.norm.weight", cfg.rms_norm_eps))
    g.op("Identity", _linear(o, xn, "lm_head", lin), out_names=["logits"])
    return g, inputs, outputs


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------

_ONNX_TYPE_NAMES = {1: "float32", 10: "float16", 7: "int64"}


def _io_spec(infos) -> list:
    out = []
    for vi in infos:
        tt = vi.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
        out.append({"name": vi.name, "dtype": _ONNX_TYPE_NAMES[tt.elem_type], "shape": dims})
    return out


def _state_map(arch: str, L: int) -> list:
    names = ["state"] if arch == "mmf" else ["key", "value"]
    return [{"prefill_output": f"present.{l}.{n}", "decode_input": f"past.{l}.{n}",
             "decode_output": f"present.{l}.{n}"} for l in range(L) for n in names]


def export_model(model, out, tokenizer=None, weights: Optional[str] = None, opset: int = DEFAULT_OPSET,
                 dtype: str = "fp32", force: bool = False, check: bool = True, source: Optional[str] = None) -> dict:
    """Export an in-memory model (either architecture, training or frozen form) to directory ``out``.

    Written atomically: on any error nothing is left at ``out`` (a full disk is one MMFError line);
    ``force`` replaces only a directory mmf wrote. Returns the manifest (a dict).
    """
    import onnx

    from mmf import __version__
    from mmf.outputs import atomic_directory, check_output

    cfg = model.config
    arch = cfg.arch
    mode = check_options(arch, weights, opset, dtype)
    check_output(Path(out), force)
    np_dtype = DTYPES[dtype]
    if arch == "mmf":
        if not getattr(model, "is_frozen", True):
            model = _frozen_copy(model)
        W, lin = _mmf_weights(model, np_dtype, mode)
        build = lambda decode: _mmf_graph(cfg, W, lin, mode, np_dtype, decode)  # noqa: E731
    elif arch == "transformer++":
        W, lin = _llama_weights(model, np_dtype)
        build = lambda decode: _llama_graph(cfg, W, lin, np_dtype, decode)  # noqa: E731
    else:
        raise MMFError(f"architecture {arch!r} cannot be exported to ONNX; supported: mmf, transformer++")

    graphs = {}
    for kind, decode in (("prefill", False), ("decode", True)):
        graphs[kind] = build(decode)
    out = Path(out)
    with atomic_directory(out, force, need_bytes=sum(a.nbytes for a in W.values())) as tmp:
        layout = write_shared_data(W, tmp, DATA_FILE)
        spec = {}
        for kind, fname in (("prefill", PREFILL_FILE), ("decode", DECODE_FILE)):
            g, ins, outs = graphs[kind]
            proto = make_model(g, ins, outs, layout, DATA_FILE, opset,
                               doc=f"mmf {arch} {kind} graph, {mode} weights, {dtype}")
            onnx.save_model(proto, str(tmp / fname))
            if check:
                try:
                    onnx.checker.check_model(str(tmp / fname), full_check=True)
                except onnx.checker.ValidationError as e:  # a bug in this exporter, never user input
                    raise RuntimeError(f"{fname} fails onnx.checker: {str(e).splitlines()[0]}") from None
            spec[kind] = {"file": fname, "inputs": _io_spec(ins), "outputs": _io_spec(outs)}
        tok_file = None
        if tokenizer is not None:
            before = set(p.name for p in tmp.iterdir())
            tokenizer.save(tmp)
            new = sorted(set(p.name for p in tmp.iterdir()) - before)
            tok_file = new[0] if new else None
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        manifest = {
            "format": "mmf-onnx", "format_version": FORMAT_VERSION, "mmf_version": __version__,
            "arch": arch, "weights": mode, "dtype": dtype, "opset": opset,
            "files": {"prefill": PREFILL_FILE, "decode": DECODE_FILE, "data": DATA_FILE, "tokenizer": tok_file},
            "graphs": spec, "state": _state_map(arch, cfg.num_hidden_layers),
            "config": cfg.to_hf_dict(), "file_bytes": sizes, "source": source,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["file_bytes"][MANIFEST_FILE] = (out / MANIFEST_FILE).stat().st_size
    return manifest


def _frozen_copy(model):
    import copy

    return copy.deepcopy(model).freeze()


def export_onnx(checkpoint, out, weights: Optional[str] = None, opset: int = DEFAULT_OPSET, dtype: str = "fp32",
                force: bool = False, check: bool = True) -> dict:
    """Load ``checkpoint`` (latent, float or packed; either architecture) and export it to ``out``."""
    from mmf.checkpoint import load_config, load_model
    from mmf.errors import CheckpointError
    from mmf.outputs import check_output
    from mmf.tokenizer import load_tokenizer, warn_if_no_tokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    cfg = load_config(checkpoint)
    check_options(cfg.arch, weights, opset, dtype)
    src, dst = checkpoint.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise MMFError(f"--out {out} overlaps the checkpoint {checkpoint}; write the export to a separate directory")
    check_output(out, force)  # before loading: a refused --out costs nothing
    model = load_model(checkpoint, device="cpu", dtype=torch.float32, frozen=True)
    try:
        tok = load_tokenizer(checkpoint, cfg.bos_token_id, cfg.eos_token_id)
    except CheckpointError:
        tok = None
    manifest = export_model(model, out, tok, weights, opset, dtype, force, check, source=str(checkpoint))
    warn_if_no_tokenizer(checkpoint, out)
    return manifest
