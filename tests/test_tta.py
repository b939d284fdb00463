"""Test-time augmentation (``engines.tta``): the transforms, the averaging backend, the torch
module used by ``evaluate``, and ``score --tta`` end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines import names
from engines.backends.base import Backend
from tests.test_pipeline import _cfg, _study_key, make_artifact, small_corpus  # noqa: F401
from tests.test_score_cli import _rows, _run


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random mediqa-test artifact whose score head is re-drawn larger: a fresh head's scores
    sit near 5e-5 for every input, too flat to tell an averaged score from a plain one."""
    import torch

    from engines.artifact import save_artifact
    from engines.models.loading import load_artifact

    path = make_artifact(tmp_path_factory.mktemp("tta_model") / "m.safetensors", seed=3)
    loaded = load_artifact(path)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in loaded.iqa.score_head.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.5)
                m.bias.fill_(0.5)
    return save_artifact(path, {"iqa": loaded.iqa, "classifier": loaded.classifier}, loaded.card)


def _d4_by_hand(img: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of a square (…, S, S) array written out one by one (not via engines.tta)."""
    t = lambda a: np.swapaxes(a, -1, -2)  # noqa: E731  transpose of the last two axes
    m = lambda a: a[..., ::-1]            # noqa: E731  left-right mirror
    u = lambda a: a[..., ::-1, :]         # noqa: E731  up-down mirror
    return [img, m(img), u(img), u(m(img)), t(img), m(t(img)), u(t(img)), u(m(t(img)))]


class _Probe(Backend):
    """A fake runtime whose outputs are fixed, orientation-dependent functions of the pixels:
    score = mean of the top-left quarter of channel 0, logit = mean of the first row of channel 1.
    ``max_batch`` makes the base class split the T·N copies into chunks."""

    name = "probe"

    def __init__(self, size: int = 8, max_batch: int | None = None) -> None:
        from engines.artifact import ModelCard

        super().__init__(ModelCard(task="iqa", preset="probe", prompt_vocab={}, preprocess={}, label_scale={}), image_size=size, prompt_dim=3,
                         n_slices=3, max_batch=max_batch)
        self.calls: list[int] = []

    @staticmethod
    def outputs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = images.shape[-1] // 2
        return images[:, 0, :h, :h].mean(axis=(1, 2)), images[:, 1, 0, :].mean(axis=1)

    def _score(self, images: np.ndarray, prompt: np.ndarray) -> dict[str, np.ndarray]:
        self.calls.append(len(images))
        s, z = self.outputs(images)
        return {names.SCORE: s + prompt[:, 0], names.SLICE_LOGIT: z}


def _images(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def test_modes_are_distinct_symmetries_matching_numpy() -> None:
    from engines.tta import TTA_MODES, expand, transform_images, tta_transforms

    img = _images(1)[0]
    copies = [transform_images(img, k, m) for k, m in tta_transforms("d4")]
    by_hand = _d4_by_hand(img)
    # Each of the 8 symmetries appears exactly once (an asymmetric image has 8 distinct ones).
    assert len({c.tobytes() for c in copies}) == 8
    assert {c.tobytes() for c in copies} == {b.tobytes() for b in by_hand}
    assert transform_images(img, 1, False) == pytest.approx(np.rot90(img, 1, axes=(1, 2)))
    assert transform_images(img, 0, True) == pytest.approx(img[:, :, ::-1])
    assert [len(v) for v in TTA_MODES.values()] == [1, 2, 8]
    x = _images(3)
    e = expand(x, "flip")
    assert e.shape == (6, 3, 8, 8) and e.flags["C_CONTIGUOUS"]
    assert np.array_equal(e[:3], x) and np.array_equal(e[3:], x[..., ::-1])
    with pytest.raises(ValueError, match="none, flip, d4"):
        tta_transforms("d8")


def test_tta_backend_averages_the_copies_in_chunks() -> None:
    from engines.tta import with_tta

    x = _images(5)
    prompt = np.arange(15, dtype=np.float32).reshape(5, 3)
    inner = _Probe(max_batch=7)
    assert with_tta(inner, "none") is inner
    tta = with_tta(inner, "d4")
    out = tta.score(x, prompt)
    assert sum(inner.calls) == 40 and max(inner.calls) == 7   # 8 copies of 5, split by the runtime
    for i in range(5):
        s = [_Probe.outputs(c[None])[0][0] for c in _d4_by_hand(x[i])]
        z = [_Probe.outputs(c[None])[1][0] for c in _d4_by_hand(x[i])]
        assert out[names.SCORE][i] == pytest.approx(np.mean(s) + prompt[i, 0], abs=1e-5)
        assert out[names.SLICE_LOGIT][i] == pytest.approx(np.mean(z), abs=1e-5)
    plain = inner.score(x, prompt)[names.SCORE]
    assert not np.allclose(out[names.SCORE], plain)   # the probe is orientation-dependent
    # 3D: per-slice TTA outputs fused with the scoring path's softmax fusion.
    from engines.fusion import fuse_slice_scores

    vols = _images(6).reshape(2, 3, 3, 8, 8)
    v = tta.score_volume(vols, prompt[:2])
    flat = tta.score(vols.reshape(6, 3, 8, 8), np.repeat(prompt[:2], 3, axis=0))
    for i in range(2):
        q, w = fuse_slice_scores(flat[names.SCORE][3 * i: 3 * i + 3], flat[names.SLICE_LOGIT][3 * i: 3 * i + 3])
        assert v[names.SCORE][i] == pytest.approx(q, abs=1e-6)
        assert v[names.SLICE_WEIGHTS][i] == pytest.approx(w, abs=1e-6)
    assert tta.classify(x) is None and "d4 (8 copies)" in tta.describe()
    tta.close()
    with pytest.raises(RuntimeError, match="closed"):
        inner.score(x, prompt)


def test_torch_module_matches_the_backend_wrapper(artifact: Path) -> None:
    """``TTANet`` (torch transforms, used by evaluate) = ``TTABackend`` (numpy transforms, used by
    score) on a real mediqa-test model, for 2D images and for fused volumes."""
    import torch

    from engines.backends.torch_backend import TorchBackend
    from engines.models.maniqa import TTANet
    from engines.tta import TTABackend

    with TorchBackend(artifact) as b:
        s, k = b.image_size, b.n_slices
        x = _images(k, size=s, seed=1)
        prompt = np.zeros((k, b.prompt_dim), np.float32)
        prompt[:, 0] = 1.0
        net = TTANet(b.iqa, "d4").eval()
        wrapped = TTABackend(b, "d4")
        with torch.no_grad():
            q, z = net(torch.from_numpy(x), torch.from_numpy(prompt))
            qv, _, wv = net.forward_volume(torch.from_numpy(x[None]), torch.from_numpy(prompt[:1]))
        out = wrapped.score(x, prompt)
        vol = wrapped.score_volume(x[None], prompt[:1])
        plain = b.score(x, prompt)[names.SCORE]
    assert out[names.SCORE] == pytest.approx(q.numpy(), abs=1e-5)
    assert out[names.SLICE_LOGIT] == pytest.approx(z.numpy(), abs=1e-5)
    assert vol is not None
    assert vol[names.SCORE][0] == pytest.approx(float(qv[0]), abs=1e-5)
    assert vol[names.SLICE_WEIGHTS][0] == pytest.approx(wv[0].numpy(), abs=1e-5)
    # The random model is not symmetric: TTA changes its scores (which spread over > 0.003).
    assert np.ptp(plain) > 0.003 and np.abs(out[names.SCORE] - plain).max() > 1e-3


def test_pipeline_tta_equals_torch_module_and_is_labelled(artifact: Path, small_corpus: Path) -> None:
    import torch

    from engines.backends.torch_backend import TorchBackend
    from engines.io.discover import discover_studies
    from engines.models.maniqa import TTANet
    from engines.pipeline import prepare_study, score_studies
    from engines.preprocess import PreprocessConfig
    from engines.prompts import Prompt, PromptVocab, encode_prompt

    with TorchBackend(artifact) as b:
        plain = {r.path: r for r in score_studies(small_corpus, b, _cfg(batch_size=3))}
        recs = {r.path: r for r in score_studies(small_corpus, b, _cfg(batch_size=3, tta="flip"))}
        net = TTANet(b.iqa, "flip").eval()
        refs = {r.rel_path: r for r in discover_studies(small_corpus)}
        vocab = PromptVocab.from_dict(b.card.prompt_vocab)
        pcfg = PreprocessConfig.from_dict(b.card.preprocess)
        for path, kind in (("ct_a", "3d"), ("img_c.png", "2d")):
            rec = recs[path]
            prep = prepare_study(refs[path], pcfg, 7)
            prompt = torch.from_numpy(encode_prompt(Prompt(kind, rec.modality, rec.region, rec.type), vocab)[None])
            with torch.no_grad():
                if kind == "3d":
                    q = float(net.forward_volume(torch.from_numpy(prep.images[None]), prompt)[0][0])
                else:
                    q = float(net(torch.from_numpy(prep.images[:1]), prompt)[0][0])
            assert rec.score == pytest.approx(1.0 + 4.0 * q, abs=1e-4)   # label scale 1..5
            assert rec.model.endswith("+tta-flip") and not plain[path].model.endswith("tta-flip")
    assert any(abs(recs[p].score - plain[p].score) > 1e-4 for p in recs)
    with pytest.raises(Exception, match="unknown TTA mode"):
        list(score_studies(small_corpus, artifact, _cfg(tta="d8")))


def test_cli_score_tta_and_resume_rescores_on_a_new_mode(artifact: Path, tmp_path: Path) -> None:
    from tests.test_pipeline import write_png

    root = tmp_path / "data"
    for i in range(3):
        write_png(root / f"p{i}.png", seed=i)
    out = tmp_path / "scores.csv"
    args = ["score", str(root), "-o", str(out), "--model", str(artifact), "--backend", "torch",
            "--workers", "1", "--resume"]
    assert _run(args)[0] == 0
    plain = _rows(out)
    code, stdout, _ = _run(args + ["--tta", "d4"])
    assert code == 0 and "re-scored 3, carried over 0" in stdout
    d4 = _rows(out)
    assert all(r["model"].endswith("+tta-d4") for r in d4)
    assert [r["score"] for r in d4] != [r["score"] for r in plain]
    code, stdout, _ = _run(args + ["--tta", "d4"])
    assert code == 0 and "re-scored 0, carried over 3" in stdout
    code, _, stderr = _run(args + ["--tta", "d8"])
    assert code == 2 and "d8" in stderr


def test_evaluate_tta_records_the_mode(artifact: Path, retina_path: Path, tmp_path: Path) -> None:
    """``mediqa evaluate --tta d4`` runs the TTANet path, says so, and changes the predictions."""
    import json

    from tests.test_datasets import build_scored_corpus

    manifest = build_scored_corpus(tmp_path / "corpus", retina_path, with_3d=True)
    reps = {}
    for mode in ("none", "d4"):
        code, stdout, _ = _run(["evaluate", str(artifact), str(manifest), "--tta", mode, "--no-progress",
                                "--json", str(tmp_path / f"{mode}.json")])
        assert code == 0
        reps[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
    assert reps["none"]["tta"] == "none" and reps["d4"]["tta"] == "d4" and "TTA d4" in stdout
    pa = {p["path"]: p["prediction"] for p in reps["none"]["predictions"]}
    pb = {p["path"]: p["prediction"] for p in reps["d4"]["predictions"]}
    assert pa.keys() == pb.keys() and len(pa) == 10 and any(abs(pa[k] - pb[k]) > 1e-6 for k in pa)
