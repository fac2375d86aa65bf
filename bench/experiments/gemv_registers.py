# Experiment: registers and spills of the batch-1 decode GEMV for the 13b shapes and schedules,
# compiled offline for sm_90a (no GPU needed): Triton's PTX, then the bundled ptxas -v. With
# patches/gemv_ahead2.diff applied it also compiles AHEAD = 2. The local Triton and its ptxas differ
# from the device machine's (Triton 3.6), so the counts are indicative.
#   python bench/experiments/gemv_registers.py
import glob
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mmf.kernels import ternary_gemv as tv

ARGS = [("X", "*fp16"), ("sxm", "i32"), ("G", "*fp16"), ("sgm", "i32"), ("S_IN", "*fp32"), ("S_OUT", "*fp32"),
        ("LB", "*fp32"), ("NW", "*fp16"), ("BWN", "*fp16"), ("eps_model", "fp32"), ("eps_bl", "fp32"),
        ("XQ", "*i32"), ("SX", "*fp32"), ("SUMX", "*i32"), ("W0", "*i32"), ("W1", "*i32"), ("W2", "*i32"),
        ("SW", "*fp32"), ("OUT", "*fp16"), ("RES", "*fp16"), ("so_m", "i32"), ("sr_m", "i32"), ("M", "i32"),
        ("N", "i32"), ("K", "i32"), ("P", "i32"), ("PW", "i32"), ("NPROG", "i32")]
SHAPES = {"i/f/g (norm)": (5120, 5120, tv.PRO_NORM, tv.EPI_STORE), "o (MLGRU)": (5120, 5120, tv.PRO_MLGRU, tv.EPI_RESIDUAL),
          "gate/up (GLU)": (13824, 5120, tv.PRO_NORM, tv.EPI_GLU), "down": (5120, 13824, tv.PRO_PLAIN, tv.EPI_RESIDUAL)}
SCHEDULES = [(32, 16, 1), (16, 16, 1), (16, 8, 1), (8, 8, 1), (8, 16, 1)]


def ptxas_report(kernel_ptx: str, tmp: str):
    path = os.path.join(tmp, "k.ptx")
    open(path, "w").write(kernel_ptx)
    ptxas = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell"))
    out = subprocess.run([ptxas[0], "-arch=sm_90a", "-v", path, "-o", path + ".cubin"], capture_output=True,
                         text=True).stderr
    regs, spills = re.search(r"Used (\d+) registers", out), re.search(r"(\d+) bytes spill stores", out)
    return int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else None


def main():
    tmp = tempfile.mkdtemp()
    aheads = (1, 2) if "AHEAD" in tv._gemv_kernel.arg_names else (1,)
    print(f"{'shape':14s} {'schedule':12s} {'ahead':>5s} {'regs':>5s} {'spill B':>7s}")
    for name, (n, k, pro, epi) in SHAPES.items():
        pw = tv.words_per_row(k)
        p1, p2, p3 = tv.row_pieces(pw)
        for bn, warps, per_sm in SCHEDULES:
            for ahead in aheads:
                cons = dict(PRO=pro, EPI=epi, HAS_LB=True, BYTE_W=False, BM=1, BN=bn,
                            BLOCK_W=triton.next_power_of_2(pw), PW1=p1, PW2=p2, PW3=p3, USE_ASM=True, PDL=True,
                            EARLY=True, **({"AHEAD": ahead} if len(aheads) > 1 else {}))
                sig = dict(ARGS, **{c: "constexpr" for c in cons})
                compiled = triton.compile(ASTSource(fn=tv._gemv_kernel, signature=sig, constexprs=cons),
                                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
                regs, spills = ptxas_report(compiled.asm["ptx"], tmp)
                print(f"{name:14s} {str((bn, warps, per_sm)):12s} {ahead:5d} {regs!s:>5s} {spills!s:>7s}", flush=True)


if __name__ == "__main__":
    main()
