#!/usr/bin/env bash
# The whole GPU check of issue #16, in one run on a lent H100/H200 (see DEVELOPERS.md and
# ../shared/gpu/README.md): CIFAR-10 arrives as three parts in /tmp/parts (carried one per call),
# this script unpacks it, then trains the shipped recipe for 3 seeds on the GPU and measures
# the recipe variants there. Everything it makes lands in $OUT (copy
# $OUT/machines/<card>.json to bench/machines/ and the .txt files to bench/).
#
#   bash bench/gpu_check.sh            # on the GPU machine, after the three parts are in /tmp/parts
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_DATA=../shared/cifar10 GPU_CHECK_SUBSET=512 GPU_CHECK_EPOCHS=1 \
#       GPU_CHECK_BENCH_SECONDS=60 bash bench/gpu_check.sh                 # dry run on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
DATA=${GPU_CHECK_DATA:-/tmp/cifar10}
SUBSET=${GPU_CHECK_SUBSET:-0}
BENCH_SECONDS=${GPU_CHECK_BENCH_SECONDS:-240}   # the sweep's time
EPOCHS=()
[ -n "${GPU_CHECK_EPOCHS:-}" ] && EPOCHS=(--epochs "$GPU_CHECK_EPOCHS")
mkdir -p "$OUT/machines"

if [ ! -d "$DATA/cifar-10-batches-py" ]; then
    python3 .gpu-data/unpack_cifar.py /tmp/parts "$DATA"
fi
python3 -c "import thop" 2>/dev/null || pip install -q ultralytics-thop >/dev/null 2>&1 || true
{ nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || true
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/environment.txt" 2>&1

# 1. The default: 3 seeds of the shipped recipe, timed as a user sees it (process start to end).
start=$(date +%s.%N)
python3 CNNclassify.py train --seeds 0 1 2 --device "$DEVICE" --data-dir "$DATA" --subset "$SUBSET" "${EPOCHS[@]}" \
    --model-dir "$OUT/model" > "$OUT/train_log.txt" 2> "$OUT/train_stderr.txt"
end=$(date +%s.%N)
echo "wall seconds of the whole command: $(python3 -c "print(round($end - $start, 1))")" >> "$OUT/train_log.txt"
card=$(python3 -c "import json; m = json.load(open('$OUT/model/results.json'))['machine']; \
print((m.get('gpu') or 'cpu').replace('NVIDIA ', '').replace(' ', '_'))")
cp "$OUT/model/results.json" "$OUT/machines/$card.json"
cp "$OUT/train_log.txt" "$OUT/machines/$card.log"
python3 CNNclassify.py test test_images/car.png --device "$DEVICE" --model "$OUT/model/cnn.pt" --out "$OUT/CONV_rslt.png" > "$OUT/test_output.txt"

# 2. Recipe variants, seeds 0 1 2 each (widths, epochs, batch), in order, while time is left.
timeout "$BENCH_SECONDS" python3 bench/gpu_sweep.py --device "$DEVICE" --data-dir "$DATA" --subset "$SUBSET" > "$OUT/sweep_$card.txt" 2>&1 \
    || echo "sweep: exit $? (cut at $BENCH_SECONDS s)" >> "$OUT/sweep_$card.txt"
rm -rf "$OUT/model/"*.pt
cat "$OUT/environment.txt" "$OUT/train_log.txt" "$OUT/sweep_$card.txt"
