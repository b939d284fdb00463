"""CPU int8: the SRCC acceptance rule (pure), static QDQ per-channel graphs calibrated on real
images, dynamic fallback, refusal with the numbers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from engines import names
from engines.artifact import ModelCard, load_card
from engines.backends import open_backend
from engines.models.presets import get_preset
from engines.models.registry import create_classifier, create_model
from engines.preprocess import PreprocessConfig
from engines.prompts import DEFAULT_VOCAB
from export.onnx import torch_to_onnx
from export.quantize import QuantizationRefused, accept_quantized, quantize_onnx
from export.samples import sample_set


def test_accept_rule_pure():
    ref = np.linspace(0.1, 0.9, 20)
    ok, srcc, mx = accept_quantized(ref, ref + 0.01)
    assert ok and srcc == pytest.approx(1.0) and mx == pytest.approx(0.01)
    noisy = ref.copy()
    noisy[[3, 4]] = noisy[[4, 3]]          # one swapped pair: SRCC just below 1
    ok, srcc, _ = accept_quantized(ref, noisy, min_srcc=0.999)
    assert not ok and 0.99 < srcc < 0.999
    assert accept_quantized(ref, noisy, min_srcc=0.99)[0]
    assert not accept_quantized(ref, ref[::-1])[0]
    ok, srcc, _ = accept_quantized(np.ones(5), np.ones(5))
    assert not ok and np.isnan(srcc)      # constant scores prove nothing
    with pytest.raises(ValueError):
        accept_quantized(ref, ref[:5])


def _fitted_model(s) -> torch.nn.Module:
    """The tiny preset after 60 Adam steps of regressing each sample's known degradation (less noise
    and blur = higher quality), so that its scores spread with image quality as a trained model's
    do. A random network scores all images nearly alike, and int8 rounding then reorders near-ties
    (SRCC 0.98 against the 0.99 gate with onnx 1.23.2 / scikit-image 0.26 / Pillow 13)."""
    import re

    q = []
    for label in s.labels:
        noise, blur = (float(v) for v in re.findall(r"(?:noise|blur)=([0-9.]+)", label))
        q.append(1.0 - min(1.0, 3.0 * noise + blur / 5.0))
    model = create_model("mediqa-test", DEFAULT_VOCAB.size)
    x, p, y = torch.from_numpy(s.images), torch.from_numpy(s.prompts), torch.tensor(q)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x, p)[0].flatten(), y)
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    torch.manual_seed(0)
    p = get_preset("mediqa-test")
    card = ModelCard(task="iqa", preset="mediqa-test", prompt_vocab=DEFAULT_VOCAB.to_dict(),
                     preprocess=p.preprocess_config().to_dict(), label_scale={"min": 0, "max": 1, "name": "q"},
                     classifier_preset="mediqa-test")
    s = sample_set(42, cfg=PreprocessConfig(image_size=64))
    torch_to_onnx(_fitted_model(s), d / "model.onnx", graph="2d", card=card,
                  image_size=64, prompt_dim=DEFAULT_VOCAB.size, dynamo=False)
    torch_to_onnx(create_classifier("mediqa-test", DEFAULT_VOCAB), d / "model.classifier.onnx", graph="classifier",
                  card=card, image_size=64, dynamo=False)
    split = dict(calib_images=s.images[0::2], calib_prompts=s.prompts[0::2],
                 val_images=s.images[1::2], val_prompts=s.prompts[1::2])
    return d, card, split


def test_static_qdq_per_channel_graph(fp32, tmp_path):
    d, card, split = fp32
    out = tmp_path / "model.int8.onnx"
    r = quantize_onnx(d / "model.onnx", out, method="static", min_srcc=-1.0, **split)
    assert r.accepted and r.method == "static" and r.n_calib == len(split["calib_images"])
    m = onnx.load(str(out))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    per_channel = [n for n in m.graph.node if n.op_type == "DequantizeLinear"
                   and any(a.name == "axis" for a in n.attribute)]
    assert per_channel, "weights should be quantised per output channel"
    inits = {i.name: i for i in m.graph.initializer}
    assert any(i.data_type == onnx.TensorProto.INT8 for i in inits.values())
    assert load_card(out) == card          # the card follows into the int8 file
    assert np.isfinite(r.srcc) and r.srcc > 0.5  # reported against the fp32 scores on real images


def test_dynamic_int8_accepted_and_served(fp32, tmp_path):
    d, card, split = fp32
    out = d / "model.int8.onnx"
    r = quantize_onnx(d / "model.onnx", out, method="dynamic", **split)
    assert r.accepted and r.srcc >= 0.99 and r.path == out and out.exists()
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}
    # Served through the backend in the acceptance check's batches of 8: dynamic int8 picks its
    # activation scales per batch, so other batchings move the (near-tied) scores of this random
    # model and are not what was accepted (README, "int8").
    imgs, prm = split["val_images"], split["val_prompts"]
    with open_backend(out) as b:            # shares the fp32 classifier next to it
        assert b.has_classifier
        got = np.concatenate([b.score(imgs[i:i + 8], prm[i:i + 8])[names.SCORE] for i in range(0, len(imgs), 8)])
    with open_backend(d / "model.onnx") as f:
        ref = np.concatenate([f.score(imgs[i:i + 8], prm[i:i + 8])[names.SCORE] for i in range(0, len(imgs), 8)])
    ok, srcc, _ = accept_quantized(ref, got)
    assert ok and srcc == pytest.approx(r.srcc, abs=1e-9)


def test_dynamic_quantises_attention_products_weights_variant_does_not(fp32, tmp_path):
    """"dynamic" also quantises the activation × activation MatMuls (attention); the
    "dynamic-weights" fallback leaves them in fp32, so it has fp32 MatMuls left."""
    d, _, split = fp32
    graphs = {}
    for m in ("dynamic", "dynamic-weights"):
        out = tmp_path / f"{m}.onnx"
        quantize_onnx(d / "model.onnx", out, method=m, min_srcc=-1.0, **split)
        graphs[m] = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert graphs["dynamic"].count("MatMul") < graphs["dynamic-weights"].count("MatMul")
    assert graphs["dynamic"].count("MatMulInteger") > graphs["dynamic-weights"].count("MatMulInteger")


def test_refused_with_numbers_when_threshold_unreachable(fp32, tmp_path):
    d, _, split = fp32
    out = tmp_path / "model.int8.onnx"
    with pytest.raises(QuantizationRefused) as ei:
        quantize_onnx(d / "model.onnx", out, method="auto", min_srcc=1.01, **split)
    msg = str(ei.value)
    assert "static" in msg and "dynamic" in msg and "dynamic-weights" in msg and "SRCC" in msg and "1.01" in msg
    assert msg.index("(dynamic)") < msg.index("(static)") < msg.index("(dynamic-weights)")   # tried fastest first
    assert ei.value.code == "quantization_refused"
    assert not out.exists()                 # a refused model is not left behind
    r = quantize_onnx(d / "model.onnx", out, method="dynamic", min_srcc=1.01, raise_on_refuse=False, **split)
    assert not r.accepted and r.path is None and 0 < r.srcc < 1.01


def test_auto_keeps_the_first_accepted_in_speed_order(fp32, tmp_path):
    d, _, split = fp32
    r = quantize_onnx(d / "model.onnx", tmp_path / "auto.onnx", method="auto", min_srcc=-1.0, **split)
    assert r.accepted and r.method == "dynamic"
