"""Plan, generate and index the synthetic corpus (``mediqa synth``).

A corpus is planned in one process from the seed (``plan_corpus``: one ``StudySpec`` per study,
with every physical parameter already drawn), then each study is rendered independently
(``render_study``, in worker processes) with its own random generator seeded by
``(seed, study index)``. Hence the output does not depend on the number of workers, and the same
seed gives byte-identical files and manifest.

Quality score (SYNTHETIC — derived from the simulation parameters, not from human readers)::

    score = Π_d (1 − w_d · s_d)          s_d ∈ [0, 1] normalised severity of degradation d

over every degradation applied to the study (CT always has a dose, MR always a field strength).
Each ``s_d`` is monotone in the physical parameter (``SEVERITY`` below):

=============  =====================  ===========================================  =====
d              parameter              s_d                                          w_d
=============  =====================  ===========================================  =====
dose (CT)      mAs ∈ [10, 400]        (mAs^-½ − 400^-½) / (10^-½ − 400^-½)         0.90
views (CT)     n ∈ [18, 180]          log(180 / n) / log(10)                       0.85
blur (CT)      σ ∈ [0, 2.5] mm        σ / 2.5                                      0.85
field (MR)     B0 ∈ {0.5 … 7} T       (1/B0 − 1/7) / (1/0.5 − 1/7)                 0.90
ringing (MR)   kept k-space f         (1 − f) / 0.85,  f ∈ [0.15, 1]               0.75
motion (MR)    amplitude a px@256     a / 6                                        0.85
bias (MR)      log-amplitude b        b / 0.8                                      0.50
blur (2D)      σ ∈ [0, 3] px@256      σ / 3                                        0.85
noise (2D)     σ ∈ [0, 0.12]          σ / 0.12                                     0.90
jpeg (2D)      quality q ∈ [5, 95]    log(95 / q) / log(19)                        0.85
illumination   strength b ∈ [0, 0.7]  b / 0.7                                      0.60
pixelation     block b ∈ {1 … 8} px   (b − 1) / 7                                  0.80
quantisation   levels n ∈ [4, 64]     log2(64 / n) / 4                             0.70
=============  =====================  ===========================================  =====

The last two are drawn only with ``train_extra_kinds`` (training studies, any modality).

The noise severities are proportional to the noise standard deviation the physics predicts
(σ ∝ mAs^-½ for CT, σ ∝ 1/B0 for MR), shifted so the best setting is 0. Severities are drawn
uniformly in [0, 1] and mapped back to the physical parameter, so every part of the range is
covered. A "mixed" study combines two degradations of its modality.

Manifest (``OUT_DIR/manifest.csv``), one row per study: ``path`` (relative to OUT_DIR; a DICOM
series is its folder), ``score``, ``modality``, ``region``, ``type``, ``dimension``, ``split``,
``source_id`` (the split unit, see ``sources``), ``degradation`` (e.g. ``dose`` or
``dose+blur``), ``severity`` (the largest normalised severity among the named degradations),
``params`` (JSON: every physical parameter and every s_d), ``physical`` (mAs for CT, tesla for
MR, empty otherwise), ``format`` (dicom / nifti / png / jpeg), ``n_slices``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage
from skimage.transform import resize

from engines.errors import DatasetError
from engines.files import atomic_write_text
from training.synth import degrade
from training.synth.sources import (OPTIONAL_SOURCES, BaseImage, Unit, all_units, check_sources, load_unit,
                                    split_region)
from training.synth.writers import (
    hu_to_stored, to_uint16, write_dicom_image, write_dicom_series, write_jpeg, write_nifti,
    write_png,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS: tuple[str, ...] = (
    "path", "score", "modality", "region", "type", "dimension", "split", "source_id",
    "degradation", "severity", "params", "physical", "format", "n_slices",
)
SPLIT_PROBS: dict[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}
MR_FIELDS: tuple[float, ...] = (0.5, 1.0, 1.5, 3.0, 7.0)
MR_STORED_REF = 1000.0  # the clean 99th percentile is scaled to this stored value
CT_WINDOWS = {"lung": (-600, 1500), "soft": (40, 400), "bone": (300, 2000)}
CTDI_PER_MAS = 0.075  # mGy per mAs, nominal 32 cm body phantom at 120 kVp, pitch 1


# --- severities -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Severity:
    """Map between a physical parameter and its normalised severity s ∈ [0, 1]."""

    param: str
    weight: float
    to_s: Callable[[float], float]
    from_s: Callable[[float], float]


def _inv_sqrt_s(lo: float, hi: float) -> tuple[Callable[[float], float], Callable[[float], float]]:
    a, b = hi ** -0.5, lo ** -0.5
    return (lambda v: (v ** -0.5 - a) / (b - a)), (lambda s: (a + s * (b - a)) ** -2)


def _linear(hi: float) -> tuple[Callable[[float], float], Callable[[float], float]]:
    return (lambda v: v / hi), (lambda s: s * hi)


_dose = _inv_sqrt_s(10.0, 400.0)
_inv_b0 = ((lambda b: (1 / b - 1 / 7.0) / (1 / 0.5 - 1 / 7.0)),
           (lambda s: 1.0 / (1 / 7.0 + s * (1 / 0.5 - 1 / 7.0))))
SEVERITY: dict[str, Severity] = {
    "dose": Severity("mas", 0.90, *_dose),
    "views": Severity("views", 0.85, lambda n: math.log(180.0 / n) / math.log(10.0),
                      lambda s: 180.0 / 10.0 ** s),
    "blur_mm": Severity("blur_mm", 0.85, *_linear(2.5)),
    "field": Severity("tesla", 0.90, *_inv_b0),
    "ringing": Severity("keep", 0.75, lambda f: (1.0 - f) / 0.85, lambda s: 1.0 - 0.85 * s),
    "motion": Severity("motion_px", 0.85, *_linear(6.0)),
    "bias": Severity("bias", 0.50, *_linear(0.8)),
    "blur": Severity("blur_px", 0.85, *_linear(3.0)),
    "noise": Severity("noise_sigma", 0.90, *_linear(0.12)),
    "jpeg": Severity("quality", 0.85, lambda q: math.log(95.0 / q) / math.log(19.0),
                     lambda s: 95.0 / 19.0 ** s),
    "illumination": Severity("illumination", 0.60, *_linear(0.7)),
    # train_extra_kinds only (``EXTRA_KINDS``): storage / display defects of any modality
    "pixelation": Severity("pixel_block", 0.80, lambda b: (b - 1.0) / 7.0, lambda s: 1.0 + 7.0 * s),
    "quantisation": Severity("levels", 0.70, lambda n: math.log2(64.0 / n) / 4.0,
                             lambda s: 64.0 / 2.0 ** (4.0 * s)),
}

# Degradation kinds per modality: name → the severity keys it varies.
KINDS: dict[str, dict[str, tuple[str, ...]]] = {
    "ct": {"dose": ("dose",), "sparse": ("views",), "blur": ("blur_mm",)},
    "mr": {"noise": ("field",), "ringing": ("ringing",), "motion": ("motion",), "bias": ("bias",)},
    "xr": {"blur": ("blur",), "noise": ("noise",), "jpeg": ("jpeg",),
           "illumination": ("illumination",)},
    "fundus": {"blur": ("blur",), "noise": ("noise",), "jpeg": ("jpeg",),
               "illumination": ("illumination",)},
}
MIXED_FRACTION = 0.25
# ``train_windows``: a training study of a tiled (X-ray / fundus) source shows a random window of
# its split's region, of this size relative to one tile (aspect kept; capped by the region).
WINDOW_SCALE = (0.6, 1.25)
# ``dose_label="noise"``: the CT dose severity is read off the quantum noise the simulation puts
# into the study's own anatomy (σ in HU over the body of its central slice, a full-view
# acquisition at the study's mAs, ``degrade.ct_noise_sigma``) instead of off the mAs:
# s = (σ − lo) / (hi − lo), clipped. The same mAs is noisier on a larger or more finely sampled
# body (σ at 100 mAs: 13.7 HU on the 693 head, 22.0 on the abdomen, 256-px slices), and the
# noise is what a reader sees. lo / hi: the least noisy training source at 400 mAs and the
# noisiest at 10 mAs (6.9 and 69.0 HU, measured 2026-12-04 on the 256-px slices).
# ``train_warp``: a CT / MR training study's anatomy is deformed before it is degraded — a random
# zoom (isotropic ``WARP_ZOOM`` times an aspect change ``WARP_ASPECT``), a rotation of up to
# ``WARP_ROTATE_DEG`` and a smooth elastic displacement of up to ``WARP_ELASTIC`` × the image size
# (Gaussian-filtered noise, σ = size / 8). CT has three and MR five training sources; the warp
# makes every study a different body size, shape and field of view of them. The degradation is
# simulated on the warped anatomy, so CT noise per mAs follows the warped body. Drawn from a
# generator of its own: the study's parameters, noise draws and every val / test study are the
# same with or without the option.
WARP_ZOOM = (0.8, 1.25)
WARP_ASPECT = (0.9, 1.1)
WARP_ROTATE_DEG = 15.0
WARP_ELASTIC = 0.03
# ``train_warp_2d``: the same for the X-ray / fundus training studies (four and two training
# tiles of two radiographs and one photograph), plus a random tone curve x ** γ, log γ uniform in
# ±``TONE_LOG_GAMMA`` (γ ∈ [0.7, 1.43]): detectors, exposures and display curves differ, so the
# normal brightness of a tile is not quality information. Without it a model can learn what its
# few training tiles "normally" look like and score any departure from that (an uneven
# illumination, or the other tiles) by memory. The degradations are applied after it, so the
# scores do not change; spline interpolation (order 3, clipped) keeps the clean image as sharp
# as it was, since the 2D blur severity is in pixels. Its own generator, as for ``train_warp``.
TONE_LOG_GAMMA = 0.36
# ``train_tone_mr``: an MR training study's clean anatomy gets the same kind of random tone curve
# (x / r) ** γ · r, r its 99th percentile, before it is degraded. MR intensities have no physical
# unit: scanners, coils and sequences weight the same tissue differently, and the five MR
# training sources are five contrasts. Drawn from a generator of its own (see ``_tone_rng``).

# ``train_extra_mr``: two more MR training sources (``training.synth.sources.EXTRA_MR``: a 3 T BOLD
# EPI and a multiband DWI b0 volume of two further subjects, from heudiconv's test data). The MR
# studies whose split draw is "train" now pick among seven training sources instead of five; the
# plan draws the same random numbers either way, so every other study (CT, X-ray, fundus, all of
# validation and test) is planned and rendered identically (tested).
# ``train_more_mr``: one more MR training source (``training.synth.sources.MORE_MR``: dipy's
# ``aniso_vox``, a whole-brain T2-weighted b0 volume on a 58 × 58 matrix at 4 mm, a subject of its
# own); the same guarantee. The test split's MR sources are coarse (the 128 × 96 EPI, the 64 × 64
# ``MR_small``); this adds a coarse subject to training's (33 × 41 T1, 64 × 64 BOLD, 128 × 128 b0).

# ``train_ct_windows``: a CT training study is displayed in a random CT window (soft, lung or bone,
# equally likely): its WindowCenter / WindowWidth tags and its type prompt say which. The CT
# training sources are a head, an abdomen and a skull base, so without it every CT training study
# is a soft-tissue window, while chest CT is read in a lung window as often as not (the validation
# source is: half of its studies are). Only the tags and the prompt change: the HU pixels, the
# physics, the scores and every other study are the same either way (the choice comes from a
# generator of its own, see ``_ct_window_rng``).
CT_TRAIN_WINDOWS = ("soft", "lung", "bone")

# ``train_ct_fov``: half of the CT training studies (a draw of their own) are written as a small
# field of view: a square crop, centred on anatomy, whose side is a fraction (uniform in
# ``TRAIN_CT_FOV``) of the reconstructed image, at the same pixel spacing. The acquisition is
# simulated on the whole slice first, so dose, noise texture per mm, blur and streaks are those of
# the full study, and so is the score; the file shows less of the body, as a targeted or cropped
# reconstruction does. Why: the validation CT (``CT_small``) is an 85 mm field of view, which at the
# network's 1 mm per pixel fills 85 of 224 pixels, while every CT training study fills the canvas;
# every model ranks it at chance.
TRAIN_CT_FOV_P = 0.5
TRAIN_CT_FOV = (0.3, 0.6)

# ``train_mr_matrix``: half of the MR training studies (a draw of their own, see ``_matrix_rng``)
# draw an acquisition matrix from ``TRAIN_MR_MATRICES``; where it is coarser than the size they
# would have had, they are simulated and written on it at the same field of view (so a larger
# pixel); a draw at or above that size changes nothing. Scanners acquire EPI,
# DWI and fast sequences on 64–128 matrices and the scorer resizes such files itself; with only
# two coarse MR training sources, a model sees noise, ringing and motion at that scale on two
# anatomies. The noise σ, the ringing's kept fraction (of the matrix) and the motion's fraction
# of the field of view keep their meaning, so the scores do not change.
TRAIN_MR_MATRICES = (64, 96, 128, 192)
TRAIN_MR_MATRIX_P = 0.5

# ``train_mr_apodize``: half of the MR training studies (a draw of their own, see
# ``_option_draw``) are reconstructed with a Hamming k-space filter wherever their k-space is
# truncated (ringing), as scanners' filters do: the same resolution loss and score, shown as blur
# instead of Gibbs ringing. Without it the only scored MR resolution loss in training carries
# ringing, and the bundled model rewards MR pixelation (benchmarks/unseen_degradations.py,
# 2026-12-06: −0.80 with the defaults). Studies without truncation are unchanged.
TRAIN_MR_APODIZE_P = 0.5

# ``train_band_noise``: half of the CT and MR training studies (a draw of their own, see
# ``_option_draw``) lose their resolution *with* their noise, as real acquisitions do: CT blur
# is applied after the reconstruction (a soft kernel: the noise is smoothed too) instead of to
# the object before it, and truncated MR k-space carries its noise (acquired in k-space, see
# ``degrade.mr_acquire``'s ``kspace_noise``). Same parameters and scores. Without it every blurred
# or truncated CT / MR training study still carries full-band white noise, so a smooth image is
# always a high-dose / high-field one, and the bundled model scores CT posterisation and MR
# pixelation as better (benchmarks/unseen_degradations.py, 2026-12-06).
TRAIN_BAND_NOISE_P = 0.5

# ``train_extra_kinds``: a fraction ``TRAIN_EXTRA_KINDS_P`` of the training studies of every
# modality (a draw of their own, see ``_draw_extra_kind``) get one more defect, drawn from
# ``EXTRA_KINDS``, on top of what the plan gave them, after the acquisition and before the file is
# written, with its severity in the score (table above):
# * ``pixelation``: block averages of b × b pixels of the 256 working grid (b = 1 … 8, rounded
#   from a uniform severity, so b = 1, nothing, now and then; scaled to a smaller MR matrix, at
#   least 2 when b > 1) shown at full size — a low-resolution image upscaled with nearest
#   neighbours;
# * ``quantisation``: the intensities rounded to n levels (4 … 64) across the modality's display
#   range: CT steps of 400 / n HU (n levels over a soft-tissue window), MR steps of its 99th
#   percentile / n, 2D images n levels over [0, 1] — bit-depth loss, banding.
# Why: the corpus' CT and MR degradations are noise-led, and every model here scores a smooth or
# blocky CT / MR image as better (posterisation, pixelation; benchmarks/unseen_degradations.py).
# Two more kinds of every modality make the training degradations more diverse; impulse noise,
# stripes and contrast loss stay unseen, to tell whether diversity generalises. Val / test are
# unchanged, and so are the drawn studies' other parameters.
EXTRA_KINDS = ("pixelation", "quantisation")
TRAIN_EXTRA_KINDS_P = 0.3

# ``train_siblings``: a fraction ``TRAIN_SIBLINGS_P`` of the training studies (every modality and
# dimension; a draw of their own) get a sibling, the same anatomy with other degradations. With a
# ``pairdiff`` loss (``training.loop.pair_difference_loss``) the difference of two siblings' scores
# is fitted to the difference of their labels: what separates two degradations is learnt on one
# content, the way the held-out sources must be ranked, instead of through content differences
# between studies (as in ranking on distortions of one image, RankIQA).
TRAIN_SIBLINGS_P = 0.3

# ``train_mr_fields``: an MR training study whose noise is drawn by the plan (the ``noise`` kind,
# alone or mixed) takes its field strength from ``MR_FIELDS`` with equal probability (a draw of its
# own, ``_draw_mr_field``) instead of a uniform severity snapped to the nearest field. The snapped
# draw puts 0.5 / 1 / 1.5 / 3 / 7 T at 32 / 34 / 18 / 12 / 4 % (``SEVERITY["field"]`` is ∝ 1 / B0),
# so little noise is rare in training, and every other MR training study (at 3 or 7 T) carries a
# defect of its own: the network never learns the top of the MR scale (README "What limits it",
# 2026-12-07: it moves a held-out slice's score by +0.001 / −0.021 / −0.057 at 3 / 1.5 / 1 T while
# the labels move by 0.09 / 0.25 / 0.42). The score follows the new field by the same formula;
# images differ only in the noise's amplitude (the study's streams are unchanged); val / test and
# every other study are the same either way.
TRAIN_MR_FIELDS_SALT = 0xF1E1
CT_QUANT_WINDOW_HU = 400.0

DOSE_LABELS = ("mas", "noise")
# ``val_sources="two"``: one more CT and one more MR source move from training to validation, so
# that validation holds two sources of each (CT_small + the skull-base CT; the 3 T head T1 + the
# shoulder T1) — the rules that choose on validation (a TTA mode, a feature-head blend, the best
# epoch) then see how a model places one source against another, which one source cannot show.
# Training keeps two CT (head, abdomen) and four MR sources (head T1 ×2, DWI, abdomen). A new
# corpus: the plan changes everywhere, not only for the moved sources.
VAL_MOVES: dict[str, tuple[str, ...]] = {"one": (), "two": ("ct-head2", "mr-shoulder")}
VAL_SOURCES = tuple(VAL_MOVES)


@dataclass(frozen=True)
class GeneratorOption:
    """One option of the corpus generator beyond size and seed. This table drives the keyword of
    ``plan_corpus`` / ``generate_corpus``, the ``mediqa synth`` flag, the recipe's ``synth:`` key,
    the corpus identity and the model card's data summary (``training.recipe``)."""

    name: str                      # keyword, recipe key; the CLI flag is --name-with-dashes
    default: bool | str
    help: str
    choices: tuple[str, ...] = ()  # a str option's values
    pretrain: bool = True          # False: the pretrain stage's inputs (CT / MR images, tags) do not change
    always_in_summary: bool = False   # the card's data summary names it even at its default

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: object) -> bool | str:
        """``value`` if it is a valid setting, else ValueError naming the option."""
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{self.name} must be true or false, got {value!r}")
        elif value not in self.choices:
            raise ValueError(f"{self.name} must be one of {self.choices}, got {value!r}")
        return value

    def cli_args(self, value: bool | str) -> list[str]:
        """The ``mediqa synth`` arguments that set ``value`` (none at the default)."""
        if value == self.default:
            return []
        return [self.flag] if isinstance(value, bool) else [self.flag, str(value)]


GENERATOR_OPTIONS: tuple[GeneratorOption, ...] = (
    GeneratorOption("train_windows", False, "Training studies of X-ray / fundus show a random window of "
                    "the training region (position and scale) instead of a fixed tile; val/test are "
                    "unchanged.", pretrain=False, always_in_summary=True),
    GeneratorOption("dose_label", "mas", "CT dose severity in the score: from the mAs, or from the "
                    "quantum noise (HU) the simulation put into the study's own anatomy. Images and "
                    "tags are the same.", choices=DOSE_LABELS, pretrain=False),
    GeneratorOption("train_warp", False, "CT / MR training studies show a randomly deformed anatomy "
                    "(zoom, aspect, rotation, elastic warp) before the degradation is simulated; "
                    "val/test are unchanged."),
    GeneratorOption("train_warp_2d", False, "X-ray / fundus training studies are warped likewise and "
                    "get a random tone curve (gamma 0.7-1.43) before they are degraded; val/test and "
                    "CT / MR are unchanged.", pretrain=False),
    GeneratorOption("train_tone_mr", False, "MR training studies get a random tone curve (gamma "
                    "0.7-1.43) on their clean anatomy before they are degraded; val/test and the "
                    "other modalities are unchanged."),
    GeneratorOption("val_sources", "one", "How many sources of CT and of MR the validation split holds: "
                    "one (CT_small; the 3 T head T1), or two (one training source of each moved to "
                    "validation: the skull-base CT, the shoulder MR). Changes the whole corpus.",
                    choices=VAL_SOURCES),
    GeneratorOption("train_extra_mr", False, "Two more MR training sources (a 3 T BOLD EPI and a "
                    "multiband DWI b0 volume shipped in heudiconv; pip install --no-deps heudiconv); "
                    "val/test and the other modalities are unchanged."),
    GeneratorOption("train_ct_windows", False, "CT training studies are displayed in a random window "
                    "(soft, lung or bone) named by their WindowCenter / WindowWidth tags and type "
                    "prompt; HU pixels, scores, val/test and the other modalities are unchanged."),
    GeneratorOption("mr_native_kspace", False, "MR studies are acquired on their source's own "
                    "matrix: k-space zero-filled beyond it (as scanners reconstruct), and the ringing's "
                    "kept k-space fraction is a fraction of that matrix, not of the 256 grid. Changes "
                    "the MR images of sources coarser than the grid in every split; plan and scores "
                    "are unchanged."),
    GeneratorOption("mr_native_matrix", False, "MR studies of sources coarser than the 256 grid are "
                    "simulated and written on the source's own matrix and pixel spacing, as archives "
                    "hold them (the scorer resizes them); plan and scores are unchanged."),
    GeneratorOption("train_mr_matrix", False, "Half of the MR training studies draw an acquisition "
                    "matrix (64, 96, 128 or 192 on the long side); those it makes coarser are simulated "
                    "and written on it at the same field of view, as EPI, DWI and fast scans are; "
                    "val/test, the plan and the scores are unchanged."),
    GeneratorOption("train_mr_apodize", False, "Half of the MR training studies are reconstructed with a "
                    "Hamming k-space filter where their k-space is truncated: the same resolution loss and "
                    "score, shown as blur instead of ringing; val/test, the plan and the scores are unchanged."),
    GeneratorOption("train_band_noise", False, "Half of the CT and MR training studies lose resolution with "
                    "their noise: CT blur after the reconstruction (a soft kernel), truncated MR k-space "
                    "with its noise; val/test, the plan and the scores are unchanged."),
    GeneratorOption("train_more_mr", False, "One more MR training source: dipy's aniso_vox, a whole-brain "
                    "T2-weighted b0 volume on a 58 x 58 matrix at 4 mm (pip install dipy); val/test and "
                    "the other modalities are unchanged."),
    GeneratorOption("train_ct_fov", False, "Half of the CT training studies are written as a small field "
                    "of view: a crop centred on anatomy, 0.3-0.6 of the image side, at the same pixel "
                    "spacing, after the whole slice was acquired; val/test, the plan and the scores are "
                    "unchanged."),
    GeneratorOption("train_extra_kinds", False, "30 % of the training studies of every modality get one more "
                    "defect, pixelation (1-8 px blocks) or quantisation (4-64 levels), with its severity in "
                    "the score; val/test are unchanged."),
    GeneratorOption("train_siblings", False, "30 % of the training studies get a sibling: the same anatomy "
                    "(slice, window, warp) with degradations drawn anew, appended after the plan and named "
                    "in the manifest's content column, for the pairdiff losses; every planned study is "
                    "unchanged."),
    GeneratorOption("train_mr_fields", False, "MR training studies whose noise the plan draws take their field "
                    "strength from 0.5 / 1 / 1.5 / 3 / 7 T with equal probability instead of a uniform severity "
                    "snapped to the nearest (32 / 34 / 18 / 12 / 4 %); the score follows; val/test and every "
                    "other study are unchanged."),
)


def generator_options(values: dict[str, object] | None = None) -> dict[str, bool | str]:
    """Every generator option's setting: ``values`` (e.g. a recipe's ``synth:`` section; other
    keys are ignored) checked, the rest at their defaults. ValueError on a bad value."""
    values = values or {}
    return {o.name: o.check(values.get(o.name, o.default)) for o in GENERATOR_OPTIONS}
DOSE_NOISE_HU = (7.0, 69.0)


def dose_severity_from_noise(sigma_hu: float) -> float:
    lo, hi = DOSE_NOISE_HU
    return round(float(np.clip((sigma_hu - lo) / (hi - lo), 0.0, 1.0)), 6)


def quality_score(severities: dict[str, float]) -> float:
    """Synthetic score in [0, 1] (1 = pristine): Π (1 − w_d s_d) over the given severities."""
    q = 1.0
    for key, s in severities.items():
        q *= 1.0 - SEVERITY[key].weight * float(np.clip(s, 0.0, 1.0))
    return float(q)


# --- sizes and plan ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SizeConfig:
    """How many studies of each kind, and the working resolution."""

    n2d: dict[str, int]
    n3d: dict[str, int]                 # keys: ct, mr-dicom, mr-nifti
    image_size: int = 256
    anat_slices: tuple[int, int] = (16, 24)
    air_slices: tuple[int, int] = (2, 4)


SIZES: dict[str, SizeConfig] = {
    "tiny": SizeConfig({"xr": 2, "fundus": 2, "ct": 1, "mr": 1}, {"ct": 1, "mr-dicom": 1, "mr-nifti": 1},
                       image_size=64, anat_slices=(6, 6), air_slices=(2, 2)),
    "small": SizeConfig({"xr": 100, "fundus": 100, "ct": 40, "mr": 40},
                        {"ct": 6, "mr-dicom": 4, "mr-nifti": 3}),
    "medium": SizeConfig({"xr": 400, "fundus": 400, "ct": 160, "mr": 160},
                         {"ct": 24, "mr-dicom": 16, "mr-nifti": 12}),
    "large": SizeConfig({"xr": 1600, "fundus": 1600, "ct": 640, "mr": 640},
                        {"ct": 96, "mr-dicom": 64, "mr-nifti": 48}, anat_slices=(24, 40)),
}


@dataclass(frozen=True)
class StudySpec:
    """Everything needed to render one study (all random choices of the plan already made)."""

    index: int
    modality: str
    dimension: str
    split: str
    unit: Unit
    region: str
    type: str
    degradation: str                     # e.g. "dose" or "dose+blur"
    primary: tuple[str, ...]             # severity keys named by ``degradation``
    params: dict[str, float] = field(hash=False)
    fmt: str = "dicom"                   # dicom | nifti | png | jpeg
    relpath: str = ""
    image_size: int = 256
    n_anat: int = 0
    n_air: tuple[int, int] = (0, 0)
    seed: int = 0                        # the corpus seed (UIDs and the study's generator)
    window: bool = False                 # show a random window of the split's region (train_windows)
    dose_label: str = "mas"              # CT dose severity from mAs, or from the measured noise
    warp: bool = False                   # deform the anatomy first (train_warp / train_warp_2d; training)
    tone: bool = False                   # random tone curve on the clean MR anatomy (train_tone_mr)
    native_kspace: bool = False          # MR k-space relative to the source's own matrix (mr_native_kspace)
    native_matrix: bool = False          # MR written on the source's own matrix when coarser (mr_native_matrix)
    acq_matrix: int = 0                  # MR training study's drawn matrix, used where coarser (train_mr_matrix); 0 = none
    apodize: bool = False                # MR training study's truncated k-space Hamming-filtered (train_mr_apodize)
    band_noise: bool = False             # CT / MR training study's noise band-limited with its resolution (train_band_noise)
    fov: float = 1.0                     # CT training study's written side as a fraction of the image (train_ct_fov)
    content: int = -1                    # train_siblings: the index whose anatomy this study shows (-1: its own)
    content_path: str = ""               # train_siblings: that study's relpath (the manifest's content column)

    @property
    def content_index(self) -> int:
        """The index that seeds the study's anatomy: its own, or its sibling's original's."""
        return self.index if self.content < 0 else self.content


def _draw_params(modality: str, primary: tuple[str, ...], rng: np.random.Generator
                 ) -> dict[str, float]:
    """Physical parameters: the primary degradations get s ~ U(0, 1); the rest are mild / absent."""
    p: dict[str, float] = {}
    for key in primary:
        p[SEVERITY[key].param] = SEVERITY[key].from_s(float(rng.uniform(0.0, 1.0)))
    if modality == "ct":
        if "mas" not in p:  # other CT degradations are acquired at a routine dose
            p["mas"] = float(rng.uniform(200.0, 400.0))
        p["mas"] = float(max(10, int(round(p["mas"]))))
        p["views"] = float(int(round(p.get("views", degrade.FULL_VIEWS))))
        p["exposure_time_ms"] = float(rng.choice([500, 1000]))
    if modality == "mr":
        if "tesla" in p:  # snap to a real field strength
            p["tesla"] = float(min(MR_FIELDS, key=lambda b: abs(b - p["tesla"])))
        else:
            p["tesla"] = float(rng.choice([3.0, 7.0]))
        p["motion_period"] = float(rng.uniform(3.0, 12.0))
    if modality in ("xr", "fundus") and "quality" in p:
        p["quality"] = float(int(round(p["quality"])))
    return {k: round(v, 6) for k, v in p.items()}


def severities_of(modality: str, params: dict[str, float]) -> dict[str, float]:
    """Normalised severity of every degradation present in ``params`` (see the table above)."""
    out: dict[str, float] = {}
    for key, sev in SEVERITY.items():
        if sev.param not in params:
            continue
        if key in ("blur", "blur_mm") and (modality == "ct") != (key == "blur_mm"):
            continue
        out[key] = round(float(np.clip(sev.to_s(params[sev.param]), 0.0, 1.0)), 6)
    return out


def _choose_unit(modality: str, rng: np.random.Generator, to_val: tuple[str, ...] = (),
                 optional: tuple[str, ...] = ()) -> Unit:
    units = [dataclasses.replace(u, split="val") if u.source in to_val else u
             for u in all_units(modality, optional)]
    present = [s for s in SPLIT_PROBS if any(u.split == s for u in units)]
    probs = np.array([SPLIT_PROBS[s] for s in present])
    split = present[int(rng.choice(len(present), p=probs / probs.sum()))]
    pool = [u for u in units if u.split == split]
    return pool[int(rng.integers(len(pool)))]


def plan_corpus(seed: int, size: str | SizeConfig = "small", *, train_windows: bool = False,
                dose_label: str = "mas", train_warp: bool = False,
                train_warp_2d: bool = False, train_tone_mr: bool = False,
                val_sources: str = "one", train_extra_mr: bool = False,
                train_ct_windows: bool = False, mr_native_kspace: bool = False,
                mr_native_matrix: bool = False, train_mr_matrix: bool = False,
                train_mr_apodize: bool = False, train_band_noise: bool = False,
                train_more_mr: bool = False, train_ct_fov: bool = False,
                train_extra_kinds: bool = False, train_siblings: bool = False,
                train_mr_fields: bool = False) -> list[StudySpec]:
    """Deterministic list of studies for ``seed`` and ``size`` (a name of ``SIZES`` or a config).

    ``train_windows``: training studies of tiled sources (X-ray, fundus) each show a random window
    (position, and size ``WINDOW_SCALE`` × a tile) of the region their split's tiles cover,
    instead of one fixed tile: many distinct contents from the few radiographs and photographs
    that ship in packages. Val and test studies, and the plan itself, are the same either way.

    ``dose_label``: ``"mas"`` (default) or ``"noise"`` — see ``DOSE_NOISE_HU``. Only the CT
    studies' scores change; the plan, the images and the tags are the same either way.

    ``train_warp``: CT / MR training studies show a randomly deformed anatomy (``anatomy_warp``,
    see ``WARP_ZOOM``). The plan, the parameters and the val / test studies are the same either way.

    ``train_warp_2d``: X-ray / fundus training studies likewise, plus a random tone curve (see
    ``TONE_LOG_GAMMA``); independent of ``train_warp``.

    ``train_tone_mr``: MR training studies' clean anatomy gets a random tone curve (after the
    warp, if any); the plan, the parameters and every other study are the same either way.

    ``val_sources``: ``"two"`` moves the sources of ``VAL_MOVES`` from training to validation
    (a different corpus throughout).

    ``train_extra_mr``: MR training studies also draw from ``EXTRA_MR``; every study that is not
    an MR training study is the same either way.

    ``train_more_mr``: MR training studies also draw from ``MORE_MR`` (independent of
    ``train_extra_mr``); every study that is not an MR training study is the same either way.

    ``train_ct_windows``: a CT training study's type (its display window) is drawn from
    ``CT_TRAIN_WINDOWS`` on a generator of its own; everything else is the same either way.

    ``mr_native_kspace``: MR studies (every split) are acquired on their source's own matrix
    (``mr_band``): k-space is zero-filled beyond it, and the ringing's kept fraction is a fraction
    of it. The plan, the parameters and the scores are the same either way; the MR images of
    sources whose matrix is coarser than the image grid change, nothing else.

    ``mr_native_matrix``: MR studies (every split) of a source coarser than the image grid are
    simulated and written on the source's own matrix, with its pixel spacing, as an archive holds
    them (the scorer then resizes them itself); the ringing's kept fraction is then a fraction of
    that matrix too. Plan, parameters and scores are the same either way.

    ``train_mr_matrix``: half of the MR training studies draw an acquisition matrix
    (``TRAIN_MR_MATRICES``, by ``_matrix_rng``; ``StudySpec.acq_matrix``), used where it is
    coarser than their size. Everything else,
    the scores included, is the same either way.

    ``train_mr_apodize``: half of the MR training studies (``_option_draw``; ``StudySpec.apodize``)
    get a Hamming-filtered k-space wherever it is truncated (``TRAIN_MR_APODIZE_P``). Everything
    else, the scores included, is the same either way.

    ``train_band_noise``: half of the CT and MR training studies (``_option_draw``;
    ``StudySpec.band_noise``) are blurred after reconstruction (CT) or carry their noise through
    the k-space truncation (MR); see ``TRAIN_BAND_NOISE_P``. Everything else, the scores included,
    is the same either way.

    ``train_ct_fov``: half of the CT training studies (``_draw_ct_fov``; ``StudySpec.fov``) are
    written as a crop of ``TRAIN_CT_FOV`` of their side, centred on anatomy, after the whole slice
    was acquired. Everything else, the scores included, is the same either way.

    ``train_extra_kinds``: a fraction ``TRAIN_EXTRA_KINDS_P`` of the training studies of every
    modality (``_draw_extra_kind``) get pixelation or quantisation on top: its parameter in
    ``params``, its name appended to ``degradation`` (``dose+pixelation``) and its severity in the
    score. File names, the other parameters and every other study are the same either way.

    ``train_siblings``: a fraction ``TRAIN_SIBLINGS_P`` of the training studies (``_option_draw``)
    get a sibling (``_sibling``), appended after the whole plan: the same anatomy with its
    degradations drawn anew. Every planned study is the same either way.
    """
    if dose_label not in DOSE_LABELS:
        raise ValueError(f"dose_label must be one of {DOSE_LABELS}, got {dose_label!r}")
    if val_sources not in VAL_MOVES:
        raise ValueError(f"val_sources must be one of {VAL_SOURCES}, got {val_sources!r}")
    to_val = VAL_MOVES[val_sources]
    cfg = SIZES[size] if isinstance(size, str) else size
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    buckets: list[tuple[str, str, str, int]] = []  # modality, dimension, format hint, count
    for mod in ("ct", "mr", "xr", "fundus"):
        buckets.append((mod, "2d", "", cfg.n2d.get(mod, 0)))
    buckets += [("ct", "3d", "dicom", cfg.n3d.get("ct", 0)),
                ("mr", "3d", "dicom", cfg.n3d.get("mr-dicom", 0)),
                ("mr", "3d", "nifti", cfg.n3d.get("mr-nifti", 0))]
    from training.synth.sources import source_by_name

    # the optional source groups (training.synth.sources.OPTIONAL_SOURCES) that are on
    optional = tuple(name for name, on in (("train_extra_mr", train_extra_mr), ("train_more_mr", train_more_mr))
                     if on)
    specs: list[StudySpec] = []
    for mod, dim, fmt_hint, count in buckets:
        for _ in range(count):
            index = len(specs)
            unit = _choose_unit(mod, rng, to_val, optional)
            src = source_by_name(unit.source)
            names, primary, params = _draw_degradation(mod, rng)
            ptype = src.type
            if mod == "ct" and src.region == "chest":
                ptype = "lung" if rng.uniform() < 0.5 else "soft"
            if train_ct_windows and mod == "ct" and unit.split == "train":
                wrng = _ct_window_rng(int(seed), index)
                ptype = CT_TRAIN_WINDOWS[int(wrng.integers(len(CT_TRAIN_WINDOWS)))]
            if fmt_hint:
                fmt = fmt_hint
            elif mod in ("ct", "mr"):
                fmt = "dicom"
            elif "jpeg" in names:
                fmt = "jpeg"
            elif mod == "xr":
                fmt = "dicom" if rng.uniform() < 0.4 else "png"
            else:
                fmt = "png"
            n_anat = int(rng.integers(cfg.anat_slices[0], cfg.anat_slices[1] + 1)) if dim == "3d" else 1
            n_air = ((int(rng.integers(cfg.air_slices[0], cfg.air_slices[1] + 1)),
                      int(rng.integers(cfg.air_slices[0], cfg.air_slices[1] + 1)))
                     if dim == "3d" else (0, 0))
            degr = "+".join(names)
            rel = _study_relpath(unit.split, mod, dim, index, degr, fmt)
            if train_extra_kinds and unit.split == "train":
                extra = _draw_extra_kind(int(seed), index)
                if extra is not None:   # the file name keeps the plan's names
                    degr = f"{degr}+{extra[0]}"
                    primary = primary + (extra[0],)
                    params = {**params, SEVERITY[extra[0]].param: extra[1]}
            specs.append(StudySpec(index=index, modality=mod, dimension=dim, split=unit.split,
                                   unit=unit, region=src.region, type=ptype, degradation=degr,
                                   primary=primary, params=params, fmt=fmt, relpath=rel,
                                   image_size=cfg.image_size, n_anat=n_anat, n_air=n_air,
                                   seed=int(seed), window=bool(train_windows and unit.split == "train"
                                                               and unit.tile is not None),
                                   dose_label=dose_label,
                                   warp=unit.split == "train" and (train_warp if mod in ("ct", "mr")
                                                                   else train_warp_2d),
                                   tone=bool(train_tone_mr and unit.split == "train" and mod == "mr"),
                                   native_kspace=bool(mr_native_kspace and mod == "mr"),
                                   native_matrix=bool(mr_native_matrix and mod == "mr"),
                                   acq_matrix=(_draw_acq_matrix(int(seed), index)
                                               if train_mr_matrix and mod == "mr" and unit.split == "train" else 0),
                                   apodize=(train_mr_apodize and mod == "mr" and unit.split == "train"
                                            and _option_draw(int(seed), index, 0xA90D, TRAIN_MR_APODIZE_P)),
                                   band_noise=(train_band_noise and mod in ("ct", "mr") and unit.split == "train"
                                               and _option_draw(int(seed), index, 0xB4D0, TRAIN_BAND_NOISE_P)),
                                   fov=(_draw_ct_fov(int(seed), index)
                                        if train_ct_fov and mod == "ct" and unit.split == "train" else 1.0)))
    if train_siblings:
        planned = list(specs)
        for spec in planned:
            if spec.split == "train" and _option_draw(int(seed), spec.index, 0x51B5, TRAIN_SIBLINGS_P):
                specs.append(_sibling(spec, len(specs)))
    if train_mr_fields:
        specs = [dataclasses.replace(s, params={**s.params, "tesla": _draw_mr_field(s.seed, s.index)})
                 if s.modality == "mr" and s.split == "train" and "field" in s.primary else s
                 for s in specs]
    return specs


def _sibling(spec: StudySpec, index: int) -> StudySpec:
    """``train_siblings``: study ``index`` showing ``spec``'s anatomy (``StudySpec.content``: its
    renderer seeds the anatomy from ``spec``'s stream) with a degradation drawn anew, as the plan
    draws one (single or mixed kinds, ``_draw_params``), on a generator of its own. The format
    follows the kinds (JPEG when ``jpeg`` is drawn; a JPEG original's sibling without it is a PNG);
    ``train_extra_kinds`` is not drawn for siblings."""
    names, primary, params = _draw_degradation(spec.modality, _own_rng(spec.seed, spec.index, 0x51B1))
    fmt = spec.fmt
    if spec.modality in ("xr", "fundus"):
        fmt = "jpeg" if "jpeg" in names else ("png" if spec.fmt == "jpeg" else spec.fmt)
    degr = "+".join(names)
    rel = _study_relpath(spec.split, spec.modality, spec.dimension, index, degr, fmt)
    return dataclasses.replace(spec, index=index, degradation=degr, primary=primary, params=params,
                               fmt=fmt, relpath=rel, content=spec.index, content_path=spec.relpath)


def _draw_degradation(modality: str, rng: np.random.Generator
                      ) -> tuple[list[str], tuple[str, ...], dict[str, float]]:
    """A study's degradation kinds (one, or a mixed pair with probability ``MIXED_FRACTION``; sorted
    names of ``KINDS``), their severity keys and physical parameters (``_draw_params``), from
    ``rng`` (the plan's stream, or a sibling's own)."""
    kinds = sorted(KINDS[modality])
    if rng.uniform() < MIXED_FRACTION:
        names = sorted(kinds[int(i)] for i in rng.choice(len(kinds), size=2, replace=False))
    else:
        names = [kinds[int(rng.integers(len(kinds)))]]
    primary = tuple(k for n in names for k in KINDS[modality][n])
    return names, primary, _draw_params(modality, primary, rng)


def _study_relpath(split: str, modality: str, dimension: str, index: int, degradation: str, fmt: str) -> str:
    """A study's path in the corpus: ``split/modality-dimension/index-kinds`` and the format's
    suffix (a 3D DICOM series is a folder)."""
    suffix = {"dicom": "" if dimension == "3d" else ".dcm", "nifti": ".nii.gz", "png": ".png",
              "jpeg": ".jpg"}[fmt]
    return f"{split}/{modality}-{dimension}/{index:05d}-{degradation.replace('+', '-')}{suffix}"


# --- rendering helpers -------------------------------------------------------------------------

def _resize_long_side(img: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Resize (H, W[, 3]) so the longer side is ``size``; returns the image and the zoom factor."""
    h, w = img.shape[:2]
    f = size / max(h, w)
    shape = (max(1, int(round(h * f))), max(1, int(round(w * f)))) + img.shape[2:]
    out = resize(img, shape, order=1, anti_aliasing=f < 1, preserve_range=True, mode="edge")
    return out.astype(np.float32), f


def _affine(img: np.ndarray, angle_deg: float, shift: tuple[float, float], scale: float,
            fill: float, flip: bool = False) -> np.ndarray:
    """Rotate / scale about the centre, then shift (pixels); (H, W) float32."""
    h, w = img.shape
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / scale
    if flip:
        rot = rot @ np.diag([1.0, -1.0])
    c = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    offset = c - rot @ (c + np.asarray(shift))
    return ndimage.affine_transform(img, rot, offset=offset, order=1, mode="constant",
                                    cval=fill).astype(np.float32)


def make_series(base: np.ndarray, n: int, rng: np.random.Generator, fill: float) -> np.ndarray:
    """(n, H, W) series from one real (H, W) slice: smooth drift, rotation and taper along z.

    Neighbouring slices differ by sub-pixel amounts so the series looks continuous; the anatomy
    shrinks slightly towards both ends. This is an augmentation, not a new anatomy.
    """
    h, w = base.shape
    amp = rng.uniform(0.5, 2.0, size=2) * max(h, w) / 256.0 * 2
    freq = rng.uniform(0.5, 1.5, size=2)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    rot = float(rng.uniform(-3.0, 3.0))
    taper = float(rng.uniform(0.04, 0.12))
    out = np.empty((n, h, w), dtype=np.float32)
    for k in range(n):
        t = k / max(n - 1, 1)
        shift = (float(amp[0] * math.sin(math.pi * freq[0] * t + phase[0])),
                 float(amp[1] * math.sin(math.pi * freq[1] * t + phase[1])))
        out[k] = _affine(base, rot * (t - 0.5), shift, 1.0 - taper * (2 * t - 1) ** 2, fill)
    return out


def anatomy_warp(img: np.ndarray, rng: np.random.Generator, fill: float, order: int = 1) -> np.ndarray:
    """One random zoom / aspect / rotation / elastic deformation (see ``WARP_ZOOM``) applied to
    (H, W) or to every slice of (Z, H, W), about the image centre; float32, same shape.
    ``order``: of the spline interpolation (1: linear, stays within the input's range)."""
    stack = np.asarray(img, dtype=np.float32)
    flat = stack[None] if stack.ndim == 2 else stack
    h, w = flat.shape[1:]
    zoom = float(rng.uniform(*WARP_ZOOM))
    aspect = float(rng.uniform(*WARP_ASPECT))
    a = math.radians(float(rng.uniform(-WARP_ROTATE_DEG, WARP_ROTATE_DEG)))
    # output (y, x) reads input c + M (p - c) + d(p): M undoes the zoom after the rotation
    m = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) @ np.diag(
        [1.0 / (zoom * math.sqrt(aspect)), math.sqrt(aspect) / zoom])
    amp = float(rng.uniform(0.0, WARP_ELASTIC)) * max(h, w)
    disp = []
    for _ in range(2):
        d = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=max(h, w) / 8.0)
        peak = float(np.abs(d).max())
        disp.append(d / peak * amp if peak > 0 else d)
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64) - (h - 1) / 2.0,
                         np.arange(w, dtype=np.float64) - (w - 1) / 2.0, indexing="ij")
    src_y = m[0, 0] * yy + m[0, 1] * xx + (h - 1) / 2.0 + disp[0]
    src_x = m[1, 0] * yy + m[1, 1] * xx + (w - 1) / 2.0 + disp[1]
    out = np.stack([ndimage.map_coordinates(sl, [src_y, src_x], order=order, mode="constant", cval=fill)
                    for sl in flat]).astype(np.float32)
    return out[0] if stack.ndim == 2 else out


def _warped(spec: "StudySpec", img: np.ndarray, fill: float) -> np.ndarray:
    """``img`` through ``anatomy_warp`` when the study is warped (``train_warp``), else as is. The
    warp has its own generator, so the study's main stream stays as without the option."""
    if not spec.warp:
        return img
    return anatomy_warp(img, _warp_rng(spec), fill)


def _own_rng(seed: int, index: int, salt: int) -> np.random.Generator:
    """A generator of one option's own for study ``index`` (``salt`` names the option), so the
    plan's and the study's main streams are the same with the option on or off."""
    return np.random.default_rng(np.random.SeedSequence([seed, index, salt]))


def _warp_rng(spec: "StudySpec") -> np.random.Generator:
    """The warp's own generator: the study's main stream stays as without ``train_warp`` /
    ``train_warp_2d``."""
    return _own_rng(spec.seed, spec.content_index, 0x3A4F)


def _ct_window_rng(seed: int, index: int) -> np.random.Generator:
    """``train_ct_windows``' own generator (the plan's stream is unchanged)."""
    return _own_rng(seed, index, 0xC7F1)


def _matrix_rng(seed: int, index: int) -> np.random.Generator:
    """``train_mr_matrix``'s own generator (the plan's and the study's streams are unchanged)."""
    return _own_rng(seed, index, 0x3A7C)


def _option_draw(seed: int, index: int, salt: int, p: float) -> bool:
    """Whether study ``index`` takes a training option drawn with probability ``p``, on a generator
    of the option's own (``salt``), so the plan's and the study's streams are unchanged
    (``train_mr_apodize``, ``train_band_noise``)."""
    return bool(_own_rng(seed, index, salt).uniform() < p)


def _draw_mr_field(seed: int, index: int) -> float:
    """``train_mr_fields``: one of ``MR_FIELDS``, each with probability 1 / 5, on a generator of
    the option's own."""
    return float(MR_FIELDS[int(_own_rng(seed, index, TRAIN_MR_FIELDS_SALT).integers(len(MR_FIELDS)))])


def _draw_extra_kind(seed: int, index: int) -> tuple[str, float] | None:
    """``train_extra_kinds``: None with probability 1 − ``TRAIN_EXTRA_KINDS_P``, else a kind of
    ``EXTRA_KINDS`` and its parameter (``SEVERITY``) at a severity uniform in [0, 1] — the block
    size rounded to whole pixels, the number of levels to an integer — on a generator of its own."""
    rng = _own_rng(seed, index, 0xE7A5)
    if rng.uniform() >= TRAIN_EXTRA_KINDS_P:
        return None
    kind = EXTRA_KINDS[int(rng.integers(len(EXTRA_KINDS)))]
    value = float(round(SEVERITY[kind].from_s(float(rng.uniform(0.0, 1.0)))))
    return kind, max(value, 1.0 if kind == "pixelation" else 4.0)


def apply_extra_kind(x: np.ndarray, params: dict[str, float], modality: str, size: int) -> np.ndarray:
    """``train_extra_kinds``' defect named by ``params`` (``pixel_block`` or ``levels``; neither:
    ``x`` unchanged) on a rendered image or volume (H, W[, 3]) / (Z, H, W) of ``modality`` in its
    stored units (CT HU, MR magnitudes, 2D [0, 1]) on a ``size`` grid; the block is in pixels of
    the 256 grid."""
    x = np.asarray(x)
    axis = 1 if modality in ("ct", "mr") else 0   # (Z, H, W) volumes; 2D (H, W[, 3])
    if "pixel_block" in params:
        b = int(round(params["pixel_block"] * size / 256.0))
        x = degrade.pixelate(x, max(b, 2) if params["pixel_block"] > 1 else 1, axis)
    if "levels" in params:
        n = float(params["levels"])
        if modality in ("ct", "mr"):   # CT: n levels over a soft-tissue window; MR: over its 99th percentile
            step = (CT_QUANT_WINDOW_HU if modality == "ct" else max(float(np.percentile(x, 99.0)), 1e-6)) / n
            x = (np.round(x / step) * step).astype(x.dtype)
        else:
            x = degrade.posterize(x, int(n))
    return x


def _draw_ct_fov(seed: int, index: int) -> float:
    """1 (the whole image) with probability 1 − ``TRAIN_CT_FOV_P``, else a side fraction uniform in
    ``TRAIN_CT_FOV``."""
    rng = _own_rng(seed, index, 0xF0F1)
    if rng.uniform() >= TRAIN_CT_FOV_P:
        return 1.0
    return round(float(rng.uniform(*TRAIN_CT_FOV)), 4)


def crop_fov(hu: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A square crop of (Z, H, W) ``hu`` whose side is ``fraction`` of the shorter side, centred on
    a random anatomy pixel (> −500 HU) of the middle slice and shifted to lie inside the image;
    the same crop for every slice."""
    z, h, w = hu.shape
    side = max(8, int(round(fraction * min(h, w))))
    ys, xs = np.nonzero(hu[z // 2] > -500.0)
    if len(ys):
        i = int(rng.integers(len(ys)))
        cy, cx = int(ys[i]), int(xs[i])
    else:
        cy, cx = h // 2, w // 2
    y0 = min(max(0, cy - side // 2), h - side)
    x0 = min(max(0, cx - side // 2), w - side)
    return np.ascontiguousarray(hu[:, y0:y0 + side, x0:x0 + side])


def _draw_acq_matrix(seed: int, index: int) -> int:
    """0 (the study's own size) with probability 1 − ``TRAIN_MR_MATRIX_P``, else one of
    ``TRAIN_MR_MATRICES``."""
    rng = _matrix_rng(seed, index)
    if rng.uniform() >= TRAIN_MR_MATRIX_P:
        return 0
    return int(rng.choice(TRAIN_MR_MATRICES))


def _tone_rng(spec: "StudySpec") -> np.random.Generator:
    """``train_tone_mr``'s own generator (neither the study's main stream nor the warp's)."""
    return _own_rng(spec.seed, spec.content_index, 0x70E5)


def tone_curve(img: np.ndarray, rng: np.random.Generator, ref: float) -> np.ndarray:
    """``ref · (max(img, 0) / ref) ** γ``, log γ uniform in ±``TONE_LOG_GAMMA``: a random change of
    contrast that keeps 0 and ``ref`` where they are (float32, same shape)."""
    gamma = math.exp(float(rng.uniform(-TONE_LOG_GAMMA, TONE_LOG_GAMMA)))
    r = max(float(ref), 1e-6)
    return (r * np.power(np.maximum(np.asarray(img, np.float32), 0.0) / r, gamma)).astype(np.float32)


def warp_2d(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``train_warp_2d`` on a [0, 1] image (H, W) or (H, W, 3): ``anatomy_warp`` (one field for
    every channel, cubic, fill 0) then the tone curve x ** γ (``TONE_LOG_GAMMA``); float32 in [0, 1]."""
    x = np.asarray(img, dtype=np.float32)
    stack = np.moveaxis(x, -1, 0) if x.ndim == 3 else x
    warped = anatomy_warp(stack, rng, 0.0, order=3)
    if x.ndim == 3:
        warped = np.moveaxis(warped, 0, -1)
    return tone_curve(np.clip(warped, 0.0, 1.0), rng, ref=1.0)


def _augment_2d(img: np.ndarray, rng: np.random.Generator, fill: float,
                allow_flip: bool = True) -> np.ndarray:
    """Small random rotation / shift / zoom (and optional left-right flip); (H, W[, 3]) float32."""
    angle = float(rng.uniform(-6, 6))
    shift = (float(rng.uniform(-0.03, 0.03) * img.shape[0]),
             float(rng.uniform(-0.03, 0.03) * img.shape[1]))
    scale = float(rng.uniform(0.95, 1.05))
    flip = bool(allow_flip and rng.uniform() < 0.5)
    if img.ndim == 3:
        return np.stack([_affine(img[..., c], angle, shift, scale, fill, flip)
                         for c in range(img.shape[-1])], axis=-1)
    return _affine(img, angle, shift, scale, fill, flip)


def random_window(region: np.ndarray, tile: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A window of ``region`` (H, W[, 3]) with the tile's aspect, ``WINDOW_SCALE`` × the tile's
    size (capped so it fits), at a uniformly random position."""
    big_h, big_w = region.shape[:2]
    th, tw = tile
    s = min(float(rng.uniform(*WINDOW_SCALE)), big_h / th, big_w / tw)
    h, w = max(1, min(big_h, int(round(s * th)))), max(1, min(big_w, int(round(s * tw))))
    y0 = int(rng.integers(0, big_h - h + 1))
    x0 = int(rng.integers(0, big_w - w + 1))
    return region[y0:y0 + h, x0:x0 + w]


def _slice_of(base: BaseImage, rng: np.random.Generator) -> np.ndarray:
    z = base.array.shape[0]
    if z == 1:
        return base.array[0]
    lo, hi = int(z * 0.3), max(int(z * 0.7), int(z * 0.3) + 1)
    return base.array[int(rng.integers(lo, hi))]


# --- renderers ---------------------------------------------------------------------------------

def _render_ct(spec: StudySpec, base: BaseImage, rng: np.random.Generator, out: Path,
               measured: dict[str, float] | None = None) -> int:
    size = spec.image_size
    img = _slice_of(base, rng)
    img = resize(img, (size, size), order=1, anti_aliasing=img.shape[0] > size,
                 preserve_range=True).astype(np.float32)
    pixel = base.pixel_mm[0] * base.array.shape[1] / size
    img = _warped(spec, _augment_2d(img, rng, -1000.0), -1000.0)
    p = spec.params
    mas, views = p["mas"], int(p["views"])
    blur_px = p.get("blur_mm", 0.0) / pixel
    if spec.dimension == "3d":
        anat = make_series(img, spec.n_anat, rng, -1000.0)
        air = np.full((1, size, size), -1000.0, np.float32)
        clean = np.concatenate([np.repeat(air, spec.n_air[0], 0), anat,
                                np.repeat(air, spec.n_air[1], 0)])
    else:
        clean = img[None]
    hu = np.empty_like(clean)
    for k in range(clean.shape[0]):
        if spec.band_noise:   # train_band_noise: a soft kernel smooths the noise with the anatomy
            hu[k] = degrade.gaussian_blur(degrade.ct_acquire(clean[k], mas, pixel, rng, n_views=views), blur_px)
        else:
            hu[k] = degrade.ct_acquire(degrade.gaussian_blur(clean[k], blur_px), mas, pixel, rng,
                                       n_views=views)
    if spec.dose_label == "noise" and measured is not None:
        # on its own generator: the study's images are the same with either dose label
        mid = spec.n_air[0] + spec.n_anat // 2 if spec.dimension == "3d" else 0
        mrng = _own_rng(spec.seed, spec.index, 0xD05E)
        measured["noise_hu"] = degrade.ct_noise_sigma(degrade.gaussian_blur(clean[mid], blur_px), mas,
                                                      pixel, mrng)
    if spec.fov < 1.0:   # train_ct_fov: a small field of view of the acquired slice(s)
        hu = crop_fov(hu, spec.fov, _own_rng(spec.seed, spec.content_index, 0xF0F2))
    hu = apply_extra_kind(hu, p, "ct", size)   # train_extra_kinds (nothing when not drawn)
    time_ms = int(p["exposure_time_ms"])
    current = int(round(mas * 1000.0 / time_ms))
    centre, width = CT_WINDOWS.get(spec.type, CT_WINDOWS["soft"])
    thickness = float(rng.choice([1.25, 2.5, 5.0])) if spec.dimension == "3d" else base.slice_mm
    tags = {
        "BodyPartExamined": base.spec.header.get("BodyPartExamined"),
        "KVP": "120", "Exposure": str(int(mas)), "XRayTubeCurrent": str(current),
        "ExposureTime": str(time_ms), "CTDIvol": round(CTDI_PER_MAS * mas, 3),
        "ConvolutionKernel": "STANDARD", "RescaleIntercept": "-1024", "RescaleSlope": "1",
        "RescaleType": "HU", "WindowCenter": str(centre), "WindowWidth": str(width),
        "PatientPosition": "HFS",
        "SeriesDescription": f"SYNTH CT {spec.region.upper()} {int(mas)} mAs {views} views",
    }
    key = spec.relpath
    if spec.dimension == "3d":
        write_dicom_series(out / spec.relpath, hu_to_stored(hu), modality="CT",
                           spacing=(thickness, pixel, pixel), tags=tags, key=key,
                           seed=spec.seed, index=spec.index)
    else:
        write_dicom_image(out / spec.relpath, hu_to_stored(hu[0]), modality="CT",
                          pixel_mm=(pixel, pixel), tags=tags, key=key, seed=spec.seed,
                          index=spec.index)
    return int(hu.shape[0])


def mr_band(native_shape: tuple[int, ...], size: int) -> float:
    """The fraction of the ``size`` grid's k-space (per axis) that a source acquired on a
    ``native_shape`` (H, W) matrix covers, when its long side is resized to ``size``
    (``_resize_long_side``): ``min(1, max(H, W) / size)``. A 64-matrix scan shown on a 256 grid
    covers 0.25; a source finer than the grid (downsampled) covers all of it."""
    return min(1.0, max(int(n) for n in native_shape) / float(size))


def _render_mr(spec: StudySpec, base: BaseImage, rng: np.random.Generator, out: Path,
               measured: dict[str, float] | None = None) -> int:
    arr = base.array
    # mr_native_matrix: a source coarser than the grid stays on its own matrix (never upsampled)
    size = min(spec.image_size, max(arr.shape[1:3])) if spec.native_matrix else spec.image_size
    if spec.acq_matrix:   # train_mr_matrix: a coarser acquisition matrix, same field of view
        size = min(size, spec.acq_matrix)
    zoom = size / max(arr.shape[1:3])
    pixel = base.pixel_mm[0] / zoom
    flip = bool(rng.uniform() < 0.5)
    if spec.dimension == "3d":
        if arr.shape[0] > 1:
            n = min(arr.shape[0], spec.n_anat)
            z0 = int(rng.integers(0, arr.shape[0] - n + 1))
            anat = np.stack([_resize_long_side(s, size)[0] for s in arr[z0: z0 + n]])
            if flip:
                anat = anat[:, :, ::-1]
            anat = _warped(spec, anat, 0.0)
            spacing_z = base.slice_mm
        else:
            sl = _warped(spec, _augment_2d(_resize_long_side(arr[0], size)[0], rng, 0.0), 0.0)
            anat = make_series(sl, spec.n_anat, rng, 0.0)
            spacing_z = float(rng.choice([3.0, 4.0, 5.0]))
        empty = np.zeros((1,) + anat.shape[1:], np.float32)
        clean = np.concatenate([np.repeat(empty, spec.n_air[0], 0), anat,
                                np.repeat(empty, spec.n_air[1], 0)])
    else:
        sl = _resize_long_side(_slice_of(base, rng), size)[0]
        clean = _warped(spec, _augment_2d(sl, rng, 0.0)[None], 0.0)
        spacing_z = base.slice_mm
    ref = float(np.percentile(clean, 99.0))
    if spec.tone:   # train_tone_mr, from its own generator: the study's main stream is unchanged
        clean = tone_curve(clean, _tone_rng(spec), ref)
    clean = np.ascontiguousarray(clean * (MR_STORED_REF / max(ref, 1e-6)))
    p = spec.params
    x = degrade.bias_field(clean, p.get("bias", 0.0), rng)
    tesla = p["tesla"]
    sigma = degrade.mr_noise_sigma(MR_STORED_REF, tesla)
    x = degrade.mr_acquire(x, rng, sigma=sigma, keep_fraction=p.get("keep", 1.0),
                           motion_px=p.get("motion_px", 0.0) * size / 256.0,
                           motion_period=p["motion_period"],
                           band=mr_band(arr.shape[1:3], size) if spec.native_kspace else 1.0,
                           apodize=spec.apodize, kspace_noise=spec.band_noise)
    x = apply_extra_kind(x, p, "mr", size)   # train_extra_kinds (nothing when not drawn)
    hdr = base.spec.header
    tags = {
        "BodyPartExamined": hdr.get("BodyPartExamined"),
        "MagneticFieldStrength": f"{tesla:g}", "ImagingFrequency": f"{42.577 * tesla:.4f}",
        "RepetitionTime": f"{hdr.get('RepetitionTime', 500.0):g}",
        "EchoTime": f"{hdr.get('EchoTime', 15.0):g}",
        "SeriesDescription": hdr.get("SeriesDescription", "MR"),
        "MRAcquisitionType": "2D", "PatientPosition": "HFS",
    }
    stored = to_uint16(x)
    if spec.fmt == "nifti":
        desc = (f"mediqa-synth MR B0={tesla:g}T TR={tags['RepetitionTime']} "
                f"TE={tags['EchoTime']} {tags['SeriesDescription']}")
        write_nifti(out / spec.relpath, stored.astype(np.float32), (spacing_z, pixel, pixel), desc)
    elif spec.dimension == "3d":
        write_dicom_series(out / spec.relpath, stored, modality="MR",
                           spacing=(spacing_z, pixel, pixel), tags=tags, key=spec.relpath,
                           seed=spec.seed, index=spec.index)
    else:
        write_dicom_image(out / spec.relpath, stored[0], modality="MR", pixel_mm=(pixel, pixel),
                          tags=tags, key=spec.relpath, seed=spec.seed, index=spec.index)
    return int(stored.shape[0])


def _render_2d(spec: StudySpec, base: BaseImage, rng: np.random.Generator, out: Path,
               measured: dict[str, float] | None = None) -> int:
    size = spec.image_size
    src = base.array[0]
    if spec.window:
        src = random_window(split_region(spec.unit)[0], src.shape[:2], rng)
    img, zoom = _resize_long_side(src, size)
    img = _augment_2d(img, rng, 0.0, allow_flip=False)
    img = np.clip(img, 0.0, 1.0)
    if spec.warp:   # train_warp_2d, from the warp's own generator (as ``_warped``)
        img = warp_2d(img, _warp_rng(spec))
    p = spec.params
    x = degrade.uneven_illumination(img, p.get("illumination", 0.0), rng)
    x = degrade.gaussian_blur(x, p.get("blur_px", 0.0) * size / 256.0)
    x = degrade.add_gaussian_noise(x, p.get("noise_sigma", 0.0), rng)
    x = apply_extra_kind(x, p, spec.modality, size)   # train_extra_kinds (nothing when not drawn)
    if spec.fmt == "jpeg":
        write_jpeg(out / spec.relpath, x, int(p["quality"]))
    elif spec.fmt == "png":
        write_png(out / spec.relpath, x)
    else:
        pixel = base.pixel_mm[0] / zoom
        tags = {"BodyPartExamined": base.spec.header.get("BodyPartExamined"),
                "ViewPosition": "PA" if spec.region == "chest" else None,
                "WindowCenter": "2048", "WindowWidth": "4096",
                "SeriesDescription": f"SYNTH CR {spec.region.upper()}"}
        write_dicom_image(out / spec.relpath, to_uint16(x * 4095.0), modality="CR",
                          pixel_mm=(pixel, pixel), tags=tags, key=spec.relpath,
                          seed=spec.seed, index=spec.index)
    return 1


_RENDERERS = {"ct": _render_ct, "mr": _render_mr, "xr": _render_2d, "fundus": _render_2d}


def render_study(spec: StudySpec, out_dir: Path) -> dict[str, str]:
    """Render one study under ``out_dir`` and return its manifest row (strings)."""
    # a sibling (train_siblings) draws its anatomy from its original's stream: every renderer
    # draws the anatomy (slice, window, augmentation, series) before any degradation
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, spec.content_index]))
    base = load_unit(spec.unit)
    measured: dict[str, float] = {}
    n_slices = _RENDERERS[spec.modality](spec, base, rng, Path(out_dir), measured)
    sev = severities_of(spec.modality, spec.params)
    extra: dict[str, float | str] = {}
    if "noise_hu" in measured:   # dose_label="noise": the dose severity from the measured noise
        sev["dose"] = dose_severity_from_noise(measured["noise_hu"])
        extra = {"noise_hu": round(measured["noise_hu"], 4), "dose_label": "noise"}
    score = quality_score(sev)
    named = [sev[k] for k in spec.primary if k in sev]
    physical = {"ct": spec.params.get("mas"), "mr": spec.params.get("tesla")}.get(spec.modality)
    params = {**spec.params, **extra, "severities": sev}
    return {
        "path": spec.relpath, "score": f"{score:.6f}", "modality": spec.modality,
        "region": spec.region, "type": spec.type, "dimension": spec.dimension,
        "split": spec.split, "source_id": spec.unit.unit_id, "degradation": spec.degradation,
        "severity": f"{max(named) if named else 0.0:.6f}",
        "params": json.dumps(params, sort_keys=True, separators=(",", ":")),
        "physical": "" if physical is None else f"{physical:g}",
        "format": spec.fmt, "n_slices": str(n_slices),
        **({"content": spec.content_path} if spec.content >= 0 else {}),
    }


def _render_job(args: tuple[StudySpec, str]) -> dict[str, str]:
    spec, out_dir = args
    return render_study(spec, Path(out_dir))


def write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    """Write the manifest atomically (temporary file + rename), rows in study order."""
    buf = io.StringIO()
    columns = list(MANIFEST_COLUMNS) + (["content"] if any("content" in r for r in rows) else [])
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def require_sources(specs: list[StudySpec]) -> None:
    """Load every base image the plan uses (about 1 s; cached, so forked render workers inherit
    them). DatasetError naming each one that cannot be loaded and why (e.g. a missing package
    and its install line), so that a corpus fails before anything is written or replaced, not
    minutes into the render in a worker. The plan's own source names decide what is checked
    (looked up in the whole table, ``EXTRA_MR`` and ``MORE_MR`` included)."""
    used = {s.unit.source for s in specs}
    missing = {n: msg for n, msg in check_sources(OPTIONAL_SOURCES, used).items() if msg != "ok"}
    if missing:
        raise DatasetError("base images of the synthetic corpus cannot be loaded, nothing was written: "
                           + "; ".join(f"{n}: {msg}" for n, msg in sorted(missing.items())))


def generate_corpus(out_dir: Path | str, *, seed: int = 0, size: str | SizeConfig = "small",
                    workers: int = 1, on_progress: Callable[[int, int], None] | None = None,
                    **options: bool | str) -> Path:
    """Plan and render the corpus into ``out_dir``; returns the manifest path.

    ``options``: the generator options (``GENERATOR_OPTIONS``), see ``plan_corpus``; unknown
    names raise TypeError.

    Every base image the plan uses is loaded first (``require_sources``); DatasetError, before
    anything is written, names each one that cannot be loaded and why (e.g. a missing package).

    ``workers`` > 1 renders studies in that many processes; the result is identical.
    ``on_progress(done, total)`` is called after each study.
    """
    specs = plan_corpus(seed, size, **options)
    require_sources(specs)
    return render_corpus(out_dir, specs, workers=workers, on_progress=on_progress)


def render_corpus(out_dir: Path | str, specs: list[StudySpec], *, workers: int = 1,
                  on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Render a plan (``plan_corpus``, its sources checked by ``require_sources``) into
    ``out_dir`` and write its manifest; returns the manifest path. ``generate_corpus`` is plan +
    check + this; ``mediqa synth`` calls the three itself, so that it checks the sources before
    it touches OUT_DIR without planning twice."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = _render_all(out, specs, workers, on_progress)
    total = len(specs)
    manifest = out / MANIFEST_NAME
    write_manifest(manifest, [rows[i] for i in sorted(rows)])
    log.info("synthetic corpus: %d studies in %.1f s → %s", total, time.perf_counter() - t0, out)
    return manifest


def _render_all(out: Path, specs: list[StudySpec], workers: int,
                on_progress: Callable[[int, int], None] | None) -> dict[int, dict[str, str]]:
    """Render ``specs`` under ``out``; their manifest rows by study index."""
    rows: dict[int, dict[str, str]] = {}
    total = len(specs)
    if workers <= 1:
        for spec in specs:
            rows[spec.index] = render_study(spec, out)
            if on_progress:
                on_progress(len(rows), total)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            # 3D studies first: they are the slowest, so the pool stays busy to the end.
            order = sorted(specs, key=lambda s: (s.dimension != "3d", s.index))
            futures = {pool.submit(_render_job, (s, str(out))): s.index for s in order}
            for fut in as_completed(futures):
                rows[futures[fut]] = fut.result()
                if on_progress:
                    on_progress(len(rows), total)
    return rows


def update_corpus(out_dir: Path | str, old_specs: list[StudySpec], new_specs: list[StudySpec], *,
                  workers: int = 1) -> tuple[Path, int] | None:
    """Turn the corpus of plan ``old_specs`` in ``out_dir`` into plan ``new_specs``' by rendering
    only the studies whose spec differs (e.g. after ``train_mr_fields`` is switched on: 146 of
    4,688 large-corpus studies, seconds instead of 19 minutes). Each changed study's files are
    removed first and written anew, so a corpus whose files are hard links of another's (``cp
    -al``) leaves the other untouched. The manifest is removed before the first study is touched
    and written when the last is done, so an update cut short leaves a folder without a manifest,
    which the recipe renders anew instead of reusing. The result is byte-identical to rendering
    ``new_specs`` from nothing (rendering is a function of the spec).

    Returns (manifest path, number of studies rendered), or None, with nothing touched, when the
    plans do not pair up study by study (other count or paths) or ``out_dir`` does not hold
    ``old_specs``' corpus (its manifest lists other paths, or a study's files are missing)."""
    out = Path(out_dir)
    manifest = out / MANIFEST_NAME
    if (len(old_specs) != len(new_specs) or not manifest.is_file()
            or any(a.relpath != b.relpath or a.index != b.index for a, b in zip(old_specs, new_specs))):
        return None
    with manifest.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if [r.get("path") for r in rows] != [s.relpath for s in old_specs] or \
            not all((out / s.relpath).exists() for s in old_specs):
        return None
    changed = [b for a, b in zip(old_specs, new_specs) if a != b]
    manifest.unlink()   # until the new one is written: an update cut short leaves no corpus to reuse
    for spec in changed:
        path = out / spec.relpath
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    t0 = time.perf_counter()
    for index, row in _render_all(out, changed, workers, None).items():
        rows[index] = row
    write_manifest(manifest, rows)
    log.info("synthetic corpus: %d of %d studies rendered anew in %.1f s → %s", len(changed), len(rows),
             time.perf_counter() - t0, out)
    return manifest, len(changed)
