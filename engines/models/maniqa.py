"""The prompted MANIQA model (paper §2.2, DESIGN §3) and its in-graph 3D slice fusion.

Data flow for a batch of N images (shapes for a preset with ViT width D, grid G = S / patch,
stage widths (C1, C2)):

1. ``encoder`` (timm ViT, ``pretrained=False``) → ``forward_intermediates`` of the preset's 4 blocks
   (no hooks, no class token, before the final norm) → concatenated (N, 4·D, G, G); a
   ``texture`` preset adds ``TextureBranch``'s per-patch high-frequency energy to it.
2. stage 1: transposed attention ×2 over (N, 4·D, G²) → 1 × 1 conv 4·D → C1 → prompted Swin stage.
3. stage 2: transposed attention ×2 over (N, C1, G²) → 1 × 1 conv C1 → C2 → prompted Swin stage.
4. per patch token: score branch ``s`` (ReLU, ≥ 0) and weight branch ``w`` (sigmoid); image score
   ``q = Σ w·s / (Σ w + ε)``; plus ``slice_logit`` = Linear(C2 → 1) of the token mean, the fusion
   logit used when the image is one of the K salient slices of a 3D series.

``forward_volume`` runs the K slices of each series through the same 2D path in one batch
(N·K images) and fuses them with ``softmax`` over K, which is exactly what
``engines.fusion.fuse_slice_scores`` does outside the graph with ``forward``'s outputs.

One deliberate difference to the MANIQA reference code: its transposed attention block returns
``(attn @ v).transpose(1, 2).reshape(B, C, N)``, a reshape that scrambles the channel and token
axes; here the block returns ``attn @ v`` (B, C, N) as the transposed-attention formulation states.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import trunc_normal_

from engines.errors import UnsupportedInput
from engines.models.presets import (PresetConfig, check_noise_term, check_sharpness_term, check_texture_scales,
                                    get_preset, texture_cell)
from engines.models.swin import SwinStage

log = logging.getLogger(__name__)

_EPS = 1e-8  # keeps Σ w > 0 in q = Σ w·s / Σ w (sigmoid weights are > 0 but may underflow)


class ConvStem(nn.Sequential):
    """Convolutional patch embedding (Xiao et al. 2021, "Early convolutions help transformers see
    better"): log2(patch) × [3 × 3 conv stride 2 → BatchNorm → ReLU] with widths doubling up to
    ``embed_dim``, then a 1 × 1 conv to ``embed_dim``.

    (N, in_chans, S, S) → (N, embed_dim, S / patch, S / patch): a drop-in for the ViT's linear
    ``PatchEmbed.proj`` (one 16 × 16 stride-16 conv), so the token grid and everything after it
    are unchanged. A ViT trained from random weights on a few thousand images learns local
    distortion statistics (noise, blur, blocking) through this stem; through the linear patch
    embedding the bundled model collapsed to the mean (README, "The bundled model"). The
    BatchNorm is what makes it trainable here: the same stem without it (PyTorch's default conv
    init) left the pretraining loss at the label variance. In eval mode (scoring, export) it uses
    running statistics, so a study's score does not depend on its batch neighbours.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        n = int(round(math.log2(patch_size)))
        if n < 1 or 2 ** n != patch_size:
            raise ValueError(f"a conv stem needs a power-of-two patch size, got {patch_size}")
        widths = [max(embed_dim >> (n - 1 - i), 1) for i in range(n)]
        layers: list[nn.Module] = []
        prev = in_chans
        for w in widths:
            layers += [nn.Conv2d(prev, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            prev = w
        layers.append(nn.Conv2d(prev, embed_dim, 1))
        super().__init__(*layers)


class TextureBranch(nn.Module):
    """Each patch's high-frequency energy as extra ViT features (presets with ``texture=True``).

    (N, 3, S, S) normalised images → (N, out_channels, S / patch, S / patch), added to the
    concatenated intermediate features before the first transposed attention. Steps: grey = the
    channel mean; residual = grey − its 3 × 3 mean (a fixed high-pass: noise, fine edges, block
    boundaries); ``width − 1`` learned 3 × 3 filters of the residual next to the residual itself;
    the mean absolute response of every cell of patch / 4 pixels; per patch, the log of the
    mean over its cells and the minimum of their logs (the flattest cell: a noise level that
    edges and texture do not inflate); BatchNorm; a 1 × 1 projection. With ``scales`` (1, 2, …)
    the same measures (same filters) are also taken of the grey image averaged over s × s
    pixels: white noise loses the same log energy from one scale to the next at any level,
    blur and anatomy do not, so the projection can tell noise from sharpness by the
    difference of two log energies.

    Why: the synthetic MR labels follow noise of 0.4–4.5 % of the input range, which the
    preprocessing keeps (−σ on the network's own input tensors ranks those studies 0.974) but
    which the ViT-Ti/16 network does not learn to read in a continuation (README, "What limits
    it"). The log energy turns a ×10 change of noise level into a shift of ~2.3 in one feature.
    The projection starts at exactly 0, so a network grown from a ``grows_from`` artifact starts
    with that artifact's scores, and training decides how much of the branch to use.

    **Noise term** (``prompt_dim`` > 0, presets with ``noise_term=True``; needs scale 2): two fixed
    statistics of each image added straight to the score rather than through the projection —
    ``noise_statistics``: the mean over patches of the fixed residual's flattest-cell log energy
    at scale 1 (a noise level) and of its drop from scale 1 to scale 2 (towards log 2 for white
    noise, not for blur). Standardised by a BatchNorm without affine parameters, each is weighted
    by a linear function of the prompt (``noise_weight``, (P, 2), starting at 0: a grown network
    starts with its base's scores), so every modality / region / type learns its own weights.
    Why (measured 2026-12-07 on the 525 MR training studies' network inputs): the negated first
    statistic alone ranks the noise-only studies 0.941 and all MR training studies 0.491, while the
    two-scale network fits those studies 0.639 and reads real-MR noise as sharpness (its score
    rises with simulated 3 / 1.5 / 1 T noise) — the projection into the ViT features does not
    carry the noise level to the score. Trained (``mediqa-vitt16-tex2n``, 2026-12-07) the term
    turns that real-MR noise direction but scores blurred, pixelated and ringing MR as cleaner:
    the patch-mean level also measures fine anatomy (README, "What limits it").

    **Sharpness statistic** (``sharpness=True``, presets with ``sharpness_term=True``): a third
    statistic of the noise term, ``sharpness_statistic`` — the high-pass residual of the grey
    image averaged over 4 × 4 pixels, its mean square in 2 × 2 cells, and the log of the 98th
    minus the 10th percentile of those cells (the busiest cells' energy above the noise floor).
    Why (``benchmarks/sharpness_probe.py``, 15 real MR slices, 2026-12-07): it falls with blur,
    ringing and ghosting (mean SRCC −1.00 / −0.91 / −0.97) and does not move with noise (−0.09,
    field noise −0.20), so the term can penalise smoothing with its own weight instead of
    shrinking the noise level's (which is what the apodised corpus made tex2n do).
    """

    def __init__(self, patch: int, out_channels: int, width: int = 16, eps: float = 1e-4,
                 scales: Sequence[int] = (1,), prompt_dim: int = 0, sharpness: bool = False) -> None:
        super().__init__()
        if width < 2:
            raise ValueError(f"texture branch width must be >= 2, got {width}")
        self.cell = texture_cell(patch)
        if patch % self.cell:
            raise ValueError(f"texture branch: patch {patch} is not a multiple of its cell {self.cell}")
        self.scales = check_texture_scales(patch, tuple(scales))
        self.cells = patch // self.cell
        self.eps = eps
        self.filters = nn.Conv2d(1, width - 1, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(2 * width * len(self.scales))
        self.proj = nn.Conv2d(2 * width * len(self.scales), out_channels, 1)
        self.reset_projection()
        self.width = width
        self.noise_weight: nn.Parameter | None = None
        self.noise_norm: nn.BatchNorm1d | None = None
        if prompt_dim < 0:
            raise ValueError(f"texture branch: prompt_dim must be >= 0, got {prompt_dim}")
        check_sharpness_term(sharpness, bool(prompt_dim))
        self.sharpness = sharpness
        if prompt_dim:
            check_noise_term(True, self.scales)
            n_stats = 3 if sharpness else 2
            # zeros, not a random init: building the term draws nothing from the global generator,
            # so the branch's filters and the training run's shuffle match a network without it
            self.noise_weight = nn.Parameter(torch.zeros(prompt_dim, n_stats))
            self.noise_norm = nn.BatchNorm1d(n_stats, affine=False)

    def reset_projection(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def energy(self, images: Tensor) -> Tensor:
        """(N, 3, S, S) → (N, 2·width·len(scales), G, G) before the norm, one block of 2·width
        channels per scale (in ``scales`` order): channels [0, width) of a block the log mean
        |response| over each patch, [width, 2·width) the minimum over its cells of the log mean
        |response|; channels 0 and ``width`` of a block are the fixed high-pass residual's."""
        grey = images.mean(dim=1, keepdim=True)
        blocks = []
        for s in self.scales:
            g = grey if s == 1 else F.avg_pool2d(grey, s)
            resid = g - F.avg_pool2d(g, 3, stride=1, padding=1, count_include_pad=False)
            maps = torch.cat([resid, self.filters(resid)], dim=1).abs()
            cells = F.avg_pool2d(maps, self.cell // s)
            blocks.append(torch.log(F.avg_pool2d(cells, self.cells) + self.eps))
            blocks.append(-F.max_pool2d(-torch.log(cells + self.eps), self.cells))
        return torch.cat(blocks, dim=1)

    def project(self, energy: Tensor) -> Tensor:
        """``energy``'s output: the features added to the ViT's, (N, out_channels, G, G)."""
        return self.proj(self.norm(energy))

    def forward(self, images: Tensor) -> Tensor:
        return self.project(self.energy(images))

    def noise_statistics(self, energy: Tensor) -> Tensor:
        """(N, 2) from ``energy``: the mean over patches of the fixed residual's flattest-cell log
        energy at scale 1, and of that minus the same at scale 2 (see the class docstring)."""
        k = self.scales.index(2)
        flat1 = energy[:, self.width].mean(dim=(1, 2))
        flat2 = energy[:, 2 * self.width * k + self.width].mean(dim=(1, 2))
        return torch.stack([flat1, flat1 - flat2], dim=1)

    def sharpness_statistic(self, images: Tensor) -> Tensor:
        """(N,) from (N, 3, S, S): log of the 98th minus the 10th percentile (order statistics,
        ``topk``: exports to ONNX) of the mean-square high-pass residual, in 2 × 2 cells, of the
        grey image averaged over 4 × 4 pixels (see the class docstring)."""
        grey = F.avg_pool2d(images.mean(dim=1, keepdim=True), 4)
        resid = grey - F.avg_pool2d(grey, 3, stride=1, padding=1, count_include_pad=False)
        cells = F.avg_pool2d(resid * resid, 2).flatten(1)
        n = cells.shape[1]
        p98 = torch.topk(cells, max(1, math.ceil(0.02 * n)), dim=1).values[:, -1]
        p10 = -torch.topk(-cells, max(1, math.ceil(0.10 * n)), dim=1).values[:, -1]
        return torch.log(torch.clamp(p98 - p10, min=self.eps * self.eps))

    def noise_term(self, energy: Tensor, prompt: Tensor, images: Tensor | None = None) -> Tensor:
        """The score's noise term (N,): standardised ``noise_statistics`` (and, with ``sharpness``,
        ``sharpness_statistic`` of ``images``) weighted by the prompt."""
        if self.noise_weight is None or self.noise_norm is None:
            raise RuntimeError("this texture branch has no noise term (prompt_dim 0)")
        stats, norm = self.noise_statistics(energy), self.noise_norm
        if self.sharpness:
            if images is None:
                raise ValueError("this noise term reads the images too (sharpness statistic)")
            stats = torch.cat([stats, self.sharpness_statistic(images)[:, None]], dim=1)
        if norm.training and stats.shape[0] < 2:
            # one image has no batch statistics (BatchNorm1d would raise): its running ones
            z = F.batch_norm(stats, norm.running_mean, norm.running_var, training=False, eps=norm.eps)
        else:
            z = norm(stats)
        return (z * (prompt.to(z.dtype) @ self.noise_weight)).sum(dim=1)


#: ``MedIQANet`` state-dict prefixes that switch its texture branch off when they are 0 (the branch
#: adds ``proj``'s output to the features): a network without the branch computes exactly what the
#: grown network computes with these at 0 (``training.soup`` averages plain and grown members so)
TEXTURE_OFF_WHEN_ZERO = ("texture.proj.", "texture.noise_weight")


def create_vit(vit_name: str, image_size: int, overrides: Sequence[tuple[str, object]] = (),
               init_weights: Path | None = None, keep_blocks: Sequence[int] | None = None,
               stem: str = "patch") -> nn.Module:
    """A timm VisionTransformer built without downloading anything.

    ``init_weights`` (optional) is a local timm state-dict file loaded before pruning;
    ``keep_blocks`` prunes the blocks after the last index and the final norm / head, so every
    remaining parameter takes part in the forward pass. ``stem="conv"`` replaces the linear patch
    projection by a ``ConvStem`` (after ``init_weights``, whose patch projection is then unused).
    """
    import timm

    kw: dict[str, object] = {"img_size": image_size}
    kw.update(dict(overrides))
    vit = timm.create_model(vit_name, pretrained=False, num_classes=0, **kw)
    if init_weights is not None:
        from engines.models.loading import load_encoder_weights

        load_encoder_weights(vit, Path(init_weights))
    if stem == "conv":
        proj = vit.patch_embed.proj
        vit.patch_embed.proj = ConvStem(proj.in_channels, proj.out_channels, int(proj.stride[0]))
        if init_weights is not None:
            log.warning("conv stem: the patch projection of %s is not used", Path(init_weights).name)
    elif stem != "patch":
        raise ValueError(f"unknown ViT stem {stem!r}; expected 'patch' or 'conv'")
    if keep_blocks is not None:
        vit.prune_intermediate_layers(list(keep_blocks), prune_norm=True, prune_head=True)
    return vit


class TransposedAttention(nn.Module):
    """MANIQA's transposed attention block (TAB): attention between channels.

    Input (B, C, L) float32 with L = G² tokens. q, k, v are Linear(L → L) maps over the token axis;
    the attention matrix is (B, C, C) with scale L^-0.5; dropout on the output; residual.
    """

    def __init__(self, tokens: int, drop: float = 0.1) -> None:
        super().__init__()
        self.q = nn.Linear(tokens, tokens)
        self.k = nn.Linear(tokens, tokens)
        self.v = nn.Linear(tokens, tokens)
        self.scale = tokens ** -0.5
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        attn = (self.q(x) @ self.k(x).transpose(1, 2)) * self.scale
        out = attn.softmax(dim=-1) @ self.v(x)
        return x + self.drop(out)


def _head(width: int, hidden: int, drop: float, last: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(drop), nn.Linear(hidden, 1), last)


def fuse_in_graph(slice_scores: Tensor, slice_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(N, K) scores and logits → (score (N,), slice_scores (N, K), slice_weights (N, K) softmax over K)."""
    weights = slice_logits.softmax(dim=1)
    return (weights * slice_scores).sum(dim=1), slice_scores, weights


class _VolumeMixin:
    """``forward_volume`` in terms of ``forward``: one batched 2D pass over N·K slices, then fusion."""

    def forward_volume(self, volumes: Tensor, prompt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """volumes (N, K, 3, S, S) float32, prompt (N, P) → (score (N,), slice_scores (N, K), slice_weights (N, K))."""
        flat, flat_prompt, k = _slices_of(volumes, prompt)
        scores, logits = self(flat, flat_prompt)  # type: ignore[operator]
        return fuse_in_graph(scores.reshape(-1, k), logits.reshape(-1, k))


def _slices_of(volumes: Tensor, prompt: Tensor) -> tuple[Tensor, Tensor, int]:
    """volumes (N, K, 3, S, S), prompt (N, P) → (slices (N·K, 3, S, S), their prompts (N·K, P), K)."""
    if volumes.dim() != 5:
        raise UnsupportedInput(f"volumes must be (N, K, 3, S, S), got {tuple(volumes.shape)}")
    k = volumes.shape[1]
    flat = volumes.reshape(-1, volumes.shape[2], volumes.shape[3], volumes.shape[4])
    return flat, prompt.unsqueeze(1).expand(-1, k, -1).reshape(-1, prompt.shape[-1]), k


class MedIQANet(_VolumeMixin, nn.Module):
    """Prompted MANIQA. ``forward(images (N,3,S,S), prompt (N,P)) -> (score (N,), slice_logit (N,))``.

    ``score`` is in the model's [0, 1] label scale (not clamped; non-negative unless the preset
    adds the texture branch's noise term); images are normalised with the card's mean / std (0.5 / 0.5).
    """

    def __init__(self, preset: PresetConfig | str, prompt_dim: int, *,
                 init_weights: Path | None = None) -> None:
        super().__init__()
        cfg = get_preset(preset) if isinstance(preset, str) else preset
        self.preset = cfg
        self.prompt_dim = prompt_dim
        self.feature_blocks = tuple(cfg.blocks)
        g, (c1, c2) = cfg.grid, cfg.widths
        self.encoder = create_vit(cfg.vit_name, cfg.image_size, cfg.vit_overrides, init_weights,
                                  keep_blocks=cfg.blocks, stem=cfg.stem)
        stage = dict(n_layers=cfg.swin_layers, blocks_per_layer=cfg.swin_blocks_per_layer,
                     heads=cfg.swin_heads, window=cfg.window_size, mlp_dim=cfg.swin_mlp_dim,
                     prompt_dim=prompt_dim, drop=cfg.drop, drop_path=cfg.drop_path,
                     residual_scale=cfg.residual_scale)
        self.tab1 = nn.Sequential(*(TransposedAttention(g * g, cfg.drop) for _ in range(cfg.tab_per_stage)))
        self.reduce1 = nn.Conv2d(cfg.feature_channels, c1, kernel_size=1)
        self.swin1 = SwinStage(c1, g, **stage)
        self.tab2 = nn.Sequential(*(TransposedAttention(g * g, cfg.drop) for _ in range(cfg.tab_per_stage)))
        self.reduce2 = nn.Conv2d(c1, c2, kernel_size=1)
        self.swin2 = SwinStage(c2, g, **stage)
        self.score_head = _head(c2, cfg.head_width, cfg.drop, nn.ReLU())
        self.weight_head = _head(c2, cfg.head_width, cfg.drop, nn.Sigmoid())
        self.slice_head = nn.Linear(c2, 1)
        self.texture = (TextureBranch(cfg.patch_size, cfg.feature_channels, scales=cfg.texture_scales,
                                      prompt_dim=prompt_dim if cfg.noise_term else 0,
                                      sharpness=cfg.sharpness_term)
                        if cfg.texture else None)
        for name, module in self.named_children():
            if name != "encoder":
                module.apply(_init_linear)

    def _check_inputs(self, images: Tensor, prompt: Tensor) -> None:
        s = self.preset.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != s or images.shape[3] != s:
            raise UnsupportedInput(f"images must be (N, 3, {s}, {s}) for preset {self.preset.name}, "
                                   f"got {tuple(images.shape)}")
        if prompt.dim() != 2 or prompt.shape[1] != self.prompt_dim or prompt.shape[0] != images.shape[0]:
            raise UnsupportedInput(f"prompt must be (N={images.shape[0]}, {self.prompt_dim}), "
                                   f"got {tuple(prompt.shape)}")

    def features(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """(N, 3, S, S) → concatenated intermediate ViT features (N, 4·D, G, G), plus the texture
        branch's output for a ``texture`` preset; and the branch's energy (None without it)."""
        feats = self.encoder.forward_intermediates(
            images, indices=list(self.feature_blocks), norm=False, output_fmt="NCHW",
            intermediates_only=True,
        )
        x = torch.cat(feats, dim=1)
        energy = None
        if self.texture is not None:
            energy = self.texture.energy(images)
            x = x + self.texture.project(energy)
        return x, energy

    def forward(self, images: Tensor, prompt: Tensor) -> tuple[Tensor, Tensor]:
        # Eager-mode checks only: under ONNX tracing / torch.export they would be baked into the
        # graph or add guards between the (independently dynamic) batch axes.
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self._check_inputs(images, prompt)
        x, energy = self.features(images)
        x = self.swin1(self.reduce1(_tab(self.tab1, x)), prompt)
        x = self.swin2(self.reduce2(_tab(self.tab2, x)), prompt)
        tokens = x.flatten(2).transpose(1, 2)                 # (N, G², C2)
        s_tok = self.score_head(tokens).squeeze(-1)            # (N, G²)
        w_tok = self.weight_head(tokens).squeeze(-1)
        score = (s_tok * w_tok).sum(dim=1) / (w_tok.sum(dim=1) + _EPS)
        if energy is not None and self.texture is not None and self.texture.noise_weight is not None:
            score = score + self.texture.noise_term(energy, prompt, images)
        slice_logit = self.slice_head(tokens.mean(dim=1)).squeeze(-1)
        return score, slice_logit


class EnsembleNet(_VolumeMixin, nn.Module):
    """Average of several IQA models (paper "Ours-e"): mean score and mean slice logit.

    ``forward_volume`` fuses the averaged slice scores with the averaged logits, so it equals
    ``fuse_slice_scores`` applied to this module's ``forward`` like for a single model.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, images: Tensor, prompt: Tensor) -> tuple[Tensor, Tensor]:
        outs = [m(images, prompt) for m in self.members]
        score = torch.stack([o[0] for o in outs]).mean(dim=0)
        logit = torch.stack([o[1] for o in outs]).mean(dim=0)
        return score, logit


class TTANet(_VolumeMixin, nn.Module):
    """A model averaged over test-time copies of its input (``engines.tta``): per image, the mean
    score and mean slice logit over the mode's (quarter turns, mirror) transforms, so that
    ``forward_volume`` fuses them exactly as ``engines.tta.TTABackend`` does.

    ``mode`` is a fixed mode or an ``engines.tta.TTAPolicy`` (``auto``): then each row gets the
    mode of the modality in its prompt (``vocab`` locates the modality one-hot)."""

    def __init__(self, model: nn.Module, mode: str | Any, vocab: Any = None) -> None:
        from engines.prompts import DEFAULT_VOCAB  # noqa: PLC0415
        from engines.tta import TTAPolicy  # noqa: PLC0415

        super().__init__()
        self.model = model
        self.policy = mode if isinstance(mode, TTAPolicy) else TTAPolicy.fixed(mode)
        self.mode = mode if isinstance(mode, str) else "auto"
        self.vocab = vocab or DEFAULT_VOCAB

    def _averaged(self, images: Tensor, prompt: Tensor, mode: str) -> tuple[Tensor, Tensor]:
        from engines.tta import tta_transforms  # noqa: PLC0415

        scores, logits = [], []
        for k, mirror in tta_transforms(mode):
            x = torch.rot90(images, k, dims=(-2, -1)) if k % 4 else images
            s, z = self.model(x.flip(-1) if mirror else x, prompt)
            scores.append(s)
            logits.append(z)
        return torch.stack(scores).mean(dim=0), torch.stack(logits).mean(dim=0)

    def forward(self, images: Tensor, prompt: Tensor) -> tuple[Tensor, Tensor]:
        modes = self.policy.modes_of(prompt.detach().cpu().numpy(), self.vocab)
        if len(set(modes)) <= 1:
            return self._averaged(images, prompt, modes[0] if modes else self.policy.fallback)
        score = images.new_zeros(len(images))
        logit = images.new_zeros(len(images))
        for mode in dict.fromkeys(modes):
            rows = torch.tensor([i for i, m in enumerate(modes) if m == mode], device=images.device)
            s, z = self._averaged(images[rows], prompt[rows], mode)
            score[rows] = s.to(score.dtype)
            logit[rows] = z.to(logit.dtype)
        return score, logit


class MultiTTANet(nn.Module):
    """Several fixed TTA modes from one pass (``mediqa train tta-policy`` measures none, flip and
    d4 this way): each transform of the modes' union runs once, and column m of the outputs is
    the mean over mode m's transforms, taken in the order ``TTANet`` takes it, so that it equals
    ``TTANet(model, modes[m])``. ``forward`` → (score (N, M), slice_logit (N, M));
    ``forward_volume`` fuses each column as ``_VolumeMixin`` does → (score (N, M), None, None).
    Cost: the union's transforms (8 for any set holding d4), against 1 + 2 + 8 for three runs."""

    def __init__(self, model: nn.Module, modes: tuple[str, ...]) -> None:
        from engines.tta import tta_transforms  # noqa: PLC0415

        super().__init__()
        self.model = model
        self.modes = tuple(modes)
        per_mode = [tta_transforms(m) for m in self.modes]
        self.transforms = tuple(dict.fromkeys(t for ts in per_mode for t in ts))
        self.columns = [[self.transforms.index(t) for t in ts] for ts in per_mode]

    def forward(self, images: Tensor, prompt: Tensor) -> tuple[Tensor, Tensor]:
        outs = []
        for k, mirror in self.transforms:
            x = torch.rot90(images, k, dims=(-2, -1)) if k % 4 else images
            outs.append(self.model(x.flip(-1) if mirror else x, prompt))
        score = torch.stack([torch.stack([outs[i][0] for i in c]).mean(dim=0) for c in self.columns], dim=1)
        logit = torch.stack([torch.stack([outs[i][1] for i in c]).mean(dim=0) for c in self.columns], dim=1)
        return score, logit

    def forward_volume(self, volumes: Tensor, prompt: Tensor) -> tuple[Tensor, None, None]:
        flat, flat_prompt, k = _slices_of(volumes, prompt)
        scores, logits = self(flat, flat_prompt)
        fused = [fuse_in_graph(scores[:, m].reshape(-1, k), logits[:, m].reshape(-1, k))[0]
                 for m in range(len(self.modes))]
        return torch.stack(fused, dim=1), None, None


def _tab(blocks: nn.Sequential, x: Tensor) -> Tensor:
    """Apply TABs to (N, C, G, G) by viewing it as (N, C, G²)."""
    n, c, h, w = x.shape
    return blocks(x.flatten(2)).reshape(-1, c, h, w)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
