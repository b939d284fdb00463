"""Engine throughput in one run on the same real inputs: torch fp32 / bf16, onnxruntime fp32 / int8.

    python benchmarks/bench_engines.py [--preset mediqa-vitt16] [--model X.safetensors]
                                       [--batches 1 8] [--repeats 15] [--threads N] [--exporters]
                                       [--json out.json]

Inputs are real preprocessed images (``export.samples``: pydicom CT/MR/US test files and the
scikit-image retina, with graded noise / blur). Without ``--model`` the bundled default is used when
it is installed and matches the preset, otherwise a random-initialised model of the preset (the
speed is the same; the int8 SRCC is then measured on an untrained model, which the output says).

Timing: every engine is warmed up, then the engines are timed round-robin (one call each per
round, an untimed ``--settle`` pause before each so that the previous engine's spinning threads
have gone idle) so that load from other processes hits all of them alike; images/s = batch /
median call time over at least ``--repeats`` rounds and ``--min-time`` seconds per engine.
FLOPs per image are counted on the torch graph with ``torch.utils.flop_counter`` (matmul, conv,
attention; elementwise ops excluded), achieved GFLOP/s = FLOPs × images/s, compared with a
measured fp32 GEMM ceiling (torch.matmul and numpy.matmul, 1024³, same thread count).
``--exporters`` also times the ONNX graph of the TorchScript exporter against the dynamo one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench_engines")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gemm_ceiling(threads: int, n: int = 1024, reps: int = 10) -> dict[str, float]:
    """fp32 (and bf16) GEMM GFLOP/s with torch and numpy: the best of ``reps`` n³ products."""
    import torch

    out = {}
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    for name, (x, y, fn) in {
        "torch_fp32": (a, b, torch.matmul),
        "torch_bf16": (a.bfloat16(), b.bfloat16(), torch.matmul),
        "numpy_fp32": (a.numpy(), b.numpy(), np.matmul),
    }.items():
        fn(x, y)
        best = min(_timeit(lambda: fn(x, y)) for _ in range(reps))
        out[name] = 2 * n ** 3 / best / 1e9
    return out


def _timeit(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def flops_per_image(model, image_size: int, prompt_dim: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, image_size, image_size)
    p = torch.zeros(1, prompt_dim)
    p[:, 0] = 1
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x, p)
    return float(fc.get_total_flops())


def build_model(preset: str, model_path: str | None):
    """(iqa module, card, description)."""
    import torch

    from engines.artifact import ModelCard, load_card
    from engines.models.presets import get_preset
    from engines.models.registry import create_model
    from engines.prompts import DEFAULT_VOCAB
    from engines.artifact import bundled_model_path

    path = Path(model_path) if model_path else bundled_model_path()
    if path.is_file() and (model_path or load_card(path).preset == preset):
        from engines.models.loading import load_artifact

        loaded = load_artifact(path)
        return loaded.iqa, loaded.card, f"trained weights {path.name} ({loaded.card.preset})"
    torch.manual_seed(0)
    p = get_preset(preset)
    card = ModelCard(task="iqa", preset=preset, prompt_vocab=DEFAULT_VOCAB.to_dict(),
                     preprocess=p.preprocess_config().to_dict(), label_scale={"min": 0, "max": 1, "name": "q"})
    return (create_model(preset, DEFAULT_VOCAB.size).eval(), card,
            f"random-init {preset} (bundled model not installed; speed is weight-independent, int8 SRCC is on an untrained model)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mediqa-vitt16")
    ap.add_argument("--model", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--min-time", type=float, default=3.0,
                    help="time every engine for at least this many seconds per batch size")
    ap.add_argument("--settle", type=float, default=0.05,
                    help="untimed pause (s) before each call, so one engine's spinning threads do "
                         "not slow the next one")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--exporters", action="store_true", help="also time the TorchScript exporter's graph")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from engines import names
    from engines.backends.onnxruntime_backend import OnnxRuntimeBackend
    from engines.backends.torch_backend import TorchBackend
    from engines.preprocess import PreprocessConfig
    from engines.prompts import PromptVocab
    from export.onnx import torch_to_onnx
    from export.quantize import METHODS, accept_quantized, quantize_onnx
    from export.samples import sample_set

    torch.set_num_threads(args.threads)
    iqa, card, model_desc = build_model(args.preset, args.model)
    cfg = PreprocessConfig.from_dict(card.preprocess)
    vocab = PromptVocab.from_dict(card.prompt_vocab)
    samples = sample_set(cfg=cfg, vocab=vocab)
    calib = dict(calib_images=samples.images[0::2], calib_prompts=samples.prompts[0::2])
    val = dict(val_images=samples.images[1::2], val_prompts=samples.prompts[1::2])
    tmp = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    t0 = time.perf_counter()
    exp = torch_to_onnx(iqa, tmp / "model.onnx", graph="2d", card=card, image_size=cfg.image_size,
                        prompt_dim=vocab.size)
    export_s = time.perf_counter() - t0
    quant = {}
    for method in METHODS:
        q = quantize_onnx(tmp / "model.onnx", tmp / f"model.int8-{method}.onnx", method=method,
                          raise_on_refuse=False, **calib, **val)
        if q.path is None:  # refused: keep the file for timing anyway, marked as refused
            quantize_onnx(tmp / "model.onnx", tmp / f"model.int8-{method}.onnx", method=method, min_srcc=-1.0,
                          **calib, **val)
        quant[method] = q
    chosen = next((m for m in METHODS if quant[m].accepted), None)

    engines = {
        "torch fp32": TorchBackend.from_modules(iqa, card, threads=args.threads),
        "torch bf16": TorchBackend.from_modules(iqa, card, precision="bf16", threads=args.threads),
        "onnxruntime fp32": OnnxRuntimeBackend(tmp / "model.onnx", card=card, threads=args.threads),
        **{f"onnxruntime int8 {m}": OnnxRuntimeBackend(tmp / f"model.int8-{m}.onnx", card=card, threads=args.threads)
           for m in METHODS},
    }
    if args.exporters:
        torch_to_onnx(iqa, tmp / "model.ts.onnx", graph="2d", card=card, image_size=cfg.image_size,
                      prompt_dim=vocab.size, dynamo=False)
        engines["onnxruntime fp32 (TorchScript export)"] = OnnxRuntimeBackend(tmp / "model.ts.onnx", card=card,
                                                                              threads=args.threads)

    # SRCC of every engine's scores vs torch fp32 on the validation images
    ref = engines["torch fp32"].score(val["val_images"], val["val_prompts"])[names.SCORE]
    srcc = {k: accept_quantized(ref, b.score(val["val_images"], val["val_prompts"])[names.SCORE])[1]
            for k, b in engines.items()}

    flops = flops_per_image(iqa, cfg.image_size, vocab.size)
    ceiling = gemm_ceiling(args.threads)
    results: dict[str, dict[int, float]] = {k: {} for k in engines}
    for bsz in args.batches:
        idx = np.arange(bsz) % len(samples)
        x, p = samples.images[idx], samples.prompts[idx]
        warm = []
        for b in engines.values():
            for _ in range(2):
                warm.append(_timeit(lambda: b.score(x, p)))
        # Enough rounds that every engine is timed for ≥ --min-time seconds (short batch-1 calls
        # need many more samples than batch-8 ones for a stable median on shared cores).
        rounds = max(args.repeats, int(np.ceil(args.min_time / max(float(np.median(warm)), 1e-4))))
        times: dict[str, list[float]] = {k: [] for k in engines}
        for _ in range(rounds):
            for k, b in engines.items():
                # Let the previous engine's worker threads stop spinning (onnxruntime and OpenMP
                # spin for a while after a call) so that they do not slow the engine timed next.
                time.sleep(args.settle)
                times[k].append(_timeit(lambda: b.score(x, p)))
        for k in engines:
            results[k][bsz] = bsz / float(np.median(times[k]))

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    machine = (f"{cpu_name()}, {os.cpu_count()} logical CPUs, {args.threads} threads; python {platform.python_version()}, "
               f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}; "
               f"load average during run {load[0]:.1f}")
    lines = [f"machine: {machine}", f"model: {model_desc}",
             f"graph: {exp.exporter} exporter, opset {exp.opset}, export {export_s:.1f} s; "
             f"{flops / 1e9:.2f} GFLOP per image (torch.utils.flop_counter)",
             f"GEMM ceiling fp32: torch {ceiling['torch_fp32']:.0f} GFLOP/s, numpy {ceiling['numpy_fp32']:.0f} GFLOP/s; "
             f"bf16 torch {ceiling['torch_bf16']:.0f} GFLOP/s", ""]
    fp32_ceiling = max(ceiling["torch_fp32"], ceiling["numpy_fp32"])
    header = f"| engine | " + " | ".join(f"img/s @ b{b}" for b in args.batches) + \
             f" | GFLOP/s @ b{args.batches[-1]} | % fp32 GEMM ceiling | score SRCC vs torch fp32 |"
    lines += [header, "|" + "---|" * (4 + len(args.batches))]
    for k in engines:
        g = flops * results[k][args.batches[-1]] / 1e9
        tag = ""
        if k.startswith("onnxruntime int8"):
            m = k.split()[-1]
            tag = " (accepted)" if quant[m].accepted else " (refused < 0.99)"
        lines.append(f"| {k}{tag} | " + " | ".join(f"{results[k][b]:.1f}" for b in args.batches) +
                     f" | {g:.1f} | {100 * g / fp32_ceiling:.0f}% | {srcc[k]:.4f} |")
    lines.append("")
    for b in args.batches:
        r_ort = results["onnxruntime fp32"][b] / results["torch fp32"][b]
        r_bf16 = results["torch bf16"][b] / results["torch fp32"][b]
        parts = [f"batch {b}: onnxruntime fp32 / torch fp32 = {r_ort:.2f}x", f"torch bf16 / fp32 = {r_bf16:.2f}x"]
        for m in METHODS:
            parts.append(f"int8 {m} / onnxruntime fp32 = "
                         f"{results[f'onnxruntime int8 {m}'][b] / results['onnxruntime fp32'][b]:.2f}x")
        if args.exporters:
            parts.append(f"dynamo / TorchScript graph = "
                         f"{results['onnxruntime fp32'][b] / results['onnxruntime fp32 (TorchScript export)'][b]:.2f}x")
        lines.append("; ".join(parts))
    for m in METHODS:
        lines.append(f"int8 {m}: {quant[m].summary()}")
    lines.append(f"export --int8 would ship: {chosen or 'nothing (refused)'}")
    print("\n".join(lines))
    out = {"machine": machine, "model": model_desc, "flops_per_image": flops, "gemm_ceiling": ceiling,
           "images_per_s": results, "srcc_vs_torch_fp32": srcc, "exporter": exp.exporter,
           "int8": {m: vars(q) | {"path": str(q.path)} for m, q in quant.items()}, "int8_chosen": chosen}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    for b in engines.values():
        b.close()
    return out


if __name__ == "__main__":
    main()
