"""Transformer++ inference with a static KV cache: the fastest honest baseline mmf can build.

``StaticLlama`` holds the weights of a Llama-recipe model in their inference layout (q, k, v fused
into one matrix, gate and up fused into one matrix, everything in bf16 or fp16), a KV cache
preallocated for ``max_len`` positions, and on CUDA one CUDA graph for a whole decode step (every
layer, the LM head and the greedy argmax, so the host never waits between tokens). Attention is
``scaled_dot_product_attention``. The arithmetic is the eager ``LlamaForCausalLM`` of
``mmf.models.llama`` (same RMSNorm, RoPE tables and SwiGLU), so greedy tokens agree with it.

    dec = StaticLlama.from_model(llama_model)            # or StaticLlama.random(cfg, device, dtype)
    dec.setup(batch=1, max_len=256)                      # allocates the cache, captures the graph on CUDA
    tokens = dec.generate(prompt_ids, n)                 # (B, n) greedy tokens

Decoding one token at position ``p``: embed the token, and per layer RMSNorm, one GEMV for q, k, v,
RoPE on q and k together, write k and v at ``p`` (``index_copy_`` with a device-side position, so
the graph replays unchanged), SDPA over the whole cache with a mask ``j <= p``, the output projection
added to the residual in one ``addmm``, RMSNorm, one GEMV for gate and up, SiLU-gate, down
projection added in one ``addmm``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from mmf.config import LlamaConfig
from mmf.models.llama import rope_cos_sin


class StaticLlama:
    """Inference-only Transformer++ with a static KV cache and (on CUDA) one graph per decode step."""

    def __init__(self, cfg: LlamaConfig, weights: dict, num_layers: Optional[int] = None):
        self.config = cfg
        self.num_layers = num_layers if num_layers is not None else cfg.num_hidden_layers
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.n_kv_heads, cfg.dim_head
        self.eps = cfg.rms_norm_eps
        self.embed = weights["embed"]
        self.layers = weights["layers"]  # list of dicts: ln1, wqkv, wo, ln2, wgu, wdown
        self.norm = weights["norm"]
        self.lm_head = weights["lm_head"]
        if len(self.layers) != self.num_layers:
            raise ValueError(f"{len(self.layers)} layers of weights for num_layers={self.num_layers}")
        self.device, self.dtype = self.embed.device, self.embed.dtype
        self.graph = None
        self.batch = self.max_len = 0
        self.kv = None

    # ------------------------------------------------------------------ construction
    @classmethod
    @torch.no_grad()
    def from_model(cls, model, dtype: Optional[torch.dtype] = None) -> "StaticLlama":
        """Copy the weights of an ``mmf.models.LlamaForCausalLM`` into the fused inference layout."""
        cfg = model.config
        dt = dtype or model.model.embed_tokens.weight.dtype

        def c(t):
            return t.detach().to(dt).contiguous()

        for name, p in model.named_parameters():
            if name.endswith("bias") and p is not None:
                raise ValueError("StaticLlama supports the bias-free Llama recipe only")
        layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            layers.append(dict(
                ln1=c(layer.input_layernorm.weight),
                wqkv=c(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0)),
                wo=c(a.o_proj.weight),
                ln2=c(layer.post_attention_layernorm.weight),
                wgu=c(torch.cat([m.gate_proj.weight, m.up_proj.weight], 0)),
                wdown=c(m.down_proj.weight),
            ))
        weights = dict(embed=c(model.model.embed_tokens.weight), layers=layers, norm=c(model.model.norm.weight),
                       lm_head=c(model.lm_head.weight))
        return cls(cfg, weights)

    @classmethod
    @torch.no_grad()
    def random(cls, cfg: LlamaConfig, device="cpu", dtype=torch.bfloat16, num_layers: Optional[int] = None,
               seed: int = 0, std: float = 0.02) -> "StaticLlama":
        """Random weights built directly in ``dtype`` on ``device`` (never a float32 copy of the model).

        ``num_layers`` < ``cfg.num_hidden_layers`` builds only the first layers (to measure a model
        that does not fit and extrapolate).
        """
        L = cfg.num_hidden_layers if num_layers is None else num_layers
        d, m, hd = cfg.hidden_size, cfg.ffn_size, cfg.dim_head
        h, hkv = cfg.num_attention_heads, cfg.n_kv_heads
        gen = torch.Generator(device=device).manual_seed(seed)
        out_std = std / math.sqrt(2 * cfg.num_hidden_layers)

        def normal(shape, s):
            return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, s, generator=gen)

        def ones(n):
            return torch.ones(n, device=device, dtype=dtype)

        layers = [dict(ln1=ones(d), wqkv=normal(((h + 2 * hkv) * hd, d), std), wo=normal((d, h * hd), out_std),
                       ln2=ones(d), wgu=normal((2 * m, d), std), wdown=normal((d, m), out_std)) for _ in range(L)]
        weights = dict(embed=normal((cfg.vocab_size, d), std), layers=layers, norm=ones(d),
                       lm_head=normal((cfg.vocab_size, d), std))
        return cls(cfg, weights, num_layers=L)

    # ------------------------------------------------------------------ sizes
    def weight_bytes(self) -> int:
        ts = [self.embed, self.norm, self.lm_head] + [t for layer in self.layers for t in layer.values()]
        return sum(t.numel() * t.element_size() for t in ts)

    def kv_bytes_per_position(self) -> int:
        return 2 * self.num_layers * self.batch * self.n_kv * self.head_dim * self.embed.element_size()

    def cache_bytes(self) -> int:
        """Bytes allocated for the KV cache (``max_len`` positions)."""
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()

    def cache_bytes_used(self) -> int:
        """Bytes of the cache holding written positions (the KV cache an eager model would hold)."""
        return self.kv_bytes_per_position() * int(self.pos.item()) if self.kv is not None else 0

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def setup(self, batch: int, max_len: int, use_graph: Optional[bool] = None) -> "StaticLlama":
        """Allocate the KV cache and static buffers; on CUDA (or ``use_graph=True``) capture the step."""
        self.batch, self.max_len = batch, max_len
        dev, dt = self.device, self.dtype
        # (L, 2, B, H_kv, S, hd): k and v of a layer adjacent, one index_copy_ writes both
        self.kv = torch.zeros(self.num_layers, 2, batch, self.n_kv, max_len, self.head_dim, device=dev, dtype=dt)
        pos_all = torch.arange(max_len, device=dev)
        self.cos_table, sin = rope_cos_sin(pos_all, self.head_dim, self.config.theta, dt)
        half = self.head_dim // 2
        self.sin_table = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)  # signed for the roll form
        self.arange_s = pos_all
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)
        self.history = torch.zeros(batch, max_len + 1, dtype=torch.long, device=dev)
        self.logits = torch.zeros(batch, self.config.vocab_size, dtype=torch.float32, device=dev)
        self.graph = None
        if use_graph is None:
            use_graph = self.device.type == "cuda"
        if use_graph:
            self._capture()
        return self

    def _capture(self):
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (cuBLAS handles, SDPA kernel choice) outside the graph
                self._step_body()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step_body()
        self.reset()

    def reset(self):
        self.pos.zero_()
        self.tok.zero_()

    # ------------------------------------------------------------------ maths
    def _rms(self, x, w):
        # the fused kernel of F.rms_norm: fp32 inside, one rounding to x's dtype, as kernels.rms_norm
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)

    @staticmethod
    def _rope(x, cos, sin_signed):
        """RoPE as in ``apply_rope``: x * cos + rotate_half(x) * sin, with rotate_half(x) * sin =
        roll(x, hd/2) * [-sin, sin] (three kernels instead of five)."""
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)

    def _layer(self, x, layer, l, cos, sin, mask, prefill_len: int):
        """x: (N, d) rows (N = B*T). Writes k, v into the cache; returns the new residual stream."""
        B = self.batch
        T = x.shape[0] // B
        H, Hkv, hd = self.n_heads, self.n_kv, self.head_dim
        qkv = F.linear(self._rms(x, layer["ln1"]), layer["wqkv"])  # (N, (H + 2 Hkv) hd)
        qk = qkv[:, :(H + Hkv) * hd].view(B, T, H + Hkv, hd).transpose(1, 2)
        qk = self._rope(qk, cos, sin)  # q and k together: one pass
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, (H + Hkv) * hd:].view(B, T, Hkv, hd).transpose(1, 2)
        kv = self.kv[l]  # (2, B, Hkv, S, hd)
        if prefill_len:
            kv[0, :, :, :T].copy_(k)
            kv[1, :, :, :T].copy_(v)
            kk, vv, causal, am = k, v, T > 1, None
        else:
            kv.index_copy_(3, self.pos, torch.stack([k, v]))
            kk, vv, causal, am = kv[0], kv[1], False, mask
        rep = H // Hkv
        if rep > 1:
            kk, vv = kk.repeat_interleave(rep, dim=1), vv.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=am, is_causal=causal)
        x = torch.addmm(x, o.transpose(1, 2).reshape(B * T, H * hd), layer["wo"].t())
        gate, up = F.linear(self._rms(x, layer["ln2"]), layer["wgu"]).chunk(2, dim=-1)
        return torch.addmm(x, F.silu(gate) * up, layer["wdown"].t())

    def _head(self, x):
        return F.linear(self._rms(x, self.norm), self.lm_head).float()

    def _step_body(self):
        """One decode step for the token ``self.tok`` at position ``self.pos`` (graph-capturable)."""
        x = self.embed.index_select(0, self.tok)  # (B, d)
        cos = self.cos_table.index_select(0, self.pos)  # (1, hd)
        sin = self.sin_table.index_select(0, self.pos)
        # additive mask, built once per step (a boolean mask would be converted in every layer)
        mask = torch.zeros((), dtype=self.dtype, device=self.device).masked_fill(
            self.arange_s > self.pos, float("-inf")).view(1, 1, 1, -1)
        for l, layer in enumerate(self.layers):
            x = self._layer(x, layer, l, cos, sin, mask, 0)
        self.logits.copy_(self._head(x))
        nxt = self.logits.argmax(-1)
        self.tok.copy_(nxt)
        self.pos.add_(1)
        self.history.index_copy_(1, self.pos, nxt[:, None])

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, T) from position 0; returns the first greedy token (B,) (left in ``tok``)."""
        B, T = input_ids.shape
        if B != self.batch or T >= self.max_len:
            raise ValueError(f"prompt {tuple(input_ids.shape)} does not fit setup(batch={self.batch}, "
                             f"max_len={self.max_len})")
        ids = input_ids.to(self.device)
        x = self.embed.index_select(0, ids.reshape(-1))  # (B*T, d)
        cos, sin = self.cos_table[:T], self.sin_table[:T]
        for l, layer in enumerate(self.layers):
            x = self._layer(x, layer, l, cos, sin, None, T)
        last = x.view(B, T, -1)[:, -1]
        self.logits.copy_(self._head(last))
        nxt = self.logits.argmax(-1)
        self.tok.copy_(nxt)
        self.pos.fill_(T)
        self.history[:, :T].copy_(ids)
        self.history[:, T].copy_(nxt)
        return nxt

    @torch.no_grad()
    def step(self) -> None:
        """Decode one token: consumes ``tok`` at ``pos``, leaves the next greedy token in ``tok``."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step_body()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy: the prompt in one prefill, then ``max_new_tokens - 1`` decode steps; returns (B, n)."""
        T = input_ids.shape[1]
        if T + max_new_tokens - 1 > self.max_len:
            raise ValueError(f"prompt {T} + {max_new_tokens} new tokens exceed max_len {self.max_len}")
        self.reset()
        self.prefill(input_ids)
        for _ in range(max_new_tokens - 1):
            self.step()
        return self.history[:, T:T + max_new_tokens].clone()
