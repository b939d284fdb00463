#!/usr/bin/env bash
# One short, prepared GPU check (≤ 4 minutes). Needs: python3 with torch (CUDA), timm, onnx,
# onnxruntime, pytest, scikit-image, scipy. Does NOT need pydicom, tensorrt or an installed mediqa
# (runs from the source tree). Writes its outputs to $OUT when set (else ./gpu_check_out).
#   1. pytest -m "gpu or trt" tests/test_gpu.py  (torch CUDA vs CPU parity; TensorRT if importable)
#   2. torch CUDA throughput: fp32 / bf16 / fp16 at batch 1 / 8 / 32, mediqa-vitt16 and mediqa-vitb8,
#      on real preprocessed images, with the score deviation of each precision from CUDA fp32
#   3. TensorRT fp16 engine build + parity + throughput for mediqa-vitt16 (+ --tta d4 on it), if tensorrt imports
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/gpu_check.txt"
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }

say "== machine"
(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1 || true) | tee -a "$LOG"
"$PY" - <<'PY' 2>&1 | tee -a "$LOG"
import importlib.util, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for m in ("timm", "onnx", "onnxruntime", "tensorrt", "pydicom", "skimage", "scipy"):
    spec = importlib.util.find_spec(m)
    v = None
    if spec is not None:
        try:
            v = getattr(__import__(m), "__version__", "?")
        except Exception as e:  # report, do not fail the check
            v = f"import error: {e}"
    print(f"  {m}: {v}")
PY

say "== pytest -m 'gpu or trt' tests/test_gpu.py"
timeout 150 "$PY" -m pytest -q -m "gpu or trt" tests/test_gpu.py -rs -p no:cacheprovider \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -15 | tee -a "$LOG"
PYTEST_RC=${PIPESTATUS[0]}
say "pytest exit code: $PYTEST_RC"

say "== torch CUDA throughput (images/s, real inputs; |Δscore| vs CUDA fp32)"
timeout 100 "$PY" - <<'PY' 2>&1 | grep -v -i warning | tee -a "$LOG"
import json, os, time
import numpy as np, torch
from engines.models.registry import create_model
from engines.models.presets import get_preset
from engines.prompts import DEFAULT_VOCAB
from export.samples import sample_set
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
res = {}
for preset in ("mediqa-vitt16", "mediqa-vitb8"):
    torch.manual_seed(0)
    m = create_model(preset, DEFAULT_VOCAB.size).cuda().eval()
    s = sample_set(32, cfg=get_preset(preset).preprocess_config())
    x_all, p_all = torch.from_numpy(s.images).cuda(), torch.from_numpy(s.prompts).cuda()
    ref = None
    for prec, dt in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for b in (1, 8, 32):
            x, p = x_all[:b], p_all[:b]
            ctx = (torch.autocast("cuda", dtype=dt) if dt else torch.autocast("cuda", enabled=False))
            with torch.inference_mode(), ctx:
                for _ in range(3):
                    out = m(x, p)[0]
                torch.cuda.synchronize()
                ts = []
                for _ in range(10):
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record(); m(x, p); e1.record(); torch.cuda.synchronize()
                    ts.append(e0.elapsed_time(e1) / 1000)
                if b == 32:
                    sc = m(x, p)[0].float().cpu().numpy()
            ips = b / float(np.median(ts))
            dev = ""
            if b == 32:
                if prec == "fp32":
                    ref = sc
                dev = f" max|Δscore| vs fp32 {np.abs(sc - ref).max():.2e}"
            res[f"{preset} {prec} b{b}"] = ips
            print(f"{preset:14s} {prec} batch {b:2d}: {ips:9.1f} img/s{dev}", flush=True)
    del m; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "gpu_throughput.json"), "w"), indent=1)
PY

if "$PY" -c "import tensorrt" 2>/dev/null; then
  say "== TensorRT fp16 engine (mediqa-vitt16)"
  timeout 150 "$PY" - <<'PY' 2>&1 | tail -20 | tee -a "$LOG"
import tempfile, time, pathlib, numpy as np, torch
from engines.artifact import ModelCard
from engines.backends.engine_header import BatchProfile
from engines.backends.tensorrt_backend import TensorRTBackend
from engines.backends.torch_backend import TorchBackend
from engines.models.presets import get_preset
from engines.models.registry import create_model
from engines.prompts import DEFAULT_VOCAB
from export.onnx import torch_to_onnx
from export.samples import sample_set
from export.tensorrt import build_engine
from export.verify import compare_backends
d = pathlib.Path(tempfile.mkdtemp()); torch.manual_seed(0)
p = get_preset("mediqa-vitt16"); m = create_model(p.name, DEFAULT_VOCAB.size).eval()
card = ModelCard(task="iqa", preset=p.name, prompt_vocab=DEFAULT_VOCAB.to_dict(), preprocess=p.preprocess_config().to_dict(), label_scale={"min": 0, "max": 1, "name": "q"})
torch_to_onnx(m, d / "model.onnx", graph="2d", card=card, image_size=224, prompt_dim=DEFAULT_VOCAB.size, dynamo=False)
b = build_engine(d / "model.onnx", d / "model.fp16.engine", profile=BatchProfile(1, 8, 32), timing_cache=d / "tc")
print(f"built in {b.seconds:.1f} s, {b.size_bytes / 1e6:.1f} MB")
s = sample_set(32, cfg=p.preprocess_config())
with TorchBackend.from_modules(m, card) as ref, TensorRTBackend(b.path) as eng:
    print(compare_backends(ref, eng, s.images, s.prompts, precision="fp16", raise_on_fail=False)[0].summary())
    for bs in (1, 8, 32):
        x, pr = s.images[:bs], s.prompts[:bs]
        for _ in range(3): eng.score(x, pr)
        t = time.perf_counter(); [eng.score(x, pr) for _ in range(10)]
        print(f"tensorrt fp16 batch {bs}: {10 * bs / (time.perf_counter() - t):.1f} img/s (incl. host copies)")
    # --tta d4 on TensorRT: 8 images x 8 copies = 64 > the profile's max 32, so the wrapper's
    # copies are split into engine-sized chunks; compared with the same TTA on torch fp32.
    from engines.tta import with_tta
    a = with_tta(ref, "d4").score(s.images[:8], s.prompts[:8])["score"]
    e = with_tta(eng, "d4").score(s.images[:8], s.prompts[:8])["score"]
    print(f"tensorrt fp16 TTA d4 (64 copies): max|dscore| vs torch fp32 TTA {np.abs(a - e).max():.2e}")
PY
else
  say "== TensorRT: not importable here (pip install 'mediqa[trt]'); trt tests skipped"
fi
say "== done (pytest rc $PYTEST_RC); outputs in $OUT"
exit "$PYTEST_RC"
