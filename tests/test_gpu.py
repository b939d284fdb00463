"""GPU checks: torch CUDA backend vs CPU (fp32 / fp16 / bf16) and TensorRT engines.

``gpu``: skipped where torch sees no CUDA GPU. ``trt``: skipped where the ``tensorrt`` package is
not importable (it is not installable in this workplace; the skip is the honest result here).
Nothing here imports pydicom: samples fall back to the scikit-image images on machines without it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from engines.artifact import ModelCard
from engines.models.presets import get_preset
from engines.models.registry import create_classifier, create_model
from engines.preprocess import PreprocessConfig
from engines.prompts import DEFAULT_VOCAB
from export.samples import sample_set, sample_volumes
from export.verify import compare_backends

HAS_CUDA = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible to torch")
needs_trt = pytest.mark.skipif(not (HAS_CUDA and HAS_TRT), reason="tensorrt not importable or no CUDA GPU")


def _model(preset: str):
    torch.manual_seed(0)
    p = get_preset(preset)
    card = ModelCard(task="iqa", preset=preset, prompt_vocab=DEFAULT_VOCAB.to_dict(),
                     preprocess=p.preprocess_config().to_dict(), label_scale={"min": 0, "max": 1, "name": "q"},
                     classifier_preset=preset)
    return (create_model(preset, DEFAULT_VOCAB.size).eval(), create_classifier(preset, DEFAULT_VOCAB).eval(), card)


@pytest.fixture
def no_tf32():
    """fp32 parity means fp32: PyTorch lets cuDNN convolutions use TF32 by default."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("preset", ["mediqa-test", "mediqa-vitt16"])
def test_torch_cuda_fp32_matches_cpu(preset, no_tf32):
    from engines.backends.torch_backend import TorchBackend

    iqa, cls, card = _model(preset)
    cfg = PreprocessConfig.from_dict(card.preprocess)
    s = sample_set(24, cfg=cfg)
    vols, vp = sample_volumes(2, card.n_slices, cfg=cfg)
    cpu = TorchBackend.from_modules(iqa, card, cls)
    import copy

    gpu = TorchBackend.from_modules(copy.deepcopy(iqa), card, copy.deepcopy(cls), device="cuda")
    reports = compare_backends(cpu, gpu, s.images, s.prompts, volumes=vols, volume_prompts=vp, precision="fp32")
    assert {r.graph for r in reports} == {"2d", "3d", "classifier"}
    assert all(r.passed for r in reports)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_cuda_autocast_within_tolerance(precision):
    import copy

    from engines.backends.torch_backend import TorchBackend

    iqa, cls, card = _model("mediqa-vitt16")
    s = sample_set(24, cfg=PreprocessConfig.from_dict(card.preprocess))
    ref = TorchBackend.from_modules(iqa, card, cls)
    half = TorchBackend.from_modules(copy.deepcopy(iqa), card, copy.deepcopy(cls), device="cuda", precision=precision)
    reports = compare_backends(ref, half, s.images, s.prompts, precision=precision)
    assert all(r.passed for r in reports)


@pytest.mark.trt
@needs_trt
def test_tensorrt_engine_build_parity_cache_and_refusal(tmp_path):
    from engines.backends import open_backend
    from engines.backends.engine_header import BatchProfile, pack_engine, unpack_engine
    from engines.backends.torch_backend import TorchBackend
    from engines.errors import UnsupportedArtifact
    from export.onnx import torch_to_onnx
    from export.tensorrt import build_engine

    iqa, cls, card = _model("mediqa-test")
    for g, f, m in (("2d", "model.onnx", iqa), ("classifier", "model.classifier.onnx", cls)):
        torch_to_onnx(m, tmp_path / f, graph=g, card=card, image_size=64, prompt_dim=DEFAULT_VOCAB.size, dynamo=False)
    prof = BatchProfile(1, 4, 8)
    b1 = build_engine(tmp_path / "model.onnx", tmp_path / "model.fp16.engine", precision="fp16", profile=prof,
                      workspace_gb=1, timing_cache=tmp_path / "tc.bin")
    build_engine(tmp_path / "model.classifier.onnx", tmp_path / "model.classifier.fp16.engine", graph="classifier",
                 precision="fp16", profile=prof, workspace_gb=1, timing_cache=tmp_path / "tc.bin")
    assert not b1.cached and (tmp_path / "tc.bin").stat().st_size > 0
    b2 = build_engine(tmp_path / "model.onnx", tmp_path / "model.fp16.engine", precision="fp16", profile=prof,
                      workspace_gb=1, timing_cache=tmp_path / "tc.bin")
    assert b2.cached and b2.cache_key == b1.cache_key
    s = sample_set(20, cfg=PreprocessConfig(image_size=64))
    with TorchBackend.from_modules(iqa, card, cls) as ref, open_backend(tmp_path / "model.fp16.engine") as eng:
        assert eng.has_classifier and eng.max_batch == 8
        reports = compare_backends(ref, eng, s.images, s.prompts, precision="fp16")  # 20 > max 8: chunked
        assert all(r.passed for r in reports)
    header, plan = unpack_engine((tmp_path / "model.fp16.engine").read_bytes())
    header["compute_capability"] = "1.0"
    (tmp_path / "other.fp16.engine").write_bytes(pack_engine(header, bytes(plan)))
    with pytest.raises(UnsupportedArtifact, match="compute capability 1.0.*mediqa export"):
        open_backend(tmp_path / "other.fp16.engine")
