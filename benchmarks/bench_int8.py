"""int8 variants of an exported model vs its fp32 graph (onnxruntime CPU, batch 8, interleaved runs).

Static QDQ (what `mediqa export --int8` ships), static QOperator and dynamic quantisation of
MODEL.onnx (default: /tmp/exp/model.onnx, i.e. `mediqa export engines/weights/default.safetensors -o /tmp/exp`),
each timed round-robin 12 times on the same real inputs (export.samples), with score SRCC vs fp32
on 16 held-out images.

    python benchmarks/bench_int8.py [MODEL.onnx]
"""
import time, numpy as np, onnxruntime as ort, tempfile
from pathlib import Path
from export.quantize import _quantize_static, _quantize_dynamic, calibration_batches, _scores
from export.samples import sample_set
from engines.metrics import srcc
import onnxruntime.quantization as oq
import sys
src = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/exp/model.onnx"); d = Path(tempfile.mkdtemp())
s = sample_set(48)
batches = calibration_batches(s.images[:32], s.prompts[:32], 8)
_quantize_static(src, d / "qdq.onnx", batches, "minmax")
# QOperator variant
import export.quantize as Q
oq.quantize_static(str(src), str(d / "qop.onnx"), Q._reader(batches, {"images", "prompt"}), quant_format=oq.QuantFormat.QOperator,
    per_channel=True, activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8, op_types_to_quantize=Q.STATIC_OPS,
    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
_quantize_dynamic(src, d / "dyn.onnx")
paths = {"fp32": src, "qdq": d / "qdq.onnx", "qop": d / "qop.onnx", "dyn": d / "dyn.onnx"}
so = ort.SessionOptions(); so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL; so.intra_op_num_threads = 2
sess = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
x, p = s.images[:8], s.prompts[:8]
feed = {"images": x, "prompt": p}
for k, se in sess.items(): se.run(None, feed)
t = {k: [] for k in sess}
for r in range(12):
    for k, se in sess.items():
        t0 = time.perf_counter(); se.run(None, feed); t[k].append(time.perf_counter() - t0)
ref = sess["fp32"].run(None, {"images": s.images[32:], "prompt": s.prompts[32:]})[0]
for k in sess:
    med = np.median(t[k]); q = sess[k].run(None, {"images": s.images[32:], "prompt": s.prompts[32:]})[0]
    print(f"{k}: {8/med:.1f} img/s  ratio vs fp32 {np.median(t['fp32'])/med:.2f}x  srcc {srcc(q.ravel(), ref.ravel()):.4f}")
