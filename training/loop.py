"""One training loop for the three tasks (pretrain, fine-tune, prompt classifier).

Plain functions in the timm manner: :func:`train_one_epoch`, :func:`validate`, and :func:`fit`
which runs the epochs with everything around them:

- Adam (paper: lr 1e-5), linear warm-up then cosine decay per optimizer step (:func:`lr_factor`);
- mixed precision: bf16 autocast on CPU; on CUDA bf16 where supported, else fp16 with a
  ``GradScaler``; losses and metrics are computed in float32;
- gradient accumulation, optional global-norm clipping, seeded RNGs;
- a checkpoint after every epoch (``last.safetensors``: the model as an artifact with its
  card) plus the training state (``last.state.safetensors``: optimizer moments and RNG states;
  ``last.state.json``: epoch, step, scheduler, best metric, early-stopping counter). Resuming
  reads those; nothing is ever pickled;
- the best epoch by the task's validation metric (IQA: SRCC; classifier: mean accuracy) saved
  as ``best.safetensors``; early stopping after ``patience`` epochs without improvement;
- a rich progress bar with the running loss and the last validation metrics, and one JSON
  line per epoch in ``train_log.jsonl`` (loss, lr, metrics, seconds, images/s).

Tasks adapt the loop to a model (:class:`IQATask`, :class:`ClassifierTask`): they compute the
loss of a batch and the per-study predictions that validation turns into metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from engines.errors import ConfigError, UnsupportedArtifact
from engines.prompts import GROUPS
from training.config import LOSSES, TrainConfig
from training.data.torchdata import IGNORE

logger = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"
LAST, BEST = "last.safetensors", "best.safetensors"
STATE_TENSORS, STATE_JSON = "last.state.safetensors", "last.state.json"


# --------------------------------------------------------------------------------------------
# Devices, precision, seeds

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from engines.errors import BackendUnavailable  # noqa: PLC0415

        raise BackendUnavailable("--device cuda asked for, but torch sees no CUDA device")
    return dev


def autocast_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU; bf16 (or fp16 on older GPUs) on CUDA; a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype(device))


def lr_factor(step: int, total: int, warmup: int, start: float = 0.01, floor: float = 0.01) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based) of ``total``.

    Linear from ``start`` to 1 over ``warmup`` steps, then cosine from 1 to ``floor``.
    """
    if warmup > 0 and step < warmup:
        return start + (1.0 - start) * step / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def fit_epochs_to_budget(epochs_done: int, run_epochs: int, elapsed_s: float, budget_s: float,
                         planned: int) -> int:
    """Epochs the lr schedule should span so that it ends inside the time budget.

    Called once, after the first epoch of a run: ``epochs_done`` counts every finished epoch
    (earlier runs of a resumed training included), ``run_epochs`` those of this run, which took
    ``elapsed_s`` seconds, validation included; the budget counts from this run's start. Without
    it a budget that stops training early leaves the cosine schedule half-way, at a high lr."""
    if run_epochs <= 0 or elapsed_s <= 0:
        return planned
    per_epoch = elapsed_s / run_epochs
    fits = epochs_done + int(max(0.0, budget_s - elapsed_s) // per_epoch)
    return max(epochs_done, min(planned, fits))


# --------------------------------------------------------------------------------------------
# Tasks

def _safe_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """SRCC / PLCC / KROCC / RMSE; NaN where undefined (fewer than 2 items, constant side)."""
    from engines.metrics import evaluate_all  # noqa: PLC0415

    if len(pred) < 2:
        rm = float(np.sqrt(np.mean((pred - target) ** 2))) if len(pred) else float("nan")
        return {"n": int(len(pred)), "srcc": float("nan"), "plcc": float("nan"),
                "krocc": float("nan"), "rmse": rm}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return evaluate_all(pred, target)


def plcc_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 − Pearson correlation of a batch (0 when perfectly linear, 1 for constant predictions,
    2 when reversed). Unlike MSE it gains nothing from predicting the mean, the collapse seen in
    an earlier bundled model (score std 0.019 against a target std of 0.27). ``eps`` inside the square
    root keeps the gradient finite for constant predictions. Batches with < 3 items or constant
    targets give 0 (no ranking information)."""
    if pred.numel() < 3:
        return pred.sum() * 0.0
    p = pred - pred.mean()
    t = target - target.mean()
    tt = (t * t).sum()
    if float(tt.detach()) < 1e-12:
        return pred.sum() * 0.0
    return 1.0 - (p * t).sum() / (torch.sqrt((p * p).sum() + eps) * torch.sqrt(tt))


def grouped_plcc_loss(pred: torch.Tensor, target: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Mean over the groups of a batch (e.g. prompt modalities) of ``plcc_loss`` within the group.
    Groups with < 3 items or constant targets carry no ranking information and are left out; a
    batch without any informative group falls back to the PLCC over the whole batch. The SRCC the
    project is judged on is within each modality; a batch-wide PLCC is also satisfied by offsets
    between modalities, this one is not, while the MSE keeps the modalities on one scale."""
    terms = []
    for g in torch.unique(group):
        rows = group == g
        if int(rows.sum()) >= 3 and float(target[rows].detach().std()) > 1e-6:
            terms.append(plcc_loss(pred[rows], target[rows]))
    return torch.stack(terms).mean() if terms else plcc_loss(pred, target)


def pair_difference_loss(pred: torch.Tensor, target: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Mean over the batch's pairs of studies that show one content (the same ``content`` id: an
    original and its siblings) of ``((pred_i − pred_j) − (target_i − target_j))²``. A score offset
    that a content puts on every one of its studies cancels; what is fitted is how far apart two
    degradations of the same anatomy are. Zero (with a gradient path) when the batch has no pair."""
    same = content[:, None] == content[None, :]
    pairs = torch.triu(same, diagonal=1)
    if not bool(pairs.any()):
        return pred.sum() * 0.0
    dp = pred[:, None] - pred[None, :]
    dt = target[:, None] - target[None, :]
    return ((dp - dt)[pairs] ** 2).mean()


class IQATask:
    """Score regression (pretraining targets or quality scores in [0, 1]).

    ``loss``: "mse" (the paper's), "mse+plcc": MSE + (1 − PLCC) over the batch, or
    "mse+plcc-modality": MSE + ``grouped_plcc_loss`` with the items grouped by the modality of
    their prompt (``modality_columns``: ``PromptVocab.columns("modality")``), or
    "mse+plcc+plcc-modality": MSE + both PLCC terms; "mse+pairdiff" / "mse+plcc+pairdiff": MSE
    (+ batch PLCC) + ``pair_difference_loss`` over the batch's siblings (the batch's ``content``).
    """

    name = "iqa"
    primary = "srcc"
    module_name = "iqa"

    def __init__(self, loss: str = "mse", modality_columns: slice | None = None) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if loss.endswith("plcc-modality") and modality_columns is None:
            raise ValueError(f"loss {loss} needs the prompt's modality columns (modality_columns)")
        self.loss_name = loss
        self.modality_columns = modality_columns

    def outputs(self, model: nn.Module, batch: dict[str, Any], device: torch.device,
                amp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(pred (n,) float32, target (n,), dataset index (n,), images seen) for 2D then 3D."""
        preds, targets, index, n_img = [], [], [], 0
        with autocast(device, amp):
            if batch["2d"] is not None:
                b = batch["2d"]
                score, _ = model(b["images"].to(device, non_blocking=True), b["prompt"].to(device))
                preds.append(score.float())
                targets.append(b["target"].to(device))
                index.append(b["index"])
                n_img += b["images"].shape[0]
            if batch["3d"] is not None:
                b = batch["3d"]
                score, _, _ = model.forward_volume(b["volumes"].to(device, non_blocking=True),
                                                   b["prompt"].to(device))
                preds.append(score.float())
                targets.append(b["target"].to(device))
                index.append(b["index"])
                n_img += b["volumes"].shape[0] * b["volumes"].shape[1]
        return torch.cat(preds), torch.cat(targets), torch.cat(index), n_img

    def loss(self, model: nn.Module, batch: dict[str, Any], device: torch.device,
             amp: bool) -> tuple[torch.Tensor, int]:
        # MSE over the union of the 2D and 3D items = the two groups' MSEs weighted by count.
        pred, target, _, n_img = self.outputs(model, batch, device, amp)
        loss = F.mse_loss(pred, target)
        if self.loss_name in ("mse+plcc", "mse+plcc+plcc-modality", "mse+plcc+pairdiff"):
            loss = loss + plcc_loss(pred, target)
        if self.loss_name.endswith("plcc-modality"):
            # the batch's prompts in the order of ``outputs``: 2D items, then 3D
            prompt = torch.cat([b["prompt"] for b in (batch["2d"], batch["3d"]) if b is not None])
            group = prompt[:, self.modality_columns].argmax(dim=1).to(pred.device)
            loss = loss + grouped_plcc_loss(pred, target, group)
        if self.loss_name.endswith("pairdiff"):
            # the batch's content ids in the order of ``outputs``: 2D items, then 3D
            content = torch.cat([b["content"] for b in (batch["2d"], batch["3d"]) if b is not None])
            loss = loss + pair_difference_loss(pred, target, content.to(pred.device))
        return loss, n_img

    def predict(self, model: nn.Module, batch: dict[str, Any], device: torch.device,
                amp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pred, target, index, _ = self.outputs(model, batch, device, amp)
        return pred.cpu().numpy(), target.cpu().numpy(), index.numpy()

    def metrics(self, pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
        out = _safe_metrics(pred, target)
        out["mse"] = float(np.mean((pred - target) ** 2)) if len(pred) else float("nan")
        return out


class ClassifierTask:
    """Prompt classifier: cross-entropy per group (modality, region, type), summed; unknown
    labels are ignored. A 3D study trains on each of its K slices; validation averages the
    K slices' logits per study, as scoring does."""

    name = "classifier"
    primary = "accuracy"
    module_name = "classifier"
    groups = ("modality", "region", "type")

    def _flat(self, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, ys, owner = [], [], []
        if batch["2d"] is not None:
            b = batch["2d"]
            xs.append(b["images"])
            ys.append(b["labels"])
            owner.append(torch.arange(len(b["index"])))
        if batch["3d"] is not None:
            b = batch["3d"]
            m, k = b["volumes"].shape[:2]
            xs.append(b["volumes"].reshape(m * k, *b["volumes"].shape[2:]))
            ys.append(b["labels"].repeat_interleave(k, dim=0))
            off = 0 if batch["2d"] is None else len(batch["2d"]["index"])
            owner.append(off + torch.arange(m).repeat_interleave(k))
        return torch.cat(xs).to(device, non_blocking=True), torch.cat(ys).to(device), torch.cat(owner)

    def loss(self, model: nn.Module, batch: dict[str, Any], device: torch.device,
             amp: bool) -> tuple[torch.Tensor, int]:
        x, y, _ = self._flat(batch, device)
        with autocast(device, amp):
            logits = model(x)
        total = x.new_zeros((), dtype=torch.float32)
        for g, lg in enumerate(logits):
            if bool((y[:, g] != IGNORE).any()):
                total = total + F.cross_entropy(lg.float(), y[:, g], ignore_index=IGNORE)
        return total, x.shape[0]

    def predict(self, model: nn.Module, batch: dict[str, Any], device: torch.device,
                amp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, y, owner = self._flat(batch, device)
        with autocast(device, amp):
            logits = model(x)
        n = int(owner.max()) + 1
        preds = []
        for lg in logits:
            acc = torch.zeros(n, lg.shape[1], dtype=torch.float32)
            acc.index_add_(0, owner, lg.float().cpu())
            preds.append(acc.argmax(dim=1))
        labels = [b["labels"] for b in (batch["2d"], batch["3d"]) if b is not None]
        index = [b["index"] for b in (batch["2d"], batch["3d"]) if b is not None]
        return torch.stack(preds, dim=1).numpy(), torch.cat(labels).numpy(), torch.cat(index).numpy()

    def metrics(self, pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
        out: dict[str, float] = {"n": int(len(pred))}
        accs = []
        for g, name in enumerate(self.groups):
            known = target[:, g] != IGNORE if len(target) else np.zeros(0, bool)
            if known.any():
                out[f"acc_{name}"] = float((pred[known, g] == target[known, g]).mean())
                accs.append(out[f"acc_{name}"])
        out["accuracy"] = float(np.mean(accs)) if accs else float("nan")
        return out


# --------------------------------------------------------------------------------------------
# Epochs

@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def train_one_epoch(model: nn.Module, task: Any, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device, cfg: TrainConfig,
                    scaler: torch.amp.GradScaler | None = None,
                    on_step: Callable[[float], None] | None = None) -> EpochStats:
    """One pass over ``loader``; an optimizer step every ``cfg.grad_accum`` micro-batches (and
    at the end). Returns the mean loss per micro-batch, images seen and wall time."""
    model.train()
    t0 = time.perf_counter()
    total, n_batches, n_images = 0.0, 0, 0
    optimizer.zero_grad(set_to_none=True)
    n = len(loader)
    for i, batch in enumerate(loader):
        loss, n_img = task.loss(model, batch, device, cfg.amp)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at batch {i}; lower the lr or disable amp")
        scaled = loss / cfg.grad_accum
        if scaler is not None:
            scaler.scale(scaled).backward()
        else:
            scaled.backward()
        total += float(loss.detach())
        n_batches += 1
        n_images += n_img
        if (i + 1) % cfg.grad_accum == 0 or i + 1 == n:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        if on_step is not None:
            on_step(total / n_batches)
    return EpochStats(total / max(1, n_batches), n_images, time.perf_counter() - t0)


@torch.no_grad()
def predict_all(model: nn.Module, task: Any, loader: DataLoader, device: torch.device,
                amp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictions, targets and dataset indices over a whole loader (model in eval mode)."""
    model.eval()
    ps, ts, ix = [], [], []
    for batch in loader:
        p, t, i = task.predict(model, batch, device, amp)
        ps.append(p)
        ts.append(t)
        ix.append(i)
    if not ps:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate(ps), np.concatenate(ts), np.concatenate(ix)


def within_modality_srcc(pred: np.ndarray, target: np.ndarray, modality: Sequence[str | None]
                         ) -> dict[str, float]:
    """``{"srcc.<modality>": SRCC within it, "srcc_within": their mean}`` over the modalities with
    at least ``training.evaluate.MIN_GROUP`` studies (studies without a modality are left out);
    empty when there is none."""
    from training.evaluate import grouped_metrics  # noqa: PLC0415

    groups = grouped_metrics(pred, target, {"modality": list(modality)}).get("modality", {})
    out = {f"srcc.{m}": float(g["srcc"]) for m, g in groups.items() if g["srcc"] == g["srcc"]}
    if out:
        out["srcc_within"] = float(np.mean(list(out.values())))
    return out


def validate(model: nn.Module, task: Any, loader: DataLoader, device: torch.device,
             amp: bool) -> dict[str, float]:
    """The task's metrics on ``loader``; for score tasks over a dataset with prompt values also
    the within-modality SRCCs and their mean (``within_modality_srcc``)."""
    pred, target, index = predict_all(model, task, loader, device, amp)
    out = task.metrics(pred, target)
    items = getattr(loader.dataset, "items", None)
    if task.primary == "srcc" and items is not None and len(pred):
        out.update(within_modality_srcc(pred, target, [items[i].prompt_values.get("modality") for i in index]))
    return out


# --------------------------------------------------------------------------------------------
# Checkpoints and training state (safetensors + JSON, never pickle)

def save_train_state(out: Path, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                     info: dict[str, Any]) -> None:
    """Optimizer moments and RNG states → ``last.state.safetensors``; the rest → ``last.state.json``."""
    from safetensors.torch import save_file  # noqa: PLC0415

    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{name}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[name] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    meta = dict(info)
    meta.update({"param_groups": groups, "state_scalars": scalars,
                 "numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
                 "python_rng": _py_state_to_json(random.getstate()),
                 "scaler": scaler.state_dict() if scaler is not None else None})
    tmp = out / (STATE_TENSORS + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(out / STATE_TENSORS)
    tmpj = out / (STATE_JSON + ".tmp")
    tmpj.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    tmpj.replace(out / STATE_JSON)


def _py_state_to_json(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def load_train_state(out: Path, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """Restore what :func:`save_train_state` wrote; returns the JSON info (epoch, step, ...)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    tensors = load_file(str(out / STATE_TENSORS))
    meta = json.loads((out / STATE_JSON).read_text(encoding="utf-8"))
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = t
    for pid, d in meta.get("state_scalars", {}).items():
        state.setdefault(int(pid), {}).update(d)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, gauss = meta["numpy_rng"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    py = meta["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return meta


# --------------------------------------------------------------------------------------------
# fit

@dataclass
class FitResult:
    best_metrics: dict[str, float]
    best_epoch: int
    epochs_run: int
    best_path: Path
    last_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    images_per_s: float = float("nan")


def _fmt_metrics(m: dict[str, float], keys: tuple[str, ...]) -> str:
    return " ".join(f"{k} {m[k]:.3f}" for k in keys if k in m and m[k] == m[k])


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,  # noqa: PLC0415
                               TimeElapsedColumn, TimeRemainingColumn)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[val]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True)) as prog:
        yield prog


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: every trainable parameter at ``cfg.lr``, except that
    with ``cfg.prompt_lr_mult`` != 1 the prompt projections (``prompt_proj`` of each Swin stage)
    form a group at ``lr × prompt_lr_mult``, and with ``cfg.texture_lr_mult`` != 1 the texture
    branch (the module named ``texture``, presets with ``texture=True``) one at
    ``lr × texture_lr_mult``. Measured on the bundled model: after fine-tuning at lr 3e-5 its
    prompt columns are still at their initial scale (column norms 0.12–0.26, trained and
    never-used labels alike), so the prompts the paper relies on barely reach the features. The
    texture branch's projection starts at 0 in a continuation, so at the network's lr it would
    stay small for the few hundred steps of one."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    extra: list[tuple[list[nn.Module], float]] = []
    for name, mult, modules in (("prompt_lr_mult", cfg.prompt_lr_mult, prompt_projections(model)),
                                ("texture_lr_mult", cfg.texture_lr_mult, texture_branches(model))):
        if mult <= 0:
            raise ValueError(f"{name} must be > 0, got {mult}")
        if mult != 1.0 and modules:
            extra.append((modules, mult))
    groups: list[dict[str, Any]] = []
    taken: set[int] = set()
    for modules, mult in extra:
        params = [p for m in modules for p in m.parameters() if p.requires_grad and id(p) not in taken]
        taken.update(id(p) for p in params)
        groups.append({"params": params, "lr": cfg.lr * mult})
    return [{"params": [p for p in trainable if id(p) not in taken]}] + groups


def texture_branches(model: nn.Module) -> list[nn.Module]:
    """The texture branches (modules named ``texture``; one per ensemble member), in model order."""
    return [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "texture"]


def prompt_projections(model: nn.Module) -> list[nn.Module]:
    """The Swin stages' prompt projections (the modules named ``prompt_proj``), in model order."""
    return [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "prompt_proj"]


def restrict_prompt_groups(model: nn.Module, vocab: Any, groups: Sequence[str] | None) -> list[str]:
    """Let the Swin stages see only the prompt ``groups`` (``TrainConfig.prompt_groups``): the
    ``prompt_proj`` weight columns of every other group are set to 0 and a gradient hook keeps
    them there (Adam's step and decoupled weight decay leave a zero weight with zero gradient at
    0). The saved network therefore ignores those groups at any backend, with no change to the
    inputs. ``None``: unchanged. Returns the groups switched off."""
    if groups is None:
        return []
    off = [g for g in GROUPS if g not in groups]
    projections = prompt_projections(model)
    if off and not projections:
        raise ValueError("prompt_groups is set but the model has no prompt projections")
    for proj in projections:
        keep = torch.ones_like(proj.weight)
        for g in off:
            keep[:, vocab.columns(g)] = 0.0
        with torch.no_grad():
            proj.weight.mul_(keep)
        proj.weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device, grad.dtype))
    return off


def fit(model: nn.Module, task: Any, train_loader: DataLoader, val_loader: DataLoader | None,
        cfg: TrainConfig, out: Path, make_card: Callable[[dict[str, Any]], Any],
        *, description: str = "train") -> FitResult:
    """Train ``model`` for ``cfg.epochs`` (or until early stopping) and keep the best epoch
    (by ``cfg.select``: the task's primary validation metric or the within-modality SRCC mean).

    ``make_card(info)`` builds the ``ModelCard`` written into each checkpoint; ``info`` holds
    ``epoch``, ``val`` (metrics) and ``history``. Without a validation loader every epoch
    counts as an improvement (the last epoch is the best).
    """
    from engines.artifact import load_tensors, save_artifact  # noqa: PLC0415
    from engines.models.loading import load_state_strict  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    model.to(device)
    # AdamW: with weight_decay = 0 (the default) it is the paper's Adam; with decay, the decay is
    # decoupled from the adaptive step (Loshchilov & Hutter), not an L2 term in the gradient.
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / cfg.grad_accum))
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    # plan["epochs"]: the epochs the schedule spans; cfg.epochs unless a time budget cuts it (below).
    plan = {"epochs": cfg.epochs}
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps_per_epoch * plan["epochs"], warmup, cfg.warmup_start,
                                       cfg.min_lr_ratio))
    scaler = (torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.amp
              and autocast_dtype(device) == torch.float16 else None)

    select = task.primary if cfg.select == "primary" else cfg.select   # what picks the kept epoch
    start_epoch, best, best_epoch, bad_epochs = 0, -math.inf, -1, 0
    best_metrics: dict[str, float] = {}
    history: list[dict[str, Any]] = []
    log_path = out / LOG_NAME
    if cfg.resume and (out / LAST).is_file() and (out / STATE_JSON).is_file():
        groups, card = load_tensors(out / LAST)
        if card.preset != getattr(getattr(model, "preset", None), "name", card.preset):
            raise UnsupportedArtifact(f"cannot resume {out / LAST}: preset {card.preset}, this run "
                                      f"{model.preset.name}")  # type: ignore[union-attr]
        load_state_strict(model, {k: v.float() if v.is_floating_point() else v
                                  for k, v in groups[task.module_name].items()}, str(out / LAST))
        model.to(device)
        info = load_train_state(out, optimizer, scaler)
        kept_by = (info.get("config") or {}).get("select", "primary")
        if kept_by != cfg.select:
            raise ConfigError(f"cannot resume {out}: its best epoch so far was chosen by select {kept_by!r}, "
                              f"this run's select is {cfg.select!r}")
        scheduler.load_state_dict(info["scheduler"])
        start_epoch, best, best_epoch = info["epoch"], info["best"], info["best_epoch"]
        if info.get("budget_epochs"):   # a schedule fitted to the time budget stays fitted
            plan["epochs"] = min(cfg.epochs, int(info["budget_epochs"]))
        bad_epochs, best_metrics, history = info["bad_epochs"], info["best_metrics"], info["history"]
        logger.info("resumed %s at epoch %d (best %s %.4f at epoch %d)", out, start_epoch,
                    select, best, best_epoch)
    elif cfg.resume:
        logger.warning("--resume: no checkpoint in %s; starting from scratch", out)
    if start_epoch == 0 and log_path.exists():
        log_path.unlink()

    keys = ("srcc", "srcc_within", "plcc", "rmse") if task.primary == "srcc" else ("accuracy",)
    last_val = "val -"
    ips: list[float] = []
    t_start = time.perf_counter()
    with _progress(cfg.progress) as prog:
        for epoch in range(start_epoch, cfg.epochs):
            if epoch >= plan["epochs"] or bad_epochs >= cfg.patience > 0:
                break
            if cfg.time_budget_s is not None and time.perf_counter() - t_start > cfg.time_budget_s:
                logger.info("time budget of %.0f s used after %d epochs; stopping", cfg.time_budget_s, epoch)
                break
            tid = None
            if prog is not None:
                tid = prog.add_task(f"{description} {epoch + 1}/{plan['epochs']}", total=len(train_loader),
                                    loss="-", val=last_val)

            def on_step(avg: float, _tid: Any = tid) -> None:
                if prog is not None:
                    prog.update(_tid, advance=1, loss=f"{avg:.4f}")

            stats = train_one_epoch(model, task, train_loader, optimizer, scheduler, device, cfg,
                                    scaler, on_step)
            ips.append(stats.images_per_s)
            val = validate(model, task, val_loader, device, cfg.amp) if val_loader is not None else {}
            if cfg.time_budget_s is not None and epoch == start_epoch:
                fitted = fit_epochs_to_budget(epoch + 1, 1, time.perf_counter() - t_start,
                                              cfg.time_budget_s, plan["epochs"])
                if fitted < plan["epochs"]:
                    logger.info("time budget %.0f s fits %d epochs (first took %.0f s): the lr "
                                "schedule now ends at epoch %d instead of %d", cfg.time_budget_s,
                                fitted, time.perf_counter() - t_start, fitted, plan["epochs"])
                    plan["epochs"] = fitted
            if val_loader is not None and select not in val:
                if select != task.primary:
                    logger.warning("validation has no %s (no prompt modalities?): epoch %d judged by %s",
                                   select, epoch + 1, task.primary)
                else:
                    logger.warning("validation gave no %s (no scored studies?): epoch %d cannot be "
                                   "kept as the best", select, epoch + 1)
            score = val.get(select, val.get(task.primary, float("nan"))) if val_loader is not None else float(epoch)
            improved = score == score and score > best + cfg.min_delta
            if improved:
                best, best_epoch, best_metrics, bad_epochs = score, epoch + 1, dict(val), 0
            else:
                bad_epochs += 1
            rec = {"epoch": epoch + 1, "train_loss": stats.loss, "lr": optimizer.param_groups[0]["lr"],
                   "seconds": round(stats.seconds, 3), "images": stats.images,
                   "images_per_s": round(stats.images_per_s, 3),
                   "val": val, "best": improved}
            history.append(rec)
            with log_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
            last_val = "val " + (_fmt_metrics(val, keys) or "-")
            if prog is not None:
                prog.update(tid, val=last_val + (" *" if improved else ""))
            logger.info("epoch %d: loss %.5f, %s, %.1f images/s", epoch + 1, stats.loss, last_val,
                        stats.images_per_s)
            card = make_card({"epoch": epoch + 1, "val": val, "history": history})
            if improved:
                save_artifact(out / BEST, {task.module_name: model}, card)
            save_artifact(out / LAST, {task.module_name: model}, card)
            save_train_state(out, optimizer, scaler, {
                "epoch": epoch + 1, "best": best, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                "best_metrics": best_metrics, "history": history, "scheduler": scheduler.state_dict(),
                "budget_epochs": plan["epochs"] if plan["epochs"] < cfg.epochs else None,
                "config": cfg.to_dict()})
    if not (out / BEST).exists() and (out / LAST).exists():
        (out / BEST).write_bytes((out / LAST).read_bytes())
    finite = [x for x in ips if x == x]
    return FitResult(best_metrics=best_metrics, best_epoch=best_epoch, epochs_run=len(history),
                     best_path=out / BEST, last_path=out / LAST, history=history,
                     images_per_s=float(np.mean(finite)) if finite else float("nan"))
