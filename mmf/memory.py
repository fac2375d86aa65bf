"""Memory and time a training run needs, checked before ``mmf train`` writes or tokenises anything.

``available_bytes(device)``: what a new allocation can get now: on the CPU ``psutil``'s available
memory (after returning freed heap to the system), on CUDA ``torch.cuda.mem_get_info``'s free bytes.

``training_memory`` estimates the peak of one optimiser step, in bytes::

    need = C + 16 P + N (L (a d + b m + h T H) + g V)

* ``P`` parameters, 16 bytes each: the fp32 weight (4), its gradient (4) and AdamW's two moments (8).
  FSDP shards these over the ranks (plus two layers gathered whole); DDP adds its gradient buckets
  (4 bytes per parameter). On CUDA the MatMul-free model's fused BitLinear keeps each weight's
  quantised bf16 copy cached on the gathered parameter, which FSDP does not shard: 2 bytes per
  parameter more on every rank (from the code, not measured).
* ``N = micro-batch x seq_len`` tokens in one forward and backward (``train.batch_size /
  (world size x train.grad_accum)`` sequences of ``train.seq_len`` tokens), ``L`` layers, ``d`` the
  hidden size, ``m`` the MLP width (``ffn_size``), ``V`` the vocabulary, ``T`` the sequence length and
  ``H`` the attention heads (Transformer++ only).
* ``a``, ``b``, ``h``: activation bytes a layer keeps per token for backward, per unit of ``d``, ``m`` and
  ``T x H``; ``g``: bytes per token per vocabulary entry (the logits, their fp32 log-softmax and its
  gradient); ``C``: the working memory of the torch runtime itself in a training step.

Coefficients (bytes), measured, not derived:

=========================  ====  =====  ====  ====  ======
path                       a     b      h     g     C
=========================  ====  =====  ====  ====  ======
CPU, MatMul-free (fp32)    320   22     0     10    240 MB
CPU, Transformer++ (fp32)  72    15     0.9   11    240 MB
CUDA, MatMul-free (bf16)   16.6  0      0     22    1.5 GiB
CUDA, Transformer++ (bf16) 39.8  0      0     22    1.5 GiB
=========================  ====  =====  ====  ====  ======

CPU calibration (torch 2.13 CPU, this project's reference operators, fp32): the peak RSS (VmHWM)
of two AdamW steps above the RSS before the model was built, in a fresh process for each of nine
shapes per architecture (d 512-1024, m 1536-3072, L 1-4, V 1024-8192, 2048-4096 tokens per step,
T 512-2048), least-squares fit with 16 bytes per parameter fixed, then rounded: the coefficients
above put every shape between -3.2 % and +6.0 % of its measurement (MatMul-free: 716 MB measured,
737 estimated, for d 512, L 1, 4 x 512 tokens; 2300 vs 2302 MB for d 1024, m 2816, L 2).
Checked on a shape outside the fit, 370m's width with its 32000 vocabulary (d 1024, m 2816, L 3,
1 x 1024 tokens): MatMul-free 3410 MB measured, 3430 estimated (+0.6 %); Transformer++ 2520 MB
measured, 2667 estimated (+5.8 %). The MatMul-free reference operators keep far more per token
than the fused GPU kernels (a = 320 bytes, 80 fp32 values of width d per token and layer).

CUDA calibration: the fused kernels under bf16 autocast (``precision.dtype = auto``), from the H100
runs in ``bench/results/TRAINING.md`` (``bench/results/train_bench_h100.json``, T = 2048): activation
memory (peak allocated minus weights, gradients and AdamW state) 16.57 GB at 370m x 8 sequences and
11.32 GB at 1.3b x 4 for MatMul-free, 25.06 and 19.81 GB for Transformer++; ``a`` = 15.1 and 36.2
and ``g`` = 20.0 (for both) solve those two points exactly. Checked through ``mmf train`` itself on
an H200 (``python -m mmf.bench.train_memory_check``, ``bench/results/train_memory_check_h200.jsonl``,
vocabulary 32000; its ``estimate_*`` fields are that fit's), the fit fell 1-3 % short of the peak
allocated: 370m x 32 x 2048 tokens (the preset's micro-batch), MatMul-free 75.9 GB allocated, 78.0
reserved, 73.3 estimated; Transformer++ 109.8, 124.8 and 107.3; 8 x 1024 tokens: 15.5 and 19.9 GB
allocated, 15.3 and 19.6 estimated. So the table's CUDA rows are that fit with 10 % added to the
activation terms and ``C`` = 1.5 GiB (the CUDA context, the caching allocator's slack): 80.5, 117.9,
16.7 and 21.4 GB for those four runs. ``precision.dtype = fp32`` on CUDA doubles the activation
terms (an assumption, not measured).

Time (``training_seconds``, for the warning when a GPU-sized model trains on the CPU): the run's
training FLOPs (6 per parameter per token in the matrix products, plus attention) divided by this
machine's fp32 matrix-product rate measured at the time (``matmul_flops``) times ``CPU_EFFICIENCY``,
the share of that rate a CPU training step reaches. Measured with two threads on 370m's width
(d 1024, m 2816, 4 layers, 512 tokens, the head small so that the layers dominate as at 370m): 0.33
for MatMul-free (its reference BitLinears and recurrence do much element-wise work besides the
products), 0.81 for Transformer++; the machine was shared, its matmul rate moved between 15 and 50
GFLOP/s, so the time is good to a factor of about two.
"""

from __future__ import annotations

import ctypes
import gc
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .distributed import World, any_flag
from .errors import MMFError
from .train_config import TrainConfig, build_model_config
from .units import human_bytes, human_seconds

# (a, b, h, g, C) per (device type, arch); see the module docstring
COEFFICIENTS = {
    ("cpu", "mmf"): (320.0, 22.0, 0.0, 10.0, 240e6),
    ("cpu", "transformer++"): (72.0, 15.0, 0.9, 11.0, 240e6),
    ("cuda", "mmf"): (16.6, 0.0, 0.0, 22.0, 1.5 * 2.0**30),
    ("cuda", "transformer++"): (39.8, 0.0, 0.0, 22.0, 1.5 * 2.0**30),
}
STATE_BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
CPU_EFFICIENCY = {"mmf": 0.33, "transformer++": 0.81}  # training FLOP rate / matmul FLOP rate (CPU)
GPU_SIZED_PARAMS = 300e6  # a model of this many parameters or more is "GPU-sized" (the 370m preset and up)


def available_bytes(device) -> int:
    """Bytes a new allocation can get on ``device`` now (CPU: available RAM; CUDA: free device memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return int(psutil.virtual_memory().available)


@dataclass
class TrainingMemory:
    """One rank's estimated peak of a training step, in bytes, by part."""

    state: float  # weights, gradients, optimiser moments (and DDP buckets) held by this rank
    activations: float  # per micro-step: kept for backward, plus the logits' loss
    runtime: float  # the framework's own working memory
    per_sequence: float  # activations of one sequence of seq_len tokens
    processes: int  # processes sharing this memory (torchrun ranks on one CPU host)

    @property
    def total(self) -> float:
        return (self.state + self.activations + self.runtime) * self.processes


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once (tied weights share one)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _activation_bytes(coef, mcfg, tokens: int, seq_len: int) -> float:
    a, b, h, g, _ = coef
    heads = getattr(mcfg, "num_attention_heads", 0) if mcfg.arch == "transformer++" else 0
    per_layer = a * mcfg.hidden_size + b * mcfg.ffn_size + h * seq_len * heads
    return tokens * (mcfg.num_hidden_layers * per_layer + g * mcfg.vocab_size)


def training_memory(mcfg, n_params: int, micro_batch: int, seq_len: int, device_type: str = "cpu",
                    fp32_on_cuda: bool = False, world_size: int = 1, strategy: str = "ddp",
                    processes: int = 1) -> TrainingMemory:
    """The estimate of the module docstring for one rank training ``mcfg`` (``n_params`` parameters)
    on ``micro_batch`` sequences of ``seq_len`` tokens per micro-step."""
    key = ("cuda" if device_type == "cuda" else "cpu", mcfg.arch)
    coef = COEFFICIENTS[key]
    state = float(STATE_BYTES_PER_PARAM * n_params)
    if world_size > 1 and strategy == "fsdp":
        layer = state / max(1, mcfg.num_hidden_layers)
        state = state / world_size + 2 * layer  # a shard, plus the layers gathered around the one computing
        if key == ("cuda", "mmf"):
            # the fused BitLinear's quantised weight (codes / s_w, bf16) is cached on the gathered parameter
            # for the rest of the step and is not sharded: 2 bytes per parameter on every rank (not measured)
            state += 2 * n_params
    elif world_size > 1:
        state += 4 * n_params  # DDP's gradient buckets
    scale = 2.0 if key[0] == "cuda" and fp32_on_cuda else 1.0
    per_seq = scale * _activation_bytes(coef, mcfg, seq_len, seq_len)
    return TrainingMemory(state=state, activations=per_seq * micro_batch, runtime=coef[4], per_sequence=per_seq,
                          processes=processes)


def training_flops_per_token(mcfg, n_params: int, seq_len: int) -> float:
    """Forward and backward FLOPs per token: 6 per matrix parameter (the embedding table is a lookup,
    not a product, unless tied to the head), plus attention's scores and weighted sum."""
    emb = mcfg.vocab_size * mcfg.hidden_size
    matrix = n_params - (0 if getattr(mcfg, "tie_word_embeddings", False) else emb)
    flops = 6.0 * matrix
    if mcfg.arch == "transformer++":
        flops += 6.0 * mcfg.num_hidden_layers * seq_len * mcfg.hidden_size  # causal: half of 2 x 2 T d, x3
    return flops


def matmul_flops(seconds: float = 0.2, n: int = 512) -> float:
    """This process's fp32 matrix-product rate on the CPU (FLOP/s), measured for about ``seconds``."""
    a = torch.randn(n, n)
    b = torch.randn(n, 4 * n)
    a @ b  # warm-up
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return 2.0 * n * n * 4 * n * reps / dt


def training_seconds(mcfg, n_params: int, seq_len: int, tokens: int, rate: Optional[float] = None) -> float:
    """Estimated CPU seconds to train on ``tokens`` tokens: FLOPs / (measured matmul rate x CPU_EFFICIENCY)."""
    rate = rate if rate is not None else matmul_flops()
    return tokens * training_flops_per_token(mcfg, n_params, seq_len) / (rate * CPU_EFFICIENCY[mcfg.arch])


def local_processes() -> int:
    """Processes of this run on this host (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


# ---------------------------------------------------------------------------------------------
# The check before a run

def planned_model(cfg: TrainConfig):
    """The model config and parameter count a run will build, before its tokenizer exists: the
    vocabulary is the one asked for, else the tokenizer's (byte: 259, bpe: its vocab_size), else the preset's."""
    from .models import build_model
    from .tokenizer import ByteTokenizer

    vocab = cfg.model.get("vocab_size")
    if not isinstance(vocab, int):
        vocab = {"byte": ByteTokenizer.vocab_size, "bpe": cfg.tokenizer.vocab_size}.get(cfg.tokenizer.type)
    mcfg = build_model_config(cfg.model, vocab_size=vocab)
    if mcfg.arch == "transformer++":
        mcfg.max_position_embeddings = max(mcfg.max_position_embeddings, cfg.train.seq_len)
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(mcfg).parameters())
    return mcfg, n


def check_training_memory(world: World, cfg: TrainConfig, log: Callable = print) -> None:
    """Refuse, with the fix, a run whose step would not fit in memory; warn when a GPU-sized model
    trains on the CPU, with the estimated time. The estimate is ``training_memory``'s."""
    if os.environ.get("MMF_MEMORY_CHECK", "1") == "0":
        return
    T, B, A, W = cfg.train.seq_len, cfg.train.batch_size, cfg.train.grad_accum, world.size
    micro = B // (W * A)
    mcfg, n_params = planned_model(cfg)
    dev = world.device.type
    use_bf16 = cfg.precision.dtype == "bf16" or (cfg.precision.dtype == "auto" and dev == "cuda")
    procs = local_processes() if dev == "cpu" else 1

    def estimate(micro_batch: int, seq_len: int):
        return training_memory(mcfg, n_params, micro_batch, seq_len, dev, fp32_on_cuda=not use_bf16,
                               world_size=W, strategy=cfg.distributed.strategy, processes=procs)

    est = estimate(micro, T)
    where = "this CPU" if dev == "cpu" else f"GPU {world.device}"
    if dev == "cpu" and n_params >= GPU_SIZED_PARAMS and world.is_main:
        secs = training_seconds(mcfg, n_params, T, cfg.train.steps * B * T) / W
        log(f"warning: {n_params / 1e6:,.0f}M parameters is a GPU-sized model; on {where} "
            f"{cfg.train.steps:,} steps x {B * T:,} tokens would take about {human_seconds(secs)} "
            "(an estimate from this CPU's measured matrix-product rate)")
    avail = available_bytes(world.device)
    if not any_flag(world, est.total > avail):
        return
    need = human_bytes(est.total)
    parts = (f"weights, gradients and AdamW state {human_bytes(est.state * est.processes)}, activations of "
             f"{micro} x {T} tokens per micro-step {human_bytes(est.activations * est.processes)}")
    fixes = []
    # the fewest micro-steps (a larger grad_accum, same train.batch_size) whose micro-batch fits
    fit_k = next((k for k in range(A, B // W + 1) if B % (W * k) == 0 and estimate(B // (W * k), T).total <= avail),
                 None)
    if fit_k is not None:
        fixes.append(f"split each step into more micro-steps with --set train.grad_accum={fit_k} "
                     f"({B // (W * fit_k)} sequences each, same train.batch_size {B})")
    else:
        seq = T
        while seq > 16 and estimate(1, seq).total > avail:
            seq //= 2
        if estimate(1, seq).total <= avail and seq >= 16:
            fixes.append(f"use one sequence per micro-step and shorter sequences: --set train.grad_accum={B // W} "
                         f"--set train.seq_len={seq}")
    fixes.append("train a smaller model (e.g. --config tiny)" if n_params >= GPU_SIZED_PARAMS
                 else "train a smaller model")
    if dev == "cpu":
        fixes.append("train on a GPU")
    raise MMFError(f"training needs about {need} of memory ({parts}) but {human_bytes(avail)} is available on "
                   f"{where}; {'; or '.join(fixes)} (MMF_MEMORY_CHECK=0 skips this check)")


# ---------------------------------------------------------------------------------------------
# Generation: the check before `mmf generate` prefills (several prompts make one batch)

@dataclass
class GenerationMemory:
    """Bytes that generating needs on top of the loaded weights, by part (``generation_memory``)."""

    rows: int  # sequences decoded together
    per_row: float  # recurrent state (or KV cache), logits and activations of one row's decode step
    prefill: float  # the longest prompt's prefill, one prompt at a time
    decoder: float  # a static decoder's own weight copy (GraphDecoder packing int8 codes to 2 bits)

    @property
    def total(self) -> float:
        return self.rows * self.per_row + self.prefill + self.decoder


def kv_bytes_per_position(cfg, act_bytes: int) -> int:
    """Transformer++'s KV cache bytes for one position of one row (keys and values of every layer)."""
    return 2 * cfg.num_hidden_layers * cfg.n_kv_heads * cfg.dim_head * act_bytes


def generation_memory(cfg, rows: int, prompt_len: int, max_new_tokens: int, act_bytes: int,
                      decoder_bytes: int = 0) -> GenerationMemory:
    """Bytes ``rows`` sequences need while generating, besides the weights: computed from the shapes, not
    calibrated (fp32 activations counted whatever the model's dtype, so it errs high).

    * per row: MatMul-free, its fp32 state L x d three times (the stacked prefill states, the state read and
      the one written); Transformer++ the KV cache of ``prompt_len + max_new_tokens`` positions; then the
      logits (model dtype, an fp32 copy, the sampler's probabilities) and one token's activations
      (8 d + 4 m fp32 values: the norms' inputs, i/f/g or q/k/v, the gate-up pair and the GLU);
    * prefill (each prompt on its own): the longest prompt's activations and its logits at every position,
      plus its fp32 attention scores for Transformer++ (heads x T x T);
    * decoder: what a static decoder adds (``decoder_bytes``, e.g. GraphDecoder's 2-bit copy of int8 codes)."""
    d, m, L, V = cfg.hidden_size, cfg.ffn_size, cfg.num_hidden_layers, cfg.vocab_size
    tok_act = (8 * d + 4 * m) * 4
    logits = V * (act_bytes + 4 + 4)
    if cfg.arch == "mmf":
        state = 3 * L * d * 4
        scores = 0
    else:
        state = kv_bytes_per_position(cfg, act_bytes) * (prompt_len + max_new_tokens)
        scores = cfg.num_attention_heads * prompt_len * prompt_len * 4
    prefill = prompt_len * (tok_act + V * act_bytes) + scores
    return GenerationMemory(rows=rows, per_row=float(state + logits + tok_act), prefill=float(prefill),
                            decoder=float(decoder_bytes))


def check_generation_memory(cfg, prompts: int, rows: int, prompt_len: int, max_new_tokens: int, act_bytes: int,
                            device, weight_bytes: int, decoder_bytes: int = 0, fix: str = "") -> GenerationMemory:
    """Refuse, in one line with the memory needed and the memory available, a generation whose ``rows``
    sequences (of ``prompts`` prompts) would not fit beside the loaded weights on ``device`` (before any
    decoder is built or prompt prefilled). ``MMF_MEMORY_CHECK=0`` skips it."""
    est = generation_memory(cfg, rows, prompt_len, max_new_tokens, act_bytes, decoder_bytes)
    if os.environ.get("MMF_MEMORY_CHECK", "1") == "0":
        return est
    avail = available_bytes(device)
    if est.total <= avail:
        return est
    device = torch.device(device)
    where = "this CPU" if device.type == "cpu" else f"GPU {device}"
    fit = int((avail - est.prefill - est.decoder) // est.per_row) if est.per_row else 0
    parts = (f"{rows} row{'s' if rows != 1 else ''} of state, logits and activations "
             f"{human_bytes(rows * est.per_row)}, the prefill of a {prompt_len}-token prompt {human_bytes(est.prefill)}"
             + (f", the decoder's packed weights {human_bytes(est.decoder)}" if est.decoder else ""))
    how = f"give at most {fit} prompts per call" if 0 < fit < rows else "give shorter prompts"
    if cfg.arch != "mmf":  # a KV cache grows with every new token: the longest generation that fits
        kv_pos = kv_bytes_per_position(cfg, act_bytes)
        rest = est.per_row - kv_pos * (prompt_len + max_new_tokens)
        n_fit = int(((avail - est.prefill - est.decoder) / rows - rest) // kv_pos) - prompt_len
        if 0 <= n_fit < max_new_tokens:
            how, fix = f"give --max-new-tokens at most {n_fit} (the KV cache grows with every new token)", ""
    raise MMFError(f"{prompts} prompt{'s' if prompts != 1 else ''} need about {human_bytes(est.total)} of memory "
                   f"besides the loaded weights ({human_bytes(weight_bytes)}): {parts}; {human_bytes(avail)} is "
                   f"available on {where}; {how}{fix} (MMF_MEMORY_CHECK=0 skips this check)")
