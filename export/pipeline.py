"""``export_model``: one checkpoint → ONNX graphs, optional CPU int8, optional TensorRT engines,
each verified against the PyTorch model on the same real preprocessed inputs.

Layout written to ``out_dir`` (DESIGN §4 / docs/INTERFACES.md):

- ``model.onnx`` (2D graph), ``model.3d.onnx``, ``model.classifier.onnx`` (when the artifact has one)
- ``model.int8.onnx`` (``int8=True``; uses ``model.classifier.onnx`` for the classifier)
- ``model.<precision>.engine``, ``model.3d.<precision>.engine``, ``model.classifier.<precision>.engine`` (``trt=True``)

Every artifact is checked: fp32 ONNX must match torch within 1e-4 on scores (``export.verify``),
int8 must keep SRCC ≥ 0.99 (``export.quantize``), engines must pass the precision's tolerance.
Validation images are real samples (``export.samples``); calibration uses other images than
validation (even / odd split of the sample list).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.backends.engine_header import BatchProfile
from engines.errors import UnsupportedArtifact

log = logging.getLogger(__name__)

GRAPH_FILES = {"2d": "model.onnx", "3d": "model.3d.onnx", "classifier": "model.classifier.onnx"}


@dataclass
class ArtifactInfo:
    kind: str              # "onnx 2d", "onnx int8", "engine fp16 2d", ...
    path: Path | None
    size_bytes: int
    seconds: float
    parity: str = ""
    note: str = ""


@dataclass
class ExportReport:
    source: Path
    out_dir: Path
    artifacts: list[ArtifactInfo] = field(default_factory=list)
    parity: list[Any] = field(default_factory=list)        # export.verify.ParityReport
    quantization: Any = None                                 # export.quantize.QuantizeResult
    refused: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused




def export_model(model_path: str | Path, out_dir: str | Path, *, onnx: bool = True, trt: bool = False,
                 int8: bool = False, precision: str = "fp16", batch: BatchProfile = BatchProfile(1, 8, 32),
                 workspace_gb: float = 4.0, opset: int = 18, dynamo: bool | None = None,
                 n_samples: int | None = None, timing_cache: str | Path | None = None,
                 cache_dir: str | Path | None = None) -> ExportReport:
    """Export ``model_path`` (a ``.safetensors`` artifact) as asked; raise ``ParityError`` on an
    artifact that disagrees with the torch model. A refused int8 model is recorded in
    ``report.refused`` (with the numbers) and not written."""
    import numpy as np

    from engines.backends.onnxruntime_backend import OnnxRuntimeBackend
    from engines.backends.torch_backend import TorchBackend
    from engines.models.loading import load_artifact
    from engines.preprocess import PreprocessConfig
    from engines.prompts import PromptVocab
    from export.onnx import torch_to_onnx
    from export.quantize import QuantizationRefused, quantize_onnx
    from export.samples import sample_set, sample_volumes
    from export.verify import compare_backends

    src = Path(model_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_artifact(src)
    if loaded.iqa is None:
        raise UnsupportedArtifact(f"{src.name} holds only a prompt classifier; export it together with its IQA model")
    card = loaded.card
    vocab = PromptVocab.from_dict(card.prompt_vocab)
    cfg = PreprocessConfig.from_dict(card.preprocess)
    report = ExportReport(src, out)

    samples = sample_set(n_samples, cfg=cfg, vocab=vocab)
    n_vol = 4
    volumes, vol_prompts = sample_volumes(n_vol, card.n_slices, cfg=cfg, vocab=vocab, seed=7)
    calib = (samples.images[0::2], samples.prompts[0::2])
    val = (samples.images[1::2], samples.prompts[1::2])
    log.info("export samples: %d images from %s", len(samples), ", ".join(samples.sources))

    ref = TorchBackend.from_modules(loaded.iqa, card, loaded.classifier)
    onnx_dir = out if onnx else Path(tempfile.mkdtemp(prefix="mediqa-onnx-"))
    need_onnx = onnx or trt or int8
    if need_onnx:
        graphs = [("2d", loaded.iqa), ("3d", loaded.iqa)]
        if loaded.classifier is not None:
            graphs.append(("classifier", loaded.classifier))
        for graph, module in graphs:
            r = torch_to_onnx(module, onnx_dir / GRAPH_FILES[graph], graph=graph, card=card,
                              image_size=cfg.image_size, prompt_dim=vocab.size, n_slices=card.n_slices,
                              opset=opset, dynamo=dynamo)
            if onnx:
                report.artifacts.append(ArtifactInfo(f"onnx {graph}", r.path, r.size_bytes, r.seconds,
                                                     note=f"{r.exporter} exporter, opset {r.opset}"))
        with OnnxRuntimeBackend(onnx_dir / GRAPH_FILES["2d"], card=card) as ort_b:
            reps = compare_backends(ref, ort_b, samples.images, samples.prompts, volumes=volumes,
                                    volume_prompts=vol_prompts, precision="fp32")
        report.parity.extend(reps)
        by_graph = {r.graph: r for r in reps}
        for a in report.artifacts:
            g = a.kind.split()[-1]
            if g in by_graph:
                rep = by_graph[g]
                a.parity = f"max|Δ| {max(d.max_abs for d in rep.diffs.values()):.1e}" + (
                    f", SRCC {rep.score_srcc:.4f}" if not np.isnan(rep.score_srcc) else "")

    if int8:
        t0 = time.perf_counter()
        dst = out / "model.int8.onnx"
        try:
            q = quantize_onnx(onnx_dir / GRAPH_FILES["2d"], dst, calib_images=calib[0], calib_prompts=calib[1],
                              val_images=val[0], val_prompts=val[1])
            report.quantization = q
            report.artifacts.append(ArtifactInfo("onnx int8 2d", dst, dst.stat().st_size, time.perf_counter() - t0,
                                                 parity=f"SRCC {q.srcc:.4f}, max|Δ| {q.score_max_abs:.1e}",
                                                 note=f"{q.method} quantisation"))
        except QuantizationRefused as exc:
            report.refused.append(exc.message)
            report.artifacts.append(ArtifactInfo("onnx int8 2d", None, 0, time.perf_counter() - t0,
                                                 note="REFUSED: " + exc.message))

    if trt:
        from engines.backends.tensorrt_backend import TensorRTBackend
        from export.tensorrt import build_engine

        tc = Path(timing_cache) if timing_cache else out / "trt.timing.cache"
        engines_built = []
        for graph in ("2d", "3d", "classifier"):
            src_onnx = onnx_dir / GRAPH_FILES[graph]
            if not src_onnx.exists():
                continue
            name = GRAPH_FILES[graph].replace(".onnx", f".{precision}.engine")
            b = build_engine(src_onnx, out / name, graph=graph, precision=precision, profile=batch,
                             workspace_gb=workspace_gb, timing_cache=tc, calib_images=calib[0],
                             calib_prompts=calib[1], cache_dir=cache_dir)
            engines_built.append(b)
            report.artifacts.append(ArtifactInfo(f"engine {precision} {graph}", b.path, b.size_bytes, b.seconds,
                                                 note="cached (unchanged model)" if b.cached else f"profile {b.profile}"))
        with TensorRTBackend(out / GRAPH_FILES["2d"].replace(".onnx", f".{precision}.engine")) as trt_b:
            reps = compare_backends(ref, trt_b, samples.images, samples.prompts, volumes=volumes,
                                    volume_prompts=vol_prompts, precision=precision)
        report.parity.extend(reps)
        by_graph = {r.graph: r for r in reps}
        for a in report.artifacts:
            if a.kind.startswith("engine") and a.kind.split()[-1] in by_graph:
                rep = by_graph[a.kind.split()[-1]]
                a.parity = f"max|Δ| {max(d.max_abs for d in rep.diffs.values()):.1e}, SRCC {rep.score_srcc:.4f}"
    ref.close()
    return report
