"""Checkpoints: Hugging Face style directories, read lazily, written atomically.

A checkpoint directory holds ``config.json``, ``model.safetensors`` (or shards
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``) and tokenizer files.
Keys are the published layouts (``hgrn_bit``, ``llama``): no conversion step either way.
Nothing here unpickles anything; tensors are read one at a time through ``safe_open``, and packed
checkpoints (docs/formats.md, ``mmf.packed_format``) through the validating reader of
``mmf.safetensors_io`` (``load_packed_model``).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint_layout import (CONFIG_FILE, DEFAULT_SHARD_BYTES, IGNORED_KEY_SUFFIXES, WEIGHTS_FILE, checkpoint_files,
                                files_in_order, not_a_checkpoint, shard_names, tensor_shapes, write_index)
from .config import ModelConfig, load_hf_config
from .errors import CheckpointError, MMFError
from .outputs import atomic_directory
from .packed_format import (FORMAT_KEY, SCALE_SUFFIX, TENSOR_KEY_PREFIX, is_packed_weight, packed_files,
                            packed_tensor_meta, read_packed)
from .safetensors_io import SafetensorsReader
from .ternary_codes import i2_from_packed

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise MMFError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16") from None


def checkpoint_state_dict(model: torch.nn.Module) -> dict:
    """The tensors a checkpoint stores: tied weights once, contiguous, on CPU."""
    state = {}
    seen = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else None
        if key is not None and key in seen:  # tied (lm_head = embeddings): stored once, as HF does
            continue
        seen[key] = name
        state[name] = t.detach().to("cpu").contiguous()
    return state


def write_safetensors_sharded(state: dict, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                              metadata: Optional[dict] = None) -> list[str]:
    """Write ``state`` as one file or as shards with an index; returns the file names."""
    shards: list[dict] = [{}]
    size = 0
    total = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
        total += n
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], str(Path(directory) / WEIGHTS_FILE), metadata=meta)
        return [WEIGHTS_FILE]
    names = shard_names(len(shards))
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(Path(directory) / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    write_index(directory, weight_map, total)
    return names


def save_checkpoint(model, out: Path, tokenizer=None, overwrite: bool = False, dtype: Optional[torch.dtype] = None,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, extra_files: Optional[dict] = None) -> Path:
    """Save ``model`` (training form) as a checkpoint directory, atomically."""
    if getattr(model, "is_frozen", False) and model.arch == "mmf":
        raise MMFError("a frozen MatMul-free model has no latent weights to save; use `mmf pack` for inference checkpoints")
    out = Path(out)
    state = checkpoint_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    cfg = model.config.to_hf_dict()
    cfg["torch_dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
    from . import __version__

    cfg["mmf_version"] = __version__
    with atomic_directory(out, overwrite) as tmp:
        write_safetensors_sharded(state, tmp, max_shard_bytes)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(content)
    return out


@contextmanager
def open_safetensors(path: Path):
    """``safe_open`` with its errors turned into one-line CheckpointErrors naming the file."""
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]}); re-download or re-save it"
        ) from None
    with handle as f:
        yield f


def read_file_metadata(path: Path) -> dict:
    """The ``__metadata__`` of one safetensors file ({} if it has none)."""
    with open_safetensors(path) as f:
        return f.metadata() or {}


def iter_tensors(directory: Path, names=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, each file opened once, each tensor read once."""
    files = checkpoint_files(directory)
    by_file: dict = {}
    for k, p in files.items():
        if names is None or k in names:
            by_file.setdefault(p, []).append(k)
    for path, keys in by_file.items():
        with open_safetensors(path) as f:
            for k in keys:
                try:
                    yield k, f.get_tensor(k)
                except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                    raise CheckpointError(f"{path}: cannot read tensor {k} ({str(e).splitlines()[0]})") from None


def load_config(path: Path) -> ModelConfig:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a checkpoint is a directory with config.json and model.safetensors")
    if not (path / CONFIG_FILE).exists():
        other = not_a_checkpoint(path)  # an ONNX export, a training run, ...: say what to pass instead
        if other:
            raise CheckpointError(other)
    return load_hf_config(path / CONFIG_FILE)


def is_packed(path: Path) -> bool:
    """True for a checkpoint written by `mmf pack` (its safetensors metadata says so)."""
    files = files_in_order(checkpoint_files(path))
    return bool(files) and FORMAT_KEY in read_file_metadata(files[0])


MMAP_THRESHOLD_BYTES = 4 << 20
_MMAP_THRESHOLD_SET = []


def map_large_allocations() -> bool:
    """glibc: serve every allocation of ``MMAP_THRESHOLD_BYTES`` or more from its own mmap (once per process).

    glibc raises its mmap threshold each time a large mapped block is freed, so the next tensors of that size
    come from the heap, whose freed space it keeps: loading a packed 13b checkpoint (3.4 GB on disk, tensors of
    6.5-41 MB read and checked one by one) peaked at 6.5 GB of RSS, and 4.5 GB with the threshold fixed at
    4 MiB (same load, then 4 decode steps; 2-core CPU machine). Decode steps allocate far less than that.
    Returns whether the setting took effect (False off glibc)."""
    if not _MMAP_THRESHOLD_SET:
        ok = False
        try:
            import ctypes

            ok = ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD_BYTES) == 1  # -3: M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass
        _MMAP_THRESHOLD_SET.append(ok)
    return _MMAP_THRESHOLD_SET[0]


def load_model(path, device="cpu", dtype=torch.float32, frozen: bool = False):
    """Load a checkpoint directory (latent, float or packed) as a ``torch.nn.Module`` in eval mode.

    ``frozen=True`` converts MatMul-free BitLinears to their inference form (int8 codes + scale).
    Packed checkpoints always load frozen.
    """
    from .models import build_model

    path = Path(path)
    cfg = load_config(path)
    dtype = parse_dtype(dtype)
    map_large_allocations()
    if cfg.arch == "mmf" and is_packed(path):
        model = load_packed_model(path, cfg, device=device, dtype=dtype)
        for name, tensor in model.state_dict().items():  # norms, embeddings and scales: one pass
            check_finite(path, name, tensor)
        return model
    with torch.device("meta"):
        model = build_model(cfg)
    check_tensor_names_and_shapes(path, model, cfg)  # from the headers, before anything is allocated
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    for name, tensor in iter_tensors(path):
        if name.endswith(IGNORED_KEY_SUFFIXES):
            continue
        target = params[name]
        check_finite(path, name, tensor)
        with torch.no_grad():
            target.copy_(tensor.to(dtype) if tensor.is_floating_point() else tensor)
        if tensor.is_floating_point() and torch.finfo(dtype).max < torch.finfo(tensor.dtype).max:
            check_finite(path, name, target, overflow=(tensor.dtype, dtype))
    model.eval()
    if frozen:
        model.freeze()
    return model


def check_tensor_names_and_shapes(path: Path, model, cfg) -> None:
    """The checkpoint's tensors against ``model`` (built from its config.json, on the meta device), from the
    safetensors headers alone: no unexpected name, every shape as config.json implies (so a config.json whose
    sizes exceed the weights is this error, not a failed allocation), nothing missing. Tied weights (the LM
    head and the embeddings) may be stored under either name, as transformers accepts."""
    shapes = tensor_shapes(checkpoint_files(path))
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    for name, shape in shapes.items():
        if name.endswith(IGNORED_KEY_SUFFIXES):
            continue
        if name not in params:
            raise CheckpointError(
                f"{path}: unexpected tensor {name!r} for a {cfg.model_type} model with this config.json")
        if tuple(shape) != tuple(params[name].shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(shape)} but config.json implies {tuple(params[name].shape)}")
    aliases: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    missing = sorted(names[0] for names in aliases.values() if not any(n in shapes for n in names))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{path}: missing tensors {', '.join(missing[:3])}{more}")


def load_packed_model(path, cfg, device="cpu", dtype=torch.float32):
    """A frozen ``HGRNBitForCausalLM`` (eval mode) from a packed checkpoint directory.

    Built on the meta device and filled tensor by tensor; every BitLinear becomes a
    ``FrozenBitLinear`` holding i2 bytes in its ``packed`` buffer (tq1 files are converted at load
    time) and s_w in ``weight_scale`` (fp32). The fp32 latent model is never materialised.
    """
    from .models import build_model
    from .models.hgrn_bit import BitLinear, FrozenBitLinear

    path = Path(path)
    dtype = parse_dtype(dtype)
    if cfg.arch != "mmf":
        raise CheckpointError(f"{path}: packed checkpoints hold MatMul-free models; config.json says {cfg.model_type}")
    files, heads, fmt = packed_files(path)
    with torch.device("meta"):
        model = build_model(cfg)
    bitlinears = {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}
    params = dict(model.named_parameters(remove_duplicate=False))
    done = set()
    readers = {}
    try:
        for p in files_in_order(files):
            tensors, metadata = heads[p]
            r = readers.setdefault(p, SafetensorsReader(p))
            for name, info in sorted(tensors.items(), key=lambda kv: kv[1].begin):
                if name.endswith(IGNORED_KEY_SUFFIXES) or name.endswith(".weight" + SCALE_SUFFIX):
                    continue
                mname = name[: -len(".weight")] if name.endswith(".weight") else None
                if mname in bitlinears:
                    if not is_packed_weight(name, metadata):
                        raise CheckpointError(f"{p}: tensor {name} is a BitLinear weight but has no "
                                              f"{TENSOR_KEY_PREFIX}{name} metadata; the file is not a valid packed file")
                    meta = packed_tensor_meta(p, name, metadata, tensors, fmt)
                    bl = bitlinears[mname]
                    if tuple(meta["shape"]) != (bl.out_features, bl.in_features):
                        raise CheckpointError(f"{p}: tensor {name} has logical shape {tuple(meta['shape'])} but "
                                              f"config.json implies {(bl.out_features, bl.in_features)}")
                    packed, s_w = read_packed(r, name, meta)
                    packed = i2_from_packed(packed, bl.in_features, fmt)
                    _replace_module(model, mname, FrozenBitLinear(
                        bl.in_features, bl.out_features, packed=packed.to(device), weight_scale=s_w.to(device),
                        norm_weight=torch.empty(bl.in_features, device="meta")))  # filled below; missing = error
                    done.add(name)
                    continue
                if name not in params:
                    raise CheckpointError(f"{p}: unexpected tensor {name!r} for a hgrn_bit model with this config.json")
                if tuple(info.shape) != tuple(params[name].shape):
                    raise CheckpointError(f"{p}: tensor {name!r} has shape {tuple(info.shape)} but config.json implies "
                                          f"{tuple(params[name].shape)}")
                if info.dtype not in ("F16", "BF16", "F32", "F64"):
                    raise CheckpointError(f"{p}: tensor {name!r} has dtype {info.dtype}; expected a float tensor")
                done.add(name)
        # second pass: float tensors (norms of BitLinears need their FrozenBitLinear to exist)
        for p in files_in_order(files):
            tensors, _ = heads[p]
            r = readers[p]
            for name, info in sorted(tensors.items(), key=lambda kv: kv[1].begin):
                if name in done and not is_packed_weight(name, heads[p][1]):
                    _set_tensor(model, name, r.read(name).to(device=device, dtype=dtype))
    finally:
        for r in readers.values():
            r.close()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        more = f" and {len(leftover) - 3} more" if len(leftover) > 3 else ""
        raise CheckpointError(f"{path}: missing tensors {', '.join(leftover[:3])}{more}")
    model.requires_grad_(False)
    model.eval()
    return model


def _replace_module(model, dotted: str, new) -> None:
    parent_name, _, attr = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _set_tensor(model, dotted: str, value: torch.Tensor) -> None:
    parent_name, _, attr = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, torch.nn.Parameter(value, requires_grad=False))


def check_finite(path: Path, name: str, tensor: torch.Tensor, overflow=None) -> None:
    """Raise CheckpointError naming ``name`` if the floating tensor holds NaN or inf.

    NaN and inf survive a sum, so a finite sum proves there are none: one pass at memory speed
    (``torch.isfinite`` is many times slower on CPUs). Only if the sum is not finite (damage, or a
    large fp16 sum overflowing) are slices of 16M elements summed in fp64, which cannot overflow,
    and the bad ones counted. ``overflow = (stored dtype, load dtype)`` words the message for values
    that only became inf when converted to a narrower dtype.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    flat = tensor.detach().reshape(-1)
    if bool(torch.isfinite(flat.sum())):
        return
    step = 1 << 24
    bad = 0
    for i in range(0, flat.numel(), step):
        part = flat[i:i + step]
        if not bool(torch.isfinite(part.sum(dtype=torch.float64))):
            bad += int((~torch.isfinite(part)).sum())
    if not bad:
        return
    if overflow is not None:
        src, dst = (str(t).replace("torch.", "") for t in overflow)
        raise CheckpointError(
            f"{path}: tensor {name!r} has {bad} values beyond the range of {dst} (stored as {src}); "
            "load it with --dtype fp32 or bf16")
    raise CheckpointError(
        f"{path}: tensor {name!r} holds {bad} NaN or inf values of {flat.numel()}; the weights are damaged "
        "(a diverged run or a corrupt copy): use an earlier checkpoint or re-download it")
