"""Label sources, splits and the input cache on real files (pydicom / pydicom-data / scikit-image).

Also home of ``build_scored_corpus``: a tiny real labelled dataset (CT_small and the scikit-image
retina photograph degraded by noise of known strength, plus two 3D CT series) that the training
and CLI tests share.
"""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from PIL import Image

from engines.errors import DatasetError
from tests.conftest import _write_ct_series, air_slice, ct_small_hu
from training.data.cache import InputCache, PrepJob
from training.data.datasets import (TargetNormaliser, TargetUnavailable, classifier_labels, ldctiqa_samples,
                                    load_scored, physical_target, pretrain_samples, read_manifest, resolve_prompt)
from training.data.splits import assign_splits, check_no_leakage, split_groups
from engines.preprocess import PreprocessConfig

CT_SIGMAS = (0.0, 25.0, 70.0, 180.0)          # HU of added noise; higher = worse
FUNDUS_SIGMAS = (0.0, 0.03, 0.08, 0.18)       # fraction of full scale
SPLITS = ("train", "train", "val", "test")    # per noise level, so every split spans the range


def _copy(testdata_file, name: str, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(testdata_file(name), dst / name))


def build_scored_corpus(root: Path, retina_path: Path, *, with_3d: bool = True) -> Path:
    """A manifest over real images with noise of known strength; score = 1 − level / 3.

    CT: CT_small + Gaussian noise (HU), written with pydicom as single-slice DICOM whose
    Exposure tag follows the noise (σ ∝ 1/√mAs). Fundus: the retina photo (downscaled) + noise,
    PNG. 3D: two CT series (air slices at both ends) at two noise levels.
    """
    from tests.conftest import _testdata

    rng = np.random.default_rng(0)
    base = ct_small_hu(_testdata("CT_small.dcm"))
    rows = []
    for lvl, sigma in enumerate(CT_SIGMAS):
        mas = 400.0 if sigma == 0 else float(min(400.0, 200.0 * (25.0 / sigma) ** 2))
        noisy = base + rng.normal(0.0, sigma, base.shape).astype(np.float32)
        _write_ct_series(root / f"ct2d_{lvl}", [0.0], hu=lambda i, a=noisy: a,
                         extra=lambda i, ds, m=mas: setattr(ds, "Exposure", int(round(m))))
        rows.append((f"ct2d_{lvl}", 1 - lvl / 3, "ct", "chest", "soft", SPLITS[lvl], f"ct{lvl}"))
    photo = Image.open(retina_path).convert("RGB").resize((160, 160), Image.Resampling.BILINEAR)
    arr = np.asarray(photo, dtype=np.float32) / 255.0
    (root / "fundus").mkdir(parents=True, exist_ok=True)
    for lvl, sigma in enumerate(FUNDUS_SIGMAS):
        noisy = np.clip(arr + rng.normal(0.0, sigma, arr.shape), 0, 1)
        Image.fromarray((noisy * 255 + 0.5).astype(np.uint8)).save(root / "fundus" / f"retina_{lvl}.png")
        rows.append((f"fundus/retina_{lvl}.png", 1 - lvl / 3, "fundus", "eye", "color", SPLITS[lvl], f"fu{lvl}"))
    if with_3d:
        for lvl, sigma in ((0, 0.0), (3, 180.0)):
            vols = [air_slice()] + [base + rng.normal(0, sigma, base.shape).astype(np.float32) for _ in range(4)] \
                + [air_slice(seed=1)]
            _write_ct_series(root / f"ct3d_{lvl}", [2.5 * i for i in range(len(vols))], hu=lambda i, v=vols: v[i],
                             extra=lambda i, ds: setattr(ds, "Exposure", 300))
            rows.append((f"ct3d_{lvl}", 1 - lvl / 3, "ct", "chest", "soft", "train", f"ct3d{lvl}"))
    return write_manifest(root, rows)


def write_manifest(root: Path, rows: list[tuple]) -> Path:
    """``root/manifest.csv`` with the columns path, score, modality, region, type, split, source_id."""
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "score", "modality", "region", "type", "split", "source_id"])
        w.writerows(rows)
    return manifest


# ------------------------------------------------------------------------------ physical targets

def test_ct_exposure_from_real_files(testdata_file, tmp_path: Path) -> None:
    _copy(testdata_file, "CT_small.dcm", tmp_path)            # Exposure 170 mAs
    _copy(testdata_file, "693_UNCR.dcm", tmp_path)            # Exposure 85 mAs (pydicom-data)
    # a copy whose Exposure is gone: mA × ms / 1000 must take over
    ds = pydicom.dcmread(testdata_file("CT_small.dcm"))
    del ds.Exposure
    ds.XRayTubeCurrent, ds.ExposureTime = 250, 600
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "ct_ma_ms.dcm")
    samples, report = pretrain_samples(tmp_path)
    got = {s.path: (s.modality_key, s.target) for s in samples}
    assert got == {"CT_small.dcm": ("ct", 170.0), "693_UNCR.dcm": ("ct", 85.0), "ct_ma_ms.dcm": ("ct", 150.0)}
    assert report.n_used == 3 and not report.skipped


def test_mr_field_strength_and_skips(testdata_file, tmp_path: Path, retina_path: Path) -> None:
    _copy(testdata_file, "MR2_UNCR.dcm", tmp_path)            # 1.5 T
    _copy(testdata_file, "emri_small.dcm", tmp_path)          # 3 T, 10 frames (3D)
    _copy(testdata_file, "MR_small.dcm", tmp_path)            # no MagneticFieldStrength
    shutil.copy(retina_path, tmp_path / "retina.jpg")         # no tags at all
    samples, report = pretrain_samples(tmp_path)
    got = {s.path: (s.modality_key, s.target, s.dimension) for s in samples}
    assert got == {"MR2_UNCR.dcm": ("mr", 1.5, "2d"), "emri_small.dcm": ("mr", 3.0, "3d")}
    assert report.skipped_by_reason == {"no_field_strength": 1, "no_physical_target": 1}
    assert "2 skipped" in report.summary()


def test_physical_target_rules() -> None:
    assert physical_target({"Modality": "MR", "MagneticFieldStrength": 15000}) == ("mr", 1.5)   # gauss
    assert physical_target({"Modality": "CT", "Exposure": 0, "XRayTubeCurrent": 100,
                            "ExposureTime": 1000}) == ("ct", 100.0)
    for meta in ({"Modality": "CT"}, {"Modality": "MR", "MagneticFieldStrength": -1}, {"Modality": "US"}):
        with pytest.raises(TargetUnavailable):
            physical_target(meta)


def test_target_normaliser_log_minmax_round_trip() -> None:
    norm = TargetNormaliser.fit([("ct", 50.0), ("ct", 200.0), ("ct", 100.0), ("mr", 1.5), ("mr", 3.0)])
    assert norm("ct", 50.0) == pytest.approx(0.0) and norm("ct", 200.0) == pytest.approx(1.0)
    assert norm("ct", 100.0) == pytest.approx(0.5)           # halfway in log: 50 → 100 → 200
    assert norm("mr", 3.0) == pytest.approx(1.0)
    again = TargetNormaliser.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert again("ct", 100.0) == pytest.approx(norm("ct", 100.0))
    with pytest.raises(DatasetError):
        norm("xr", 1.0)


# ------------------------------------------------------------------------------ manifests

def test_manifest_missing_rows_skipped_and_bad_scores_listed(tmp_path: Path, retina_path: Path) -> None:
    shutil.copy(retina_path, tmp_path / "a.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    m = tmp_path / "m.csv"
    m.write_text("path,score\na.jpg,3.5\nmissing.png,2\nbroken.png,1\n")
    samples, report = read_manifest(m)
    assert [s.path for s in samples] == ["a.jpg"] and samples[0].target == 3.5
    assert report.n_found == 3 and len(report.skipped) == 2
    assert {p for p, _ in report.skipped} == {"missing.png", "broken.png"}

    m.write_text("path,score\na.jpg,good\na.jpg,2\na.jpg,\n")
    with pytest.raises(DatasetError, match=r"2 row\(s\).*lines 2, 4"):
        read_manifest(m)
    m.write_text("path,score\nmissing.png,1\n")
    with pytest.raises(DatasetError, match="no usable study"):
        read_manifest(m)
    m.write_text("path,score\n")
    with pytest.raises(DatasetError, match="no rows"):
        read_manifest(m)
    m.write_text("file,score\na.jpg,1\n")
    with pytest.raises(DatasetError, match="no 'path' column"):
        read_manifest(m)


def test_ldctiqa_layout(tmp_path: Path, ct_small_path: Path) -> None:
    hu = ct_small_hu(ct_small_path)
    (tmp_path / "image").mkdir()
    scores = {}
    for i in range(3):
        Image.fromarray(hu + 10.0 * i, mode="F").save(tmp_path / "image" / f"{i:04d}.tif")
        scores[f"{i:04d}.tif"] = [0.4, 2.2, 3.8][i]
    scores["9999.tif"] = 1.0                                  # listed, but no image: skipped
    (tmp_path / "train.json").write_text(json.dumps(scores))
    samples, report = load_scored(tmp_path)
    assert [(s.path, s.target) for s in samples] == [("image/0000.tif", 0.4), ("image/0001.tif", 2.2),
                                                     ("image/0002.tif", 3.8)]
    assert samples[0].labels == {"modality": "ct", "region": "abdomen", "type": "soft"}
    assert report.kind == "ldctiqa" and report.skipped_by_reason == {"missing": 1}
    scores["0000.tif"] = 7.0
    (tmp_path / "train.json").write_text(json.dumps(scores))
    with pytest.raises(DatasetError, match="outside 0-4"):
        ldctiqa_samples(tmp_path)


def test_prompts_tags_win_then_manifest(tmp_path: Path, retina_path: Path) -> None:
    manifest = build_scored_corpus(tmp_path, retina_path, with_3d=False)
    text = manifest.read_text().replace("ct2d_0,1.0,ct,chest", "ct2d_0,1.0,mr,chest")
    manifest.write_text(text)
    samples, _ = read_manifest(manifest)
    cache = InputCache(PreprocessConfig(image_size=32))
    keys, errors = cache.prepare([PrepJob(s.ref, 7, s.labels.get("type")) for s in samples])
    assert errors == [None] * len(samples)
    by = {s.path: (s, cache.info(k)["tag_prompts"]) for s, k in zip(samples, keys)}
    s, tags = by["ct2d_0"]
    values, sources = resolve_prompt(s, tags)
    assert values["modality"] == "ct" and sources["modality"] == "tags"      # the header wins
    assert values["region"] == "chest" and sources["region"] in ("tags", "manifest")
    s, tags = by["fundus/retina_0.png"]                                     # a PNG has no tags
    values, sources = resolve_prompt(s, tags)
    assert values == {"dimension": "2d", "modality": "fundus", "region": "eye", "type": "color"}
    assert sources["modality"] == "manifest"
    assert classifier_labels(s, tags) == {"modality": "fundus", "region": "eye", "type": "color"}


# ------------------------------------------------------------------------------ splits

def test_split_deterministic_grouped_and_near_8_1_1() -> None:
    samples = [SimpleNamespace(group=f"patient-{i // 3}", split=None, i=i) for i in range(3000)]
    a = assign_splits(samples)
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    b = assign_splits(shuffled)
    for k in ("train", "val", "test"):
        assert sorted(s.i for s in a[k]) == sorted(s.i for s in b[k])
    check_no_leakage((s.group, k) for k in a for s in a[k])
    n = {k: len({s.group for s in v}) for k, v in a.items()}
    assert n == {"train": 800, "val": 100, "test": 100}
    assert split_groups(["x", "y", "z"]) == split_groups(["z", "y", "x"])
    assert sorted(split_groups(["x", "y", "z"]).values()) == ["test", "train", "val"]


def test_manifest_split_column_checked_for_leakage(tmp_path: Path, retina_path: Path) -> None:
    manifest = build_scored_corpus(tmp_path, retina_path, with_3d=False)
    samples, _ = read_manifest(manifest)
    parts = assign_splits(samples)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [4, 2, 2]
    manifest.write_text(manifest.read_text().replace(",ct2", ",ct0"))       # source ct0 in train and val
    samples, _ = read_manifest(manifest)
    with pytest.raises(DatasetError, match="more than one split"):
        assign_splits(samples)


# ------------------------------------------------------------------------------ cache

def test_cache_prepares_each_study_once_on_disk(tmp_path: Path, retina_path: Path) -> None:
    manifest = build_scored_corpus(tmp_path / "data", retina_path)
    samples, _ = read_manifest(manifest)
    cfg = PreprocessConfig(image_size=32)
    cache = InputCache(cfg, directory=tmp_path / "cache")
    jobs = [PrepJob(s.ref, 7, s.labels.get("type")) for s in samples]
    keys, errors = cache.prepare(jobs)
    assert all(e is None for e in errors)
    shapes = {s.path: cache.get(k).images.shape for s, k in zip(samples, keys)}
    assert shapes["ct3d_0"] == (7, 3, 32, 32) and shapes["fundus/retina_0.png"] == (3, 32, 32)
    assert cache.get(keys[0]).images.dtype == np.float32
    idx = cache.info(keys[samples.index(next(s for s in samples if s.path == "ct3d_0"))])["indices"]
    assert 0 not in idx and 5 not in idx                                   # the air slices are not salient
    files = sorted((tmp_path / "cache").rglob("*.npy"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = InputCache(cfg, directory=tmp_path / "cache")                   # a later run / stage
    calls = []
    keys2, _ = again.prepare(jobs, on_done=lambda: calls.append(1))
    assert keys2 == keys and len(calls) == len(jobs)
    assert [f.stat().st_mtime_ns for f in files] == stamps                 # nothing decoded again
    # a different preprocessing is a different key
    other = InputCache(PreprocessConfig(image_size=48), directory=tmp_path / "cache")
    assert other.key(jobs[0]) != cache.key(jobs[0])
    assert not math.isnan(float(cache.get(keys[0]).images.mean()))


def test_rot90_flip_augmentation_is_dihedral_and_training_only(tmp_path: Path) -> None:
    """Training-time rot90 + flip yields only dihedral transforms of the cached input; without
    augmentation the dataset returns the cached input unchanged (evaluation is deterministic)."""
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data as skdata

    from engines.io.discover import discover_studies
    from engines.preprocess import PreprocessConfig
    from training.data.cache import InputCache, PrepJob
    from training.data.torchdata import Item, StudyDataset

    Image.fromarray(skdata.retina()[::8, ::8]).save(tmp_path / "retina.png")
    ref = next(iter(discover_studies(tmp_path)))
    cache = InputCache(PreprocessConfig(image_size=64))
    keys, errors = cache.prepare([PrepJob(ref, 7, None)], workers=0)
    assert errors == [None]
    item = Item(key=keys[0], kind="2d", prompt=np.zeros(29, np.float32), target=0.5, sample=None)  # type: ignore[arg-type]
    base = torch.from_numpy(np.asarray(cache.get(keys[0]).images, dtype=np.float32))
    group = [torch.rot90(b, k, dims=(-2, -1)) for b in (base, base.flip(-1)) for k in range(4)]
    plain = StudyDataset([item], cache)
    assert torch.equal(plain[0]["x"], base)
    aug = StudyDataset([item], cache, flip=True, rot90=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(64):
        x = aug[0]["x"]
        hits = [i for i, g in enumerate(group) if torch.equal(x, g)]
        assert hits, "augmented input is not a dihedral transform of the cached one"
        seen.add(hits[0])
    assert len(seen) >= 6   # the random transforms actually vary
