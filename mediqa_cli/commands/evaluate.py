"""``mediqa evaluate [MODEL] DATA``: SRCC / PLCC / KROCC / RMSE of a model on labelled data.

MODEL defaults to the bundled ``engines/weights/default.safetensors``. Prints a rich table
(overall, per prompt group, per degradation type; classifier accuracy when the artifact has a
classifier) and the worst-scored studies; ``--json`` writes the full report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click


def _f(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


@click.command("evaluate")
@click.argument("args", nargs=-1, required=True, metavar="[MODEL] DATA")
@click.option("--split", type=click.Choice(["all", "train", "val", "test"]), default="all", show_default=True,
              help="Which split of DATA (the manifest's split column, else the grouped hash split).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--workers", type=int, default=0, show_default=True, help="Processes decoding studies.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the full report here.")
@click.option("--worst", type=int, default=10, show_default=True, help="List the N studies with the lowest predicted quality.")
@click.option("--tta", type=click.Choice(["none", "flip", "d4", "auto"]), default="auto", show_default=True,
              help="Test-time augmentation of the score, as in `mediqa score --tta`: flip = mean with "
                   "the mirror image (2x inference), d4 = mean over the 8 flips / quarter turns (8x), "
                   "auto = the model card's per-modality policy.")
@click.option("--features/--no-features", default=True, show_default=True,
              help="Apply the model card's feature head (classical statistics blended per modality), "
                   "as `mediqa score`.")
@click.option("--progress/--no-progress", default=True)
def evaluate(args: tuple[str, ...], split: str, device: str, batch_size: int, workers: int,
             json_out: str | None, worst: int, tta: str, features: bool, progress: bool) -> None:
    """Evaluate MODEL (default: the bundled model) on DATA: a manifest CSV, a folder holding
    manifest.csv, or an LDCTIQA2023 folder (images + JSON of scores)."""
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    from engines.errors import MediqaError  # noqa: PLC0415

    if len(args) == 1:
        from engines.artifact import bundled_model_path  # noqa: PLC0415

        model, data = bundled_model_path(), Path(args[0])
        if not model.is_file():
            raise click.UsageError("no MODEL given and no bundled model at engines/weights/default.safetensors; "
                                   "pass a model file first: mediqa evaluate MODEL DATA")
    elif len(args) == 2:
        model, data = Path(args[0]), Path(args[1])
    else:
        raise click.UsageError("expected [MODEL] DATA")
    for p in (model, data):
        if not p.exists():
            raise click.UsageError(f"{p}: no such file or folder")
    try:
        from training.evaluate import evaluate_model  # noqa: PLC0415
        from training.tasks import jsonable  # noqa: PLC0415

        rep = evaluate_model(model, data, split=split, device=device, batch_size=batch_size,
                             workers=workers, progress=progress, tta=tta, features=features)
    except MediqaError as exc:
        raise click.ClickException(f"[{exc.code}] {exc.message}") from None

    console = Console()
    from engines.tta import TTAPolicy  # noqa: PLC0415

    policy = TTAPolicy.from_dict(rep["tta_policy"])   # the TTA actually applied
    shown = "" if policy.is_plain else f", TTA {tta}" + (f": {policy.describe()}" if tta == "auto" else "")
    if rep.get("feature_head") and any(a > 0 for a in rep["feature_head"].values()):
        from engines.features import describe_blends  # noqa: PLC0415

        shown += ", features " + describe_blends(rep["feature_head"])
    table = Table(title=f"{model.name} on {data} ({split}{shown})")
    for col in ("group", "value", "n", "SRCC", "PLCC", "KROCC", "RMSE"):
        table.add_column(col, justify="left" if col in ("group", "value") else "right")

    def row(group: str, value: str, m: dict[str, Any]) -> None:
        table.add_row(group, value, str(m.get("n", "")), *[_f(m.get(k)) for k in ("srcc", "plcc", "krocc", "rmse")])

    row("overall", "", rep["overall"])
    for group, vals in rep["groups"].items():
        for value, m in vals.items():
            row(group, value, m)
    console.print(table)
    if "classifier" in rep:
        c = rep["classifier"]
        console.print("prompt classifier accuracy (vs manifest labels): " + ", ".join(
            f"{g} {_f(c.get('acc_' + g))}" for g in ("modality", "region", "type")))
    ds = rep["dataset"]
    where = "" if split == "all" else f" of the {split} split ({ds['found']} in {data})"
    console.print(f"{ds['evaluated']} of {ds['in_split']} studies{where} evaluated; {ds['skipped']} skipped "
                  f"{ds['skipped_by_reason'] or ''}; scores in {rep['label_scale'].get('name', '')} units")
    if worst > 0:
        t2 = Table(title=f"lowest predicted quality (worst {worst})")
        for col in ("path", "prediction", "target", "modality", "degradation"):
            t2.add_column(col)
        for p in sorted(rep["predictions"], key=lambda r: r["prediction"])[:worst]:
            t2.add_row(p["path"], _f(p["prediction"]), _f(p["target"]), str(p.get("modality") or ""),
                       str(p.get("degradation") or ""))
        console.print(t2)
    if json_out:
        Path(json_out).write_text(json.dumps(jsonable(rep), indent=1), encoding="utf-8")
        console.print(f"wrote {json_out}")

