"""The texture branch (presets with ``texture=True``): what it measures, how a network grows into
it from an artifact of its ``grows_from`` preset, its learning rate, and its export."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.artifact import ModelCard, load_card, save_artifact
from engines.errors import ConfigError, UnsupportedArtifact
from engines.models.loading import load_artifact
from engines.models.maniqa import TextureBranch
from engines.models.presets import get_preset
from engines.models.registry import create_model
from engines.prompts import DEFAULT_VOCAB
from export.samples import sample_set
from training.config import TrainConfig
from training.loop import param_groups
from training.tasks import load_pretrained_into, run_finetune


def _mr_slice() -> torch.Tensor:
    """pydicom's real MR slice through the network's preprocessing (``preprocess_slice``)."""
    import pydicom

    from engines.preprocess import PreprocessConfig, preprocess_slice
    from tests.conftest import _testdata

    raw = pydicom.dcmread(_testdata("MR_small.dcm")).pixel_array
    return torch.as_tensor(preprocess_slice(raw, "mr", None, PreprocessConfig()))[None]


def _artifact(tmp_path: Path, model: torch.nn.Module, preset: str, *, name: str | None = None,
              classifier: torch.nn.Module | None = None) -> Path:
    """``model`` packed with a card of ``preset`` (and ``classifier``, whose preset is mediqa-test)."""
    card = ModelCard(task="iqa", preset=preset, prompt_vocab=DEFAULT_VOCAB.to_dict(),
                     preprocess=get_preset(preset).preprocess_config().to_dict(),
                     label_scale={"min": 0.0, "max": 1.0, "name": "q"},
                     classifier_preset="mediqa-test" if classifier is not None else None)
    modules = {"iqa": model, **({"classifier": classifier} if classifier is not None else {})}
    return save_artifact(tmp_path / f"{name or preset}.safetensors", modules, card)


def _inputs(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from engines.preprocess import PreprocessConfig

    s = sample_set(cfg=PreprocessConfig(image_size=image_size))
    return torch.as_tensor(np.ascontiguousarray(s.images)), torch.as_tensor(s.prompts)


def test_energy_follows_the_noise_level_and_the_flattest_cell_ignores_edges() -> None:
    """On a real MR slice, the fixed high-pass channels (0: patch mean, width: flattest cell) rise
    with every step of added noise — the synthetic MR field-strength range, 0.4–4.5 % of the
    input range — by roughly log 2 per doubling once the noise dominates; without noise, the
    flattest cell of a patch with anatomy reads less than the patch mean (edges inflate the
    mean, not the minimum)."""
    torch.manual_seed(0)
    branch = TextureBranch(patch=16, out_channels=8)
    x = _mr_slice()
    medians = []
    for sigma in (0.0, 0.004, 0.008, 0.017, 0.023, 0.045):
        noisy = x + 2 * sigma * torch.randn_like(x[:, :1]).expand_as(x)   # σ in [0, 1] units
        e = branch.energy(noisy)[0]
        medians.append((float(e[0].median()), float(e[branch.filters.out_channels + 1].median())))
    for c in range(2):
        series = [m[c] for m in medians]
        assert all(a < b for a, b in zip(series, series[1:])), series
    assert medians[-1][0] - medians[3][0] == pytest.approx(np.log(0.045 / 0.017), abs=0.3)
    clean = branch.energy(x)[0]
    width = branch.filters.out_channels + 1
    anatomy = clean[0] > clean[0].median()                  # patches with structure
    assert bool((clean[width][anatomy] < clean[0][anatomy]).all())


@torch.no_grad()
def test_two_scales_tell_noise_from_blur() -> None:
    """With scales (1, 2) (preset mediqa-vitt16-tex2), on a real MR slice: the fixed high-pass
    energy at the pixel scale falls with blur and rises with noise, so on its own it cannot say
    which; the difference of the two scales' log energies rises with every step of noise towards
    log 2 (white noise averaged over 2 × 2 pixels keeps half its amplitude) but stays put under a
    blur that takes the pixel-scale energy down by more than half what the mildest noise step
    (0.4 % of the range) adds to it."""
    from torchvision.transforms.functional import gaussian_blur

    torch.manual_seed(0)
    branch = TextureBranch(patch=16, out_channels=8, scales=(1, 2))
    width = branch.filters.out_channels + 1
    assert branch.energy(torch.zeros(1, 3, 64, 64)).shape == (1, 4 * width, 4, 4)

    def pixel_and_difference(img: torch.Tensor) -> tuple[float, float]:
        e = branch.energy(img)[0]
        return float(e[0].median()), float((e[0] - e[2 * width]).median())

    x = _mr_slice()
    clean_pixel, clean_diff = pixel_and_difference(x)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x[:, :1].shape, generator=g).expand_as(x)
    diffs = [clean_diff]
    for sigma in (0.004, 0.008, 0.017, 0.045, 0.1):
        pixel, diff = pixel_and_difference(x + 2 * sigma * noise)
        assert pixel > clean_pixel
        diffs.append(diff)
    assert all(a < b for a, b in zip(diffs, diffs[1:])), diffs
    assert diffs[-1] == pytest.approx(np.log(2), abs=0.1) and clean_diff < -0.5
    mild_noise_rise = pixel_and_difference(x + 2 * 0.004 * noise)[0] - clean_pixel
    blurred_pixel, blurred_diff = pixel_and_difference(gaussian_blur(x, 9, 2.5))
    assert clean_pixel - blurred_pixel > 0.5 * mild_noise_rise
    assert abs(blurred_diff - clean_diff) < 0.15 < diffs[1] - clean_diff
    with pytest.raises(ConfigError, match="texture_scales"):
        TextureBranch(patch=16, out_channels=8, scales=(2,))


def test_noise_term_reads_the_noise_level_and_learns_its_sign(tmp_path: Path) -> None:
    """The noise term (preset mediqa-test-tex2n) on a real MR slice: its first statistic (the
    flattest cells' log energy) rises with every noise step and its second (the drop from scale 1
    to scale 2) too, while a blur leaves the second within 0.15 of the clean value. A network grown
    from a mediqa-test artifact scores exactly as the base (weights at 0); fitting only the term's
    weights to scores that fall with the noise makes the network's scores fall with it, in every
    one of the six steps, for images the fit has not seen — through the weights of the fitted
    prompt's labels only: a prompt that shares no label with it keeps the base scores."""
    from torchvision.transforms.functional import gaussian_blur

    from engines.prompts import Prompt, encode_prompt

    sigmas = (0.0, 0.004, 0.008, 0.017, 0.023, 0.045)

    def noisy(img: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return img + 2 * sigma * torch.randn(img[:, :1].shape, generator=gen).expand_as(img)

    torch.manual_seed(0)
    x224 = _mr_slice()                   # the statistics at the shipped presets' 16-px patch
    branch = TextureBranch(patch=16, out_channels=8, scales=(1, 2), prompt_dim=DEFAULT_VOCAB.size)
    with torch.no_grad():
        stats = torch.cat([branch.noise_statistics(branch.energy(noisy(x224, s, 1))) for s in sigmas])
        blurred = branch.noise_statistics(branch.energy(gaussian_blur(x224, 9, 2.5)))[0]
    for c in range(2):
        assert bool((stats[1:, c] > stats[:-1, c]).all()), stats[:, c]
    assert abs(float(blurred[1] - stats[0, 1])) < 0.15

    base = create_model("mediqa-test").eval()
    grown = create_model("mediqa-test-tex2n")
    load_pretrained_into(grown, _artifact(tmp_path, base, "mediqa-test"), "mediqa-test-tex2n", ())
    branch = grown.texture
    assert branch.noise_weight is not None and float(branch.noise_weight.detach().abs().sum()) == 0.0
    x = torch.nn.functional.interpolate(x224, size=64, mode="area")

    mr = encode_prompt(Prompt("2d", "mr", "head", "t1"))
    ct = encode_prompt(Prompt("3d", "ct", "chest", "plain"))    # no label in common with mr
    train = torch.cat([noisy(x, s, seed) for seed in (2, 3, 4) for s in sigmas])
    test = torch.cat([noisy(x, s, 9) for s in sigmas])
    p_train = torch.as_tensor(np.stack([mr] * len(train)), dtype=torch.float32)
    p_test = torch.as_tensor(np.stack([mr] * len(test)), dtype=torch.float32)
    p_other = torch.as_tensor(np.stack([ct] * len(test)), dtype=torch.float32)
    grown.eval()
    with torch.no_grad():
        before = grown(test, p_test)[0]
        assert torch.equal(before, base(test, p_test)[0])
        target = grown(train, p_train)[0] - 5.0 * torch.as_tensor(sigmas * 3)
    for name, p in grown.named_parameters():
        p.requires_grad_(name == "texture.noise_weight")
    branch.noise_norm.train()           # its running statistics follow the fit's batches
    opt = torch.optim.Adam([branch.noise_weight], lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        (grown(train, p_train)[0] - target).pow(2).mean().backward()
        opt.step()
    grown.eval()
    with torch.no_grad():
        after = grown(test, p_test)[0]
        other, base_other = grown(test, p_other)[0], base(test, p_other)[0]
    assert bool((after[1:] < after[:-1]).all()), after
    assert torch.allclose(other, base_other, atol=1e-3)
    # a batch of one image in training (a last short batch) uses the running statistics
    grown.train()
    opt.zero_grad()
    single, _ = grown(test[:1], p_test[:1])
    single.sum().backward()
    assert branch.noise_weight.grad is not None and torch.isfinite(single).all()
    with pytest.raises(ConfigError, match="noise term needs the texture branch with scale 2"):
        TextureBranch(patch=16, out_channels=8, prompt_dim=4)


def test_sharpness_statistic_falls_with_blur_not_noise_and_the_term_learns_both(tmp_path: Path) -> None:
    """The noise term's sharpness statistic (preset mediqa-test-tex2ns) on a real MR slice: it
    falls with every blur step and moves by less than 0.3 over the six noise steps that raise the
    noise level. A network grown from a mediqa-test artifact scores exactly as the base (three
    weights per label, at 0); fitting only the term's weights to scores that fall with noise AND
    with blur makes the scores of images the fit has not seen fall from the clean image to the
    strongest step of both, with a positive weight on the sharpness statistic."""
    from torchvision.transforms.functional import gaussian_blur

    from engines.prompts import Prompt, encode_prompt

    sigmas = (0.0, 0.004, 0.008, 0.017, 0.023, 0.045)
    blurs = ((3, 0.8), (5, 1.5), (9, 2.5), (13, 4.0))

    def noisy(img: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return img + 2 * sigma * torch.randn(img[:, :1].shape, generator=gen).expand_as(img)

    def blurred(img: torch.Tensor) -> torch.Tensor:
        return torch.cat([img] + [gaussian_blur(img, k, s) for k, s in blurs])

    x224 = _mr_slice()
    branch = TextureBranch(patch=16, out_channels=8, scales=(1, 2), prompt_dim=DEFAULT_VOCAB.size, sharpness=True)
    assert branch.noise_weight is not None and tuple(branch.noise_weight.shape) == (DEFAULT_VOCAB.size, 3)
    with torch.no_grad():
        sharp_noise = branch.sharpness_statistic(torch.cat([noisy(x224, s, 1) for s in sigmas]))
        sharp_blur = branch.sharpness_statistic(blurred(x224))
    assert float(sharp_noise.max() - sharp_noise.min()) < 0.3, sharp_noise
    assert bool((sharp_blur[1:] < sharp_blur[:-1]).all()) and float(sharp_blur[-1] - sharp_blur[0]) < -1.0, sharp_blur
    with pytest.raises(ConfigError, match="sharpness_term .* needs noise_term"):
        TextureBranch(patch=16, out_channels=8, scales=(1, 2), sharpness=True)

    torch.manual_seed(0)
    base = create_model("mediqa-test").eval()
    grown = create_model("mediqa-test-tex2ns")
    load_pretrained_into(grown, _artifact(tmp_path, base, "mediqa-test"), "mediqa-test-tex2ns", ())
    branch = grown.texture
    x = torch.nn.functional.interpolate(x224, size=64, mode="area")
    mr = encode_prompt(Prompt("2d", "mr", "head", "t1"))
    steps = torch.arange(len(sigmas), dtype=torch.float32)
    train = torch.cat([noisy(x, s, seed) for seed in (2, 3, 4) for s in sigmas] + [blurred(noisy(x, 0.004, 5))])
    test_noise = torch.cat([noisy(x, s, 9) for s in sigmas])
    test_blur = blurred(noisy(x, 0.004, 11))

    def prompts(n: int) -> torch.Tensor:
        return torch.as_tensor(np.stack([mr] * n), dtype=torch.float32)

    grown.eval()
    with torch.no_grad():
        assert torch.equal(grown(test_noise, prompts(len(test_noise)))[0], base(test_noise, prompts(len(test_noise)))[0])
        ref = grown(train, prompts(len(train)))[0]
        fall = torch.cat([0.1 * steps] * 3 + [0.1 * torch.arange(len(blurs) + 1, dtype=torch.float32)])
        target = ref - fall
    for name, p in grown.named_parameters():
        p.requires_grad_(name == "texture.noise_weight")
    branch.noise_norm.train()
    opt = torch.optim.Adam([branch.noise_weight], lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        (grown(train, prompts(len(train)))[0] - target).pow(2).mean().backward()
        opt.step()
    grown.eval()
    with torch.no_grad():
        after_noise = grown(test_noise, prompts(len(test_noise)))[0]
        after_blur = grown(test_blur, prompts(len(test_blur)))[0]
    assert float(after_noise[-1] - after_noise[0]) < 0 and float(after_blur[-1] - after_blur[0]) < 0
    # the fit uses the third statistic, with the sign of a sharpness reward
    assert float((prompts(1) @ branch.noise_weight.detach())[0, 2]) > 0.01


def test_grown_network_starts_with_the_base_scores_and_the_branch_is_wired(tmp_path: Path) -> None:
    """A mediqa-test-tex network grown from a mediqa-test artifact holds every base tensor and
    scores real inputs exactly as the base (projection at 0); gradients reach the projection at
    once; a non-zero projection changes the scores; presets that do not grow from each other are
    refused both ways."""
    torch.manual_seed(0)
    base = create_model("mediqa-test").eval()
    path = _artifact(tmp_path, base, "mediqa-test")
    grown = create_model("mediqa-test-tex")
    counts = load_pretrained_into(grown, path, "mediqa-test-tex", ())
    texture_keys = [k for k in grown.state_dict() if k.startswith("texture.")]
    assert counts["loaded"] == len(base.state_dict()) and counts["skipped"] == 0
    assert counts["added"] == len(texture_keys) > 0
    for k, v in base.state_dict().items():
        assert torch.equal(grown.state_dict()[k], v), k
    grown.eval()
    images, prompts = _inputs(64)
    with torch.no_grad():
        s_base, l_base = base(images, prompts)
        s_grown, l_grown = grown(images, prompts)
    assert float(s_base.std()) > 0
    assert torch.equal(s_base, s_grown) and torch.equal(l_base, l_grown)

    grown.train()
    score, _ = grown(images[:8], prompts[:8])
    (score - 0.5).pow(2).sum().backward()
    assert grown.texture.proj.weight.grad is not None and float(grown.texture.proj.weight.grad.abs().sum()) > 0
    grown.eval()
    with torch.no_grad():
        torch.nn.init.normal_(grown.texture.proj.weight, std=0.5)
        assert not torch.allclose(grown(images, prompts)[0], s_base)

    with pytest.raises(UnsupportedArtifact, match="mediqa-test"):
        load_pretrained_into(create_model("mediqa-vitt16-tex"), path, "mediqa-vitt16-tex", ())
    tex_path = _artifact(tmp_path, grown, "mediqa-test-tex")
    with pytest.raises(UnsupportedArtifact, match="mediqa-test-tex"):
        load_pretrained_into(create_model("mediqa-test"), tex_path, "mediqa-test", ())
    # the artifact of the grown preset loads on its own, branch included
    loaded = load_artifact(tex_path)
    with torch.no_grad():
        assert torch.allclose(loaded.iqa(images, prompts)[0], grown(images, prompts)[0], atol=1e-6)


def test_texture_lr_mult_gives_the_branch_its_own_group() -> None:
    """``texture_lr_mult``: exactly the branch's parameters form a group at lr × mult, next to the
    prompt projections' group when that is on too; every parameter is in exactly one group."""
    model = create_model("mediqa-test-tex")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, TrainConfig(lr=1e-4, texture_lr_mult=10.0, prompt_lr_mult=5.0))
    assert [g.get("lr") for g in groups] == [None, pytest.approx(5e-4), pytest.approx(1e-3)]
    assert {names[id(p)] for p in groups[2]["params"]} == {n for n in names.values() if n.startswith("texture.")}
    assert all(".prompt_proj." in names[id(p)] for p in groups[1]["params"])
    flat = [id(p) for g in groups for p in g["params"]]
    assert sorted(flat) == sorted(names) and len(set(flat)) == len(flat)
    assert len(param_groups(model, TrainConfig(lr=1e-4))) == 1
    assert len(param_groups(create_model("mediqa-test"), TrainConfig(texture_lr_mult=10.0))) == 1
    with pytest.raises(ValueError, match="texture_lr_mult"):
        param_groups(model, TrainConfig(texture_lr_mult=0.0))


def test_finetune_grows_a_base_artifact_and_records_it(tmp_path: Path, retina_path: Path) -> None:
    """run_finetune with a texture preset from an artifact of the preset it grows from: trains,
    the branch's projection leaves 0, and the card records the preset and the added tensors."""
    from tests.test_datasets import build_scored_corpus

    corpus = build_scored_corpus(tmp_path / "corpus", retina_path, with_3d=False)
    torch.manual_seed(0)
    base = _artifact(tmp_path, create_model("mediqa-test"), "mediqa-test")
    cfg = TrainConfig(task="finetune", preset="mediqa-test-tex", epochs=1, batch_size=4, lr=2e-3, amp=False,
                      progress=False, warmup_epochs=0.5, patience=0, cache_dir="memory", reinit=(),
                      texture_lr_mult=10.0, out=str(tmp_path / "ft"), from_checkpoint=str(base))
    outcome = run_finetune(corpus, cfg)
    card = load_card(outcome.artifact)
    assert card.preset == "mediqa-test-tex"
    assert card.data_summary["handover"]["added"] == sum(1 for k in create_model("mediqa-test-tex").state_dict()
                                                         if k.startswith("texture."))
    proj = load_artifact(outcome.artifact).iqa.texture.proj.weight
    assert float(proj.abs().max()) > 0


@pytest.mark.parametrize("preset", ["mediqa-test-tex", "mediqa-test-tex2", "mediqa-test-tex2n",
                                    "mediqa-test-tex2ns"])
def test_onnx_parity_with_the_branch(tmp_path: Path, preset: str) -> None:
    """The branch (avg / max pooling, log, BatchNorm; one or two scales; the noise term, its
    sharpness statistic's top-k order statistics) exports: 2D and 3D graphs of a network with a
    non-zero projection (and noise term) match PyTorch on real inputs."""
    pytest.importorskip("onnxruntime")
    from tests.test_export_onnx import build, check_parity, export_all

    iqa, cls, card = build(preset)
    with torch.no_grad():
        torch.nn.init.normal_(iqa.texture.proj.weight, std=0.2)
        if iqa.texture.noise_weight is not None:
            torch.nn.init.normal_(iqa.texture.noise_weight, std=0.2)
            iqa.texture.noise_norm.running_mean.copy_(torch.tensor([-3.0, -0.5, -6.0])[:iqa.texture.noise_weight.shape[1]])
            iqa.texture.noise_norm.running_var.copy_(torch.tensor([2.0, 0.3, 1.5])[:iqa.texture.noise_weight.shape[1]])
    export_all(tmp_path, iqa, cls, card)
    check_parity(iqa, cls, card, tmp_path)


@pytest.mark.parametrize("preset", ["mediqa-test-tex", "mediqa-test-tex2n", "mediqa-test-tex2ns"])
def test_soup_of_plain_and_grown_members_averages_the_branch_as_zero(tmp_path: Path, preset: str) -> None:
    """``average_iqa`` with a mediqa-test member and a mediqa-test-tex member grown from it: the
    plain member joins as the grown network with its projection at 0, so the soup's shared tensors
    are the members' mean, its projection half the grown member's, its other branch tensors the
    grown member's, and every card names the grown preset; the packed soup loads and scores.
    Presets that do not grow from each other are still refused."""
    from engines.models.registry import create_classifier
    from training.soup import average_iqa

    torch.manual_seed(0)
    cls = create_classifier("mediqa-test", DEFAULT_VOCAB)

    def pack(model: torch.nn.Module, preset: str, name: str) -> Path:
        return _artifact(tmp_path, model, preset, name=name, classifier=cls)

    plain = create_model("mediqa-test")
    grown = create_model(preset)
    with torch.no_grad():
        torch.nn.init.normal_(grown.texture.proj.weight, std=0.3)
        torch.nn.init.normal_(grown.texture.proj.bias, std=0.3)
        if grown.texture.noise_weight is not None:
            torch.nn.init.normal_(grown.texture.noise_weight, std=0.3)
    a, b = pack(plain, "mediqa-test", "plain"), pack(grown, preset, "grown")
    modules, cards = average_iqa([a, b])
    assert [c.preset for c in cards] == [preset, preset]
    soup, gs, ps = modules["iqa"], grown.state_dict(), plain.state_dict()
    for k, v in ps.items():
        if v.is_floating_point():
            assert torch.allclose(soup[k], (v + gs[k]) / 2), k
    assert torch.allclose(soup["texture.proj.weight"], gs["texture.proj.weight"] / 2)
    assert torch.allclose(soup["texture.proj.bias"], gs["texture.proj.bias"] / 2)
    assert torch.equal(soup["texture.filters.weight"], gs["texture.filters.weight"])
    if grown.texture.noise_weight is not None:      # the term is off at 0 too: half the grown one's
        assert torch.allclose(soup["texture.noise_weight"], gs["texture.noise_weight"] / 2)
        assert torch.equal(soup["texture.noise_norm.running_var"], gs["texture.noise_norm.running_var"])
    card = dataclasses.replace(cards[0], classifier_preset="mediqa-test")
    path = save_artifact(tmp_path / "soup.safetensors", modules, card)
    images, prompts = _inputs(64)
    with torch.no_grad():
        scores = load_artifact(path).iqa(images, prompts)[0]
    assert torch.isfinite(scores).all()
    with pytest.raises(ConfigError, match="preset"):
        average_iqa([a, pack(create_model("mediqa-test"), "mediqa-test", "p2"),
                     pack(create_model("mediqa-vitt16-tex"), "mediqa-vitt16-tex", "other")])
