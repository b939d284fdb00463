"""Prompt vocabulary (paper §2.2: dimension / modality / region / type) and one-hot encoding.

The vocabulary is fixed per model artifact and recorded in its card; this module's
``DEFAULT_VOCAB`` is what new models are trained with. Each group is one-hot encoded separately
and the four groups are concatenated (``prompt`` vector, length ``vocab.size``). Unknown values
map to the group's ``other`` entry.

The DICOM-tag → prompt rules live in ``prompts_from_tags`` (below the vocabulary) and are
documented rule by rule.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

GROUPS: tuple[str, ...] = ("dimension", "modality", "region", "type")


@dataclass(frozen=True)
class PromptVocab:
    """Ordered labels per group. ``other`` must be the last entry of the non-dimension groups."""

    dimension: tuple[str, ...] = ("2d", "3d")
    modality: tuple[str, ...] = ("ct", "mr", "xr", "fundus", "us", "nm", "other")
    region: tuple[str, ...] = (
        "head", "chest", "abdomen", "pelvis", "breast", "spine", "extremity", "eye", "other",
    )
    type: tuple[str, ...] = (
        "lung", "soft", "bone", "t1", "t2", "flair", "dwi", "pd", "color", "grey", "other",
    )

    def labels(self, group: str) -> tuple[str, ...]:
        if group not in GROUPS:
            raise KeyError(f"unknown prompt group {group!r}; expected one of {GROUPS}")
        return getattr(self, group)

    @property
    def size(self) -> int:
        return sum(len(self.labels(g)) for g in GROUPS)

    def columns(self, group: str) -> slice:
        """Where ``group``'s one-hot sits in the prompt vector: ``vec[..., vocab.columns(g)]``."""
        lo = self.offsets()[group]
        return slice(lo, lo + len(self.labels(group)))

    def offsets(self) -> dict[str, int]:
        out, o = {}, 0
        for g in GROUPS:
            out[g] = o
            o += len(self.labels(g))
        return out

    def index(self, group: str, value: str | None) -> int:
        labels = self.labels(group)
        v = (value or "").lower()
        if v in labels:
            return labels.index(v)
        if group == "dimension":
            raise ValueError(f"dimension must be one of {labels}, got {value!r}")
        return labels.index("other")

    def to_dict(self) -> dict[str, list[str]]:
        return {g: list(self.labels(g)) for g in GROUPS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PromptVocab":
        return cls(**{g: tuple(d[g]) for g in GROUPS})


DEFAULT_VOCAB = PromptVocab()


@dataclass(frozen=True)
class Prompt:
    """One study's prompt. ``source`` says where each group came from: tags / classifier / input / manifest."""

    dimension: str
    modality: str = "other"
    region: str = "other"
    type: str = "other"
    source: dict[str, str] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict[str, str]:
        return {g: getattr(self, g) for g in GROUPS}


def encode_prompt(prompt: Prompt, vocab: PromptVocab = DEFAULT_VOCAB) -> np.ndarray:
    """Concatenated one-hot vector, float32 (vocab.size,)."""
    vec = np.zeros(vocab.size, dtype=np.float32)
    offs = vocab.offsets()
    for g in GROUPS:
        vec[offs[g] + vocab.index(g, getattr(prompt, g))] = 1.0
    return vec


def decode_prompt(vec: np.ndarray, vocab: PromptVocab = DEFAULT_VOCAB) -> Prompt:
    """Inverse of ``encode_prompt`` (argmax per group)."""
    return Prompt(**{g: vocab.labels(g)[int(np.argmax(vec[vocab.columns(g)]))] for g in GROUPS})


# ---------------------------------------------------------------------------------------------
# DICOM tag → prompt rules
#
# Each rule is a small function of the whitelisted header ``meta`` (DICOM keywords → values as
# pydicom returns them, or plain Python values). Every rule returns a vocabulary label, or None
# when the tags do not determine the group; the prompt classifier fills those in. A rule never
# guesses from weak evidence: an ambiguous kernel or a protocol matching several contrasts gives
# None rather than a coin flip.
# ---------------------------------------------------------------------------------------------

#: Modality tag (0008,0060) → modality label. Codes present but absent from this table → "other".
MODALITY_TABLE: dict[str, str] = {
    "CT": "ct",
    "MR": "mr",
    # Projection radiography. MG (mammography) is radiography of the breast: xr + region breast.
    "CR": "xr", "DX": "xr", "RG": "xr", "DR": "xr", "MG": "xr", "RF": "xr", "XA": "xr",
    "PX": "xr", "IO": "xr",
    # Ophthalmic photography (OP), ophthalmic tomography (OPT) and external-camera photography
    # (XC, the code many fundus cameras write) are fundus images.
    "OP": "fundus", "OPT": "fundus", "XC": "fundus",
    "US": "us", "IVUS": "us",
    "NM": "nm", "PT": "nm",
}

#: Modality codes that fix the region on their own (used when BodyPartExamined says nothing).
MODALITY_REGION: dict[str, str] = {"MG": "breast", "OP": "eye", "OPT": "eye"}

#: BodyPartExamined defined terms (normalised: upper case, no spaces / '-' / '_') → region.
#: Terms found but not listed (e.g. WHOLEBODY, CHESTABDPELVIS, NECK) → "other".
BODY_PART_TABLE: dict[str, str] = {
    **dict.fromkeys(["CHEST", "LUNG", "LUNGS", "THORAX", "HEART", "CARDIAC", "RIB", "RIBS",
                     "STERNUM", "CLAVICLE", "MEDIASTINUM"], "chest"),
    **dict.fromkeys(["HEAD", "BRAIN", "SKULL", "HEADNECK", "IAC", "SELLA", "ORBIT", "JAW",
                     "TMJ", "FACE", "SINUS", "NOSE"], "head"),
    **dict.fromkeys(["ABDOMEN", "ABDOMENPELVIS", "ABD", "LIVER", "KIDNEY", "KIDNEYS",
                     "PANCREAS", "SPLEEN", "STOMACH", "GALLBLADDER", "COLON", "BOWEL"],
                    "abdomen"),
    **dict.fromkeys(["PELVIS", "PROSTATE", "BLADDER", "UTERUS", "OVARY", "HIP", "SACRUM",
                     "COCCYX"], "pelvis"),
    **dict.fromkeys(["BREAST", "MAMMA"], "breast"),
    **dict.fromkeys(["SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "CTSPINE", "TLSPINE",
                     "LSSPINE", "WHOLESPINE"], "spine"),
    **dict.fromkeys(["EXTREMITY", "EXTREMITIES", "KNEE", "HAND", "WRIST", "FOOT", "ANKLE",
                     "ELBOW", "SHOULDER", "ARM", "UPPERARM", "FOREARM", "LEG", "LOWERLEG",
                     "THIGH", "FEMUR", "TIBIA", "HUMERUS", "FINGER", "TOE", "HEEL",
                     "UPPEREXTREMITY", "LOWEREXTREMITY", "UPRLIMB", "LWRLIMB"], "extremity"),
    **dict.fromkeys(["EYE", "RETINA", "FUNDUS"], "eye"),
}

#: Words in SeriesDescription / ProtocolName (tokens split on anything but letters and digits)
#: that name a region, used only when BodyPartExamined is absent. A description naming two
#: regions (e.g. "CHEST ABDOMEN") determines nothing.
REGION_KEYWORDS: dict[str, str] = {
    **dict.fromkeys(["CHEST", "THORAX", "LUNG", "LUNGS", "THX", "CARDIAC", "HEART", "PULM",
                     "CTA_CHEST"], "chest"),
    **dict.fromkeys(["HEAD", "BRAIN", "SKULL", "CRANIAL", "CRANIUM", "NEURO", "SCHAEDEL",
                     "KOPF", "CEREBRAL"], "head"),
    **dict.fromkeys(["ABDOMEN", "ABD", "LIVER", "KIDNEY", "KIDNEYS", "PANCREAS", "RENAL",
                     "ABDOMINAL"], "abdomen"),
    **dict.fromkeys(["PELVIS", "PROSTATE", "BECKEN", "PELVIC", "HIP", "HIPS"], "pelvis"),
    **dict.fromkeys(["BREAST", "MAMMO", "MAMMOGRAPHY", "MAMMA"], "breast"),
    **dict.fromkeys(["SPINE", "CSPINE", "TSPINE", "LSPINE", "CERVICAL", "THORACIC", "LUMBAR",
                     "WS", "HWS", "BWS", "LWS"], "spine"),
    **dict.fromkeys(["KNEE", "HAND", "WRIST", "FOOT", "ANKLE", "ELBOW", "SHOULDER", "FEMUR",
                     "TIBIA", "HUMERUS", "FINGER", "EXTREMITY", "KNIE"], "extremity"),
    **dict.fromkeys(["EYE", "RETINA", "FUNDUS", "MACULA"], "eye"),
}

_COLOUR_PHOTOMETRIC = frozenset({
    "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_PARTIAL_422", "YBR_ICT",
    "YBR_RCT", "PALETTE COLOR",
})


def _first(value: Any) -> Any:
    """First element of a multi-valued tag (list, tuple, pydicom MultiValue), else the value."""
    if isinstance(value, (str, bytes)):
        return value
    if hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        return value[0] if len(value) else None
    return value


def _text(value: Any) -> str:
    """Tag value as one upper-case string ('' when absent); multi-values joined by spaces."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        return " ".join(_text(v) for v in value).strip()
    return str(value).strip().upper()


def _values(value: Any) -> list[str]:
    """A multi-valued string tag as upper-case values: list / MultiValue or ``'A\\B'`` text."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [v.strip() for v in _text(value).split("\\") if v.strip()]
    return [_text(v) for v in value if _text(v)]


def _number(value: Any) -> float | None:
    """First value of a numeric tag as a finite float; None when absent or malformed."""
    v = _first(value)
    if v is None or v == "":
        return None
    if isinstance(v, bytes):
        v = v.decode("ascii", "replace")
    if isinstance(v, str):
        v = v.split("\\")[0].strip()  # "40\\450" kept as raw text: first value
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _tokens(*values: Any) -> list[str]:
    """Upper-case word tokens of free-text tags: ``'t2_tse_tra'`` → ``['T2', 'TSE', 'TRA']``."""
    return [t for v in values for t in re.split(r"[^A-Z0-9]+", _text(v)) if t]


def modality_from_tags(meta: Mapping[str, Any]) -> str | None:
    """Modality label from the Modality tag (see ``MODALITY_TABLE``).

    Absent or empty tag → None; a code we do not model (OT, SC, SM, ES, …) → "other".
    """
    code = _text(meta.get("Modality"))
    if not code:
        return None
    return MODALITY_TABLE.get(code, "other")


def region_from_body_part(value: Any) -> str | None:
    """Region from a BodyPartExamined value (``BODY_PART_TABLE``); absent → None, unknown → "other"."""
    term = re.sub(r"[\s\-_]+", "", _text(value))
    if not term:
        return None
    return BODY_PART_TABLE.get(term, "other")


def region_from_description(*texts: Any) -> str | None:
    """Region from keywords of SeriesDescription / ProtocolName; None unless exactly one region is named."""
    found = {REGION_KEYWORDS[t] for t in _tokens(*texts) if t in REGION_KEYWORDS}
    return found.pop() if len(found) == 1 else None


def region_from_tags(meta: Mapping[str, Any]) -> str | None:
    """Region: modalities that fix it (MG → breast, OP/OPT → eye), then BodyPartExamined, then
    keywords of SeriesDescription / ProtocolName / StudyDescription; else None."""
    fixed = MODALITY_REGION.get(_text(meta.get("Modality")))
    if fixed:
        return fixed
    region = region_from_body_part(meta.get("BodyPartExamined"))
    if region is not None:
        return region
    return region_from_description(meta.get("SeriesDescription"), meta.get("ProtocolName"),
                                   meta.get("StudyDescription"))


def ct_type_from_window(center: Any, width: Any) -> str | None:
    """CT type from the (first) WindowCenter / WindowWidth pair, in HU.

    lung: centre ≤ −300 and width ≥ 1000; bone: centre ≥ 250 and width ≥ 1000;
    soft: width ≤ 600 and −100 ≤ centre ≤ 150. Anything else (e.g. a 2000/0 overview) → None.
    """
    c, w = _number(center), _number(width)
    if c is None or w is None or w <= 0:
        return None
    if c <= -300 and w >= 1000:
        return "lung"
    if c >= 250 and w >= 1000:
        return "bone"
    if w <= 600 and -100 <= c <= 150:
        return "soft"
    return None


#: GE reconstruction kernels (exact names).
GE_KERNELS: dict[str, str] = {
    "LUNG": "lung",
    "BONE": "bone", "BONEPLUS": "bone", "EDGE": "bone",
    "SOFT": "soft", "STANDARD": "soft", "SMOOTH": "soft",
}
#: Philips kernels: L / LA / YC / YD are the lung filters, E / EC / YE / YF the bone ones,
#: A / B / UA / UB / CB the soft-tissue ones. C and D (general sharp) are ambiguous → None.
PHILIPS_KERNELS: dict[str, str] = {
    "L": "lung", "LA": "lung", "YC": "lung", "YD": "lung",
    "E": "bone", "EC": "bone", "YE": "bone", "YF": "bone",
    "A": "soft", "B": "soft", "UA": "soft", "UB": "soft", "CB": "soft",
}
# Siemens: a family letter code, a two-digit sharpness, an optional suffix ("B70f", "Br40d",
# "I31f", "Hr60", "Bl57d"). Canon/Toshiba: "FC" + two digits.
_SIEMENS_KERNEL = re.compile(r"^(B|BR|BF|BL|BV|I|IR|H|HR|HF|Q|QR|U|UR|UB|D|T|TR)(\d{2})([A-Z]?)$")
_CANON_KERNEL = re.compile(r"^FC(\d{2})$")


def ct_type_from_kernel(kernel: Any) -> str | None:
    """CT type from ConvolutionKernel (first value). The table, vendor by vendor:

    ========================  =====================================================  ======
    vendor                    kernels                                                type
    ========================  =====================================================  ======
    GE                        LUNG                                                   lung
    GE                        BONE, BONEPLUS, EDGE                                   bone
    GE                        SOFT, STANDARD, SMOOTH                                 soft
    Siemens lung family       Bl##                                                   lung
    Siemens body / iterative  B##, Br##, Bf##, I##, Ir##, Q##, Qr##: ≥ 60 / ≤ 45     lung / soft
    Siemens head              H##, Hr##, Hf##: ≥ 60 / ≤ 45                           bone / soft
    Siemens ultra-sharp       U##, Ur##, Ub## ≥ 60                                   bone
    Philips                   L, LA, YC, YD / E, EC, YE, YF / A, B, UA, UB, CB       lung / bone / soft
    Canon (Toshiba)           FC01–FC19 / FC30–FC39 / FC50–FC59                      soft / bone / lung
    ========================  =====================================================  ======

    Sharpness 46–59, other families and unknown names → None (ambiguous: the same kernel is
    used for several windows).
    """
    values = _values(kernel)  # "Br40d\\3" (Siemens kernel + strength) → "BR40D"
    name = re.sub(r"\s+", "", values[0]) if values else ""
    if not name:
        return None
    if name in GE_KERNELS:
        return GE_KERNELS[name]
    if name in PHILIPS_KERNELS:
        return PHILIPS_KERNELS[name]
    m = _SIEMENS_KERNEL.match(name)
    if m:
        family, sharp = m.group(1), int(m.group(2))
        if family == "BL":
            return "lung"
        if family in ("B", "BR", "BF", "I", "IR", "Q", "QR"):
            return "lung" if sharp >= 60 else "soft" if sharp <= 45 else None
        if family in ("H", "HR", "HF"):
            return "bone" if sharp >= 60 else "soft" if sharp <= 45 else None
        if family in ("U", "UR", "UB"):
            return "bone" if sharp >= 60 else None
        return None
    m = _CANON_KERNEL.match(name)
    if m:
        n = int(m.group(1))
        return "soft" if 1 <= n <= 19 else "bone" if 30 <= n <= 39 else "lung" if 50 <= n <= 59 else None
    return None


def ct_type_from_tags(meta: Mapping[str, Any]) -> str | None:
    """CT type: the window tags first (what the reader was meant to see), then the kernel."""
    return (ct_type_from_window(meta.get("WindowCenter"), meta.get("WindowWidth"))
            or ct_type_from_kernel(meta.get("ConvolutionKernel")))


_T1_TOKEN = re.compile(r"^T1(W|WI|FS|C|CE|GD|POST|PRE|SE|TSE|FSE|GRE)?$")
_T2_TOKEN = re.compile(r"^T2(W|WI|FS|TSE|FSE|STAR|SE)?$")
_PD_TOKEN = re.compile(r"^PD(W|WI|FS|TSE|FSE)?$")
_B_VALUE_TOKEN = re.compile(r"^B\d{2,4}$")
_T1_WORDS = frozenset({"MPRAGE", "MP2RAGE", "SPGR", "FSPGR", "TFE", "T1TFE", "TFL", "VIBE",
                       "BRAVO", "LAVA", "THRIVE", "FLASH3D", "MPR"})
_T2_WORDS = frozenset({"HASTE", "SSFSE", "SPACE_T2", "CUBE_T2", "STIR_T2"})
_FLAIR_WORDS = frozenset({"FLAIR", "DARKFLUID", "TIRM", "T2FLAIR", "T1FLAIR"})
_DWI_WORDS = frozenset({"DWI", "DIFF", "DIFFUSION", "ADC", "TRACEW", "DTI", "EP2D_DIFF",
                        "RESOLVE", "DWIBS"})
_PD_WORDS = frozenset({"PROTON", "PDW", "PDWI"})


def mr_type_from_description(*texts: Any) -> str | None:
    """MR type from SeriesDescription / ProtocolName words.

    FLAIR words (FLAIR, DarkFluid, TIRM) → flair and diffusion words (DWI, DIFF, ADC, TRACEW,
    DTI, or EPI together with a b-value token such as ``b1000``) → dwi take precedence
    ("T2 FLAIR" is a FLAIR). Otherwise exactly one of t1 (T1, T1W, MPRAGE, SPGR, TFE, VIBE, …),
    t2 (T2, T2W, HASTE, SSFSE) and pd (PD, PDW, proton) must match; "PD T2" dual echo → None.
    TSE/FSE alone says nothing about contrast.
    """
    tokens = _tokens(*texts)
    if not tokens:
        return None
    toks = set(tokens)
    if toks & _FLAIR_WORDS:
        return "flair"
    if toks & _DWI_WORDS or ("EPI" in toks and any(_B_VALUE_TOKEN.match(t) for t in toks)):
        return "dwi"
    found = set()
    for t in toks:
        if _T1_TOKEN.match(t) or t in _T1_WORDS:
            found.add("t1")
        elif _T2_TOKEN.match(t) or t in _T2_WORDS:
            found.add("t2")
        elif _PD_TOKEN.match(t) or t in _PD_WORDS:
            found.add("pd")
    return found.pop() if len(found) == 1 else None


def mr_type_from_physics(tr: Any, te: Any, ti: Any = None, b_value: Any = None) -> str | None:
    """MR type from RepetitionTime / EchoTime / InversionTime (ms) and DiffusionBValue.

    In order: b > 0 → dwi; TI ≥ 1500 with TR ≥ 4000 → flair; 300 ≤ TI < 1500 with TE < 30 →
    t1 (inversion-prepared T1 such as MPRAGE); any other inversion (e.g. STIR) → None;
    TR < 800 and TE < 30 → t1; TR > 2000 and TE > 80 → t2; TR > 2000 and TE < 40 → pd; else None.
    """
    b = _number(b_value)
    if b is not None and b > 0:
        return "dwi"
    tr_ms, te_ms, ti_ms = _number(tr), _number(te), _number(ti)
    if ti_ms is not None and ti_ms > 0:
        if ti_ms >= 1500 and tr_ms is not None and tr_ms >= 4000:
            return "flair"
        if 300 <= ti_ms < 1500 and te_ms is not None and te_ms < 30:
            return "t1"
        return None
    if tr_ms is None or te_ms is None or tr_ms <= 0 or te_ms < 0:
        return None
    if tr_ms < 800 and te_ms < 30:
        return "t1"
    if tr_ms > 2000 and te_ms > 80:
        return "t2"
    if tr_ms > 2000 and te_ms < 40:
        return "pd"
    return None


def mr_type_from_tags(meta: Mapping[str, Any]) -> str | None:
    """MR type: description words first, then the enhanced-MR ImageType flavour (T1, T2,
    PROTON_DENSITY, FLAIR, DIFFUSION as separate values), then TR/TE/TI physics."""
    found = mr_type_from_description(meta.get("SeriesDescription"), meta.get("ProtocolName"))
    if found:
        return found
    flavour = set(_values(meta.get("ImageType")))
    for word, label in (("FLAIR", "flair"), ("DIFFUSION", "dwi"), ("T1", "t1"), ("T2", "t2"),
                        ("PROTON_DENSITY", "pd")):
        if word in flavour:
            return label
    return mr_type_from_physics(meta.get("RepetitionTime"), meta.get("EchoTime"),
                                meta.get("InversionTime"), meta.get("DiffusionBValue"))


def is_colour(meta: Mapping[str, Any]) -> bool | None:
    """True for colour pixel data (SamplesPerPixel 3 or an RGB/YBR/palette photometric),
    False for MONOCHROME1/2 or one sample, None when neither tag is present."""
    photometric = _text(meta.get("PhotometricInterpretation"))
    samples = _number(meta.get("SamplesPerPixel"))
    if photometric in _COLOUR_PHOTOMETRIC or samples == 3:
        return True
    if photometric.startswith("MONOCHROME") or samples == 1:
        return False
    return None


def type_from_tags(meta: Mapping[str, Any], modality: str | None) -> str | None:
    """Type group: CT → lung/soft/bone rules; MR → t1/t2/flair/dwi/pd rules; any other known
    modality → color / grey from the pixel format. Unknown modality: colour images are "color"
    (CT and MR are never colour), grey ones undetermined."""
    if modality == "ct":
        return ct_type_from_tags(meta)
    if modality == "mr":
        return mr_type_from_tags(meta)
    colour = is_colour(meta)
    if colour is None:
        return None
    if modality is None:
        return "color" if colour else None
    return "color" if colour else "grey"


def field_strength_tesla(value: Any) -> float | None:
    """MagneticFieldStrength in tesla. Values above 100 are taken as gauss (15000 → 1.5 T);
    absent, malformed or non-positive values → None."""
    v = _number(value)
    if v is None or v <= 0:
        return None
    return v / 10000.0 if v > 100 else v


def prompts_from_tags(meta: Mapping[str, Any], dimension: str) -> dict[str, str | None]:
    """Prompt groups determined by the header tags: ``{group: label or None}`` for every group
    in ``GROUPS``. ``dimension`` ("2d" / "3d") comes from the study itself and is always set."""
    dim = str(dimension).lower()
    if dim not in DEFAULT_VOCAB.dimension:
        raise ValueError(f"dimension must be one of {DEFAULT_VOCAB.dimension}, got {dimension!r}")
    modality = modality_from_tags(meta)
    return {
        "dimension": dim,
        "modality": modality,
        "region": region_from_tags(meta),
        "type": type_from_tags(meta, modality),
    }
