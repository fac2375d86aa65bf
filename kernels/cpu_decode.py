"""A whole decode step of a frozen MatMul-free model on the CPU in one native call (``kernels/cpu/``).

``HGRNBitForCausalLM.forward`` on one new token per sequence, on the CPU, without a gradient, runs
``step`` here when the model qualifies: every dense layer a ``FrozenBitLinear`` without bias (int8
codes, packed to i2 once, or i2 bytes), float parameters in fp32 (the embedding table may be bf16:
its rows are widened exactly). ``mmf_hgrn_step`` in ``ternary_cpu.c`` then computes the embedding
rows, every layer (RMSNorm, the i/f/g BitLinears, the MLGRU step and its lower bound, the gated
RMSNorm, o, the residual, RMSNorm, gate|up, silu(gate) * up, down, the residual), the final norm and
the LM head, for B rows, with the native BitLinear of ``cpu_ternary`` and the torch reference's
elementwise operations in its order. So a decode step is one ctypes call rather than some 145 kernel
calls and several hundred torch operations: the per-token Python and dispatch work that dominated
small models' decode is gone. Its reference is the model's own eager forward (``kernels.reference``
compositions), which ``MMF_FORCE_REFERENCE=1`` runs; tests/test_cpu_decode.py compares the two.

The plan (pointer tables, fp32 copies of the norm weights, i2 bytes) is built at the first step and
kept on the model; it is rebuilt when any weight tensor is replaced or changed in place.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from . import cpu_ternary
from .reference import BITLINEAR_NORM_EPS

PTRS, FLOATS = 16, 9  # per layer: HGRN_PTRS, HGRN_FLOATS of ternary_cpu.c
_PLAN = "_mmf_cpu_decode_plan"


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # made under torch.inference_mode(): no version counter
        return None


def _fp32(t: torch.Tensor) -> Optional[torch.Tensor]:
    return t.detach().contiguous() if t.dtype == torch.float32 else None


class _Plan:
    """What one native step needs: pointers, scalars and the tensors that own the memory."""

    def __init__(self, model, linear_cls):
        cfg = model.config
        self.L, self.d, self.m, self.V = cfg.num_hidden_layers, cfg.hidden_size, cfg.ffn_size, cfg.vocab_size
        self.keep: list = []  # tensors whose memory the pointers name
        self.watch: list = []  # (tensor, data_ptr, version) of every weight read, to notice a change

        def fp32(t):
            f = _fp32(t)
            if f is None:
                raise _NotEligible(f"{t.dtype} parameters")
            self.watch.append((t, t.data_ptr(), _version(t)))
            self.keep.append(f)
            return f.data_ptr()

        def linear(mod, k, n):
            if type(mod) is not linear_cls or mod.bias is not None or (mod.in_features, mod.out_features) != (k, n):
                raise _NotEligible(f"{type(mod).__name__} layers")
            src = mod.packed if mod.packed is not None else mod.codes
            if mod.packed is not None:
                i2 = mod.packed.contiguous()
            else:
                i2 = mod._i2_for_cpu(torch.empty(0))  # packs the int8 codes once (kept beside them)
                if i2 is None:
                    raise _NotEligible("no native kernel for these weights")
            self.watch.append((src, src.data_ptr(), _version(src)))
            self.keep.append(i2)
            return i2.data_ptr(), fp32(mod.norm.weight), float(mod.weight_scale)

        emb = model.model.embeddings.weight
        if emb.dtype not in (torch.float32, torch.bfloat16) or tuple(emb.shape) != (self.V, self.d):
            raise _NotEligible(f"a {emb.dtype} embedding table")
        self.emb = emb.detach().contiguous()
        self.watch.append((emb, emb.data_ptr(), _version(emb)))
        self.emb_bf16 = int(emb.dtype == torch.bfloat16)
        lbs = model.model.layer_lower_bounds()
        ptrs, floats = [], []
        d, m = self.d, self.m
        for layer, lb in zip(model.model.layers, lbs):
            a, p = layer.attn, layer.mlp
            lb_ptr = None
            if lb is not None:
                lbf = lb.detach().float().contiguous()
                self.keep.append(lbf)
                lb_ptr = lbf.data_ptr()
            row = [fp32(layer.attn_norm.weight), fp32(a.g_norm.weight), fp32(layer.mlp_norm.weight), lb_ptr]
            scales = []
            for mod, k, n in ((a.i_proj, d, d), (a.f_proj, d, d), (a.g_proj, d, d), (a.o_proj, d, d),
                              (p.gate_proj, d, 2 * m), (p.down_proj, m, d)):
                w, nw, s_w = linear(mod, k, n)
                row += [w, nw]
                scales.append(s_w)
            fl = [layer.attn_norm.eps, a.g_norm.eps, layer.mlp_norm.eps, *scales]
            assert (len(row), len(fl)) == (PTRS, FLOATS), "the layer layout of mmf_hgrn_step"
            ptrs += row
            floats += fl
        if model.model.lower_bounds is not None:
            lbp = model.model.lower_bounds
            self.watch.append((lbp, lbp.data_ptr(), _version(lbp)))
        self.lp = (ctypes.c_void_p * len(ptrs))(*ptrs)
        self.lf = (ctypes.c_float * len(floats))(*floats)
        self.final_norm, self.eps_final = fp32(model.model.norm.weight), float(model.model.norm.eps)
        self.head_w, self.head_nw, self.head_sw = linear(model.lm_head, d, self.V)

    def fresh(self) -> bool:
        return all(t.data_ptr() == ptr and _version(t) == ver for t, ptr, ver in self.watch)


class _NotEligible(Exception):
    pass


def plan_for(model, linear_cls) -> Optional[_Plan]:
    """The model's native-step plan, built (or rebuilt after a weight change) here; None where it does not apply."""
    plan = model.__dict__.get(_PLAN)
    if plan is False:  # found ineligible before: the eager forward runs (not checked again)
        return None
    if plan is not None and plan.fresh():
        return plan
    try:
        plan = _Plan(model, linear_cls)
    except _NotEligible:
        model.__dict__[_PLAN] = False
        return None
    model.__dict__[_PLAN] = plan
    return plan


def step(model, input_ids: torch.Tensor, states: list, linear_cls):
    """One decode step on input_ids (B, 1) from the per-layer states (fp32 (B, d) or None): (logits (B, V),
    new states (L, B, d)), or None where the native step does not apply. ``linear_cls``: the frozen
    BitLinear class (FrozenBitLinear; subclasses with other storage are not read here)."""
    plan = plan_for(model, linear_cls)
    if plan is None:
        return None
    lib = cpu_ternary._state["lib"] or cpu_ternary._require()
    B = input_ids.shape[0]
    L, d, m, V = plan.L, plan.d, plan.m, plan.V
    ids = input_ids.reshape(B).to(torch.int64).contiguous()
    if bool(((ids < 0) | (ids >= V)).any()):
        raise IndexError(f"token ids must be in 0..{V - 1}")
    keep = []
    sp = (ctypes.c_void_p * L)()
    for l, s in enumerate(states):
        if s is not None:
            if s.dtype != torch.float32 or tuple(s.shape) != (B, d) or not s.is_cpu:
                return None  # an unusual cache: the eager path handles it
            s = s.contiguous()
            keep.append(s)
            sp[l] = s.data_ptr()
    new_state = torch.empty(L, B, d, dtype=torch.float32)
    logits = torch.empty(B, V, dtype=torch.float32)
    work = torch.empty(B * (6 * d + 3 * m), dtype=torch.float32)
    rc = lib.mmf_hgrn_step(L, B, d, m, V, plan.lp, plan.lf, BITLINEAR_NORM_EPS, plan.emb.data_ptr(), plan.emb_bf16,
                           ids.data_ptr(), sp, new_state.data_ptr(), plan.final_norm, plan.eps_final, plan.head_w,
                           plan.head_nw, plan.head_sw, logits.data_ptr(), work.data_ptr(),
                           cpu_ternary.default_threads(), cpu_ternary._isa_code())
    if rc != 0:
        raise RuntimeError(f"mmf_hgrn_step failed with code {rc}")
    return logits, new_state
