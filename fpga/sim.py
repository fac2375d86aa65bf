"""Prove an FPGA image in simulation: the reference RTL reads the image's own .mem banks.

For every ternary tensor of the image, a random int8 activation vector x is drawn; the test bench
(fpga/rtl/tb_ternary_mvu.v, run with Icarus Verilog) streams the selected rows of the tensor from
the bank files and computes int32 accumulators with adds and subtracts only; each accumulator must
equal, bit for bit, the integer product ``codes @ x`` computed in int64 by torch from the
checkpoint itself (quantised by kernels.reference.weight_quant, independently of the image).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mmf.errors import MMFError

from . import formats as fmt
from .manifest import MANIFEST, check_checksums
from .source import CheckpointSource

INSTALL_HINT = ("Icarus Verilog (iverilog, vvp) is not installed; install it with `apt-get install iverilog` "
                "(macOS: `brew install icarus-verilog`) and re-run")
RTL_FILES = ("tb_ternary_mvu.v", "ternary_mvu_bank.v", "ternary_mvu.v")
TB_TOP = "tb_ternary_mvu"
_RESULT = re.compile(r"MMF-MVU (PASS|FAIL|ERROR)(.*)")


def rtl_dir() -> Path:
    return Path(__file__).resolve().parent / "rtl"


def find_simulator() -> tuple[str, str]:
    iverilog, vvp = shutil.which("iverilog"), shutil.which("vvp")
    if not iverilog or not vvp:
        raise MMFError(INSTALL_HINT)
    return iverilog, vvp


def random_activations(k: int, seed: int, name: str) -> torch.Tensor:
    """int8 activations in [-128, 127], reproducible per (seed, tensor name)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randint(-128, 128, (k,), generator=g, dtype=torch.int16).to(torch.int8)


def rows_to_simulate(n: int, rows: int) -> list:
    """All rows if ``rows`` is 0 or covers the tensor, else the first ceil(rows/2) and the last floor(rows/2)."""
    if rows <= 0 or rows >= n:
        return list(range(n))
    head = -(-rows // 2)
    return list(range(head)) + list(range(n - rows // 2, n))


def plan_jobs(entry: dict, rows: list, bank_words: int) -> list:
    """Group rows into simulator runs, each over a run of rows at stride words_per_row in consecutive banks."""
    wpr, rpb, bank0 = entry["words_per_row"], entry["rows_per_bank"], entry["bank"]
    runs = []
    for r in rows:
        same_bank = rpb is None or (runs and runs[-1][0] // rpb == r // rpb)
        if runs and runs[-1][-1] == r - 1 and same_bank:
            runs[-1].append(r)
        else:
            runs.append([r])
    jobs = []
    for run in runs:
        r0, n = run[0], len(run)
        if rpb is not None:
            first, base, nbanks = bank0 + r0 // rpb, (r0 % rpb) * wpr, 1
        else:
            start, end = r0 * wpr, (r0 + n) * wpr
            first = bank0 + start // bank_words
            nbanks = bank0 + (end - 1) // bank_words - first + 1
            base = start - (start // bank_words) * bank_words
        jobs.append({"row0": r0, "rows": n, "first_bank": first, "nbanks": nbanks, "base": base})
    return jobs


def _act_lines(x: torch.Tensor, wpr: int, lanes: int) -> bytes:
    buf = np.zeros(wpr * lanes, dtype=np.uint8)
    buf[: x.numel()] = x.numpy().view(np.uint8)
    hx = fmt.words_to_hex(buf.reshape(wpr, lanes), 8 * lanes)
    return b"".join(row.tobytes() + b"\n" for row in hx)


def _bits(v: int) -> int:
    return max(1, int(v).bit_length())


def _run_job(args: list, jobdir: Path, timeout_s: float) -> tuple:
    """One simulator run in its own directory: (PASS|FAIL|ERROR, detail, accumulators as signed ints)."""
    run = subprocess.run(args, cwd=jobdir, capture_output=True, text=True, timeout=timeout_s)
    m = _RESULT.search(run.stdout)
    if m is None or m.group(1) == "ERROR":
        return "ERROR", (run.stdout + run.stderr).strip()[-300:], []
    got = [int(t, 16) for t in (jobdir / "got.mem").read_text().split() if re.fullmatch(r"[0-9a-fA-F]{8}", t)]
    shutil.rmtree(jobdir, ignore_errors=True)
    return m.group(1), m.group(2).strip(), [g - (1 << 32) if g >= 1 << 31 else g for g in got]


def check_verify_options(verify_rows: int, seed: int) -> None:
    """--verify-rows: rows per tensor, >= 1, or 0 for every row; --seed: 0 <= seed < 2**32."""
    if not isinstance(verify_rows, int) or verify_rows < 0:
        raise MMFError(f"--verify-rows {verify_rows}: give the number of rows to simulate per tensor (1 or more), "
                       "or 0 to simulate every row")
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise MMFError(f"--seed {seed}: give a seed from 0 to {2**32 - 1}")


def verify_image(image_dir, checkpoint, rows: int = 64, seed: int = 0, source=None, progress=None,
                 checksums: bool = True, timeout_s: float = 600.0, workers: Optional[int] = None) -> dict:
    """Simulate the reference RTL on the image's ternary banks; returns a report (``passed`` and rows per tensor).

    ``rows`` rows of every ternary tensor are simulated (half from the start, half from the end; 0 = all).
    """
    check_verify_options(rows, seed)
    iverilog, vvp = find_simulator()
    image_dir = Path(image_dir)
    try:
        manifest = json.loads((image_dir / MANIFEST).read_text())
    except FileNotFoundError:
        raise MMFError(f"{image_dir}: no {MANIFEST}; is this an mmf fpga-image directory?") from None
    if checksums:
        check_checksums(image_dir, manifest)
    tensors = [x for x in manifest["tensors"] if x["kind"] == "ternary"]
    if not tensors:
        raise MMFError("the image holds no ternary tensors to simulate; select layers with --layers")
    if "mem" not in manifest["regions"]["ternary"]["bank_files"]:
        raise MMFError("simulation reads the .mem banks; add mem to --formats")
    w, bw = manifest["word_bits"], manifest["bank_words"]
    lanes = w // 2
    plans = {x["name"]: (x, rows_to_simulate(x["rows"], rows)) for x in tensors}
    jobs = {name: plan_jobs(x, rr, bw) for name, (x, rr) in plans.items()}
    all_jobs = [j for js in jobs.values() for j in js]
    nbanks = max(j["nbanks"] for j in all_jobs)
    xdepth = max(x["words_per_row"] for x in tensors)
    max_rows = max(j["rows"] for j in all_jobs)
    params = {"WORD_BITS": w, "BANK_WORDS": bw, "NBANKS": nbanks, "ADDR_BITS": _bits(nbanks * bw),
              "XDEPTH": xdepth, "XADDR_BITS": _bits(xdepth), "MAX_ROWS": max_rows}
    source = source or CheckpointSource(checkpoint)
    work = Path(tempfile.mkdtemp(prefix="mmf-fpga-sim-"))
    t0 = time.perf_counter()
    report_rows = []
    try:
        cmd = [iverilog, "-g2001", "-o", str(work / "tb.vvp")]
        cmd += [f"-P{TB_TOP}.{k}={v}" for k, v in params.items()]
        cmd += [str(rtl_dir() / f) for f in RTL_FILES]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise MMFError(f"iverilog could not compile the reference RTL: {(proc.stderr or proc.stdout).strip()[:300]}")
        task = progress.add_task("fpga-image: simulating", total=len(all_jobs)) if progress is not None else None
        pending = []  # (name, entry, sim_rows, ref, scale_ok, futures)
        with ThreadPoolExecutor(max_workers=max(1, min(workers or os.cpu_count() or 1, 16))) as pool:
            for name, (codes, s_w) in source.iter(set(plans)):
                entry, sim_rows = plans[name]
                if tuple(codes.shape) != (entry["rows"], entry["columns"]):
                    raise MMFError(f"{name}: checkpoint shape {tuple(codes.shape)} differs from the image's "
                                   f"{entry['rows']} x {entry['columns']}; was the image built from another checkpoint?")
                x = random_activations(entry["columns"], seed, name)
                idx = torch.tensor(sim_rows, dtype=torch.long)
                ref = torch.zeros(entry["rows"], dtype=torch.int64)
                ref[idx] = codes[idx].to(torch.int64) @ x.to(torch.int64)  # the torch reference, exact in int64
                if ref.abs().max() >= 2**31:
                    raise MMFError(f"{name}: an accumulator exceeds int32")
                scale_ok = entry.get("scale") is not None and entry["scale"]["value"] == float(s_w)
                act = _act_lines(x, entry["words_per_row"], lanes)
                futures = []
                for job in jobs[name]:
                    jobdir = work / f"job{len(pending)}-{len(futures)}"
                    jobdir.mkdir()
                    (jobdir / "act.mem").write_bytes(act)
                    for b in range(job["nbanks"]):
                        src = (image_dir / f"ternary/bank{job['first_bank'] + b:05d}.mem").resolve()
                        try:
                            os.symlink(src, jobdir / f"bank{b}.mem")
                        except OSError:
                            shutil.copyfile(src, jobdir / f"bank{b}.mem")
                    exp = ref[job["row0"]: job["row0"] + job["rows"]]
                    (jobdir / "expected.mem").write_text("".join(f"{int(v) & 0xFFFFFFFF:08x}\n" for v in exp))
                    args = [vvp, "-n", str(work / "tb.vvp"), f"+nbanks={job['nbanks']}", f"+base={job['base']}",
                            f"+rows={job['rows']}", f"+wpr={entry['words_per_row']}"]
                    fut = pool.submit(_run_job, args, jobdir, timeout_s)
                    if task is not None:
                        fut.add_done_callback(lambda _f: progress.advance(task))
                    futures.append((job, fut))
                pending.append((name, entry, sim_rows, ref, scale_ok, futures))
            for name, entry, sim_rows, ref, scale_ok, futures in pending:
                got_all, cycles, first_fail, bad_code = {}, 0, None, False
                for job, fut in futures:
                    status, detail, got = fut.result()
                    if status == "ERROR":
                        raise MMFError(f"simulation of {name} did not run: {detail}")
                    for r, g in zip(range(job["row0"], job["row0"] + job["rows"]), got):
                        got_all[r] = g
                    if status == "PASS":
                        cycles += int(re.search(r"cycles=(\d+)", detail).group(1))
                    elif first_fail is None:
                        first_fail = detail
                    bad_code |= "bad_code=1" in detail
                wrong = [r for r in sim_rows if got_all.get(r) != int(ref[r])]
                passed = not wrong and first_fail is None and scale_ok
                report_rows.append({
                    "tensor": name, "rows": entry["rows"], "columns": entry["columns"],
                    "simulated_rows": len(sim_rows), "simulator_runs": len(futures), "cycles": cycles,
                    "mismatches": len(wrong),
                    "first_mismatch": None if not wrong else {"row": wrong[0], "got": got_all.get(wrong[0]),
                                                              "expected": int(ref[wrong[0]])},
                    "bad_code": bad_code, "scale_matches": scale_ok, "status": "PASS" if passed else "FAIL",
                })
    finally:
        shutil.rmtree(work, ignore_errors=True)
    order = {x["name"]: i for i, x in enumerate(tensors)}
    report_rows.sort(key=lambda r: order[r["tensor"]])
    version = subprocess.run([iverilog, "-V"], capture_output=True, text=True).stdout.splitlines()
    return {"passed": all(r["status"] == "PASS" for r in report_rows), "seed": seed, "rows_per_tensor": rows,
            "simulator": version[0] if version else "iverilog", "rtl_parameters": params,
            "seconds": round(time.perf_counter() - t0, 3), "tensors": report_rows}


def failure_summary(report: dict) -> Optional[str]:
    bad = [r for r in report["tensors"] if r["status"] != "PASS"]
    if not bad:
        return None
    r = bad[0]
    if r["first_mismatch"]:
        fm = r["first_mismatch"]
        what = f"row {fm['row']}: RTL {fm['got']}, torch {fm['expected']}"
    elif not r["scale_matches"]:
        what = "the manifest's scale differs from the checkpoint's s_w"
    else:
        what = "reserved code 3 read" if r["bad_code"] else "simulation failed"
    total = sum(x["mismatches"] for x in report["tensors"])
    return (f"verification failed: {len(bad)} of {len(report['tensors'])} tensors differ ({total} accumulators); "
            f"first {r['tensor']} {what}")
