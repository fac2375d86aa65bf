"""The MatMul-free LM (HGRNBit), read top to bottom like docs/reference-semantics.md.

Module and parameter names reproduce the published ``hgrn_bit`` checkpoint keys exactly, so a
published MMfreeLM directory loads with no conversion.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmf import kernels
from mmf.config import MMFConfig
from mmf.errors import CheckpointError
from mmf.ternary_codes import pack_i2

from .common import ModelOutput, RMSNorm, init_weights


class BitLinear(nn.Module):
    """Training form: latent full-precision ``weight`` quantised on every call (STE gradients)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.norm = RMSNorm(in_features, eps=kernels.reference.BITLINEAR_NORM_EPS)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        return kernels.bitlinear_train(x, self.norm.weight, self.weight, self.bias)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}"


class FrozenBitLinear(nn.Module):
    """Inference form, quantised once: ternary weights and the fp32 multiplier ``weight_scale``
    (s_w, so that ``w ~= codes / s_w``).

    Weights are held either as int8 ``codes`` (N, K) or, for packed checkpoints, as i2 planar
    bytes ``packed`` (N, ceil(K/4)) that the GPU kernels read directly (mmf/ternary_codes.py).
    """

    def __init__(self, in_features: int, out_features: int, codes=None, weight_scale=None, norm_weight=None,
                 bias=None, packed=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if packed is not None:
            want = (out_features, -(-in_features // 4))
            if packed.dtype != torch.uint8 or tuple(packed.shape) != want:
                raise CheckpointError(f"packed i2 weights of shape {tuple(packed.shape)} ({packed.dtype}) do not fit a "
                                      f"BitLinear of {in_features} -> {out_features}: expected uint8 {want}")
            self.register_buffer("packed", packed)
            self.codes = None
        else:
            self.register_buffer("codes", codes if codes is not None else
                                 torch.zeros(out_features, in_features, dtype=torch.int8))
            self.packed = None
        self.register_buffer("weight_scale", weight_scale if weight_scale is not None else
                             torch.ones((), dtype=torch.float32))
        self.norm = RMSNorm(in_features, eps=kernels.reference.BITLINEAR_NORM_EPS)
        if norm_weight is not None:
            self.norm.weight = nn.Parameter(norm_weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_bitlinear(cls, m: BitLinear) -> "FrozenBitLinear":
        codes, s_w = kernels.weight_quant(m.weight.detach())
        bias = None if m.bias is None else m.bias.detach()
        return cls(m.in_features, m.out_features, codes, s_w, m.norm.weight.detach(), bias)

    def ternary_codes(self) -> torch.Tensor:
        """The int8 codes (N, K), unpacked if stored packed."""
        if self.codes is not None:
            return self.codes
        return kernels.reference.unpack_i2_ref(self.packed, self.in_features)

    def forward(self, x):
        packed = self.packed if self.packed is not None else self._i2_for_cpu(x)
        if packed is not None:
            return kernels.bitlinear_i2(x, self.norm.weight, packed, self.in_features, self.weight_scale, self.bias)
        return kernels.bitlinear_frozen(x, self.norm.weight, self.codes, self.weight_scale, self.bias)

    def _i2_for_cpu(self, x):
        """int8 codes on the CPU run through the native kernel, which reads i2 bytes: packed once,
        kept beside the codes (a quarter of their size; not in the state dict) while they are unchanged."""
        if not kernels.cpu_native(x, self.codes):
            return None
        try:
            version = self.codes._version
        except RuntimeError:  # codes made under torch.inference_mode() have no version counter
            version = None
        key = (self.codes.data_ptr(), version)
        if self.__dict__.get("_i2_key") != key:
            self.__dict__["_i2"], self.__dict__["_i2_key"] = pack_i2(self.codes), key
        return self.__dict__["_i2"]

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, {'i2' if self.packed is not None else 'int8'}"


@dataclass
class RecurrentCache:
    """One fp32 state vector (B, d) per layer: O(1) memory per generated token."""

    states: list = field(default_factory=list)
    seen_tokens: int = 0

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states if s is not None)


class MLGRU(nn.Module):
    """Token mixer (``attn`` in the checkpoint): the MatMul-free linear gated recurrent unit."""

    def __init__(self, cfg: MMFConfig):
        super().__init__()
        d = cfg.hidden_size
        self.i_proj = BitLinear(d, d)
        self.f_proj = BitLinear(d, d)
        self.g_proj = BitLinear(d, d)
        self.o_proj = BitLinear(d, d)
        self.g_norm = RMSNorm(d, eps=cfg.rms_norm_eps)

    def forward(self, h, lower_bound, state):
        s, last = kernels.mlgru(self.i_proj(h), self.f_proj(h), lower_bound, state)
        o = kernels.gated_rms_norm(self.g_proj(h), self.g_norm.weight, s, self.g_norm.eps)
        return self.o_proj(o), last  # o in g's dtype: the BitLinear norms in fp32 whatever it gets


class GLU(nn.Module):
    """Channel mixer (``mlp``): gate and up share one BitLinear of 2m outputs (gate first)."""

    def __init__(self, cfg: MMFConfig):
        super().__init__()
        d, m = cfg.hidden_size, cfg.ffn_size
        self.gate_proj = BitLinear(d, 2 * m)
        self.down_proj = BitLinear(m, d)

    def forward(self, h):
        u = self.gate_proj(h)
        if isinstance(self.down_proj, BitLinear):  # training form: silu(gate) * up fused into down_proj
            d = self.down_proj
            return kernels.bitlinear_glu_train(u, d.norm.weight, d.weight, d.bias)
        gate, up = u.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class HGRNBitBlock(nn.Module):
    def __init__(self, cfg: MMFConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn = MLGRU(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = GLU(cfg)

    def forward(self, x, lower_bound, state):
        a, state = self.attn(self.attn_norm(x), lower_bound, state)
        r = x + a
        return r + self.mlp(self.mlp_norm(r)), state


class HGRNBitModel(nn.Module):
    def __init__(self, cfg: MMFConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.use_lower_bound:
            self.lower_bounds = nn.Parameter(torch.zeros(cfg.num_hidden_layers, cfg.hidden_size))
        else:
            self.lower_bounds = None
        self.layers = nn.ModuleList(HGRNBitBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def layer_lower_bounds(self):
        """softmax over layers, cumulative sum, minus the first: layer 0 has no lower bound."""
        if self.lower_bounds is None:
            return [None] * len(self.layers)
        lb = self.lower_bounds.float().softmax(0)
        lb = lb.cumsum(0) - lb[0]
        return [None] + [lb[l] for l in range(1, len(self.layers))]


class HGRNBitForCausalLM(nn.Module):
    """``model(input_ids, cache=None)`` -> ``ModelOutput(logits, cache)``."""

    arch = "mmf"

    def __init__(self, cfg: MMFConfig):
        super().__init__()
        self.config = cfg
        self.model = HGRNBitModel(cfg)
        self.lm_head = BitLinear(cfg.hidden_size, cfg.vocab_size)
        self.tie_weights()

    def tie_weights(self):
        """Share the LM head with the embeddings when the config says so (again after ``to_empty``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight

    def init_weights(self):
        init_weights(self, self.config.num_hidden_layers)
        return self

    def new_cache(self) -> RecurrentCache:
        return RecurrentCache(states=[None] * self.config.num_hidden_layers)

    def forward(self, input_ids: torch.Tensor, cache: Optional[RecurrentCache] = None) -> ModelOutput:
        frozen = not isinstance(self.lm_head, BitLinear)  # frozen models run the native CPU kernel there
        if frozen and input_ids.shape[-1] == 1:  # a decode step on the CPU: one native call where it applies
            states = cache.states if cache is not None else [None] * self.config.num_hidden_layers
            out = kernels.cpu_decode_step(self, input_ids, states, FrozenBitLinear)
            if out is not None:
                seen = cache.seen_tokens if cache is not None else 0
                return ModelOutput(out[0][:, None], RecurrentCache(list(out[1].unbind(0)), seen + 1))
        if cache is None:
            cache = self.new_cache()
        with kernels.cpu_forward(input_ids) if frozen else contextlib.nullcontext():
            x = self.model.embeddings(input_ids)
            new_states = []
            for layer, lb, state in zip(self.model.layers, self.model.layer_lower_bounds(), cache.states):
                x, state = layer(x, lb, state)
                new_states.append(state)
            logits = self.lm_head(self.model.norm(x))
        return ModelOutput(logits, RecurrentCache(new_states, cache.seen_tokens + input_ids.shape[1]))

    @torch.no_grad()
    def freeze(self) -> "HGRNBitForCausalLM":
        """Convert every BitLinear, once, to its frozen inference form (int8 codes + scale)."""
        for parent in list(self.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, BitLinear):
                    setattr(parent, name, FrozenBitLinear.from_bitlinear(child))
        self.requires_grad_(False)
        return self

    @property
    def is_frozen(self) -> bool:
        return not any(isinstance(m, BitLinear) for m in self.modules())
