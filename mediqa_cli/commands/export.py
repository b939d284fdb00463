"""``mediqa export``: a checkpoint → ONNX graphs, optional CPU int8, optional TensorRT engines.

Every artifact is checked against the PyTorch model on real preprocessed images before it is
reported (fp32 ONNX ≤ 1e-4 on scores; int8 SRCC ≥ 0.99, else refused; engines by precision).
Exit codes: 0 everything written and verified; 1 an artifact was refused (int8 ranking too
different; the numbers are printed); 2 usage / missing runtime / parity failure.
"""

from __future__ import annotations

from pathlib import Path

import click


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.command("export")
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: next to MODEL, '<name>-export').")
@click.option("--onnx/--no-onnx", default=True, show_default=True, help="Write the ONNX graphs.")
@click.option("--trt", is_flag=True, help="Build TensorRT engines (needs an NVIDIA GPU and mediqa[trt]).")
@click.option("--int8", is_flag=True, help="CPU int8 ONNX (accepted only if score SRCC vs fp32 ≥ 0.99).")
@click.option("--precision", type=click.Choice(["fp16", "bf16", "fp32", "int8"]), default="fp16",
              show_default=True, help="TensorRT engine precision.")
@click.option("--batch", "batch", default="1:8:32", show_default=True, metavar="MIN:OPT:MAX",
              help="TensorRT optimisation profile on the batch axis.")
@click.option("--workspace", type=float, default=4.0, show_default=True, metavar="GB",
              help="TensorRT builder workspace limit.")
@click.option("--opset", type=click.IntRange(min=17), default=18, show_default=True, help="ONNX opset.")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto",
              show_default=True, help="torch ONNX exporter (auto = the measured faster one, dynamo).")
@click.option("--samples", "n_samples", type=click.IntRange(min=4), default=None,
              help="Number of real validation images for the parity checks (default: all 70).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep built engines here, keyed by (ONNX sha256, TensorRT, GPU, precision, profile).")
def export(model: Path | None, out_dir: Path | None, onnx: bool, trt: bool, int8: bool, precision: str,
           batch: str, workspace: float, opset: int, exporter: str, n_samples: int | None,
           cache_dir: Path | None) -> None:
    """Export MODEL (.safetensors; default: the bundled model) and verify every artifact."""
    from engines.backends.engine_header import parse_batch_profile
    from engines.errors import MediqaError
    from engines.artifact import bundled_model_path
    from export.pipeline import export_model

    if model is None:
        model = bundled_model_path()
        if not model.is_file():
            raise click.UsageError(f"no MODEL given and the bundled model {model} is not installed")
    if not model.is_file():
        raise click.UsageError(f"model file not found: {model}")
    if not (onnx or trt or int8):
        raise click.UsageError("nothing to do: --no-onnx without --trt or --int8")
    try:
        profile = parse_batch_profile(batch)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--batch") from None
    out = out_dir or model.with_name(model.stem + "-export")
    dynamo = {"auto": None, "dynamo": True, "torchscript": False}[exporter]
    try:
        report = export_model(model, out, onnx=onnx, trt=trt, int8=int8, precision=precision, batch=profile,
                              workspace_gb=workspace, opset=opset, dynamo=dynamo, n_samples=n_samples,
                              cache_dir=cache_dir)
    except MediqaError as exc:
        err = click.ClickException(f"[{exc.code}] {exc.message}")
        err.exit_code = 2
        raise err from None
    click.echo(f"exported {model} → {out}")
    for a in report.artifacts:
        where = a.path.name if a.path is not None else "(not written)"
        click.echo(f"  {a.kind:<24} {where:<34} {_size(a.size_bytes):>9}  {a.seconds:7.1f} s  "
                   f"{a.parity}{'  ' + a.note if a.note else ''}")
    for r in report.parity:
        click.echo(f"  parity: {r.summary()}")
    if report.refused:
        for msg in report.refused:
            click.echo(f"  refused: {msg}", err=True)
        click.get_current_context().exit(1)
