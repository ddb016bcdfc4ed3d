"""The subcommands: ``pretrain``, ``train``, ``test`` and ``compare``, as plain functions."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_vit import __version__ as lora_vit_version

from ..attacks.separability import format_separability, separability, served_pairs
from ..attacks.sets import (
    FixedAttackSet,
    check_attack_config,
    drop_methods,
    made_sources,
    required_morphs,
    training_sets,
)
from ..data.folders import check_splits
from ..data.images import ImageDataset
from ..data.recorded import SplitRecord, describe_seen, same_data
from ..data.samples import DataError, Sample
from ..data.shortcuts import SHORTCUTS, grey, sample_greys, shortcut_scores
from ..evaluation.bootstrap import Resamples, draw
from ..evaluation.plots import save_plots
from ..evaluation.report import (
    add_auc_differences,
    choose_threshold,
    format_table,
    interval_text,
    iso_report,
    operating_points,
    shortcut_report,
    shortcut_verdict,
    write_json,
    write_scores_csv,
)
from ..faces.cropping import CropPolicy
from ..io.config import Config, ConfigError
from ..io.errors import MadlabError
from ..io.files import write_text_atomically
from ..model import hub
from ..model.backbone import (
    DEFAULT_IMAGE_SIZE,
    BackboneError,
    adapt_mae,
    backbone_fingerprint,
    cache_root,
    default_backbone_dir,
    load_backbone,
    pretrain_mae,
)
from ..model.checkpoint import CheckpointError, read_metadata, save_model
from ..model.families import BackboneSpec, quiet_transformers
from ..model.hub import is_hub_id
from ..model.named import NAMED, SMALL_VIT, is_small_vit
from ..model.network import MorphDetector, count_trainable
from ..sources.reading import evaluation_samples, load_samples
from .detector import Detector, describe_file
from .distributed import barrier, current
from .inference import predict
from .resume import STATE_FILE
from .speed import resolve_precision, threads
from .training import train

__all__ = ["Env", "backbone_banner", "check_output_dir", "holds_smoke_run", "run_compare", "run_data", "run_pretrain",
           "run_test", "run_train"]

MODEL_FILE = "morph_detector.safetensors"
SMOKE_TEST_BANNER = (
    "NOTE: this run uses embedded data (by default the ORL faces: 40 people, 92x112 grey, courtesy of AT&T Laboratories"
    " Cambridge) with morphs made in-process. It is a smoke test of the pipeline, NOT a MAD"
    " benchmark; its numbers say little about real morphing attacks. For real data: train --data ROOT, then test"
    " (docs/detector.md)."
)


def backbone_banner(config: Config) -> str | None:
    """The line a run starts with when its backbone is one the example builds: what and from where."""
    if config.backbone in NAMED:
        return f"backbone {config.backbone}: {NAMED[config.backbone].origin}"
    if is_small_vit(config.backbone):
        return f"backbone {SMALL_VIT}: the example's own small ViT, MAE-pretrained on the training bona fides"
    return None


@dataclass
class Env:
    """Where things go and how chatty to be."""

    cache_dir: Path
    progress: bool = True
    say: Callable[[str], None] = print


def _seed(config: Config) -> None:
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    torch.set_num_threads(threads(config))


def _split(samples: list[Sample], split: str) -> list[Sample]:
    return [s for s in samples if s.split == split]


def _data_settings(config: Config, env: Env) -> dict[str, Any]:
    """How the run's data are read and cropped: the embedded set, contributor matching, and
    the crop policy (aligned faces or whole images)."""
    return {"embedded": config.embedded_data, "match_contributors": config.morph_match_contributors,
            "crop": CropPolicy.from_config(config),
            "cache": cache_root(env.cache_dir)}


def run_data(config: Config, env: Env, reports: list[dict[str, Any]] | None = None,
             testing: bool = False) -> list[Sample]:
    """Load the run's samples and print what was loaded, skipped, dropped and warned about.

    Args:
        reports: If given, the data report (counts, skips, notes) is appended to it, for metrics.json.
        testing: Whether the test split is needed (it must hold morphs even when training synthesises them).
    """
    check_attack_config(config)
    need = required_morphs(config.attacks, testing)
    samples, report = load_samples(config.data, config.seed, config.morph_methods, config.morphs_per_face,
                                   (config.train_val_pct, config.dev_pct), config.identity_pattern,
                                   need_morphs=need, **_data_settings(config, env))
    if config.exclude_methods:
        samples = drop_methods(samples, config.exclude_methods, report)
        check_splits(samples, report, need)
    for line in report.lines(samples):
        env.say(line)
    if reports is not None:
        reports.append(report.to_dict(samples))
    return samples


def _pretrain_settings(config: Config) -> dict[str, Any]:
    return {"image_size": config.image_size or DEFAULT_IMAGE_SIZE, "mask_ratio": config.mae_mask_ratio,
            "epochs": config.pretrain_epochs, "lr": config.pretrain_lr, "batch_size": 32}


def ensure_backbone(config: Config, samples: list[Sample], env: Env, allow_pretrain: bool = True) -> str:
    """The backbone: a named one (:data:`~..model.named.NAMED`, built once into the cache),
    ``config.backbone`` (a folder, made absolute, a hub id or ``timm:<arch>``), or the example's
    small ViT (``mae-vit-tiny``), MAE-pretrained if missing.

    The default is keyed by a hash of the bona fide *training* images and the pretraining
    settings, so a different dataset or seed never reuses another run's backbone. Under
    ``torchrun`` rank 0 pretrains (or finds the cache) while the other ranks wait, then they
    read what it wrote.
    """
    if config.backbone in NAMED:
        return str(_named_backbone(config.backbone, env))
    if not is_small_vit(config.backbone):
        if config.backbone.startswith("timm:") or is_hub_id(config.backbone):
            return config.backbone
        return str(Path(config.backbone).expanduser().resolve())
    d = current()
    if d.active and not d.main:
        barrier()
        return str(_default_backbone(config, samples, env, allow_pretrain=False))
    target = _default_backbone(config, samples, env, allow_pretrain)
    barrier()
    return str(target)


def _named_backbone(name: str, env: Env) -> Path:
    """The folder of a backbone known by name, built once into the cache (rank 0 builds, the
    other ranks wait, then find it)."""
    named, cache = NAMED[name], cache_root(env.cache_dir)
    d = current()
    if d.active and not d.main:
        barrier()
        return named.build(cache, env.say)
    folder = named.build(cache, env.say)
    barrier()
    return folder


def _default_backbone(config: Config, samples: list[Sample], env: Env, allow_pretrain: bool) -> Path:
    settings = _pretrain_settings(config)
    bona_fide = [s for s in _split(samples, "train") if s.label == 0]
    dataset = ImageDataset(bona_fide, settings["image_size"])
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    target = default_backbone_dir(images, {**settings, "seed": config.seed}, cache_root(env.cache_dir))
    if (target / "config.json").is_file():
        env.say(f"using the cached MAE-pretrained backbone {target}")
        return target
    if not allow_pretrain:
        raise BackboneError(f"no pretrained backbone at {target}; run the 'pretrain' subcommand first")
    env.say(f"no cached backbone for these training images: MAE-pretraining the small ViT on the {len(images)}"
            f" bona fide training images ({settings['epochs']} epochs); it will be cached at {target}")
    start = time.perf_counter()
    pretrain_mae(images, settings, target, config.seed, env.progress)
    losses = json.loads((target / "pretrain.json").read_text())["losses"]
    env.say(f"pretraining done in {time.perf_counter() - start:.1f} s;"
            f" masked-patch MSE {losses[0]:.4f} -> {losses[-1]:.4f}")
    return target


ADAPTED_DIR = "mae_backbone"


def run_pretrain(config: Config, env: Env) -> Path:
    """Make the backbone ready: build a named one (:data:`~..model.named.NAMED`) into the cache,
    pretrain (or find in the cache) the small ViT for this data and seed, or, with a
    ``vit_mae`` folder as ``--backbone``, continue its MAE pretraining on the bona fide
    training images and write the adapted folder to ``<output_dir>/mae_backbone``."""
    _seed(config)
    quiet_transformers()
    if config.backbone in NAMED:
        return _named_backbone(config.backbone, env)
    if not is_small_vit(config.backbone):
        return _adapt_backbone(config, env)
    return ensure_backbone(config, run_data(config, env), env)


def _adapt_backbone(config: Config, env: Env) -> Path:
    given = config.backbone or ""
    source = hub.resolve(given)[0] if is_hub_id(given) else Path(given).expanduser().resolve()
    _, spec = load_backbone(source, None, config.image_size)
    if spec.family != "vit_mae":
        raise ConfigError(f"pretrain --backbone continues MAE pretraining and needs a vit_mae folder;"
                          f" {str(source)!r} holds a {spec.family!r} model")
    target = Path(config.output_dir) / ADAPTED_DIR
    if target.exists():
        raise CheckpointError(f"{target} already exists; remove it or choose another --output_dir")
    if current().active:
        raise ConfigError("pretrain --backbone runs in one process; run it without torchrun")
    samples = run_data(config, env)
    bona_fide = [s for s in _split(samples, "train") if s.label == 0]
    dataset = _datasets(bona_fide, spec, config)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    settings = {"mask_ratio": config.mae_mask_ratio, "epochs": config.pretrain_epochs, "lr": config.pretrain_lr,
                "batch_size": config.batch_size, "image_size": spec.image_size}
    lora = {"targets": config.lora_target_modules, "r": config.lora_r, "alpha": config.lora_alpha}
    env.say(f"continuing MAE pretraining of {source} on the {len(images)} bona fide training images"
            f" ({settings['epochs']} epochs, LoRA r={lora['r']} on {lora['targets']} of the encoder, then merged)")
    adapt_mae(source, images, settings, target, config.seed, lora, env.progress)
    info = json.loads((target / "pretrain.json").read_text())
    env.say(f"done in {info['seconds']:.1f} s; masked-patch loss with fixed masks"
            f" {info['fixed_mask_loss']['before']:.4f} -> {info['fixed_mask_loss']['after']:.4f}"
            f" (epoch means {info['losses'][0]:.4f} -> {info['losses'][-1]:.4f}); train on it with"
            f" --backbone {target}")
    return target


def _build(source: str, config: Config) -> MorphDetector:
    _seed(config)
    # image_size sizes the small ViT when it is pretrained; on any other backbone it overrides
    # the input size (position embeddings interpolated); a named backbone has its own default.
    size = None if is_small_vit(config.backbone) else config.image_size
    if size is None and config.backbone in NAMED:
        size = NAMED[config.backbone].image_size
    backbone, spec = load_backbone(source, config.backbone_weights, size)
    return MorphDetector.from_config(backbone, spec, config)


def _datasets(samples: list[Sample], spec: BackboneSpec, config: Config, augment: bool = False) -> ImageDataset:
    return ImageDataset(samples, spec.image_size, augment=augment, mean=spec.mean, std=spec.std,
                        cache_mb=config.image_cache_mb, num_workers=config.num_workers)


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux: the peak resident memory of this whole process so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


RUN_FILES = (MODEL_FILE, STATE_FILE, "train_log.csv", "train_summary.json")


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a folder that holds another run, unless told what to do with it.

    Raises:
        CheckpointError: If ``out`` holds run files and neither ``resume`` nor ``overwrite``
            is set, or ``resume`` is set without a checkpoint there.
    """
    if resume and overwrite:
        raise CheckpointError("--resume continues the run in the output folder, --overwrite discards it; pick one")
    if resume:
        if not (out / STATE_FILE).is_file():
            raise CheckpointError(f"--resume: no training checkpoint {out / STATE_FILE} to continue from")
        return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not overwrite:
        raise CheckpointError(
            f"the output folder {str(out)!r} already holds a run ({', '.join(found)}); pass --resume to continue"
            " it, --overwrite to replace it, or choose another --output_dir")


def holds_smoke_run(out: Path) -> bool:
    """Whether ``out`` holds only a finished default smoke-test run (embedded data), which the
    no-argument run may replace; a real run, or an unfinished one, is never replaced silently."""
    try:
        return read_metadata(out / MODEL_FILE)["config"]["data"] is None
    except (CheckpointError, KeyError, TypeError):
        return False


def _views_note(config: Config) -> str:
    """The views each score averages, in words, as the training log reports them."""
    note = "each image and its mirror image (test_time_flip)" if config.flip_scores else "each image"
    if config.shift_scores:
        note += f", each also rolled {config.shift_scores} px along both diagonals (test_time_shift)"
    return note


def run_train(config: Config, env: Env, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Pretrain if needed, fine-tune, fix the threshold on dev, save the model file.

    Returns:
        A summary: model path, strategy, trainable parameters, file size, training time,
        memory figures and the dev results.
    """
    quiet_transformers()
    out = Path(config.output_dir)
    d = current()
    check_output_dir(out, resume, overwrite)
    barrier()  # every rank has checked the folder before rank 0 writes into it
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    _seed(config)
    samples = run_data(config, env)
    backbone_dir = ensure_backbone(config, samples, env)
    model = _build(backbone_dir, config).to(d.device)
    spec = model.spec
    env.say(f"backbone: {spec.family} {spec.source}, {spec.image_size} px, feature {spec.feature},"
            f" mean {[round(m, 4) for m in spec.mean]}, std {[round(v, 4) for v in spec.std]}")
    fingerprint = backbone_fingerprint(model.backbone)
    size = model.image_size
    train_set = _datasets(_split(samples, "train"), spec, config, augment=config.use_cls_aug)
    dev_set = _datasets(_split(samples, "dev"), spec, config)
    # Aligned faces give the synthetic attacks' masks their 5 landmarks; whole images a centred ellipse.
    landmarks = CropPolicy.from_config(config).landmarks(size)
    train_set, dev_set, dev_note = training_sets(train_set, dev_set, config.attacks, config.seed, landmarks,
                                                 check_attack_config(config), tuple(config.morph_methods),
                                                 config.shared_resample_p, config.generated_flow_p,
                                                 config.synthetic_match)
    env.say(f"training attacks: attacks={config.attacks}; {dev_note}")
    env.say(f"training schedule: {config.schedule_note}")
    if config.flip_scores or config.shift_scores:
        env.say(f"scores: the mean logit of {_views_note(config)}, for the dev epochs, the thresholds and"
                " every later command")
    separable = None
    if made_sources(config.attacks):
        env.say(f"attacks made from bona fides ({', '.join(made_sources(config.attacks))}): masks and warps from "
                + ("the 5 landmarks of each aligned crop (face_crop=align)" if landmarks else
                   "a centred ellipse (face_crop=none: no landmarks)"))
        real, made = served_pairs(train_set)
        separable = separability(real, made)
        env.say(format_separability(separable, len(real)))
    result = train(model, train_set, dev_set, config, out / "train_log.csv", env.progress, env.say,
                   state_path=out / STATE_FILE, resume=resume)
    dev_labels = np.array([s.label for s in dev_set.samples])
    precision = resolve_precision(config, d.device, model.spec.hidden_size)
    dev_scores, _ = predict(model, dev_set, config.batch_size, progress=False, precision=precision,
                            num_workers=config.num_workers)
    threshold = choose_threshold(dev_scores, dev_labels, config.threshold_rule)
    shortcut_thresholds = {name: choose_threshold(stat, dev_labels, config.threshold_rule)
                           for name, stat in shortcut_scores(_dev_greys(dev_set, size)).items()}
    env.say(f"best epoch {result.best_epoch} (by {config.selection_metric}) restored: dev loss"
            f" {result.best_dev_loss:.4f}, dev D-EER {100 * result.best_dev_eer:.1f}%;"
            f" threshold {threshold['value']:.4f} ({config.threshold_rule})")
    trainable = count_trainable(model) if config.freeze_strategy != "gradual_unfreeze" else sum(
        p.numel() for p in model.parameters())
    metadata = {
        "format": "madlab-morph-detector",
        "config": config.to_dict(),
        "strategy": config.strategy,
        "backbone": {"path": str(backbone_dir), "fingerprint": fingerprint, "image_size": size,
                     "default": is_small_vit(config.backbone), "spec": spec.to_dict()},
        "threshold": threshold,
        "thresholds": operating_points(dev_scores, dev_labels),  # predict --operating_point
        "shortcut_thresholds": shortcut_thresholds,  # for test on other data, which has no dev split of its own
        "training": {"best_epoch": result.best_epoch, "best_dev_loss": result.best_dev_loss,
                     "best_dev_eer": result.best_dev_eer, "epochs_run": len(result.history),
                     "stopped_early": result.stopped_early, "seconds": result.seconds,
                     "attacks": config.attacks, "dev_attacks": dev_note, "exclude_methods": config.exclude_methods,
                     "synthetic_separability_auc": separable},
        "lora_vit_version": lora_vit_version,
        # What each split held, so that test scores these images and no others (madlab.data.recorded).
        "split": SplitRecord.of(samples, config.data).to_dict(),
    }
    model_path = out / MODEL_FILE
    if d.main:  # under torchrun every rank holds the same weights; one writes them
        save_model(model, model_path, metadata, config.use_lora, head_only=config.strategy == "linear_probe")
    barrier()  # the file exists for every rank from here on
    # Optimiser state is two fp32 moments per trainable parameter, gradients one more.
    summary = {
        "strategy": config.strategy,
        "model_path": str(model_path),
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "checkpoint_bytes": model_path.stat().st_size,
        "train_seconds": result.seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "train_state_mb": trainable * 4 * 3 / 2**20,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),  # the best epoch is one of these (early stopping may end sooner)
        "stopped_early": result.stopped_early,
        "best_dev_loss": result.best_dev_loss,
        "best_dev_eer": result.best_dev_eer,
        "threshold": threshold["value"],
        "attacks": config.attacks,
        "dev_attacks": dev_note,
        "synthetic_separability_auc": separable,
        # Every file this run wrote, for the command's closing lines (the per-epoch checkpoint stays, for --resume).
        "written": [str(p.resolve()) for p in (model_path, out / "train_log.csv", out / "train_summary.json",
                                                 out / STATE_FILE)],
    }
    if d.main:
        write_json(out / "train_summary.json", summary)
    env.say(f"saved {model_path} ({summary['checkpoint_bytes'] / 1024:.1f} KiB)")
    return summary


def _dev_greys(dev_set: Any, size: int) -> list[np.ndarray]:
    """The grey image of every dev item, for the shortcut thresholds: decoded as the dataset decodes a
    given image, or the served pixels of a seeded synthetic dev attack (:class:`~.attacks.FixedAttackSet`)."""
    if isinstance(dev_set, FixedAttackSet):
        return [grey(dev_set.pixels(k).permute(1, 2, 0).numpy() / 255.0) for k in range(len(dev_set))]
    return sample_greys(dev_set.samples, size)


def run_test(model_path: str | os.PathLike[str], overrides: list[str], env: Env, output_dir: str | None = None,
             backbone: str | None = None, split: str | None = None, strict: bool = False) -> dict[str, Any]:
    """Rebuild the detector from ``model_path`` alone (a model or export file), score one split of
    the data (or all of it) and write the report.

    On the data it was trained on (compared resolved) a split is the one the model file recorded
    (:class:`~..data.recorded.SplitRecord`), found by content; an older file's split is computed
    again, with a note. Any scored image or person that training or dev saw is reported.

    Args:
        split: ``all``, ``train``, ``dev`` or ``test``. Default: ``test`` on the data the model was
            trained on, ``all`` on any other data set (``--override data=...``).
        strict: Refuse to score when an image or person seen in training or dev is among them.

    Raises:
        DataError: For a recorded split no longer all there, or (``strict``) images seen in training.
    """
    quiet_transformers()
    detector = Detector.load(model_path, overrides, backbone)
    config, model_path = detector.config, detector.path
    env.say(describe_file(detector.metadata))
    out = Path(output_dir or config.output_dir)
    record = _split_record(detector)
    other_data = not same_data(config.data, record.data if record else detector.metadata["config"].get("data"))
    split = split or ("all" if other_data else "test")
    threshold = detector.threshold("dev")
    data_reports: list[dict[str, Any]] = []
    check_attack_config(config)
    test, samples, data_report = evaluation_samples(
        config.data, split, config.seed, config.morph_methods, config.morphs_per_face,
        (config.train_val_pct, config.dev_pct), config.identity_pattern, **_data_settings(config, env),
        record=None if other_data else record)
    if record is None and split != "all" and not other_data:
        data_report.notes.append(
            f"this model file records no split (it was written before splits were recorded): the {split} split was"
            " computed again from the files there now, so images added or removed since training can have moved"
            " images between splits")
    seen = _seen(record, test, strict)
    found = len(samples) + sum(data_report.skipped.values())
    for line in data_report.lines(samples):
        env.say(line)
    data_reports.append({**data_report.to_dict(samples), "split": split, "scored": len(test), "found": found,
                         "seen_in_training": seen})
    what = "all images" if split == "all" else f"the {split} images"
    env.say(f"scoring {what}: {len(test)} of the {found} files found"
            f"{' (the data set the model was trained on)' if not other_data else ' (another data set)'}")
    if seen is not None:
        env.say(describe_seen(seen))
    if split in ("all", "train", "dev") and not other_data:
        env.say(f"note: {what} of the training data include images the model was trained or tuned on;"
                " their figures are optimistic")
    scores = detector.score(detector.dataset(test), desc=f"scoring {split}", progress=env.progress)
    labels = np.array([s.label for s in test])
    methods = [s.method for s in test]
    resamples = draw(labels, [s.identity for s in test])  # over the test people when every image names them
    report = iso_report(scores, labels, methods, threshold, resamples)
    report["shortcuts"], shortcut_test = _shortcuts(samples, test, split, detector, not other_data, resamples)
    add_auc_differences(report, scores, shortcut_test, labels, resamples)
    report["shortcut_verdict"] = shortcut_verdict(report)
    report["model"] = {"path": str(model_path), "strategy": config.strategy, "exported": detector.exported,
                       "test_time_flip": detector.model.flip_average, "test_time_shift": detector.model.shift,
                       "training": detector.metadata.get("training")}
    report["smoke_test"] = config.data is None
    report["data"] = data_reports[0]  # counts, skipped files, dropped leaks and warnings, as printed
    if current().main:  # every rank has every score (gathered); one writes them
        out.mkdir(parents=True, exist_ok=True)
        write_scores_csv(out / "scores.csv", [s.path for s in test], labels, methods, scores)
        write_json(out / "metrics.json", report)
        baselines = {name: (shortcut_test[name], base["threshold"]["value"])
                     for name, base in report["shortcuts"].items()}
        plots = save_plots(out, scores, labels, methods, threshold["value"], baselines)
        # Not in metrics.json (written above): the files, for the command's closing lines.
        report["written"] = [str(p.resolve()) for p in (out / "scores.csv", out / "metrics.json", *plots)]
    barrier()
    env.say(format_table(report))
    training = detector.metadata.get("training") or {}
    env.say(f"trained with attacks={training.get('attacks', 'given')}"
            + (f", without the methods {training['exclude_methods']}" if training.get("exclude_methods") else "")
            + (f"; {training['dev_attacks']}" if training.get("dev_attacks") else ""))
    return report


def _split_record(detector: Detector) -> SplitRecord | None:
    """The split the model file recorded at training, or ``None`` for a file from before splits were recorded.

    Raises:
        CheckpointError: If the record is malformed, naming the file.
    """
    if "split" not in detector.metadata:
        return None
    try:
        return SplitRecord.from_dict(detector.metadata["split"], repr(str(detector.path)))
    except DataError as err:
        raise CheckpointError(str(err)) from None


def _seen(record: SplitRecord | None, scored: list[Sample], strict: bool) -> dict[str, Any] | None:
    """What of ``scored`` training or dev saw (:meth:`~..data.recorded.SplitRecord.seen`); ``None`` when
    the model file recorded nothing to compare with.

    Raises:
        DataError: With ``strict``, if any scored image or person was seen, or nothing can be checked.
    """
    if record is None:
        if strict:
            raise DataError("--strict: this model file records no split (it was written before splits were"
                            " recorded), so nothing can check whether an image was seen in training; train again")
        return None
    seen = record.seen(scored)
    if strict and seen["seen"]:
        raise DataError(f"--strict: {seen['seen']} of the {seen['scored']} images to score were seen in training or"
                        f" dev (same content as {seen['images']['train']} train / {seen['images']['dev']} dev images;"
                        f" showing a train person: {seen['people']['train']}, a dev person: {seen['people']['dev']}),"
                        f" e.g. {seen['examples'][:3]}; nothing was scored")
    return seen


def _shortcuts(samples: list[Sample], scored: list[Sample], split: str, detector: Detector, training_data: bool,
               resamples: Resamples) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The shortcut baselines at the detector's input size, each with its τ from dev: the dev images of
    the data when the test split of the training data is scored, else the τ the model file recorded
    from its own dev split at training time (another data set has no dev split of its own).

    Returns:
        The report (name -> metrics) and the scored images' values of each statistic (for the plots);
        both empty for an older model file scored on other data.
    """
    rule = detector.config.threshold_rule
    size = detector.image_size
    stored = detector.metadata.get("shortcut_thresholds")
    # Methods held out of training (exclude_methods) were held out of dev too; a dev split without
    # morphs (attacks=synthetic) had seeded synthetic attacks, whose τ the model file recorded.
    dev = [s for s in _split(samples, "dev") if not (s.label == 1 and s.method in detector.config.exclude_methods)]
    if training_data and split == "test" and any(s.label == 1 for s in dev):
        dev_stats, dev_labels, fixed = shortcut_scores(sample_greys(dev, size)), np.array([s.label for s in dev]), None
    elif stored:
        dev_stats, dev_labels, fixed = None, None, stored
    else:
        return {}, {}
    test_stats = shortcut_scores(sample_greys(scored, size))
    report = shortcut_report(dev_stats, dev_labels, test_stats, np.array([s.label for s in scored]),
                             [s.method for s in scored], rule, {name: s.description for name, s in SHORTCUTS.items()},
                             fixed=fixed, resamples=resamples)
    return report, test_stats


COMPARE_DIR = "compare"  # under output_dir: one folder per strategy, and the table
COMPARE_STRATEGIES = {
    "lora": ["use_lora=true", "freeze_strategy=backbone_only"],
    "full_ft": ["use_lora=false", "freeze_strategy=none", "learning_rate=1e-4"],
    "linear_probe": ["use_lora=false", "freeze_strategy=backbone_only", "learning_rate=2e-3"],
}


def run_compare(config: Config, overrides: list[str], env: Env, entry: Path,
                overwrite: bool = False) -> list[dict[str, Any]]:
    """Train and test each strategy on the same data, each in its own process (so peak memory is its own).

    The learning rates are the usual per-strategy choices (LoRA 5e-4 as the seed guide says,
    full fine-tuning 1e-4, linear probe 2e-3); the user's ``--override`` values come after
    them and win.
    """
    quiet_transformers()
    if is_small_vit(config.backbone) or config.backbone in NAMED:
        run_pretrain(config, env)  # once, so no strategy's time includes pretraining or conversion
    out = Path(config.output_dir) / COMPARE_DIR
    rows = []
    for name, preset in COMPARE_STRATEGIES.items():
        sub = out / name
        quiet = [] if env.progress else ["--no_progress"]
        if not overwrite:
            check_output_dir(sub, resume=False, overwrite=False)
        # The parent resolved the cache (flag, $LORA_VIT_CACHE or default); children must use the same one.
        train_cmd = [sys.executable, str(entry), "train", "--cache_dir", str(cache_root(env.cache_dir)),
                     "--output_dir", str(sub), *quiet, *(["--overwrite"] if overwrite else [])]  # test has no such flag
        for item in [*preset, *overrides]:
            train_cmd += ["--override", item]
        if config.data:
            train_cmd += ["--data", config.data]
        if config.backbone:
            train_cmd += ["--backbone", config.backbone]
        if config.backbone_weights:
            train_cmd += ["--backbone_weights", config.backbone_weights]
        test_cmd = [sys.executable, str(entry), "test", "--model_path", str(sub / MODEL_FILE), "--output_dir", str(sub),
                    "--cache_dir", str(cache_root(env.cache_dir)), *quiet]
        env.say(f"--- compare: {name}")
        for step, cmd in (("train", train_cmd), ("test", test_cmd)):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise MadlabError(f"compare: {name} {step} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        summary = json.loads((sub / "train_summary.json").read_text())
        metrics = json.loads((sub / "metrics.json").read_text())
        rows.append({
            "strategy": name,
            "trainable_params": summary["trainable_params"],
            "checkpoint_kib": summary["checkpoint_bytes"] / 1024,
            "train_seconds": summary["train_seconds"],
            "peak_rss_mb": summary["peak_rss_mb"],
            "train_state_mb": summary["train_state_mb"],
            "best_epoch": summary["best_epoch"],
            "d_eer": metrics["overall"]["d_eer"],
            "auc": metrics["overall"]["auc"],
            "worst_d_eer": metrics["worst_case"]["d_eer"]["value"],
            **_auc_interval(metrics["overall"]),
        })
    # Every strategy is tested on the same dev and test images, so the shortcut baselines are the same for all.
    for base_name, base in metrics.get("shortcuts", {}).items():
        rows.append({**dict.fromkeys(rows[0], None), "strategy": f"shortcut:{base_name}",
                     "d_eer": base["overall"]["d_eer"], "auc": base["overall"]["auc"],
                     "worst_d_eer": base["worst_case"]["d_eer"]["value"], **_auc_interval(base["overall"])})
    write_json(out / "compare.json", rows)
    _write_compare_csv(out / "compare.csv", rows)
    env.say(format_compare(rows))
    return rows


def _auc_interval(part: dict[str, Any]) -> dict[str, float | None]:
    """``auc_low``/``auc_high`` of a report part (None for a metrics.json from before the intervals)."""
    bounds = part.get("intervals", {}).get("auc") or [None, None]
    return {"auc_low": bounds[0], "auc_high": bounds[1]}


def _write_compare_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(path, buffer.getvalue())


def format_compare(rows: list[dict[str, Any]]) -> str:
    head = (f"{'strategy':<14}{'trainable':>11}{'ckpt KiB':>10}{'train s':>9}{'peak RSS MB':>13}"
            f"{'opt+grad MB':>12}{'D-EER':>8}{'AUC':>7}{'AUC 95%':>13}{'worst D-EER':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["trainable_params"] is None:  # a shortcut baseline: no model, only the metrics
            lines.append(f"{r['strategy']:<20}{'-':>5}{'-':>10}{'-':>9}{'-':>13}{'-':>12}"
                         f"{100 * r['d_eer']:>7.1f}%{r['auc']:>7.3f}{_auc_span(r)}{100 * r['worst_d_eer']:>12.1f}%")
            continue
        lines.append(f"{r['strategy']:<14}{r['trainable_params']:>11,}{r['checkpoint_kib']:>10.1f}{r['train_seconds']:>9.1f}"
                     f"{r['peak_rss_mb']:>13.0f}{r['train_state_mb']:>12.2f}{100 * r['d_eer']:>7.1f}%{r['auc']:>7.3f}"
                     f"{_auc_span(r)}{100 * r['worst_d_eer']:>12.1f}%")
    lines.append("peak RSS is the whole process (interpreter, torch, data); opt+grad MB is the fp32 gradient"
                 " and AdamW state of the trainable parameters; shortcut:<name> rows score the same test images by"
                 " one image statistic (see metrics.json); AUC 95% is its bootstrap interval over the test set")
    return "\n".join(lines)


def _auc_span(row: dict[str, Any]) -> str:
    bounds = None if row.get("auc_low") is None else (row["auc_low"], row["auc_high"])
    return interval_text("auc", bounds).rjust(13)
