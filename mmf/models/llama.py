"""Transformer++: the Llama recipe (pre-RMSNorm, RoPE, SwiGLU, no biases) with a KV cache.

Parameter names are Hugging Face Llama's, so its checkpoints load with no conversion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmf.config import LlamaConfig

from .common import ModelOutput, RMSNorm, init_weights


@dataclass
class KVCache:
    """Per layer keys and values (B, H_kv, T, head_dim), grown by concatenation."""

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    seen_tokens: int = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.dim_head
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.n_kv_heads, hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, past_k, past_v):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_k is not None:
            k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        S = k.shape[2]
        rep = self.n_heads // self.n_kv
        kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        if T == S:
            o = F.scaled_dot_product_attention(q, kk, vv, is_causal=T > 1)
        elif T == 1:
            o = F.scaled_dot_product_attention(q, kk, vv)
        else:  # new tokens after a prefix: each sees the prefix and the new tokens before it
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), k, v


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, m = cfg.hidden_size, cfg.ffn_size
        self.gate_proj = nn.Linear(d, m, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, m, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(m, d, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, past_k, past_v):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, past_k, past_v)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """``model(input_ids, cache=None)`` -> ``ModelOutput(logits, cache)``."""

    arch = "transformer++"

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        """Share the LM head with the embeddings when the config says so (again after ``to_empty``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self):
        init_weights(self, self.config.num_hidden_layers)
        return self

    def new_cache(self) -> KVCache:
        n = self.config.num_hidden_layers
        return KVCache([None] * n, [None] * n, 0)

    def forward(self, input_ids: torch.Tensor, cache: Optional[KVCache] = None) -> ModelOutput:
        if cache is None:
            cache = self.new_cache()
        T = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)
        pos = torch.arange(cache.seen_tokens, cache.seen_tokens + T, device=input_ids.device)
        cos, sin = rope_cos_sin(pos, self.config.dim_head, self.config.theta, x.dtype)
        keys, values = [], []
        for layer, pk, pv in zip(self.model.layers, cache.keys, cache.values):
            x, k, v = layer(x, cos, sin, pk, pv)
            keys.append(k)
            values.append(v)
        logits = self.lm_head(self.model.norm(x))
        return ModelOutput(logits, KVCache(keys, values, cache.seen_tokens + T))

    def freeze(self):
        """Transformer++ has no quantised layers: inference form is the model itself."""
        self.requires_grad_(False)
        return self
