"""Backends: suffix → runtime, input checks, batching, torch precisions, onnxruntime provider
fallback warning, missing-runtime messages."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest
import torch

from engines import names
from engines.artifact import ModelCard, save_artifact
from engines.backends import open_backend
from engines.backends.auto import backend_for
from engines.backends.engine_header import BatchProfile, pack_engine
from engines.backends.onnxruntime_backend import OnnxRuntimeBackend, resolve_providers, sibling_graph
from engines.backends.torch_backend import TorchBackend
from engines.errors import BackendUnavailable, UnsupportedArtifact
from engines.models.presets import get_preset
from engines.models.registry import create_classifier, create_model
from engines.preprocess import PreprocessConfig
from engines.prompts import DEFAULT_VOCAB
from export.onnx import torch_to_onnx
from export.samples import sample_set

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
SIZE = 64


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    d = tmp_path_factory.mktemp("backends")
    torch.manual_seed(0)
    p = get_preset("mediqa-test")
    iqa = create_model("mediqa-test", DEFAULT_VOCAB.size).eval()
    cls = create_classifier("mediqa-test", DEFAULT_VOCAB).eval()
    card = ModelCard(task="iqa", preset="mediqa-test", prompt_vocab=DEFAULT_VOCAB.to_dict(),
                     preprocess=p.preprocess_config().to_dict(), label_scale={"min": 0, "max": 1, "name": "q"},
                     classifier_preset="mediqa-test")
    st = save_artifact(d / "model.safetensors", {"iqa": iqa, "classifier": cls}, card)
    # TorchScript exporter: fast; exporter parity itself is tested in test_export_onnx.py
    for g, fname in (("2d", "model.onnx"), ("classifier", "model.classifier.onnx")):
        torch_to_onnx(cls if g == "classifier" else iqa, d / fname, graph=g, card=card, image_size=SIZE,
                      prompt_dim=DEFAULT_VOCAB.size, dynamo=False)
    s = sample_set(20, cfg=PreprocessConfig(image_size=SIZE))
    return d, st, card, s


def test_auto_backend_by_suffix(art):
    d, st, card, s = art
    assert backend_for("x.safetensors") == "torch"
    assert backend_for("x.onnx") == "onnxruntime"
    assert backend_for("x.engine") == "tensorrt"
    with open_backend(st) as b:
        assert isinstance(b, TorchBackend) and b.card == card
    with open_backend(d / "model.onnx") as b:
        assert isinstance(b, OnnxRuntimeBackend) and b.card == card and b.has_classifier
        assert not b.has_volume_graph and b.score_volume(np.zeros((1, 7, 3, SIZE, SIZE), np.float32),
                                                         s.prompts[:1]) is None
    with pytest.raises(UnsupportedArtifact, match="unknown model file type"):
        backend_for("model.pt")
    with pytest.raises(UnsupportedArtifact, match="cannot run .onnx"):
        open_backend(d / "model.onnx", backend="torch")
    with pytest.raises(UnsupportedArtifact, match="not found"):
        open_backend(d / "missing.onnx")


def test_torch_and_onnxruntime_agree_via_open_backend(art):
    d, st, _, s = art
    with open_backend(st) as a, open_backend(d / "model.onnx", threads=1) as b:
        ra, rb = a.score(s.images, s.prompts), b.score(s.images, s.prompts)
        assert set(ra) == {names.SCORE, names.SLICE_LOGIT} and ra[names.SCORE].dtype == np.float32
        np.testing.assert_allclose(ra[names.SCORE], rb[names.SCORE], atol=1e-5)
        ca, cb = a.classify(s.images), b.classify(s.images)
        assert set(ca) == set(names.CLASSIFIER_OUTPUTS)
        for k in ca:
            np.testing.assert_allclose(ca[k], cb[k], atol=1e-4)


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here; the missing-runtime path cannot be shown")
def test_tensorrt_missing_names_install_line(tmp_path):
    p = tmp_path / "model.fp16.engine"
    p.write_bytes(pack_engine({"card": {}, "profile": BatchProfile().to_dict()}, b"PLAN"))
    with pytest.raises(BackendUnavailable) as ei:
        open_backend(p)
    assert "pip install 'mediqa[trt]'" in str(ei.value) and ei.value.code == "backend_unavailable"


def test_input_checks(art):
    _, st, _, s = art
    with open_backend(st) as b:
        with pytest.raises(TypeError, match="float32"):
            b.score(s.images.astype(np.float64), s.prompts)
        with pytest.raises(ValueError, match=r"\(N, 3, 64, 64\)"):
            b.score(s.images[:, :, :32], s.prompts)
        with pytest.raises(ValueError, match="batch sizes differ"):
            b.score(s.images[:3], s.prompts[:2])
        with pytest.raises(ValueError, match=r"\(N, 29\)"):
            b.score(s.images, s.prompts[:, :5])
        with pytest.raises(TypeError, match="numpy"):
            b.score(torch.from_numpy(s.images), s.prompts)
        with pytest.raises(ValueError, match="empty"):
            b.score(s.images[:0], s.prompts[:0])
    with pytest.raises(RuntimeError, match="closed"):
        b.score(s.images, s.prompts)


def test_chunking_and_min_batch_padding(art):
    d, _, _, s = art
    with open_backend(d / "model.onnx") as b:
        full = b.score(s.images, s.prompts)
        b.max_batch = 3          # as a TensorRT profile max would
        chunked = b.score(s.images, s.prompts)
        b.max_batch, b.min_batch = None, 4   # and a profile min: batch 2 is padded then cut
        small = b.score(s.images[:2], s.prompts[:2])
    np.testing.assert_allclose(chunked[names.SCORE], full[names.SCORE], atol=1e-6)
    assert small[names.SCORE].shape == (2,)
    np.testing.assert_allclose(small[names.SCORE], full[names.SCORE][:2], atol=1e-6)


def test_torch_bf16_autocast_close_to_fp32(art):
    _, st, _, s = art
    with open_backend(st) as f32, open_backend(st, precision="bf16") as bf:
        a, b = f32.score(s.images, s.prompts), bf.score(s.images, s.prompts)
        assert "bf16" in bf.describe()
    assert b[names.SCORE].dtype == np.float32
    scale = max(1e-3, float(np.abs(a[names.SCORE]).max()))
    assert np.abs(a[names.SCORE] - b[names.SCORE]).max() <= 0.1 * scale
    with pytest.raises(ValueError, match="precision"):
        open_backend(st, precision="int4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_torch_cuda_without_gpu_is_unavailable(art):
    with pytest.raises(BackendUnavailable, match="CUDA"):
        open_backend(art[1], device="cuda")


def test_onnxruntime_requested_cuda_falls_back_with_warning(art, caplog):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the CPU fallback path cannot be shown")
    d, _, _, s = art
    with caplog.at_level(logging.WARNING, logger="engines.backends.onnxruntime_backend"):
        with open_backend(d / "model.onnx", device="cuda", providers=["cuda"]) as b:
            assert b.providers == ["CPUExecutionProvider"]
            assert b.score(s.images[:2], s.prompts[:2])[names.SCORE].shape == (2,)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("CUDAExecutionProvider" in m and "mediqa[gpu]" in m for m in msgs), msgs


def test_resolve_providers_pure(caplog):
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, "cuda", avail) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["trt", "cuda"], "cuda", avail) == avail
    assert resolve_providers(None, "cpu", avail) == ["CPUExecutionProvider"]
    with caplog.at_level(logging.WARNING):
        assert resolve_providers(["tensorrt"], "cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert "TensorrtExecutionProvider" in caplog.text


def test_sibling_graphs(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "model.classifier.onnx").write_bytes(b"")
    assert sibling_graph(tmp_path / "model.onnx", "classifier") == tmp_path / "model.classifier.onnx"
    assert sibling_graph(tmp_path / "model.int8.onnx", "classifier") == tmp_path / "model.classifier.onnx"
    assert sibling_graph(tmp_path / "model.onnx", "3d") is None


def test_no_classifier_gives_none(tmp_path):
    torch.manual_seed(0)
    p = get_preset("mediqa-test")
    iqa = create_model("mediqa-test", DEFAULT_VOCAB.size).eval()
    card = ModelCard(task="iqa", preset="mediqa-test", prompt_vocab=DEFAULT_VOCAB.to_dict(),
                     preprocess=p.preprocess_config().to_dict(), label_scale={"min": 0, "max": 1, "name": "q"})
    st = save_artifact(tmp_path / "m.safetensors", {"iqa": iqa}, card)
    s = sample_set(2, cfg=PreprocessConfig(image_size=SIZE), degrade=False)
    with open_backend(st) as b:
        assert b.classify(s.images) is None
        vol = np.stack([s.images] * 7, axis=1)[:1]
        out = b.score_volume(np.ascontiguousarray(vol), s.prompts[:1])
        assert out[names.SLICE_WEIGHTS].shape == (1, 7)
        np.testing.assert_allclose(out[names.SLICE_WEIGHTS].sum(1), 1.0, atol=1e-5)


def test_classifier_only_artifact_is_refused_by_the_torch_backend(tmp_path) -> None:
    """A prompt-classifier artifact cannot score: a clear UnsupportedArtifact, not an AttributeError."""
    import pytest

    from engines.artifact import ModelCard, save_artifact
    from engines.backends.torch_backend import TorchBackend
    from engines.errors import UnsupportedArtifact
    from engines.models.presets import get_preset
    from engines.models.registry import create_classifier
    from engines.prompts import DEFAULT_VOCAB

    preset = get_preset("mediqa-test")
    card = ModelCard(task="classifier", preset=preset.name, prompt_vocab=DEFAULT_VOCAB.to_dict(),
                     preprocess=preset.preprocess_config().to_dict(), label_scale={"min": 0, "max": 1, "name": "q"},
                     classifier_preset=preset.name)
    path = tmp_path / "cls.safetensors"
    save_artifact(path, {"classifier": create_classifier(preset.name, DEFAULT_VOCAB)}, card)
    with pytest.raises(UnsupportedArtifact, match="only a prompt classifier"):
        TorchBackend(path)


def test_tta_wraps_onnxruntime_like_torch(art):
    """``--tta d4`` around onnxruntime gives torch's TTA outputs; the wrapper offers fused volumes
    even though this ONNX artifact has no 3D graph."""
    from engines.tta import with_tta

    d, st, _, s = art
    with with_tta(open_backend(st), "d4") as a, with_tta(open_backend(d / "model.onnx", threads=1), "d4") as b:
        ra, rb = a.score(s.images[:6], s.prompts[:6]), b.score(s.images[:6], s.prompts[:6])
        for k in (names.SCORE, names.SLICE_LOGIT):
            np.testing.assert_allclose(ra[k], rb[k], rtol=1e-4, atol=1e-7)
        assert b.has_volume_graph and b.has_classifier
        vol = np.ascontiguousarray(np.resize(s.images[:7], (1, 7, 3, SIZE, SIZE)))
        va, vb = a.score_volume(vol, s.prompts[:1]), b.score_volume(vol, s.prompts[:1])
        np.testing.assert_allclose(va[names.SLICE_WEIGHTS], vb[names.SLICE_WEIGHTS], rtol=1e-4)
        assert "TTA d4 (8 copies)" in b.describe()


def test_tta_auto_policy_travels_into_onnx_and_applies_there(art, tmp_path):
    """A card's TTA policy is stored in the exported ONNX file's metadata, so ``--tta auto`` on the
    ONNX artifact applies the same per-modality modes as on the safetensors one."""
    import dataclasses

    from engines.artifact import load_card
    from engines.prompts import Prompt, encode_prompt
    from engines.tta import TTABackend, with_tta

    _, st, card, s = art
    pol_card = dataclasses.replace(card, tta_policy={"modes": {"xr": "d4"}})
    iqa = TorchBackend(st).iqa
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():   # a fresh head scores ~1e-6 everywhere: too flat to tell d4 from none
        for m in iqa.score_head.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.5)
                m.bias.fill_(0.5)
    for name, c in (("pol.onnx", pol_card), ("plain.onnx", card)):
        torch_to_onnx(iqa, tmp_path / name, graph="2d", card=c, image_size=SIZE,
                      prompt_dim=DEFAULT_VOCAB.size, dynamo=False)
    assert load_card(tmp_path / "pol.onnx").tta_policy == {"modes": {"xr": "d4"}}
    prompts = np.stack([encode_prompt(Prompt("2d", m), DEFAULT_VOCAB) for m in ("xr", "ct", "xr", "mr")])
    x = s.images[:4]
    with with_tta(open_backend(tmp_path / "pol.onnx", threads=1), "auto") as b, \
            open_backend(tmp_path / "plain.onnx", threads=1) as plain:
        assert isinstance(b, TTABackend) and "xr d4" in b.describe()
        got = b.score(x, prompts)[names.SCORE]
        want_none = plain.score(x, prompts)[names.SCORE]
        want_d4 = TTABackend(plain, "d4").score(x, prompts)[names.SCORE]   # closing it would close plain
    np.testing.assert_allclose(got[[0, 2]], want_d4[[0, 2]], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got[[1, 3]], want_none[[1, 3]], rtol=1e-4, atol=1e-7)
    # d4 really differs from none here, so the two checks above tell the modes apart
    assert (np.abs(want_d4 - want_none)[[0, 2]] > 1e-3).all()
