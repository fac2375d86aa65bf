"""Word encodings and memory-initialisation file formats of an FPGA image (docs/fpga.md).

A *word* is ``word_bits`` wide. In memory (``.bin``) a word takes ``ceil(word_bits / 8)`` bytes,
least significant byte first; bits above ``word_bits`` are zero. In the text formats a word is
``ceil(word_bits / 4)`` hexadecimal digits, most significant digit first.

Ternary words hold ``word_bits // 2`` codes; lane ``e`` is bits ``[2e+1:2e]`` and holds
``code = w + 1`` (0 = -1, 1 = 0, 2 = +1, 3 reserved), the value convention of the ``i2`` codec in
mmf/ternary_codes.py. Value words hold ``word_bits // b`` little-endian values of ``b`` bits
(fp16, bf16 or fp32); lane ``e`` is bits ``[b(e+1)-1 : b e]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FORMATS = ("mem", "coe", "mif", "bin")
TEXT_FORMATS = ("mem", "coe", "mif")
VALUE_ENCODINGS = {"fp16": (torch.float16, 16), "bf16": (torch.bfloat16, 16), "fp32": (torch.float32, 32)}
CODE_OF_WEIGHT = {-1: 0, 0: 1, 1: 2}
WEIGHT_OF_CODE = {0: -1, 1: 0, 2: 1}
ZERO_CODE = 1  # padding lanes and unused words: weight 0


def bytes_per_word(word_bits: int) -> int:
    return -(-word_bits // 8)


def hex_digits(word_bits: int) -> int:
    return -(-word_bits // 4)


def codes_per_word(word_bits: int) -> int:
    return word_bits // 2


def values_per_word(word_bits: int, encoding: str) -> int:
    return word_bits // VALUE_ENCODINGS[encoding][1]


def _pack_code_lanes(codes: np.ndarray) -> np.ndarray:
    """(..., E) uint8 codes in 0..3 -> (..., ceil(E/4)) bytes, lane e at bits 2(e % 4) of byte e // 4."""
    e = codes.shape[-1]
    e4 = -(-e // 4) * 4
    if e4 != e:  # lanes above word_bits: zero bits
        pad = np.zeros(codes.shape[:-1] + (e4 - e,), dtype=np.uint8)
        codes = np.concatenate([codes, pad], axis=-1)
    c = codes.reshape(codes.shape[:-1] + (e4 // 4, 4))
    return (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).astype(np.uint8)


def encode_ternary_rows(w: torch.Tensor, word_bits: int) -> np.ndarray:
    """(N, K) ternary int8 in {-1,0,1} -> (N, words_per_row, bytes_per_word) uint8.

    Column k of a row sits in word k // E of that row at lane k % E (E = word_bits // 2); lanes past
    column K-1 hold code 1 (weight 0).
    """
    n, k = w.shape
    e = codes_per_word(word_bits)
    wpr = -(-k // e)
    codes = np.full((n, wpr * e), ZERO_CODE, dtype=np.uint8)
    codes[:, :k] = (w.to(torch.int16) + 1).to(torch.uint8).numpy()
    return _pack_code_lanes(codes.reshape(n, wpr, e))


def ternary_fill_word(word_bits: int) -> bytes:
    """One word of code 1 (weight 0) in every lane: the content of unused ternary words."""
    e = codes_per_word(word_bits)
    return _pack_code_lanes(np.full((1, e), ZERO_CODE, dtype=np.uint8)).tobytes()


def encode_values(t: torch.Tensor, encoding: str, word_bits: int) -> np.ndarray:
    """A tensor, flattened in row-major order, -> (words, bytes_per_word) uint8 of ``encoding`` values."""
    dtype, bits = VALUE_ENCODINGS[encoding]
    per_word = word_bits // bits
    flat = t.detach().reshape(-1).to(torch.float32).to(dtype)
    nwords = -(-flat.numel() // per_word)
    padded = torch.zeros(nwords * per_word, dtype=dtype)
    padded[: flat.numel()] = flat
    raw = padded.view(torch.int16 if bits == 16 else torch.int32).numpy().view(np.uint8)
    raw = raw.reshape(nwords, per_word * bits // 8)
    bpw = bytes_per_word(word_bits)
    if raw.shape[1] < bpw:
        raw = np.concatenate([raw, np.zeros((nwords, bpw - raw.shape[1]), dtype=np.uint8)], axis=1)
    return raw


def words_to_hex(words: np.ndarray, word_bits: int) -> np.ndarray:
    """(n, bytes_per_word) little-endian words -> (n, hex_digits) array of ASCII hex digits (big-endian)."""
    n, bpw = words.shape
    be = np.ascontiguousarray(words[:, ::-1])
    text = np.frombuffer(be.tobytes().hex().encode("ascii"), dtype=np.uint8).reshape(n, 2 * bpw)
    return text[:, 2 * bpw - hex_digits(word_bits):]


def _lines(hex_chars: np.ndarray, prefix: bytes = b"", suffix: bytes = b"\n") -> bytes:
    n = hex_chars.shape[0]
    parts = []
    if prefix:
        parts.append(np.broadcast_to(np.frombuffer(prefix, dtype=np.uint8), (n, len(prefix))))
    parts.append(hex_chars)
    parts.append(np.broadcast_to(np.frombuffer(suffix, dtype=np.uint8), (n, len(suffix))))
    return np.concatenate(parts, axis=1).tobytes()


def write_mem(path: Path, words: np.ndarray, word_bits: int, title: str) -> None:
    """Verilog ``$readmemh`` file: a comment line, then one word per line from address 0."""
    hx = words_to_hex(words, word_bits)
    with open(path, "wb") as f:
        f.write(f"// {title}\n".encode())
        f.write(_lines(hx))


def write_coe(path: Path, words: np.ndarray, word_bits: int, title: str) -> None:
    """Xilinx coefficient file: radix 16, one word per line, comma separated, ending with ';'."""
    hx = words_to_hex(words, word_bits)
    with open(path, "wb") as f:
        f.write(f"; {title}\n".encode())
        f.write(b"memory_initialization_radix=16;\nmemory_initialization_vector=\n")
        if len(hx) > 1:
            f.write(_lines(hx[:-1], suffix=b",\n"))
        f.write(_lines(hx[-1:], suffix=b";\n"))


def write_mif(path: Path, words: np.ndarray, word_bits: int, title: str) -> None:
    """Intel memory initialisation file: WIDTH, DEPTH, hex address and data radix, one word per line."""
    hx = words_to_hex(words, word_bits)
    n = len(hx)
    adigits = max(1, len(f"{n - 1:X}"))
    with open(path, "wb") as f:
        f.write(f"-- {title}\n".encode())
        f.write(f"WIDTH={word_bits};\nDEPTH={n};\nADDRESS_RADIX=HEX;\nDATA_RADIX=HEX;\nCONTENT BEGIN\n".encode())
        addr = np.frombuffer("".join(f"{a:0{adigits}X}" for a in range(n)).encode("ascii"),
                             dtype=np.uint8).reshape(n, adigits)
        sep = np.broadcast_to(np.frombuffer(b" : ", dtype=np.uint8), (n, 3))
        body = np.concatenate([np.broadcast_to(np.frombuffer(b"  ", dtype=np.uint8), (n, 2)), addr, sep, hx,
                               np.broadcast_to(np.frombuffer(b";\n", dtype=np.uint8), (n, 2))], axis=1)
        f.write(body.tobytes())
        f.write(b"END;\n")


WRITERS = {"mem": write_mem, "coe": write_coe, "mif": write_mif}
