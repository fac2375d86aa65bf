"""A validating, streaming safetensors reader and writer (no mmap, no pickle, no whole-model buffers).

Why not ``safetensors.safe_open`` / ``save_file`` for packing: ``safe_open`` maps the whole file,
so every page a pass touches counts in the process's resident set until the file is closed (a 10 GB
shard shows as 10 GB RSS), and ``save_file`` needs every tensor of a shard in memory at once.
Here the header is read and checked against the file size *before* anything is allocated, then
each tensor is read with one ``readinto`` into a buffer of exactly its size, and the writer emits
the header first (all shapes are known in advance) and then one tensor at a time.

The byte layout is the standard one (https://github.com/huggingface/safetensors), repeated in
docs/formats.md section 1: ``u64 little-endian N`` | ``N bytes of UTF-8 JSON header`` (padded with
spaces to a multiple of 8) | data. Files written here load with ``safetensors.safe_open`` too.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mmf.errors import CheckpointError

HEADER_LENGTH_BYTES = 8  # u64, little-endian
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the same bound the Rust safetensors reader applies
HEADER_ALIGN = 8
METADATA_KEY = "__metadata__"

# safetensors dtype names <-> torch dtypes and their sizes in bytes.
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MAX_DIMS = 8


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "F16"
    shape: tuple
    begin: int  # offsets relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _fail(path, what: str):
    raise CheckpointError(f"{path}: {what}; the file is corrupt or truncated, re-download or re-write it")


def read_header(path: Path) -> tuple[dict, dict, int]:
    """Parse and validate a safetensors header.

    Returns ``(tensors: name -> TensorInfo, metadata: dict[str, str], data_start)``. Every size in
    the header is checked against the real file size before anything is allocated: the declared
    header length, each tensor's offsets, and ``numel * itemsize == end - begin``; the tensors
    must tile the data section exactly (no gaps, no overlaps), as the format requires.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_LENGTH_BYTES)
            if len(head) < HEADER_LENGTH_BYTES:
                _fail(path, f"only {len(head)} bytes, shorter than the 8-byte safetensors header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                _fail(path, f"header declares {n} bytes (more than the {MAX_HEADER_BYTES} allowed)")
            if HEADER_LENGTH_BYTES + n > size:
                _fail(path, f"header declares {n} bytes but the file has only {size - HEADER_LENGTH_BYTES} after the length")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        _fail(path, f"header is not valid UTF-8 JSON ({type(e).__name__})")
    if not isinstance(header, dict):
        _fail(path, "header is not a JSON object")
    data_start = HEADER_LENGTH_BYTES + n
    data_size = size - data_start
    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        _fail(path, "__metadata__ must map strings to strings")
    tensors = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            _fail(path, f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dt, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dt, str) or dt not in ST_SIZES:
            _fail(path, f"tensor {name!r}: unsupported dtype {dt!r}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(type(s) is int and 0 <= s < 2**48 for s in shape)):
            _fail(path, f"tensor {name!r}: shape {str(shape)[:80]} is not a list of at most {MAX_DIMS} sizes")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1] <= data_size):
            _fail(path, f"tensor {name!r}: data_offsets {str(offs)[:80]} outside the {data_size}-byte data section")
        info = TensorInfo(name, dt, tuple(shape), offs[0], offs[1])
        if info.numel * ST_SIZES[dt] != info.nbytes:
            _fail(path, f"tensor {name!r}: shape {list(shape)} of {dt} needs {info.numel * ST_SIZES[dt]} bytes "
                        f"but data_offsets span {info.nbytes}")
        tensors[name] = info
    pos = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != pos:
            _fail(path, f"tensor {info.name!r} starts at byte {info.begin} of the data section, expected {pos} "
                        "(gap or overlap)")
        pos = info.end
    if pos != data_size:
        _fail(path, f"tensors cover {pos} bytes but the data section has {data_size}")
    return tensors, metadata, data_start


class SafetensorsReader:
    """Read tensors of one file one at a time, each into a fresh buffer of exactly its size."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors, self.metadata, self.data_start = read_header(self.path)
        self._f = open(self.path, "rb")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._f.close()

    def keys(self):
        return list(self.tensors)

    def read(self, name: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tensor ``name`` (a new CPU tensor, or written into the uint8 buffer ``out``)."""
        info = self.tensors[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8) if out is None else out[: info.nbytes]
        if info.nbytes:
            self._f.seek(self.data_start + info.begin)
            got = self._f.readinto(memoryview(buf.numpy()))
            if got != info.nbytes:
                _fail(self.path, f"tensor {name!r}: read {got} of {info.nbytes} bytes")
        return buf.view(ST_DTYPES[info.dtype]).reshape(info.shape)


class SafetensorsWriter:
    """Write one safetensors file whose tensor list is known up front, then the data tensor by tensor.

    ``plan`` is a list of ``(name, torch dtype, shape)`` in file order; ``write(name, tensor)`` must
    then be called in that order. Metadata that is only known once the data is written (scales,
    counts) is passed to ``close(metadata)``: the header region is reserved at open time from
    ``metadata_template`` (same keys, values at least as long as the final ones) and the final
    header is padded with spaces to that length, which the format allows.
    """

    def __init__(self, path: Path, plan: list, metadata_template: Optional[dict] = None):
        self.path = Path(path)
        self._tensors = {}
        pos = 0
        self._order = []
        for name, dtype, shape in plan:
            st = ST_NAMES[dtype]
            numel = 1
            for s in shape:
                numel *= int(s)
            nbytes = numel * ST_SIZES[st]
            self._tensors[name] = {"dtype": st, "shape": [int(s) for s in shape], "data_offsets": [pos, pos + nbytes]}
            self._order.append((name, dtype, tuple(int(s) for s in shape), nbytes))
            pos += nbytes
        self._reserved = len(self._header_bytes(metadata_template))
        self._reserved += -self._reserved % HEADER_ALIGN
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", self._reserved))
        self._f.write(b" " * self._reserved)
        self._next = 0
        self.total_bytes = HEADER_LENGTH_BYTES + self._reserved + pos

    def _header_bytes(self, metadata: Optional[dict]) -> bytes:
        header = {}
        if metadata:
            header[METADATA_KEY] = {str(k): str(v) for k, v in metadata.items()}
        header.update(self._tensors)
        return json.dumps(header, separators=(",", ":")).encode("utf-8")

    CONVERT_CHUNK = 1 << 22  # elements converted at a time when the tensor's dtype differs from the plan's

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``; a floating tensor of another dtype is converted chunk by chunk as it is written."""
        want, dtype, shape, nbytes = self._order[self._next]
        convert = tensor.dtype != dtype and tensor.is_floating_point() and dtype.is_floating_point
        if name != want or (tensor.dtype != dtype and not convert) or tuple(tensor.shape) != shape:
            raise RuntimeError(f"writer expected {want} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        if nbytes:
            step = self.CONVERT_CHUNK if convert else max(t.numel(), 1)
            for a in range(0, t.numel(), step):
                part = t[a:a + step].to(dtype) if convert else t
                self._f.write(memoryview(part.view(torch.uint8).numpy()))
        self._next += 1

    def close(self, metadata: Optional[dict] = None) -> None:
        try:
            if self._next != len(self._order):
                raise RuntimeError(f"{self.path}: {len(self._order) - self._next} planned tensors were not written")
            raw = self._header_bytes(metadata)
            if len(raw) > self._reserved:
                raise RuntimeError(f"{self.path}: final header ({len(raw)} bytes) exceeds the reserved {self._reserved}")
            self._f.seek(HEADER_LENGTH_BYTES)
            self._f.write(raw + b" " * (self._reserved - len(raw)))
        finally:
            self._f.close()

    def abort(self) -> None:
        self._f.close()


def fadvise_done(path: Path) -> None:
    """Tell the kernel we are done with a file's pages (keeps the page cache from crowding out others)."""
    if hasattr(os, "posix_fadvise"):
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError:
            pass
