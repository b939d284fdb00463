"""Prompt vocabulary round trip and the DICOM tag → prompt rules, rule by rule, plus real files."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.multival import MultiValue
from pydicom.valuerep import DSfloat

from engines.prompts import (
    DEFAULT_VOCAB,
    GROUPS,
    Prompt,
    ct_type_from_kernel,
    ct_type_from_tags,
    ct_type_from_window,
    decode_prompt,
    encode_prompt,
    field_strength_tesla,
    is_colour,
    modality_from_tags,
    mr_type_from_description,
    mr_type_from_physics,
    mr_type_from_tags,
    prompts_from_tags,
    region_from_body_part,
    region_from_description,
    region_from_tags,
    type_from_tags,
)


def _header(name: str) -> pydicom.Dataset:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available (pydicom-data missing)")
    return pydicom.dcmread(path, stop_before_pixels=True)


# --- vocabulary (existing behaviour) -----------------------------------------------------------

def test_encode_decode_round_trip_and_unknown_maps_to_other():
    p = Prompt("3d", "ct", "chest", "lung")
    vec = encode_prompt(p)
    assert vec.shape == (DEFAULT_VOCAB.size,) and vec.dtype == np.float32
    assert vec.sum() == len(GROUPS)
    assert decode_prompt(vec) == p
    assert decode_prompt(encode_prompt(Prompt("2d", "pet-mri", "toe", None))).modality == "other"


# --- modality ------------------------------------------------------------------------------------

@pytest.mark.parametrize("code,label", [
    ("CT", "ct"), ("MR", "mr"), ("CR", "xr"), ("DX", "xr"), ("RG", "xr"), ("DR", "xr"),
    ("MG", "xr"), ("OP", "fundus"), ("OPT", "fundus"), ("XC", "fundus"), ("US", "us"),
    ("NM", "nm"), ("PT", "nm"), ("OT", "other"), ("SR", "other"), (" ct ", "ct"),
])
def test_modality_table(code, label):
    assert modality_from_tags({"Modality": code}) == label


@pytest.mark.parametrize("meta", [{}, {"Modality": ""}, {"Modality": None}])
def test_modality_absent_is_undetermined(meta):
    assert modality_from_tags(meta) is None


def test_mammography_is_xr_of_the_breast_even_without_body_part():
    out = prompts_from_tags({"Modality": "MG", "PhotometricInterpretation": "MONOCHROME2"}, "2d")
    assert out == {"dimension": "2d", "modality": "xr", "region": "breast", "type": "grey"}


# --- region --------------------------------------------------------------------------------------

@pytest.mark.parametrize("term,region", [
    ("CHEST", "chest"), ("LUNG", "chest"), ("THORAX", "chest"), ("HEAD", "head"),
    ("BRAIN", "head"), ("SKULL", "head"), ("ABDOMEN", "abdomen"), ("LIVER", "abdomen"),
    ("KIDNEY", "abdomen"), ("PELVIS", "pelvis"), ("PROSTATE", "pelvis"), ("BREAST", "breast"),
    ("SPINE", "spine"), ("CSPINE", "spine"), ("L-SPINE", "spine"), ("T SPINE", "spine"),
    ("KNEE", "extremity"), ("hand", "extremity"), ("EXTREMITY", "extremity"), ("EYE", "eye"),
    ("WHOLEBODY", "other"), ("NECK", "other"),
])
def test_body_part_table(term, region):
    assert region_from_body_part(term) == region


def test_body_part_absent_is_none():
    assert region_from_body_part(None) is None
    assert region_from_body_part("  ") is None


@pytest.mark.parametrize("texts,region", [
    (("CT THORAX 1.0 B70f",), "chest"),
    (("t1_mprage_sag", "BRAIN ROUTINE"), "head"),
    (("Ax LIVER 3 phase",), "abdomen"),
    (("KNEE PD FS cor",), "extremity"),
    (("CHEST ABDOMEN PELVIS",), None),  # several regions named: undetermined
    (("5/5mm Plain",), None),
    ((None, ""), None),
])
def test_region_keywords(texts, region):
    assert region_from_description(*texts) == region


def test_body_part_wins_over_description_and_description_is_the_fallback():
    assert region_from_tags({"BodyPartExamined": "HEAD", "SeriesDescription": "CHEST"}) == "head"
    assert region_from_tags({"SeriesDescription": "CHEST 5mm"}) == "chest"
    assert region_from_tags({"ProtocolName": "Routine Brain"}) == "head"
    assert region_from_tags({"Modality": "OP"}) == "eye"


# --- CT type -------------------------------------------------------------------------------------

@pytest.mark.parametrize("centre,width,label", [
    (-600, 1500, "lung"), (-300, 1000, "lung"), (-299, 1500, None),
    (300, 2000, "bone"), (250, 1000, "bone"), (500, 800, None),
    (40, 400, "soft"), (-100, 600, "soft"), (150, 350, "soft"), (40, 601, None),
    (0, 2000, None), (40, 0, None), (None, 400, None), ("abc", 400, None),
])
def test_ct_window_rule(centre, width, label):
    assert ct_type_from_window(centre, width) == label


def test_ct_window_first_of_multi_valued_tags():
    centre = MultiValue(DSfloat, ["40", "450"])
    width = MultiValue(DSfloat, ["350", "1500"])
    assert ct_type_from_window(centre, width) == "soft"
    assert ct_type_from_window("-600\\40", "1500\\400") == "lung"


@pytest.mark.parametrize("kernel,label", [
    ("LUNG", "lung"), ("BONE", "bone"), ("BONEPLUS", "bone"), ("SOFT", "soft"),
    ("STANDARD", "soft"), ("DETAIL", None),
    ("B70f", "lung"), ("B60f", "lung"), ("B30f", "soft"), ("B31f", "soft"), ("Br40", "soft"),
    ("Br40d", "soft"), ("I31f", "soft"), ("I70f", "lung"), ("Bl57d", "lung"), ("B50f", None),
    ("H60s", "bone"), ("H31s", "soft"), ("U90u", "bone"), (["Br40d", "3"], "soft"),
    ("Br64d\\3", "lung"), ("B 70 f", "lung"),
    ("YC", "lung"), ("L", "lung"), ("B", "soft"), ("C", None), ("E", "bone"),
    ("FC13", "soft"), ("FC52", "lung"), ("FC30", "bone"), ("FC40", None),
    ("", None), (None, None), ("mystery", None),
])
def test_ct_kernel_table(kernel, label):
    assert ct_type_from_kernel(kernel) == label


def test_ct_window_tags_win_over_kernel_and_kernel_is_the_fallback():
    assert ct_type_from_tags({"WindowCenter": -600, "WindowWidth": 1600,
                              "ConvolutionKernel": "STANDARD"}) == "lung"
    assert ct_type_from_tags({"WindowCenter": 0, "WindowWidth": 2000,
                              "ConvolutionKernel": "BONE"}) == "bone"
    assert ct_type_from_tags({}) is None


# --- MR type -------------------------------------------------------------------------------------

@pytest.mark.parametrize("texts,label", [
    (("T1W/SE/1024",), "t1"), (("t1_mprage_sag_p2",), "t1"), (("Sag SPGR",), "t1"),
    (("3D TFE",), "t1"), (("AX T2",), "t2"), (("t2_tse_tra",), "t2"), (("TSE T2",), "t2"),
    (("Ax T2 FLAIR",), "flair"), (("t1_flair",), "flair"), (("DWI b1000",), "dwi"),
    (("ep2d_diff_3scan_trace",), "dwi"), (("ADC map",), "dwi"), (("EPI b800",), "dwi"),
    (("EPI BOLD rest",), None), (("PD FS cor",), "pd"), (("PD T2 dual echo",), None),
    (("TSE cor",), None), (("localizer",), None), ((None, ""), None),
    (("", "T2W_TSE"), "t2"),
])
def test_mr_description_keywords(texts, label):
    assert mr_type_from_description(*texts) == label


@pytest.mark.parametrize("tr,te,ti,b,label", [
    (9000, 120, 2500, None, "flair"),
    (5000, 400, 1800, None, "flair"),
    (2300, 3, 900, None, "t1"),       # MPRAGE
    (4000, 60, 150, None, None),      # STIR: inversion not modelled
    (500, 15, None, None, "t1"),
    (8, 3, None, None, "t1"),          # 3D gradient-echo T1
    (4000, 100, None, None, "t2"),
    (3000, 20, None, None, "pd"),
    (1500, 50, None, None, None),      # intermediate: undetermined
    (5000, 90, None, 1000, "dwi"),
    (None, 20, None, None, None),
    ("4000.0000", "240.0000", "", None, "t2"),
])
def test_mr_physics(tr, te, ti, b, label):
    assert mr_type_from_physics(tr, te, ti, b) == label


def test_mr_description_wins_over_physics_and_image_type_flavour_is_used():
    assert mr_type_from_tags({"SeriesDescription": "AX FLAIR", "RepetitionTime": 500,
                              "EchoTime": 10}) == "flair"
    assert mr_type_from_tags({"ImageType": ["ORIGINAL", "PRIMARY", "T2", "NONE"]}) == "t2"
    assert mr_type_from_tags({"ImageType": "ORIGINAL\\PRIMARY\\T1\\NONE"}) == "t1"
    assert mr_type_from_tags({"RepetitionTime": 600, "EchoTime": 12}) == "t1"


# --- colour / grey -------------------------------------------------------------------------------

def test_colour_detection_and_type_for_2d_modalities():
    assert is_colour({"PhotometricInterpretation": "RGB"}) is True
    assert is_colour({"PhotometricInterpretation": "YBR_FULL_422", "SamplesPerPixel": 3}) is True
    assert is_colour({"SamplesPerPixel": 1}) is False
    assert is_colour({"PhotometricInterpretation": "MONOCHROME1"}) is False
    assert is_colour({}) is None
    assert type_from_tags({"PhotometricInterpretation": "RGB"}, "fundus") == "color"
    assert type_from_tags({"PhotometricInterpretation": "MONOCHROME2"}, "xr") == "grey"
    assert type_from_tags({"PhotometricInterpretation": "RGB"}, None) == "color"
    # a grey image of unknown modality could be a CT or MR slice: undetermined
    assert type_from_tags({"PhotometricInterpretation": "MONOCHROME2"}, None) is None
    # CT never falls back to grey
    assert type_from_tags({"PhotometricInterpretation": "MONOCHROME2"}, "ct") is None


# --- field strength ------------------------------------------------------------------------------

@pytest.mark.parametrize("value,tesla", [
    (1.5, 1.5), ("3", 3.0), (DSfloat("1.500000"), 1.5), (15000, 1.5), ("30000", 3.0),
    (7, 7.0), (0, None), (-1, None), (None, None), ("", None), ("n/a", None),
])
def test_field_strength_tesla(value, tesla):
    out = field_strength_tesla(value)
    assert out == pytest.approx(tesla) if tesla is not None else out is None


# --- prompts_from_tags ---------------------------------------------------------------------------

def test_prompts_from_tags_keys_dimension_and_validation():
    out = prompts_from_tags({}, "3D")
    assert tuple(out) == GROUPS
    assert out == {"dimension": "3d", "modality": None, "region": None, "type": None}
    with pytest.raises(ValueError):
        prompts_from_tags({}, "4d")


def test_every_determined_label_is_in_the_vocabulary():
    metas = [{"Modality": m, "BodyPartExamined": b, "PhotometricInterpretation": p,
              "ConvolutionKernel": "B70f", "RepetitionTime": 500, "EchoTime": 10}
             for m in ("CT", "MR", "CR", "OP", "US", "PT", "OT")
             for b in ("CHEST", "KNEE", "WHOLEBODY") for p in ("RGB", "MONOCHROME2")]
    for meta in metas:
        for group, label in prompts_from_tags(meta, "2d").items():
            assert label is None or label in DEFAULT_VOCAB.labels(group)


# --- real files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,dim,expected", [
    # GE CT, no window tags, kernel STANDARD → soft; no body part or description → region None
    ("CT_small.dcm", "2d", {"modality": "ct", "region": None, "type": "soft"}),
    # Toshiba MR, TR 4000 / TE 240, no description → T2 by physics
    ("MR_small.dcm", "2d", {"modality": "mr", "region": None, "type": "t2"}),
    # Philips MR, ProtocolName "T1W/SE/1024" (TR 350 / TE 27 agrees); StudyDescription SHOULDER
    ("MR2_UNCI.dcm", "2d", {"modality": "mr", "region": "extremity", "type": "t1"}),
    ("MR2_J2KI.dcm", "2d", {"modality": "mr", "region": "extremity", "type": "t1"}),
    # Philips CR chest, MONOCHROME1
    ("RG1_UNCI.dcm", "2d", {"modality": "xr", "region": "chest", "type": "grey"}),
    # Fuji CR, BodyPartExamined EXTREMITY
    ("RG3_UNCI.dcm", "2d", {"modality": "xr", "region": "extremity", "type": "grey"}),
    # Siemens CT neck, windows 40/350 first → soft (kernel B30s agrees); NECK is not a region label
    ("bad_sequence.dcm", "3d", {"modality": "ct", "region": "other", "type": "soft"}),
    # enhanced MR, BodyPartExamined HEAD, ImageType flavour T1
    ("emri_small.dcm", "3d", {"modality": "mr", "region": "head", "type": "t1"}),
    # ultrasound in RGB
    ("US1_UNCI.dcm", "2d", {"modality": "us", "region": None, "type": "color"}),
])
def test_real_files(name, dim, expected):
    ds = _header(name)
    out = prompts_from_tags(ds, dim)
    assert out == {"dimension": dim, **expected}


def test_real_mr_field_strength():
    assert field_strength_tesla(_header("MR2_UNCI.dcm").MagneticFieldStrength) == pytest.approx(1.5)
    assert field_strength_tesla(_header("emri_small.dcm").MagneticFieldStrength) == pytest.approx(3.0)


@pytest.mark.parametrize("name,expected", [
    ("CT_small.dcm", {"modality": "ct", "type": "soft"}),
    ("MR_small.dcm", {"modality": "mr", "type": "t2"}),
    ("MR2_UNCI.dcm", {"modality": "mr", "type": "t1"}),
    ("RG1_UNCI.dcm", {"modality": "xr", "region": "chest", "type": "grey"}),
    ("bad_sequence.dcm", {"modality": "ct", "type": "soft"}),
])
def test_real_files_through_the_meta_whitelist(name, expected):
    """The rules see the reader's whitelisted ``meta`` (plain floats / strings), not a Dataset."""
    extract_meta = pytest.importorskip("engines.io.meta").extract_meta
    out = prompts_from_tags(extract_meta(_header(name)), "2d")
    assert {k: out[k] for k in expected} == expected
