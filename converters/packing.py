"""Checkpoint-level operations on packed ternary checkpoints: ``mmf pack``, ``unpack``, ``inspect``
and ``pack --verify``.

* ``pack_checkpoint``: a latent (training) MatMul-free checkpoint -> a packed one (docs/formats.md);
* ``unpack_checkpoint``: packed -> float weights in the published layout that re-quantise exactly;
* ``inspect_checkpoint``: per-tensor shapes, dtypes or formats, sizes, ternary shares and scales;
* ``verify_packed``: the packed model's logits against the frozen source's, bit for bit.

The format itself (names, metadata, reader checks) is ``mmf.packed_format``, the quantiser and its
exact inverse ``mmf.converters.ternary_quantization``, the model built from a packed checkpoint
``mmf.checkpoint.load_packed_model``.

Everything streams: one tensor is quantised while the next is read (``prefetch_tensors``, O_DIRECT
into two reused buffers, no mmap) and the previous one is written (``SafetensorsWriter``'s
write-behind), so peak memory is set by the largest tensor, not by the model, and the disk and the
CPU work at the same time.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from mmf.checkpoint import load_config, load_model, load_packed_model, parse_dtype
from mmf.checkpoint_layout import (CONFIG_FILE, DEFAULT_SHARD_BYTES, IGNORED_KEY_SUFFIXES, checkpoint_files,
                                   files_in_order, plan_shards, shard_names, shard_writer, weight_file_bytes,
                                   write_shard_index)
from mmf.errors import CheckpointError, MMFError
from mmf.models import build_model
from mmf.models.hgrn_bit import BitLinear, FrozenBitLinear
from mmf.outputs import atomic_directory, check_output
from mmf.packed_format import (FORMAT_KEY, FORMATS, QUANT_CONFIG_KEY, SCALE_SUFFIX, TENSOR_KEY_PREFIX, check_packed,
                               file_format, file_metadata, is_packed_weight, packed_files, packed_tensor_meta,
                               packed_tensor_plan, quantization_config, read_packed, reserved_metadata,
                               scale_follows_weight, write_packed_tensor)
from mmf.safetensors_io import IO_ALIGN, ST_DTYPES, ST_NAMES, SafetensorsReader, prefetch_tensors, read_header
from mmf.ternary_codes import unpack_codes
from mmf.tokenizer import warn_if_no_tokenizer

from .ternary_quantization import ThreadTuner, all_finite, dequantize_exact, quantize_pack, unpack_codes_chunked

KEEP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PACK_DTYPES = ("source", "fp32", "bf16", "fp16")  # --dtype of pack: "source" keeps each tensor's own dtype
_NAME_OF = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_TORCH_OF = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "mmf_tokenizer.json", "generation_config.json", "vocab.json", "merges.txt")


# ---- shared by pack and unpack ---------------------------------------------------------------------

def _check_not_input(src: Path, out: Path) -> None:
    """Refuse an ``out`` that is, holds or lies inside the input checkpoint (inputs are never overwritten)."""
    s, d = src.resolve(), out.resolve()
    if d == s:
        raise MMFError(f"--out {out} is the input checkpoint; choose another directory (inputs are never overwritten)")
    if s in d.parents or d in s.parents:
        raise MMFError(f"--out {out} overlaps the input checkpoint {src}; choose a separate directory "
                       "(inputs are never overwritten)")


def _mmf_version() -> str:
    from mmf import __version__

    return __version__


def _ternary_modules(cfg) -> dict:
    """'<module>.weight' -> (N, K) for every BitLinear of the MatMul-free model of ``cfg``."""
    with torch.device("meta"):
        model = build_model(cfg)
    shapes = {}
    for mname, m in model.named_modules():
        if isinstance(m, BitLinear):
            shapes[f"{mname}.weight"] = (m.out_features, m.in_features)
    params = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        params[pname] = tuple(p.shape)
    return shapes, params


def _require_mmf(path: Path, verb: str):
    cfg = load_config(path)
    if cfg.arch != "mmf":
        raise MMFError(f"{path}: a {cfg.model_type} (Transformer++) checkpoint has full-precision weights, not ternary "
                       f"ones; only MatMul-free (hgrn_bit) checkpoints can be {verb}")
    return cfg


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _progress(enabled: bool, total: int, description: str):
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    prog = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), transient=True, disable=not enabled)
    return prog, total, description


def _dtype_numbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---- pack -----------------------------------------------------------------------------------------

def pack_checkpoint(src, out, fmt: str = "i2", dtype: str = "source", force: bool = False,
                    verify: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False,
                    log: Optional[Callable[[str], None]] = None, keep_dtype: Optional[str] = None) -> dict:
    """Pack a latent (training) MatMul-free checkpoint directory ``src`` into ``out``. Returns a summary.

    ``dtype`` is that of the tensors that stay unpacked (embeddings, norms, lower bounds): ``source``
    (default) keeps each one's dtype in ``src``, so the packed model gives exactly the logits of the
    source model after ``freeze()``; fp32, bf16 or fp16 convert them (fp16/bf16 round an fp32 source).
    ``input_bytes`` and ``output_bytes`` of the summary are the sizes of the weight files on disk.
    ``keep_dtype`` is the old name of ``dtype`` (it wins when given).
    """
    src, out = Path(src), Path(out)
    dtype = keep_dtype if keep_dtype is not None else dtype
    if fmt not in FORMATS:
        raise MMFError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    if dtype not in PACK_DTYPES:
        raise MMFError(f"unknown --dtype {dtype!r}; use one of {', '.join(PACK_DTYPES)} (source keeps the "
                       "checkpoint's own dtype)")
    _check_not_input(src, out)
    check_output(out, force)
    cfg = _require_mmf(src, "packed")
    files = checkpoint_files(src)
    if any(FORMAT_KEY in read_header(p)[1] for p in files_in_order(files)):
        raise MMFError(f"{src}: already packed ({FORMAT_KEY} in its metadata); `mmf unpack` it first to repack")
    ternary, params = _ternary_modules(cfg)
    headers = {p: read_header(p)[0] for p in files_in_order(files)}
    for k, p in files.items():
        if k.endswith(IGNORED_KEY_SUFFIXES):
            continue
        if k not in params:
            raise CheckpointError(f"{p}: unexpected tensor {k!r} for a hgrn_bit model with this config.json")
        shape = headers[p][k].shape
        if tuple(shape) != params[k]:
            raise CheckpointError(f"{p}: tensor {k!r} has shape {tuple(shape)} but config.json implies {params[k]}")
        if headers[p][k].dtype not in ("F16", "BF16", "F32", "F64"):
            raise CheckpointError(f"{p}: tensor {k!r} has dtype {headers[p][k].dtype}; latent weights must be floats")
    keep_of = {}  # unpacked tensor -> its dtype in the packed file
    for k, p in files.items():
        keep_of[k] = ST_DTYPES[headers[p][k].dtype] if dtype == "source" else KEEP_DTYPES[dtype]
    # what to write, in source order (sequential reads), tied lm_head last
    jobs = []  # (out name, source name, kind)
    for p in files_in_order(files):
        for info in sorted(headers[p].values(), key=lambda t: t.begin):
            if info.name.endswith(IGNORED_KEY_SUFFIXES):
                continue
            jobs.append((info.name, info.name, "ternary" if info.name in ternary else "keep"))
    have = {j[0] for j in jobs}
    for name in params:
        if name not in have:
            if name == "lm_head.weight" and cfg.tie_word_embeddings and "model.embeddings.weight" in have:
                jobs.append((name, "model.embeddings.weight", "ternary"))
                have.add(name)
            else:
                raise CheckpointError(f"{src}: missing tensor {name}")
    items = []
    for name, sname, kind in jobs:
        plan = packed_tensor_plan(name, fmt, ternary[name]) if kind == "ternary" else [(name, keep_of[sname],
                                                                                         params[name])]
        items += [(n, dt, shape, math.prod(shape) * _dtype_numbytes(dt)) for n, dt, shape in plan]
    shards = plan_shards(items, max_shard_bytes, same_shard=scale_follows_weight)
    names = shard_names(len(shards))
    by_name = {j[0]: j for j in jobs}
    src_bytes = sum(headers[files[s]][s].nbytes for _, s, _ in jobs)
    largest = max(headers[files[s]][s].numel for _, s, k in jobs if k == "ternary")
    scratch = torch.empty(largest, dtype=torch.float32)  # reused: no page faults after the first tensor
    kept = sorted({ST_NAMES[it[1]] for it in items if it[1] != torch.uint8 and not it[0].endswith(SCALE_SUFFIX)})
    kept_dtype = kept[0] if len(kept) == 1 else "mixed"
    summary = {"source": str(src), "out": str(out), "format": fmt, "dtype": dtype, "unpacked_dtype": kept_dtype,
               "files": names, "tensors": 0, "ternary_tensors": 0, "input_bytes": weight_file_bytes(files),
               "output_bytes": 0}
    counts_total = [0, 0, 0]
    base_meta = file_metadata(fmt, kept_dtype)
    t0 = time.perf_counter()
    prog, _, _ = _progress(progress, src_bytes, "pack")
    # every source tensor in write order, read one ahead on a background thread while this one is packed
    reads = [(files[by_name[name][1]], by_name[name][1], name) for shard in shards for name, _, _, _ in shard
             if name in by_name]
    source = prefetch_tensors(reads, max(headers[p][s].nbytes for p, s, _ in reads) + 2 * IO_ALIGN)
    tuner = ThreadTuner()

    with atomic_directory(out, force, need_bytes=sum(it[3] for it in items)) as tmp, prog:
        task = prog.add_task(f"pack {fmt}", total=src_bytes)
        weight_map = {}
        try:
            for fname, shard in zip(names, shards):
                template = reserved_metadata(base_meta, fmt, {name: ternary[name] for name, dt, _, _ in shard
                                                              if dt == torch.uint8})
                meta = dict(base_meta)
                with shard_writer(tmp / fname, shard, template, summary, weight_map) as writer:
                    for name, dt, shape, _ in shard:
                        if name.endswith(SCALE_SUFFIX) and name not in by_name:
                            continue  # written together with its weight
                        _, sname, kind = by_name[name]
                        (spath, _, _), w = next(source)
                        if kind == "ternary":
                            with tuner.run(tuple(w.shape), w.numel()):
                                packed, s_w, counts = quantize_pack(w, fmt, f"{sname} ({spath.name})", scratch)
                            write_packed_tensor(writer, meta, name, fmt, ternary[name], packed, s_w, counts)
                            counts_total = [a + b for a, b in zip(counts_total, counts)]
                            summary["ternary_tensors"] += 1
                        else:
                            if w.is_floating_point() and not all_finite(w):
                                raise CheckpointError(f"tensor {sname} ({spath.name}): contains NaN or inf; "
                                                      "the checkpoint is damaged, retrain or re-export it")
                            kept = w.to(dt)
                            if w.is_floating_point() and not all_finite(kept):
                                raise CheckpointError(f"tensor {sname}: values overflow {_NAME_OF[dt]}; "
                                                      "use --dtype source or fp32")
                            writer.write(name, kept)
                            del kept
                        summary["tensors"] += 1
                        prog.advance(task, headers[spath][sname].nbytes)
                        del w
                    writer.close(meta)
        finally:
            source.close()
        write_shard_index(tmp, shards, weight_map, **{FORMAT_KEY: fmt})
        config = json.loads((src / CONFIG_FILE).read_text())
        config[QUANT_CONFIG_KEY] = quantization_config(
            fmt, _NAME_OF[ST_DTYPES[kept_dtype]] if kept_dtype in ST_DTYPES else kept_dtype)
        config["mmf_version"] = _mmf_version()
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        _copy_side_files(src, tmp)
        summary["seconds"] = time.perf_counter() - t0
        if verify:
            summary["verify"] = verify_packed(src, tmp)
    warn_if_no_tokenizer(src, out)
    total = sum(counts_total)
    summary["ternary_share"] = {"-1": counts_total[0] / total, "0": counts_total[1] / total,
                                "+1": counts_total[2] / total} if total else {}
    summary["compression_vs_input"] = (summary["input_bytes"] / summary["output_bytes"]
                                       if summary["output_bytes"] else 0.0)
    return summary


# ---- unpack ---------------------------------------------------------------------------------------

def unpack_checkpoint(src, out, force: bool = False, dtype: Optional[str] = None,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False) -> dict:
    """Packed checkpoint -> float checkpoint in the published hgrn_bit layout whose run-time
    re-quantisation gives back exactly the packed codes and scales (see ``dequantize_exact``).

    ``dtype`` (fp32|bf16|fp16) defaults to fp32, which is always exact; fp16 and bf16 are exact for
    real-sized tensors but a tiny tensor can have no such weights (a clear error then).
    ``input_bytes`` and ``output_bytes`` of the summary are the sizes of the weight files on disk.
    """
    src, out = Path(src), Path(out)
    _check_not_input(src, out)
    check_output(out, force)
    cfg = _require_mmf(src, "unpacked")
    files = checkpoint_files(src)
    if not any(FORMAT_KEY in read_header(p)[1] for p in files_in_order(files)):
        raise MMFError(f"{src}: not a packed checkpoint (no {FORMAT_KEY} metadata); nothing to unpack")
    files, heads, fmt = packed_files(src)
    out_dtype = parse_dtype(dtype or "fp32")
    ternary, params = _ternary_modules(cfg)
    jobs = []  # (name, file, kind)
    for p in files_in_order(files):
        tensors, metadata = heads[p]
        for info in sorted(tensors.values(), key=lambda t: t.begin):
            name = info.name
            if name.endswith(".weight" + SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in ternary:
                continue
            if name in ternary:
                if not is_packed_weight(name, metadata):
                    raise CheckpointError(f"{p}: BitLinear weight {name} has no {TENSOR_KEY_PREFIX}{name} metadata")
                meta = packed_tensor_meta(p, name, metadata, tensors, fmt)
                if tuple(meta["shape"]) != ternary[name]:
                    raise CheckpointError(f"{p}: tensor {name} has logical shape {tuple(meta['shape'])} but config.json "
                                          f"implies {ternary[name]}")
                jobs.append((name, p, meta))
            elif name in params:
                if tuple(info.shape) != params[name]:
                    raise CheckpointError(f"{p}: tensor {name!r} has shape {tuple(info.shape)} but config.json implies "
                                          f"{params[name]}")
                jobs.append((name, p, None))
            elif not name.endswith(IGNORED_KEY_SUFFIXES):
                raise CheckpointError(f"{p}: unexpected tensor {name!r} for a hgrn_bit model with this config.json")
    have = {j[0] for j in jobs}
    missing = [n for n in params if n not in have]
    if missing:
        raise CheckpointError(f"{src}: missing tensors {', '.join(missing[:3])}")
    items = []
    for name, p, meta in jobs:
        shape = tuple(meta["shape"]) if meta else params[name]
        dt = out_dtype if meta else _TORCH_OF.get(heads[p][0][name].dtype, torch.float32)
        items.append((name, dt, shape, math.prod(shape) * _dtype_numbytes(dt)))
    shards = plan_shards(items, max_shard_bytes)
    names = shard_names(len(shards))
    in_bytes = sum(heads[p][0][n].nbytes for n, p, _ in jobs)  # tensor data read (the progress bar's total)
    summary = {"source": str(src), "out": str(out), "format": fmt, "dtype": ST_NAMES[out_dtype], "files": names,
               "tensors": len(jobs), "input_bytes": weight_file_bytes(files), "output_bytes": 0}
    by_name = {j[0]: j for j in jobs}
    t0 = time.perf_counter()
    prog, _, _ = _progress(progress, in_bytes, "unpack")
    # the inputs in write order (a packed weight's scale first), read ahead while the previous one is unpacked
    reads = []
    for shard in shards:
        for name, _, _, _ in shard:
            _, p, meta = by_name[name]
            reads += [(p, name + SCALE_SUFFIX), (p, name)] if meta else [(p, name)]
    # buffers sized for the packed weights; a larger float tensor (the embeddings) gets one of its own
    packed_bytes = max((heads[p][0][n].nbytes for n, p, meta in jobs if meta), default=None)
    source = prefetch_tensors(reads, packed_bytes and packed_bytes + 2 * IO_ALIGN)
    largest = max((math.prod(meta["shape"]) for _, _, meta in jobs if meta), default=0)
    scratch = torch.empty(largest, dtype=torch.float32)  # reused by every tensor: no page faults after the first
    codes_buf = torch.empty(largest, dtype=torch.int8)
    # no ThreadTuner here: on idle cores it cost 12% (13b: 0.407 vs 0.463 GB/s), its gain under load unmeasured
    with atomic_directory(out, force, need_bytes=sum(it[3] for it in items)) as tmp, prog:
        task = prog.add_task("unpack", total=in_bytes)
        weight_map = {}
        try:
            for fname, shard in zip(names, shards):
                with shard_writer(tmp / fname, shard, {"format": "pt"}, summary, weight_map) as writer:
                    for name, dt, shape, _ in shard:
                        _, p, meta = by_name[name]
                        if meta:
                            scale = next(source)[1].clone()
                            packed, s_w = check_packed(p, name, meta, next(source)[1], scale)
                            codes = unpack_codes_chunked(packed, meta["shape"][1], fmt, codes_buf)
                            del packed
                            w = dequantize_exact(codes, s_w, dt, f"{name} ({p.name})", scratch=scratch)
                            del codes
                            writer.write(name, w)
                            del w
                        else:
                            writer.write(name, next(source)[1])
                        prog.advance(task, heads[p][0][name].nbytes)
                    writer.close({"format": "pt"})
        finally:
            source.close()
        write_shard_index(tmp, shards, weight_map)
        config = json.loads((src / CONFIG_FILE).read_text())
        config.pop(QUANT_CONFIG_KEY, None)
        if config.get("tie_word_embeddings"):
            config["tie_word_embeddings"] = False  # lm_head now has its own (exactly re-quantising) weights
        config["mmf_version"] = _mmf_version()
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        _copy_side_files(src, tmp)
    summary["seconds"] = time.perf_counter() - t0
    return summary


# ---- verify ---------------------------------------------------------------------------------------

def median_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Median over (sequence, position) of ||a - b|| / ||b|| of the logit vectors (docs/reference-semantics.md)."""
    return float(_rel_errors(a, b).median())


@torch.no_grad()
def verify_packed(src, packed, batch: int = 2, seq_len: int = 24, seed: int = 0) -> dict:
    """Compare the logits of the packed model with those of the source model after ``model.freeze()``.

    Both run in fp32 on the same ``batch`` x ``seq_len`` random token ids. Packing must be exact: the
    codes and scales must equal the source's ``weight_quant``, and the logits must equal, bit for bit,
    those of the frozen source whose unpacked tensors are rounded to the dtype they have in the packed
    file (with ``--dtype source`` nothing is rounded). Anything else raises MMFError. The report then
    says how far the packed model is from the unrounded frozen source (non-zero only where ``--dtype``
    rounded the embeddings and norms) and, for orientation, from the source without ``freeze()``
    (quantised at every call; a different summation order, so rounding-level differences:
    docs/reference-semantics.md, "Comparing quantised models").
    """
    src, packed = Path(src), Path(packed)
    cfg = load_config(src)
    ref = load_model(src, dtype=torch.float32)
    model = load_packed_model(packed, cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)
    unfrozen = ref(ids).logits
    ref.freeze()
    raw = ref(ids).logits
    got = model(ids).logits
    for (n1, m1), (n2, m2) in zip(ref.named_modules(), model.named_modules()):
        if isinstance(m1, FrozenBitLinear):
            if not (torch.equal(m1.ternary_codes(), m2.ternary_codes()) and torch.equal(m1.weight_scale, m2.weight_scale)):
                raise MMFError(f"verify failed: {n1} codes or scale differ from the source's weight_quant")
    stored = {}  # unpacked tensor -> its dtype in the packed file
    for p in files_in_order(checkpoint_files(packed)):
        stored.update({n: ST_DTYPES[t.dtype] for n, t in read_header(p)[0].items() if t.dtype in _TORCH_OF})
    rounded_to = set()
    for name, prm in ref.named_parameters():
        dt = stored.get(name, torch.float32)
        r = prm.data.to(dt).to(torch.float32)
        if not torch.equal(r, prm.data):
            rounded_to.add(_NAME_OF[dt])
            prm.data = r
    rounded = ref(ids).logits if rounded_to else raw
    if not torch.equal(got, rounded):
        what = f"with its unpacked tensors rounded to {', '.join(sorted(rounded_to))}" if rounded_to else ""
        raise MMFError(f"verify failed: the packed logits differ from the frozen source's {what} (median relative "
                       f"error {median_rel_error(got, rounded):.2e}); packing should be exact, please report this")
    err = _rel_errors(got, raw)
    n = batch * seq_len
    result = {
        "compared": f"packed model vs source model after freeze(), both fp32, {n} positions "
                    f"({batch} x {seq_len} random token ids, seed {seed})",
        "positions": n,
        "bit_identical": bool(torch.equal(got, raw)),
        "max_rel_error": float(err.max()),
        "median_rel_error": float(err.median()),
        "same_next_token": int((got.argmax(-1) == raw.argmax(-1)).sum()),
        "unpacked_rounded_to": ", ".join(sorted(rounded_to)) or None,
        "median_rel_error_vs_unfrozen_source": float(_rel_errors(got, unfrozen).median()),
    }
    if rounded_to:
        result["exact_after_rounding"] = True  # equal bit for bit to the frozen source with the same rounding
    return result


def _rel_errors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a - b|| / ||b|| per (sequence, position) of the logit vectors, flattened (float64)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-30)).flatten()


# ---- inspect --------------------------------------------------------------------------------------

def inspect_checkpoint(path, stats: bool = True) -> dict:
    """Per-tensor name, shape, stored dtype or packed format, bytes, ternary shares and scale; totals.

    Works on packed checkpoints (reads headers and the scale tensors only) and on float checkpoints
    (a MatMul-free one is quantised tensor by tensor to report what packing would produce; ``stats``
    False skips that and reads headers only).

    Sizes: a row's ``bytes`` are its tensor data (a packed weight's codes plus its scale); the totals'
    ``file_bytes`` are the weight files on disk (headers included: the figure pack and unpack report)
    and ``tensor_bytes`` the sum of the rows; ``compression_vs_fp16`` compares tensor data with the same
    parameters stored as fp16.
    """
    path = Path(path)
    cfg = load_config(path)
    files = checkpoint_files(path)
    ternary = _ternary_modules(cfg)[0] if cfg.arch == "mmf" else {}
    rows = []
    totals = {"parameters": 0, "file_bytes": weight_file_bytes(files), "tensor_bytes": 0, "fp16_bytes": 0,
              "ternary_parameters": 0, "ternary_bytes": 0}
    fmt_seen = set()
    scratch = None
    for p in files_in_order(files):
        tensors, metadata, _ = read_header(p)
        fmt = file_format(p, metadata) if FORMAT_KEY in metadata else None
        with SafetensorsReader(p) as r:
            for name, info in sorted(tensors.items(), key=lambda kv: kv[1].begin):
                row = {"name": name, "file": p.name}
                if fmt and is_packed_weight(name, metadata):
                    meta = packed_tensor_meta(p, name, metadata, tensors, fmt)
                    fmt_seen.add(fmt)
                    numel = meta["shape"][0] * meta["shape"][1]
                    nbytes = info.nbytes + tensors[name + SCALE_SUFFIX].nbytes
                    counts = meta["counts"]
                    row.update(shape=meta["shape"], stored=fmt, bytes=nbytes, scale=meta["scale"])
                    if not counts:
                        packed, _ = read_packed(r, name, meta)
                        c = unpack_codes(packed, meta["shape"][1], fmt)
                        counts = [int((c == -1).sum()), int((c == 0).sum()), int((c == 1).sum())]
                    _shares(row, counts)
                    totals["ternary_parameters"] += numel
                    totals["ternary_bytes"] += nbytes
                elif fmt and name.endswith(".weight" + SCALE_SUFFIX) and is_packed_weight(name[:-len(SCALE_SUFFIX)],
                                                                                            metadata):
                    continue  # counted with its weight
                else:
                    numel = info.numel
                    nbytes = info.nbytes
                    row.update(shape=list(info.shape), stored=info.dtype, bytes=nbytes)
                    if name in ternary or (cfg.arch == "mmf" and name == "lm_head.weight"):
                        totals["ternary_parameters"] += numel
                        totals["ternary_bytes"] += nbytes
                        if stats and info.dtype in ("F16", "BF16", "F32", "F64"):
                            w = r.read(name)
                            if scratch is None or scratch.numel() < w.numel():
                                scratch = torch.empty(w.numel(), dtype=torch.float32)
                            _, s_w, counts = quantize_pack(w, "i2", f"{name} ({p.name})", scratch)
                            del w
                            row["scale"] = float(s_w)
                            _shares(row, counts)
                totals["parameters"] += numel
                totals["tensor_bytes"] += nbytes
                totals["fp16_bytes"] += 2 * numel
                rows.append(row)
    if cfg.arch == "mmf" and cfg.tie_word_embeddings and not any(r["name"] == "lm_head.weight" for r in rows):
        totals["note"] = "lm_head is tied to the embeddings"
    totals["compression_vs_fp16"] = totals["fp16_bytes"] / totals["tensor_bytes"] if totals["tensor_bytes"] else 0.0
    totals["bits_per_ternary_weight"] = (8 * totals["ternary_bytes"] / totals["ternary_parameters"]
                                         if totals["ternary_parameters"] else None)
    return {"path": str(path), "model_type": cfg.model_type, "packed": bool(fmt_seen),
            "format": fmt_seen.pop() if fmt_seen else None, "tensors": rows, "totals": totals}


def _shares(row: dict, counts) -> None:
    total = sum(counts) or 1
    row["share_-1"], row["share_0"], row["share_+1"] = (c / total for c in counts)
