"""``mediqa train`` and ``mediqa evaluate`` end to end through Click's CliRunner on real images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mediqa_cli.main import cli
from tests.test_datasets import build_scored_corpus

FAST = ["--preset", "mediqa-test", "--batch-size", "4", "--lr", "2e-3", "--no-amp", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, retina_path: Path) -> Path:
    return build_scored_corpus(tmp_path_factory.mktemp("cli_corpus"), retina_path)


def test_pretrain_finetune_from_evaluate(corpus: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    pre = runner.invoke(cli, ["train", "pretrain", str(corpus.parent), "--epochs", "1",
                              "--out", str(tmp_path / "pre"), *FAST])
    assert pre.exit_code == 0, pre.output
    assert "pretrain" in pre.output and "images/s" in pre.output
    assert "no_physical_target" in pre.output          # the PNGs are reported as skipped
    pre_model = tmp_path / "pre" / "model.safetensors"

    ft = runner.invoke(cli, ["train", "finetune", str(corpus), "--from", str(pre_model), "--epochs", "1",
                             "--out", str(tmp_path / "ft"), *FAST])
    assert ft.exit_code == 0, ft.output
    model = tmp_path / "ft" / "model.safetensors"
    card = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert card["data"]["handover"]["loaded"] > 0 and card["data"]["handover"]["reinitialised"] == 2

    ev = runner.invoke(cli, ["evaluate", str(model), str(corpus), "--json", str(tmp_path / "ev.json"),
                             "--no-progress", "--worst", "3"])
    assert ev.exit_code == 0, ev.output
    rep = json.loads((tmp_path / "ev.json").read_text())
    assert rep["overall"]["n"] == 10 and -1.0 <= rep["overall"]["srcc"] <= 1.0
    assert set(rep["groups"]["modality"]) == {"ct", "fundus"}
    assert set(rep["groups"]["dimension"]) == {"2d", "3d"}
    assert "SRCC" in ev.output and "lowest predicted quality" in ev.output

    test_only = runner.invoke(cli, ["evaluate", str(model), str(corpus), "--split", "test", "--no-progress",
                                    "--json", str(tmp_path / "t.json")])
    assert test_only.exit_code == 0, test_only.output
    t = json.loads((tmp_path / "t.json").read_text())
    assert t["overall"]["n"] == 2
    # the count line speaks of the split, not of the whole manifest
    assert (t["dataset"]["in_split"], t["dataset"]["evaluated"], t["dataset"]["found"]) == (2, 2, 10)
    assert "2 of 2 studies of the test split (10 in" in " ".join(test_only.output.split())
    assert rep["dataset"]["in_split"] == rep["dataset"]["evaluated"] == 10
    assert "10 of 10 studies evaluated" in " ".join(ev.output.split())


def test_cli_errors(corpus: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 1\nlearning_rate: 0.1\n")
    r = runner.invoke(cli, ["train", "finetune", str(corpus), "--config", str(y), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown config key 'learning_rate'" in r.output

    bad = tmp_path / "bad.csv"
    bad.write_text("path,score\nfundus/retina_0.png,high\n")
    (tmp_path / "fundus").mkdir()
    r = runner.invoke(cli, ["train", "finetune", str(bad), "--out", str(tmp_path / "o"), *FAST])
    assert r.exit_code == 1 and "non-numeric score" in r.output and "lines 2" in r.output

    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(cli, ["train", "pretrain", str(empty), "--out", str(tmp_path / "o"), *FAST])
    assert r.exit_code == 1 and "[dataset]" in r.output
