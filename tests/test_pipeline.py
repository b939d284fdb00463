"""engines.pipeline on real files: DICOM series written with pydicom from its CT_small / MR_small
test files, PNGs written with Pillow, and a tiny random ``mediqa-test`` model saved as a real
artifact. The helpers here are shared by test_score_cli.py, test_robustness.py and
test_report_html.py."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pytest

CANARY_NAME = "ZZCANARY^PATIENTNAME"
CANARY_ID = "ZZCANARYID4711"
CANARY_BIRTH = "19010203"
CANARY_ACCESSION = "ZZACC998877"
TEST_KEY = b"test-key-0123456789abcdef"

# --------------------------------------------------------------------------- helpers (shared)


def make_artifact(path: Path, *, classifier: bool = True, seed: int = 0) -> Path:
    """Save a random ``mediqa-test`` model (and prompt classifier) as a real .safetensors artifact."""
    import torch

    from engines.artifact import ModelCard, save_artifact
    from engines.models.presets import get_preset
    from engines.models.registry import create_classifier, create_model
    from engines.prompts import DEFAULT_VOCAB

    torch.manual_seed(seed)
    preset = get_preset("mediqa-test")
    modules = {"iqa": create_model("mediqa-test", DEFAULT_VOCAB.size)}
    if classifier:
        modules["classifier"] = create_classifier("mediqa-test", DEFAULT_VOCAB)
    card = ModelCard(task="iqa", preset="mediqa-test", prompt_vocab=DEFAULT_VOCAB.to_dict(),
                     preprocess=preset.preprocess_config().to_dict(),
                     label_scale={"min": 1.0, "max": 5.0, "name": "test"},
                     classifier_preset="mediqa-test" if classifier else None)
    return save_artifact(path, modules, card)


def write_series(folder: Path, *, source: str = "CT_small.dcm", n: int = 6, seed: int = 0,
                 canary: bool = True, spacing: float = 2.5) -> str:
    """A DICOM series of ``n`` slices built from a pydicom test file; file names shuffled.

    Returns the SeriesInstanceUID."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(get_testdata_file(source))
    arr = base.pixel_array.astype(np.float64)
    dtype = base.pixel_array.dtype
    rng = np.random.default_rng(seed)
    uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    names = rng.permutation(n)
    info = np.iinfo(dtype)
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i * spacing)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        noisy = arr * (0.8 + 0.4 * i / max(n - 1, 1)) + rng.normal(0, 5 + seed % 7 * 10, arr.shape)
        ds.PixelData = np.clip(noisy, max(info.min, -1000), info.max).astype(dtype).tobytes()
        if canary:
            ds.PatientName = CANARY_NAME
            ds.PatientID = CANARY_ID
            ds.PatientBirthDate = CANARY_BIRTH
            ds.AccessionNumber = CANARY_ACCESSION
        ds.save_as(folder / f"im{names[i]:04d}.dcm", enforce_file_format=True)
    return uid


def write_png(path: Path, *, seed: int = 0, rgb: bool = False, size: int = 40) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disk = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) < (size / 3) ** 2
    img = 40 + 150 * disk + rng.normal(0, 3 + seed % 5 * 8, (size, size))
    img = np.clip(img, 0, 255).astype(np.uint8)
    if rgb:
        img = np.stack([img, np.roll(img, 3, 0), np.roll(img, 5, 1)], -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


@pytest.fixture(scope="session")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("model") / "test.safetensors")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_series(root / "ct_a", source="CT_small.dcm", n=9, seed=1)
    write_series(root / "mr_b", source="MR_small.dcm", n=5, seed=2)
    write_png(root / "img_c.png", seed=3)
    write_png(root / "sub" / "img_d.png", seed=4, rgb=True)
    return root


@pytest.fixture(autouse=True)
def _study_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDIQA_STUDY_KEY", TEST_KEY.decode())


def _cfg(**kw):
    from engines.pipeline import ScoreConfig

    base = dict(workers=1, batch_size=5, timeout_s=60.0, privacy_key=TEST_KEY)
    base.update(kw)
    return ScoreConfig(**base)


# --------------------------------------------------------------------------- tests


def test_pipeline_scores_mixed_corpus_in_discovery_order(artifact: Path, small_corpus: Path) -> None:
    from engines.backends.torch_backend import TorchBackend
    from engines.io.discover import discover_studies
    from engines.pipeline import score_studies

    expected = [r.rel_path for r in discover_studies(small_corpus)]
    with TorchBackend(artifact) as b:
        recs = list(score_studies(small_corpus, b, _cfg(thumbnails=True)))
    assert [r.path for r in recs] == expected
    assert all(r.status == "ok" for r in recs), [(r.path, r.error_code, r.error) for r in recs]
    by = {r.path: r for r in recs}
    ct, mr, png = by["ct_a"], by["mr_b"], by["img_c.png"]
    assert ct.kind == "3d" and ct.n_slices == 9 and len(ct.salient_slices) == 7
    assert ct.salient_slices == sorted(ct.salient_slices)
    assert ct.modality == "ct" and mr.modality == "mr"
    assert png.kind == "2d" and png.salient_slices == [0] and png.slice_weights == [1.0]
    for r in recs:
        assert 1.0 <= r.score <= 5.0  # label scale of the card
        assert len(r.thumbnails) == len(r.salient_slices)
        assert r.thumbnails[0][:8] == b"\x89PNG\r\n\x1a\n"
        assert len(r.study_id) == 16 and r.model.startswith("mediqa-test@")
    # Fusion: weights sum to one and the score is their weighted sum of slice scores.
    assert abs(sum(ct.slice_weights) - 1.0) < 1e-4
    assert abs(float(np.dot(ct.slice_weights, ct.slice_scores)) - ct.score) < 1e-3
    # Tags decide the modality of DICOM; PNGs have no tags, so the classifier gives all groups.
    assert png.prompt_source == "classifier"
    assert ct.prompt_source in ("tags", "mixed")


def test_fused_score_equals_in_graph_volume_forward(artifact: Path, small_corpus: Path) -> None:
    """Mixed 2D batches + numpy fusion give the model's own forward_volume result."""
    import torch

    from engines.backends.torch_backend import TorchBackend
    from engines.io.discover import discover_studies
    from engines.pipeline import prepare_study, score_studies
    from engines.preprocess import PreprocessConfig
    from engines.prompts import Prompt, PromptVocab, encode_prompt

    with TorchBackend(artifact) as b:
        rec = next(r for r in score_studies(small_corpus, b, _cfg(batch_size=3)) if r.path == "ct_a")
        ref = next(r for r in discover_studies(small_corpus) if r.rel_path == "ct_a")
        prep = prepare_study(ref, PreprocessConfig.from_dict(b.card.preprocess), 7)
        vocab = PromptVocab.from_dict(b.card.prompt_vocab)
        prompt = encode_prompt(Prompt("3d", rec.modality, rec.region, rec.type), vocab)
        with torch.no_grad():
            q, _, w = b.iqa.forward_volume(torch.from_numpy(prep.images[None]), torch.from_numpy(prompt[None]))
    assert prep.indices == rec.salient_slices
    lo, hi = 1.0, 5.0
    assert rec.score == pytest.approx(lo + float(q[0]) * (hi - lo), abs=1e-4)
    assert rec.slice_weights == pytest.approx(w[0].numpy().tolist(), abs=1e-4)


def test_broken_study_does_not_stop_the_batch(artifact: Path, tmp_path: Path) -> None:
    from engines.backends.torch_backend import TorchBackend
    from engines.pipeline import score_studies

    write_png(tmp_path / "a.png", seed=1)
    (tmp_path / "b.dcm").write_bytes(b"this is not dicom at all\n" * 20)
    data = (write_png(tmp_path / "c_src.png", seed=2)).read_bytes()
    (tmp_path / "c_src.png").unlink()
    (tmp_path / "c.png").write_bytes(data[: len(data) // 2])  # truncated PNG
    write_png(tmp_path / "d.png", seed=3)
    with TorchBackend(artifact) as b:
        recs = {r.path: r for r in score_studies(tmp_path, b, _cfg())}
    assert recs["a.png"].status == "ok" and recs["d.png"].status == "ok"
    assert recs["b.dcm"].status == "error" and recs["b.dcm"].error_code == "not_dicom"
    assert recs["c.png"].status == "error" and recs["c.png"].error_code not in ("", "internal")


def test_timeout_kills_a_stuck_reader_and_continues(artifact: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader registered through a plugin blocks in a FIFO read (a real blocking system call);
    the worker is killed after the limit and the next study is still scored."""
    from engines.backends.torch_backend import TorchBackend
    from engines.pipeline import PLUGINS_ENV, score_studies

    monkeypatch.setenv(PLUGINS_ENV, "tests.test_pipeline:register_hanging_reader")
    monkeypatch.setenv("MEDIQA_TEST_FIFO", str(tmp_path / "never-written.fifo"))
    import os

    os.mkfifo(tmp_path / "never-written.fifo")
    data = tmp_path / "data"
    write_png(data / "a.hang.png", seed=1)
    write_png(data / "b.png", seed=2)
    t0 = time.monotonic()
    with TorchBackend(artifact) as b:
        recs = {r.path: r for r in score_studies(data, b, _cfg(timeout_s=2.0))}
    elapsed = time.monotonic() - t0
    assert recs["a.hang.png"].status == "error" and recs["a.hang.png"].error_code == "timeout"
    assert recs["b.png"].status == "ok"
    assert elapsed < 40  # 2 s limit + a worker restart, not a hang


def register_hanging_reader() -> None:
    """Test plugin: studies named ``*.hang.png`` block forever reading a FIFO nobody writes."""
    import os

    from engines.pipeline import register_opener

    def opener(ref):  # noqa: ANN001, ANN202
        with open(os.environ["MEDIQA_TEST_FIFO"], "rb") as fh:  # blocks in open(2)
            fh.read()
        raise AssertionError("unreachable")

    register_opener(lambda ref: ref.rel_path.endswith(".hang.png"), opener)


def slow_start_plugin() -> None:
    """Test plugin: a reader process takes 3 s to start (a cold disk, a loaded machine)."""
    import multiprocessing

    if multiprocessing.current_process().name != "MainProcess":
        time.sleep(3.0)


def dying_start_plugin() -> None:
    """Test plugin: every reader process dies while starting."""
    import multiprocessing
    import os

    if multiprocessing.current_process().name != "MainProcess":
        os._exit(3)


def test_reader_startup_does_not_count_against_the_study_limit(artifact: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from engines.backends.torch_backend import TorchBackend
    from engines.pipeline import PLUGINS_ENV, score_studies

    monkeypatch.setenv(PLUGINS_ENV, "tests.test_pipeline:slow_start_plugin")
    write_png(tmp_path / "a.png", seed=1)
    write_png(tmp_path / "b.png", seed=2)
    with TorchBackend(artifact) as b:
        recs = list(score_studies(tmp_path, b, _cfg(timeout_s=1.5)))
    assert [r.status for r in recs] == ["ok", "ok"], [(r.error_code, r.error) for r in recs]


def test_readers_dying_at_startup_stop_the_run(artifact: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from engines.backends.torch_backend import TorchBackend
    from engines.errors import MediqaError
    from engines.pipeline import PLUGINS_ENV, score_studies

    monkeypatch.setenv(PLUGINS_ENV, "tests.test_pipeline:dying_start_plugin")
    write_png(tmp_path / "a.png", seed=1)
    t0 = time.monotonic()
    with TorchBackend(artifact) as b, pytest.raises(MediqaError, match="die while starting"):
        list(score_studies(tmp_path, b, _cfg()))
    assert time.monotonic() - t0 < 60


def test_readers_start_while_the_model_loads(artifact: Path, small_corpus: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Given a model path, score_studies reads only the card, starts the header scanner and the
    readers, then loads the model: their spawn and imports overlap the model load."""
    import multiprocessing

    import engines.backends.auto as auto
    from engines.pipeline import score_studies

    real = auto.open_backend
    children_at_open: list[int] = []

    def spy(*a, **kw):
        deadline = time.monotonic() + 10.0   # the feeder thread spawns them asynchronously
        while not multiprocessing.active_children() and time.monotonic() < deadline:
            time.sleep(0.02)
        children_at_open.append(len(multiprocessing.active_children()))
        return real(*a, **kw)

    monkeypatch.setattr(auto, "open_backend", spy)
    recs = list(score_studies(small_corpus, artifact, _cfg()))
    assert children_at_open and children_at_open[0] >= 1
    assert [r.status for r in recs] == ["ok"] * 4


def test_reuse_callback_skips_scoring(artifact: Path, small_corpus: Path) -> None:
    from engines.backends.torch_backend import TorchBackend
    from engines.pipeline import ScoreRecord, score_studies

    with TorchBackend(artifact) as b:
        recs = list(score_studies(small_corpus, b, _cfg(),
                                  reuse=lambda ref: ScoreRecord(score=2.5, status="ok")
                                  if ref.kind == "2d" else None))
    two_d = [r for r in recs if r.reused]
    assert len(two_d) == 2 and all(r.score == 2.5 for r in two_d)
    assert all(not r.reused and r.n_slices for r in recs if r.path in ("ct_a", "mr_b"))


def test_model_column_names_the_model_file_hash(artifact: Path, small_corpus: Path) -> None:
    """Scoring by model path labels records ``preset@sha256[:12]`` of the file; a caller that has
    hashed the file already (the CLI, for --resume) passes the hash and it is used as given."""
    from engines.pipeline import file_sha256, score_studies

    cfg = _cfg(include=("ct_a/*",))
    recs = list(score_studies(small_corpus, artifact, cfg))
    assert recs and {r.model.split("@")[1] for r in recs} == {file_sha256(artifact)[:12]}
    recs = list(score_studies(small_corpus, artifact, cfg, model_hash="f" * 64))
    assert recs and {r.model.split("@")[1] for r in recs} == {"f" * 12}


def test_record_row_has_design_columns_and_escapes() -> None:
    from engines.pipeline import COLUMNS, ScoreRecord

    r = ScoreRecord(study_id="x", path="=cmd|'/c calc'!A1", manufacturer="+C scanner",
                    score=0.5, slice_scores=[0.25, 0.75], salient_slices=[1, 2])
    row = r.to_row()
    assert tuple(row) == COLUMNS
    assert row["path"].startswith("'=") and row["manufacturer"] == "'+C scanner"
    assert row["slice_scores"] == "0.2500;0.7500" and row["salient_slices"] == "1;2"
    assert r.to_row(hide_paths=True)["path"] == ""
    back = ScoreRecord.from_row(r.to_row())
    assert back.score == 0.5 and back.salient_slices == [1, 2]


def test_series_split_over_folders_gets_one_row_per_folder_with_distinct_ids(artifact: Path,
                                                                            tmp_path: Path) -> None:
    """Discovery streams folder by folder: a series spread over two folders is two studies; the
    second is flagged and the two study ids differ (they would collide on the series UID)."""
    import pydicom

    from engines.backends.torch_backend import TorchBackend
    from engines.pipeline import score_studies

    write_series(tmp_path / "part1", n=6, seed=1)
    write_series(tmp_path / "part2", n=6, seed=2)
    uid = pydicom.dcmread(next((tmp_path / "part1").iterdir()), stop_before_pixels=True).SeriesInstanceUID
    for f in (tmp_path / "part2").iterdir():
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid
        ds.save_as(f, enforce_file_format=True)
    with TorchBackend(artifact) as b:
        recs = list(score_studies(tmp_path, b, _cfg()))
    assert [r.path for r in recs] == ["part1", "part2"]
    assert all(r.status == "ok" for r in recs)
    assert "series_split_across_folders" in recs[1].flags
    assert "series_split_across_folders" not in recs[0].flags
    assert recs[0].study_id != recs[1].study_id


@pytest.mark.skipif(not hasattr(__import__("os"), "getpriority"), reason="POSIX priorities")
def test_reader_priority_is_lowered_in_a_child_process() -> None:
    """The helper the scanner and reader processes call: niceness rises by the configured
    amount (capped at 19); 0 leaves it alone."""
    import os
    import subprocess
    import sys

    code = ("import os; from engines.pipeline import _lower_priority as f; a = os.getpriority(os.PRIO_PROCESS, 0); "
            "f(0); b = os.getpriority(os.PRIO_PROCESS, 0); f(5); c = os.getpriority(os.PRIO_PROCESS, 0); "
            "f(30); print(a, b, c, os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0) == getattr(os, 'SCHED_IDLE', -1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    a, b, c = (int(v) for v in out[:3])
    assert b == a and c == min(19, a + 5)
    assert out[4] == "True" or not sys.platform.startswith("linux")


def test_reader_warm_imports_leave_otsu_until_a_volume_needs_it() -> None:
    """A fresh reader imports pydicom and Pillow before its first study, but not scikit-image
    (with SciPy's ndimage ~0.4 core-s per reader, needed only by non-CT volumes); the Otsu
    rule of an MR volume still works in that process, importing it when first used."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from engines.pipeline import _warm_imports; _warm_imports(); "
            "print('pydicom' in sys.modules, 'PIL.PngImagePlugin' in sys.modules, 'skimage' in sys.modules); "
            "from engines.slices import select_salient_slices; from engines.io.volume import Volume, VolumeSource; "
            "a = np.zeros((12, 32, 32), np.float32); a[3:9, 8:24, 8:24] = 100.0; "
            "sel = select_salient_slices(VolumeSource(Volume(array=a, spacing=(1.0, 1.0, 1.0))), 3, modality='MR'); "
            "print(sorted(sel.indices), 'skimage' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert out[:3] == ["True", "True", "False"]
    assert all(3 <= int(i.strip("[],")) <= 8 for i in out[3:6]) and out[6] == "True"


def test_scanner_process_reports_a_vanished_root_as_an_error(tmp_path: Path) -> None:
    """The header scanner runs in its own process; a failure there reaches the consumer as a
    MediqaError (not a hang, not a silent end of the run)."""
    import multiprocessing as mp

    from engines.errors import MediqaError
    from engines.pipeline import ScoreConfig, _RefSource

    src = _RefSource(mp.get_context("spawn"), tmp_path / "gone", ScoreConfig(), log_level=30)
    try:
        deadline = time.monotonic() + 60
        with pytest.raises(MediqaError) as ei:
            while time.monotonic() < deadline:
                if src.take() is None:
                    time.sleep(0.05)
        assert "FileNotFoundError" in str(ei.value)
        with pytest.raises(StopIteration):
            src.take()
    finally:
        src.close()


def drain_scanner(root: Path, cfg, timeout_s: float = 60.0) -> list:
    """Every StudyRef a scanner process (``engines.pipeline._RefSource``) yields for ``root``,
    polling as the feeder does, until it ends (shared with test_header_cache.py)."""
    import multiprocessing as mp

    from engines.pipeline import _RefSource

    src = _RefSource(mp.get_context("spawn"), root, cfg, log_level=30)
    got: list = []
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ref = src.take()
            except StopIteration:
                break
            if ref is None:
                time.sleep(0.02)
            else:
                got.append(ref)
    finally:
        src.close()
    return got


def test_scanner_process_streams_refs_then_ends(tmp_path: Path) -> None:
    from engines.pipeline import ScoreConfig

    for i in range(3):
        write_png(tmp_path / f"d{i}" / "x.png", seed=i)
    got = [r.rel_path for r in drain_scanner(tmp_path, ScoreConfig())]
    assert got == ["d0/x.png", "d1/x.png", "d2/x.png"]


def test_grey_inputs_cross_the_pipe_as_one_channel() -> None:
    """Readers compute and send a grey study's input channel once; the main process gets the
    array ``preprocess_slice`` gives; RGB, and per-channel mean/std, keep three channels."""
    import pickle

    from engines.preprocess import PreprocessConfig, grey_channels, preprocess_slice

    cfg = PreprocessConfig(image_size=32)
    rng = np.random.default_rng(0)
    raw = [rng.normal(size=(40, 40)) for _ in range(3)]
    grey = np.stack([preprocess_slice(r, "mr", None, cfg) for r in raw])
    small = np.stack([preprocess_slice(r, "mr", None, cfg, compact_grey=True) for r in raw])
    assert grey.shape == (3, 3, 32, 32) and small.shape == (3, 1, 32, 32)
    assert len(pickle.dumps(small)) < len(pickle.dumps(grey)) / 2.5
    back = grey_channels(small)
    assert back.shape == grey.shape and np.array_equal(back, grey)
    rgb = np.stack([preprocess_slice(rng.uniform(size=(40, 40, 3)), "fundus", None, cfg, compact_grey=True)])
    assert rgb.shape == (1, 3, 32, 32) and grey_channels(rgb) is rgb
    per_channel = PreprocessConfig(image_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    three = preprocess_slice(raw[0], "mr", None, per_channel, compact_grey=True)
    assert three.shape == (3, 32, 32) and not np.array_equal(three[0], three[1])
    np.testing.assert_array_equal(three, preprocess_slice(raw[0], "mr", None, per_channel))
