# Experiment helper for patches/gemv_register_cap.diff (not kept; see patches/README.md).
# With that patch applied to kernels/ternary_gemv.py, writes two module variants for
# decode_breakdown.py's EXTRA: /tmp/tv_half.py (only the register-capped schedules) and
# /tmp/tv_nocap.py (the patched module without them). Run from the repository root.
import re

src = open("kernels/ternary_gemv.py").read()
capped = "        (16, 8, 1, 128), (8, 8, 1, 128), (16, 16, 1, 64), (8, 16, 1, 64)],\n"
if capped not in src:
    raise SystemExit("apply bench/experiments/patches/gemv_register_cap.diff first")
nocap = src.replace("(8, 8, 2), (4, 8, 4),\n" + capped, "(8, 8, 2), (4, 8, 4)],\n")
half = re.sub(r"    1: \[\(8, 4, 2\).*?\],\n    2:",
              "    1: [(16, 8, 1, 128), (8, 8, 1, 128), (16, 16, 1, 64), (8, 16, 1, 64)],\n    2:", src, flags=re.S)
assert nocap != src and half != src
open("/tmp/tv_nocap.py", "w").write(nocap)
open("/tmp/tv_half.py", "w").write(half)
print("variants written: /tmp/tv_half.py /tmp/tv_nocap.py")
