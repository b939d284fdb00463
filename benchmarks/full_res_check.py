"""Full-resolution real radiographs, degraded by hand, scored with and without the feature head.

The synthetic corpus' X-ray studies are ~256-px tiles; an archive holds whole radiographs of
~2000 px that the reader shrinks to the network's 224 px. This check takes the two real CR
images that ship in pydicom-data (RG1 chest 1955 × 1841, RG3 leg 1760², MONOCHROME1 inverted),
min-max at the 0.5 / 99.5 percentiles, and writes each clean and with three strengths of JPEG
(quality 30 / 10 / 5), Gaussian blur (σ 2 / 5 / 10 px at full size) and Gaussian noise (σ 0.02 /
0.05 / 0.1), as PNG / JPEG without tags (the prompt classifier names the modality). Both runs
score them through ``engines.pipeline.score_studies`` with ``--tta auto``; per image and kind
of degradation, the Spearman correlation between the score and minus the strength (clean = 0)
over the 4 files is printed (1 = ranked right), with the scores.

    python benchmarks/full_res_check.py [--model PATH]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

KINDS = {"jpeg": (30, 10, 5), "blur": (2.0, 5.0, 10.0), "noise": (0.02, 0.05, 0.1)}


def write_images(root: Path) -> None:
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        a = ds.pixel_array.astype(np.float32)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            a = a.max() - a
        lo, hi = np.percentile(a, (0.5, 99.5))
        u = np.clip((a - lo) / (hi - lo), 0, 1)
        tag = name[:3]

        def save(x: np.ndarray, stem: str, quality: int | None = None) -> None:
            im = Image.fromarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8))
            im.save(root / (f"{tag}_{stem}.jpg" if quality else f"{tag}_{stem}.png"), quality=quality or 95)

        save(u, "clean")
        for i, q in enumerate(KINDS["jpeg"], 1):
            save(u, f"jpeg{i}", int(q))
        for i, s in enumerate(KINDS["blur"], 1):
            save(ndimage.gaussian_filter(u, s), f"blur{i}")
        for i, s in enumerate(KINDS["noise"], 1):
            save(u + rng.normal(0, s, u.shape), f"noise{i}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    from scipy.stats import spearmanr

    from engines.artifact import bundled_model_path
    from engines.pipeline import ScoreConfig, score_studies

    model = args.model or str(bundled_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root)
        runs = {}
        for feats in (True, False):
            cfg = ScoreConfig(workers=1, batch_size=8, tta="auto", features=feats)
            runs[feats] = {Path(r.path).stem: (r.score, r.modality) for r in score_studies(root, model, cfg)}
    print("| image | degradation | modality | SRCC with head | SRCC network | scores with head (clean, 1, 2, 3) | network |")
    print("|---|---|---|---|---|---|---|")
    for tag in ("RG1", "RG3"):
        for kind in KINDS:
            names = [f"{tag}_clean"] + [f"{tag}_{kind}{i}" for i in (1, 2, 3)]
            row = [tag, kind, runs[True][names[1]][1]]
            for feats in (True, False):
                s = [runs[feats][n][0] for n in names]
                row.append(f"{spearmanr(s, [0, -1, -2, -3])[0]:.2f}")
            for feats in (True, False):
                row.append(" ".join(f"{runs[feats][n][0]:.3f}" for n in names))
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
