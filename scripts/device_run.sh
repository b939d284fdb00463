#!/usr/bin/env bash
# One prepared run on a lent GPU machine (python3.12 + torch CUDA + timm + onnx, no pydicom, no network):
#   1. install the carried wheels (.whl/: pydicom, pydicom-data, nibabel, pylibjpeg*) into /tmp/site
#   2. train the bundled default model: mediqa train recipe $RECIPE --device cuda
#      (RECIPE defaults to training/recipes/default-gpu.yaml; RECIPE_TIMEOUT caps it, default 420 s)
#   3. scripts/gpu_check.sh (CUDA parity + throughput; TensorRT if importable)
# Everything that must come back is written to $OUT (files ≤ 16 MB: the artifact is split in parts).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}; mkdir -p "$OUT"
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1 \
  || { echo "wheel install failed"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L; nproc
echo "== recipe (t=$(( $(date +%s) - T0 )) s)"
# keep the fine-tuned stage's best checkpoint even if the recipe is cut short
( while sleep 10; do f=runs/default-gpu/runs/finetune/best.safetensors
    [ -f "$f" ] && split -b 12M -d "$f" "$OUT/finetune.part"; done ) &
WATCH=$!
timeout ${RECIPE_TIMEOUT:-420} python3 -m mediqa_cli --log-level info train recipe "${RECIPE:-training/recipes/default-gpu.yaml}" \
    --device cuda --output "$OUT/default.safetensors" --no-progress > "$OUT/recipe.log" 2>&1
echo "recipe exit $?  (t=$(( $(date +%s) - T0 )) s)"
kill $WATCH 2>/dev/null
grep -E "epoch [0-9]+:|time budget|evaluated|recipe done|Error|error" "$OUT/recipe.log" | tail -60
cp runs/default-gpu/recipe_summary.json "$OUT/" 2>/dev/null
if [ -f "$OUT/default.safetensors" ]; then
  (cd "$OUT" && split -b 12M -d default.safetensors default.part && rm default.safetensors && ls -la)
fi
if [ "${SKIP_CHECK:-0}" = 1 ]; then echo "== done (t=$(( $(date +%s) - T0 )) s)"; exit 0; fi
echo "== gpu_check (t=$(( $(date +%s) - T0 )) s)"
timeout ${CHECK_TIMEOUT:-90} bash scripts/gpu_check.sh 2>&1 | tail -40
echo "== done (t=$(( $(date +%s) - T0 )) s)"
