"""The one scoring path: a trained detector loaded from a model file or an export, scoring images.

``test``, ``predict``, ``compare`` (through ``test``) and ``export`` all get their model from
:meth:`Detector.load` and their logits from :meth:`Detector.score`, so that the same image
gets the same logit whichever command scores it. A model file (``train``'s output) is
rebuilt on the backbone its metadata names, checked against the stored weights fingerprint;
an export file (:mod:`.export`) carries the merged weights and the architecture itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from torch import nn

from ..data.images import ImageDataset, normalise
from ..evaluation.report import OPERATING_APCERS, SCORE_KIND
from ..io.config import EVAL_KEYS, SPLIT_KEYS, Config, ConfigError, parse_override
from ..model.architecture import build_backbone
from ..model.backbone import backbone_fingerprint, cache_root
from ..model.checkpoint import CheckpointError, load_weights, read_metadata
from ..model.families import BackboneError, BackboneSpec, load_backbone, load_from_spec, quiet_transformers
from ..model.named import NAMED
from ..model.network import MorphDetector
from .distributed import current
from .inference import predict
from .speed import autocast, compiled, resolve_compile, resolve_precision, threads

__all__ = ["EXPORT_FORMAT", "OPERATING_POINTS", "Detector", "describe_file", "stored_threshold"]

EXPORT_FORMAT = "madlab-morph-detector-export"
# "dev" is the model's own threshold (its threshold_rule); the others were fixed on dev too.
OPERATING_POINTS = ("dev", "eer", *OPERATING_APCERS)


@dataclass
class Detector:
    """A trained morph detector ready to score: the model, its thresholds and how to run it.

    Attributes:
        model: The detector module (eval mode, on ``device``).
        config: The training config with the evaluation-time overrides applied.
        metadata: The file's metadata (config, backbone, thresholds, training summary).
        path: The model or export file it was loaded from.
        precision: ``"fp32"`` or ``"bf16"``.
        net: What is called to score (``model`` itself or its compiled form).
    """

    model: MorphDetector
    config: Config
    metadata: dict[str, Any]
    path: Path
    precision: str
    net: nn.Module

    @classmethod
    def load(cls, path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = (),
             backbone: str | None = None) -> Detector:
        """Load a model file written by ``train`` or a file written by ``export``.

        Args:
            path: The ``.safetensors`` file.
            overrides: ``key=value`` items; only evaluation keys (:data:`~.config.EVAL_KEYS`) may
                differ from the file's training config.
            backbone: Where the backbone is now, if it moved since training (model files only).

        Raises:
            CheckpointError: If the file is missing, unreadable or not written by this example.
            BackboneError: If the backbone is missing or differs from the one trained on.
            ConfigError: For an override that contradicts the file.
        """
        path = Path(path)
        quiet_transformers()
        meta = read_metadata(path)
        if "config" not in meta or "backbone" not in meta or "threshold" not in meta:
            raise CheckpointError(
                f"{path} has no training config in its metadata; it was not written by this example")
        _check_metadata(meta, path)
        stored = dict(meta["config"])
        # Files from before face_crop and ORL saw whole images of the lfw_subset default.
        stored.setdefault("face_crop", "none")
        stored.setdefault("embedded_data", "lfw_subset")
        # Files from before test_time_flip fixed their thresholds on one view of each image.
        stored.setdefault("test_time_flip", False)
        stored.setdefault("test_time_shift", 0)  # and from before test_time_shift, on those views alone
        config = _check_overrides(Config.from_dict(stored), list(overrides))
        torch.set_num_threads(threads(config))
        device = current().device
        if meta.get("format") == EXPORT_FORMAT:
            model = _load_export(meta, path, config)
        else:
            model = _rebuild(meta["backbone"], config, path, backbone)
            load_weights(model, path, config.use_lora)
        model = model.to(device).eval()
        precision = resolve_precision(config, device, model.spec.hidden_size)
        return cls(model, config, meta, path, precision, compiled(model, resolve_compile(config, device)))

    @property
    def spec(self) -> BackboneSpec:
        return self.model.spec

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def exported(self) -> bool:
        return self.metadata.get("format") == EXPORT_FORMAT

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``B x 3 x S x S`` (from :func:`~.images.resize_pixels`) -> the model's normalised input."""
        mean = torch.tensor(self.spec.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.spec.std, dtype=torch.float32).view(3, 1, 1)
        return normalise(pixels, mean, std)

    def dataset(self, samples: list, cache: bool = True) -> ImageDataset:
        """``samples`` as this detector's inputs (its size and normalisation)."""
        return ImageDataset(samples, self.image_size, mean=self.spec.mean, std=self.spec.std,
                            cache_mb=self.config.image_cache_mb if cache else 0, num_workers=self.config.num_workers)

    @torch.no_grad()
    def score(self, images: ImageDataset | torch.Tensor, *, desc: str = "scoring",
              progress: bool = False) -> np.ndarray:
        """float64 logits (log-odds of morph), one per image, in order.

        Args:
            images: An :class:`~.images.ImageDataset`, or a ``B x 3 x S x S`` batch already
                normalised by :meth:`normalise`.

        Shapes:
            returns ``(N,)``.
        """
        if isinstance(images, ImageDataset):
            scores, _ = predict(self.model, images, self.config.batch_size, desc=desc, progress=progress,
                                precision=self.precision, num_workers=self.config.num_workers, net=self.net)
            return scores
        device = current().device
        with autocast(self.precision, device):
            logits = self.net(images.to(device)).float()
        return logits.double().cpu().numpy()

    def threshold(self, operating_point: str = "dev") -> dict[str, Any]:
        """The dev-fixed threshold of ``operating_point`` (see :data:`OPERATING_POINTS`), as a logit.

        Raises:
            ConfigError: For an unknown point, or one this (older) model file did not record.
        """
        if operating_point not in OPERATING_POINTS:
            raise ConfigError(f"operating point {operating_point!r} is not one of {list(OPERATING_POINTS)}")
        if operating_point == "dev":
            return stored_threshold(self.metadata["threshold"], self.path)
        points = self.metadata.get("thresholds") or {}
        if operating_point not in points:
            raise ConfigError(f"{self.path} records no {operating_point!r} threshold (it was trained before"
                              " operating points were stored); use the default operating point or train again")
        return points[operating_point]

    def decide(self, logits: np.ndarray, operating_point: str = "dev") -> np.ndarray:
        """``True`` (morph) where ``logit >= τ`` of ``operating_point``, else ``False`` (bona fide)."""
        return np.asarray(logits, dtype=np.float64) >= self.threshold(operating_point)["value"]


def _check_metadata(meta: dict[str, Any], path: Path) -> None:
    """Refuse metadata whose parts are of the wrong JSON kind, which would fail later as a
    KeyError or TypeError traceback instead of an error naming the file.

    Raises:
        CheckpointError: Naming the file and the malformed parts.
    """
    malformed = [key for key in ("config", "backbone", "threshold") if not isinstance(meta[key], dict)]
    if malformed or not isinstance(meta["threshold"].get("value"), (int, float)):
        raise CheckpointError(f"{str(path)!r} has malformed metadata: {malformed or ['threshold']} must be JSON"
                              " objects (the threshold with a numeric 'value'); it was not written by this example"
                              " or was damaged")


def _check_overrides(stored: Config, overrides: list[str]) -> Config:
    """Apply evaluation-only overrides; any other override must equal the file's value.

    Raises:
        ConfigError: For an override that contradicts the file (the seed's
            ``--override lora_r=8`` on an r=4 file), naming both values.
    """
    values = stored.to_dict()
    for item in overrides:
        key, value = parse_override(item)
        if key in EVAL_KEYS:
            values[key] = value
        elif values[key] != value and not (isinstance(value, float) and values[key] == value):
            why = (f"{key} decides which images are in which split, and the model file records the split it"
                   " made at training" if key in SPLIT_KEYS else "The model is rebuilt from the file")
            raise ConfigError(
                f"--override {item} does not match the model file, which was trained with {key}={values[key]!r}."
                f" {why}, so only {sorted(EVAL_KEYS)} can change at test time"
            )
    return Config(**values).validate()


def _rebuild(stored: dict[str, Any], config: Config, model_path: Path, moved: str | None) -> MorphDetector:
    """The detector a model file was trained with: the backbone its metadata describes (found at
    ``moved`` if given), checked against the stored weights fingerprint and input settings."""
    spec = BackboneSpec.from_dict(stored["spec"]) if "spec" in stored else None
    timm = spec is not None and spec.family == "timm"
    hub = spec is not None and spec.hub_id is not None and moved is None
    where = Path(moved or (spec.weights if timm and spec else stored["path"])).expanduser()
    if moved is None and config.backbone in NAMED and not (where / "config.json").is_file():
        where = NAMED[config.backbone].build(cache_root(), lambda _: None)  # an emptied cache: rebuilt the same
    if not hub and (not where.exists() or (not timm and not (where / "config.json").is_file())):
        hint = ("run `morph_detection.py pretrain` with the training run's data, seed and --cache_dir to recreate it"
                if stored.get("default") else
                f"pass --backbone with the {'weights' if timm else 'checkpoint folder'} it was trained on")
        raise BackboneError(f"the backbone this model was trained on is not at {where}; {hint}")
    torch.manual_seed(config.seed)
    if spec is None:  # a file from before backbones were described: a ViT/ViTMAE folder at native size
        backbone, spec = load_backbone(str(where))
        found = spec
    else:
        backbone, found = load_from_spec(spec, str(where) if moved else None)
        differ = [k for k in ("family", "image_size", "mean", "std", "feature", "hidden_size")
                  if getattr(found, k) != getattr(spec, k)]
        if differ:
            raise BackboneError(f"the backbone at {found.source} is set up differently from the one {model_path} was"
                                f" trained on ({', '.join(differ)} differ)")
    model = MorphDetector.from_config(backbone, spec, config)
    if backbone_fingerprint(model.backbone) != stored["fingerprint"]:
        raise BackboneError(f"the backbone at {found.source} differs from the one {model_path} was trained on"
                            " (weights fingerprint mismatch)")
    return model


def _load_export(meta: dict[str, Any], path: Path, config: Config) -> MorphDetector:
    """An exported detector: the stored architecture, filled with the file's merged weights."""
    spec = BackboneSpec.from_dict(meta["backbone"]["spec"])
    torch.manual_seed(config.seed)
    model = MorphDetector.from_config(build_backbone(meta["backbone"]["architecture"]), spec, config)
    try:
        state = safetensors_load(path.read_bytes())
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{str(path)!r} does not hold the weights its metadata describes: {err}") from None
    return model


def stored_threshold(threshold: dict[str, Any], model_path: Path) -> dict[str, Any]:
    """The model file's dev threshold on the logit scale the scores use now.

    Files written before scores became logits hold τ as a probability; the logit of it is
    the same operating point.

    Raises:
        CheckpointError: If an old probability threshold is 0 or 1, which no logit can express.
    """
    if threshold.get("score") == SCORE_KIND:
        return threshold
    p = float(threshold["value"])
    if not 0.0 < p < 1.0:
        raise CheckpointError(f"{model_path} holds the probability threshold {p!r} of an older version, which has"
                              " no logit; train the model again")
    return {**threshold, "value": float(np.log(p) - np.log1p(-p)), "score": SCORE_KIND,
            "converted_from_probability": p}


def describe_file(meta: dict[str, Any]) -> str:
    """One line on what a loaded file is, for the terminal."""
    spec = meta["backbone"].get("spec", {})
    kind = "export (adapters merged)" if meta.get("format") == EXPORT_FORMAT else "model file"
    where = spec.get("hub_id") or spec.get("source")
    return f"{kind}: {meta.get('strategy', '?')} on {spec.get('family', '?')} {where}"

