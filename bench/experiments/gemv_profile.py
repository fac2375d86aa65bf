# Experiment: one 13b decode projection, launched a few times eagerly with a fixed schedule, for
# Nsight Compute (the third launch is the one to profile: the first compiles, the second warms).
#   python gemv_profile.py KIND [BN WARPS PER_SM]     KIND: gu (5120 -> 2x13824, mlp norm + GLU),
#   down (13824 -> 5120, plain + residual), ifg (5120 -> 3x5120, attn norm), o (MLGRU step + residual)
# On the device machine, e.g.:
#   ncu --clock-control none --set full --import-source yes -k regex:_gemv_kernel --launch-skip 2 \
#       --launch-count 1 -o $OUT/gu python gemv_profile.py gu
#   ncu --import $OUT/gu.ncu-rep --page source --csv --print-source cuda > $OUT/gu_source.csv
import sys

import torch

from mmf.bench.kernel_bench import rand_packed
from mmf.kernels import ternary_gemv as tv

kind = sys.argv[1]
cfg = tuple(int(x) for x in sys.argv[2:5]) if len(sys.argv) >= 5 else (16, 16, 1)
d, m = 5120, 13824
g = torch.Generator(device="cuda").manual_seed(0)


def rn(*shape):
    return torch.randn(*shape, device="cuda", generator=g)


def nrm(k):
    return (torch.rand(k, device="cuda", generator=g) + 0.5).half()


sw = torch.rand(3, device="cuda", generator=g) * 50 + 10
x = rn(1, d).half()
for _ in range(3):
    if kind == "gu":
        out = torch.empty(1, m, device="cuda", dtype=torch.float16)
        tv.gemv(x, [rand_packed(2 * m, d)], sw[:1], nrm(d)[None], out, pro=tv.PRO_NORM, norm_weight=nrm(d),
                epi=tv.EPI_GLU, config=cfg)
    elif kind == "down":
        out = torch.empty(1, d, device="cuda", dtype=torch.float16)
        tv.gemv(rn(1, m).half(), [rand_packed(d, m)], sw[:1], nrm(m)[None], out, pro=tv.PRO_PLAIN,
                epi=tv.EPI_RESIDUAL, residual=x, config=cfg)
    elif kind == "ifg":
        out = torch.empty(1, 3 * d, device="cuda", dtype=torch.float16)
        tv.gemv(x, [rand_packed(d, d) for _ in range(3)], sw, torch.stack([nrm(d)] * 3), out, pro=tv.PRO_NORM,
                norm_weight=nrm(d), config=cfg)
    else:  # o: the MLGRU step in the prologue
        out = torch.empty(1, d, device="cuda", dtype=torch.float16)
        tv.gemv(rn(1, 3 * d).half(), [rand_packed(d, d)], sw[:1], nrm(d)[None], out, pro=tv.PRO_MLGRU, k=d,
                norm_weight=nrm(d), s_in=rn(1, d), s_out=torch.empty(1, d, device="cuda"),
                lower_bound=torch.rand(d, device="cuda", generator=g), residual=x, epi=tv.EPI_RESIDUAL, config=cfg)
    torch.cuda.synchronize()
print(kind, cfg, "ok", float(out.float().abs().mean()))
