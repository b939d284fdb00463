"""End-to-end scoring throughput vs the engine alone, measured in one run.

Generates a corpus of 3D DICOM series (``--slices`` ≥ 200 slices each, written with pydicom from
its CT_small test file) and 2D PNGs, then:

1. end-to-end: ``engines.pipeline.score_studies`` over the corpus (discovery, reader workers,
   salient slices, preprocessing, batched inference, fusion) → studies/s and slices inferred/s;
2. engine only: ``Backend.score`` on the same number of inputs in the same batch size →
   slices/s; the ratio end-to-end / engine-only (target ≥ 85 %); by default the end-to-end run
   is repeated after the engine-only one and their mean is used (``--passes 3``: a shared
   machine's speed drifts between the two measurements);
   Inside the end-to-end passes every engine call is timed (``TimedBackend``): start-up until
   the first batch, engine busy time, engine idle time after it; and the CPU seconds of the
   main process (engine threads) and of its children (header scanner, readers);
3. slices decoded / slices present (target ≤ 25 %);
4. peak RSS of the main process and of the largest reader process (target ≤ 2 GB in total).

Model: ``--model``, else ``engines/weights/default.onnx`` (onnxruntime) or
``default.safetensors`` (torch); when neither exists a random ``mediqa-vitt16`` artifact is
written to the work folder and used with torch (the speed of a trained and a random model with
the same preset is the same). Prints a Markdown table.

    python benchmarks/bench_score.py --series 4 --slices 240 --images 40 --workers 2
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import numpy as np


def make_corpus(root: Path, n_series: int, n_slices: int, n_images: int, seed: int = 0) -> None:
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    arr = base.pixel_array.astype(np.float64)
    for s in range(n_series):
        d = root / f"series{s:02d}"
        d.mkdir(parents=True)
        uid = generate_uid()
        for i in range(n_slices):
            ds = copy.deepcopy(base)
            ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = uid, generate_uid(), i + 1
            ds.ImagePositionPatient = [0.0, 0.0, float(i)]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            # Anatomy only in the middle 60 % of the series, air elsewhere (as in a real scan).
            inside = 0.2 * n_slices <= i < 0.8 * n_slices
            img = arr + rng.normal(0, 10, arr.shape) if inside else np.zeros_like(arr)
            ds.PixelData = np.clip(img, 0, 4000).astype(base.pixel_array.dtype).tobytes()
            ds.save_as(d / f"{i:05d}.dcm", enforce_file_format=True)
    yy, xx = np.mgrid[:256, :256]
    for i in range(n_images):
        img = 60 + 120 * (((xx - 128) ** 2 + (yy - 128) ** 2) < 90 ** 2) + rng.normal(0, 8, (256, 256))
        (root / "images").mkdir(exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"{i:04d}.png")


class TimedBackend:
    """A backend wrapper that logs when each engine call starts and how long it runs: the
    end-to-end pass's engine-busy time and its time to the first batch (startup: spawning the
    scanner and readers, their imports, the first study read) come from it."""

    def __init__(self, backend: object) -> None:
        self._b = backend
        self.calls: list[tuple[float, float]] = []   # (start, duration), perf_counter seconds

    def reset(self) -> None:
        self.calls = []

    def _timed(self, name: str, *a: object) -> object:
        t = time.perf_counter()
        try:
            return getattr(self._b, name)(*a)
        finally:
            self.calls.append((t, time.perf_counter() - t))

    def score(self, images: object, prompts: object) -> object:
        return self._timed("score", images, prompts)

    def classify(self, images: object) -> object:
        return self._timed("classify", images)

    def __getattr__(self, name: str) -> object:
        return getattr(self._b, name)


def pick_model(work: Path, explicit: str | None) -> tuple[Path, str]:
    import engines

    if explicit:
        return Path(explicit), "auto"
    w = Path(engines.__file__).parent / "weights"
    if (w / "default.onnx").is_file():
        return w / "default.onnx", "onnxruntime"
    if (w / "default.safetensors").is_file():
        return w / "default.safetensors", "torch"
    from engines.artifact import ModelCard, save_artifact
    from engines.models.presets import get_preset
    from engines.models.registry import create_classifier, create_model
    from engines.prompts import DEFAULT_VOCAB

    preset = get_preset("mediqa-vitt16")
    card = ModelCard(task="iqa", preset=preset.name, prompt_vocab=DEFAULT_VOCAB.to_dict(),
                     preprocess=preset.preprocess_config().to_dict(),
                     label_scale={"min": 0.0, "max": 1.0, "name": "random"}, classifier_preset=preset.name)
    p = save_artifact(work / "random-vitt16.safetensors",
                      {"iqa": create_model(preset.name, DEFAULT_VOCAB.size),
                       "classifier": create_classifier(preset.name, DEFAULT_VOCAB)}, card)
    return p, "torch"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=4)
    ap.add_argument("--slices", type=int, default=240)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--model", default=None)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    ap.add_argument("--spin", action="store_true",
                    help="let onnxruntime's idle threads spin (its default; score_studies turns it off)")
    ap.add_argument("--reader-nice", type=int, default=None,
                    help="ScoreConfig.reader_nice of the scanner and readers (default: the pipeline's)")
    ap.add_argument("--passes", type=int, choices=(2, 3), default=3,
                    help="3 (default): end-to-end, engine-only, end-to-end again, and the ratio uses "
                         "the mean end-to-end time; 2: end-to-end then engine-only")
    ap.add_argument("--header-cache", choices=("off", "warm"), default="off",
                    help="off: every header parsed (a first run); warm: the header cache is filled "
                         "by an untimed discovery pass first (a nightly re-run, e.g. after a model "
                         "update, where every study is scored again)")
    ap.add_argument("--work", default=None, help="folder for the corpus (default: a temporary one)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    assert args.slices >= 200, "the benchmark is defined on series of at least 200 slices"

    from engines.backends.auto import open_backend
    from engines.pipeline import ScoreConfig, score_studies

    tmp = tempfile.TemporaryDirectory(prefix="bench_score_") if args.work is None else None
    work = Path(args.work or tmp.name)  # type: ignore[union-attr]
    root = work / "corpus"
    if not root.exists():
        t = time.perf_counter()
        make_corpus(root, args.series, args.slices, args.images)
        print(f"corpus: {args.series} series x {args.slices} slices + {args.images} PNGs "
              f"({time.perf_counter() - t:.1f} s to write)")
    model, backend_name = pick_model(work, args.model)
    backend = open_backend(model, backend=args.backend or backend_name,
                           **({"threads": args.threads} if args.threads else {}),
                           spin=args.spin)   # the pipeline opens its backend with spin=False
    # tta none: this measures the pipeline; the cost of TTA (the CLI default is auto) is bench_tta.py's
    cfg = ScoreConfig(batch_size=args.batch_size, workers=args.workers, tta="none", privacy_key=b"bench-key-0123456789")
    if args.reader_nice is not None:
        cfg = cfg.replace(reader_nice=args.reader_nice)
    cache_note = "off (every header parsed)"
    if args.header_cache == "warm":
        from engines.io.discover import discover_studies
        from engines.io.header_cache import HeaderCache

        cache_path = work / "headers.sqlite"
        cache_path.unlink(missing_ok=True)
        fill = HeaderCache(cache_path)
        for _ in discover_studies(root, header_cache=fill):
            pass
        fill.close()
        cfg = cfg.replace(header_cache=str(cache_path))
        cache_note = f"warm ({fill.misses} headers cached by an untimed pass)"

    # Warm-up (first-call allocations, lazy initialisation) on a couple of batches.
    s = int(backend.card.preprocess.get("image_size", 224))
    p_dim = backend.prompt_dim
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch_size, 3, s, s)).astype(np.float32)
    pr = np.zeros((args.batch_size, p_dim), np.float32)
    pr[:, 0] = 1
    backend.score(x, pr)

    import threading

    import psutil

    peak = {"rss": 0.0, "worker": 0.0}
    done = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not done.is_set():
            try:
                kids = [c.memory_info().rss for c in me.children(recursive=True)]
                total = me.memory_info().rss + sum(kids)
                peak["rss"] = max(peak["rss"], total / 2**20)
                peak["worker"] = max([peak["worker"]] + [k / 2**20 for k in kids])
            except psutil.Error:
                pass
            done.wait(0.2)

    import resource

    timed = TimedBackend(backend)

    def end_to_end() -> tuple[list, dict[str, float]]:
        """One end-to-end pass: records, wall time, engine-busy time, time to the first batch,
        CPU seconds of the main process (engine threads included) and of its children (the
        header scanner and the readers, reaped when the pass ends)."""
        timed.reset()
        ru0 = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        t0 = time.perf_counter()
        out = list(score_studies(root, timed, cfg))
        wall = time.perf_counter() - t0
        ru1 = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        cpu = [(b.ru_utime + b.ru_stime) - (a.ru_utime + a.ru_stime) for a, b in zip(ru0, ru1)]
        return out, {"wall": wall, "busy": sum(d for _, d in timed.calls),
                     "first": (timed.calls[0][0] - t0) if timed.calls else wall,
                     "cpu_main": cpu[0], "cpu_children": cpu[1]}

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    recs, pass1 = end_to_end()
    done.set()
    ok = [r for r in recs if r.status == "ok"]
    inferred = sum(len(r.salient_slices) for r in ok)
    present = sum(r.n_slices or 0 for r in ok)
    decoded = sum(r.n_decoded or 0 for r in ok)
    ok3 = [r for r in ok if r.kind == "3d"]   # 2D images are 1 decoded of 1 present by definition
    present3, decoded3 = sum(r.n_slices or 0 for r in ok3), sum(r.n_decoded or 0 for r in ok3)

    # The engine's work on the same inputs: IQA batches, plus one classifier image per study
    # whose prompt was not fully determined by tags (batched the same way).
    n_cls = sum(1 for r in ok if r.prompt_source != "tags")
    t0 = time.perf_counter()
    for total, fn in ((inferred, lambda n: backend.score(x[:n], pr[:n])),
                      (n_cls, lambda n: backend.classify(x[:n]))):
        left = total
        while left > 0:
            n = min(args.batch_size, left)
            fn(n)
            left -= n
    engine = time.perf_counter() - t0
    passes = [pass1]
    if args.passes == 3:
        # end-to-end again: the ratio uses the mean of the passes around the engine-only one,
        # which cancels a linear drift of a shared machine's speed (an A-B-A design).
        again, pass2 = end_to_end()
        passes.append(pass2)
        same = [(a.score, b.score) for a, b in zip(recs, again) if a.score is not None and b.score is not None]
        drift = max((abs(a - b) for a, b in same), default=0.0)   # batch neighbours differ: ~1e-7
    backend.close()

    def mean(key: str) -> float:
        return float(np.mean([p[key] for p in passes]))

    e2e_runs = [p["wall"] for p in passes]
    e2e = mean("wall")
    e2e_sps, eng_sps = inferred / e2e, inferred / engine
    rows = [
        ("model / backend", f"{backend.card.preset} / {backend.describe()}"),
        ("studies (ok / all)", f"{len(ok)} / {len(recs)}"),
        ("reader workers / reader nice", f"{cfg.workers} / {cfg.reader_nice}"),
        ("header cache", cache_note),
        ("end-to-end studies/s", f"{len(recs) / e2e:.2f}"),
        ("end-to-end slices inferred/s", f"{e2e_sps:.1f}"
                                          + (f" (passes: {', '.join(f'{inferred / t:.1f}' for t in e2e_runs)})"
                                             if len(e2e_runs) > 1 else "")),
        *([("max |Δscore| between the end-to-end passes", f"{drift:.1e}")] if len(e2e_runs) > 1 else []),
        ("engine-only slices/s (same batches)", f"{eng_sps:.1f}"),
        ("end-to-end / engine-only (target ≥ 85 %)", f"{100 * e2e_sps / eng_sps:.0f} %"),
        ("where the end-to-end time goes (mean of passes): startup to the first batch / engine "
         "busy / engine idle after the first batch",
         f"{mean('first'):.2f} s / {mean('busy'):.2f} s / {mean('wall') - mean('first') - mean('busy'):.2f} s "
         f"(engine-only {engine:.2f} s)"),
        ("after the first batch: end-to-end / engine-only",
         f"{100 * inferred / (mean('wall') - mean('first')) / eng_sps:.0f} %"),
        ("CPU seconds per pass: main process (engine threads) / scanner + readers",
         f"{mean('cpu_main'):.1f} / {mean('cpu_children'):.1f}"),
        ("slices decoded / present, 3D series (target ≤ 25 %)",
         f"{decoded3} / {present3} = {100 * decoded3 / max(present3, 1):.1f} %"),
        ("slices decoded / present, all studies incl. 2D", f"{decoded} / {present} = {100 * decoded / max(present, 1):.1f} %"),
        ("classifier images (prompt not fully from tags)", f"{n_cls}"),
        ("peak RSS main + workers / largest worker (target ≤ 2 GB)",
         f"{peak['rss']:.0f} MB / {peak['worker']:.0f} MB"),
    ]
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
