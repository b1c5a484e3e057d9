#!/usr/bin/env bash
# Every GPU benchmark of issue 7 in one go, in under 8 minutes on one H100, from the repo alone:
# random-init models, CIFAR-10 JPEGs and the pure-Python packages the GPU image lacks from the
# git-ignored device_payload/ (fill it first, where ../shared exists: .venv/bin/python bench/payload.py).
#
#     bash bench/gpu.sh [OUT_DIR]        # default: $OUT (the device tool's) or runs/bench-gpu
#
# Writes OUT_DIR/gpu.json (all results) and OUT_DIR/gpu.md (all tables), plus one log per step.
# Each step has its own time limit (460 s together) so that a slow one cannot take the others' time; the
# torch.compile step, the slowest to start, runs last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/bench-gpu}}
mkdir -p "$OUT_DIR"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD/src:$PWD/device_payload/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -f device_payload/cifar10_train.npz ] || [ -d ../shared/data/cifar10/train ] || {
    echo "no device_payload/cifar10_train.npz: run bench/payload.py where ../shared exists and carry device_payload"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name(0))"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log
    local name=$1 limit=$2; shift 2
    local started=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT_DIR/$name.log"
    echo "== $name: exit $rc after $((SECONDS - started)) s"
}

# 1. fine-tuning: ours vs the bare eager ceiling vs the seed's pipeline, batch 32, 224 px
step finetune 80 $PY bench/finetune_throughput.py --device cuda --size 224 --batch 32 --steps 20 --rounds 3 \
    --warmup 5 --json "$OUT_DIR/finetune.json" --markdown "$OUT_DIR/finetune.md"
# 2. explanations per method and model, and batched vs batch-1 transformer attribution
step explain 110 $PY bench/explain_throughput.py --device cuda --random-init --models resnet34 vit_b16_in21k \
    --size 224 --batch 128 --slow-batch 8 --repeats 3 --chefer-images 64 --float64 \
    --json "$OUT_DIR/explain.json" --markdown "$OUT_DIR/explain.md"
# 2b. the two goal methods and Chefer again with TF32 matrix products
step explain_tf32 30 $PY bench/explain_throughput.py --device cuda --random-init --models resnet34 vit_b16_in21k \
    --size 224 --batch 256 --repeats 3 --methods gradcam attention_rollout transformer_attribution \
    --matmul-precision high --json "$OUT_DIR/explain_tf32.json" --markdown "$OUT_DIR/explain_tf32.md"
# 2c. the ViT relevance methods without their check forward (verify=False), TF32
step explain_noverify 25 $PY bench/explain_throughput.py --device cuda --random-init --models vit_b16_in21k \
    --size 224 --batch 256 --repeats 3 --methods attention_rollout transformer_attribution --no-verify \
    --matmul-precision high --json "$OUT_DIR/explain_noverify.json" --markdown "$OUT_DIR/explain_noverify.md"
# 3. faithfulness: deletion + insertion, 20 steps, float32 (the CPU default) and bf16 autocast (the GPU default)
step faithfulness 55 $PY bench/faithfulness_throughput.py --device cuda --models resnet34 vit_b16_in21k \
    --images 128 --steps 20 --batch 512 --repeats 2 --bf16 \
    --json "$OUT_DIR/faithfulness.json" --markdown "$OUT_DIR/faithfulness.md"
# 1b. fine-tuning with torch.compile on our model, against the eager ceiling of the same process
#     (add --compile-ceiling for a compiled ceiling too, when there is time for one more compilation)
step finetune_compile 160 $PY bench/finetune_throughput.py --device cuda --size 224 --batch 32 --steps 20 \
    --rounds 3 --warmup 5 --compile --no-seed --json "$OUT_DIR/finetune_compile.json" \
    --markdown "$OUT_DIR/finetune_compile.md"

$PY - "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
names = ["finetune", "explain", "explain_tf32", "explain_noverify", "faithfulness", "finetune_compile"]
results = {n: json.loads((out / f"{n}.json").read_text()) for n in names if (out / f"{n}.json").is_file()}
(out / "gpu.json").write_text(json.dumps(results, indent=1))
tables = [(out / f"{n}.md").read_text() for n in names if (out / f"{n}.md").is_file()]
missing = [n for n in names if n not in results]
text = "\n\n".join(tables) + (f"\n\nMissing (failed or timed out, see the logs): {', '.join(missing)}\n" if missing else "")
(out / "gpu.md").write_text(text)
print(text)
EOF
