"""The files of a checkpoint directory (the Hugging Face convention; docs/formats.md section 1).

A checkpoint directory holds ``config.json`` and its tensors in ``model.safetensors`` or in shards
``model-0000i-of-0000n.safetensors`` listed by ``model.safetensors.index.json`` (``weight_map``: tensor
name -> shard). Latent, float and packed checkpoints all follow it. Here: the names, finding each
tensor's file with every header validated (no mmap), and writing shards one tensor at a time with
the streaming writer of ``mmf.safetensors_io``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .errors import CheckpointError
# what other mmf outputs hold, to tell them from a checkpoint; tests/test_generate_cli.py checks them against
# mmf.onnx_runtime.MANIFEST_FILE and fpga/manifest.py
from .outputs import FPGA_MANIFEST, ONNX_MANIFEST, holds_manifest
from .safetensors_io import SafetensorsWriter, read_header


CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 4 * 1024**3
# Keys some published checkpoints carry that hold no parameters (recomputed at run time).
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)


def shard_names(count: int) -> list:
    """The weight file names of a checkpoint written in ``count`` files."""
    if count == 1:
        return [WEIGHTS_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(directory: Path, weight_map: dict, total_size: int, **metadata) -> None:
    """Write ``model.safetensors.index.json`` (Hugging Face layout) for a sharded checkpoint."""
    (Path(directory) / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total_size, **metadata}, "weight_map": weight_map}, indent=2) + "\n")


# ---- reading --------------------------------------------------------------------------------------

def not_a_checkpoint(directory: Path):
    """When ``directory`` is another mmf output given where a checkpoint is wanted (an ``mmf export-onnx``
    directory, an ``mmf fpga-image``, a training run), the one-line error saying so and what to pass instead;
    else None."""
    from .run_dir import CKPT_PREFIX, RUN_CONFIG, list_checkpoints

    directory = Path(directory)
    if holds_manifest(directory, ONNX_MANIFEST):
        return (f"{directory} is an ONNX export (mmf export-onnx), not a checkpoint; run it with --onnx: "
                f"mmf generate --onnx {directory} -p TEXT")
    if holds_manifest(directory, FPGA_MANIFEST):
        return f"{directory} is an FPGA image (mmf fpga-image), not a checkpoint; pass the checkpoint it was built from"
    ckpts = list_checkpoints(directory)
    if ckpts:
        names = [c.name for c in ckpts]
        held = ", ".join(names) if len(names) <= 4 else f"{len(names)}, {names[0]} to {names[-1]}"
        return (f"{directory} is a training run, not a checkpoint; pass one of its checkpoints, e.g. {ckpts[-1]} "
                f"(it holds {held})")
    if (directory / RUN_CONFIG).is_file():
        return (f"{directory} is a training run with no complete checkpoint yet (no {CKPT_PREFIX}NNNNNNN/ in it); "
                "pass a checkpoint directory")
    return None


def checkpoint_files(directory: Path) -> dict:
    """name -> file for a checkpoint directory, validating headers (never mmap, never panics).

    ``model.safetensors`` is read when present, else the shards of ``model.safetensors.index.json``: the order in
    which transformers looks for them (a directory holding both gives the same weights in either program)."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: a checkpoint is a directory with config.json and model.safetensors")
    single = directory / WEIGHTS_FILE
    index = directory / INDEX_FILE
    if single.exists():
        tensors, _, _ = read_header(single)
        return {k: single for k in tensors}
    if not index.exists():
        raise CheckpointError(not_a_checkpoint(directory)
                              or f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}; is this a checkpoint directory?")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map names to file names")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read ({e.strerror or e})") from None
    files = {}
    for fname in sorted(set(weight_map.values())):
        if Path(fname).name != fname:
            raise CheckpointError(f"{index}: shard name {fname!r} must be a plain file name")
        path = directory / fname
        if not path.exists():
            raise CheckpointError(f"{path}: shard named in {INDEX_FILE} is missing")
        tensors, _, _ = read_header(path)
        for k, v in weight_map.items():
            if v == fname and k not in tensors:
                raise CheckpointError(f"{path}: tensor {k} listed in {INDEX_FILE} is not in this shard")
        files.update({k: path for k in tensors})
    return files


def tensor_shapes(files: dict) -> dict:
    """name -> shape of every tensor of ``checkpoint_files``' map, from the headers alone."""
    shapes = {}
    for path in files_in_order(files):
        tensors, _, _ = read_header(path)
        shapes.update({k: info.shape for k, info in tensors.items() if files.get(k) == path})
    return shapes


def files_in_order(files: dict) -> list:
    """The distinct weight files of ``checkpoint_files``' map, in name order (shard 1 first)."""
    return sorted(set(files.values()))


def weight_file_bytes(files: dict) -> int:
    """The size on disk of a checkpoint's weight files (``checkpoint_files``' values: every .safetensors
    shard, headers included): the one size pack, unpack and inspect report for a checkpoint."""
    return sum(p.stat().st_size for p in set(files.values()))


# ---- writing, one tensor at a time ----------------------------------------------------------------

def plan_shards(items: list, max_shard_bytes: int, same_shard=None) -> list:
    """Split [(name, dtype, shape, nbytes), ...] into shards of at most max_shard_bytes (>= 1 tensor each).

    ``same_shard(previous, item)`` true keeps ``item`` in the shard of the item before it (a packed
    weight and its scale: ``mmf.packed_format.scale_follows_weight``).
    """
    groups = []
    for it in items:
        if groups and same_shard is not None and same_shard(groups[-1][-1], it):
            groups[-1].append(it)
        else:
            groups.append([it])
    shards, size = [[]], 0
    for group in groups:
        nbytes = sum(it[3] for it in group)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += nbytes
    return shards


@contextlib.contextmanager
def shard_writer(path: Path, shard: list, header_meta: dict, summary: dict, weight_map: dict):
    """A SafetensorsWriter for one planned shard ``[(name, dtype, shape, nbytes), ...]``.

    The body writes every tensor and closes the writer (with its final metadata); on any error the
    partial file is aborted. On success the shard's bytes (``summary["output_bytes"]``, header included)
    and names are recorded.
    """
    writer = SafetensorsWriter(path, [(n, dt, shape) for n, dt, shape, _ in shard], header_meta)
    try:
        yield writer
    except BaseException:
        writer.abort()
        raise
    summary["output_bytes"] += writer.total_bytes
    weight_map.update({n: path.name for n, _, _, _ in shard})


def write_shard_index(directory: Path, shards: list, weight_map: dict, **metadata) -> None:
    """The model.safetensors.index.json of a checkpoint written in more than one shard."""
    if len(shards) > 1:
        write_index(directory, weight_map, sum(it[3] for shard in shards for it in shard), **metadata)
