"""I/O benchmark on a generated 300-slice CT series (real CT_small header and anatomy, new positions).

There is no long real CT volume in any package, so the series is built from the real
``CT_small.dcm``: slices 0..59 and 240..299 are anatomy-free air (−1000 HU with noise), the
rest carry the real slice. Reports, in one run:

- header-scan time per file (``discover_studies``: walk + ``dcmread(stop_before_pixels=True)`` + grouping);
- slices decoded by ``select_salient_slices`` vs total (target ≤ 25 %);
- decode + ``preprocess_slice`` time per selected slice, and the preprocessing time with CT
  resampled to 1 mm (``ct_pixel_mm``) over the plain resize on 512² slices at 0.7 mm, measured
  in alternation.

Usage: ``python benchmarks/bench_io.py [--slices 300] [--json out.json]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def write_series(directory: Path, n: int, anatomy: tuple[int, int]) -> None:
    """n files from CT_small's header; real anatomy for indices in ``anatomy`` (inclusive), air elsewhere."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uid = generate_uid()
    rng = np.random.default_rng(0)
    real = template.PixelData
    for i in range(n):
        ds = template.copy()
        ds.file_meta = template.file_meta.copy()
        sop = generate_uid()
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SeriesInstanceUID = uid
        ds.InstanceNumber = n - i  # deliberately not the geometric order
        ds.ImagePositionPatient = [float(template.ImagePositionPatient[0]), float(template.ImagePositionPatient[1]),
                                   1.25 * i]
        if anatomy[0] <= i <= anatomy[1]:
            ds.PixelData = real
        else:
            air = np.clip(np.rint(-1000.0 + rng.normal(0, 10, (128, 128)) + 1024), -32768, 32767).astype(np.int16)
            ds.PixelData = air.tobytes()
        ds.save_as(directory / f"{(i * 7919) % 100003:06d}.dcm", enforce_file_format=True)


class _Counting:
    def __init__(self, inner) -> None:
        self.inner, self.meta, self.flags, self.spacing = inner, inner.meta, inner.flags, inner.spacing
        self.calls = 0

    def __len__(self) -> int:
        return len(self.inner)

    def get_slice(self, i: int) -> np.ndarray:
        self.calls += 1
        return self.inner.get_slice(i)


def run(n: int) -> dict[str, float]:
    from engines.io import discover_studies, open_study
    from engines.preprocess import PreprocessConfig, preprocess_slice
    from engines.slices import select_salient_slices

    anatomy = (n // 5, n - n // 5 - 1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_series(root, n, anatomy)
        t0 = time.perf_counter()
        refs = list(discover_studies(root))
        scan_s = time.perf_counter() - t0
        assert len(refs) == 1 and refs[0].n_slices == n, "the series must form one study"
        ref = refs[0]
        src = _Counting(open_study(ref))
        t0 = time.perf_counter()
        sel = select_salient_slices(src, 7, modality="CT")
        select_s = time.perf_counter() - t0
        cfg = PreprocessConfig()
        plain = open_study(ref)
        t0 = time.perf_counter()
        for i in sel.indices:
            preprocess_slice(plain.get_slice(i), "CT", None, cfg)
        per_slice = (time.perf_counter() - t0) / len(sel.indices)
        # the same slices with the CT resampled to 1 mm (PreprocessConfig.ct_pixel_mm), timed
        # in alternation with the plain resize so both see the same machine load
        # a 512² slice (the usual CT matrix) at 0.7 mm: 358 px of 1 mm on the 224 canvas
        rng = np.random.default_rng(0)
        raw = [rng.normal(40.0, 300.0, (512, 512)).astype(np.float32) for _ in sel.indices]
        mm = dataclasses.replace(cfg, ct_pixel_mm=1.0)
        times: dict[str, float] = {"plain": 0.0, "mm": 0.0}
        for _ in range(5):
            for key, c in (("plain", cfg), ("mm", mm)):
                t0 = time.perf_counter()
                for r in raw:
                    preprocess_slice(r, "CT", None, c, pixel_mm=(0.7, 0.7))
                times[key] += time.perf_counter() - t0
    return {
        "n_slices": n,
        "header_scan_ms_per_file": 1000 * scan_s / n,
        "selection_decoded": sel.n_decoded,
        "selection_decoded_fraction": sel.n_decoded / n,
        "selection_ms": 1000 * select_s,
        "anatomy_found": list(sel.anatomy),
        "anatomy_true": list(anatomy),
        "decode_preprocess_ms_per_slice": 1000 * per_slice,
        "preprocess_ct_pixel_mm_over_plain": times["mm"] / times["plain"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    res = run(args.slices)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"I/O benchmark, {args.slices}-slice CT series (CT_small 128²)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("header scan per file", f"{res['header_scan_ms_per_file']:.2f} ms")
    table.add_row("slices decoded by selection", f"{res['selection_decoded']} / {args.slices} "
                  f"({100 * res['selection_decoded_fraction']:.1f} %)")
    table.add_row("selection time", f"{res['selection_ms']:.0f} ms")
    table.add_row("anatomy found / true", f"{tuple(res['anatomy_found'])} / {tuple(res['anatomy_true'])}")
    table.add_row("decode + preprocess per selected slice", f"{res['decode_preprocess_ms_per_slice']:.2f} ms")
    table.add_row("preprocess 512² CT: ct_pixel_mm 1.0 / plain resize",
                  f"{res['preprocess_ct_pixel_mm_over_plain']:.2f}×")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
