"""PyTorch → ONNX for the three MedIQA graphs, with the model card in the file's metadata.

Graphs (tensor names from ``engines.names``; the batch axis is dynamic, everything else static):

- ``"2d"``:         images (N, 3, S, S) float32, prompt (N, P) float32 → score (N,), slice_logit (N,)
- ``"3d"``:         volumes (N, K, 3, S, S), prompt (N, P) → score (N,), slice_scores (N, K), slice_weights (N, K)
- ``"classifier"``: images (N, 3, S, S) → modality (N, M), region (N, R), type (N, T) logits

Exporter choice: both torch exporters are supported. ``dynamo=True`` (torch.export + onnxscript)
is the default because its graph ran faster in onnxruntime on our CPU (see the README's export
section for the measurement, made with ``benchmarks/bench_engines.py --exporters``); the legacy
TorchScript exporter (``dynamo=False``) stays available as a fallback and is used automatically
when the dynamo export raises.

After export the model is checked with ``onnx.checker``, optionally simplified (onnxslim or
onnxsim, only when installed — never installed at run time), and the card is written into
``metadata_props["mediqa_card"]`` (plus ``mediqa_graph``, the graph kind).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines import names

log = logging.getLogger(__name__)
# onnx_ir (dynamo exporter) logs one INFO line per deduplicated initializer: thousands per export.
logging.getLogger("onnx_ir").setLevel(logging.WARNING)

DEFAULT_OPSET = 18
MIN_OPSET = 17
CARD_KEY = "mediqa_card"
GRAPH_KEY = "mediqa_graph"
GRAPHS = ("2d", "3d", "classifier")
DEFAULT_DYNAMO = True


@dataclass(frozen=True)
class OnnxExportResult:
    path: Path
    graph: str
    exporter: str          # "dynamo" | "torchscript"
    opset: int
    simplified: str | None  # "onnxslim" | "onnxsim" | None
    seconds: float
    size_bytes: int


def _io_names(graph: str) -> tuple[list[str], list[str]]:
    if graph == "2d":
        return [names.IMAGES, names.PROMPT], [names.SCORE, names.SLICE_LOGIT]
    if graph == "3d":
        return [names.VOLUMES, names.PROMPT], [names.SCORE, names.SLICE_SCORES, names.SLICE_WEIGHTS]
    if graph == "classifier":
        return [names.IMAGES], list(names.CLASSIFIER_OUTPUTS)
    raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")


def _wrap(module: Any, graph: str) -> Any:
    """A module whose ``forward`` arguments are named like the ONNX inputs."""
    import torch

    class Graph2D(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, images: Any, prompt: Any) -> Any:
            return self.m(images, prompt)

    class Graph3D(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, volumes: Any, prompt: Any) -> Any:
            return self.m.forward_volume(volumes, prompt)

    class GraphClassifier(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, images: Any) -> Any:
            return tuple(self.m(images))

    cls = {"2d": Graph2D, "3d": Graph3D, "classifier": GraphClassifier}[graph]
    return cls(module).eval()


def example_inputs(graph: str, *, image_size: int, prompt_dim: int, n_slices: int = 7,
                   batch: int = 2) -> tuple[Any, ...]:
    """Deterministic example tensors for tracing (values do not matter, shapes do)."""
    import torch

    g = torch.Generator().manual_seed(0)
    img = torch.randn(batch, 3, image_size, image_size, generator=g)
    if graph == "classifier":
        return (img,)
    if prompt_dim < 1:
        raise ValueError(f"the {graph} graph needs prompt_dim ≥ 1, got {prompt_dim}")
    prompt = torch.zeros(batch, prompt_dim)
    prompt[:, 0] = 1.0
    if graph == "2d":
        return img, prompt
    if graph == "3d":
        return torch.randn(batch, n_slices, 3, image_size, image_size, generator=g), prompt
    raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")


def _export_dynamo(wrapped: Any, args: tuple, path: Path, inputs: list[str], outputs: list[str],
                   opset: int) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=65536)
    dyn = {name: {0: batch} for name in inputs}
    prog = torch.onnx.export(wrapped, args, None, dynamo=True, input_names=inputs, output_names=outputs,
                             dynamic_shapes=dyn, opset_version=opset, external_data=False,
                             optimize=True, verbose=False)
    prog.save(str(path))


def _export_torchscript(wrapped: Any, args: tuple, path: Path, inputs: list[str], outputs: list[str],
                        opset: int) -> None:
    import torch

    axes = {name: {0: "batch"} for name in inputs + outputs}
    torch.onnx.export(wrapped, args, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                      dynamic_axes=axes, opset_version=opset, do_constant_folding=True)


def _simplify(model: Any) -> tuple[Any, str | None]:
    try:
        import onnxslim  # type: ignore[import-not-found]

        return onnxslim.slim(model), "onnxslim"
    except ImportError:
        pass
    try:
        from onnxsim import simplify  # type: ignore[import-not-found]

        simplified, ok = simplify(model)
        if ok:
            return simplified, "onnxsim"
        log.warning("onnxsim could not validate its simplified graph; keeping the original")
    except ImportError:
        log.debug("neither onnxslim nor onnxsim installed; graph not simplified")
    return model, None


def set_card_metadata(model: Any, card_json: str, graph: str) -> None:
    """Write (replace) ``mediqa_card`` and ``mediqa_graph`` in an onnx ModelProto's metadata_props."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in (CARD_KEY, GRAPH_KEY)]
    del model.metadata_props[:]
    for k, v in keep + [(CARD_KEY, card_json), (GRAPH_KEY, graph)]:
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


def torch_to_onnx(module: Any, path: str | Path, *, graph: str, card: Any, image_size: int,
                  prompt_dim: int = 0, n_slices: int = 7, opset: int = DEFAULT_OPSET,
                  dynamo: bool | None = None, simplify: bool = True) -> OnnxExportResult:
    """Export one graph of ``module`` (a MedIQANet / EnsembleNet, or a PromptClassifier for
    ``graph="classifier"``) to ``path``; returns what was done. The module is put in eval mode.

    ``card``: a ``ModelCard`` (or anything with ``to_json()``), stored in the metadata.
    ``dynamo``: None → the measured default (``DEFAULT_DYNAMO``), falling back to the
    TorchScript exporter if the dynamo export fails.
    """
    import onnx
    import torch

    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs, outputs = _io_names(graph)
    module.eval()
    wrapped = _wrap(module, graph)
    args = example_inputs(graph, image_size=image_size, prompt_dim=prompt_dim, n_slices=n_slices)
    use_dynamo = DEFAULT_DYNAMO if dynamo is None else bool(dynamo)
    t0 = time.perf_counter()
    exporter = "dynamo" if use_dynamo else "torchscript"
    with torch.no_grad():
        if use_dynamo:
            try:
                _export_dynamo(wrapped, args, path, inputs, outputs, opset)
            except Exception as exc:
                if dynamo is not None:  # explicitly asked for: do not hide the failure
                    raise
                log.warning("dynamo ONNX export of the %s graph failed (%s: %s); using the TorchScript exporter",
                            graph, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                exporter = "torchscript"
                _export_torchscript(wrapped, args, path, inputs, outputs, opset)
        else:
            _export_torchscript(wrapped, args, path, inputs, outputs, opset)
    model = onnx.load(str(path))
    simplified = None
    if simplify:
        model, simplified = _simplify(model)
    card_json = card.to_json() if hasattr(card, "to_json") else str(card)
    set_card_metadata(model, card_json, graph)
    model.producer_name = "mediqa"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    seconds = time.perf_counter() - t0
    got_opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=opset)
    log.info("exported %s graph → %s (%s exporter, opset %d, %.1f s)", graph, path, exporter, got_opset, seconds)
    return OnnxExportResult(path, graph, exporter, int(got_opset), simplified, seconds, path.stat().st_size)
