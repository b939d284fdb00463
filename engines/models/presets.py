"""Named model presets (torch-free, like a timm model registry's config table).

A preset fixes every number of the prompted MANIQA model (DESIGN §3): the timm ViT, the four
intermediate blocks it contributes, the token grid, the widths of the two stages, the Swin
window / heads / MLP width, and the input image size (which the ``PreprocessConfig`` used with
the preset must match). The CLI and the artifact card refer to presets by name only, so this
module must stay importable without torch.

Block indices are 0-based positions in ``vit.blocks``. MANIQA (IIGROUP/MANIQA, ``models/maniqa.py``)
registers a forward hook on every block and concatenates ``outputs[6..9]``, i.e. the outputs of
``blocks[6]``, ``blocks[7]``, ``blocks[8]`` and ``blocks[9]`` of a 12-block ViT-B/8, without the class
token and before the final norm; ``forward_intermediates(indices=(6, 7, 8, 9), norm=False)`` gives
exactly those tensors without hooks. Blocks after the last index are pruned from the encoder.

MANIQA reference numbers (facts, see DESIGN §3): 4 × 768 = 3072 channels on 28 × 28; TAB × 2 →
1 × 1 conv 3072 → 768 → Swin stage; TAB × 2 → 1 × 1 conv 768 → 384 → Swin stage; each Swin stage
has 2 residual layers of 2 Swin blocks (the second block of each layer uses shifted windows),
4 heads, window 4, MLP width 768, drop-path 0.1 (linearly spaced over the stage's blocks), a 3 × 3
conv closing each layer, and the residual ``x = 0.8 · layer(x) + x``; heads 384 → 384 → 1.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from engines.errors import ConfigError
from engines.preprocess import PreprocessConfig


@dataclass(frozen=True)
class PresetConfig:
    """Every number of one model variant. Shapes follow from ``image_size`` and the ViT patch.

    ``vit_overrides`` are keyword arguments passed to ``timm.create_model`` on top of the named
    architecture (used by the tiny test preset); ``classifier_vit`` (+ overrides) is the prompt
    classifier's ViT, fed the same ``image_size`` inputs.
    """

    name: str
    description: str
    vit_name: str
    patch_size: int
    image_size: int
    vit_embed_dim: int
    blocks: tuple[int, int, int, int]
    widths: tuple[int, int]
    window_size: int
    swin_heads: int
    swin_mlp_dim: int
    swin_layers: int = 2              # residual layers per Swin stage (MANIQA: depths=[2, 2])
    swin_blocks_per_layer: int = 2    # Swin blocks per layer, shift on every second block
    tab_per_stage: int = 2
    drop: float = 0.1                 # TAB dropout, head dropout, Swin stage input dropout
    drop_path: float = 0.1
    residual_scale: float = 0.8
    head_hidden: int | None = None    # score/weight head hidden width; None = widths[1]
    vit_overrides: tuple[tuple[str, Any], ...] = ()
    classifier_vit: str = "vit_tiny_patch16_224"
    classifier_overrides: tuple[tuple[str, Any], ...] = ()
    # "patch": the ViT's linear patch embedding (paper, for ImageNet-initialised encoders);
    # "conv": a convolutional stem (``engines.models.maniqa.ConvStem``) for both the IQA encoder
    # and the classifier, used by the presets trained here from random weights.
    stem: str = "patch"
    # True: a ``TextureBranch`` (engines.models.maniqa) adds each patch's high-frequency energy
    # to the ViT features; its output projection starts at 0.
    texture: bool = False
    # The texture branch's scales (``TextureBranch``): 1 = the input pixels, s = the grey image
    # averaged over s x s pixels, each with its own energy channels.
    texture_scales: tuple[int, ...] = (1,)
    # True: the texture branch's noise term (``TextureBranch.noise_term``: two fixed noise
    # statistics weighted by the prompt, added to the score); needs the branch with scale 2.
    noise_term: bool = False
    # True: the noise term also weighs a third fixed statistic, the busiest cells' high-pass
    # energy above the flattest cells' at 4 x 4-pixel means (``TextureBranch.sharpness_statistic``:
    # falls with blur, not with noise); needs ``noise_term``.
    sharpness_term: bool = False
    # The preset whose IQA tensors this one holds as a subset (a preset that adds modules, e.g.
    # the texture branch): fine-tuning may start from an artifact of that preset, the added
    # modules keeping their initialisation. None: only artifacts of this very preset.
    grows_from: str | None = None

    @property
    def grid(self) -> int:
        """Token grid side: image_size // patch_size (28 for ViT-B/8 at 224)."""
        return self.image_size // self.patch_size

    @property
    def feature_channels(self) -> int:
        """Channels of the concatenated intermediate features (4 × embed dim)."""
        return len(self.blocks) * self.vit_embed_dim

    @property
    def head_width(self) -> int:
        return self.head_hidden if self.head_hidden is not None else self.widths[1]

    def preprocess_config(self) -> PreprocessConfig:
        """The default preprocessing for this preset (image size; MANIQA mean/std 0.5)."""
        return PreprocessConfig(image_size=self.image_size)

    def validate(self) -> None:
        """Raise ConfigError when the numbers do not fit together."""
        g = self.grid
        if self.image_size % self.patch_size:
            raise ConfigError(f"{self.name}: image_size {self.image_size} not a multiple of patch {self.patch_size}")
        if g % self.window_size:
            raise ConfigError(f"{self.name}: grid {g} not a multiple of window {self.window_size}")
        for w in self.widths:
            if w % self.swin_heads:
                raise ConfigError(f"{self.name}: width {w} not divisible by {self.swin_heads} heads")
        if self.stem not in ("patch", "conv"):
            raise ConfigError(f"{self.name}: stem must be 'patch' or 'conv', got {self.stem!r}")
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise ConfigError(f"{self.name}: a conv stem needs a power-of-two patch, got {self.patch_size}")
        if sorted(set(self.blocks)) != list(self.blocks):
            raise ConfigError(f"{self.name}: blocks must be strictly increasing, got {self.blocks}")
        check_texture_scales(self.patch_size, self.texture_scales, self.name)
        if self.noise_term:
            check_noise_term(self.texture, self.texture_scales, self.name)
        check_sharpness_term(self.sharpness_term, self.noise_term, self.name)
        if self.grows_from is not None and self.grows_from not in PRESETS:
            raise ConfigError(f"{self.name}: grows_from names an unknown preset {self.grows_from!r}")


def texture_cell(patch: int) -> int:
    """The texture branch's cell side in pixels: a quarter of the patch (at least 1)."""
    return max(1, patch // 4)


def check_texture_scales(patch: int, scales: tuple[int, ...], name: str = "texture branch") -> tuple[int, ...]:
    """``scales`` as ints; ConfigError unless they start at 1 and each divides the cell."""
    cell = texture_cell(patch)
    scales = tuple(int(s) for s in scales)
    if not scales or scales[0] != 1 or any(s < 1 or cell % s for s in scales):
        raise ConfigError(f"{name}: texture_scales must start at 1 and divide the texture cell "
                          f"({cell} px), got {scales}")
    return scales


def check_noise_term(texture: bool, scales: tuple[int, ...], name: str = "texture branch") -> None:
    """ConfigError unless the noise term has what it reads: the texture branch with scale 2."""
    if not (texture and 2 in scales):
        raise ConfigError(f"{name}: the noise term needs the texture branch with scale 2, "
                          f"got texture={texture}, scales {tuple(scales)}")


def check_sharpness_term(sharpness: bool, noise_term: bool, name: str = "texture branch") -> None:
    """ConfigError when the sharpness statistic is asked for without the noise term it belongs to."""
    if sharpness and not noise_term:
        raise ConfigError(f"{name}: sharpness_term is a statistic of the noise term: it needs noise_term")


PRESETS: dict[str, PresetConfig] = {}


def _register(p: PresetConfig) -> PresetConfig:
    p.validate()
    PRESETS[p.name] = p
    return p


_register(PresetConfig(
    name="mediqa-vitb8",
    description="Paper model: MANIQA on ViT-B/8 (blocks 6-9, 28x28 grid, widths 768/384, window 4); GPU.",
    vit_name="vit_base_patch8_224", patch_size=8, image_size=224, vit_embed_dim=768,
    blocks=(6, 7, 8, 9), widths=(768, 384), window_size=4, swin_heads=4, swin_mlp_dim=768,
    # Paper: "a 12-layer, 12-head ViT with a size of 3072" (ViT-B MLP width), ~86M params.
    classifier_vit="vit_base_patch16_224",
))

_register(PresetConfig(
    name="mediqa-vits16",
    description="ViT-S/16 variant (blocks 6-9, 14x14 grid, widths 384/192, window 7); mid-size GPU/CPU.",
    vit_name="vit_small_patch16_224", patch_size=16, image_size=224, vit_embed_dim=384,
    blocks=(6, 7, 8, 9), widths=(384, 192), window_size=7, swin_heads=4, swin_mlp_dim=384,
    classifier_vit="vit_small_patch16_224",
))

# Widths chosen so the fp16 artifact of IQA model + classifier stays under 25 MB (measured in
# tests/test_models.py::test_vitt16_fits_size_budget).
_register(PresetConfig(
    name="mediqa-vitt16",
    description="CPU default: ViT-Ti/16 with a conv stem (blocks 6-9, 14x14 grid, widths 128/64, window 7).",
    vit_name="vit_tiny_patch16_224", patch_size=16, image_size=224, vit_embed_dim=192,
    blocks=(6, 7, 8, 9), widths=(128, 64), window_size=7, swin_heads=4, swin_mlp_dim=256,
    head_hidden=128,
    classifier_vit="vit_tiny_patch16_224",
    stem="conv",   # trained from random weights here: see ConvStem
))

_register(dataclasses.replace(
    PRESETS["mediqa-vitt16"], name="mediqa-vitt16-tex",
    description="mediqa-vitt16 + a texture branch: per-patch high-frequency energy added to the ViT features.",
    texture=True, grows_from="mediqa-vitt16",
))

_register(dataclasses.replace(
    PRESETS["mediqa-vitt16"], name="mediqa-vitt16-tex2",
    description="mediqa-vitt16 + a two-scale texture branch (pixels and 2x2 means): noise and sharpness apart.",
    texture=True, texture_scales=(1, 2), grows_from="mediqa-vitt16",
))

_register(dataclasses.replace(
    PRESETS["mediqa-vitt16-tex2"], name="mediqa-vitt16-tex2n",
    description="mediqa-vitt16-tex2 + the noise term: two fixed noise statistics, prompt-weighted, added to the score.",
    noise_term=True,
))

_register(dataclasses.replace(
    PRESETS["mediqa-vitt16-tex2n"], name="mediqa-vitt16-tex2ns",
    description="mediqa-vitt16-tex2n + a sharpness statistic in the noise term (edge energy above the noise floor).",
    sharpness_term=True,
))

_TEST_VIT = (("embed_dim", 32), ("depth", 4), ("num_heads", 2), ("patch_size", 8), ("img_size", 64))
_register(PresetConfig(
    name="mediqa-test",
    description="Tiny random model for tests: 64x64 input, 4-block 32-dim ViT/8 with conv stem, 8x8 grid, window 4.",
    vit_name="vit_tiny_patch16_224", patch_size=8, image_size=64, vit_embed_dim=32,
    blocks=(0, 1, 2, 3), widths=(32, 16), window_size=4, swin_heads=2, swin_mlp_dim=32,
    vit_overrides=_TEST_VIT,
    classifier_vit="vit_tiny_patch16_224", classifier_overrides=_TEST_VIT, stem="conv",
))

_register(dataclasses.replace(
    PRESETS["mediqa-test"], name="mediqa-test-tex",
    description="mediqa-test + the texture branch (tests).", texture=True, grows_from="mediqa-test",
))

_register(dataclasses.replace(
    PRESETS["mediqa-test"], name="mediqa-test-tex2",
    description="mediqa-test + the two-scale texture branch (tests).", texture=True, texture_scales=(1, 2),
    grows_from="mediqa-test",
))

_register(dataclasses.replace(
    PRESETS["mediqa-test-tex2"], name="mediqa-test-tex2n",
    description="mediqa-test + the two-scale texture branch and its noise term (tests).", noise_term=True,
))

_register(dataclasses.replace(
    PRESETS["mediqa-test-tex2n"], name="mediqa-test-tex2ns",
    description="mediqa-test-tex2n + the noise term's sharpness statistic (tests).", sharpness_term=True,
))

DEFAULT_PRESET = "mediqa-vitt16"


def list_presets() -> list[str]:
    """Registered preset names, in registration order."""
    return list(PRESETS)


def get_preset(name: str) -> PresetConfig:
    """The preset called ``name``; ConfigError with a suggestion when unknown."""
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}.{hint}") from None
