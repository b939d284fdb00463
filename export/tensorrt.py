"""ONNX → TensorRT engine (TensorRT ≥ 10 Python API), with a header and a build cache.

What is pure (unit-tested without TensorRT): profile shapes per input, precision / GPU checks,
workspace arithmetic, the cache key, the header contents, calibration batching. What needs
TensorRT and a GPU (``build_engine``) is tested under the ``trt`` marker only.

Build: ``trt.Builder`` → network (explicit batch is the only mode in TensorRT 10) → ``OnnxParser``
→ builder config with the workspace pool limit, one optimisation profile (min / opt / max batch;
the other dimensions are static), precision flags (fp16 default; bf16 needs compute capability
≥ 8.0; int8 with an entropy calibrator fed real images at the profile's opt batch, its cache
written next to the engine — note TensorRT 10.1+ deprecates implicit int8 calibration in favour
of explicit Q/DQ graphs, but still supports it), a timing cache loaded from and saved to a file
(so rebuilds of similar graphs skip kernel timing), then ``build_serialized_network``.

Output: a MedIQA ``.engine`` file = length-prefixed JSON header (card, TensorRT version, GPU name,
compute capability, precision, profile, ...; see ``engines.backends.engine_header``) + the plan.
Cache: the key is sha256 over (ONNX sha256, TensorRT version, compute capability, precision,
profile); an existing engine whose header carries the same key is reused instead of rebuilt,
and built engines are also kept under ``cache_dir/<key>.engine``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from engines import names
from engines.backends.engine_header import (PRECISIONS, BatchProfile, pack_engine, read_engine_header)
from engines.errors import ConfigError, UnsupportedArtifact

log = logging.getLogger(__name__)

DEFAULT_PRECISION = "fp16"
DEFAULT_WORKSPACE_GB = 4.0
DEFAULT_PROFILE = BatchProfile(1, 8, 32)
# Minimum compute capability per precision (fast fp16 tensor cores from Volta; bf16 from Ampere;
# int8 (DP4A) from Pascal 6.1).
MIN_CC = {"fp32": (5, 0), "fp16": (7, 0), "bf16": (8, 0), "int8": (6, 1)}


# ----------------------------------------------------------------------------- pure functions
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def engine_cache_key(onnx_sha256: str, trt_version: str, compute_capability: str, precision: str,
                     profile: BatchProfile) -> str:
    """Stable hex key (32 chars) of everything that makes a plan reusable (DESIGN §4)."""
    blob = json.dumps({"onnx": onnx_sha256, "trt": str(trt_version), "cc": str(compute_capability),
                       "precision": precision, "profile": profile.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def parse_cc(cc: str) -> tuple[int, int]:
    """"8.9" → (8, 9); ValueError when malformed."""
    try:
        major, minor = str(cc).split(".")
        return int(major), int(minor)
    except ValueError:
        raise ValueError(f"compute capability must look like '8.9', got {cc!r}") from None


def check_precision(precision: str, compute_capability: str) -> None:
    """ConfigError when ``precision`` is unknown or this GPU generation lacks fast support for it."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    need = MIN_CC[precision]
    if parse_cc(compute_capability) < need:
        raise ConfigError(f"{precision} engines need compute capability ≥ {need[0]}.{need[1]}, "
                          f"this GPU is {compute_capability}; use --precision "
                          f"{'fp16' if precision == 'bf16' and parse_cc(compute_capability) >= MIN_CC['fp16'] else 'fp32'}")


def workspace_bytes(gb: float) -> int:
    """Workspace pool limit in bytes from GiB (> 0)."""
    if not gb > 0:
        raise ConfigError(f"workspace must be > 0 GiB, got {gb}")
    return int(round(float(gb) * (1 << 30)))


def graph_profile(graph: str, profile: BatchProfile, n_slices: int = 7) -> BatchProfile:
    """The profile in the graph's own batch unit: the 3D graph's batch is volumes of K slices, so its
    image budget min/opt/max is divided by K (at least 1 volume)."""
    if graph != "3d":
        return profile
    k = max(1, int(n_slices))
    mx = max(1, profile.max // k)
    opt = min(mx, max(1, profile.opt // k))
    return BatchProfile(min(opt, max(1, profile.min // k)), opt, mx)


def input_profiles(graph: str, profile: BatchProfile, *, image_size: int, prompt_dim: int,
                   n_slices: int = 7) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Input name → (min, opt, max) full shapes for ``IOptimizationProfile.set_shape``."""
    p = graph_profile(graph, profile, n_slices)
    img = (3, image_size, image_size)
    if graph == "2d":
        return {names.IMAGES: p.shapes(img), names.PROMPT: p.shapes((prompt_dim,))}
    if graph == "3d":
        return {names.VOLUMES: p.shapes((n_slices, *img)), names.PROMPT: p.shapes((prompt_dim,))}
    if graph == "classifier":
        return {names.IMAGES: p.shapes(img)}
    raise ValueError(f"unknown graph {graph!r}")


def make_header(*, card: Mapping[str, Any], graph: str, precision: str, profile: BatchProfile,
                trt_version: str, gpu_name: str, compute_capability: str, onnx_sha256: str,
                image_size: int, prompt_dim: int, n_slices: int) -> dict[str, Any]:
    """The JSON header written before the plan (see ``engines.backends.engine_header``)."""
    prof = graph_profile(graph, profile, n_slices)
    shapes = {k: list(v[1][1:]) for k, v in input_profiles(graph, profile, image_size=image_size,
                                                           prompt_dim=prompt_dim, n_slices=n_slices).items()}
    return {
        "format": 1,
        "card": dict(card),
        "graph": graph,
        "precision": precision,
        "profile": prof.to_dict(),
        "trt_version": str(trt_version),
        "gpu_name": gpu_name,
        "compute_capability": str(compute_capability),
        "onnx_sha256": onnx_sha256,
        "cache_key": engine_cache_key(onnx_sha256, trt_version, compute_capability, precision, prof),
        "input_shapes": shapes,
        "n_slices": int(n_slices),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def reusable_engine(path: Path, key: str) -> bool:
    """True when ``path`` is a MedIQA engine whose header carries cache key ``key``."""
    if not path.is_file():
        return False
    try:
        return read_engine_header(path).get("cache_key") == key
    except UnsupportedArtifact:
        return False


# ----------------------------------------------------------------------------- TensorRT
@dataclass
class EngineBuild:
    path: Path
    graph: str
    precision: str
    profile: BatchProfile
    cached: bool
    seconds: float
    size_bytes: int
    cache_key: str


def _calibrator(trt: Any, batches: list[dict[str, np.ndarray]], cache_file: Path) -> Any:
    import torch

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        """Feeds real preprocessed batches (all of the profile's opt batch size) from GPU memory."""

        def __init__(self) -> None:
            super().__init__()
            self._batches = batches
            self._i = 0
            self._keep: list[Any] = []

        def get_batch_size(self) -> int:
            return int(next(iter(batches[0].values())).shape[0]) if batches else 1

        def get_batch(self, names_: list[str]) -> list[int] | None:
            if self._i >= len(self._batches):
                return None
            b = self._batches[self._i]
            self._i += 1
            self._keep = [torch.from_numpy(b[n]).cuda().contiguous() for n in names_]
            return [int(t.data_ptr()) for t in self._keep]

        def read_calibration_cache(self) -> bytes | None:
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            cache_file.write_bytes(bytes(cache))

    return _EntropyCalibrator()


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, graph: str = "2d",
                 precision: str = DEFAULT_PRECISION, profile: BatchProfile = DEFAULT_PROFILE,
                 workspace_gb: float = DEFAULT_WORKSPACE_GB, timing_cache: str | Path | None = None,
                 calib_images: np.ndarray | None = None, calib_prompts: np.ndarray | None = None,
                 cache_dir: str | Path | None = None, force: bool = False) -> EngineBuild:
    """Build (or reuse) a MedIQA TensorRT engine from an exported ONNX graph."""
    from engines.artifact import load_card
    from engines.backends.tensorrt_backend import cuda_device_facts, import_tensorrt
    from export.quantize import calibration_batches

    trt = import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    gpu_name, cc = cuda_device_facts()
    check_precision(precision, cc)
    card = load_card(onnx_path)
    pre = card.preprocess
    image_size = int(pre.get("image_size", 224))
    from engines.prompts import PromptVocab

    prompt_dim = PromptVocab.from_dict(card.prompt_vocab).size
    header = make_header(card=card.to_dict(), graph=graph, precision=precision, profile=profile,
                         trt_version=trt.__version__, gpu_name=gpu_name, compute_capability=cc,
                         onnx_sha256=sha256_file(onnx_path), image_size=image_size,
                         prompt_dim=prompt_dim, n_slices=card.n_slices)
    key = header["cache_key"]
    cached_copy = Path(cache_dir) / f"{key}.engine" if cache_dir else None
    t0 = time.perf_counter()
    if not force and reusable_engine(engine_path, key):
        log.info("TensorRT engine %s is up to date (key %s); not rebuilt", engine_path, key)
        return EngineBuild(engine_path, graph, precision, profile, True, 0.0, engine_path.stat().st_size, key)
    if not force and cached_copy is not None and reusable_engine(cached_copy, key):
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached_copy, engine_path)
        log.info("TensorRT engine %s taken from the cache %s", engine_path, cached_copy)
        return EngineBuild(engine_path, graph, precision, profile, True, time.perf_counter() - t0,
                           engine_path.stat().st_size, key)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UnsupportedArtifact(f"TensorRT could not parse {onnx_path.name}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes(workspace_gb))
    opt_profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in input_profiles(graph, profile, image_size=image_size, prompt_dim=prompt_dim,
                                              n_slices=card.n_slices).items():
        opt_profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(opt_profile)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision == "int8":
        if calib_images is None or calib_prompts is None:
            raise ConfigError("int8 engines need calibration images (real preprocessed samples)")
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)  # layers int8 cannot run fall back to fp16, not fp32
        gp = graph_profile(graph, profile, card.n_slices)
        feeds = calibration_batches(calib_images, calib_prompts, gp.opt, fill=True)
        if graph == "classifier":
            feeds = [{names.IMAGES: f[names.IMAGES]} for f in feeds]
        config.int8_calibrator = _calibrator(trt, feeds, engine_path.with_suffix(".calib.cache"))
        config.set_calibration_profile(opt_profile)
    tc_bytes = b""
    if timing_cache is not None and Path(timing_cache).is_file():
        tc_bytes = Path(timing_cache).read_bytes()
    cache = config.create_timing_cache(tc_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UnsupportedArtifact(f"TensorRT failed to build an engine from {onnx_path.name} "
                                  f"({precision}, profile {profile}); see the TensorRT log above")
    if timing_cache is not None:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(engine_path.name + ".tmp")
    tmp.write_bytes(pack_engine(header, bytes(plan)))
    tmp.replace(engine_path)
    if cached_copy is not None:
        cached_copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(engine_path, cached_copy)
    seconds = time.perf_counter() - t0
    log.info("built TensorRT %s engine %s (%s, profile %s) in %.1f s", graph, engine_path, precision, profile, seconds)
    return EngineBuild(engine_path, graph, precision, profile, False, seconds, engine_path.stat().st_size, key)
