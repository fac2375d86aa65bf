"""An outside anchor for mmf's CPU decode: llama.cpp's ternary TQ2_0 kernels on the same machine (issue 18 item 6).

The script writes a GGUF of a Llama (Transformer++) with one of mmf's preset shapes (default ``1.3b``: hidden 2048,
24 layers, FFN 5632, 32 heads, vocab 32000) whose every linear projection (q, k, v, o, gate, up, down and the
output head, which is ternary in mmf too) holds random ternary weights stored as llama.cpp's ``TQ2_0``, loads it with
``llama-cpp-python`` and times greedy decode (and a 128-token prefill) at the thread counts asked for. It prints a
table, or with ``--json`` the JSON document that ``--json-out`` writes.

It runs in its own virtual environment holding only numpy, gguf and llama-cpp-python (no torch, no mmf import), so
that llama.cpp is compiled for this CPU and nothing in mmf's environment changes. Install (llama-cpp-python compiles
llama.cpp from source at install: a few minutes on 2 cores; ``GGML_NATIVE=ON`` builds for this CPU's ISA, so TQ2_0
runs its AVX2 ``maddubs`` path; llama.cpp has no AVX-512 path for TQ2_0)::

    python3 -m venv /tmp/llamacpp-venv
    /tmp/llamacpp-venv/bin/pip install numpy gguf
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \\
        /tmp/llamacpp-venv/bin/pip install --no-cache-dir llama-cpp-python
    /tmp/llamacpp-venv/bin/python bench/llamacpp_anchor.py --size 1.3b --threads 1 2 --json-out anchor.json

From mmf's own environment, ``mmf.bench.anchor.run_llamacpp_anchor("/tmp/llamacpp-venv/bin/python", threads=2)``
runs this script in that interpreter and returns its JSON.

The shape: mmf's MatMul-free 1.3b and its Transformer++ 1.3b have the same hidden size, layers, vocab and FFN size
(``256 * ceil(d * 8/3 / 256)`` = 5632), and the same number of weights per layer: the MLGRU's four d×d projections
(i, f, g, o) against attention's q, k, v, o. What differs is outside the weights: llama.cpp runs softmax attention
over a KV cache (cheap at the short contexts timed here) where mmf runs an elementwise recurrence, TQ2_0 carries one
fp16 scale per 256 weights (2.0625 bits per weight) where mmf's ``i2`` has one scale per tensor (2 bits), llama.cpp
quantises activations per 256-block (Q8_K) where mmf quantises per token, and mmf fuses an RMSNorm into every
BitLinear. The token embedding is F16 here (llama.cpp reads one row per token), the norms F32.

Timing protocol (mmf bench's CPU protocol, batch 1): a random prompt of ``--prompt-len`` tokens (one prefill), then
``--new-tokens`` greedy decode steps (argmax of the logits), ``--repeat`` times after one untimed warm-up. Each
decode step is timed twice: by llama.cpp's own counter (``llama_perf_context``: the time inside ``llama_decode``
for a one-token batch, graph build and compute) and by the wall clock around the Python call (adds the binding's
overhead and the argmax). Prefill of ``--prefill-len`` tokens is one ``llama_decode`` of that many tokens.
Weights are random, so the tokens generated mean nothing; only the time does.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

try:
    import numpy as np
except ImportError:  # reported by require() with the install commands
    np = None

SCHEMA_VERSION = 1
VENV = "/tmp/llamacpp-venv"
INSTALL_HINT = (
    f"create the separate environment: python3 -m venv {VENV} && {VENV}/bin/pip install numpy gguf && "
    f'CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" {VENV}/bin/pip install --no-cache-dir llama-cpp-python, '
    f"then run this script with {VENV}/bin/python"
)

# ---------------------------------------------------------------------------------------------- TQ2_0 layout
# llama.cpp ggml-common.h: typedef struct { uint8_t qs[QK_K/4]; ggml_half d; } block_tq2_0;  (GGML_TYPE_TQ2_0 = 35)
# 256 weights per block: 64 bytes of 2-bit codes (code = w + 1, so 0, 1, 2; 3 is unused), then the fp16 scale d.
# Weight j of a block (j = 128*h + 32*l + m, h in 0..1, l in 0..3, m in 0..31) is bits 2l..2l+1 of qs[32*h + m],
# and its value is (code - 1) * d (dequantize_row_tq2_0 in ggml-quants.c).
QK_K = 256
TQ2_0_QS_BYTES = QK_K // 4
TQ2_0_BLOCK_BYTES = TQ2_0_QS_BYTES + 2
GGML_TYPE_TQ2_0 = 35
W_SCALE = 41.7  # as mmf's bench: w = code / 41.7, mean |w| ~ 0.016, like N(0, 0.02)


class AnchorError(Exception):
    """Bad input or a missing dependency: one line naming the problem and the fix."""


def require(*modules: str) -> None:
    """Import-check ``modules``; one line naming every missing one and how to install them."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise AnchorError(f"{', '.join(missing)} not importable by {sys.executable}; {INSTALL_HINT}")


def pack_tq2_0(codes, d: float):
    """Ternary ``codes`` in {-1, 0, 1}, shape (rows, k) with k a multiple of 256, and one scale ``d`` for every
    block -> TQ2_0 bytes, shape (rows, k / 256 * 66)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] % QK_K:
        raise AnchorError(f"TQ2_0 needs a 2-D weight whose rows are a multiple of {QK_K}, got shape {codes.shape}")
    rows, k = codes.shape
    nb = k // QK_K
    u = (codes.astype(np.int8) + 1).astype(np.uint8).reshape(rows, nb, 2, 4, 32)
    if int(u.max(initial=0)) > 2:
        raise AnchorError("TQ2_0 codes must be -1, 0 or 1")
    qs = u[:, :, :, 0] | (u[:, :, :, 1] << 2) | (u[:, :, :, 2] << 4) | (u[:, :, :, 3] << 6)
    out = np.empty((rows, nb, TQ2_0_BLOCK_BYTES), dtype=np.uint8)
    out[:, :, :TQ2_0_QS_BYTES] = qs.reshape(rows, nb, TQ2_0_QS_BYTES)
    out[:, :, TQ2_0_QS_BYTES:] = np.array([d], dtype="<f2").view(np.uint8)
    return out.reshape(rows, nb * TQ2_0_BLOCK_BYTES)


def unpack_tq2_0(raw, k: int):
    """TQ2_0 bytes (rows, k / 256 * 66) -> (codes int8 (rows, k) in {-1, 0, 1}, scales float32 (rows, k / 256)).

    Exact; a byte holding the unused code 3 is refused."""
    raw = np.asarray(raw, dtype=np.uint8)
    if k % QK_K or raw.ndim != 2 or raw.shape[1] != k // QK_K * TQ2_0_BLOCK_BYTES:
        raise AnchorError(f"TQ2_0 bytes of shape {raw.shape} do not hold rows of {k} weights")
    rows, nb = raw.shape[0], k // QK_K
    blocks = raw.reshape(rows, nb, TQ2_0_BLOCK_BYTES)
    qs = blocks[:, :, :TQ2_0_QS_BYTES].reshape(rows, nb, 2, 1, 32)
    u = (qs >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)) & 3
    if (u == 3).any():
        raise AnchorError("TQ2_0 block holds the unused code 3")
    codes = (u.astype(np.int8) - 1).reshape(rows, k)
    d = np.ascontiguousarray(blocks[:, :, TQ2_0_QS_BYTES:]).view("<f2").reshape(rows, nb).astype(np.float32)
    return codes, d


# ---------------------------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    vocab: int
    heads: int
    ffn: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def mmf_ffn_size(hidden: int) -> int:
    """mmf.config.default_intermediate_size(hidden, 4): 256 * ceil(d * 4 * 2/3 / 256), both architectures."""
    return 256 * -(-(hidden * 8) // (3 * 256))


def _shape(name, hidden, layers, vocab, heads):
    return Shape(name, hidden, layers, vocab, heads, mmf_ffn_size(hidden))


# mmf/config.py _SIZES (Transformer++ heads: d / 64, Llama-13B d / 128); "test" is a small shape for tests.
SHAPES = {
    "test": _shape("test", 256, 2, 512, 4),
    "370m": _shape("370m", 1024, 24, 32000, 16),
    "1.3b": _shape("1.3b", 2048, 24, 32000, 32),
    "2.7b": _shape("2.7b", 2560, 32, 32000, 40),
    "13b": _shape("13b", 5120, 40, 32000, 40),
}


def tensor_plan(shape: Shape) -> list:
    """(GGUF name, numpy shape (out, in), kind) of every tensor, in file order; kind is tq2_0, f16 or f32."""
    d, m, v = shape.hidden, shape.ffn, shape.vocab
    plan = [("token_embd.weight", (v, d), "f16")]
    for i in range(shape.layers):
        b = f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", (d,), "f32"),
            (b + "attn_q.weight", (d, d), "tq2_0"),
            (b + "attn_k.weight", (d, d), "tq2_0"),
            (b + "attn_v.weight", (d, d), "tq2_0"),
            (b + "attn_output.weight", (d, d), "tq2_0"),
            (b + "ffn_norm.weight", (d,), "f32"),
            (b + "ffn_gate.weight", (m, d), "tq2_0"),
            (b + "ffn_up.weight", (m, d), "tq2_0"),
            (b + "ffn_down.weight", (d, m), "tq2_0"),
        ]
    plan += [("output_norm.weight", (d,), "f32"), ("output.weight", (v, d), "tq2_0")]
    return plan


def ternary_weight(seed: int, index: int, rows: int, cols: int):
    """The random ternary codes of tensor number ``index`` (reproducible: the test regenerates them)."""
    rng = np.random.default_rng([seed, index])
    return rng.integers(-1, 2, size=(rows, cols), dtype=np.int8)


def tensor_data(seed: int, index: int, shp: tuple, kind: str):
    """The array written for one tensor of ``tensor_plan`` (TQ2_0: bytes from ``pack_tq2_0``)."""
    if kind == "tq2_0":
        return pack_tq2_0(ternary_weight(seed, index, *shp), 1.0 / W_SCALE)
    if kind == "f32":
        return np.ones(shp, dtype=np.float32)
    rng = np.random.default_rng([seed, index])
    return (rng.standard_normal(shp, dtype=np.float32) * 0.02).astype(np.float16)


def vocab_tokens(n: int) -> tuple:
    """A minimal SentencePiece-style vocabulary that llama.cpp loads: <unk>, <s>, </s>, the 256 byte tokens, then
    placeholder pieces. Returns (tokens, scores, token types)."""
    if n < 259 + 1:
        raise AnchorError(f"vocab must be at least 260 tokens (3 special + 256 bytes + 1), got {n}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(n - len(tokens))]
    # gguf TokenType: NORMAL 1, UNKNOWN 2, CONTROL 3, BYTE 6
    types = [2, 3, 3] + [6] * 256 + [1] * (n - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(n - 259)]
    return tokens, scores, types


def write_gguf(path, shape: Shape, seed: int = 0, ctx_train: int = 4096) -> dict:
    """Write the GGUF of ``shape`` to ``path`` (through a temporary name, renamed at the end; an existing
    file is refused). Tensors are generated and written one at a time, so memory stays at one tensor."""
    require("numpy", "gguf")
    import gguf

    path = Path(path)
    if path.exists():
        raise AnchorError(f"{path} exists; pass another --gguf path or remove it (it is never overwritten)")
    if not path.parent.is_dir():
        raise AnchorError(f"{path.parent} is not a directory; pass --gguf in an existing directory")
    plan = tensor_plan(shape)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    t0 = time.perf_counter()
    w = gguf.GGUFWriter(None, arch="llama")
    try:
        w.add_name(f"mmf-anchor-llama-{shape.name}-tq2_0-random")
        w.add_context_length(ctx_train)
        w.add_embedding_length(shape.hidden)
        w.add_block_count(shape.layers)
        w.add_feed_forward_length(shape.ffn)
        w.add_head_count(shape.heads)
        w.add_head_count_kv(shape.heads)
        w.add_rope_dimension_count(shape.head_dim)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_vocab_size(shape.vocab)
        w.add_file_type(int(gguf.LlamaFileType.MOSTLY_TQ2_0))
        w.add_uint32("mmf_anchor.seed", seed)
        w.add_string("mmf_anchor.shape", shape.name)
        tokens, scores, types = vocab_tokens(shape.vocab)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)
        for name, shp, kind in plan:
            if kind == "tq2_0":
                nbytes = shp[0] * shp[1] // QK_K * TQ2_0_BLOCK_BYTES
                w.add_tensor_info(name, (shp[0], shp[1] // QK_K * TQ2_0_BLOCK_BYTES), np.dtype(np.uint8), nbytes,
                                  raw_dtype=gguf.GGMLQuantizationType.TQ2_0)
            else:
                dt = np.dtype(np.float16 if kind == "f16" else np.float32)
                w.add_tensor_info(name, shp, dt, int(np.prod(shp)) * dt.itemsize)
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for index, (name, shp, kind) in enumerate(plan):
            w.write_tensor_data(tensor_data(seed, index, shp, kind))
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    n_ternary = sum(s[0] * s[1] for _, s, k in plan if k == "tq2_0")
    return {"path": str(path), "bytes": path.stat().st_size, "ternary_weights": n_ternary,
            "ternary_bytes": n_ternary // QK_K * TQ2_0_BLOCK_BYTES, "write_s": time.perf_counter() - t0}


def read_gguf_tensor(path, name: str):
    """(ggml type id, numpy shape (out, in), raw data) of one tensor of a GGUF, through gguf's reader."""
    require("numpy", "gguf")
    import gguf

    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        if t.name == name:
            return int(t.tensor_type), tuple(int(x) for x in reversed(t.shape)), np.asarray(t.data)
    raise AnchorError(f"{path} has no tensor {name!r}")


def check_gguf_shape(path, shape: Shape) -> None:
    """Refuse a --gguf file that is not this script's model of ``shape`` (it is reused as is, never rewritten)."""
    require("numpy", "gguf")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise AnchorError(f"{path} is not a readable GGUF ({e}); pass another --gguf path") from None
    field = reader.get_field("mmf_anchor.shape")
    got = field.contents() if field is not None else None
    if got != shape.name:
        raise AnchorError(f"{path} is not this script's {shape.name} model (it holds {got!r}); "
                          f"pass another --gguf path, or --size {got}" if got else
                          f"{path} was not written by this script; pass another --gguf path")


# ---------------------------------------------------------------------------------------------- machine
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx_vnni", "avx512_bf16", "amx_int8")


def machine_info() -> dict:
    info = {"hostname": platform.node(), "platform": platform.platform(), "python": sys.version.split()[0],
            "cpu": platform.processor() or "unknown", "cpu_cores_logical": os.cpu_count(), "cpu_flags": []}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    info["cpu_flags"] = [fl for fl in CPU_FLAGS if fl in flags]
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["ram_total_bytes"] = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    info["load_average_at_start"] = list(os.getloadavg())
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("numpy", "gguf", "llama_cpp_python"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


# ---------------------------------------------------------------------------------------------- timing
def _stats(xs: Sequence[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


class _Perf:
    """llama.cpp's own decode counters (llama_perf_context), read around every call."""

    def __init__(self, llama_cpp, ctx):
        self.lc, self.ctx = llama_cpp, ctx

    def read(self):
        p = self.lc.llama_perf_context(self.ctx)
        return p.t_eval_ms, p.n_eval, p.t_p_eval_ms, p.n_p_eval


def time_decode(model_path: str, threads: int, prompt_len: int, new_tokens: int, repeat: int, prefill_len: int,
                prefill_repeat: int, seed: int, vocab: int) -> dict:
    """Greedy decode and prefill timings of the GGUF at ``threads`` threads (module docstring: protocol)."""
    import llama_cpp

    n_ctx = max(prompt_len + new_tokens, prefill_len) + 16
    t0 = time.perf_counter()
    try:
        llm = llama_cpp.Llama(model_path=model_path, n_ctx=n_ctx, n_batch=max(prefill_len, prompt_len, 8),
                              n_ubatch=max(prefill_len, prompt_len, 8), n_threads=threads, n_threads_batch=threads,
                              seed=seed, no_perf=False, verbose=False, use_mmap=True)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise AnchorError(f"llama.cpp could not load {model_path} ({e}); use a llama-cpp-python that reads TQ2_0 "
                          "(0.3 or later) and a GGUF this script wrote (llama_cpp.Llama(path, verbose=True) shows "
                          "why)") from None
    load_s = time.perf_counter() - t0
    ctx = llm.ctx
    perf = _Perf(llama_cpp, ctx)
    rng = np.random.default_rng(seed)
    first = 259  # the placeholder pieces; any id < vocab works

    def argmax_last() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,))
        return int(logits.argmax())

    def run(prompt, steps, wall, internal, prefill_wall, prefill_internal):
        llm.reset()
        a = perf.read()
        t = time.perf_counter()
        llm.eval(prompt)
        tok = argmax_last()
        tw = time.perf_counter() - t
        b = perf.read()
        if prefill_wall is not None:
            prefill_wall.append(tw * 1e3)
            prefill_internal.append(b[2] - a[2])
        for _ in range(steps):
            a = perf.read()
            t = time.perf_counter()
            llm.eval([tok])
            tok = argmax_last()
            tw = time.perf_counter() - t
            b = perf.read()
            if wall is not None:
                wall.append(tw * 1e3)
                internal.append(b[0] - a[0])
                if b[1] - a[1] != 1:
                    raise AnchorError("llama.cpp did not count a one-token decode; its perf counters changed meaning")

    def prompt_of(n):
        return [int(x) for x in rng.integers(first, vocab, size=n)]

    run(prompt_of(prompt_len), min(new_tokens, 2), None, None, None, None)  # warm-up
    wall, internal, p_wall, p_internal, loads = [], [], [], [], []
    for _ in range(repeat):
        loads.append(os.getloadavg()[0])
        run(prompt_of(prompt_len), new_tokens, wall, internal, None, None)
    pre_wall, pre_internal = [], []
    if prefill_len:
        for _ in range(prefill_repeat):
            run(prompt_of(prefill_len), 0, None, None, pre_wall, pre_internal)
    sysinfo = llama_cpp.llama_print_system_info()
    desc = ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(llm.model, desc, len(desc))
    model_bytes = int(llama_cpp.llama_model_size(llm.model))
    if hasattr(llm, "close"):
        llm.close()
    del llm
    out = {
        "threads": threads,
        "load_s": load_s,
        "decode_ms_per_token": _stats(internal),
        "decode_ms_per_token_wall": _stats(wall),
        "decode_tokens_per_s": 1e3 / statistics.median(internal),
        "load_average_during": loads + [os.getloadavg()[0]],
        "llama_model_desc": desc.value.decode(errors="replace"),
        "llama_model_size_bytes": model_bytes,
        "llama_system_info": sysinfo.decode(errors="replace").strip() if isinstance(sysinfo, bytes) else str(sysinfo),
    }
    if prefill_len:
        out["prefill_len"] = prefill_len
        out["prefill_ms"] = _stats(pre_internal)
        out["prefill_ms_wall"] = _stats(pre_wall)
    return out


def run_anchor(size: str = "1.3b", threads: Sequence[int] = (1, 2), prompt_len: int = 8, new_tokens: int = 32,
               repeat: int = 3, prefill_len: int = 128, prefill_repeat: int = 3, seed: int = 0,
               gguf_path: Optional[str] = None) -> dict:
    """Write (or reuse) the GGUF, time it at each thread count, return the JSON document."""
    if size not in SHAPES:
        raise AnchorError(f"unknown --size {size!r}; valid: {', '.join(SHAPES)}")
    for name, val, low in (("--prompt-len", prompt_len, 1), ("--new-tokens", new_tokens, 1), ("--repeat", repeat, 1),
                           ("--prefill-len", prefill_len, 0), ("--prefill-repeat", prefill_repeat, 1)):
        if val < low:
            raise AnchorError(f"{name} must be >= {low}, got {val}")
    if not threads or any(t < 1 for t in threads):
        raise AnchorError(f"--threads must be one or more counts >= 1, got {list(threads)}")
    require("numpy", "gguf", "llama_cpp")
    shape = SHAPES[size]
    doc = {"schema_version": SCHEMA_VERSION, "kind": "llamacpp_tq2_0_anchor", "machine": machine_info(),
           "versions": versions(), "model": {**asdict(shape), "head_dim": shape.head_dim, "arch": "llama",
                                             "weights": "random ternary, TQ2_0 (linears and output head), "
                                                        "F16 token embedding, F32 norms"},
           "protocol": {"prompt_len": prompt_len, "new_tokens": new_tokens, "repeat": repeat, "warmup": 1,
                        "prefill_len": prefill_len, "prefill_repeat": prefill_repeat, "seed": seed, "batch": 1,
                        "decoding": "greedy (argmax)",
                        "decode_ms_per_token": "llama_perf_context t_eval per one-token llama_decode",
                        "decode_ms_per_token_wall": "wall clock around Llama.eval([token]) + argmax"}}
    with tempfile.TemporaryDirectory(prefix="llamacpp_anchor_") as tmpdir:
        if gguf_path and Path(gguf_path).exists():
            check_gguf_shape(gguf_path, shape)
            path, written = gguf_path, None
        else:
            path = gguf_path or os.path.join(tmpdir, f"llama-{size}-tq2_0.gguf")
            written = write_gguf(path, shape, seed=seed)
        doc["gguf"] = {"path": str(path) if gguf_path else None, "bytes": os.path.getsize(path),
                       "kept": bool(gguf_path), "write_s": written["write_s"] if written else None,
                       "ternary_weights": sum(s[0] * s[1] for _, s, k in tensor_plan(shape) if k == "tq2_0")}
        doc["gguf"]["ternary_bytes"] = doc["gguf"]["ternary_weights"] // QK_K * TQ2_0_BLOCK_BYTES
        doc["runs"] = [time_decode(str(path), t, prompt_len, new_tokens, repeat, prefill_len, prefill_repeat, seed,
                                   shape.vocab) for t in threads]
    doc["machine"]["load_average_at_end"] = list(os.getloadavg())
    return doc


def format_table(doc: dict) -> str:
    m = doc["model"]
    head = (f"llama.cpp TQ2_0, Llama {m['name']} (d={m['hidden']}, L={m['layers']}, ffn={m['ffn']}, "
            f"vocab={m['vocab']}); GGUF {doc['gguf']['bytes'] / 1e6:.1f} MB; llama-cpp-python "
            f"{doc['versions'].get('llama_cpp_python')}; load average at start "
            f"{doc['machine']['load_average_at_start'][0]:.2f}")
    rows = [("threads", "decode ms/token (median, min-max)", "wall ms/token", "tokens/s", "prefill ms", "load avg")]
    for r in doc["runs"]:
        d, w = r["decode_ms_per_token"], r["decode_ms_per_token_wall"]
        pre = f"{r['prefill_ms']['median']:.1f} ({r['prefill_len']} tok)" if "prefill_ms" in r else "-"
        rows.append((str(r["threads"]), f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f})", f"{w['median']:.2f}",
                     f"{r['decode_tokens_per_s']:.1f}", pre, f"{max(r['load_average_during']):.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return head + "\n" + "\n".join(lines)


def write_json(doc: dict, path: str) -> None:
    p = Path(path)
    if not p.parent.is_dir():
        raise AnchorError(f"--json-out: {p.parent} is not a directory")
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="llamacpp_anchor.py",
        description="Time llama.cpp's TQ2_0 ternary decode on a random Llama of an mmf preset shape "
                    "(run with the separate venv's python; see the module docstring for the install commands).")
    ap.add_argument("--size", default="1.3b", choices=list(SHAPES), help="mmf preset shape (default: 1.3b)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to time (default: 1 2)")
    ap.add_argument("--prompt-len", type=int, default=8, help="prompt tokens before decode (default: 8)")
    ap.add_argument("--new-tokens", "--max-new-tokens", type=int, default=32, dest="new_tokens",
                    help="timed decode steps per repetition (default: 32)")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions after one warm-up (default: 3)")
    ap.add_argument("--prefill-len", type=int, default=128, help="prefill tokens to time; 0 skips (default: 128)")
    ap.add_argument("--prefill-repeat", type=int, default=3, help="prefill repetitions (default: 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default: 0)")
    ap.add_argument("--gguf", default=None,
                    help="GGUF path: written there and kept if absent, reused if this script wrote it "
                         "(default: a temporary file, deleted at the end)")
    ap.add_argument("--write-only", action="store_true",
                    help="write the GGUF (--gguf required) and exit; needs numpy and gguf only")
    ap.add_argument("--json", action="store_true", help="print the JSON document on stdout instead of the table")
    ap.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON document to FILE")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.write_only:
            if not args.gguf:
                raise AnchorError("--write-only needs --gguf PATH (where to write the model)")
            info = write_gguf(args.gguf, SHAPES[args.size], seed=args.seed)
            print(json.dumps(info) if args.json else f"wrote {info['path']} ({info['bytes']} bytes)")
            return 0
        if args.json_out and not Path(args.json_out).parent.is_dir():
            raise AnchorError(f"--json-out: {Path(args.json_out).parent} is not a directory")
        doc = run_anchor(args.size, args.threads, args.prompt_len, args.new_tokens, args.repeat, args.prefill_len,
                         args.prefill_repeat, args.seed, args.gguf)
        if args.json_out:
            write_json(doc, args.json_out)
        print(json.dumps(doc, indent=2) if args.json else format_table(doc))
        return 0
    except AnchorError as e:
        print(f"llamacpp_anchor: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
