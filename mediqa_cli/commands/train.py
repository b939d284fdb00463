"""``mediqa train``: pretrain, finetune, classifier, recipe (thin wrappers over ``training``).

Options come from the dataclass defaults, then ``--config YAML``, then the flags given on the
command line (flags win). Unknown YAML keys fail with a "did you mean" suggestion.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import click

logger = logging.getLogger(__name__)


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--preset", default=None, help="Model preset (mediqa-vitb8, mediqa-vits16, mediqa-vitt16, mediqa-test)."),
        click.option("--epochs", type=int, default=None, help="Epochs (paper: 50)."),
        click.option("--batch-size", type=int, default=None, help="Studies per micro-batch."),
        click.option("--grad-accum", type=int, default=None, help="Micro-batches per optimizer step."),
        click.option("--lr", type=float, default=None, help="Adam learning rate (paper: 1e-5)."),
        click.option("--device", default=None, help="cpu, cuda or cuda:N."),
        click.option("--seed", type=int, default=None, help="Random seed."),
        click.option("--seeds", type=int, default=None, help="Train N members (seed, seed+1, ...) into one ensemble artifact."),
        click.option("--out", type=click.Path(file_okay=False), default=None, help="Run folder (checkpoints, logs, model.safetensors)."),
        click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="YAML file of TrainConfig keys; flags override it."),
        click.option("--resume/--no-resume", default=None, help="Continue from <out>/last.safetensors and its training state."),
        click.option("--init-weights", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Local timm ViT weights for the encoder (nothing is downloaded)."),
        click.option("--workers", type=int, default=None, help="Processes decoding / preprocessing studies (0 = in-process)."),
        click.option("--loader-workers", type=int, default=None,
                     help="DataLoader processes feeding the training steps (0 = in-process, the default)."),
        click.option("--amp/--no-amp", default=None, help="bf16 autocast on CPU, mixed precision on CUDA."),
        click.option("--max-items", type=int, default=None, help="Use at most N training studies (quick runs)."),
        click.option("--progress/--no-progress", default=None, help="Show the progress bar."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _config(task: str, kw: dict[str, Any]) -> Any:
    from training.config import load_config  # noqa: PLC0415

    path = kw.pop("config_path", None)
    overrides = {k: v for k, v in kw.items() if v is not None}
    overrides["task"] = task
    if "out" not in overrides:
        overrides.setdefault("out", f"runs/{task}")
    return load_config(path, overrides)


def _run(task: str, data: str, kw: dict[str, Any]) -> None:
    from engines.errors import ConfigError, MediqaError  # noqa: PLC0415

    try:
        cfg = _config(task, kw)
        from training.tasks import RUNNERS  # noqa: PLC0415

        outcome = RUNNERS[task](data, cfg)
    except ConfigError as exc:
        raise click.UsageError(exc.message) from None
    except MediqaError as exc:
        raise click.ClickException(f"[{exc.code}] {exc.message}") from None
    _print_outcome(task, outcome)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) and v == v else "-" if v is None or v != v else str(v)


def _print_outcome(task: str, outcome: Any) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = Console()
    keys = ("n", "accuracy", "acc_modality", "acc_region", "acc_type") if task == "classifier" else \
        ("n", "srcc", "plcc", "krocc", "rmse")
    table = Table(title=f"{task}: {outcome.artifact}")
    table.add_column("split")
    for k in keys:
        table.add_column(k, justify="right")
    for split in ("val", "test"):
        m = outcome.metrics.get(split) or {}
        table.add_row(split, *[_fmt(m.get(k)) for k in keys])
    console.print(table)
    console.print(f"data: {outcome.data_summary.get('used')} studies used, {outcome.data_summary.get('skipped')} skipped "
                  f"{outcome.data_summary.get('skipped_by_reason') or ''}; splits {outcome.data_summary.get('splits')}")
    console.print(f"training throughput: {_fmt(outcome.images_per_s)} images/s")


@click.group("train")
def train() -> None:
    """Pretrain on physical parameters, fine-tune on quality scores, train the prompt classifier."""


@train.command("pretrain")
@click.argument("data_dir", type=click.Path(exists=True))
@_common
def pretrain(data_dir: str, **kw: Any) -> None:
    """Stage 1 on DATA_DIR (a folder of studies or a manifest): targets from DICOM tags
    (CT mAs, MR field strength), normalised per modality; studies without them are skipped."""
    _run("pretrain", data_dir, kw)


@train.command("finetune")
@click.argument("data", metavar="MANIFEST_OR_DIR", type=click.Path(exists=True))
@click.option("--from", "from_checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Pretrained artifact (same preset): encoder, attention/Swin stages and prompt FCs are kept.")
@click.option("--label-min", type=float, default=None, help="Lowest possible score (default: LDCTIQA 0, else the data's min).")
@click.option("--label-max", type=float, default=None, help="Highest possible score (default: LDCTIQA 4, else the data's max).")
@_common
def finetune(data: str, **kw: Any) -> None:
    """Stage 2 on a manifest CSV (path,score[,modality,region,type]) or an LDCTIQA2023 folder."""
    _run("finetune", data, kw)


@train.command("classifier")
@click.argument("data", type=click.Path(exists=True))
@click.option("--classifier-preset", default=None, help="Preset whose classifier ViT to train (default: --preset).")
@_common
def classifier(data: str, **kw: Any) -> None:
    """The prompt classifier (modality / region / type) on DATA: labels from tags, else the manifest."""
    _run("classifier", data, kw)


@train.command("recipe")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--device", default=None, help="cpu, cuda or cuda:N (overrides the recipe).")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None, help="Where corpus, runs and caches go.")
@click.option("--output", "output", type=click.Path(dir_okay=False), default=None,
              help="Where the packed artifact goes (default: the recipe's output).")
@click.option("--finish", "finish", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Only the last step for ARTIFACT, packed by this recipe but cut short before its "
                   "test evaluation: evaluate it on the corpus' test split and record the metrics in "
                   "its card (the stage records in the work dir give the validation metrics).")
@click.option("--progress/--no-progress", default=True)
def recipe(config: str, device: str | None, work_dir: str | None, output: str | None, finish: str | None,
           progress: bool) -> None:
    """Run a whole recipe: synth corpus → pretrain → finetune → classifier → test → packed artifact.

    A recipe with a ``base`` section continues a packed artifact instead: synth corpus → finetune
    from the base → test → packed with the base's classifier. A recipe with a ``soup`` section
    averages two or more finished sibling artifacts (same base, same classifier) into one network
    and evaluates it on validation and test; it trains nothing."""
    from engines.errors import ConfigError, MediqaError  # noqa: PLC0415
    from training.recipe import finish_recipe, run_recipe  # noqa: PLC0415

    try:
        if finish:
            result = finish_recipe(config, finish, device=device, work_dir=work_dir, output=output,
                                   progress=progress)
        else:
            result = run_recipe(config, device=device, work_dir=work_dir, output=output, progress=progress)
    except ConfigError as exc:
        raise click.UsageError(exc.message) from None
    except MediqaError as exc:
        raise click.ClickException(f"[{exc.code}] {exc.message}") from None
    click.echo(json.dumps({"artifact": str(result["artifact"]), "test": result["metrics"].get("test", {})
                           .get("overall", {})}, indent=1, default=str))
    click.echo(f"wrote {Path(result['artifact'])}")


@contextlib.contextmanager
def _click_errors(*also: type[Exception]) -> Iterator[None]:
    """MediqaError → ClickException "[code] message"; the ``also`` exception types → their text."""
    from engines.errors import MediqaError  # noqa: PLC0415

    try:
        yield
    except MediqaError as exc:
        raise click.ClickException(f"[{exc.code}] {exc.message}") from None
    except also as exc:
        raise click.ClickException(str(exc)) from None


def _card_target(model: str, output: str | None, dry_run: bool, what: str) -> None:
    """UsageError unless the card rewrite goes to a .safetensors artifact (or nothing is written)."""
    if not dry_run and Path(output or model).suffix.lower() != ".safetensors":
        raise click.UsageError(f"{what} is written into a .safetensors artifact (export to ONNX afterwards)")


@train.command("feature-head")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("data", type=click.Path(exists=True))
@click.option("--fit-split", default="train", show_default=True, help="Split the per-modality ridges are fitted on.")
@click.option("--choose-split", default="val", show_default=True, help="Split the blend weights are chosen on.")
@click.option("--penalty", type=float, default=1.0, show_default=True, help="Ridge penalty (z-scored statistics).")
@click.option("--min-studies", type=int, default=20, show_default=True,
              help="Studies a modality needs for a ridge, and a source for the blend rule.")
@click.option("--min-sources", type=int, default=2, show_default=True,
              help="Validation sources (manifest column source_id) a modality needs before it may blend.")
@click.option("--output", "output", type=click.Path(dir_okay=False), default=None,
              help="Write the artifact with the head here (default: rewrite MODEL's card in place).")
@click.option("--dry-run", is_flag=True, help="Measure and print the choice; write nothing.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--workers", type=int, default=0, show_default=True, help="Processes decoding studies.")
@click.option("--progress/--no-progress", default=True)
def feature_head(model: str, data: str, fit_split: str, choose_split: str, penalty: float, min_studies: int,
                 min_sources: int, output: str | None, dry_run: bool, device: str, batch_size: int,
                 workers: int, progress: bool) -> None:
    """Fit MODEL's feature head on DATA: classical statistics of the network input, one ridge per
    modality (train split), blended into the score where the validation split shows it helps.

    A modality blends (weight 0.25 / 0.5 / 0.75 / 1) only when the blend beats the network on
    the validation split with a paired bootstrap interval above 0 and loses in none of at least
    two validation sources (the gain measured without the sources the network ranks at SRCC <= 0,
    when it ranks others); the measurements are recorded in the card. `mediqa score` and
    `mediqa evaluate` apply it (`--no-features`: the network alone)."""
    from training.feature_head import fit_feature_head_for, write_feature_head  # noqa: PLC0415

    _card_target(model, output, dry_run, "the head")
    with _click_errors(ValueError):
        head = fit_feature_head_for(model, data, fit_split=fit_split, choose_split=choose_split, penalty=penalty,
                                    min_studies=min_studies, min_sources=min_sources, device=device,
                                    batch_size=batch_size, workers=workers, progress=progress)
    for modality, row in head.selection.get("modalities", {}).items():
        tried = ", ".join(f"{a}: {row['srcc'][a]:.3f} CI [{row['interval'][a][0]:.3f}, {row['interval'][a][1]:.3f}]"
                          for a in row.get("interval", {}))
        base = row.get("srcc", {}).get("0")
        left = f" (gain without {', '.join(row['left_out'])}: not ranked by the network)" if row.get("left_out") else ""
        click.echo(f"{modality:8s} n={row['n']:4d} sources={len(row['sources'])}{left}  network "
                   f"{'-' if base is None else f'{base:.3f}'}  {tried}  -> blend {row['blend']}")
    if not dry_run:
        click.echo(f"wrote {write_feature_head(model, head, output)}")


@train.command("tta-policy")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("data", type=click.Path(exists=True))
@click.option("--split", type=click.Choice(["val", "test", "all"]), default="val", show_default=True,
              help="Held-out studies to choose on (the manifest's split column, else the card's hash split); "
                   "'all' only for data the model never trained on.")
@click.option("--modes", default="flip,d4", show_default=True, help="Candidate TTA modes (comma-separated).")
@click.option("--min-gain", type=float, default=0.0, show_default=True,
              help="A mode is eligible when the 95% paired bootstrap interval of its SRCC gain over no "
                   "TTA lies above this.")
@click.option("--min-studies", type=int, default=20, show_default=True,
              help="Modalities with fewer studies in the split keep no TTA.")
@click.option("--output", "output", type=click.Path(dir_okay=False), default=None,
              help="Write the artifact with the policy here (default: rewrite MODEL's card in place).")
@click.option("--dry-run", is_flag=True, help="Measure and print the choice; write nothing.")
@click.option("--reports-dir", type=click.Path(file_okay=False), default=None,
              help="Keep each mode's evaluation here and reuse matching ones (resumable).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--workers", type=int, default=0, show_default=True, help="Processes decoding studies.")
@click.option("--progress/--no-progress", default=True)
def tta_policy(model: str, data: str, split: str, modes: str, min_gain: float, min_studies: int,
               output: str | None, dry_run: bool, reports_dir: str | None, device: str, batch_size: int,
               workers: int, progress: bool) -> None:
    """Choose MODEL's per-modality test-time augmentation (`--tta auto`) on held-out DATA.

    Scores the split plain and with each candidate mode (one pass: each study read once, each
    transform run once); per prompt modality keeps the mode whose SRCC gain is shown by a paired
    bootstrap interval (best SRCC wins), else none; records the policy and the measurements in
    the model card (.safetensors)."""
    from engines.tta import TTA_MODES  # noqa: PLC0415
    from training.tta_policy import choose_tta_policy, write_policy  # noqa: PLC0415

    candidates = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in candidates if m not in TTA_MODES or m == "none"]
    if bad or not candidates:
        raise click.UsageError(f"--modes: expected some of flip, d4; got {modes!r}")
    _card_target(model, output, dry_run, "the policy")
    with _click_errors():
        policy = choose_tta_policy(model, data, split=split, modes=candidates, device=device,
                                   batch_size=batch_size, workers=workers, progress=progress,
                                   reports_dir=reports_dir, min_gain=min_gain, min_studies=min_studies)
    for modality, row in policy.selection["modalities"].items():
        gains = ", ".join(f"{m} {row['srcc'][m]} (gain CI {row['gain_ci'][m]})" for m in row["gain_ci"])
        click.echo(f"{modality:8s} n={row['n']:4d}  none {row['srcc']['none']}  {gains}  -> {row['chosen']}")
    click.echo(f"policy: {policy.describe()}")
    if not dry_run:
        click.echo(f"wrote {write_policy(model, policy, output)}")


@train.command("tta-set")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("assignments", nargs=-1, required=True, metavar="MODALITY=MODE...")
@click.option("--reason", required=True, help="Why the measured choice is overridden (kept in the card).")
@click.option("--evidence", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The measurement behind it (its file name and sha256 are kept in the card).")
@click.option("--output", "output", type=click.Path(dir_okay=False), default=None,
              help="Write the artifact with the policy here (default: rewrite MODEL's card in place).")
def tta_set(model: str, assignments: tuple[str, ...], reason: str, evidence: str | None,
            output: str | None) -> None:
    """Set MODEL's `--tta auto` mode of some modalities by hand, e.g. `mr=none`.

    For evidence the validation split cannot give (real images, degradations the corpus lacks).
    The measured choice and its table stay in the card; each override is recorded beside them
    with its previous mode, reason, time and evidence. Tensors are copied as stored."""
    from engines.artifact import load_card  # noqa: PLC0415
    from engines.tta import TTAPolicy, card_vocab  # noqa: PLC0415
    from training.tta_policy import override_policy, write_policy  # noqa: PLC0415

    changes: dict[str, str] = {}
    for item in assignments:
        modality, sep, mode = item.partition("=")
        if not sep or not modality.strip() or not mode.strip():
            raise click.UsageError(f"expected MODALITY=MODE (e.g. mr=none), got {item!r}")
        changes[modality.strip()] = mode.strip()
    _card_target(model, output, False, "the policy")
    with _click_errors():
        card = load_card(model)
    known = set(card_vocab(card).labels("modality"))
    unknown = sorted(set(changes) - known)
    if unknown:
        raise click.UsageError(f"unknown modalities {unknown}; the card's are {sorted(known)}")
    try:
        policy = override_policy(TTAPolicy.from_dict(card.tta_policy), changes, reason=reason, evidence=evidence)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"policy: {policy.describe()}")
    with _click_errors():
        click.echo(f"wrote {write_policy(model, policy, output)}")
