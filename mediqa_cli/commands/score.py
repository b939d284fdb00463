"""``mediqa score ROOT -o scores.csv``: batch-score every study under ROOT (the nightly job).

Exit codes (DESIGN §8): 0 every study scored; 1 some studies failed (each has an error row);
2 usage or fatal error (no model, unreadable root, …); 75 another run holds the report's lock.

Logs go to stderr (scrubbed of patient identifiers); the summary goes to stdout. On a terminal a
progress bar shows studies/s and an ETA; otherwise (cron) a plain log line is written every
``--log-every`` seconds.
"""

from __future__ import annotations

import heapq
import logging
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import click

logger = logging.getLogger("mediqa.score")

EXIT_OK, EXIT_SOME_FAILED, EXIT_FATAL, EXIT_LOCKED = 0, 1, 2, 75
N_WORST = 10
N_THUMB_STUDIES = 12


class FatalError(click.ClickException):
    """A problem that stops the whole run (exit 2)."""

    exit_code = EXIT_FATAL


def _count_files(root: Path, out: dict[str, int], stop: threading.Event) -> None:
    """Background count of the files under root (for the ETA only; no header is read)."""
    n = 0
    stack = [root]
    seen: set[tuple[int, int]] = set()
    while stack and not stop.is_set():
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    try:
                        if e.is_dir(follow_symlinks=False):
                            st = e.stat(follow_symlinks=False)
                            if (st.st_dev, st.st_ino) not in seen:
                                seen.add((st.st_dev, st.st_ino))
                                stack.append(Path(e.path))
                        elif e.is_file(follow_symlinks=False):
                            n += 1
                    except OSError:
                        continue
        except OSError:
            continue
        out["files"] = n
    out["files"] = n
    out["done"] = 1


class _Progress:
    """Rich progress bar on a TTY, periodic log lines otherwise."""

    def __init__(self, root: Path, quiet: bool, log_every: float) -> None:
        self.tty = sys.stderr.isatty() and not quiet
        self.quiet = quiet
        self.log_every = log_every
        self.t0 = time.monotonic()
        self.last_log = self.t0
        self.done = 0
        self.files_done = 0
        self.scored = 0
        self.counts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_count_files, args=(root, self.counts, self._stop),
                                        daemon=True)
        self._thread.start()
        self.bar: Any = None
        if self.tty:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)

            self.bar = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("files · {task.fields[rate]} studies/s · ETA {task.fields[eta]}"),
                                TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self.task = self.bar.add_task("score", total=None, rate="-", eta="-")
            self.bar.start()

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.t0, 1e-6)

    def eta(self) -> str:
        total = self.counts.get("files")
        el = time.monotonic() - self.t0
        if not total or not self.counts.get("done") or self.files_done == 0:
            return "-"
        rem = max(total - self.files_done, 0) * el / self.files_done
        return time.strftime("%H:%M:%S", time.gmtime(rem))

    def update(self, rec: Any) -> None:
        self.done += 1
        self.files_done += max(rec.n_files, 1)
        self.scored += 0 if rec.reused else 1
        now = time.monotonic()
        if self.bar is not None:
            total = self.counts.get("files") if self.counts.get("done") else None
            self.bar.update(self.task, completed=self.files_done, total=total,
                            rate=f"{self.rate():.1f}", eta=self.eta())
        elif not self.quiet and now - self.last_log >= self.log_every:
            self.last_log = now
            total = self.counts.get("files")
            logger.info("progress: %d studies (%d files of %s), %.1f studies/s, ETA %s",
                        self.done, self.files_done, total if total else "?", self.rate(), self.eta())

    def close(self) -> None:
        self._stop.set()
        if self.bar is not None:
            self.bar.stop()


def _summary(stats: dict[str, Any], worst: list[tuple[float, int, dict]], hide_paths: bool,
             min_score: float | None, out: Path) -> None:
    """Counts by status, score distribution per modality, the worst studies (stdout)."""
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    con = Console(file=sys.stdout, soft_wrap=True)
    st: Counter = stats["status"]
    con.print(f"[bold]mediqa score[/bold]: {sum(st.values())} studies → {out}  "
              + "  ".join(f"{k}={v}" for k, v in sorted(st.items()))
              + f"  (re-scored {stats['scored']}, carried over {stats['reused']})")
    if stats["codes"]:
        con.print("errors by code: " + ", ".join(f"{k}={v}" for k, v in stats["codes"].most_common()))
    if stats["by_mod"]:
        t = Table(title="score by modality", title_justify="left")
        for c in ("modality", "n", "min", "p25", "median", "p75", "max"):
            t.add_column(c, justify="left" if c == "modality" else "right")
        for mod, vals in sorted(stats["by_mod"].items()):
            a = np.asarray(vals)
            q = np.percentile(a, [0, 25, 50, 75, 100])
            t.add_row(mod or "?", str(a.size), *(f"{x:.3f}" for x in q))
        con.print(t)
    if worst:
        t = Table(title=f"worst {len(worst)} studies", title_justify="left")
        cols = ["score", "study_id", "modality", "kind"] + ([] if hide_paths else ["path"])
        for c in cols:
            t.add_column(c)
        for negscore, _, row in sorted(worst, key=lambda x: (-x[0], x[1])):
            t.add_row(f"{-negscore:.3f}", row["study_id"], row["modality"], row["kind"],
                      *([] if hide_paths else [row["path"]]))
        con.print(t)
    if min_score is not None:
        con.print(f"studies below --min-score {min_score:g}: {stats['low']}")


@click.command("score")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Report file (CSV, or JSONL with --format jsonl).")
@click.option("--model", "model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Model artifact (.safetensors / .onnx / .engine). Default: the bundled model.")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "tensorrt"]), default="auto",
              show_default=True, help="Runtime; auto picks it from the model file's suffix.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, …")
@click.option("--tta", type=click.Choice(["none", "flip", "d4", "auto"]), default="auto", show_default=True,
              help="Test-time augmentation: average each image's score with its mirror image (flip, 2x "
                   "inference) or over its 8 flips / quarter turns (d4, 8x); auto = the model's own "
                   "per-modality choice, measured on validation data (`mediqa info --model`). Recorded "
                   "in the model column.")
@click.option("--features/--no-features", default=True, show_default=True,
              help="Apply the model card's feature head: classical statistics of the network input "
                   "(noise, sharpness, blockiness, non-uniformity) blended into the score for the "
                   "modalities where validation showed a gain (`mediqa info --model`). --no-features: "
                   "the network alone (recorded in the model column).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=16, show_default=True,
              help="Images per inference call (2D images and 3D slices mixed).")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Reader processes. Default: CPU cores - 1 (at least 1).")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("--resume", is_flag=True, help="Keep rows of unchanged studies (same fingerprint and model) "
              "from the previous run or from an interrupted one; score the rest.")
@click.option("--include", multiple=True, help="Glob on the path relative to ROOT (repeatable).")
@click.option("--exclude", multiple=True, help="Glob on the path relative to ROOT (repeatable).")
@click.option("--min-score", type=float, default=None,
              help="Flag studies scoring below this value (flag low_score, listed in the summary).")
@click.option("--report", "report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a self-contained HTML report here.")
@click.option("--hide-paths", is_flag=True, help="Leave the path column empty (reports that leave "
              "the department); only the pseudonymous study_id identifies a study.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.1, None), default=120.0, show_default=True,
              help="Per-study limit in seconds on reading + slice selection + preprocessing.")
@click.option("--log-every", type=click.FloatRange(0.1, None), default=30.0, show_default=True,
              help="Seconds between progress log lines when not on a terminal.")
@click.option("--header-cache", "header_cache", default="auto", show_default=True,
              help="SQLite cache of DICOM header scans so unchanged files are not parsed again on the "
                   "next run: 'auto' = $MEDIQA_CACHE_DIR, $XDG_CACHE_HOME/mediqa or ~/.cache/mediqa "
                   "(headers.sqlite, mode 0600); a file path; or 'off'.")
@click.option("--reader-nice", type=click.IntRange(0, 20), default=10, show_default=True,
              help="CPU priority of the header scanner and readers: niceness added (1-19), 20 = "
                   "Linux SCHED_IDLE, 0 = unchanged. Keeps the engine's cores for inference.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no summary.")
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
def score(root: Path, output: Path, model: Path | None, backend: str, device: str, tta: str, features: bool,
          batch_size: int,
          workers: int | None, fmt: str, resume: bool, include: tuple[str, ...], exclude: tuple[str, ...],
          min_score: float | None, report: Path | None, hide_paths: bool, timeout_s: float,
          log_every: float, header_cache: str, reader_nice: int, quiet: bool, verbose: int) -> None:
    """Score every study under ROOT into one report row per study (DESIGN §8 columns)."""
    from mediqa_cli.main import setup_logging

    setup_logging(-1 if quiet else verbose)
    from engines.privacy import install_log_scrubber

    install_log_scrubber()
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    rc = run_score(root=root, output=output, model=model, backend=backend, device=device, tta=tta,
                   features=features, batch_size=batch_size, workers=workers, fmt=fmt, resume=resume, include=include,
                   exclude=exclude, min_score=min_score, report=report, hide_paths=hide_paths,
                   timeout_s=timeout_s, log_every=log_every, quiet=quiet, verbose=verbose,
                   reader_nice=reader_nice, header_cache=header_cache)
    sys.exit(rc)


def _header_cache_path(value: str | None) -> str | None:
    """``--header-cache``: 'auto' → the user's cache folder, 'off'/'' → None, else the path."""
    if not value or value.lower() in ("off", "none", "no"):
        return None
    if value.lower() == "auto":
        from engines.io.header_cache import default_cache_path

        return str(default_cache_path())
    return str(Path(value).expanduser().resolve())


def run_score(*, root: Path, output: Path, model: Path | None, backend: str = "auto",
              device: str = "cpu", tta: str = "auto", features: bool = True, batch_size: int = 16,
              workers: int | None = None,
              fmt: str = "csv", resume: bool = False, include: tuple[str, ...] = (),
              exclude: tuple[str, ...] = (), min_score: float | None = None,
              report: Path | None = None, hide_paths: bool = False, timeout_s: float = 120.0,
              log_every: float = 30.0, quiet: bool = False, verbose: int = 0,
              reader_nice: int = 10, header_cache: str = "off") -> int:
    """The body of ``mediqa score``; returns the exit code."""
    from engines.artifact import bundled_model_path, load_card
    from engines.errors import MediqaError
    from engines.pipeline import ScoreConfig, file_sha256, score_studies
    from engines.privacy import study_key
    from engines.features import card_feature_head, features_suffix
    from engines.tta import effective_mode, tta_suffix
    from mediqa_cli.reports.writer import ReportLock, ReportLocked, ReportWriter

    model_path = model or bundled_model_path()
    if not model_path.is_file():
        if model is None:
            raise FatalError(
                f"no bundled model at {model_path}. Build one with `make demo` (trains the default "
                "model on the sample corpus) or pass --model PATH to a .safetensors/.onnx/.engine file.")
        raise FatalError(f"model file not found: {model_path}")
    output = output.resolve()
    root = root.resolve()
    n_workers = workers or max(1, (os.cpu_count() or 2) - 1)
    try:
        lock = ReportLock(output).__enter__()
    except ReportLocked as exc:
        logger.error("%s; exiting with 75 (try again later)", exc)
        return EXIT_LOCKED
    writer = None
    prog: _Progress | None = None
    try:
        key = study_key()
        model_hash = file_sha256(model_path)
        # --resume keeps a row only when the model and the TTA mode are those it was scored with
        # (auto: the policy is in the card, which the model hash covers; so is the feature head).
        card = load_card(model_path)
        writer = ReportWriter(output, fmt=fmt, hide_paths=hide_paths, resume=resume,
                              model_hash=model_hash + tta_suffix(effective_mode(tta, card))
                              + features_suffix(card, features), key=key)
        # The report files themselves are never studies.
        own = []
        try:
            rel_out = output.relative_to(root).as_posix()
            own = [rel_out, rel_out + ".*"]
        except ValueError:
            pass
        cfg = ScoreConfig(batch_size=batch_size, workers=n_workers, timeout_s=timeout_s,
                          include=tuple(include), exclude=tuple(exclude) + tuple(own),
                          thumbnails=report is not None, hide_paths=hide_paths, privacy_key=key,
                          device=device, backend=backend, tta=tta, features=features, reader_nice=reader_nice,
                          header_cache=_header_cache_path(header_cache))
        reuse = (lambda ref: writer.previous(ref.rel_path, _fingerprint(ref, key))) if resume else None
        stats: dict[str, Any] = {"status": Counter(), "codes": Counter(), "by_mod": defaultdict(list),
                                 "scored": 0, "reused": 0, "low": 0}
        worst: list[tuple[float, int, dict]] = []
        thumbs: dict[str, Any] = {}
        thumb_heap: list[tuple[float, int, str]] = []
        prog = _Progress(root, quiet, log_every)
        head = card_feature_head(card, features)
        logger.info("scoring %s with %s (%s, TTA %s, feature head %s, %d workers, batch %d)",
                    "<root>" if hide_paths else root, model_path.name, backend, tta,
                    head.describe() if head is not None else ("off" if card.feature_head else "none"),
                    n_workers, batch_size)
        for i, rec in enumerate(score_studies(root, model_path, cfg, reuse=reuse, model_hash=model_hash)):
            if min_score is not None and rec.score is not None and rec.score < min_score \
                    and "low_score" not in rec.flags:
                rec.flags.append("low_score")
            writer.write(rec)
            prog.update(rec)
            stats["status"][rec.status] += 1
            stats["reused" if rec.reused else "scored"] += 1
            if rec.status == "error":
                stats["codes"][rec.error_code] += 1
                if not quiet:
                    logger.warning("study %s: %s (%s)", rec.study_id, rec.error_code, rec.error)
            if rec.score is not None:
                stats["by_mod"][rec.modality].append(rec.score)
                if min_score is not None and rec.score < min_score:
                    stats["low"] += 1
                row = {"study_id": rec.study_id, "modality": rec.modality, "kind": rec.kind,
                       "path": rec.path}
                item = (-rec.score, i, row)
                if len(worst) < N_WORST:
                    heapq.heappush(worst, item)
                elif item > worst[0]:
                    heapq.heapreplace(worst, item)
                if rec.thumbnails:
                    titem = (-rec.score, i, rec.study_id)
                    if len(thumb_heap) < N_THUMB_STUDIES:
                        heapq.heappush(thumb_heap, titem)
                        thumbs[rec.study_id] = rec.thumbnails
                    elif titem > thumb_heap[0]:
                        _, _, old = heapq.heapreplace(thumb_heap, titem)
                        thumbs.pop(old, None)
                        thumbs[rec.study_id] = rec.thumbnails
        writer.commit()
        prog.close()
        prog = None
        if report is not None:
            from mediqa_cli.reports.html import write_html_report

            write_html_report([output], report, thumbnails=thumbs, hide_paths=hide_paths)
            logger.info("HTML report written: %s", report.name if hide_paths else report)
        if not quiet:
            _summary(stats, worst, hide_paths, min_score, output)
        return EXIT_SOME_FAILED if stats["status"].get("error") else EXIT_OK
    except MediqaError as exc:
        if writer is not None:
            writer.abort()
        raise FatalError(f"{exc.code}: {exc.message}") from None
    except (OSError, ValueError) as exc:
        if writer is not None:
            writer.abort()
        raise FatalError(f"{type(exc).__name__}: {exc}") from None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if prog is not None:
            prog.close()
        lock.__exit__(None, None, None)


def _fingerprint(ref: Any, key: bytes) -> str:
    from engines.pipeline import study_fingerprint

    return study_fingerprint(ref, key)
