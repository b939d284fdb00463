"""Cost of test-time augmentation (``mediqa score --tta``), measured in one run.

Scores the same small corpus (3D DICOM series + 2D PNGs, ``bench_score.make_corpus``) end to end
with ``engines.pipeline.score_studies`` under each TTA mode, in alternating order over
``--rounds`` rounds (the machine's speed drifts; alternating spreads the drift over the modes),
after one untimed warm-up pass, and prints the median wall time of each mode and its ratio to ``none``. Inference grows with the
number of copies (2 for flip, 8 for d4); reading and preprocessing do not, so the end-to-end
ratio is below the copy count when reading is a large share of the run. ``auto`` (the model
card's per-modality policy) costs what its modes cost on the corpus' mix of modalities (the
PNGs' modality comes from the prompt classifier).

    python benchmarks/bench_tta.py [--model M.safetensors|.onnx] [--series 2 --slices 60 --images 24]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_score import make_corpus  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the bundled model (torch)")
    ap.add_argument("--series", type=int, default=2)
    ap.add_argument("--slices", type=int, default=60)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from engines.artifact import bundled_model_path
    from engines.backends.auto import open_backend
    from engines.pipeline import ScoreConfig, score_studies

    model = Path(args.model) if args.model else bundled_model_path()
    modes = ("none", "flip", "d4", "auto")
    times: dict[str, list[float]] = {m: [] for m in modes}
    scores: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "corpus"
        make_corpus(root, args.series, args.slices, args.images)
        with open_backend(model) as backend:
            list(score_studies(root, backend, ScoreConfig(workers=args.workers, batch_size=args.batch_size,
                                                          tta="none", header_cache=None)))   # warm-up, not timed
            for r in range(args.rounds):
                for mode in (modes if r % 2 == 0 else modes[::-1]):
                    cfg = ScoreConfig(workers=args.workers, batch_size=args.batch_size, tta=mode,
                                      header_cache=None)
                    t0 = time.perf_counter()
                    recs = list(score_studies(root, backend, cfg))
                    times[mode].append(time.perf_counter() - t0)
                    if any(rec.status != "ok" for rec in recs):
                        raise SystemExit(f"{mode}: some studies failed")
                    scores[mode] = [rec.score for rec in recs]
    n = len(scores["none"])
    base = statistics.median(times["none"])
    print(f"{n} studies ({args.series} series x {args.slices} slices, {args.images} PNGs), model {model.name}, "
          f"{backend.describe()}, batch {args.batch_size}, {args.rounds} rounds")
    print("| TTA | copies | median wall s | ratio to none | mean |score - none| |")
    print("|---|---|---|---|---|")
    from engines.tta import TTAPolicy

    policy = TTAPolicy.from_dict(backend.card.tta_policy)
    for mode, copies in zip(modes, ("1", "2", "8", f"per modality: {policy.describe()}")):
        t = statistics.median(times[mode])
        diff = sum(abs(a - b) for a, b in zip(scores[mode], scores["none"])) / n
        print(f"| {mode} | {copies} | {t:.2f} | {t / base:.2f}x | {diff:.4f} |")


if __name__ == "__main__":
    main()
