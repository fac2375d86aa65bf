#!/usr/bin/env bash
# One-GPU NCCL smoke of `mmf bench --train --nproc` (bench/train_scaling.py): world size 1 under torchrun
# with the NCCL process group, DDP then FSDP at 1.3b (4 x 2048 tokens, 6 steps, the first 3 untimed), then
# the 13b FSDP run on one GPU, which the memory prediction must refuse in one line (exit 2) before launch.
# JSON goes to $OUT (the device tool's folder) or bench/results/. Usage: bash bench/train_scaling_smoke.sh
set -uo pipefail
dest=${OUT:-bench/results}
mkdir -p "$dest"
python -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version(), torch.cuda.get_device_name(0))"
status=0
for s in ddp fsdp; do
    python -m mmf.cli.main bench --train --nproc 1 --strategy "$s" --model 1.3b --steps 6 --device cuda \
        --json-out "$dest/train_scaling_smoke_${s}.json" || status=1
done
python -m mmf.cli.main bench --train --nproc 1 --strategy fsdp --model 13b --device cuda
rc=$?
echo "13b fsdp on 1 GPU: exit $rc (2 expected: refused by the memory prediction)"
[ "$rc" = 2 ] || status=1
exit $status
