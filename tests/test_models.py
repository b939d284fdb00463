"""Model tests on the tiny ``mediqa-test`` preset (64 × 64 input, 8 × 8 grid); one vitt16 check."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.errors import ConfigError, UnsupportedArtifact, UnsupportedInput
from engines.fusion import fuse_slice_scores
from engines.models.maniqa import EnsembleNet, MedIQANet, create_vit
from engines.models.presets import get_preset, list_presets
from engines.models.registry import count_parameters, create_classifier, create_model
from engines.models.swin import SwinBlock
from engines.prompts import DEFAULT_VOCAB, Prompt, encode_prompt

P = DEFAULT_VOCAB.size
S = get_preset("mediqa-test").image_size


def _prompts(*prompts: Prompt) -> torch.Tensor:
    return torch.from_numpy(np.stack([encode_prompt(p) for p in prompts]))


CT_CHEST = Prompt("2d", "ct", "chest", "lung")
MR_HEAD = Prompt("2d", "mr", "head", "t1")
CT_3D = Prompt("3d", "ct", "chest", "soft")


@pytest.fixture(scope="module")
def model() -> MedIQANet:
    torch.manual_seed(0)
    return create_model("mediqa-test", P).eval()


def _images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, S, S, generator=g)


def test_presets_registered_and_torch_free() -> None:
    assert set(list_presets()) == {"mediqa-vitb8", "mediqa-vits16", "mediqa-vitt16", "mediqa-vitt16-tex",
                                   "mediqa-vitt16-tex2", "mediqa-vitt16-tex2n", "mediqa-vitt16-tex2ns", "mediqa-test",
                                   "mediqa-test-tex", "mediqa-test-tex2", "mediqa-test-tex2n", "mediqa-test-tex2ns"}
    for name in ("mediqa-vitt16-tex", "mediqa-vitt16-tex2", "mediqa-vitt16-tex2n", "mediqa-vitt16-tex2ns",
                 "mediqa-test-tex", "mediqa-test-tex2", "mediqa-test-tex2n", "mediqa-test-tex2ns"):
        tex, base = get_preset(name), get_preset(get_preset(name).grows_from)
        assert tex.texture and not base.texture and base.grows_from is None
        assert dataclasses.replace(tex, name=base.name, description=base.description, texture=False,
                                   texture_scales=(1,), noise_term=False, sharpness_term=False,
                                   grows_from=None) == base
    assert get_preset("mediqa-vitt16-tex2").texture_scales == (1, 2)
    assert get_preset("mediqa-vitt16-tex2n").noise_term and not get_preset("mediqa-vitt16-tex2").noise_term
    assert get_preset("mediqa-vitt16-tex2ns").sharpness_term and not get_preset("mediqa-vitt16-tex2n").sharpness_term
    with pytest.raises(ConfigError, match="sharpness_term .* needs noise_term"):
        dataclasses.replace(get_preset("mediqa-vitt16-tex2"), sharpness_term=True).validate()
    with pytest.raises(ConfigError, match="texture_scales"):   # 3 does not divide the 4-px cell
        dataclasses.replace(get_preset("mediqa-vitt16-tex"), texture_scales=(1, 3)).validate()
    with pytest.raises(ConfigError, match="noise term needs"):  # the term reads scale 2
        dataclasses.replace(get_preset("mediqa-vitt16-tex"), noise_term=True).validate()
    b8 = get_preset("mediqa-vitb8")
    assert (b8.grid, b8.feature_channels, b8.widths, b8.window_size, b8.blocks) == (28, 3072, (768, 384), 4, (6, 7, 8, 9))
    assert get_preset("mediqa-vits16").grid == 14 and get_preset("mediqa-vitt16").grid == 14
    with pytest.raises(ConfigError, match="Did you mean 'mediqa-vitt16'"):
        get_preset("mediqa-vit16")
    code = ("import sys, engines.models, engines.models.presets as p; p.get_preset('mediqa-vitb8'); "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("n", [1, 3])
def test_shapes_2d(model: MedIQANet, n: int) -> None:
    with torch.no_grad():
        score, logit = model(_images(n), _prompts(*[CT_CHEST] * n))
    assert score.shape == (n,) and logit.shape == (n,)
    assert score.dtype == torch.float32 and torch.isfinite(score).all() and (score >= 0).all()


@pytest.mark.parametrize("n", [1, 3])
def test_shapes_3d_and_fusion_weights(model: MedIQANet, n: int) -> None:
    k = 7
    vols = _images(n * k).reshape(n, k, 3, S, S)
    with torch.no_grad():
        score, slice_scores, weights = model.forward_volume(vols, _prompts(*[CT_3D] * n))
    assert score.shape == (n,) and slice_scores.shape == (n, k) and weights.shape == (n, k)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(n), rtol=0, atol=1e-6)
    assert (weights > 0).all()


def test_forward_volume_equals_numpy_fusion(model: MedIQANet) -> None:
    n, k = 2, 7
    vols = _images(n * k, seed=5).reshape(n, k, 3, S, S)
    prompt = _prompts(CT_3D, Prompt("3d", "mr", "head", "t2"))
    with torch.no_grad():
        score, slice_scores, weights = model.forward_volume(vols, prompt)
        flat_s, flat_z = model(vols.reshape(n * k, 3, S, S), prompt.repeat_interleave(k, dim=0))
    for i in range(n):
        ref_score, ref_w = fuse_slice_scores(flat_s[i * k:(i + 1) * k].numpy(), flat_z[i * k:(i + 1) * k].numpy())
        np.testing.assert_allclose(slice_scores[i].numpy(), flat_s[i * k:(i + 1) * k].numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(weights[i].numpy(), ref_w, rtol=1e-5, atol=1e-7)
        assert score[i].item() == pytest.approx(ref_score, rel=1e-5, abs=1e-8)
    # and the slice logits actually differ, so the weights are not trivially uniform
    assert flat_z.std() > 0


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(3)
    net = create_model("mediqa-test", P).train()
    score, logit = net(_images(3), _prompts(CT_CHEST, MR_HEAD, CT_CHEST))
    vol_score, _, _ = net.forward_volume(_images(2 * 7, seed=2).reshape(2, 7, 3, S, S), _prompts(CT_3D, CT_3D))
    loss = ((score - 0.5) ** 2).mean() + ((vol_score - 0.7) ** 2).mean()
    loss.backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_prompt_changes_output(model: MedIQANet) -> None:
    x = _images(1).repeat(2, 1, 1, 1)
    with torch.no_grad():
        score, logit = model(x, _prompts(CT_CHEST, MR_HEAD))
    assert score[0] != score[1] and logit[0] != logit[1]


def test_eval_forward_is_deterministic(model: MedIQANet) -> None:
    x, p = _images(2), _prompts(CT_CHEST, MR_HEAD)
    with torch.no_grad():
        a = model(x, p)
        b = model(x, p)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# Golden outputs of mediqa-test (conv stem since 2026-11-28). Produced with torch 2.14.1 / timm 1.0.31 on CPU by:
#   torch.manual_seed(0); net = create_model("mediqa-test", 29).eval()
#   net(_images(2, seed=1), _prompts(CT_CHEST, MR_HEAD))  -> (score, slice_logit)
# They change when the architecture, the init order or the preset changes (then regenerate).
GOLDEN_SCORE = [4.403754701343132e-06, 2.4102928000502288e-04]
GOLDEN_LOGIT = [-4.285258240997791e-03, -9.148634038865566e-03]


def test_golden_output(model: MedIQANet) -> None:
    with torch.no_grad():
        score, logit = model(_images(2, seed=1), _prompts(CT_CHEST, MR_HEAD))
    np.testing.assert_allclose(score.numpy(), GOLDEN_SCORE, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(logit.numpy(), GOLDEN_LOGIT, rtol=1e-4, atol=1e-6)


def test_features_come_from_forward_intermediates_without_hooks(model: MedIQANet, monkeypatch) -> None:
    calls: list[dict] = []
    original = model.encoder.forward_intermediates

    def spy(x, **kw):
        calls.append(kw)
        return original(x, **kw)

    monkeypatch.setattr(model.encoder, "forward_intermediates", spy)
    with torch.no_grad():
        model(_images(1), _prompts(CT_CHEST))
    assert len(calls) == 1 and list(calls[0]["indices"]) == [0, 1, 2, 3] and calls[0]["intermediates_only"]
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
    # pruned encoder: no final norm / head, blocks only up to the last used index
    assert len(model.encoder.blocks) == 4 and isinstance(model.encoder.norm, torch.nn.Identity)


def test_shifted_window_mask_stops_wraparound_attention() -> None:
    # grid 8, window 4, shift 2: after rolling, original (0, 0) and (7, 7) share a window but
    # lie in different regions, so (7, 7) must not see (0, 0); (6, 6) is in its own region.
    torch.manual_seed(0)
    blk = SwinBlock(dim=8, grid=8, heads=2, window=4, shift=2, mlp_dim=16, drop_path=0.0).eval()
    x = torch.randn(1, 64, 8)
    bump = torch.randn(8) * 3  # not a constant: LayerNorm would erase a constant shift
    idx = lambda r, c: r * 8 + c  # noqa: E731
    with torch.no_grad():
        base = blk(x)
        far = x.clone(); far[0, idx(0, 0)] += bump
        near = x.clone(); near[0, idx(6, 6)] += bump
        out_far, out_near = blk(far), blk(near)
        torch.testing.assert_close(out_far[0, idx(7, 7)], base[0, idx(7, 7)])
        assert not torch.allclose(out_near[0, idx(7, 7)], base[0, idx(7, 7)])
        blk.attn_mask = None  # without the mask the wrap-around leaks
        assert not torch.allclose(blk(far)[0, idx(7, 7)], blk(x)[0, idx(7, 7)])


def test_input_validation(model: MedIQANet) -> None:
    with pytest.raises(UnsupportedInput, match="images must be"):
        model(torch.zeros(1, 3, S + 8, S + 8), _prompts(CT_CHEST))
    with pytest.raises(UnsupportedInput, match="prompt must be"):
        model(_images(1), torch.zeros(1, P - 1))
    with pytest.raises(UnsupportedInput, match="prompt must be"):
        model(_images(2), torch.zeros(1, P))
    with pytest.raises(UnsupportedInput, match="volumes must be"):
        model.forward_volume(_images(2), _prompts(CT_3D, CT_3D))


def test_ensemble_averages_members() -> None:
    torch.manual_seed(0)
    a, b = create_model("mediqa-test", P).eval(), create_model("mediqa-test", P).eval()
    ens = EnsembleNet([a, b]).eval()
    x, p = _images(2), _prompts(CT_CHEST, MR_HEAD)
    with torch.no_grad():
        sa, za = a(x, p)
        sb, zb = b(x, p)
        s, z = ens(x, p)
        torch.testing.assert_close(s, (sa + sb) / 2)
        torch.testing.assert_close(z, (za + zb) / 2)
        vol = _images(7, seed=9).reshape(1, 7, 3, S, S)
        score, ss, w = ens.forward_volume(vol, _prompts(CT_3D))
        ref, ref_w = fuse_slice_scores(ss[0].numpy(), ens(vol[0], _prompts(CT_3D).repeat(7, 1))[1].numpy())
    assert score.item() == pytest.approx(ref, rel=1e-5, abs=1e-8)


def test_classifier_shapes() -> None:
    torch.manual_seed(0)
    clf = create_classifier("mediqa-test", DEFAULT_VOCAB).eval()
    with torch.no_grad():
        mod, reg, typ = clf(_images(3))
    assert mod.shape == (3, len(DEFAULT_VOCAB.modality))
    assert reg.shape == (3, len(DEFAULT_VOCAB.region))
    assert typ.shape == (3, len(DEFAULT_VOCAB.type))


def test_init_weights_from_local_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    cfg = get_preset("mediqa-test")
    torch.manual_seed(11)
    full = create_vit(cfg.vit_name, cfg.image_size, cfg.vit_overrides)  # unpruned, like a timm checkpoint
    sd = {k: v.contiguous() for k, v in full.state_dict().items()}
    save_file(sd, str(tmp_path / "vit.safetensors"))
    torch.save({"model": sd}, tmp_path / "vit.pth")
    for f in ("vit.safetensors", "vit.pth"):
        torch.manual_seed(99)
        net = MedIQANet(cfg, P, init_weights=tmp_path / f)
        torch.testing.assert_close(net.encoder.blocks[3].mlp.fc2.weight, full.blocks[3].mlp.fc2.weight)
        torch.testing.assert_close(net.encoder.pos_embed, full.pos_embed)
    other = create_vit(cfg.vit_name, cfg.image_size, cfg.vit_overrides + (("embed_dim", 48),))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(UnsupportedArtifact, match="wrong shape"):
        MedIQANet(cfg, P, init_weights=tmp_path / "wrong.safetensors")
    with pytest.raises(ConfigError, match="not found"):
        MedIQANet(cfg, P, init_weights=tmp_path / "missing.safetensors")


def test_onnx_export_smoke(model: MedIQANet, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "m.onnx"
    x, p = _images(2), _prompts(CT_CHEST, MR_HEAD)
    torch.onnx.export(model, (x, p), str(path), dynamo=False, opset_version=17,
                      input_names=["images", "prompt"], output_names=["score", "slice_logit"],
                      dynamic_axes={"images": {0: "n"}, "prompt": {0: "n"}, "score": {0: "n"}, "slice_logit": {0: "n"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3, p3 = _images(3, seed=4), _prompts(CT_CHEST, MR_HEAD, CT_CHEST)
    got = sess.run(None, {"images": x3.numpy(), "prompt": p3.numpy()})
    with torch.no_grad():
        ref = model(x3, p3)
    np.testing.assert_allclose(got[0], ref[0].numpy(), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(got[1], ref[1].numpy(), rtol=1e-3, atol=1e-5)


class _VolumeGraph(torch.nn.Module):
    def __init__(self, net: MedIQANet) -> None:
        super().__init__()
        self.net = net

    def forward(self, volumes: torch.Tensor, prompt: torch.Tensor):
        return self.net.forward_volume(volumes, prompt)


def test_onnx_export_volume_graph_dynamic_n_and_k(model: MedIQANet, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "m3d.onnx"
    # eval() on the wrapper: export restores the wrapper's mode, which would re-enable dropout
    graph = _VolumeGraph(model).eval()
    vols = _images(2 * 7, seed=6).reshape(2, 7, 3, S, S)
    torch.onnx.export(graph, (vols, _prompts(CT_3D, CT_3D)), str(path), dynamo=False, opset_version=17,
                      input_names=["volumes", "prompt"], output_names=["score", "slice_scores", "slice_weights"],
                      dynamic_axes={"volumes": {0: "n", 1: "k"}, "prompt": {0: "n"}})
    assert not model.training
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    vols3 = _images(3 * 5, seed=8).reshape(3, 5, 3, S, S)  # other N and K than traced
    p3 = _prompts(CT_3D, Prompt("3d", "mr", "head", "t2"), CT_3D)
    got = sess.run(None, {"volumes": vols3.numpy(), "prompt": p3.numpy()})
    with torch.no_grad():
        ref = model.forward_volume(vols3, p3)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r.numpy(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("preset", ["mediqa-vitt16", "mediqa-vitt16-tex", "mediqa-vitt16-tex2",
                                    "mediqa-vitt16-tex2n", "mediqa-vitt16-tex2ns"])
def test_vitt16_shape_and_size_budget(preset: str) -> None:
    torch.manual_seed(0)
    net = create_model(preset, P).eval()
    clf = create_classifier("mediqa-vitt16", DEFAULT_VOCAB)
    assert 2 * (count_parameters(net) + count_parameters(clf)) <= 25_000_000  # fp16 artifact budget
    with torch.no_grad():
        score, logit = net(torch.zeros(1, 3, 224, 224), _prompts(CT_CHEST))
    assert score.shape == (1,) and logit.shape == (1,)


def test_conv_stem_replaces_the_patch_projection() -> None:
    """The conv stem keeps the ViT's token grid, is used by the from-scratch presets and is checked."""
    from dataclasses import replace

    from engines.models.maniqa import ConvStem

    stem = ConvStem(3, 192, 16)
    assert stem(torch.zeros(2, 3, 224, 224)).shape == (2, 192, 14, 14)
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [24, 48, 96, 192, 192]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 2, 1]
    with pytest.raises(ValueError, match="power-of-two"):
        ConvStem(3, 192, 12)
    for name in ("mediqa-vitt16", "mediqa-test"):
        cfg = get_preset(name)
        assert cfg.stem == "conv"
        net = create_model(name, P)
        assert isinstance(net.encoder.patch_embed.proj, ConvStem)
        assert isinstance(create_classifier(name, DEFAULT_VOCAB).encoder.patch_embed.proj, ConvStem)
    assert get_preset("mediqa-vitb8").stem == "patch"   # the paper's encoder, for ImageNet weights
    assert isinstance(create_vit("vit_tiny_patch16_224", 224).patch_embed.proj, torch.nn.Conv2d)
    with pytest.raises(ConfigError, match="stem"):
        replace(get_preset("mediqa-test"), stem="resnet").validate()
    with pytest.raises(ConfigError, match="power-of-two"):
        replace(get_preset("mediqa-test"), patch_size=6, image_size=48, window_size=4).validate()
    # In eval mode the stem's BatchNorm uses running statistics: no dependence on batch neighbours.
    torch.manual_seed(0)
    net = create_model("mediqa-test", P).eval()
    x, p = _images(3), _prompts(CT_CHEST, MR_HEAD, CT_CHEST)
    with torch.no_grad():
        together = net(x, p)[0]
        alone = torch.cat([net(x[i:i + 1], p[i:i + 1])[0] for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-7)
