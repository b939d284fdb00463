"""Artifact format: model card JSON, safetensors round trip, fp16, ensembles, refusal of bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.artifact import ModelCard, load_card, load_tensors, save_artifact
from engines.errors import UnsupportedArtifact
from engines.models.loading import load_artifact
from engines.models.maniqa import EnsembleNet
from engines.models.presets import get_preset
from engines.models.registry import create_classifier, create_model
from engines.prompts import DEFAULT_VOCAB

P = DEFAULT_VOCAB.size
S = get_preset("mediqa-test").image_size
REPO = Path(__file__).resolve().parents[1]


def _card(**kw) -> ModelCard:
    base = dict(task="iqa", preset="mediqa-test", prompt_vocab=DEFAULT_VOCAB.to_dict(),
                preprocess=get_preset("mediqa-test").preprocess_config().to_dict(),
                label_scale={"min": 0.0, "max": 4.0, "name": "LDCTIQA2023"},
                metrics={"val": {"srcc": 0.5}})
    base.update(kw)
    return ModelCard(**base)


def _inputs(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 3, S, S, generator=g)
    p = torch.zeros(n, P)
    p[:, 0] = 1
    p[:, 3] = 1
    return x, p


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return create_model("mediqa-test", P).eval()


def test_card_label_range_reads_the_scale_with_defaults() -> None:
    assert _card().label_range() == (0.0, 4.0)
    assert _card(label_scale={"name": "unnamed"}).label_range() == (0.0, 1.0)
    assert _card(label_scale={"min": 1, "max": 5}).label_range() == (1.0, 5.0)


def test_card_json_round_trip_and_unknown_keys() -> None:
    card = _card(classifier_preset="mediqa-test", data_summary={"n": 3})
    again = ModelCard.from_json(card.to_json())
    assert again == card
    d = json.loads(card.to_json())
    d["frobnicate"] = 1
    with pytest.raises(UnsupportedArtifact, match="unknown keys \\['frobnicate'\\]"):
        ModelCard.from_dict(d)
    del d["frobnicate"], d["preset"]
    with pytest.raises(UnsupportedArtifact, match="lacks required keys \\['preset'\\]"):
        ModelCard.from_dict(d)
    with pytest.raises(UnsupportedArtifact, match="not valid JSON"):
        ModelCard.from_json("{not json")
    with pytest.raises(UnsupportedArtifact, match="task"):
        _card(task="segmentation")


def test_round_trip_with_classifier(net, tmp_path: Path) -> None:
    torch.manual_seed(1)
    clf = create_classifier("mediqa-test", DEFAULT_VOCAB).eval()
    card = _card(classifier_preset="mediqa-test")
    path = save_artifact(tmp_path / "m.safetensors", {"iqa": net, "classifier": clf}, card)
    assert load_card(path) == card
    groups, card2 = load_tensors(path)
    assert card2 == card and set(groups) == {"iqa", "classifier"}
    for k, v in net.state_dict().items():
        assert torch.equal(groups["iqa"][k], v), k
    loaded = load_artifact(path)
    assert loaded.card == card and not loaded.iqa.training and not loaded.classifier.training
    x, p = _inputs()
    with torch.no_grad():
        for a, b in zip(loaded.iqa(x, p), net(x, p)):
            assert torch.equal(a, b)
        for a, b in zip(loaded.classifier(x), clf(x)):
            assert torch.equal(a, b)


def test_fp16_artifact(net, tmp_path: Path) -> None:
    f32 = save_artifact(tmp_path / "a.safetensors", {"iqa": net}, _card())
    f16 = save_artifact(tmp_path / "b.safetensors", {"iqa": net}, _card(), dtype="fp16")
    assert f16.stat().st_size < 0.6 * f32.stat().st_size
    groups, _ = load_tensors(f16)
    assert all(t.dtype == torch.float16 for t in groups["iqa"].values() if t.is_floating_point())
    loaded = load_artifact(f16)
    assert all(p.dtype == torch.float32 for p in loaded.iqa.parameters())
    x, p = _inputs()
    with torch.no_grad():
        got, ref = loaded.iqa(x, p), net(x, p)
    np.testing.assert_allclose(got[0].numpy(), ref[0].numpy(), rtol=0.05, atol=1e-5)


def test_same_modules_and_card_give_the_same_bytes(net, tmp_path: Path) -> None:
    """safetensors writes its metadata map in hash order (a different file on most saves); the
    artifact's header is canonical, so a model's sha256 (model hash, recipe stage keys, a kept
    TTA measurement) depends on its tensors and card only — also after a load and re-save."""
    import hashlib
    import struct

    from safetensors import safe_open

    card = _card()
    shas = set()
    for i in range(6):
        f = save_artifact(tmp_path / f"m{i}.safetensors", {"iqa": net}, card, dtype="fp16")
        shas.add(hashlib.sha256(f.read_bytes()).hexdigest())
    assert len(shas) == 1
    groups, card2 = load_tensors(tmp_path / "m0.safetensors")
    again = save_artifact(tmp_path / "again.safetensors", groups, card2, dtype="fp16")
    assert hashlib.sha256(again.read_bytes()).hexdigest() in shas
    raw = (tmp_path / "m0.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert list(header)[0] == "__metadata__" and list(header["__metadata__"]) == sorted(header["__metadata__"])
    with safe_open(str(tmp_path / "m0.safetensors"), "pt") as fh:      # the library reads it
        assert set(fh.keys()) == {f"iqa.{k}" for k in net.state_dict()}
        k = next(iter(net.state_dict()))
        assert torch.equal(fh.get_tensor(f"iqa.{k}"), net.state_dict()[k].to(torch.float16)
                           if net.state_dict()[k].is_floating_point() else net.state_dict()[k])


def test_ensemble_artifact(tmp_path: Path) -> None:
    torch.manual_seed(2)
    members = [create_model("mediqa-test", P).eval() for _ in range(2)]
    ens = EnsembleNet(members).eval()
    path = save_artifact(tmp_path / "e.safetensors", {"iqa.0": members[0], "iqa.1": members[1]},
                         _card(ensemble_size=2))
    loaded = load_artifact(path)
    assert isinstance(loaded.iqa, EnsembleNet) and loaded.classifier is None
    x, p = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded.iqa(x, p)[0], ens(x, p)[0])
    with pytest.raises(UnsupportedArtifact, match="lacks module 'iqa.2'"):
        load_artifact(save_artifact(tmp_path / "e3.safetensors", {"iqa.0": members[0], "iqa.1": members[1]},
                                    _card(ensemble_size=3)))


def test_checkpoint_against_wrong_preset_is_refused(net, tmp_path: Path) -> None:
    path = save_artifact(tmp_path / "w.safetensors", {"iqa": net}, _card(preset="mediqa-vitt16",
                         preprocess=get_preset("mediqa-vitt16").preprocess_config().to_dict()))
    with pytest.raises(UnsupportedArtifact, match="does not fit the card's preset.*shape mismatches"):
        load_artifact(path)
    path = save_artifact(tmp_path / "u.safetensors", {"iqa": net}, _card(preset="mediqa-vitz99"))
    with pytest.raises(UnsupportedArtifact, match="unknown model preset 'mediqa-vitz99'"):
        load_artifact(path)
    bad_pre = _card(preprocess={**get_preset("mediqa-test").preprocess_config().to_dict(), "image_size": 224})
    path = save_artifact(tmp_path / "s.safetensors", {"iqa": net}, bad_pre)
    with pytest.raises(UnsupportedArtifact, match="image_size 224 does not match preset mediqa-test"):
        load_artifact(path)
    partial = {k: v for k, v in net.state_dict().items() if not k.startswith("slice_head")}
    path = save_artifact(tmp_path / "p.safetensors", {"iqa": partial}, _card())
    with pytest.raises(UnsupportedArtifact, match="2 missing tensors"):
        load_artifact(path)


def test_refuses_non_mediqa_and_pickle_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UnsupportedArtifact, match="no 'mediqa_card' metadata"):
        load_card(tmp_path / "plain.safetensors")
    torch.save({"iqa.w": torch.zeros(2)}, tmp_path / "m.pt")
    with pytest.raises(UnsupportedArtifact, match="safetensors"):
        load_tensors(tmp_path / "m.pt")
    with pytest.raises(UnsupportedArtifact, match="cannot read a model card"):
        load_card(tmp_path / "m.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(UnsupportedArtifact, match="not a readable safetensors"):
        load_card(tmp_path / "junk.safetensors")
    with pytest.raises(UnsupportedArtifact, match="not found"):
        load_card(tmp_path / "missing.onnx")


def _tiny_onnx(path: Path, card: ModelCard | None) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if card is not None:
        helper.set_model_props(model, {"mediqa_card": card.to_json()})
    onnx.save(model, str(path))


def test_load_card_without_torch(net, tmp_path: Path) -> None:
    card = _card()
    _tiny_onnx(tmp_path / "m.onnx", card)
    _tiny_onnx(tmp_path / "bare.onnx", None)
    save_artifact(tmp_path / "m.safetensors", {"iqa": net}, card)
    (tmp_path / "card.json").write_text(card.to_json())
    assert load_card(tmp_path / "m.onnx") == card
    with pytest.raises(UnsupportedArtifact, match="no 'mediqa_card' metadata"):
        load_card(tmp_path / "bare.onnx")
    code = (
        "import os, sys; from engines.artifact import load_card\n"
        f"d = r'{tmp_path}'\n"
        "cards = [load_card(os.path.join(d, n)) for n in ('m.onnx', 'm.safetensors', 'card.json')]\n"
        "assert len({c.to_json() for c in cards}) == 1, cards\n"
        "sys.exit(3 if 'torch' in sys.modules else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_load_card_from_engine_header(tmp_path: Path) -> None:
    eh = pytest.importorskip("engines.backends.engine_header")
    card = _card()
    (tmp_path / "m.engine").write_bytes(eh.pack_engine({"card": card.to_dict(), "precision": "fp16"}, b"plan"))
    assert load_card(tmp_path / "m.engine") == card
