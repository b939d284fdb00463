"""Cost of the feature head's input statistics against the network's inference, in one run.

For N real 2D inputs (crops of scikit-image's retina photograph and of pydicom's CT_small,
preprocessed with the model's card) measures, per image: ``engines.features.input_statistics``
(what scoring adds for a modality that blends) and ``Backend.score`` in batches of
``--batch-size`` (the network, torch on CPU). Prints a Markdown table with the ratio.

    python benchmarks/bench_features.py [--model engines/weights/default.safetensors] [-n 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def inputs(cfg, n: int) -> np.ndarray:
    import pydicom
    from pydicom.data import get_testdata_file
    from skimage import data

    from engines.preprocess import preprocess_slice

    rng = np.random.default_rng(0)
    retina = data.retina().astype(np.float32)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ct.pixel_array.astype(np.float32) * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    out = []
    for i in range(n):
        if i % 2:
            y, x = rng.integers(0, retina.shape[0] - 400, 2)
            out.append(preprocess_slice(retina[y:y + 400, x:x + 400] / 255.0, "fundus", "color", cfg))
        else:
            out.append(preprocess_slice(hu + rng.normal(0, 20, hu.shape).astype(np.float32), "ct", "soft", cfg))
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    from engines.artifact import bundled_model_path
    from engines.backends.auto import open_backend
    from engines.features import input_statistics
    from engines.preprocess import PreprocessConfig
    from engines.prompts import DEFAULT_VOCAB, Prompt, encode_prompt

    path = args.model or str(bundled_model_path())
    with open_backend(path, backend="torch", device="cpu") as backend:
        cfg = PreprocessConfig.from_dict(backend.card.preprocess)
        x = inputs(cfg, args.n)
        prompt = np.stack([encode_prompt(Prompt("2d", "ct"), DEFAULT_VOCAB)] * args.batch_size).astype(np.float32)
        backend.score(x[:args.batch_size], prompt)          # warm-up (and the statistics' imports)
        input_statistics(x[0], cfg.mean, cfg.std)
        t0 = time.perf_counter()
        for i in range(0, args.n, args.batch_size):
            b = x[i:i + args.batch_size]
            backend.score(b, prompt[:len(b)])
        t_net = (time.perf_counter() - t0) / args.n
        t0 = time.perf_counter()
        for img in x:
            input_statistics(img, cfg.mean, cfg.std)
        t_stats = (time.perf_counter() - t0) / args.n
    print(f"| {args.n} images, {cfg.image_size} px | ms / image |")
    print("|---|---|")
    print(f"| network (torch CPU, batch {args.batch_size}) | {t_net * 1e3:.1f} |")
    print(f"| input statistics (feature head) | {t_stats * 1e3:.1f} |")
    print(f"| ratio statistics / network | {t_stats / t_net:.3f} |")


if __name__ == "__main__":
    main()
