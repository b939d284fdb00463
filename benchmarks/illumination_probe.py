"""Which classical statistic of the network input ranks uneven illumination (diagnostic).

For the studies of a synthetic split whose only degradation is ``illumination`` (X-ray and
fundus), each study is prepared through the scoring path with a model's preprocessing
(``engines.pipeline.prepare_study``, the card's ``PreprocessConfig``), its network input is
turned back to grey [0, 1] (as ``engines.features.input_statistics`` does), and a few candidate
statistics are measured: the feature head's low-frequency non-uniformity, the fraction of
clipped-bright (≥ 0.98) and clipped-dark (≤ 0.02) pixels, the spread of the log of the heavily
blurred image, and the mean. The SRCC of each (sign: lower = better) against the synthetic
score is printed within each source tile and pooled per modality. Several manifests (e.g. two
corpus seeds) are read in turn. Usage:

    python benchmarks/illumination_probe.py CORPUS/manifest.csv [CORPUS2/manifest.csv ...]
        [--model M.safetensors] [--split test]
"""

from __future__ import annotations

import argparse
import collections
import logging

import numpy as np
from scipy import ndimage

from engines.features import FEATURE_NAMES, input_grey, slice_statistics
from engines.metrics import srcc

NAMES: tuple[str, ...] = ("nonuniformity", "clipped_bright", "clipped_dark", "log_lowfreq_std", "mean")


def candidates(grey: np.ndarray) -> np.ndarray:
    """The candidate statistics (``NAMES``) of one grey network input in [0, 1]."""
    g = np.asarray(grey, dtype=np.float64)
    st = slice_statistics(g)   # the feature head's non-uniformity and clipped-bright fraction
    low = ndimage.gaussian_filter(g, 24.0)
    return np.array([st[FEATURE_NAMES.index("nonuniformity")], st[FEATURE_NAMES.index("clipped_bright")],
                     float((g <= 0.02).mean()), float(np.log(low + 0.02).std()), float(g.mean())])


def main() -> None:
    from engines.artifact import load_card
    from engines.pipeline import prepare_study
    from engines.preprocess import PreprocessConfig
    from training.data.datasets import read_manifest

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("manifests", nargs="+")
    ap.add_argument("--model", default="engines/weights/default.safetensors",
                    help="whose preprocessing prepares the inputs")
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = PreprocessConfig.from_dict(load_card(args.model).preprocess)
    groups: dict[tuple[str, str], list[tuple[float, np.ndarray]]] = collections.defaultdict(list)
    for i, path in enumerate(args.manifests):
        samples, _ = read_manifest(path)
        for s in samples:
            if (s.split or "") != args.split or s.extra.get("degradation") != "illumination":
                continue
            grey = input_grey(prepare_study(s.ref, cfg, 1).images, cfg.mean, cfg.std)[0]
            mod = str(s.labels.get("modality"))
            groups[(mod, f"{i}:{s.extra.get('source_id')}")].append((float(s.target), candidates(grey)))
            groups[(mod, "pooled")].append((float(s.target), candidates(grey)))
    print(f"{'modality':8} {'source (manifest:id)':28} {'n':>3}  " + "  ".join(f"{n:>15}" for n in NAMES))
    for (mod, src), rows in sorted(groups.items()):
        y = np.array([r[0] for r in rows])
        f = np.stack([r[1] for r in rows])
        cells = []
        for j in range(len(NAMES)):
            r = srcc(-f[:, j], y) if np.ptp(f[:, j]) > 0 else float("nan")
            cells.append(f"{r:>+15.2f}")
        print(f"{mod:8} {src:28} {len(rows):>3}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
