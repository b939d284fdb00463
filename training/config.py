"""Training configuration: one frozen ``TrainConfig`` for pretrain, fine-tune and classifier runs.

Values come from, in increasing priority: the dataclass defaults (the paper's settings where
the paper gives one: Adam, lr 1e-5, 50 epochs, MSE), a YAML file (``--config``), and command-line
flags. Unknown keys anywhere fail with a :class:`~engines.errors.ConfigError` that suggests the
closest known key ("did you mean ...?").
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from engines.errors import ConfigError
from engines.prompts import GROUPS

TASKS = ("pretrain", "finetune", "classifier")
LOSSES: tuple[str, ...] = ("mse", "mse+plcc", "mse+plcc-modality", "mse+plcc+plcc-modality",
                          "mse+pairdiff", "mse+plcc+pairdiff")   # iqa losses (training.loop.IQATask)
BATCH_GROUPS: tuple[str, ...] = ("modality",)  # batch_group values (training.data.torchdata.GroupedBatchSampler)
SELECTS: tuple[str, ...] = ("primary", "srcc_within")  # select values (training.loop.fit)


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run. Units in the field comments.

    Schedule: ``warmup_epochs`` of linear warm-up from ``lr * warmup_start`` to ``lr``, then a
    cosine decay to ``lr * min_lr_ratio`` at the last optimizer step. Steps count optimizer
    updates (after ``grad_accum`` micro-batches).
    """

    task: str = "finetune"
    preset: str = "mediqa-vitt16"
    classifier_preset: str | None = None    # None: same as ``preset``
    epochs: int = 50                        # paper: 50
    batch_size: int = 8                     # studies per micro-batch (a 3D study holds k slices)
    grad_accum: int = 1                     # micro-batches per optimizer step
    lr: float = 1e-5                        # paper: Adam, 1e-5
    weight_decay: float = 0.0               # AdamW decoupled decay; 0 = the paper's Adam
    prompt_lr_mult: float = 1.0             # the prompt projections' (``prompt_proj``) lr = lr × this; 1 = one lr for all
    texture_lr_mult: float = 1.0            # the texture branch's (``texture``, presets with texture=True) lr = lr × this
    prompt_groups: tuple[str, ...] | None = None  # prompt groups the Swin stages see (``training.loop.restrict_prompt_groups``); the others' columns are zeroed and frozen; None = all four
    warmup_epochs: float = 1.0
    warmup_start: float = 0.01              # fraction of lr at step 0
    min_lr_ratio: float = 0.01
    grad_clip: float | None = 1.0           # max global grad norm; None = off
    amp: bool = True                        # bf16 autocast on CPU, AMP (bf16 or fp16+scaler) on CUDA
    device: str = "cpu"
    seed: int = 0
    seeds: int = 1                          # > 1: an ensemble of that many members (seed, seed+1, ...)
    patience: int = 10                      # epochs without val improvement before stopping; 0 = off
    min_delta: float = 1e-4
    select: str = "primary"                 # what picks the kept epoch (and patience): "primary" = the
                                            # task's (IQA: pooled validation SRCC; classifier: accuracy);
                                            # "srcc_within" (IQA) = the mean of the within-modality
                                            # validation SRCCs (the bundled model's target is per modality)
    k_slices: int = 7                       # salient slices per 3D study (paper: 7)
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_salt: str = "mediqa-split-v1"
    loss: str = "mse"                       # iqa tasks: "mse" | "mse+plcc" (MSE + 1 − batch PLCC) |
                                            # "mse+plcc-modality" (MSE + mean over the batch's prompt
                                            # modalities of 1 − PLCC within the modality) |
                                            # "mse+plcc+plcc-modality" (both PLCC terms) |
                                            # "mse+pairdiff" / "mse+plcc+pairdiff": + the squared error of
                                            # score differences between studies of one content
                                            # (siblings, the manifest's content column; batches keep
                                            # them together, training.data.torchdata.ContentBatchSampler)
    batch_group: str | None = None          # training batches drawn from one prompt group value each
                                            # ("modality": a batch's PLCC term is then a within-modality
                                            # correlation); None = batches across the whole split
    modality_repeat: tuple[tuple[str, int], ...] | None = None  # training studies of a prompt modality seen
                                            # this many times per epoch (YAML: {mr: 3}; each copy
                                            # augmented afresh; training.data.torchdata.RepeatSampler);
                                            # None = every study once
    flip_augment: bool = True               # random horizontal flips of training inputs
    rot90_augment: bool = False             # random 90° rotations of training inputs (with flips: dihedral group)
    gamma_augment: float = 0.0              # random intensity curve u ** exp(t), |t| <= this; 0 = off
    keep_aspect: bool = False               # inputs fitted with one scale for both axes, short side padded (PreprocessConfig.keep_aspect, recorded in the card); False = each axis resized to the input size
    ct_pixel_mm: float | None = None        # CT inputs resampled to this pixel size in mm (PreprocessConfig.ct_pixel_mm, recorded in the card); None = plain resize
    max_items: int | None = None            # cap on training studies (quick runs); None = all
    workers: int = 0                        # processes for decoding/preprocessing; 0 = in-process
    loader_workers: int = 0                 # DataLoader processes feeding prepared inputs to the
                                            # steps; 0 = in-process (benchmarks/bench_train_input.py)
    cache_dir: str | None = None            # None: <out>/cache
    out: str = "runs/train"
    resume: bool = False
    init_weights: str | None = None         # local timm ViT weights for the encoder (never downloaded)
    from_checkpoint: str | None = None      # fine-tune: the pretrained artifact
    reinit: tuple[str, ...] = ("score",)    # fine-tune: head name fragments re-initialised after --from
    label_min: float | None = None          # fine-tune: score range; None = from the data (LDCTIQA: 0..4)
    label_max: float | None = None
    label_name: str = "score"
    progress: bool = True
    time_budget_s: float | None = None     # wall-clock budget: after epoch 1 the lr schedule is shortened to the epochs that fit; training stops after the epoch that exhausts it (best kept)
    log_every: int = 10                     # optimizer steps between progress-bar loss updates

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        for name in ("epochs", "batch_size", "grad_accum", "seeds", "k_slices"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        r = self.split_ratios
        if len(r) != 3 or any(x < 0 for x in r) or not sum(r) > 0:
            raise ConfigError(f"split_ratios must be three non-negative numbers, got {r!r}")
        if not 0.0 <= float(self.gamma_augment) <= 2.0:
            raise ConfigError(f"gamma_augment must be in [0, 2] (max |log gamma|), got {self.gamma_augment!r}")
        if self.ct_pixel_mm is not None and not 0.05 <= float(self.ct_pixel_mm) <= 10.0:
            raise ConfigError(f"ct_pixel_mm must be in [0.05, 10] mm or null, got {self.ct_pixel_mm!r}")
        if int(self.loader_workers) < 0:
            raise ConfigError(f"loader_workers must be >= 0, got {self.loader_workers!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss.endswith("pairdiff") and self.batch_group is not None:
            raise ConfigError(f"loss {self.loss} batches siblings together; it cannot be combined with "
                              f"batch_group {self.batch_group!r}")
        if self.modality_repeat is not None:
            if any(not k or int(r) < 1 for k, r in self.modality_repeat):
                raise ConfigError("modality_repeat must map modality names to whole numbers >= 1, got "
                                  f"{dict(self.modality_repeat)!r}")
            if self.batch_group is not None or self.loss.endswith("pairdiff"):
                raise ConfigError("modality_repeat draws its own batches; it cannot be combined with "
                                  "batch_group or a pairdiff loss")
        if self.select not in SELECTS:
            raise ConfigError(f"select must be one of {SELECTS}, got {self.select!r}")
        if self.select == "srcc_within" and self.task == "classifier":
            raise ConfigError("select srcc_within is an IQA metric; the classifier is chosen by accuracy")
        if self.batch_group is not None and self.batch_group not in BATCH_GROUPS:
            raise ConfigError(f"batch_group must be one of {BATCH_GROUPS} or null, got {self.batch_group!r}")
        if self.prompt_groups is not None:
            bad = [g for g in self.prompt_groups if g not in GROUPS]
            if bad or len(set(self.prompt_groups)) != len(self.prompt_groups):
                raise ConfigError(f"prompt_groups must be distinct names of {GROUPS} or null, got "
                                  f"{list(self.prompt_groups)!r}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError(f"device must be cpu or cuda[:N], got {self.device!r}")

    @property
    def out_path(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["split_ratios"] = list(self.split_ratios)
        d["reinit"] = list(self.reinit)
        if self.prompt_groups is not None:
            d["prompt_groups"] = list(self.prompt_groups)
        if self.modality_repeat is not None:
            d["modality_repeat"] = dict(self.modality_repeat)
        return d

    def replace(self, **changes: Any) -> "TrainConfig":
        return merge_config(self, changes)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def did_you_mean(key: str, known: list[str]) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(name: str, value: Any) -> Any:
    """YAML / CLI value → the field's type. Raises ConfigError with the key name on failure."""
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    t = str(f.type)
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"{name} may not be null")
    try:
        if name in ("split_ratios",):
            return tuple(float(x) for x in value)
        if name == "modality_repeat":
            if not isinstance(value, Mapping):
                raise TypeError(value)
            out: dict[str, int] = {}
            for k, r in value.items():
                if isinstance(r, bool) or (isinstance(r, float) and not r.is_integer()) or str(k).lower() in out:
                    raise ValueError(r)
                out[str(k).lower()] = int(r)
            return tuple(sorted(out.items()))
        if name in ("reinit", "prompt_groups"):
            return (value,) if isinstance(value, str) else tuple(str(x) for x in value)
        if t.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if t.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if t.startswith("float"):
            return float(value)
        if t.startswith("str"):
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad value for {name}: {value!r} (expected {t})") from exc
    return value


def merge_config(base: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """``base`` with ``overrides`` applied; unknown keys fail with a suggestion."""
    known = field_names()
    kw: dict[str, Any] = {}
    for key, value in overrides.items():
        k = key.replace("-", "_")
        if k not in known:
            raise ConfigError(f"unknown config key {key!r}{did_you_mean(k, known)}")
        kw[k] = _coerce(k, value)
    return dataclasses.replace(base, **kw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping (empty file → {}). Raises ConfigError for anything else."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {p} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {p} must be a mapping of keys to values")
    return data


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                base: TrainConfig | None = None) -> TrainConfig:
    """Defaults ← YAML file ← overrides (flags). ``None`` override values are ignored (flag not given)."""
    cfg = base or TrainConfig()
    if path is not None:
        cfg = merge_config(cfg, read_yaml(path))
    if overrides:
        cfg = merge_config(cfg, {k: v for k, v in overrides.items() if v is not None})
    return cfg

