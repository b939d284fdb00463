"""Training input pipeline: images/s the DataLoader delivers, in-process vs worker processes.

On a lent H200 the bundled model's fine-tune ran at ≈ 210 images/s, far below what the GPU
computes for a model this small. Is the loader (read float16 from the disk cache, convert to float32, flip / rotate, collate) the
limit? This benchmark measures the pipeline alone (no model), in one run, for several
``loader_workers`` values, on a disk ``InputCache`` of the training shapes (95 % 2D studies
(3, 224, 224), 5 % 3D studies (7, 3, 224, 224), float16, as the recipe caches them), with the
recipe's own loader (``training.tasks._loader``). Ratios are against the first value given.

Usage: ``python benchmarks/bench_train_input.py [--studies 800] [--workers 0 1 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def build(directory: Path, n: int) -> tuple[list, object]:
    from engines.models.presets import get_preset
    from engines.prompts import DEFAULT_VOCAB, Prompt, encode_prompt
    from training.data.cache import InputCache, Prepared
    from training.data.torchdata import Item

    cache = InputCache(get_preset("mediqa-vitt16").preprocess_config(), directory=directory)
    rng = np.random.default_rng(0)
    prompt = encode_prompt(Prompt(dimension="2d", modality="xr", region="chest", type="grey"), DEFAULT_VOCAB)
    items = []
    for i in range(n):
        kind = "3d" if i % 20 == 0 else "2d"
        shape = (7, 3, 224, 224) if kind == "3d" else (3, 224, 224)
        key = f"{i:064x}"
        cache.put(key, Prepared(images=rng.uniform(-1, 1, shape).astype(np.float32), indices=[0],
                                tag_prompts={}, window_type=None))
        items.append(Item(key=key, kind=kind, prompt=prompt, target=float(rng.uniform()),
                          sample=None, labels=(0, 0, 0)))   # type: ignore[arg-type]  # unused by the loader
    return items, cache


def images_per_s(items: list, cache: object, workers: int, batch: int, epochs: int) -> float:
    from training.config import TrainConfig
    from training.tasks import _loader

    cfg = TrainConfig(task="finetune", batch_size=batch, loader_workers=workers, rot90_augment=True,
                      flip_augment=True)
    loader = _loader(items, cache, cfg, train=True)
    for _ in loader:        # first epoch: starts the workers, warms the page cache
        pass
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for b in loader:
            n += (0 if b["2d"] is None else len(b["2d"]["images"])) + \
                 (0 if b["3d"] is None else b["3d"]["volumes"].shape[0] * b["3d"]["volumes"].shape[1])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=800)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    import os

    with tempfile.TemporaryDirectory() as d:
        items, cache = build(Path(d), a.studies)
        res = {w: images_per_s(items, cache, w, a.batch, a.epochs) for w in a.workers}
    base = res[a.workers[0]]
    print(f"training input pipeline, {a.studies} studies (5 % 3D x 7 slices), batch {a.batch}, "
          f"{os.cpu_count()} cores:")
    for w, ips in res.items():
        print(f"  loader_workers={w}: {ips:8.1f} images/s  ({ips / base:.2f}x of loader_workers={a.workers[0]})")
    if a.json:
        a.json.write_text(json.dumps({"studies": a.studies, "cores": os.cpu_count(),
                                      "images_per_s": {str(k): v for k, v in res.items()}}, indent=1))


if __name__ == "__main__":
    main()
