"""``mediqa info``: versions, the DICOM transfer syntaxes this install can decode, and runtimes.

Versions come from the installed distributions' metadata (``importlib.metadata``), so listing
them imports nothing heavy; torch is imported only with ``--torch`` (to report CUDA).
Decodable transfer syntaxes are asked of pydicom itself: for every transfer syntax pydicom
knows, ``pydicom.pixels.get_decoder(uid)`` gives the decoder and its ``available_plugins``
(installed back-ends: pydicom's own, pylibjpeg, gdcm, pillow, pyjpegls) and
``missing_dependencies``. A ``decoder_missing`` error in a scan or score report means the
file's transfer syntax shows "no" here.
Runtimes: onnxruntime's execution providers (onnxruntime is imported; it does not pull in
torch) and whether the ``tensorrt`` package can be found (not imported).
``--model PATH`` (``--model default``: the bundled model) adds the model card of a
``.safetensors`` / ``.onnx`` / ``.engine`` artifact: what it is, the recipe that made it (name and
sha256), the corpus, and the validation / test metrics the training recorded (no torch import).
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import json
import platform
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

DISTRIBUTIONS: tuple[str, ...] = (
    "mediqa", "numpy", "scipy", "pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg",
    "pylibjpeg-rle", "python-gdcm", "pyjpegls", "nibabel", "pillow", "onnx", "onnxruntime",
    "onnxruntime-gpu", "torch", "torchvision", "timm", "safetensors", "tensorrt", "click", "rich",
)


def versions() -> dict[str, str | None]:
    """Installed version of each distribution in ``DISTRIBUTIONS`` (None when not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in DISTRIBUTIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def dicom_decoders() -> list[dict[str, Any]]:
    """One entry per transfer syntax pydicom knows: uid, name, decodable, plugins, missing."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    rows: list[dict[str, Any]] = []
    for uid in AllTransferSyntaxes:
        entry: dict[str, Any] = {"uid": str(uid), "name": uid.name, "decodable": False,
                                 "plugins": [], "missing": []}
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            entry["missing"] = ["no pixel-data decoder in pydicom for this transfer syntax"]
            rows.append(entry)
            continue
        plugins = list(getattr(decoder, "available_plugins", ()))
        entry["plugins"] = plugins
        entry["decodable"] = bool(getattr(decoder, "is_available", bool(plugins)))
        if not uid.is_compressed and entry["decodable"] and not plugins:
            entry["plugins"] = ["pydicom (native)"]
        missing = getattr(decoder, "missing_dependencies", [])
        entry["missing"] = list(missing) if not entry["decodable"] else []
        rows.append(entry)
    return rows


def runtimes(check_torch: bool = False) -> dict[str, Any]:
    """onnxruntime providers, tensorrt availability and (with ``check_torch``) torch / CUDA."""
    out: dict[str, Any] = {}
    try:
        import onnxruntime as ort

        out["onnxruntime_providers"] = list(ort.get_available_providers())
    except Exception as exc:  # noqa: BLE001 - optional runtime; report why
        out["onnxruntime_providers"] = None
        out["onnxruntime_error"] = type(exc).__name__
    out["tensorrt_importable"] = importlib.util.find_spec("tensorrt") is not None
    if check_torch:
        try:
            import torch

            out["torch_cuda"] = bool(torch.cuda.is_available())
            out["torch_devices"] = ([torch.cuda.get_device_name(i)
                                     for i in range(torch.cuda.device_count())]
                                    if out["torch_cuda"] else [])
            out["torch_threads"] = torch.get_num_threads()
        except Exception as exc:  # noqa: BLE001
            out["torch_error"] = type(exc).__name__
    return out


def model_summary(path: str) -> dict[str, Any]:
    """File facts and the model card of ``path`` ("default": the bundled model), as a dict."""
    from pathlib import Path

    from engines.artifact import bundled_model_path, load_card
    from engines.pipeline import file_sha256
    from engines.tta import TTAPolicy

    p = bundled_model_path() if path == "default" else Path(path)
    card = load_card(p)
    m, tr = card.metrics or {}, card.training or {}
    test = (m.get("test") or {})
    overall = test.get("overall", test if "srcc" in test else {})
    return {
        "path": str(p), "size_bytes": p.stat().st_size, "sha256": file_sha256(p), "task": card.task,
        "preset": card.preset, "classifier_preset": card.classifier_preset, "ensemble_size": card.ensemble_size,
        "recipe": tr.get("recipe"), "recipe_sha256": tr.get("recipe_sha256"),
        # a continuation recipe's base artifact (sha256, git reference, the recipe that made it)
        "base": {k: (tr.get("base") or {}).get(k) for k in ("sha256", "git", "recipe")} if tr.get("base") else None,
        # a soup recipe's members, averaged uniformly (sha256, git reference, the recipe that made each)
        "soup": [{k: mem.get(k) for k in ("sha256", "git", "recipe")} for mem in tr["soup"]] if tr.get("soup") else None,
        "corpus": (card.data_summary or {}).get("corpus"),
        # CT inputs resampled to this pixel size (mm) before the network; None: plain resize
        "ct_pixel_mm": (card.preprocess or {}).get("ct_pixel_mm"),
        # every input fitted with one scale for both axes (short side padded); False: stretched
        "keep_aspect": bool((card.preprocess or {}).get("keep_aspect", False)),
        # what `--tta auto` applies per prompt modality (chosen by `mediqa train tta-policy`)
        "tta_auto": TTAPolicy.from_dict(card.tta_policy).describe(),
        "tta_auto_chosen_on": ({k: card.tta_policy.get("selection", {}).get(k) for k in ("data", "split")}
                               if card.tta_policy else None),
        # modes set by hand afterwards (`mediqa train tta-set`): modality, from → to, why
        "tta_auto_overrides": ([f"{o['modality']} {o['from']} -> {o['to']} ({o['at']}): {o['reason']}"
                                for o in card.tta_policy.get("selection", {}).get("overrides", [])]
                               if card.tta_policy else None) or None,
        # classical statistics blended into the score per modality (`mediqa train feature-head`)
        "feature_blend": ({mod: h.get("blend") for mod, h in (card.feature_head.get("heads") or {}).items()}
                          if card.feature_head else None),
        # the statistics its ridges read (engines.features.VERSION_FEATURES)
        "feature_statistics": ({k: card.feature_head.get(k) for k in ("version", "features")}
                               if card.feature_head else None),
        "val": {k: (m.get("val") or {}).get(k) for k in ("n", "srcc", "plcc")},
        "test": {k: overall.get(k) for k in ("n", "srcc", "plcc", "krocc", "rmse")},
        "test_srcc_by_prompt_modality": {k: v.get("srcc") for k, v in
                             ((test.get("groups") or {}).get("modality") or {}).items()},
        "test_classifier": m.get("test_classifier"),
        "card": card.to_dict(),
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items() if x is not None)
    if isinstance(v, list):   # e.g. a soup's members: one per line
        return "\n".join(_fmt(x) for x in v)
    return "-" if v is None else str(v)


@click.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--torch", "check_torch", is_flag=True,
              help="Also import torch to report CUDA devices (slow; skipped by default).")
@click.option("--all-syntaxes", is_flag=True,
              help="List transfer syntaxes pydicom has no decoder for (video, JPIP, …) too.")
@click.option("--model", "model", default=None, metavar="PATH|default",
              help="Also show this model's card (default: the bundled model).")
def info(as_json: bool, check_torch: bool, all_syntaxes: bool, model: str | None) -> None:
    """Versions, available DICOM decoders and runtimes (and a model's card with --model)."""
    from engines.errors import MediqaError

    data = {"versions": versions(), "platform": platform.platform(),
            "executable": sys.executable, "dicom_decoders": dicom_decoders(),
            "runtimes": runtimes(check_torch)}
    if model is not None:
        try:
            data["model"] = model_summary(model)
        except (MediqaError, OSError) as exc:
            raise click.ClickException(f"cannot read the model card of {model}: {exc}") from None
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    console = Console()
    vt = Table(title="versions", header_style="bold")
    vt.add_column("package")
    vt.add_column("version")
    for name, ver in data["versions"].items():
        vt.add_row(name, Text(ver or "not installed", style=None if ver else "dim"))
    console.print(vt)

    dt = Table(title="DICOM transfer syntaxes", header_style="bold")
    for col in ("transfer syntax", "uid", "decodable", "plugins / missing"):
        dt.add_column(col, overflow="fold")
    for d in data["dicom_decoders"]:
        if not all_syntaxes and not d["plugins"] and not d["decodable"] and \
                d["missing"][:1] == ["no pixel-data decoder in pydicom for this transfer syntax"]:
            continue
        detail = ", ".join(d["plugins"]) if d["decodable"] else "; ".join(d["missing"])
        dt.add_row(d["name"], d["uid"], "yes" if d["decodable"] else Text("no", style="red"),
                   Text(detail))
    console.print(dt)

    rt = Table(title="runtimes", header_style="bold")
    rt.add_column("runtime")
    rt.add_column("status")
    for k, v in data["runtimes"].items():
        rt.add_row(k, Text(", ".join(v) if isinstance(v, list) else str(v)))
    console.print(rt)
    if "model" in data:
        mt = Table(title="model card", header_style="bold")
        mt.add_column("field")
        mt.add_column("value", overflow="fold")
        for k, v in data["model"].items():
            if k != "card":
                mt.add_row(k, Text(_fmt(v)))
        console.print(mt)
