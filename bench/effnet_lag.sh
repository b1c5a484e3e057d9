#!/usr/bin/env bash
# Why does EfficientNet-Lite0 lag under the paper's recipe? One factor at a time, on the CPU:
# 1,000 train / 200 val / 500 test CIFAR-10 images (stratified, seed 0) at 128 px.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench-effnet-lag}
COMMON="--model efficientnet_lite0 --split random --stratified --train-size 1000 --val-size 200 --test-size 500 --input-size 128 --runs-dir $OUT --no-progress"
run() { name=$1; shift; [ -f "$OUT/$name/metrics.json" ] || .venv/bin/xtl finetune $COMMON --name "$name" "$@" > "$OUT/$name.log" 2>&1; }
mkdir -p "$OUT"
run paper            --preset paper
run paper-bn0.1      --preset paper --bn-momentum 0.1
run paper-lr1e-4     --preset paper --lr 1e-4
run paper-lr1e-4-bn  --preset paper --lr 1e-4 --bn-momentum 0.1
run default-bn0.01   --preset default --epochs 5 --patience 0 --bn-momentum 0.01
run default-bn0.1    --preset default --epochs 5 --patience 0 --bn-momentum 0.1
.venv/bin/xtl compare "$OUT"/*/
