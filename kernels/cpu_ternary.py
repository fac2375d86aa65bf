"""The native CPU kernel for the BitLinear inference form on i2-packed weights (``kernels/cpu/``).

``bitlinear_i2`` here equals ``kernels.reference.bitlinear_i2``: the input RMSNorm, the per-token
int8 absmax quantisation, the exact integer ternary product and the scales, fused in C, vectorised
(AVX-512 VNNI, AVX-VNNI, AVX2, or portable C, chosen at run time) and multithreaded (a pthread pool;
as many threads as ``torch.get_num_threads()``). Its integer accumulators are bit-identical to the
reference's, and its float prologue repeats torch's operations in torch's order, so its outputs are
normally bit-identical too (tests/test_cpu_kernel.py measures it).

Build route: the C source ships as package data and is compiled with gcc (``$CC`` if set) at first
use into a per-user cache (``$MMF_CACHE_DIR/cpu``, else ``$XDG_CACHE_HOME/mmf/cpu``, else
``~/.cache/mmf/cpu``), named by a hash of the source, the compiler's version and the flags, written
to a temporary name and renamed (concurrent processes are safe). It is loaded with ctypes and called
on ``tensor.data_ptr()``: no torch headers, so no ABI tie to the installed torch, and the build
takes about a second. Where it cannot be built or loaded, ``available()`` is False after one line on
stderr, and ``mmf.kernels`` runs the torch path instead.

Environment: ``MMF_CPU_ISA=avx512vnni|avxvnni|avx2|scalar`` (read at the first call) forces one path (an
error if this CPU lacks it); ``MMF_FORCE_REFERENCE=1`` bypasses this module altogether (see
``mmf.kernels``); ``MMF_CPU_SPIN_US`` sets how long idle workers spin before sleeping (default 100).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from .reference import BITLINEAR_NORM_EPS

ISAS = ("scalar", "avx2", "avxvnni", "avx512vnni")  # index = the C library's ISA code
SOURCE_DIR = Path(__file__).with_name("cpu")
SOURCES = ("ternary_cpu.c",)
CFLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden",
          "-ffp-contract=off", "-fno-fast-math")  # no contraction: the float prologue repeats torch's roundings
ABI_VERSION = 3
MAX_K = 1 << 24  # int32 accumulators: |acc| <= 2 * 128 * K

_lock = threading.Lock()
_state: dict = {"lib": None, "tried": False, "reason": None, "path": None}
_isa_override: list = [None]  # set_isa(); None: MMF_CPU_ISA or the best path


class NativeKernelError(RuntimeError):
    """The native library could not be built or loaded (the caller falls back to torch)."""


# ---- build and load ------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where built libraries are kept: ``$MMF_CACHE_DIR/cpu``, ``$XDG_CACHE_HOME/mmf/cpu`` or ``~/.cache/mmf/cpu``."""
    if os.environ.get("MMF_CACHE_DIR"):
        return Path(os.environ["MMF_CACHE_DIR"]) / "cpu"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "mmf" / "cpu"
    return Path.home() / ".cache" / "mmf" / "cpu"


def _compiler() -> list:
    cc = os.environ.get("CC", "").strip()
    if cc:
        return shlex.split(cc)
    for name in ("gcc", "cc"):
        if shutil.which(name):
            return [name]
    raise NativeKernelError("no C compiler found (install gcc, or set CC)")


def _run(cmd, timeout):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise NativeKernelError(f"compiler {cmd[0]!r} not found (install gcc, or set CC)") from None
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeKernelError(f"running {cmd[0]!r} failed: {e}") from None


def build(force: bool = False) -> Path:
    """Compile the library into the cache if it is not there yet; returns its path."""
    cc = _compiler()
    ver = _run([*cc, "--version"], 60)
    if ver.returncode != 0:
        raise NativeKernelError(f"{' '.join(cc)} --version failed; is CC a C compiler?")
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((SOURCE_DIR / name).read_bytes())
    h.update("\0".join([*cc, ver.stdout, *CFLAGS, platform.machine(), str(ABI_VERSION)]).encode())
    out = cache_dir() / f"ternary_cpu-{h.hexdigest()[:20]}.so"
    if out.exists() and not force:
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NativeKernelError(f"cannot create the cache directory {out.parent}: {e.strerror}") from None
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    cmd = [*cc, *CFLAGS, *(str(SOURCE_DIR / n) for n in SOURCES), "-o", str(tmp), "-lm"]
    try:
        r = _run(cmd, 600)
        if r.returncode != 0:
            first = next((ln for ln in (r.stderr or "").splitlines() if "error" in ln), None) or \
                (r.stderr or "").strip().splitlines()[:1]
            raise NativeKernelError(f"compiling {SOURCES[0]} failed: {first}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


_P = ctypes.c_void_p
_I64, _INT, _F32 = ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "mmf_cpu_abi_version": (_INT, ()),
    "mmf_cpu_isa_supported": (_INT, (_INT,)),
    "mmf_cpu_best_isa": (_INT, ()),
    "mmf_cpu_set_sum_lanes": (_INT, (_INT,)),
    "mmf_cpu_set_min_parallel_bytes": (None, (_I64,)),
    "mmf_i2_bitlinear": (_INT, (_P, _I64, _I64, _P, _F32, _P, _I64, _I64, _F32, _P, _P, _INT, _INT)),
    "mmf_i2_gemm_s8": (_INT, (_P, _I64, _I64, _P, _I64, _I64, _P, _INT, _INT)),
    "mmf_quantize_rows": (_INT, (_P, _I64, _I64, _P, _F32, _P, _P, _INT)),
    "mmf_i2_count_invalid": (_I64, (_P, _I64, _I64, _I64, _INT)),
    "mmf_read_stream": (ctypes.c_uint64, (_P, _I64, _INT, _INT)),
    "mmf_hgrn_step": (_INT, (_I64, _I64, _I64, _I64, _I64, _P, _P, _F32, _P, _INT, _P, _P, _P, _P, _F32, _P, _P,
                             _F32, _P, _P, _INT, _INT)),
}


def _load(path: Path):
    lib = ctypes.CDLL(str(path))  # CDLL releases the GIL during calls
    for name, (res, args) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    if lib.mmf_cpu_abi_version() != ABI_VERSION:
        raise NativeKernelError(f"{path} has ABI {lib.mmf_cpu_abi_version()}, expected {ABI_VERSION}")
    lib.mmf_cpu_set_sum_lanes(_torch_sum_lanes(lib))
    return lib


def _torch_sum_lanes(lib) -> int:
    """The lane count of the vector loop in torch's float sum on this machine and build.

    ATen sums a row with W-lane vector adds in a cascade whose order depends on W (8 under AVX2,
    the kernel torch runs for sums on AVX-512 machines too). The C prologue repeats that order, so
    the normalised activations are bit-identical to torch's; W is found by trying each candidate
    on random rows."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(6, 1000, generator=g) * torch.rand(6, 1, generator=g).mul(50)
    want = x.pow(2).sum(-1)
    nw = torch.ones(1000)
    for lanes in (8, 16, 4):
        lib.mmf_cpu_set_sum_lanes(lanes)
        s_x = torch.empty(6)
        xq = torch.empty(6, 1000, dtype=torch.int8)
        lib.mmf_quantize_rows(x.data_ptr(), 6, 1000, nw.data_ptr(), _F32(0.0), xq.data_ptr(), s_x.data_ptr(), 0)
        # with eps 0 and unit weights, s_x is a function of the mean of squares: compare via torch
        ref = torch.rsqrt(want / 1000)[:, None] * x
        ref_sx = 127.0 / ref.abs().amax(-1).clamp(min=1e-5)
        if torch.equal(s_x, ref_sx) and torch.equal(xq, (ref * ref_sx[:, None]).round().clamp(-128, 127).to(torch.int8)):
            return lanes
    return 8


def _library():
    """The loaded library, or None (after one line on stderr) when it cannot be built or loaded."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if not _state["tried"]:
            try:
                path = build()
                _state["lib"], _state["path"] = _load(path), path
            except (NativeKernelError, OSError, AttributeError) as e:
                _state["reason"] = str(e).splitlines()[0] if str(e) else type(e).__name__
                print(f"mmf: the native CPU kernel is unavailable ({_state['reason']}); "
                      "using the slower torch path", file=sys.stderr, flush=True)
            _state["tried"] = True
    return _state["lib"]


def available() -> bool:
    """True when the native kernel is built and loaded (builds it on the first call)."""
    return _library() is not None


def _require():
    lib = _library()
    if lib is None:
        raise NativeKernelError(f"the native CPU kernel is unavailable: {_state['reason']}")
    return lib


def _reset_for_tests() -> None:
    """Forget the loaded library and the chosen path (tests of the build, fallback and MMF_CPU_ISA)."""
    with _lock:
        _state.update(lib=None, tried=False, reason=None, path=None)
        _ISA[0] = None


# ---- instruction paths ---------------------------------------------------------------------------

def supported_isas() -> list:
    """The instruction paths this CPU (and the compiler that built the library) can run, best last."""
    lib = _require()
    return [name for i, name in enumerate(ISAS) if lib.mmf_cpu_isa_supported(i)]


def _check_isa(name: str, source: str) -> int:
    from mmf.errors import MMFError

    if name not in ISAS:
        raise MMFError(f"{source}={name!r} is not an instruction path; use one of {', '.join(ISAS)}")
    code = ISAS.index(name)
    if not _require().mmf_cpu_isa_supported(code):
        raise MMFError(f"{source}={name}: this CPU lacks it; use one of {', '.join(supported_isas())}"
                       + (" (or unset MMF_CPU_ISA)" if source == "MMF_CPU_ISA" else ""))
    return code


_ISA: list = [None]  # the resolved path, cached for the per-call fast path (cleared by set_isa)


def _isa_code() -> int:
    if _isa_override[0] is not None:
        return _isa_override[0]
    env = os.environ.get("MMF_CPU_ISA", "").strip().lower()
    code = _check_isa(env, "MMF_CPU_ISA") if env else _require().mmf_cpu_best_isa()
    _ISA[0] = code
    return code


def isa() -> str:
    """The instruction path the kernel runs now."""
    return ISAS[_isa_code()]


def set_isa(name: str | None) -> str | None:
    """Force an instruction path (None: back to ``MMF_CPU_ISA`` or the best one); returns the previous
    setting. An unknown path, or one this CPU lacks, raises MMFError."""
    prev = None if _isa_override[0] is None else ISAS[_isa_override[0]]
    _isa_override[0] = None if name is None else _check_isa(name, "set_isa")
    _ISA[0] = _isa_override[0]
    return prev


def set_min_parallel_bytes(n: int) -> None:
    """Weight bytes per thread below which a call uses fewer threads (default 64 KiB; tests set 1
    to run tiny shapes on several threads)."""
    _require().mmf_cpu_set_min_parallel_bytes(int(n))


def info() -> dict:
    """What runs: availability, the path, the library file, and why not when unavailable."""
    lib = _library()
    if lib is None:
        return {"available": False, "reason": _state["reason"]}
    return {"available": True, "isa": isa(), "isas": supported_isas(), "library": str(_state["path"]),
            "threads": torch.get_num_threads()}


# ---- operators -----------------------------------------------------------------------------------

_kernel_threads: list = [None]  # set by native_forward(): the kernel's threads while torch runs on one


def default_threads() -> int:
    """The kernel's thread count: torch's, or torch's before ``native_forward`` set it to one."""
    return _kernel_threads[0] or torch.get_num_threads()


@contextlib.contextmanager
def native_forward():
    """For a forward whose projections run here: torch's own ops on one thread, the kernel on torch's count.

    torch's OpenMP workers spin for a while after each parallel region (a prefill's elementwise ops
    are large enough to run in parallel) and take the cores from this kernel's workers. Measured on
    this project's 2-core machine, 1.3b prefill of 128 tokens in bf16: 0.94-1.04 s with both on two
    threads, 0.60-0.63 s this way (0.71-0.78 s with ``OMP_WAIT_POLICY=PASSIVE`` instead). A decode
    step's small tensors run on one thread in torch anyway. Nested uses are no-ops."""
    n = torch.get_num_threads()
    if n == 1 or _kernel_threads[0] is not None:
        yield
        return
    _kernel_threads[0] = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _kernel_threads[0] = None


def _threads(threads) -> int:
    return max(1, int(threads if threads is not None else default_threads()))


def _check_packed(packed: torch.Tensor, k: int) -> tuple:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed weights must be a 2-d uint8 tensor, got "
                         f"{getattr(packed, 'dtype', type(packed).__name__)} of {getattr(packed, 'dim', lambda: '?')()} dims")
    if packed.device.type != "cpu":
        raise ValueError(f"the native CPU kernel needs CPU tensors; packed weights are on {packed.device}")
    if not 0 < k <= MAX_K:
        raise ValueError(f"in_features must be in 1..{MAX_K}, got {k}")
    n, p = packed.shape
    if p != (k + 3) // 4:
        raise ValueError(f"packed weights of shape {tuple(packed.shape)} do not hold {k} inputs per row "
                         f"(i2 needs ceil({k} / 4) = {(k + 3) // 4} bytes)")
    return n, p, packed.contiguous()


def _cpu_float(t: torch.Tensor, what: str, numel: int) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError(f"the native CPU kernel needs CPU tensors; {what} is on {t.device}")
    if t.numel() != numel:
        raise ValueError(f"{what} has {t.numel()} elements, expected {numel}")
    return t.reshape(numel).to(torch.float32).contiguous()


def bitlinear_i2(x, norm_weight, packed, k: int, s_w, bias=None, eps: float = BITLINEAR_NORM_EPS, threads=None):
    """``kernels.reference.bitlinear_i2`` on CPU tensors: (..., k) -> (..., N) in x's dtype.

    Shapes, dtypes, devices and strides are checked before the C code sees a pointer; x, the norm
    weight and the bias are converted to contiguous fp32 where they are not (a decode step's common
    case, fp32 and contiguous, takes no copy: this wrapper is most of a small projection's time)."""
    lib = _state["lib"] or _require()
    if (packed.dtype != torch.uint8 or packed.dim() != 2 or not packed.is_cpu or not 0 < k <= MAX_K
            or packed.shape[1] != (k + 3) // 4):
        _check_packed(packed, k)  # raises, naming the problem
    n, p = packed.shape
    if not packed.is_contiguous():
        packed = packed.contiguous()
    if not x.is_cpu or x.dim() == 0 or x.shape[-1] != k or not x.is_floating_point():
        _check_x(x, k)
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    nw = norm_weight
    if not (nw.dtype == torch.float32 and nw.is_cpu and nw.is_contiguous() and nw.numel() == k):
        nw = _cpu_float(nw, "the norm weight", k)
    b = None if bias is None else _cpu_float(bias, "the bias", n)
    out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    rc = lib.mmf_i2_bitlinear(xf.data_ptr(), xf.numel() // k, k, nw.data_ptr(), eps, packed.data_ptr(), n, p,
                              float(s_w), None if b is None else b.data_ptr(), out.data_ptr(),
                              threads or default_threads(), _ISA[0] if _ISA[0] is not None else _isa_code())
    if rc != 0:
        raise RuntimeError(f"mmf_i2_bitlinear failed with code {rc}")
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def _check_x(x, k: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not x.is_cpu:
        raise ValueError(f"the native CPU kernel needs CPU tensors; x is on {x.device}")
    raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features = {k}")


def i2_gemm_int(xq: torch.Tensor, packed: torch.Tensor, k: int, threads=None) -> torch.Tensor:
    """The exact integer product alone: int8 activations (M, k) @ the packed ternary weights^T -> int32 (M, N)."""
    lib = _require()
    n, p, packed = _check_packed(packed, k)
    if xq.dtype != torch.int8 or xq.dim() != 2 or xq.shape[1] != k or xq.device.type != "cpu":
        raise ValueError(f"xq must be a CPU int8 tensor of shape (M, {k}), got {xq.dtype} {tuple(xq.shape)}")
    xq = xq.contiguous()
    out = torch.empty(xq.shape[0], n, dtype=torch.int32)
    rc = lib.mmf_i2_gemm_s8(xq.data_ptr(), xq.shape[0], k, packed.data_ptr(), n, p, out.data_ptr(),
                            _threads(threads), _isa_code())
    if rc != 0:
        raise RuntimeError(f"mmf_i2_gemm_s8 failed with code {rc}")
    return out


def quantize(x: torch.Tensor, norm_weight: torch.Tensor, eps: float = BITLINEAR_NORM_EPS) -> tuple:
    """The kernel's prologue alone: (xq int8 (M, K), s_x fp32 (M,)) of rows x (M, K)."""
    lib = _require()
    k = x.shape[-1]
    xf = x.reshape(-1, k).to(torch.float32).contiguous()
    nw = _cpu_float(norm_weight, "the norm weight", k)
    xq = torch.empty(xf.shape, dtype=torch.int8)
    s_x = torch.empty(xf.shape[0], dtype=torch.float32)
    if lib.mmf_quantize_rows(xf.data_ptr(), xf.shape[0], k, nw.data_ptr(), float(eps), xq.data_ptr(), s_x.data_ptr(),
                             _isa_code()):
        raise RuntimeError("mmf_quantize_rows failed")
    return xq, s_x


def i2_invalid_count(packed: torch.Tensor, k: int, threads=None) -> int:
    """How many bytes hold the unused code 0b11, plus padding digits that are not code 1 (0: valid)."""
    n, p, packed = _check_packed(packed, k)
    lib = _library()
    if lib is None:  # the same count in torch
        bad = int((((packed >> 1) & packed & 0x55) != 0).sum())
        if 4 * p != k:
            codes = torch.cat([(packed >> (2 * s)) & 3 for s in range(4)], dim=1)[:, k:]
            bad += int((codes != 1).sum())
        return bad
    return int(lib.mmf_i2_count_invalid(packed.data_ptr(), n, p, k, _threads(threads)))


def read_bandwidth(nbytes: int = 1 << 30, threads=None, repeats: int = 3, isa_name: str | None = None) -> float:
    """Read bandwidth in GB/s: the best of ``repeats`` read-only passes over a fresh ``nbytes`` buffer
    (bigger than the caches), each thread streaming its own contiguous share."""
    lib = _require()
    code = _check_isa(isa_name, "isa_name") if isa_name else _isa_code()
    buf = torch.empty(int(nbytes), dtype=torch.uint8).fill_(1)  # touched: no page faults while timing
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        lib.mmf_read_stream(buf.data_ptr(), buf.numel(), _threads(threads), code)
        best = min(best, time.perf_counter() - t0)
    return buf.numel() / best / 1e9
