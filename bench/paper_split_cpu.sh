#!/usr/bin/env bash
# The paper split (4,500 train / 500 val / 2,000 test) on the 2-core CPU: our `default` recipe at
# reduced resolution and epochs, so that both models finish in about 15 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench-paper-split-cpu}
mkdir -p "$OUT"
[ -f "$OUT/efficientnet_lite0/metrics.json" ] || .venv/bin/xtl finetune --model efficientnet_lite0 --split paper \
    --input-size 128 --epochs 3 --batch-size 32 --lr 1e-3 --warmup-epochs 0.3 --runs-dir "$OUT" --name efficientnet_lite0 --no-progress
[ -f "$OUT/vit_s14_dinov2/metrics.json" ] || .venv/bin/xtl finetune --model vit_s14_dinov2 --split paper \
    --input-size 112 --epochs 2 --batch-size 32 --lr 1e-4 --warmup-epochs 0.3 --runs-dir "$OUT" --name vit_s14_dinov2 --no-progress
.venv/bin/xtl compare "$OUT/efficientnet_lite0" "$OUT/vit_s14_dinov2"
