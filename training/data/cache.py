"""Network inputs for each study, built once per run by the scoring path and cached.

:func:`prepare_inputs` runs the scoring path for one study, ``engines.pipeline.prepare_study``
(``open_study`` → (3D) ``select_salient_slices(k)`` → ``preprocess_slice`` with the model's
``PreprocessConfig``, the tag modality / type and the window tags). Its output is

- 2D: float32 (3, S, S), normalised with the config's mean / std;
- 3D: float32 (K, 3, S, S), the K salient slices in series order.

:class:`InputCache` keeps these arrays, keyed by a fingerprint of the study's files (resolved
path, size, mtime), the preprocessing config, K and the prompt fields that change preprocessing.
Decoding a series dominates the cost of an epoch on CPU, so every study is decoded once per
run: in memory by default, or on disk (``<dir>/<key[:2]>/<key>.npy`` plus a JSON sidecar with
the slice indices and tag prompts) so that the stages of a recipe and resumed runs share the
work. Training caches float16 (inputs lie in [-1, 1]; the rounding error, below 5e-4, is far
under the effect of any degradation we learn); evaluation uses float32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from engines.errors import MediqaError, error_code
from engines.preprocess import PreprocessConfig, preprocess_slice

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One study's network inputs and what its header said.

    images:      float32 (3, S, S) for 2D, (K, 3, S, S) for 3D (see the module docstring).
    indices:     chosen slice indices in the sorted series ([0] for 2D).
    tag_prompts: ``prompts_from_tags`` of the opened study ({group: label | None}).
    window_type: the prompt type whose CT window was applied (None: tags / default window).
    """

    images: np.ndarray
    indices: list[int]
    tag_prompts: dict[str, str | None]
    window_type: str | None = None


def prepare_inputs(ref: Any, cfg: PreprocessConfig, k: int = 7,
                   ptype_hint: str | None = None) -> Prepared:
    """One study through ``engines.pipeline.prepare_study`` (the scoring path).

    ``ptype_hint`` plays the role the prompt classifier plays in scoring: when the tags say CT
    but leave the type open and the hint names a type with its own CT window (lung / soft /
    bone), the raw slices are re-windowed for that type exactly as scoring does after the
    classifier decided. Raises MediqaError subclasses from engines.io.
    """
    from engines.pipeline import prepare_study, window_tags  # noqa: PLC0415 - heavy imports

    prep = prepare_study(ref, cfg, k)
    images, used = prep.images, prep.ptype_used
    if (prep.raw is not None and ptype_hint and ptype_hint != used
            and ptype_hint in cfg.ct_windows):
        images = np.stack([preprocess_slice(r, "ct", ptype_hint, cfg, window_tags(prep.meta),
                                            pixel_mm=prep.pixel_mm)
                           for r in prep.raw])
        used = ptype_hint
    images = images.astype(np.float32, copy=False)
    indices = list(prep.indices)
    if ref.kind == "3d" and len(images) < k:
        # A one-slice "series": K copies fuse to that slice's score (equal softmax weights),
        # and keep every 3D input (K, 3, S, S) so studies batch together.
        reps = -(-k // len(images))
        images, indices = np.concatenate([images] * reps)[:k], (indices * reps)[:k]
    return Prepared(images=images if ref.kind == "3d" else images[0], indices=indices,
                    tag_prompts=dict(prep.tag_prompts), window_type=used)


def study_fingerprint(ref: Any) -> str:
    """sha256 over the study's files: resolved path, size and mtime (ns)."""
    h = hashlib.sha256()
    for f in ref.files:
        p = Path(f)
        try:
            st = p.stat()
            h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class PrepJob:
    """What ``prepare_inputs`` needs, picklable for worker processes."""

    ref: Any
    k: int = 7
    ptype_hint: str | None = None


def _run_job(job: PrepJob, cfg_dict: dict[str, Any]) -> tuple[Prepared | None, str | None]:
    try:
        return prepare_inputs(job.ref, PreprocessConfig.from_dict(cfg_dict), job.k, job.ptype_hint), None
    except MediqaError as exc:
        return None, f"{exc.code}: {exc.message}"
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:  # decoder failures on bad files
        return None, f"{error_code(exc)}: {type(exc).__name__}"


class InputCache:
    """Prepared studies by key; in memory (``directory=None``) or on disk. One process only."""

    def __init__(self, cfg: PreprocessConfig, *, directory: str | Path | None = None,
                 dtype: np.dtype | type = np.float16) -> None:
        self.cfg = cfg
        self.dir = Path(directory) if directory is not None else None
        self.dtype = np.dtype(dtype)
        self._mem: dict[str, Prepared] = {}
        self._cfg_hash = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()

    def key(self, job: PrepJob) -> str:
        payload = f"{study_fingerprint(job.ref)}|{self._cfg_hash}|{job.k}|{job.ptype_hint}|{self.dtype.str}"
        return hashlib.sha256(payload.encode()).hexdigest()

    def _files(self, key: str) -> tuple[Path, Path]:
        if self.dir is None:
            raise RuntimeError("memory cache has no files")
        base = self.dir / key[:2] / key
        return base.with_suffix(".npy"), base.with_suffix(".json")

    def __contains__(self, key: str) -> bool:
        if key in self._mem:
            return True
        return self.dir is not None and all(f.is_file() for f in self._files(key))

    def get(self, key: str) -> Prepared:
        """The prepared study; ``images`` as float32."""
        if key in self._mem:
            p = self._mem[key]
        else:
            npy, js = self._files(key)
            info = json.loads(js.read_text(encoding="utf-8"))
            p = Prepared(images=np.load(npy, allow_pickle=False), indices=info["indices"],
                         tag_prompts=info["tag_prompts"], window_type=info.get("window_type"))
        return Prepared(images=p.images.astype(np.float32, copy=False), indices=p.indices,
                        tag_prompts=p.tag_prompts, window_type=p.window_type)

    def info(self, key: str) -> dict[str, Any]:
        """{"indices", "tag_prompts", "window_type"} without loading the images."""
        if key in self._mem:
            p = self._mem[key]
            return {"indices": p.indices, "tag_prompts": p.tag_prompts, "window_type": p.window_type}
        return json.loads(self._files(key)[1].read_text(encoding="utf-8"))

    def put(self, key: str, prep: Prepared) -> None:
        stored = Prepared(images=np.ascontiguousarray(prep.images, dtype=self.dtype), indices=prep.indices,
                          tag_prompts=prep.tag_prompts, window_type=prep.window_type)
        if self.dir is None:
            self._mem[key] = stored
            return
        npy, js = self._files(key)
        npy.parent.mkdir(parents=True, exist_ok=True)
        tmp = npy.with_name(f".{npy.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as fh:
            np.save(fh, stored.images, allow_pickle=False)
        os.replace(tmp, npy)
        tmp = js.with_name(f".{js.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"indices": stored.indices, "tag_prompts": stored.tag_prompts,
                                   "window_type": stored.window_type}), encoding="utf-8")
        os.replace(tmp, js)

    def prepare(self, jobs: Sequence[PrepJob], *, workers: int = 0,
                on_done: Callable[[], None] | None = None) -> tuple[list[str | None], list[str | None]]:
        """Prepare every job not cached yet. Returns (keys, errors), aligned with ``jobs``:
        a key where the study is ready, else None and the error text (``code: message``)."""
        keys: list[str | None] = [self.key(j) for j in jobs]
        errors: list[str | None] = [None] * len(jobs)
        todo = [i for i, k in enumerate(keys) if k not in self]
        if on_done is not None:
            for _ in range(len(jobs) - len(todo)):
                on_done()
        cfg_dict = self.cfg.to_dict()

        def finish(i: int, res: tuple[Prepared | None, str | None]) -> None:
            prep, err = res
            if prep is None:
                errors[i], keys[i] = err or "internal: no output", None
                logger.warning("cannot prepare %s: %s", getattr(jobs[i].ref, "rel_path", "?"), errors[i])
            else:
                self.put(keys[i], prep)  # type: ignore[arg-type]
            if on_done is not None:
                on_done()

        if workers > 0 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futs = {i: pool.submit(_run_job, jobs[i], cfg_dict) for i in todo}
                for i in todo:
                    finish(i, futs[i].result())
        else:
            for i in todo:
                finish(i, _run_job(jobs[i], cfg_dict))
        return keys, errors


def iter_chunks(seq: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]
