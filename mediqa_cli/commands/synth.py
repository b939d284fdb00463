"""``mediqa synth OUT_DIR``: generate the physics-based synthetic corpus (training.synth)."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import click

log = logging.getLogger(__name__)

_SIZES = ("tiny", "small", "medium", "large")


def _prepare_out_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty OUT_DIR unless ``force``; with ``force`` remove only a previous corpus."""
    from training.synth.corpus import MANIFEST_COLUMNS, MANIFEST_NAME
    from training.synth.sources import SPLITS

    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise click.ClickException(
            f"{out} is not empty; choose an empty folder or pass --force to replace a previous corpus")
    manifest = out / MANIFEST_NAME
    header: list[str] = []
    if manifest.is_file():
        with manifest.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
    if tuple(header) != MANIFEST_COLUMNS:
        raise click.ClickException(
            f"{out} holds no synthetic corpus (no {MANIFEST_NAME} with the synth columns); "
            "refusing to delete anything there")
    for split in SPLITS:
        if (out / split).is_dir():
            shutil.rmtree(out / split)
    manifest.unlink()


def _generator_options(fn: Callable[..., None]) -> Callable[..., None]:
    """One click option per ``training.synth.corpus.GENERATOR_OPTIONS`` entry (in table order)."""
    from training.synth.corpus import GENERATOR_OPTIONS  # noqa: PLC0415

    for opt in reversed(GENERATOR_OPTIONS):
        if isinstance(opt.default, bool):
            decl = f"{opt.flag}/--no-{opt.flag[2:]}"
            fn = click.option(decl, opt.name, default=opt.default, show_default=True, help=opt.help)(fn)
        else:
            fn = click.option(opt.flag, opt.name, type=click.Choice(list(opt.choices)), default=opt.default,
                              show_default=True, help=opt.help)(fn)
    return fn


@click.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed; the same seed gives byte-identical output.")
@click.option("--size", type=click.Choice(_SIZES), default="small", show_default=True,
              help="Corpus size: small ≈ 300 2D images + 13 3D studies (≈ 1–2 min on 2 cores).")
@click.option("--workers", type=int, default=None,
              help="Worker processes (default: min(4, CPU count)). Output does not depend on it.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar.")
@click.option("--force", is_flag=True, help="Replace a previous synthetic corpus in OUT_DIR.")
@click.option("--splits", default=None, metavar="SPLIT[,SPLIT]",
              help="Render only the studies of these splits (e.g. val,test: fresh held-out draws "
                   "of another seed in a third of the time). Each rendered study and its manifest "
                   "row are byte-identical to the full corpus'; the manifest lists only them.")
@_generator_options
def synth(out_dir: Path, seed: int, size: str, workers: int | None, progress: bool, force: bool,
          splits: str | None, **options: bool | str) -> None:
    """Generate a synthetic corpus with known, physics-based degradations under OUT_DIR.

    Real anatomy shipped in PyPI packages (pydicom, pydicom-data, nibabel, scikit-image) is
    degraded by simulated physics (CT dose in the projection domain, sparse views, blur; MR noise
    vs field strength, ringing, motion, bias; 2D blur / noise / JPEG / illumination) and written
    as DICOM series, NIfTI, DICOM, PNG and JPEG, with OUT_DIR/manifest.csv (path, synthetic
    score in [0, 1], prompts, split, degradation parameters). Scores are synthetic: they are
    computed from the simulation parameters, not rated by readers.
    """
    from engines.errors import DatasetError
    from training.synth.corpus import plan_corpus, render_corpus, require_sources

    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    if n_workers < 1:
        raise click.BadParameter("must be ≥ 1", param_hint="--workers")
    specs = plan_corpus(seed, size, **options)
    if splits is not None:
        from training.synth.sources import SPLITS

        wanted = [x.strip() for x in splits.split(",") if x.strip()]
        if not wanted or any(x not in SPLITS for x in wanted):
            raise click.BadParameter(f"a comma-separated list of {', '.join(SPLITS)}; got {splits!r}",
                                     param_hint="--splits")
        # the plan is the full corpus' (same random draws), only the rendering is filtered
        specs = [sp for sp in specs if sp.split in wanted]
    try:   # before OUT_DIR is touched: --force must not delete a corpus that cannot be rebuilt here
        require_sources(specs)
    except DatasetError as exc:
        raise click.ClickException(exc.message) from None
    _prepare_out_dir(out_dir, force)
    total = len(specs)
    t0 = time.perf_counter()
    if progress:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        with Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), transient=False) as bar:
            task = bar.add_task("synth", total=total)
            manifest = render_corpus(out_dir, specs, workers=n_workers,
                                     on_progress=lambda done, _t: bar.update(task, completed=done))
    else:
        manifest = render_corpus(out_dir, specs, workers=n_workers)
    click.echo(f"{total} studies in {time.perf_counter() - t0:.1f} s; manifest: {manifest}")
