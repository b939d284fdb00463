"""``mediqa export`` through Click's CliRunner on a tiny real artifact."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from engines.artifact import ModelCard, load_card, save_artifact
from engines.models.presets import get_preset
from engines.models.registry import create_classifier, create_model
from engines.prompts import DEFAULT_VOCAB
from mediqa_cli.main import cli


def _artifact(tmp_path):
    torch.manual_seed(0)
    p = get_preset("mediqa-test")
    card = ModelCard(task="iqa", preset="mediqa-test", prompt_vocab=DEFAULT_VOCAB.to_dict(),
                     preprocess=p.preprocess_config().to_dict(), label_scale={"min": 0, "max": 1, "name": "q"},
                     classifier_preset="mediqa-test")
    return save_artifact(tmp_path / "tiny.safetensors", {"iqa": create_model("mediqa-test", DEFAULT_VOCAB.size),
                                                         "classifier": create_classifier("mediqa-test")}, card), card


def test_export_cli_writes_verified_onnx(tmp_path):
    st, card = _artifact(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["export", str(st), "-o", str(out), "--exporter", "torchscript", "--samples", "12"])
    assert res.exit_code == 0, res.output
    for name in ("model.onnx", "model.3d.onnx", "model.classifier.onnx"):
        assert (out / name).is_file() and load_card(out / name) == card
        assert name in res.output
    assert "max|Δ|" in res.output and "KB" in res.output and "parity: 3d" in res.output and "OK" in res.output


def test_export_cli_usage_errors(tmp_path):
    st, _ = _artifact(tmp_path)
    r = CliRunner().invoke(cli, ["export", str(st), "--batch", "8:1:32"])
    assert r.exit_code == 2 and "min ≤ opt ≤ max" in r.output
    r = CliRunner().invoke(cli, ["export", str(st), "--no-onnx"])
    assert r.exit_code == 2 and "nothing to do" in r.output
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 2 and "not found" in r.output
    r = CliRunner().invoke(cli, ["export", str(st), "--opset", "13"])
    assert r.exit_code == 2
