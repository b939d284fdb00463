"""The reproducible recipe behind the bundled default model (issue 4, item 2).

Steps, each in ``<work_dir>``:

1. ``mediqa synth <work_dir>/corpus --seed S --size SIZE`` (skipped when the corpus with that
   seed and size is already there) — real anatomy with simulated, known degradations and a
   manifest whose ``split`` column keeps test source images apart from training ones;
2. pretrain on the corpus' DICOM studies with physical targets from their tags (CT mAs, MR
   field strength), test split excluded (``runs/pretrain``);
3. fine-tune from the pretrained artifact on the synthetic scores (``runs/finetune``);
4. train the prompt classifier on the manifest's / tags' prompt labels (``runs/classifier``);
5. pack the fine-tuned IQA model and the classifier into one fp16 artifact at ``output``, then
   evaluate it on the test split exactly as ``mediqa evaluate`` would, and write the metrics
   into its card together with the data summary and ``recipe_sha256`` (sha256 of the YAML).

The YAML has top-level keys ``preset``, ``device``, ``output``, ``work_dir``, ``synth``
(``size``, ``seed``, ``workers`` and one key per generator option of
``training.synth.corpus.GENERATOR_OPTIONS``, e.g. ``train_windows``, ``dose_label``,
``train_mr_fields``), ``common`` (TrainConfig keys for every stage) and ``pretrain`` /
``finetune`` / ``classifier`` (TrainConfig keys for that stage). Unknown keys fail with a
suggestion. Relative paths are relative to the current directory.

A *continuation* recipe has a ``base`` section instead of ``pretrain`` / ``classifier``:
``artifact`` (path of a packed artifact), ``sha256`` (its hash, checked before anything runs) and
optionally ``git`` (``REV:PATH`` in the repository holding the recipe, e.g. the commit that
bundled the base model: the file is extracted with ``git show`` when ``artifact`` is absent).
Steps 2 and 4 are then skipped: step 3 fine-tunes from the base (``finetune.reinit: []`` keeps
its score head) and step 5 packs the result with the base's classifier unchanged. The card
records the base's sha256, recipe and data summary.

A *soup* recipe has a ``soup`` section instead of ``base`` and the training sections:
``members``, a list of at least two mappings like ``base`` (``artifact``, ``sha256``, ``git``),
and ``align_label_scale`` (default false: members whose label range differs are refused; true:
they are mapped onto the first member's range, ``training.soup.map_label_scale``, and the map is
recorded with the member in the card).
Nothing is trained: the members' IQA networks are averaged uniformly (``training.soup``; they
must share their card's preset, prompts, preprocessing and label scale and carry the same
classifier, as siblings continued from one base do), packed with that classifier, scored on the
validation split without TTA (the card's ``val`` metric), then step 5's test evaluation and
steps 6 / 7 as below. The card lists each member's sha256, recipe and fine-tune configuration.

An optional ``tta_policy`` section adds step 6: choose the packed model's per-modality test-time
augmentation on a held-out split of the corpus and write it into the card, exactly as
``mediqa train tta-policy`` does (``training.tta_policy``). Keys: ``split`` (``val``, the
default, or ``test``; never ``train``), ``modes`` (default ``[flip, d4]``), ``min_gain`` (0.0),
``min_studies`` (20). The step's evaluations are kept in ``<work_dir>/tta-policy`` and reused
when the same artifact is chosen again (``--finish``). The card's test metrics stay those of
the plain network; the policy records its own measurements.

An optional ``feature_head`` section adds step 7 (after step 6): fit the packed model's feature
head (``engines.features``: a ridge per modality on classical statistics of the network input,
fitted on ``fit_split``, blend weights chosen on ``choose_split`` against the model's ``--tta
auto`` scores) and write it into the card, as ``mediqa train feature-head`` does. Keys:
``fit_split`` (train), ``choose_split`` (val), ``penalty`` (1.0), ``min_studies`` (20),
``min_sources`` (2). When step 6 chose the policy on the same split, its kept evaluations give
the ``--tta auto`` scores (no second pass over the split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from engines.errors import ConfigError, MediqaError
from engines.files import atomic_write_text
from training.config import TrainConfig, did_you_mean, load_config, merge_config, read_yaml

logger = logging.getLogger(__name__)

TOP_KEYS = ("preset", "device", "output", "work_dir", "synth", "common", "pretrain", "finetune", "classifier",
            "base", "tta_policy", "feature_head", "soup")
SOUP_KEYS = ("members", "align_label_scale")
BASE_KEYS = ("artifact", "sha256", "git")
CORPUS_STAMP = ".recipe-synth.json"   # size, seed and source fingerprint of a recipe's corpus
SYNTH_KEYS = ("size", "seed", "workers")   # and every generator option (``_synth_keys``)
TTA_POLICY_KEYS = ("split", "modes", "min_gain", "min_studies")
FEATURE_HEAD_KEYS = ("fit_split", "choose_split", "penalty", "min_studies", "min_sources")


def _check_keys(d: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for k in d:
        if k not in known:
            raise ConfigError(f"unknown {where} key {k!r}{did_you_mean(k, list(known))}")


def load_recipe(path: str | Path) -> tuple[dict[str, Any], str]:
    """(recipe mapping, sha256 hex of the file's bytes). Validates every section's keys."""
    p = Path(path)
    raw = p.read_bytes()
    d = read_yaml(p)
    _check_keys(d, TOP_KEYS, "recipe")
    _check_keys(d.get("synth") or {}, _synth_keys(), "synth")
    _generator_options(d)   # raises on a bad value
    for stage in ("common", "pretrain", "finetune", "classifier"):
        merge_config(TrainConfig(), d.get(stage) or {})   # raises on unknown keys / bad values
    if "tta_policy" in d:
        _tta_policy_options(d["tta_policy"])
    if "feature_head" in d:
        _feature_head_options(d["feature_head"])
    if "base" in d:
        base = d["base"] or {}
        _check_keys(base, BASE_KEYS, "base")
        if not base.get("artifact") or not base.get("sha256"):
            raise ConfigError("a recipe's base needs 'artifact' (path) and 'sha256'")
        extra = [k for k in ("pretrain", "classifier") if k in d]
        if extra:
            raise ConfigError(f"a recipe with a base fine-tunes it and keeps its classifier; remove {extra}")
    if "soup" in d:
        _soup_members(d)
    return d, hashlib.sha256(raw).hexdigest()


def _soup_members(recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """The validated ``soup.members`` list (each a mapping like ``base``)."""
    sec = recipe["soup"]
    if not isinstance(sec, dict):
        raise ConfigError("soup must be a mapping with 'members' (a list of artifact / sha256 / git)")
    _check_keys(sec, SOUP_KEYS, "soup")
    if not isinstance(sec.get("align_label_scale", False), bool):
        raise ConfigError(f"soup.align_label_scale must be true or false, got {sec['align_label_scale']!r}")
    extra = [k for k in ("base", "pretrain", "finetune", "classifier") if k in recipe]
    if extra:
        raise ConfigError(f"a soup recipe averages finished artifacts and trains nothing; remove {extra}")
    members = sec.get("members")
    if not isinstance(members, list) or len(members) < 2:
        raise ConfigError("soup.members must list at least two artifacts")
    for m in members:
        if not isinstance(m, dict):
            raise ConfigError(f"each soup member is a mapping (artifact, sha256, git), got {m!r}")
        _check_keys(m, BASE_KEYS, "soup member")
        if not m.get("artifact") or not m.get("sha256"):
            raise ConfigError("each soup member needs 'artifact' (path) and 'sha256'")
    return members


def _tta_policy_options(section: Any) -> dict[str, Any]:
    """The validated ``tta_policy`` section as ``choose_tta_policy`` keywords."""
    from engines.tta import TTA_MODES  # noqa: PLC0415

    sec = section or {}
    if not isinstance(sec, dict):
        raise ConfigError("tta_policy must be a mapping (split, modes, min_gain, min_studies)")
    _check_keys(sec, TTA_POLICY_KEYS, "tta_policy")
    split = str(sec.get("split", "val"))
    if split not in ("val", "test"):
        raise ConfigError(f"tta_policy.split must be val or test (held-out data), got {split!r}")
    modes = sec.get("modes", ["flip", "d4"])
    if isinstance(modes, str):
        modes = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in TTA_MODES or m == "none"]
    if not modes or bad:
        raise ConfigError(f"tta_policy.modes must name some of {[m for m in TTA_MODES if m != 'none']}, "
                          f"got {modes!r}")
    try:
        min_gain, min_studies = float(sec.get("min_gain", 0.0)), int(sec.get("min_studies", 20))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"tta_policy: min_gain must be a number and min_studies an integer ({exc})") from None
    return {"split": split, "modes": tuple(modes), "min_gain": min_gain, "min_studies": min_studies}


def _feature_head_options(section: Any) -> dict[str, Any]:
    """The validated ``feature_head`` section as ``fit_feature_head_for`` keywords."""
    sec = section or {}
    if not isinstance(sec, dict):
        raise ConfigError(f"feature_head must be a mapping ({', '.join(FEATURE_HEAD_KEYS)})")
    _check_keys(sec, FEATURE_HEAD_KEYS, "feature_head")
    fit, choose = str(sec.get("fit_split", "train")), str(sec.get("choose_split", "val"))
    if fit not in ("train", "val", "test") or choose not in ("val", "test") or fit == choose:
        raise ConfigError(f"feature_head: fit_split and choose_split must be two splits, choose_split held out "
                          f"(val or test); got {fit!r} / {choose!r}")
    try:
        opts = {"penalty": float(sec.get("penalty", 1.0)), "min_studies": int(sec.get("min_studies", 20)),
                "min_sources": int(sec.get("min_sources", 2))}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"feature_head: penalty must be a number, min_studies / min_sources integers ({exc})") \
            from None
    if opts["penalty"] <= 0 or opts["min_studies"] < 1 or opts["min_sources"] < 1:
        raise ConfigError("feature_head: penalty must be > 0, min_studies and min_sources >= 1")
    return {"fit_split": fit, "choose_split": choose, **opts}


def ensure_base(recipe_path: str | Path, base: dict[str, Any]) -> Path:
    """The base artifact of a continuation recipe, extracted from git (``base.git``) when absent;
    ConfigError unless its sha256 is ``base.sha256``."""
    from engines.pipeline import file_sha256  # noqa: PLC0415

    path = Path(base["artifact"])
    if not path.is_file() and base.get("git"):
        repo = Path(recipe_path).resolve().parent
        res = subprocess.run(["git", "-C", str(repo), "show", str(base["git"])], capture_output=True, check=False)
        if res.returncode != 0:
            raise ConfigError(f"git show {base['git']} failed: {res.stderr.decode(errors='replace').strip()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(res.stdout)
        logger.info("extracted the base artifact %s from git (%s)", path, base["git"])
    if not path.is_file():
        raise ConfigError(f"the recipe's base artifact {path} does not exist")
    sha = file_sha256(path)
    if sha != str(base["sha256"]).lower():
        raise ConfigError(f"the base artifact {path} has sha256 {sha[:12]}…, the recipe names {str(base['sha256'])[:12]}…")
    return path


def _stage_config(recipe: dict[str, Any], stage: str, task: str, out: Path, cache: Path,
                  device: str | None, progress: bool) -> TrainConfig:
    cfg = load_config(None, recipe.get("common") or {})
    cfg = merge_config(cfg, recipe.get(stage) or {})
    over: dict[str, Any] = {"task": task, "out": str(out), "cache_dir": str(cache), "progress": progress}
    if recipe.get("preset"):
        over["preset"] = recipe["preset"]
    if device or recipe.get("device"):
        over["device"] = device or recipe["device"]
    return merge_config(cfg, over)


def _synth_keys() -> tuple[str, ...]:
    from training.synth.corpus import GENERATOR_OPTIONS  # noqa: PLC0415

    return (*SYNTH_KEYS, *(o.name for o in GENERATOR_OPTIONS))


def _generator_options(recipe: dict[str, Any]) -> dict[str, bool | str]:
    """The recipe's generator options (``synth:`` section), every one, checked."""
    from training.synth.corpus import generator_options  # noqa: PLC0415

    try:
        return generator_options(recipe.get("synth") or {})
    except ValueError as exc:
        raise ConfigError(f"synth.{exc}") from None


def _non_default(options: dict[str, Any], always: bool = False) -> dict[str, Any]:
    """``options`` (any subset of the generator options) without those at their default, in the
    table's order; ``always``: keep the ones the card's summary names even at the default."""
    from training.synth.corpus import GENERATOR_OPTIONS  # noqa: PLC0415

    unknown = set(options) - {o.name for o in GENERATOR_OPTIONS}
    if unknown:
        raise TypeError(f"unknown corpus generator options {sorted(unknown)}")
    return {o.name: options[o.name] for o in GENERATOR_OPTIONS if o.name in options
            and (options[o.name] != o.default or (always and o.always_in_summary))}


def corpus_identity(size: str, seed: int, **options: Any) -> dict[str, Any]:
    """What identifies a recipe's corpus: size, seed, the table of base images and the generator
    options (``GENERATOR_OPTIONS``) that are not at their default, so corpora made before an
    option existed keep their identity."""
    from training.synth.sources import OPTIONAL_SOURCES, sources_fingerprint

    optional = [o for o in OPTIONAL_SOURCES if options.get(o)]
    return {"size": size, "seed": seed, "sources": sources_fingerprint(optional),
            **_non_default(options)}


def stage_corpus(corpus_id: dict[str, Any], stage: str) -> dict[str, Any]:
    """The part of the corpus identity a stage's output depends on. The pretrain stage trains on
    the CT / MR studies' physical targets: an option that changes neither their images nor their
    tags (``pretrain=False`` in the table: ``train_windows`` and ``train_warp_2d`` change X-ray /
    fundus training studies only, ``dose_label`` only the synthetic scores) is left out of its key,
    so a finished pretrain stage is reused when only such an option changes. ``train_warp``
    changes the CT / MR training images, so every stage keeps it."""
    from training.synth.corpus import GENERATOR_OPTIONS  # noqa: PLC0415

    if stage == "pretrain":
        skip = {o.name for o in GENERATOR_OPTIONS if not o.pretrain}
        return {k: v for k, v in corpus_id.items() if k not in skip}
    return corpus_id


def ensure_corpus(corpus: Path, size: str, seed: int, progress: bool, workers: int | None = None,
                  **options: Any) -> Path:
    """Run ``mediqa synth`` unless ``corpus`` already holds a corpus of this identity
    (``corpus_identity``: size, seed, table of base images, generator ``options``). A stamped
    corpus of the same size, seed and base images made with other options is updated in place
    instead, when its plan pairs up with this one study by study (``_update_corpus``)."""
    from training.synth.corpus import GENERATOR_OPTIONS  # noqa: PLC0415

    stamp = corpus / CORPUS_STAMP
    want = corpus_identity(size, seed, **options)
    have = json.loads(stamp.read_text()) if (corpus / "manifest.csv").is_file() and stamp.is_file() else None
    if have == want:
        logger.info("reusing synthetic corpus %s (%s)", corpus, want)
        return corpus / "manifest.csv"
    if have is not None and _update_corpus(corpus, have, want, size, seed, workers, options):
        atomic_write_text(stamp, json.dumps(want))   # a new file: a hard-linked stamp (cp -al) keeps its own
        return corpus / "manifest.csv"
    cmd = [sys.executable, "-m", "mediqa_cli", "synth", str(corpus), "--seed", str(seed), "--size", size,
           "--progress" if progress else "--no-progress"]
    if workers:
        cmd += ["--workers", str(workers)]
    for opt in GENERATOR_OPTIONS:
        cmd += opt.cli_args(options.get(opt.name, opt.default))
    if (corpus / "manifest.csv").is_file():   # another size / seed / source table: replace it
        cmd.append("--force")
    logger.info("running %s", " ".join(cmd))
    res = subprocess.run(cmd, check=False)
    if res.returncode != 0 or not (corpus / "manifest.csv").is_file():
        raise MediqaError(f"mediqa synth failed (exit {res.returncode}); see its output above")
    atomic_write_text(stamp, json.dumps(want))
    return corpus / "manifest.csv"


def _update_corpus(corpus: Path, have: dict[str, Any], want: dict[str, Any], size: str, seed: int,
                   workers: int | None, options: dict[str, Any]) -> bool:
    """A corpus of the same size, seed and base images made with other generator options: render
    only the studies the options change (``training.synth.corpus.update_corpus``), when the two
    plans pair up study by study and the corpus on disk is the stamped one. False (nothing
    touched) otherwise, and the caller regenerates the whole corpus."""
    from training.synth.corpus import (GENERATOR_OPTIONS, generator_options, plan_corpus,  # noqa: PLC0415
                                       update_corpus)

    ident = ("size", "seed", "sources")
    stamped = {k: v for k, v in have.items() if k not in ident}
    if any(have.get(k) != want[k] for k in ident) or set(stamped) - {o.name for o in GENERATOR_OPTIONS}:
        return False   # another corpus, or an option this version does not know: regenerate
    try:
        old = plan_corpus(seed, size, **generator_options(stamped))
    except ValueError:
        return False
    new = plan_corpus(seed, size, **options)
    done = update_corpus(corpus, old, new, workers=workers or min(4, os.cpu_count() or 1))
    if done is None:
        return False
    logger.info("updated synthetic corpus %s to %s: %d of %d studies rendered anew", corpus, want,
                done[1], len(new))
    return True


STAGE_DONE = "recipe-stage.json"


def stage_key(cfg: TrainConfig, corpus_id: dict[str, Any], inputs: list[Path]) -> dict[str, Any]:
    """What decides a stage's output: its configuration (progress display aside), the corpus
    (size, seed, source fingerprint) and the sha256 of its input artifacts."""
    from engines.pipeline import file_sha256  # noqa: PLC0415
    from training.tasks import jsonable  # noqa: PLC0415

    key = {"config": {k: v for k, v in cfg.to_dict().items() if k != "progress"},
           "corpus": corpus_id, "inputs": [file_sha256(p) for p in inputs]}
    return json.loads(json.dumps(jsonable(key)))


def _comparable(key: Any) -> Any:
    """A stage key without the configuration entries that hold ``TrainConfig``'s default: an
    option added to ``TrainConfig`` later, at a default that keeps the old behaviour, then
    leaves the stages finished before it reusable (their stored keys lack it)."""
    from training.config import TrainConfig  # noqa: PLC0415
    from training.tasks import jsonable  # noqa: PLC0415

    if not isinstance(key, dict) or not isinstance(key.get("config"), dict):
        return key
    defaults = json.loads(json.dumps(jsonable(TrainConfig(task=key["config"].get("task", "finetune")).to_dict())))
    config = {k: v for k, v in key["config"].items() if k == "task" or not (k in defaults and defaults[k] == v)}
    return dict(key, config=config)


def _run_stage(fn: Any, manifest: Path, cfg: TrainConfig, corpus_id: dict[str, Any],
               inputs: list[Path]) -> Any:
    """Run one stage, or reuse its finished output: a stage folder holding ``recipe-stage.json``
    written by a run with the same configuration (progress aside), the same corpus and the same
    input artifact (sha256) is not trained again. An edit to one stage of a recipe (say the
    classifier's budget) then re-runs that stage and the ones after it, not the hour before it."""
    from engines.pipeline import file_sha256  # noqa: PLC0415
    from training.tasks import TrainOutcome, jsonable  # noqa: PLC0415

    key = stage_key(cfg, corpus_id, inputs)
    done = Path(cfg.out) / STAGE_DONE
    if done.is_file():
        try:
            rec = json.loads(done.read_text())
        except ValueError:
            rec = {}
        artifact = Path(rec.get("outcome", {}).get("artifact", ""))
        if _comparable(rec.get("key")) == _comparable(key) and artifact.is_file() and file_sha256(artifact) == rec.get("sha256"):
            logger.info("stage %s: reusing %s (same configuration, corpus and inputs)", cfg.task, artifact)
            o = rec["outcome"]
            return TrainOutcome(artifact=artifact, metrics=o["metrics"], data_summary=o["data_summary"],
                                images_per_s=o["images_per_s"], members=[Path(m) for m in o["members"]])
    done.unlink(missing_ok=True)
    out = fn(manifest, cfg)
    done.write_text(json.dumps(jsonable({
        "key": key, "sha256": file_sha256(out.artifact),
        "outcome": {"artifact": str(out.artifact), "metrics": out.metrics, "data_summary": out.data_summary,
                    "images_per_s": out.images_per_s, "members": [str(m) for m in out.members]}}), indent=1))
    return out


def run_recipe(path: str | Path, *, device: str | None = None, work_dir: str | Path | None = None,
               output: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the recipe at ``path``; returns {"artifact", "metrics", "stages"}."""
    from engines.artifact import ModelCard, load_tensors, save_artifact  # noqa: PLC0415
    from training.tasks import run_classifier, run_finetune, run_pretrain  # noqa: PLC0415

    recipe, sha = load_recipe(path)
    if "soup" in recipe:
        return _run_soup(path, recipe, sha, device, work_dir, output, progress)
    base_path = ensure_base(path, recipe["base"]) if "base" in recipe else None
    work, out_path, manifest, corpus_id = _prepare(path, recipe, work_dir, output, progress)
    cache = work / "cache"
    ft_cfg = _stage_config(recipe, "finetune", "finetune", work / "runs" / "finetune", cache, device, progress)
    if base_path is not None:
        ft_cfg = dataclasses.replace(ft_cfg, from_checkpoint=str(base_path))
        ft = _run_stage(run_finetune, manifest, ft_cfg, corpus_id, [base_path])
        cl_groups, cl_card = load_tensors(base_path)
        outcomes = {"finetune": ft}
        classifier_preset, classifier_training = cl_card.classifier_preset, (cl_card.training or {}).get("classifier")
    else:
        pre_cfg = _stage_config(recipe, "pretrain", "pretrain", work / "runs" / "pretrain", cache, device, progress)
        pre = _run_stage(run_pretrain, manifest, pre_cfg, stage_corpus(corpus_id, "pretrain"), [])
        ft_cfg = dataclasses.replace(ft_cfg, from_checkpoint=str(pre.artifact))
        ft = _run_stage(run_finetune, manifest, ft_cfg, corpus_id, [pre.artifact])
        cl_cfg = _stage_config(recipe, "classifier", "classifier", work / "runs" / "classifier", cache, device,
                               progress)
        cl = _run_stage(run_classifier, manifest, cl_cfg, corpus_id, [])
        cl_groups, cl_card = load_tensors(cl.artifact)
        outcomes = {"pretrain": pre, "finetune": ft, "classifier": cl}
        classifier_preset, classifier_training = cl_card.preset, cl_card.training

    ft_groups, ft_card = load_tensors(ft.artifact)
    modules = {k: v for k, v in ft_groups.items()}
    modules["classifier"] = cl_groups["classifier"]
    training: dict[str, Any] = {"recipe": Path(path).name, "recipe_sha256": sha, "recipe_config": recipe,
                                "finetune": ft_card.training, "classifier": classifier_training}
    data_summary: dict[str, Any] = {"corpus": _corpus_summary(recipe),
                                    **{name: o.data_summary for name, o in outcomes.items()}}
    if cl_card.preprocess != ft_card.preprocess:
        # one card, one PreprocessConfig: the classifier then sees inputs prepared other than in
        # its training (e.g. a kept classifier under a new ``ct_pixel_mm``); recorded, and the
        # test evaluation below reports its accuracy under the card's preprocessing
        logger.warning("the classifier was trained with other preprocessing than the IQA model; "
                       "the artifact uses the IQA model's")
        training["classifier_preprocess"] = cl_card.preprocess
    if base_path is not None:
        btr = cl_card.training or {}
        training["base"] = {"sha256": str(recipe["base"]["sha256"]).lower(), "git": recipe["base"].get("git"),
                            "recipe": btr.get("recipe"), "recipe_sha256": btr.get("recipe_sha256"),
                            "finetune": btr.get("finetune"), "classifier": btr.get("classifier")}
        data_summary["base"] = cl_card.data_summary
    card = ModelCard(
        task="iqa", preset=ft_card.preset, prompt_vocab=ft_card.prompt_vocab, preprocess=ft_card.preprocess,
        label_scale=ft_card.label_scale, n_slices=ft_card.n_slices, classifier_preset=classifier_preset,
        ensemble_size=ft_card.ensemble_size,
        data_summary=data_summary, metrics={}, training=training)
    save_artifact(out_path, modules, card, dtype="fp16")
    return _test_and_record(out_path, modules, card, manifest, work, outcomes, ft_cfg.device,
                            ft_cfg.batch_size, ft_cfg.workers, progress, recipe.get("tta_policy", _NO_POLICY),
                            recipe.get("feature_head", _NO_POLICY))


def _run_soup(path: str | Path, recipe: dict[str, Any], sha: str, device: str | None,
              work_dir: str | Path | None, output: str | Path | None, progress: bool) -> dict[str, Any]:
    """A soup recipe: check and extract the members (as ``base``), average their IQA networks
    (``training.soup``), pack them with the members' common classifier, score the validation split
    plain (the card's ``val`` metric, which a soup has no training run to give), then step 5's
    test evaluation and steps 6 / 7 as for any recipe."""
    from engines.artifact import ModelCard, save_artifact  # noqa: PLC0415
    from training.evaluate import evaluate_modes  # noqa: PLC0415
    from training.soup import average_iqa  # noqa: PLC0415

    members = _soup_members(recipe)
    paths = [ensure_base(path, m) for m in members]
    work, out_path, manifest, _ = _prepare(path, recipe, work_dir, output, progress)
    cfg = _stage_config(recipe, "common", "finetune", work / "runs" / "soup", work / "cache", device, progress)
    modules, cards = average_iqa(paths, align_label_scale=recipe["soup"].get("align_label_scale", False))
    first = cards[0]
    soup = []
    for m, c in zip(members, cards):
        tr = c.training or {}
        soup.append({"sha256": str(m["sha256"]).lower(), "git": m.get("git"), "recipe": tr.get("recipe"),
                     "recipe_sha256": tr.get("recipe_sha256"), "finetune": tr.get("finetune"),
                     "base": tr.get("base"), **({"label_scale_map": tr["label_scale_map"]}
                                                 if "label_scale_map" in tr else {})})
    training: dict[str, Any] = {"recipe": Path(path).name, "recipe_sha256": sha, "recipe_config": recipe,
                                "soup": soup, "classifier": (first.training or {}).get("classifier")}
    card = ModelCard(
        task=first.task, preset=first.preset, prompt_vocab=first.prompt_vocab, preprocess=first.preprocess,
        label_scale=first.label_scale, n_slices=first.n_slices, classifier_preset=first.classifier_preset,
        ensemble_size=first.ensemble_size, metrics={}, training=training,
        data_summary={"corpus": _corpus_summary(recipe), "members": [c.data_summary for c in cards]})
    save_artifact(out_path, modules, card, dtype="fp16")
    tta_section = recipe.get("tta_policy", _NO_POLICY)
    # plain, for the card; a TTA policy chosen on validation gets its modes from the same pass
    val_reports = evaluate_modes(out_path, manifest, modes=("none", *_policy_modes(tta_section, "val")),
                                 split="val", device=cfg.device, batch_size=cfg.batch_size,
                                 workers=cfg.workers, progress=progress)
    logger.info("soup of %d members: validation SRCC %.4f", len(paths), val_reports["none"]["overall"]["srcc"])
    return _test_and_record(out_path, modules, card, manifest, work, {}, cfg.device, cfg.batch_size,
                            cfg.workers, progress, tta_section, recipe.get("feature_head", _NO_POLICY),
                            val_reports=val_reports)


def _prepare(path: str | Path, recipe: dict[str, Any], work_dir: str | Path | None, output: str | Path | None,
             progress: bool) -> tuple[Path, Path, Path, dict[str, Any]]:
    """Work dir, output path, the corpus' manifest (generated unless already there) and its identity."""
    work = Path(work_dir or recipe.get("work_dir") or "runs/default")
    out_path = Path(output or recipe.get("output") or work / "default.safetensors")
    synth = recipe.get("synth") or {}
    manifest = ensure_corpus(work / "corpus", str(synth.get("size", "small")), int(synth.get("seed", 0)),
                             progress, synth.get("workers"), **_generator_options(recipe))
    corpus_id = json.loads((work / "corpus" / CORPUS_STAMP).read_text())   # written by ensure_corpus
    return work, out_path, manifest, corpus_id


def _corpus_summary(recipe: dict[str, Any]) -> dict[str, Any]:
    synth = recipe.get("synth") or {}
    return {"generator": "mediqa synth", "size": str(synth.get("size", "small")), "seed": int(synth.get("seed", 0)),
            **_non_default(_generator_options(recipe), always=True),
            "note": "synthetic degradations of real anatomy; scores are derived from "
                    "the simulated physics, not from readers"}


_NO_POLICY = object()   # the recipe has no tta_policy section (an empty section means the defaults)


def _test_and_record(out_path: Path, modules: dict[str, Any], card: Any, manifest: Path, work: Path,
                     outcomes: dict[str, Any], device: str, batch_size: int, workers: int,
                     progress: bool, tta_section: Any = _NO_POLICY,
                     feature_section: Any = _NO_POLICY,
                     val_reports: dict[str, Any] | None = None) -> dict[str, Any]:
    """Step 5's second half: evaluate the packed artifact on the test split (as ``mediqa evaluate``),
    write the metrics into its card and ``<work>/recipe_summary.json``; then step 6 when the
    recipe has a ``tta_policy`` section and step 7 when it has a ``feature_head`` section.
    ``val_reports``: mode → report of the validation split already measured with these tensors (a
    soup's, which has no training run): its plain ("none") metrics are the card's validation
    metrics (default: the fine-tune stage's), and step 6 uses them all instead of measuring again."""
    from engines.artifact import save_artifact  # noqa: PLC0415
    from training.evaluate import evaluate_modes  # noqa: PLC0415
    from training.tasks import jsonable  # noqa: PLC0415

    # tta none: the card's test metrics are the network's own (a TTA policy, chosen later on the
    # validation split by `mediqa train tta-policy`, records its own measurements). A policy
    # chosen on the test split gets its modes from the same pass (one read of the split).
    modes = _policy_modes(tta_section, "test")
    reports = evaluate_modes(out_path, manifest, modes=("none", *modes), split="test", device=device,
                             batch_size=batch_size, workers=workers, progress=progress)
    rep = reports["none"]
    stages = {name: {"metrics": o.metrics, "data": o.data_summary, "images_per_s": o.images_per_s}
              for name, o in outcomes.items()}
    metrics = {"val": val_reports["none"]["overall"] if val_reports else outcomes["finetune"].metrics.get("val"),
               "test": {k: rep[k] for k in ("overall", "groups")},
               "test_classifier": rep.get("classifier"),
               "pretrain_test": outcomes["pretrain"].metrics.get("test") if "pretrain" in outcomes else None,
               "images_per_s": {s: v["images_per_s"] for s, v in stages.items()}}
    card = dataclasses.replace(card, metrics=jsonable(metrics))
    save_artifact(out_path, modules, card, dtype="fp16")
    summary: dict[str, Any] = {"artifact": str(out_path), "metrics": metrics, "stages": stages}
    if tta_section is not _NO_POLICY:
        summary["tta_policy"] = _choose_policy(out_path, manifest, work, tta_section, device, batch_size,
                                               workers, progress, {"test": reports, "val": val_reports or {}})
    if feature_section is not _NO_POLICY:
        from training.feature_head import fit_feature_head_for, write_feature_head  # noqa: PLC0415

        opts = _feature_head_options(feature_section)
        network = None
        pol = summary.get("tta_policy")
        if pol and pol["selection"]["split"] == opts["choose_split"]:
            # step 6 has just scored that split in every mode: its --tta auto scores, not a new pass
            from engines.tta import TTAPolicy  # noqa: PLC0415
            from training.tta_policy import auto_predictions, kept_reports  # noqa: PLC0415

            reports = kept_reports(work / "tta-policy", pol["selection"]["model_sha256"], manifest,
                                   opts["choose_split"])
            network = auto_predictions(TTAPolicy.from_dict(pol), reports)
        head = fit_feature_head_for(out_path, manifest, device=device, batch_size=batch_size, workers=workers,
                                    progress=progress, network=network, **opts)
        write_feature_head(out_path, head)
        summary["feature_head"] = head.to_dict()
        logger.info("feature head: blend %s", head.blends)
    (work / "recipe_summary.json").write_text(json.dumps(jsonable(summary), indent=1))
    logger.info("recipe done: %s (test SRCC %.4f)", out_path, rep["overall"]["srcc"])
    return {**summary, "artifact": out_path}


def _policy_modes(section: Any, split: str) -> tuple[str, ...]:
    """The TTA modes step 6 will measure on ``split`` (none when the recipe chooses no policy
    there), so that the pass that records ``split`` can measure them too."""
    if section is _NO_POLICY:
        return ()
    opts = _tta_policy_options(section)
    return tuple(opts["modes"]) if opts["split"] == split else ()


def _choose_policy(out_path: Path, manifest: Path, work: Path, section: Any, device: str, batch_size: int,
                   workers: int, progress: bool, measured: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Step 6: choose the per-modality TTA policy on the section's held-out split and write it into
    the packed artifact's card (tensors unchanged). ``measured``: split → (mode → report) already
    taken with these tensors; the chooser measures only what is missing. Returns the policy as
    recorded."""
    from training.tta_policy import choose_tta_policy, write_policy  # noqa: PLC0415

    opts = _tta_policy_options(section)
    policy = choose_tta_policy(out_path, manifest, split=opts["split"], modes=opts["modes"], device=device,
                               batch_size=batch_size, workers=workers, progress=progress,
                               reports_dir=work / "tta-policy", min_gain=opts["min_gain"],
                               min_studies=opts["min_studies"], known=(measured or {}).get(opts["split"]))
    write_policy(out_path, policy)
    logger.info("TTA policy chosen on the %s split: %s", opts["split"], policy.describe())
    return policy.to_dict()


def finish_recipe(path: str | Path, artifact: str | Path, *, device: str | None = None,
                  work_dir: str | Path | None = None, output: str | Path | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Step 5's second half alone, for an artifact this recipe packed whose test evaluation was cut
    short (a lent GPU given back, a killed job): evaluate it on the test split of the recipe's corpus
    (regenerated when absent: ``mediqa synth`` is deterministic) and record the metrics in its card,
    with the validation metrics and speeds of the stage records in ``<work_dir>/runs/*``.

    Refuses an artifact packed by another recipe (``recipe_sha256``) or stage records that did not
    produce it (their fine-tune and classifier data summaries must be the ones in its card). Writes ``output``
    (default: the artifact itself; the weights are copied unchanged, fp16 stays fp16)."""
    from engines.artifact import load_tensors  # noqa: PLC0415
    from training.tasks import TrainOutcome  # noqa: PLC0415

    recipe, sha = load_recipe(path)
    if "soup" in recipe:
        raise ConfigError(f"{Path(path).name} is a soup recipe: it trains nothing, so there is nothing to "
                          "finish; run it again (mediqa train recipe)")
    artifact = Path(artifact)
    modules, card = load_tensors(artifact)
    tr = card.training or {}
    if tr.get("recipe_sha256") != sha:
        raise ConfigError(f"{artifact.name} was not packed by {Path(path).name} (recipe sha256 "
                          f"{str(tr.get('recipe_sha256'))[:12]}, this recipe {sha[:12]})")
    if "classifier" not in modules:
        raise ConfigError(f"{artifact.name} holds no prompt classifier: not a recipe's packed artifact")
    work, _, manifest, _ = _prepare(path, recipe, work_dir, None, progress)
    outcomes = {}
    for stage in (("finetune",) if "base" in recipe else ("pretrain", "finetune", "classifier")):
        rec_path = work / "runs" / stage / STAGE_DONE
        if not rec_path.is_file():
            raise ConfigError(f"no record of the {stage} stage at {rec_path}: run the recipe, or copy the "
                              "stage records of the run that packed the artifact there")
        o = json.loads(rec_path.read_text())["outcome"]
        outcomes[stage] = TrainOutcome(artifact=Path(o["artifact"]), metrics=o["metrics"],
                                       data_summary=o["data_summary"], images_per_s=o["images_per_s"],
                                       members=[Path(m) for m in o["members"]])
    if card.data_summary.get("finetune") != outcomes["finetune"].data_summary or \
            ("classifier" in outcomes and card.data_summary.get("classifier") != outcomes["classifier"].data_summary):
        raise ConfigError(f"the stage records in {work / 'runs'} describe other training data than "
                          f"{artifact.name}'s card: not the run that packed it")
    out_path = Path(output) if output else artifact
    cfg = _stage_config(recipe, "finetune", "finetune", work / "runs" / "finetune", work / "cache", device, progress)
    return _test_and_record(out_path, modules, card, manifest, work, outcomes, cfg.device,
                            cfg.batch_size, cfg.workers, progress, recipe.get("tta_policy", _NO_POLICY),
                            recipe.get("feature_head", _NO_POLICY))
