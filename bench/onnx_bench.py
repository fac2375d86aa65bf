"""ONNX Runtime (CPU) against the torch CPU path: decode tokens/s, prefill tokens/s, memory, file sizes.

``run_onnx_bench(presets=("tiny",))`` builds, per preset, random models of both architectures,
exports them with ``mmf export-onnx``'s library function into a temporary directory and times,
on the CPU, batch 1:

* ``torch``: the frozen torch model (plain-torch reference ops, what ``mmf generate --device cpu`` runs);
* ``ort-packed``: the MatMul-free export with 2-bit weights, ONNX Runtime constant folding on (the
  default: the in-graph unpacking runs once at load; int8 weights held in memory);
* ``ort-packed-nofold``: the same file with ``ConstantFolding`` disabled (2-bit bytes held in
  memory, unpacked at every call);
* ``ort-float``: the ``--weights float`` export (Transformer++: its only export);
* ``ort-*-decode-only``: the default export with ``decode.onnx`` alone loaded (one session: half
  the weight memory; the prompt goes through the decode graph token by token).

Protocol: a random prompt of ``prompt_len`` tokens (one prefill, timed), then ``gen_len`` greedy
decode steps (timed together); one untimed warm-up, then ``repeat`` timed repetitions; medians.
Memory: for ONNX Runtime, the resident set of a fresh process after loading both sessions
(``OnnxCausalLM``, which trims freed memory) and its peak during the load, less the process before
the load (Linux ``/proc``); for torch, the bytes of the frozen model's parameters and buffers.
Accuracy: median per-position relative error of the prompt's
logits against torch, beside the torch model's own sensitivity (its logits with the embedding
table moved by one ulp): a quantised model's logits jump wherever an fp32 rounding difference flips
an int8 rounding decision (docs/reference-semantics.md), so two correct implementations agree to 1e-7
only until the first flip. Sizes: bytes on disk of the export and of the checkpoint in
fp16 (``save_checkpoint(dtype=fp16)``), of its ``mmf pack`` (i2) and of the export of that packed
checkpoint (its embeddings are fp16 values, which the export stores as fp16, losslessly).

Run as a script it prints a table and writes JSON::

    python -m mmf.bench.onnx_bench --presets tiny 370m --out onnx_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import mmf
from mmf.bench import write_json
from mmf.config import model_preset
from mmf.models import build_model


_MEMORY_PROBE = """
import json, sys
def status():
    d = dict(l.split(":", 1) for l in open("/proc/self/status"))
    return int(d["VmRSS"].split()[0]) * 1024, int(d["VmHWM"].split()[0]) * 1024
from mmf.onnx_runtime import OnnxCausalLM
import onnxruntime
base, _ = status()
m = OnnxCausalLM(sys.argv[1], fold_constants=sys.argv[2] == "1", threads=1, decode_only=sys.argv[3] == "1")
rss, peak = status()
print(json.dumps({"rss_after_load_bytes": rss - base, "peak_rss_during_load_bytes": peak - base}))
"""


def _load_memory(path: Path, fold: bool, decode_only: bool) -> dict:
    """Resident memory of loading an export (both sessions) in a fresh process (Linux /proc)."""
    import subprocess

    if not Path("/proc/self/status").exists():
        return {}
    r = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path), "1" if fold else "0",
                        "1" if decode_only else "0"],
                       capture_output=True, text=True, timeout=1800)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _time_generation(model, prompt: torch.Tensor, gen_len: int, repeat: int) -> dict:
    def once():
        t0 = time.perf_counter()
        out = model(prompt)
        t1 = time.perf_counter()
        tok = out.logits[:, -1].float().argmax(-1, keepdim=True)
        toks = []
        for _ in range(gen_len):
            out = model(tok, out.cache)
            tok = out.logits[:, -1].float().argmax(-1, keepdim=True)
            toks.append(int(tok[0, 0]))
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, toks

    with torch.inference_mode():
        _, _, toks = once()  # warm-up
        runs = [once() for _ in range(repeat)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return {"prefill_s": prefill, "prefill_tokens_per_s": prompt.shape[1] / prefill, "decode_s": decode,
            "decode_tokens_per_s": gen_len / decode, "tokens": toks}


def _median_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Median over positions of ||a - b|| / ||b|| of the logit vectors (docs/reference-semantics.md)."""
    a, b = a.double(), b.double()
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).median().item()


def _ulp_sensitivity(model, prompt: torch.Tensor, ref: torch.Tensor) -> float:
    """The same torch model with its embedding table moved by one ulp: how far a quantised model's
    logits move when any fp32 rounding differs (the yardstick for comparing two implementations)."""
    emb = model.get_submodule("model.embeddings" if model.config.arch == "mmf" else "model.embed_tokens").weight
    saved = emb.data.clone()
    emb.data = torch.nextafter(saved, torch.full_like(saved, float("inf")))
    try:
        return _median_rel_err(model(prompt).logits, ref)
    finally:
        emb.data = saved


def _packed_sizes(ck: Path, work: Path) -> dict:
    """`mmf pack` (i2) of checkpoint ``ck`` and the export of that packed checkpoint: bytes on disk."""
    from mmf.converters.onnx_export import export_onnx
    from mmf.converters.packing import pack_checkpoint

    packed = work / "packed"
    pack_checkpoint(ck, packed)
    manifest = export_onnx(packed, work / "onnx-from-packed", check=False)
    return {"checkpoint_packed_bytes": _dir_bytes(packed),
            "onnx_from_packed_bytes": sum(manifest["file_bytes"].values()),
            "onnx_from_packed_files": manifest["file_bytes"]}


def bench_preset(preset: str, prompt_len: int, gen_len: int, repeat: int, threads: int, work: Path,
                 archs=("mmf", "transformer++")) -> list[dict]:
    from mmf.converters.onnx_export import export_model
    from mmf.onnx_runtime import OnnxCausalLM

    rows = []
    for arch in archs:
        name = preset if arch == "mmf" else f"transformer++-{preset.split('-')[-1]}"
        cfg = model_preset(name)
        torch.manual_seed(0)
        model = build_model(cfg).init_weights().eval()
        sizes = {}
        ck = work / f"{arch}-fp16"
        mmf.save_checkpoint(model, ck, dtype=torch.float16)
        sizes["checkpoint_fp16_bytes"] = _dir_bytes(ck)
        model.freeze()
        if arch == "mmf":
            sizes.update(_packed_sizes(ck, work / arch))
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(3, min(cfg.vocab_size, 259), (1, prompt_len), generator=g)
        variants = [("torch", None, None, False)]
        modes = ("packed", "float") if arch == "mmf" else ("float",)
        for mode in modes:
            out = work / f"{arch}-{mode}"
            t0 = time.perf_counter()
            manifest = export_model(model, out, weights=mode, check=False)
            sizes[f"export_{mode}_s"] = time.perf_counter() - t0
            sizes[f"onnx_{mode}_bytes"] = sum(manifest["file_bytes"].values())
            sizes[f"onnx_{mode}_files"] = manifest["file_bytes"]
            variants.append((f"ort-{mode}", out, True, False))
            if mode == modes[0]:
                variants.append((f"ort-{mode}-decode-only", out, True, True))
            if mode == "packed":
                variants.append(("ort-packed-nofold", out, False, False))
        with torch.inference_mode():
            ref_logits = model(prompt).logits
            sizes["torch_1ulp_median_rel_err"] = _ulp_sensitivity(model, prompt, ref_logits)
        for variant, path, fold, decode_only in variants:
            gc.collect()
            t0 = time.perf_counter()
            runner = model if path is None else OnnxCausalLM(path, fold_constants=fold, threads=threads,
                                                             decode_only=decode_only)
            load_s = time.perf_counter() - t0
            if path is None:
                mem = {"weights_in_memory_bytes": sum(t.numel() * t.element_size() for t in
                                                      list(model.parameters()) + list(model.buffers()))}
            else:
                mem = _load_memory(path, fold, decode_only)
            res = _time_generation(runner, prompt, gen_len, repeat)
            with torch.inference_mode():
                err = _median_rel_err(runner(prompt).logits, ref_logits)
            rows.append({"preset": name, "arch": arch, "variant": variant, "load_s": load_s, **mem,
                         "prompt_logits_median_rel_err_vs_torch": err, **res})
            del runner
        ref = rows[-len(variants)]["tokens"]
        for r in rows[-len(variants):]:
            r["same_tokens_as_torch"] = r["tokens"] == ref
            r.update({k: v for k, v in sizes.items()})
        del model
        gc.collect()
    return rows


def run_onnx_bench(presets=("tiny",), prompt_len: int = 32, gen_len: int = 64, repeat: int = 3,
                   threads: int = 0) -> dict:
    import onnxruntime

    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmf-onnx-bench-") as tmp:
        for p in presets:
            rows += bench_preset(p, prompt_len, gen_len, repeat, threads, Path(tmp) / p)
    return {
        "benchmark": "onnx_bench", "rows": rows,
        "protocol": {"batch": 1, "prompt_len": prompt_len, "gen_len": gen_len, "repeat": repeat,
                     "statistic": "median", "threads": threads, "warmup": 1, "device": "cpu"},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "loadavg_at_end": os.getloadavg()},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__, "mmf": mmf.__version__},
    }


def _mem_cell(r: dict) -> str:
    if "weights_in_memory_bytes" in r:
        return f"{r['weights_in_memory_bytes'] / 1e6:.0f} (weights)"
    if "rss_after_load_bytes" in r:
        return f"{r['rss_after_load_bytes'] / 1e6:.0f} (peak {r['peak_rss_during_load_bytes'] / 1e6:.0f})"
    return "-"


def table_rows(result: dict) -> list[dict]:
    out = []
    for r in result["rows"]:
        torch_row = next(x for x in result["rows"] if x["preset"] == r["preset"] and x["variant"] == "torch")
        out.append({
            "model": r["preset"], "variant": r["variant"],
            "decode tok/s": f"{r['decode_tokens_per_s']:.1f}",
            "vs torch": f"{r['decode_tokens_per_s'] / torch_row['decode_tokens_per_s']:.2f}x",
            "prefill tok/s": f"{r['prefill_tokens_per_s']:.0f}",
            "load s": f"{r['load_s']:.2f}",
            "memory MB": _mem_cell(r),
            "median rel err": (f"{r['prompt_logits_median_rel_err_vs_torch']:.1e}" if r["variant"] != "torch"
                               else f"1ulp: {r['torch_1ulp_median_rel_err']:.1e}"),
            "same tokens": r["same_tokens_as_torch"],
        })
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny"], help="MatMul-free presets (tiny, 370m, ...); "
                    "each is run for both architectures")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime threads (0 = all cores)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    a = ap.parse_args(argv)
    result = run_onnx_bench(a.presets, a.prompt_len, a.gen_len, a.repeat, a.threads)
    result["command"] = "python -m mmf.bench.onnx_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    from tabulate import tabulate

    print(tabulate(table_rows(result), headers="keys"))
    sizes = []
    for r in result["rows"]:
        if r["variant"] == "torch":
            sizes.append({"model": r["preset"], **{k: f"{v:,}" for k, v in r.items()
                                                    if k.endswith("_bytes") and "memory" not in k and v}})
    print()
    print(tabulate(sizes, headers="keys"))
    if a.out:
        write_json(a.out, result)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
