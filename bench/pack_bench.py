"""Pack / unpack benchmark on a synthetic, full-size, sharded fp16 checkpoint.

    python -m mmf.bench.pack_bench --preset 13b --workdir /tmp/$USER/pack-bench --json bench/results/pack_bench_13b.json

1. writes a ``--preset``-shaped MatMul-free checkpoint in fp16 (random weights, ``--shard-gb`` shards)
   with mmf's streaming writer, and tells the kernel to drop it from the page cache, so that packing
   reads it from disk as it would a downloaded checkpoint;
2. runs ``pack`` in a fresh process and ``unpack`` (to ``--unpack-dtype``) in another, each reporting
   its wall time and its own peak resident set (``ru_maxrss``);
3. prints a table and writes JSON with the figures and the load conditions (load average, cores,
   torch threads), then deletes everything it wrote (``--keep`` keeps it);
4. first measures the disk itself (``--disk-gib`` of scratch data, 0 skips): sequential write and
   cold read bandwidth, with O_DIRECT (what pack/unpack use) and through the page cache, so the
   JSON shows the physical floor (bytes / bandwidth) beside the pack and unpack figures.

Disk: the input (13b: about 26 GB) and the packed copy exist together; the input is deleted before
unpacking, so the peak is about max(input + packed, packed + unpacked). Free space is checked first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from mmf.bench import write_json

GB = 1e9


def _tensor_plan(cfg) -> list:
    from mmf.models import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def write_synthetic(cfg, out: Path, shard_bytes: int) -> dict:
    """A random fp16 checkpoint of ``cfg`` written tensor by tensor (never the whole model in memory)."""
    from mmf.checkpoint_layout import CONFIG_FILE, plan_shards, shard_names, shard_writer, write_shard_index
    from mmf.safetensors_io import fadvise_done

    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 23, generator=gen) * 0.02).half()  # 8 Mi values, reused with shifts
    items = []
    for name, shape in _tensor_plan(cfg):
        n = 1
        for s in shape:
            n *= s
        items.append((name, torch.float16, shape, 2 * n))
    shards = plan_shards(items, shard_bytes)
    names = shard_names(len(shards))
    weight_map, written = {}, {"output_bytes": 0}
    total = sum(it[3] for it in items)
    t0 = time.perf_counter()
    for i, (fname, shard) in enumerate(zip(names, shards)):
        with shard_writer(out / fname, shard, {"format": "pt"}, written, weight_map) as w:
            for j, (name, _, shape, nbytes) in enumerate(shard):
                n = nbytes // 2
                t = torch.empty(n, dtype=torch.float16)
                shift = (i * 7919 + j * 104729) % pool.numel()
                src = torch.cat([pool[shift:], pool[:shift]])
                for a in range(0, n, src.numel()):
                    b = min(a + src.numel(), n)
                    t[a:b] = src[: b - a]
                if name.endswith("norm.weight"):
                    t.fill_(1.0).add_(src[:n].abs())
                w.write(name, t.view(shape))
            w.close({"format": "pt"})
        fadvise_done(out / fname)
    seconds = time.perf_counter() - t0
    write_shard_index(out, shards, weight_map)
    cfg_dict = cfg.to_hf_dict()
    cfg_dict["torch_dtype"] = "float16"
    (out / CONFIG_FILE).write_text(json.dumps(cfg_dict, indent=2))
    return {"bytes": total, "files": len(names), "seconds": seconds}


def measure_disk(directory: Path, gib: float) -> dict:
    """Sequential write and cold-read bandwidth (GB/s) of the disk under ``directory``.

    16 MiB blocks; O_DIRECT where the file system allows it (the reads and writes of pack/unpack),
    and buffered (page cache; the write includes its fsync, the read starts after the file's pages
    were dropped with posix_fadvise), each over ``gib`` GiB (the buffered write over half of it).
    """
    import mmap

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "disk-probe.bin"
    block = 16 << 20
    buf = mmap.mmap(-1, block)  # page aligned, as O_DIRECT needs
    buf.write(os.urandom(block))
    n = max(1, int(gib * (1 << 30)) // block)
    out = {"probe_bytes": n * block, "block_bytes": block}

    def drop() -> None:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

    def run(key: str, flags: int, blocks: int, write: bool) -> None:
        try:
            fd = os.open(path, flags | (os.O_WRONLY | os.O_CREAT | os.O_TRUNC if write else os.O_RDONLY), 0o644)
        except OSError as e:
            out[key] = f"unavailable ({e.strerror})"
            return
        t0 = time.perf_counter()
        done = 0
        try:
            for _ in range(blocks):
                got = os.write(fd, buf) if write else os.readv(fd, [buf])
                if got <= 0:
                    break
                done += got
            if write:
                os.fsync(fd)
        finally:
            os.close(fd)
        out[key] = done / (time.perf_counter() - t0) / GB

    try:
        direct = getattr(os, "O_DIRECT", 0)
        run("write_buffered_GBps", 0, max(1, n // 2), True)
        run("write_direct_GBps", direct, n, True)  # leaves the n-block file for the reads
        drop()
        run("read_direct_GBps", direct, n, False)
        drop()
        run("read_buffered_GBps", 0, n, False)
    finally:
        path.unlink(missing_ok=True)
    return out


def _child(phase: str, src: str, out: str, fmt: str, dtype: str, shard_bytes: int) -> None:
    """One measured operation in this (fresh) process; prints a JSON line."""
    from mmf.converters.packing import pack_checkpoint, unpack_checkpoint

    t0 = time.perf_counter()
    if phase == "pack":
        summary = pack_checkpoint(src, out, fmt=fmt, keep_dtype="fp16", max_shard_bytes=shard_bytes)
    else:
        summary = unpack_checkpoint(src, out, dtype=dtype, max_shard_bytes=shard_bytes)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"wall_s": wall, "peak_rss_bytes": rss, "input_bytes": summary["input_bytes"],
                      "output_bytes": summary["output_bytes"], "files": len(summary["files"])}))


def _run_child(args, phase, src, out) -> dict:
    cmd = [sys.executable, "-m", "mmf.bench.pack_bench", "--child", phase, "--src", str(src), "--out", str(out),
           "--format", args.format, "--unpack-dtype", args.unpack_dtype, "--shard-gb", str(args.shard_gb)]
    load_before = os.getloadavg()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{phase} failed:\n{res.stderr[-3000:]}")
    data = json.loads(res.stdout.strip().splitlines()[-1])
    data["loadavg_before"] = load_before
    data["loadavg_after"] = os.getloadavg()
    return data


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="13b", help="MatMul-free preset whose shapes to use (13b, 2.7b, 1.3b, ...).")
    ap.add_argument("--workdir", default=f"/tmp/{os.environ.get('USER', 'mmf')}/pack-bench")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="Shard size of the synthetic input and the outputs.")
    ap.add_argument("--format", default="i2", choices=["i2", "tq1"])
    ap.add_argument("--unpack-dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--json", default=None, help="Write the results here.")
    ap.add_argument("--keep", action="store_true", help="Keep the files written.")
    ap.add_argument("--disk-gib", type=float, default=4.0, help="GiB written and read to measure the disk (0: skip).")
    ap.add_argument("--child", choices=["pack", "unpack"], help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shard_bytes = int(args.shard_gb * GB)
    if args.child:
        _child(args.child, args.src, args.out, args.format, args.unpack_dtype, shard_bytes)
        return

    from mmf.config import model_preset

    cfg = model_preset(args.preset)
    work = Path(args.workdir)
    if work.exists():
        raise SystemExit(f"{work} exists; remove it or choose another --workdir")
    params = sum(torch.Size(s).numel() for _, s in _tensor_plan(cfg))
    need = 2 * params * 1.2 + (2 * params if args.unpack_dtype != "fp32" else 4 * params) * 0.2
    work.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work.parent).free
    if free < need:
        raise SystemExit(f"need about {need / GB:.0f} GB free under {work.parent}, have {free / GB:.0f} GB")
    src, packed, flat = work / "latent-fp16", work / f"packed-{args.format}", work / f"unpacked-{args.unpack_dtype}"
    disk = {}
    if args.disk_gib > 0:
        print(f"measuring the disk under {work} ({args.disk_gib:g} GiB) ...", flush=True)
        disk = measure_disk(work / "disk", args.disk_gib)
        shutil.rmtree(work / "disk", ignore_errors=True)
        print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in disk.items()
                               if k.endswith("GBps")), flush=True)
    try:
        print(f"writing a synthetic {args.preset} checkpoint ({params / 1e9:.2f} B parameters, fp16) to {src} ...",
              flush=True)
        written = write_synthetic(cfg, src, shard_bytes)
        print(f"  {written['bytes'] / GB:.2f} GB in {written['files']} files, {written['seconds']:.1f} s", flush=True)
        print("pack ...", flush=True)
        pack = _run_child(args, "pack", src, packed)
        shutil.rmtree(src)  # make room for the unpacked copy
        print("unpack ...", flush=True)
        unpack = _run_child(args, "unpack", packed, flat)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name, r, gbs_of in (("pack", pack, "input"), ("unpack", unpack, "output")):
        moved = r["input_bytes"] if gbs_of == "input" else r["output_bytes"]
        rows.append({"op": name, "input GB": f"{r['input_bytes'] / GB:.2f}", "output GB": f"{r['output_bytes'] / GB:.2f}",
                     "wall s": f"{r['wall_s']:.1f}", f"GB/s": f"{moved / r['wall_s'] / GB:.3f} ({gbs_of})",
                     "peak RSS GB": f"{r['peak_rss_bytes'] / GB:.2f}",
                     "load avg (1 min) before/after": f"{r['loadavg_before'][0]:.1f}/{r['loadavg_after'][0]:.1f}"})
    from tabulate import tabulate

    print(tabulate(rows, headers="keys"))
    floor = {}
    if isinstance(disk.get("read_direct_GBps"), float) and isinstance(disk.get("write_direct_GBps"), float):
        # the disk alone, at its measured O_DIRECT bandwidth: pack reads the input and writes the packed copy,
        # unpack the reverse (one device, so reads and writes add up)
        for name, r in (("pack", pack), ("unpack", unpack)):
            floor[name] = r["input_bytes"] / GB / disk["read_direct_GBps"] + r["output_bytes"] / GB / disk["write_direct_GBps"]
        print("disk-only floor (bytes / measured O_DIRECT bandwidth): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in floor.items()))
    result = {
        "command": "python -m mmf.bench.pack_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "preset": args.preset, "parameters": params, "format": args.format, "unpack_dtype": args.unpack_dtype,
        "shard_gb": args.shard_gb, "synthetic_input": written, "pack": pack, "unpack": unpack,
        "pack_input_GBps": pack["input_bytes"] / pack["wall_s"] / GB,
        "unpack_output_GBps": unpack["output_bytes"] / unpack["wall_s"] / GB,
        "disk": disk, "disk_floor_s": floor,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "platform": platform.platform()},
        "notes": "input read cold from disk (page cache dropped with posix_fadvise after writing; pack/unpack read "
                 "and write with O_DIRECT where the file system allows it); disk: bandwidths measured first on a "
                 "scratch file in --workdir; disk_floor_s: input / read_direct + output / write_direct, the time "
                 "the disk alone needs; load average shows other processes sharing the CPUs during the run",
    }
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
