"""Fast decoding of a frozen MatMul-free model: fused Triton kernels, the whole step in one CUDA graph.

Usage::

    from mmf.decode_graph import GraphDecoder

    model = mmf.load_model(path, device="cuda", dtype=torch.float16, frozen=True)  # or model.freeze()
    dec = GraphDecoder(model, batch=1)          # packs int8 codes to i2 once if needed; captures the graph
    logits = dec.prefill(prompt_ids)            # (batch, T) int64 -> (batch, vocab): last position's logits
    for _ in range(n):
        next_ids = logits.argmax(-1)            # (batch,)
        logits = dec.step(next_ids)             # one token for every row: a single CUDA-graph replay
    ids = dec.generate(prompt_ids, max_new_tokens=64)   # greedy, (batch, T + 64)

``step`` returns a static buffer that the next ``step`` overwrites (``.clone()`` it to keep it);
so does a replayed ``prefill``: the second prefill of a prompt length is captured in a CUDA graph
and later ones of that length replay it (host launch cost dominates eager prefill at batch 1).
``prefill`` starts a fresh sequence (``reset=False`` continues the current state); ``reset()``
zeroes the recurrent state. The decoder gives the same tokens as the eager model
(``model(ids, cache)``): same arithmetic, the integer products exact, fp32 state.

What runs per layer and token (batch <= 2): four GEMV launches, each with its neighbours fused in
(see ``mmf.kernels.ternary_gemv``):

1. i/f/g projections in one launch, prologue = attn RMSNorm + three BitLinear quantisations;
2. o projection, prologue = the whole MLGRU step (gates, lower bound, recurrence, gated RMSNorm)
   + quantisation, epilogue = residual add;
3. gate/up projection, prologue = mlp RMSNorm + quantisation, epilogue = ``silu(gate) * up``;
4. down projection, prologue = quantisation, epilogue = residual add;

then the LM head (final norm in its prologue). For batch 3-64 and for prefill, each projection is
a small pre-pass (same prologues) plus the int8 tensor-core GEMM of ``ternary_gemm``; prefill runs
the recurrence as a chunked scan (``mlgru_step.mlgru_gated_scan``).

Memory: the packed weights (2 bits per weight; a model frozen to int8 ``codes`` is packed once
more, so load a packed checkpoint for the smallest footprint), the embeddings, per-row buffers
of size 3d + m + vocab, and two fp32 states (L, batch, d). Building the decoder compiles, tunes
(one timing pass per projection shape) and captures the graph: seconds to a minute, once.

Measured on an H100 (``bench/results/kernel_bench_h100.md``, random packed weights, fp16,
batch 1): 370m 0.31 ms/token, 13b 1.95-2.03 ms/token (floor 1.09 ms) with 3.85 GB allocated;
13b prefill of 128 tokens 8.8 ms (graph replay). Building tunes each GEMV shape by timing its
candidate schedules in a CUDA graph over every layer's weights of that shape (``tune_pool``; the LM
head, which has one, over stand-ins read from the embedding table's memory: ``_timing_pool``), then
tries each shape's two runners-up in the whole captured step and keeps one only if the step gets
faster by more than 1 % (``_refine``; ``MMF_REFINE=0`` skips it). Measured on an H100
(``bench/results/EXPERIMENTS.md``): 370m 0.310 -> 0.305 ms/token (one shape changed),
13b unchanged at 1.96 ms (every tuner choice kept); it added 1.0 and 3.7 s to the build.

The schedules (tuned and refined) are kept on disk (``mmf.kernels.schedule_cache``): a later
process on the same GPU, software and kernels reads them back and neither tunes nor refines; measured
on an H100 (``bench/results/decoder_build_cache_h100.json``) the build went from 39.6 to 0.6 s at
370m and from 67.5 to 0.7 s at 13b, decode speed unchanged.

Needs a CUDA device (or ``TRITON_INTERPRET=1`` for CPU tests, without the graph).
"""

from __future__ import annotations

import os
from functools import partial

import torch

from mmf.errors import MMFError

__all__ = ["GraphDecoder"]


class _PackedLinear:
    """One BitLinear's packed weights (N, ceil(K/4)) uint8, s_w and norm weight."""

    def __init__(self, mod, device):
        from mmf.ternary_codes import pack_i2
        from mmf.models.hgrn_bit import FrozenBitLinear

        if not isinstance(mod, FrozenBitLinear):
            raise MMFError("GraphDecoder needs a frozen model: call model.freeze() or load with frozen=True")
        if mod.bias is not None:
            raise MMFError("GraphDecoder does not support BitLinear biases (the released models have none)")
        packed = mod.packed if mod.packed is not None else pack_i2(mod.codes)
        self.packed = packed.to(device).contiguous()
        self.k, self.n = mod.in_features, mod.out_features
        self.scale = mod.weight_scale.detach().float().reshape(1).to(device)
        self.norm = mod.norm.weight.detach().to(device)

    @property
    def nbytes(self) -> int:
        return self.packed.numel()


class GraphDecoder:
    """Greedy/step decoding of a frozen ``HGRNBitForCausalLM`` for a fixed batch size (see module doc)."""

    PREFILL_GRAPHS = 4  # prompt lengths whose prefill is kept as a CUDA graph
    MAX_BATCH = 64  # rows of one decode step (batch 3-64: pre-pass + ternary_gemm, whose tiles take 64 rows)
    # re-rank each GEMV shape's best schedules by timing the whole captured step (``_refine``)
    REFINE = os.environ.get("MMF_REFINE", "1") != "0"
    # pre-passes that read their producers' row statistics (``ternary_gemm.RowStats``): "split" where the
    # pre-pass splits its rows (``decode_quant_chunks``), "always" on the whole GEMM path, "never"
    ROW_STATS = "split"
    # decode GEMMs of up to 16 rows also tuned over schedules that load their weights before the pre-pass's wait
    # (``ternary_gemm.EARLY_WEIGHTS``) in models up to this wide: faster at 370m and 1.3b, no gain at 13b
    EARLY_WEIGHTS_MAX_D = 2048

    def __init__(self, model, batch: int, use_graph: bool | None = None, gemv: bool | None = None):
        from mmf.kernels import triton_kernels

        tv = triton_kernels("ternary_gemv")  # without triton installed: one MMFError line

        cfg = model.config
        if getattr(model, "arch", None) != "mmf":
            raise MMFError("GraphDecoder runs MatMul-free (hgrn_bit) models only")
        if not 1 <= batch <= self.MAX_BATCH:
            raise MMFError(f"GraphDecoder batch must be 1..{self.MAX_BATCH} (got {batch})")
        emb = model.model.embeddings.weight
        self.device = emb.device
        interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        if self.device.type != "cuda" and not interp:
            raise MMFError("GraphDecoder needs the model on a CUDA device (model.to('cuda'))")
        self.use_graph = (self.device.type == "cuda") if use_graph is None else use_graph
        self.cfg, self.batch, self.dtype = cfg, batch, emb.dtype
        d, L, m, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.ffn_size, cfg.vocab_size
        self.d, self.L, self.m, self.V = d, L, m, V
        self.emb = emb.detach()
        lbs = model.model.layer_lower_bounds()
        self.layers = []
        with torch.no_grad():
            for layer, lb in zip(model.model.layers, lbs):
                a, p = layer.attn, layer.mlp
                i, f, g, o = (_PackedLinear(x, self.device) for x in (a.i_proj, a.f_proj, a.g_proj, a.o_proj))
                gu, dn = _PackedLinear(p.gate_proj, self.device), _PackedLinear(p.down_proj, self.device)
                self.layers.append(dict(
                    attn_norm=layer.attn_norm.weight.detach(), eps_attn=layer.attn_norm.eps,
                    ifg=[i.packed, f.packed, g.packed], ifg_scale=torch.cat([i.scale, f.scale, g.scale]),
                    ifg_norm=torch.stack([i.norm, f.norm, g.norm]), o=o, g_norm=a.g_norm.weight.detach(),
                    eps_g=a.g_norm.eps, mlp_norm=layer.mlp_norm.weight.detach(), eps_mlp=layer.mlp_norm.eps,
                    gu=gu, down=dn, lb=None if lb is None else lb.detach().float().contiguous(),
                    bytes=sum(x.nbytes for x in (i, f, g, o, gu, dn))))
            self.final_norm, self.eps_final = model.model.norm.weight.detach(), model.model.norm.eps
            self.head = _PackedLinear(model.lm_head, self.device)
        B, dev, dt = batch, self.device, self.dtype
        # ``gemv`` (benchmarks) forces the decode path; by default ``uses_gemv`` picks it
        self.gemv_path = tv.uses_gemv(B, d) if gemv is None else (gemv and B <= tv.GEMV_MAX_ROWS)
        self.state = torch.zeros(L, B, d, dtype=torch.float32, device=dev)
        self.state_next = torch.zeros_like(self.state)
        self.ids = torch.zeros(B, dtype=torch.long, device=dev)
        self.x = torch.zeros(B, d, dtype=dt, device=dev)
        self.r = torch.zeros(B, d, dtype=dt, device=dev)
        self.ifg = torch.zeros(B, 3 * d, dtype=dt, device=dev)
        self.v = torch.zeros(B, m, dtype=dt, device=dev)
        self.logits = torch.zeros(B, V, dtype=dt, device=dev)
        self._tune_pools = {k: self._timing_pool(v) for k, v in (
            ("ifg", [ly["ifg"] for ly in self.layers]),
            *((k, [[ly[k].packed] for ly in self.layers]) for k in ("o", "gu", "down")),
            ("head", [[self.head.packed]]))}
        self.sc_d = tv.Scratch(3, B, d, dev)
        self.sc_m = tv.Scratch(1, B, m, dev)
        # where the pre-pass splits rows (``decode_quant_chunks``), each GEMM's epilogue leaves the row
        # statistics its output's pre-pass needs (``ternary_gemm.RowStats``): one barrier fewer per pre-pass
        from mmf.kernels import ternary_gemm as tg

        self.row_stats = None
        if not self.gemv_path and (self.ROW_STATS == "always" or self.ROW_STATS == "split"
                                   and tg.decode_quant_chunks(B, d) != 1):
            self.row_stats = {k: tg.RowStats(B, n, dev) for k, n in (("g", d), ("r", d), ("v", m), ("x", d))}
        self.graph = None
        self._prefill_graphs: dict = {}  # T -> (graph, static ids, static logits)
        self._prefill_seen: dict = {}    # T -> eager prefills so far
        self.refined = []  # (shape key, schedule before, after, ms/step before, after) of _refine
        if self.use_graph:
            self._capture()
            # schedules read from the on-disk cache were refined when they were stored: no ranking
            if self.REFINE and tv.TUNE and any(k in tv._RANKING for k in self._keys):
                self._refine()
                tv.store_schedules(self._keys, self.device)

    TIMING_POOL = 4  # fewest weight sets a GEMV shape's schedules are timed over (``tune_pool``)

    def _timing_pool(self, weight_lists: list) -> list:
        """The weights a GEMV shape's candidate schedules are timed over, so that no launch of the
        timing chain finds its weights in L2 (``ternary_gemv._chain_time``): every layer's weights of
        that shape and, while there are fewer than ``TIMING_POOL`` sets (the LM head has one, a
        one-layer model one per shape), distinct stretches of the embedding table's bytes viewed in
        that shape. The timing only reads them (the kernel's time does not depend on the values) and
        no memory is allocated for them."""
        pool = list(weight_lists)
        raw = self.emb.reshape(-1).view(torch.uint8) if self.emb.is_contiguous() else None
        sizes = [w.numel() for w in weight_lists[0]]
        off = 0
        while raw is not None and len(pool) < self.TIMING_POOL:
            if off + sum(sizes) > raw.numel():
                break
            entry = []
            for w, n in zip(weight_lists[0], sizes):
                entry.append(raw[off:off + n].view(w.shape))
                off += n
            pool.append(entry)
        return pool

    # ------------------------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        """Packed ternary bytes read per token (all projections and the LM head)."""
        return sum(ly["bytes"] for ly in self.layers) + self.head.nbytes

    def bytes_per_token(self) -> int:
        """The fewest bytes one decode step must move: packed weights, norm weights, lower bounds,
        the embedding rows, the fp32 state read and written, the logits written."""
        norms = sum(t.numel() * t.element_size() for ly in self.layers
                    for t in (ly["attn_norm"], ly["ifg_norm"], ly["o"].norm, ly["g_norm"], ly["mlp_norm"],
                              ly["gu"].norm, ly["down"].norm) + ((ly["lb"],) if ly["lb"] is not None else ()))
        norms += self.final_norm.numel() * self.final_norm.element_size() + self.head.norm.numel() * 2
        B, es = self.batch, self.emb.element_size()
        return self.weight_bytes + norms + B * self.d * es + 2 * self.state.numel() * 4 + B * self.V * es

    def reset(self) -> None:
        self.state.zero_()

    # ------------------------------------------------------------------------------------------
    def _step_body(self) -> None:
        from mmf.kernels import ternary_gemm as tg
        from mmf.kernels import ternary_gemv as tv

        torch.index_select(self.emb, 0, self.ids, out=self.x)
        d = self.d
        pool = self._tune_pools  # every layer's weights: schedules are timed as they run here
        qc = tg.decode_quant_chunks(self.batch, d)  # rows of the pre-pass split over programs, or whole

        stats = self.row_stats

        def st(name):
            """The row statistics the GEMM before left for this pre-pass, if the decoder keeps them."""
            return stats[name] if stats else None

        def st_out(name, w=None, seg=0):
            return (stats[name], w, seg) if stats else None

        def pre_then_gemm(pre, *args, **kw):
            """Pre-pass ``pre``, then its GEMM, whose first call times its schedules after ``pre`` (repeated,
            each pre-pass writes the same values: the MLGRU one the same next state from the same state)."""
            kw["early_weights"] = self.d <= self.EARLY_WEIGHTS_MAX_D
            pre()
            tg.gemm(*args, tune_prepass=pre, **kw)

        for l, ly in enumerate(self.layers):
            o, gu, dn = ly["o"], ly["gu"], ly["down"]
            if self.gemv_path:
                tv.gemv(self.x, ly["ifg"], ly["ifg_scale"], ly["ifg_norm"], self.ifg, pro=tv.PRO_NORM,
                        norm_weight=ly["attn_norm"], eps_model=ly["eps_attn"], scratch=self.sc_d, tune_pool=pool["ifg"])
                tv.gemv(self.ifg, [o.packed], o.scale, o.norm[None], self.r, pro=tv.PRO_MLGRU, k=d,
                        norm_weight=ly["g_norm"], eps_model=ly["eps_g"], s_in=self.state[l],
                        s_out=self.state_next[l], lower_bound=ly["lb"], residual=self.x, epi=tv.EPI_RESIDUAL,
                        scratch=self.sc_d, tune_pool=pool["o"])
                tv.gemv(self.r, [gu.packed], gu.scale, gu.norm[None], self.v, pro=tv.PRO_NORM,
                        norm_weight=ly["mlp_norm"], eps_model=ly["eps_mlp"], epi=tv.EPI_GLU, scratch=self.sc_d,
                        tune_pool=pool["gu"])
                tv.gemv(self.v, [dn.packed], dn.scale, dn.norm[None], self.x, pro=tv.PRO_PLAIN,
                        epi=tv.EPI_RESIDUAL, residual=self.r, scratch=self.sc_m, tune_pool=pool["down"])
            else:  # pre-pass + GEMM pairs
                pre_then_gemm(partial(tg.quantize, self.x, ly["ifg_norm"], self.sc_d, nseg=3, pro=tv.PRO_NORM,
                                      norm_weight=ly["attn_norm"], eps_model=ly["eps_attn"], chunks=qc,
                                      stats=st("x") if l > 0 else None),
                              self.sc_d, ly["ifg"], ly["ifg_scale"], self.ifg, k=d, tune_pool=pool["ifg"],
                              stats_out=st_out("g", seg=2))
                pre_then_gemm(partial(tg.quantize, self.ifg, o.norm[None], self.sc_d, pro=tv.PRO_MLGRU, k=d,
                                      dtype=self.dtype, norm_weight=ly["g_norm"], eps_model=ly["eps_g"],
                                      s_in=self.state[l], s_out=self.state_next[l], lower_bound=ly["lb"], chunks=qc,
                                      stats=st("g")),
                              self.sc_d, [o.packed], o.scale, self.r, k=d, epi=tv.EPI_RESIDUAL, residual=self.x,
                              tune_pool=pool["o"], stats_out=st_out("r"))
                pre_then_gemm(partial(tg.quantize, self.r, gu.norm[None], self.sc_d, pro=tv.PRO_NORM,
                                      norm_weight=ly["mlp_norm"], eps_model=ly["eps_mlp"], chunks=qc, stats=st("r")),
                              self.sc_d, [gu.packed], gu.scale, self.v, k=d, epi=tv.EPI_GLU, tune_pool=pool["gu"],
                              stats_out=st_out("v", w=dn.norm))
                pre_then_gemm(partial(tg.quantize, self.v, dn.norm[None], self.sc_m, k=self.m, chunks=qc,
                                      stats=st("v")),
                              self.sc_m, [dn.packed], dn.scale, self.x, k=self.m, epi=tv.EPI_RESIDUAL,
                              residual=self.r, tune_pool=pool["down"], stats_out=st_out("x"))
        h = self.head
        if self.gemv_path:
            tv.gemv(self.x, [h.packed], h.scale, h.norm[None], self.logits, pro=tv.PRO_NORM,
                    norm_weight=self.final_norm, eps_model=self.eps_final, scratch=self.sc_d, tune_pool=pool["head"])
        else:
            pre_then_gemm(partial(tg.quantize, self.x, h.norm[None], self.sc_d, pro=tv.PRO_NORM,
                                  norm_weight=self.final_norm, eps_model=self.eps_final, chunks=qc, stats=st("x")),
                          self.sc_d, [h.packed], h.scale, self.logits, k=d, tune_pool=pool["head"])
        self.state.copy_(self.state_next)

    def _capture(self) -> None:
        from mmf.kernels import ternary_gemv as tv

        saved = self.state.clone()
        self.graph = None
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            with tv.record_keys() as keys:  # compile, tune and warm every kernel outside the capture
                self._step_body()
            self._step_body()
        self._keys = sorted(keys, key=str)
        torch.cuda.current_stream(self.device).wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step_body()
        self.state.copy_(saved)
        self._graph_schedules = self._schedules()

    def _schedules(self) -> dict:
        """The GEMV schedules the step launches now (those a captured graph holds, if taken then)."""
        from mmf.kernels import ternary_gemv as tv

        return {k: tv._TUNED.get(k) for k in self._keys}

    def _step_ms(self, steps: int = 20, reps: int = 3) -> float:
        """ms per replay of the captured step (best of ``reps`` runs of ``steps``); the state is kept."""
        from mmf.kernels.ternary_gemv import event_times

        saved = self.state.clone()
        self.graph.replay()
        times = event_times(self.graph.replay, reps, steps)
        self.state.copy_(saved)
        return min(times)

    def _refine(self) -> None:
        """Each GEMV shape was tuned in a chain of launches of that shape alone; here its runners-up
        are tried in the whole captured step, which decides (``ternary_gemv.refine_schedules``)."""
        from mmf.kernels import ternary_gemv as tv

        def current_graph():  # re-captured only when the schedules differ from the graph's
            if self._schedules() != self._graph_schedules:
                self._capture()

        def measure():
            current_graph()
            return self._step_ms()

        self.refined = tv.refine_schedules(self._keys, measure)
        current_graph()  # the graph of the schedules kept

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``(batch,)`` ids); returns the (batch, vocab) logits (static buffer)."""
        token_ids = token_ids.reshape(-1)
        if token_ids.numel() != self.batch:
            raise MMFError(f"step expects {self.batch} token ids (one per row), got {token_ids.numel()}")
        self.ids.copy_(token_ids)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step_body()
        return self.logits

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, reset: bool = True) -> torch.Tensor:
        """Run a (batch, T) prompt through the model; returns the last position's (batch, vocab) logits.

        Prefill launches about nine Triton kernels per layer, and at batch 1 their host-side launch
        cost exceeds their GPU time. So the second prefill of a given length T is captured in a CUDA
        graph and later ones of that length replay it (at most ``PREFILL_GRAPHS`` lengths are kept;
        the first two calls of a length run eagerly, the first also tunes the GEMMs). A replayed
        prefill returns a static buffer that the next prefill of that length overwrites.
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch or input_ids.shape[1] < 1:
            raise MMFError(f"prefill expects ids of shape ({self.batch}, T >= 1), got {tuple(input_ids.shape)}")
        if reset:
            self.reset()
        T = input_ids.shape[1]
        graph = self._prefill_graphs.get(T)
        if graph is not None:
            g, ids_buf, logits = graph
            ids_buf.copy_(input_ids)
            g.replay()
            return logits
        ids = input_ids.to(self.device)
        if not self.use_graph:
            return self._prefill_body(ids)
        seen = self._prefill_seen.get(T, 0)
        self._prefill_seen[T] = seen + 1
        if seen == 0 or len(self._prefill_graphs) >= self.PREFILL_GRAPHS:
            return self._prefill_body(ids)
        # second call of this length: capture (kernels compiled and tuned by the first), then replay
        saved = self.state.clone()
        ids_buf = ids.clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            logits = self._prefill_body(ids_buf)
        self.state.copy_(saved)  # capture records, but make sure nothing it touched leaks into the state
        self._prefill_graphs[T] = (g, ids_buf, logits)
        g.replay()
        return logits

    def _prefill_body(self, input_ids: torch.Tensor) -> torch.Tensor:
        from mmf.kernels import ternary_gemm as tg
        from mmf.kernels import ternary_gemv as tv
        from mmf.kernels.mlgru_step import mlgru_gated_scan

        B, T = input_ids.shape
        M, d, dev, dt = B * T, self.d, self.device, self.dtype
        x = self.emb[input_ids.reshape(-1)]
        r = torch.empty_like(x)
        ifg = torch.empty(M, 3 * d, dtype=dt, device=dev)
        v = torch.empty(M, self.m, dtype=dt, device=dev)
        sc_d, sc_m = tv.Scratch(3, M, d, dev), tv.Scratch(1, M, self.m, dev)
        if M >= tg.INT_MM_MIN_ROWS > 0:  # many rows: codes unpacked to int8 per projection, one scratch for all
            tg.reserve_unpacked(max(tg.unpacked_nbytes(2 * self.m, 4 * sc_d.pw), tg.unpacked_nbytes(d, 4 * sc_m.pw)),
                                dev)
        for l, ly in enumerate(self.layers):
            o, gu, dn = ly["o"], ly["gu"], ly["down"]
            tg.quantize(x, ly["ifg_norm"], sc_d, nseg=3, pro=tv.PRO_NORM, norm_weight=ly["attn_norm"],
                        eps_model=ly["eps_attn"])
            tg.gemm(sc_d, ly["ifg"], ly["ifg_scale"], ifg, k=d)
            f3 = ifg.view(B, T, 3 * d)
            S, last = mlgru_gated_scan(f3[..., :d], f3[..., d:2 * d], ly["lb"], self.state[l])
            self.state[l].copy_(last)
            tg.quantize(x, o.norm[None], sc_d, pro=tv.PRO_GATED, k=d, dtype=dt, g=ifg[:, 2 * d:],
                        s_in=S.view(M, d), norm_weight=ly["g_norm"], eps_model=ly["eps_g"])
            tg.gemm(sc_d, [o.packed], o.scale, r, k=d, epi=tv.EPI_RESIDUAL, residual=x)
            tg.quantize(r, gu.norm[None], sc_d, pro=tv.PRO_NORM, norm_weight=ly["mlp_norm"], eps_model=ly["eps_mlp"])
            tg.gemm(sc_d, [gu.packed], gu.scale, v, k=d, epi=tv.EPI_GLU)
            tg.quantize(v, dn.norm[None], sc_m, k=self.m)
            x_new = torch.empty_like(x)
            tg.gemm(sc_m, [dn.packed], dn.scale, x_new, k=self.m, epi=tv.EPI_RESIDUAL, residual=r)
            x = x_new
        xl = x.view(B, T, d)[:, -1].contiguous()
        logits = torch.empty(B, self.V, dtype=dt, device=dev)
        h = self.head
        sc = tv.Scratch(1, B, d, dev)
        tg.quantize(xl, h.norm[None], sc, pro=tv.PRO_NORM, norm_weight=self.final_norm, eps_model=self.eps_final)
        tg.gemm(sc, [h.packed], h.scale, logits, k=d)
        return logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: (batch, T) prompt -> (batch, T + max_new_tokens) ids."""
        logits = self.prefill(input_ids)
        out = [input_ids.to(self.device)]
        for t in range(max_new_tokens):
            nxt = logits.argmax(-1)
            out.append(nxt[:, None].clone())
            if t + 1 < max_new_tokens:
                logits = self.step(nxt)
        return torch.cat(out, 1)
