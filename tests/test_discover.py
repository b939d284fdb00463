"""Safe walk and DICOM series grouping / sorting on series written with pydicom from a real CT header."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from engines.io import discover_studies, iter_files, open_study, read_study
from tests.conftest import CORONAL, SAGITTAL


def _z_of(paths: list[Path]) -> list[float]:
    return [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in paths]


def test_shuffled_names_and_instance_numbers_sorted_by_position(tmp_path: Path, write_ct_series) -> None:
    rng = random.Random(0)
    z = [float(v) for v in range(0, 50, 5)]          # 10 slices, 5 mm
    names = [f"{rng.randrange(10**6):06d}.dcm" for _ in z]
    inst = list(range(1, 11))
    rng.shuffle(inst)                                   # InstanceNumber says nothing about position
    order = list(range(10))
    rng.shuffle(order)
    write_ct_series(tmp_path / "ser", [z[i] for i in order], instance_numbers=inst,
                    filenames=[names[i] for i in order])
    (ref,) = list(discover_studies(tmp_path))
    assert ref.error is None and ref.kind == "3d" and ref.n_slices == 10
    assert ref.rel_path == "ser"
    assert _z_of(ref.files) == z                         # axial normal (0,0,1): ascending z
    assert ref.spacing is not None and ref.spacing[0] == pytest.approx(5.0)
    assert ref.spacing[1:] == pytest.approx((0.661468, 0.661468))
    assert not {"missing_slice", "duplicate_position", "uneven_spacing", "gantry_tilt",
                "sorted_by_instance"} & set(ref.flags)


def test_missing_duplicate_uneven_flags(tmp_path: Path, write_ct_series) -> None:
    write_ct_series(tmp_path / "missing", [0, 2, 4, 8, 10])
    write_ct_series(tmp_path / "dup", [0, 2, 2, 4, 6])
    write_ct_series(tmp_path / "uneven", [0, 2, 4, 5.2, 7.2, 9.2])
    refs = {r.rel_path: r for r in discover_studies(tmp_path)}
    assert "missing_slice" in refs["missing"].flags and "uneven_spacing" not in refs["missing"].flags
    assert "duplicate_position" in refs["dup"].flags and refs["dup"].n_slices == 5  # kept, not dropped
    assert "uneven_spacing" in refs["uneven"].flags
    assert refs["missing"].spacing[0] == pytest.approx(2.0)


def test_gantry_tilt(tmp_path: Path, write_ct_series) -> None:
    # Slices stacked along z but shifted in y (a tilted gantry): the stack axis is not the normal.
    pos = [(0.0, 0.3 * i * 2.5, 2.5 * i) for i in range(6)]
    write_ct_series(tmp_path / "tilt", pos)
    (ref,) = list(discover_studies(tmp_path))
    assert "gantry_tilt" in ref.flags and ref.spacing[0] == pytest.approx(2.5)


def test_mixed_orientations_and_localizer_split(tmp_path: Path, write_ct_series) -> None:
    uid = pydicom.uid.generate_uid()
    write_ct_series(tmp_path / "s", [0, 5, 10, 15], series_uid=uid, filenames=[f"a{i}.dcm" for i in range(4)])
    write_ct_series(tmp_path / "s", [(float(x), 0.0, 0.0) for x in (0, 5, 10)], series_uid=uid,
                    orientation=SAGITTAL, filenames=[f"b{i}.dcm" for i in range(3)])
    write_ct_series(tmp_path / "s", [(0.0, -100.0, 0.0)], series_uid=uid, orientation=CORONAL,
                    image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), filenames=["scout.dcm"])
    refs = list(discover_studies(tmp_path))
    sizes = sorted((r.n_slices, tuple(sorted(set(r.flags) & {"localizer"}))) for r in refs)
    assert sizes == [(1, ("localizer",)), (3, ()), (4, ())]
    multi = [r for r in refs if r.n_slices > 1]
    assert sorted(r.rel_path for r in multi) == ["s#1", "s#2"]
    assert next(r for r in refs if r.n_slices == 1).rel_path == "s/scout.dcm"
    assert all(r.series_uid == uid for r in refs)
    sag = next(r for r in refs if r.n_slices == 3)
    xs = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[0]) for p in sag.files]
    assert xs == [10.0, 5.0, 0.0]  # sagittal normal is (0,1,0) × (0,0,−1) = (−1,0,0): ascending along it
    assert sag.spacing[0] == pytest.approx(5.0)


def test_echo_numbers_split(tmp_path: Path, write_ct_series) -> None:
    uid = pydicom.uid.generate_uid()
    for echo in (1, 2):
        def set_echo(i, ds, echo=echo):
            ds.EchoNumbers = echo
        write_ct_series(tmp_path / "mr", [0, 3, 6], series_uid=uid, modality="MR", extra=set_echo,
                        filenames=[f"e{echo}_{i}.dcm" for i in range(3)])
    refs = list(discover_studies(tmp_path))
    assert [r.n_slices for r in refs] == [3, 3]


def test_instance_number_fallback_when_positions_missing(tmp_path: Path, write_ct_series) -> None:
    def drop_position(i, ds):
        del ds.ImagePositionPatient

    paths = write_ct_series(tmp_path / "nopos", [0, 1, 2, 3], instance_numbers=[3, 1, 4, 2], extra=drop_position)
    (ref,) = list(discover_studies(tmp_path))
    assert "sorted_by_instance" in ref.flags and "spacing_unknown" in ref.flags
    assert ref.files == [paths[1], paths[3], paths[0], paths[2]]


def test_single_slice_is_2d(tmp_path: Path, ct_small_path: Path) -> None:
    shutil.copy(ct_small_path, tmp_path / "one.dcm")
    (ref,) = list(discover_studies(tmp_path))
    assert ref.kind == "2d" and ref.n_slices == 1 and "single_slice" in ref.flags
    vol = read_study(ref)
    assert vol.array.shape == (1, 128, 128)


def test_open_study_is_lazy_and_matches_read_study(tmp_path: Path, write_ct_series) -> None:
    write_ct_series(tmp_path / "s", [0, 5, 10])
    (ref,) = list(discover_studies(tmp_path))
    src = open_study(ref)
    assert len(src) == 3 and src.spacing[0] == pytest.approx(5.0)
    vol = read_study(ref)
    np.testing.assert_array_equal(src.get_slice(2), vol.array[2])
    # A StudyRef built by hand (files only) is re-scanned and gives the same slices.
    from engines.io.discover import StudyRef

    manual = StudyRef(kind="3d", format="dicom", root=tmp_path, files=list(reversed(ref.files)), rel_path="s")
    np.testing.assert_array_equal(open_study(manual).get_slice(0), vol.array[0])


def test_walk_skips_hidden_junk_and_dicomdir(tmp_path: Path, ct_small_path: Path, pydicom_test_dir: Path) -> None:
    (tmp_path / "a").mkdir()
    shutil.copy(ct_small_path, tmp_path / "a" / "ct.dcm")
    shutil.copy(ct_small_path, tmp_path / ".hidden.dcm")
    (tmp_path / ".git").mkdir()
    shutil.copy(ct_small_path, tmp_path / ".git" / "x.dcm")
    (tmp_path / "Thumbs.db").write_bytes(b"junk")
    (tmp_path / "notes.txt").write_text("hello")
    shutil.copy(pydicom_test_dir / "dicomdirtests" / "DICOMDIR", tmp_path / "DICOMDIR")
    skipped: list[tuple[str, str]] = []
    refs = list(discover_studies(tmp_path, on_skip=lambda rel, why: skipped.append((rel, why))))
    assert [r.rel_path for r in refs] == ["a/ct.dcm"]
    reasons = dict(skipped)
    assert "DICOMDIR" in reasons["DICOMDIR"] and reasons[".hidden.dcm"] == "hidden"
    assert reasons["Thumbs.db"] == "junk file" and ".git" in reasons


def test_symlink_loop_and_link_outside_root(tmp_path: Path, ct_small_path: Path, symlinks_supported) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    shutil.copy(ct_small_path, root / "d" / "ct.dcm")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(ct_small_path, outside / "secret.dcm")
    os.symlink(root, root / "d" / "loop")              # loop back to the root
    os.symlink(outside, root / "out")                  # directory outside the root
    os.symlink(outside / "secret.dcm", root / "f.dcm")  # file outside the root
    os.symlink(root / "d" / "ct.dcm", root / "alias.dcm")  # same file twice inside the root
    skipped: list[tuple[str, str]] = []
    files = list(iter_files(root, on_skip=lambda rel, why: skipped.append((rel, why))))
    assert [f.relative_to(root).as_posix() for f in files] == ["alias.dcm"] or \
        [f.relative_to(root).as_posix() for f in files] == ["d/ct.dcm"]
    reasons = dict(skipped)
    assert "outside" in reasons["out"] and "outside" in reasons["f.dcm"]
    refs = list(discover_studies(root))
    assert len(refs) == 1


def test_depth_include_exclude(tmp_path: Path, write_ct_series) -> None:
    write_ct_series(tmp_path / "a", [0.0], filenames=["top.dcm"])
    write_ct_series(tmp_path / "a" / "b" / "c", [0.0], filenames=["deep.dcm"])
    rel = lambda refs: sorted(r.rel_path for r in refs)  # noqa: E731
    assert rel(discover_studies(tmp_path)) == ["a/b/c/deep.dcm", "a/top.dcm"]
    assert rel(discover_studies(tmp_path, max_depth=1)) == ["a/top.dcm"]
    assert rel(discover_studies(tmp_path, exclude=["a/b"])) == ["a/top.dcm"]
    assert rel(discover_studies(tmp_path, include=["*/deep.dcm"])) == ["a/b/c/deep.dcm"]


def test_identical_copies_counted_once(tmp_path: Path, ct_small_path: Path) -> None:
    (tmp_path / "x").mkdir()
    shutil.copy(ct_small_path, tmp_path / "one.dcm")
    shutil.copy(ct_small_path, tmp_path / "x" / "copy.dcm")  # same SOPInstanceUID
    skipped: list[tuple[str, str]] = []
    (ref,) = list(discover_studies(tmp_path, on_skip=lambda rel, why: skipped.append((rel, why))))
    assert ref.n_slices == 1 and ref.rel_path == "one.dcm"
    assert skipped == [("x/copy.dcm", "copy of a series already found in another folder")]


def test_duplicate_instances_in_one_folder_counted_once(tmp_path: Path, ct_small_path: Path) -> None:
    shutil.copy(ct_small_path, tmp_path / "one.dcm")
    shutil.copy(ct_small_path, tmp_path / "copy.dcm")  # same SOPInstanceUID, same folder
    (ref,) = list(discover_studies(tmp_path))
    assert ref.n_slices == 1 and "duplicate_instance" in ref.flags


def test_series_split_over_folders_streams_per_folder(tmp_path: Path, write_ct_series) -> None:
    """A series spread over two folders: one study per folder, the second flagged; studies of
    the first folder are yielded before the second folder is read."""
    import pydicom

    write_ct_series(tmp_path / "a", [0.0, 1.0, 2.0])
    uid = pydicom.dcmread(next((tmp_path / "a").iterdir()), stop_before_pixels=True).SeriesInstanceUID
    write_ct_series(tmp_path / "b", [3.0, 4.0, 5.0], series_uid=uid)
    write_ct_series(tmp_path / "c", [6.0, 7.0], series_uid=uid)
    gen = discover_studies(tmp_path)
    first = next(gen)
    assert first.rel_path == "a" and first.n_slices == 3
    # Written after the first study was yielded: seen only because folder c is read later
    # (the walk looks one folder ahead to know that a folder has ended).
    write_ct_series(tmp_path / "c", [8.0], series_uid=uid, filenames=["late.dcm"])
    rest = list(gen)
    assert [(r.rel_path, r.n_slices) for r in rest] == [("b", 3), ("c", 3)]
    assert all("series_split_across_folders" in r.flags for r in rest)
    assert "series_split_across_folders" not in first.flags


def test_real_dicomdirtests_tree(pydicom_test_dir: Path) -> None:
    """The real small CT/MR/CR tree shipped with pydicom: every file once, series grouped."""
    root = pydicom_test_dir / "dicomdirtests"
    refs = list(discover_studies(root))
    paths = [p for r in refs for p in r.files]
    assert len(paths) == len(set(paths))
    ct5 = next(r for r in refs if r.rel_path == "98892001/CT5N")
    assert ct5.kind == "3d" and ct5.n_slices == 5 and ct5.error is None
    zs = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in ct5.files]
    assert zs == sorted(zs) or zs == sorted(zs, reverse=True)
    assert all(not r.rel_path.endswith("DICOMDIR") for r in refs)


def test_same_folder_encodings_of_one_multiframe_object_are_not_called_copies(tmp_path: Path) -> None:
    """pydicom ships one 2-frame RGB object in several encodings (same SOP instance UID): within
    one folder they stay separate studies, as before streaming; only another folder's exact
    repeat of a series is a copy."""
    from pydicom.data import get_testdata_file

    for name in ("SC_rgb_2frame.dcm", "SC_rgb_rle_2frame.dcm"):
        shutil.copy(get_testdata_file(name), tmp_path / name)
    skipped: list[tuple[str, str]] = []
    refs = list(discover_studies(tmp_path, on_skip=lambda rel, why: skipped.append((rel, why))))
    assert sorted(r.rel_path for r in refs) == ["SC_rgb_2frame.dcm", "SC_rgb_rle_2frame.dcm"]
    assert skipped == []
    (tmp_path / "again").mkdir()
    shutil.copy(get_testdata_file("SC_rgb_2frame.dcm"), tmp_path / "again" / "copy.dcm")
    skipped.clear()
    refs = list(discover_studies(tmp_path, on_skip=lambda rel, why: skipped.append((rel, why))))
    assert len(refs) == 2 and skipped == [("again/copy.dcm", "copy of a series already found in another folder")]
