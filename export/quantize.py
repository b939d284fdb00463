"""CPU int8 for onnxruntime: dynamic quantisation (the default), static QDQ per-channel
quantisation calibrated on real images, and an acceptance test on a validation set.

Dynamic (tried first): int8 weights, activations quantised per batch at run time (MatMul, Gemm),
including the activation × activation products of attention; "dynamic-weights" quantises only
the products with a weight operand. Dynamic activation scales come from the whole batch tensor,
so a dynamic int8 score depends slightly on the other inputs of its batch (≤ 6e-3 on the 0–1
scale measured on a bundled model); static and fp32 scores do not.
Static (tried second): weights int8 per output channel (symmetric), activations uint8 with
ranges calibrated by ``CalibrationDataReader`` batches of real preprocessed images
(``export.samples``), QDQ format. Only the matrix products are quantised (MatMul, Gemm, Conv):
they carry nearly all the FLOPs of a ViT, while quantising softmax / layer-norm / residual adds
costs accuracy and adds Q/DQ pairs that onnxruntime cannot fuse.
Order of "auto": dynamic → static → dynamic-weights, the measured speed order on both bundled
models (README, "CPU engine benchmark"): dynamic was the fastest every time; static came first
until the conv-stem model, where it was accepted but only 1.27× onnxruntime fp32 at batch 1.
All start from onnxruntime's quantisation pre-processing (shape inference + graph optimisation).

Acceptance: the int8 model's scores must rank the validation images like the fp32 model's
(Spearman SRCC ≥ ``min_srcc``, default 0.99). Otherwise the int8 file is deleted and
``QuantizationRefused`` carries the numbers — a faster model that orders studies differently is
not the same model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from engines import names
from engines.errors import MediqaError
from export.verify import spearman

log = logging.getLogger(__name__)

DEFAULT_MIN_SRCC = 0.99
#: Tried in this order by method="auto" (fastest first, as measured); the first accepted one is kept.
METHODS = ("dynamic", "static", "dynamic-weights")
STATIC_OPS = ["MatMul", "Gemm", "Conv"]
DYNAMIC_OPS = ["MatMul", "Gemm"]


class QuantizationRefused(MediqaError):
    """The int8 model ranks the validation set too differently from the fp32 model."""

    code = "quantization_refused"


@dataclass
class QuantizeResult:
    path: Path | None      # None when refused
    method: str
    srcc: float
    score_max_abs: float
    n_val: int
    n_calib: int
    min_srcc: float
    accepted: bool
    seconds: float

    def summary(self) -> str:
        verdict = "accepted" if self.accepted else "REFUSED"
        return (f"int8 ({self.method}): score SRCC vs fp32 {self.srcc:.4f} (need ≥ {self.min_srcc}), "
                f"max|Δscore| {self.score_max_abs:.3e} on {self.n_val} validation images "
                f"[calibrated on {self.n_calib}] → {verdict}")


def calibration_batches(images: np.ndarray, prompts: np.ndarray, batch_size: int,
                        *, fill: bool = False) -> list[dict[str, np.ndarray]]:
    """Split (N, 3, S, S) images and (N, P) prompts into feed dicts of ``batch_size``.

    ``fill=False`` keeps a short last batch (onnxruntime accepts any batch); ``fill=True`` makes
    every batch exactly ``batch_size`` by wrapping around to the first images (engines calibrated at
    a fixed profile shape need that). Raises ValueError on empty or mismatched inputs.
    """
    n = len(images)
    if n == 0 or len(prompts) != n:
        raise ValueError(f"need matching non-empty images and prompts, got {n} and {len(prompts)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    out = []
    for i in range(0, n, batch_size):
        idx = np.arange(i, i + batch_size)
        if not fill:
            idx = idx[idx < n]
        idx = idx % n
        out.append({names.IMAGES: np.ascontiguousarray(images[idx], dtype=np.float32),
                    names.PROMPT: np.ascontiguousarray(prompts[idx], dtype=np.float32)})
    return out


def accept_quantized(ref_scores: np.ndarray, q_scores: np.ndarray,
                     min_srcc: float = DEFAULT_MIN_SRCC) -> tuple[bool, float, float]:
    """(accepted, SRCC, max |Δ|) of int8 scores vs fp32 scores on the same validation images.

    NaN SRCC (fewer than 3 images, or constant scores) is never accepted: nothing was shown.
    """
    ref = np.asarray(ref_scores, dtype=np.float64).ravel()
    q = np.asarray(q_scores, dtype=np.float64).ravel()
    if ref.shape != q.shape:
        raise ValueError(f"score arrays differ in shape: {ref.shape} vs {q.shape}")
    srcc = spearman(ref, q)
    max_abs = float(np.abs(ref - q).max(initial=0.0)) if ref.size else float("nan")
    return bool(srcc >= min_srcc), srcc, max_abs


def _reader(batches: Sequence[dict[str, np.ndarray]], input_names: set[str]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _SampleReader(CalibrationDataReader):
        """Feeds the calibration batches once; ``rewind`` starts over."""

        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(())
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter([{k: v for k, v in b.items() if k in input_names} for b in batches])

    return _SampleReader()


def _session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _scores(path: Path, images: np.ndarray, prompts: np.ndarray, batch: int = 8) -> np.ndarray:
    sess = _session(path)
    out = [sess.run([names.SCORE], b)[0] for b in calibration_batches(images, prompts, batch)]
    return np.concatenate(out).astype(np.float32)


def _copy_metadata(src: Path, dst: Path) -> None:
    """Carry the fp32 model's metadata_props (the card) into the quantised file."""
    import onnx

    s = onnx.load(str(src), load_external_data=False)
    d = onnx.load(str(dst))
    have = {p.key for p in d.metadata_props}
    for p in s.metadata_props:
        if p.key not in have:
            e = d.metadata_props.add()
            e.key, e.value = p.key, p.value
    onnx.save(d, str(dst))


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs one INFO line per tensor (and generic advice as WARNING) on the
    root logger; mute it meanwhile. Only onnxruntime code runs inside this context."""
    root = logging.getLogger()
    level = root.level
    if level < logging.ERROR:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def _preprocessed(src: Path) -> Iterator[Path]:
    """onnxruntime's quantisation pre-processing (shape inference + graph optimisation), which
    gives the quantiser fused, fully shaped nodes; the original graph when it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        except Exception as exc:  # symbolic shape inference does not know every op; optional step
            log.info("quantisation pre-processing skipped (%s)", exc)
            pre = src
        yield pre


def _quantize_static(src: Path, dst: Path, batches: list[dict[str, np.ndarray]], calibrate: str) -> None:
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_static)

    inputs = {i.name for i in onnx.load(str(src), load_external_data=False).graph.input}
    with _preprocessed(src) as pre:
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[calibrate]
        quantize_static(str(pre), str(dst), _reader(batches, inputs), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=STATIC_OPS, calibrate_method=method,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                                       "CalibMovingAverage": calibrate == "minmax"})


def _quantize_dynamic(src: Path, dst: Path, *, weights_only: bool = False) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _preprocessed(src) as pre:
        # weights_only=False quantises the activation × activation products of attention too
        # (Q·Kᵀ, A·V, the channel attention): a third of the weights-only int8 graph's time was
        # left in them in fp32 (onnxruntime's profiler, batch 1). It perturbs scores more, so
        # the weights-only variant is the next candidate when it is refused.
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=DYNAMIC_OPS,
                         extra_options={"MatMulConstBOnly": weights_only})


def quantize_onnx(fp32_path: str | Path, out_path: str | Path, *, calib_images: np.ndarray,
                  calib_prompts: np.ndarray, val_images: np.ndarray, val_prompts: np.ndarray,
                  method: str = "auto", min_srcc: float = DEFAULT_MIN_SRCC, calibrate: str = "minmax",
                  calib_batch: int = 8, raise_on_refuse: bool = True) -> QuantizeResult:
    """Quantise a MedIQA 2D graph to int8 and accept it only if validation SRCC ≥ ``min_srcc``.

    ``method``: "dynamic" (every MatMul) | "static" | "dynamic-weights" (MatMuls with a weight
    operand only) | "auto" (that order; the first accepted one is kept).
    Images (N, 3, S, S) float32 preprocessed; prompts (N, P) float32. Calibration and validation
    sets should be different images. Returns the accepted result; when every method is refused,
    raises ``QuantizationRefused`` (or returns the last refused result if ``raise_on_refuse`` is
    False). A refused int8 file is deleted.
    """
    src, dst = Path(fp32_path), Path(out_path)
    tries = list(METHODS) if method == "auto" else [method]
    if any(m not in METHODS for m in tries):
        raise ValueError(f"method must be 'auto' or one of {METHODS}, got {method!r}")
    ref = _scores(src, val_images, val_prompts)
    batches = calibration_batches(calib_images, calib_prompts, calib_batch)
    results: list[QuantizeResult] = []
    for m in tries:
        t0 = time.perf_counter()
        try:
            with _quiet_root_logger():
                if m == "static":
                    _quantize_static(src, dst, batches, calibrate)
                else:
                    _quantize_dynamic(src, dst, weights_only=(m == "dynamic-weights"))
            _copy_metadata(src, dst)
            q = _scores(dst, val_images, val_prompts)
        except Exception as exc:
            if len(tries) == 1:
                raise
            log.warning("int8 %s quantisation failed (%s: %s); trying the next method", m, type(exc).__name__, exc)
            continue
        ok, srcc, max_abs = accept_quantized(ref, q, min_srcc)
        res = QuantizeResult(dst if ok else None, m, srcc, max_abs, len(val_images), len(calib_images),
                             min_srcc, ok, time.perf_counter() - t0)
        results.append(res)
        (log.info if ok else log.warning)("%s", res.summary())
        if ok:
            return res
        dst.unlink(missing_ok=True)
    if not results:
        raise QuantizationRefused(f"int8 quantisation of {src.name} failed with every method {tries}")
    msg = "int8 model refused: " + " | ".join(r.summary() for r in results)
    if raise_on_refuse:
        raise QuantizationRefused(msg)
    return results[-1]
