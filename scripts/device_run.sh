#!/usr/bin/env bash
# One prepared run on a lent GPU machine (python3.12 + torch CUDA + timm + onnx, no pydicom, no network):
#   1. unpack the carried packages: .whl/site312.tar.xz (pydicom, pydicom-data, nibabel, dipy, heudiconv,
#      pylibjpeg*, PyWavelets for Python 3.12, trimmed to the files mediqa synth reads; built by
#      scripts/device_site.sh) or, without it, install the wheels in .whl/
#   2. train the bundled default model: mediqa train recipe $RECIPE --device cuda
#      (RECIPE defaults to training/recipes/default-gpu.yaml; RECIPE_TIMEOUT caps it, default 560 s)
#   3. scripts/gpu_check.sh (CUDA parity + throughput; TensorRT if importable), unless SKIP_CHECK=1
# Everything that must come back is written to $OUT (at most 8 files of <= 16 MiB: artifacts are
# split in 15 MiB parts; join with `cat default.part* > default.safetensors`).
# As run for the bundled model (2026-11-28): device tool `run`, carry [".whl/site312.tar.xz"],
# command `SKIP_CHECK=1 bash scripts/device_run.sh`, timeout_s 600. A recipe cut before its
# test evaluation still leaves the packed artifact; record its metrics here afterwards with the
# stage records from meta.tgz in the work dir:
#   mediqa train recipe training/recipes/default-gpu.yaml --finish default.safetensors --device cpu
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}; mkdir -p "$OUT"
T0=$(date +%s)
if [ -f .whl/site312.tar.xz ]; then
  tar -C /tmp -xJf .whl/site312.tar.xz || { echo "site unpack failed"; exit 3; }
  SITE=/tmp/site312
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1 || { echo "wheel install failed"; exit 3; }
  SITE=/tmp/site
fi
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L; nproc
python3 - <<'PY' || exit 4
import os, shutil, skimage
d = os.path.join(os.path.dirname(skimage.__file__), "data")
if not os.path.exists(os.path.join(d, "retina.jpg")) and os.path.exists("/tmp/site312/_extra/retina.jpg"):
    shutil.copy("/tmp/site312/_extra/retina.jpg", d)
    print("retina.jpg copied into", d)
PY
python3 -c "import pydicom, nibabel, dipy, pywt, data_store, torch; print('imports ok', torch.__version__)" || exit 4
RECIPE=${RECIPE:-training/recipes/default-gpu.yaml}
WORK=$(python3 -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['work_dir'])" "$RECIPE")
echo "== recipe $RECIPE -> $WORK (t=$(( $(date +%s) - T0 )) s)"
# keep the fine-tuned stage's best checkpoint even if the recipe is cut short
( while sleep 10; do f=$WORK/runs/finetune/best.safetensors
    [ -f "$f" ] && split -b 15M -d "$f" "$OUT/finetune.part"; done ) &
WATCH=$!
timeout "${RECIPE_TIMEOUT:-560}" python3 -m mediqa_cli --log-level info train recipe "$RECIPE" \
    --device "${DEVICE:-cuda}" --output "$OUT/default.safetensors" --no-progress > "$OUT/recipe.log" 2>&1
echo "recipe exit $?  (t=$(( $(date +%s) - T0 )) s)"
kill $WATCH 2>/dev/null
grep -E "epoch [0-9]+:|time budget|evaluated|recipe done|Error|error|Traceback" "$OUT/recipe.log" | tail -70
# training histories, stage records and the corpus manifest (small) in one file
tar -czf "$OUT/meta.tgz" "$WORK/recipe_summary.json" "$WORK"/corpus/*.csv "$WORK"/corpus/.recipe-synth.json \
    "$WORK"/runs/*/*.json "$WORK"/runs/*/*.jsonl 2>/dev/null
if [ -f "$OUT/default.safetensors" ]; then
  rm -f "$OUT"/finetune.part*
  (cd "$OUT" && split -b 15M -d default.safetensors default.part && rm default.safetensors)
fi
ls -la "$OUT"
if [ "${SKIP_CHECK:-0}" = 1 ]; then echo "== done (t=$(( $(date +%s) - T0 )) s)"; exit 0; fi
echo "== gpu_check (t=$(( $(date +%s) - T0 )) s)"
timeout "${CHECK_TIMEOUT:-90}" bash scripts/gpu_check.sh 2>&1 | tail -40
echo "== done (t=$(( $(date +%s) - T0 )) s)"
