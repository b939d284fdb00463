"""TensorRT pieces that need no TensorRT: engine header format, compatibility checks, cache key,
batch profiles, precision rules, calibration batching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engines import names
from engines.backends.engine_header import (ENGINE_MAGIC, BatchProfile, check_engine_compatible,
                                            engine_incompatibilities, pack_engine, parse_batch_profile,
                                            read_engine_header, unpack_engine)
from engines.errors import ConfigError, UnsupportedArtifact
from export.quantize import calibration_batches
from export.tensorrt import (check_precision, engine_cache_key, graph_profile, input_profiles, make_header,
                             reusable_engine, workspace_bytes)

CARD = {"task": "iqa", "preset": "mediqa-test", "n_slices": 7}


def _header(**over):
    h = make_header(card=CARD, graph="2d", precision="fp16", profile=BatchProfile(1, 8, 32), trt_version="10.3.0",
                    gpu_name="NVIDIA H100", compute_capability="9.0", onnx_sha256="ab" * 32, image_size=64,
                    prompt_dim=29, n_slices=7)
    h.update(over)
    return h


def test_header_round_trip(tmp_path):
    plan = bytes(range(256)) * 10
    blob = pack_engine(_header(), plan)
    assert blob.startswith(ENGINE_MAGIC)
    header, got = unpack_engine(blob)
    assert bytes(got) == plan
    assert header["card"] == CARD and header["precision"] == "fp16"
    assert header["profile"] == {"min": 1, "opt": 8, "max": 32}
    assert header["input_shapes"] == {names.IMAGES: [3, 64, 64], names.PROMPT: [29]}
    p = tmp_path / "m.engine"
    p.write_bytes(blob)
    assert read_engine_header(p) == header


@pytest.mark.parametrize("cut", [3, 10, 40])
def test_truncated_engine_rejected(tmp_path, cut):
    blob = pack_engine(_header(), b"PLAN")
    with pytest.raises(UnsupportedArtifact, match="truncated|too short"):
        unpack_engine(blob[:cut])
    p = tmp_path / "t.engine"
    p.write_bytes(blob[:cut])
    with pytest.raises(UnsupportedArtifact):
        read_engine_header(p)


def test_header_without_plan_and_foreign_engine_rejected(tmp_path):
    blob = pack_engine(_header(), b"")
    with pytest.raises(UnsupportedArtifact, match="no TensorRT plan"):
        unpack_engine(blob)
    with pytest.raises(UnsupportedArtifact, match="not a MedIQA engine.*mediqa export"):
        unpack_engine(b"\x00" * 64)
    raw = json.dumps([1, 2]).encode()
    bad = ENGINE_MAGIC + len(raw).to_bytes(4, "little") + raw + b"PLAN"
    with pytest.raises(UnsupportedArtifact, match="not a JSON object"):
        unpack_engine(bad)


def test_compatibility_messages():
    h = _header()
    assert engine_incompatibilities(h, trt_version="10.3.1", compute_capability="9.0") == []
    probs = engine_incompatibilities(h, trt_version="10.3.0", compute_capability="8.9")
    assert len(probs) == 1 and "compute capability 9.0" in probs[0] and "8.9" in probs[0]
    probs = engine_incompatibilities(h, trt_version="10.8.0", compute_capability="9.0")
    assert len(probs) == 1 and "TensorRT 10.3.0" in probs[0] and "10.8.0" in probs[0]
    with pytest.raises(UnsupportedArtifact) as ei:
        check_engine_compatible(h, trt_version="11.0.0", compute_capability="8.0", source="x.engine")
    msg = str(ei.value)
    assert "x.engine" in msg and "mediqa export MODEL --trt" in msg and "8.0" in msg and "11.0.0" in msg


def test_cache_key_changes_with_each_component():
    base = dict(onnx_sha256="a" * 64, trt_version="10.3.0", compute_capability="9.0", precision="fp16",
                profile=BatchProfile(1, 8, 32))
    k0 = engine_cache_key(**base)
    assert k0 == engine_cache_key(**base) and len(k0) == 32
    variants = [dict(onnx_sha256="b" * 64), dict(trt_version="10.4.0"), dict(compute_capability="8.9"),
                dict(precision="bf16"), dict(profile=BatchProfile(1, 16, 32)), dict(profile=BatchProfile(2, 8, 32)),
                dict(profile=BatchProfile(1, 8, 64))]
    keys = {engine_cache_key(**{**base, **v}) for v in variants}
    assert k0 not in keys and len(keys) == len(variants)


def test_reusable_engine_by_key(tmp_path):
    h = _header()
    p = tmp_path / "model.fp16.engine"
    assert not reusable_engine(p, h["cache_key"])
    p.write_bytes(pack_engine(h, b"PLAN"))
    assert reusable_engine(p, h["cache_key"])
    assert not reusable_engine(p, "0" * 32)
    p.write_bytes(b"garbage")
    assert not reusable_engine(p, h["cache_key"])


def test_profile_parsing_and_validation():
    assert parse_batch_profile("1:8:32") == BatchProfile(1, 8, 32)
    assert parse_batch_profile(" 2 : 4 : 4 ") == BatchProfile(2, 4, 4)
    assert parse_batch_profile("16") == BatchProfile(1, 16, 16)
    assert str(BatchProfile(1, 8, 32)) == "1:8:32"
    for bad in ("8:1:32", "1:64:32", "0:1:2", "1:8", "a:b:c", "1:2:3:4", "-1:2:3"):
        with pytest.raises(ValueError):
            parse_batch_profile(bad)
    p = BatchProfile(2, 8, 32)
    assert p.contains(2) and p.contains(32) and not p.contains(1) and not p.contains(33)
    assert p.shapes((3, 64, 64)) == ((2, 3, 64, 64), (8, 3, 64, 64), (32, 3, 64, 64))


def test_input_profiles_per_graph():
    prof = BatchProfile(1, 8, 32)
    two = input_profiles("2d", prof, image_size=224, prompt_dim=29)
    assert two[names.IMAGES] == ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    assert two[names.PROMPT] == ((1, 29), (8, 29), (32, 29))
    three = input_profiles("3d", prof, image_size=224, prompt_dim=29, n_slices=7)
    # 32 images → 4 volumes of 7 slices at most; opt 8 images → 1 volume
    assert three[names.VOLUMES] == ((1, 7, 3, 224, 224), (1, 7, 3, 224, 224), (4, 7, 3, 224, 224))
    assert set(input_profiles("classifier", prof, image_size=64, prompt_dim=29)) == {names.IMAGES}
    assert graph_profile("3d", BatchProfile(1, 1, 1), 7) == BatchProfile(1, 1, 1)
    with pytest.raises(ValueError):
        input_profiles("4d", prof, image_size=64, prompt_dim=29)


def test_precision_rules_and_workspace():
    check_precision("fp16", "8.6")
    check_precision("bf16", "8.0")
    with pytest.raises(ConfigError, match="bf16.*8.0.*7.5.*--precision fp16"):
        check_precision("bf16", "7.5")
    with pytest.raises(ConfigError, match="one of"):
        check_precision("fp8", "9.0")
    assert workspace_bytes(4) == 4 << 30
    assert workspace_bytes(0.5) == 1 << 29
    with pytest.raises(ConfigError):
        workspace_bytes(0)


def test_calibration_batching():
    imgs = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1) * np.ones((1, 3, 2, 2), np.float32)
    prompts = np.arange(10, dtype=np.float32)[:, None]
    loose = calibration_batches(imgs, prompts, 4)
    assert [len(b[names.IMAGES]) for b in loose] == [4, 4, 2]
    full = calibration_batches(imgs, prompts, 4, fill=True)
    assert [len(b[names.IMAGES]) for b in full] == [4, 4, 4]
    # the last batch wraps around to the first images, keeping images and prompts paired
    assert full[-1][names.PROMPT][:, 0].tolist() == [8, 9, 0, 1]
    assert full[-1][names.IMAGES][:, 0, 0, 0].tolist() == [8, 9, 0, 1]
    with pytest.raises(ValueError):
        calibration_batches(imgs[:0], prompts[:0], 4)
    with pytest.raises(ValueError):
        calibration_batches(imgs, prompts[:3], 4)
