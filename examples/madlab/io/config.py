"""Training configuration: the seed's parameter names, its defaults, and a strict ``--override`` parser."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from .errors import MadlabError

__all__ = ["EVAL_KEYS", "SPLIT_KEYS", "Config", "ConfigError", "apply_overrides", "parse_identity_pattern",
           "parse_override"]

FREEZE_STRATEGIES = ("none", "backbone_only", "freeze_except_lastN", "gradual_unfreeze")
SELECTION_METRICS = ("dev_loss", "dev_eer")
THRESHOLD_RULES = ("dev_eer", "dev_apcer5", "dev_apcer10")
LORA_INITS = ("normal", "kaiming")
PRECISIONS = ("auto", "fp32", "bf16")
FACE_CROPS = ("align", "none")
EMBEDDED_SETS = ("orl", "lfw_subset")
# Where training attacks come from (attacks/sets.py, MODE_SOURCES): the data's morphs, attacks
# made from one photo (synthetic) or from two (generated), or a combination.
ATTACK_MODES = ("given", "synthetic", "generated", "both", "synthetic+generated", "given+generated")
# Where a synthetic attack gets its photo's colour, contrast and sharpness: inside its face mask,
# or over the whole image (the default; attacks/sets.py, DEFAULT_MATCH, says why).
MATCH_REGIONS = ("face", "whole")
# num_epochs and learning_rate left at None follow the attack mode. Attacks made from one photo
# carry a weaker signal than morphs of two: with 5 epochs at lr 1e-3 `synthetic` was at chance on
# one seed in three, 12 epochs at 1e-3 collapsed to a constant score on another, and over five
# seeds the dev folder of examples/README.md ("Bona fides alone on the real backbone") preferred
# 5e-4 to 1e-3 at 12 epochs, then 20 epochs to 12 at 5e-4. `generated` had its best dev epoch at
# the last of 5 on three seeds of three, and the dev folder preferred 10 epochs on all three,
# then 15 to 10 on all five seeds (by 0.009-0.027 a seed); at 15 epochs it preferred lr 1e-3 to
# 5e-4 and to 2e-3 on three seeds of three. test_time_flip: see Config.flip_scores.
DEFAULT_EPOCHS = 5
DEFAULT_LEARNING_RATE = 1e-3
DEFAULTS_BY_ATTACKS: dict[str, dict[str, float | bool]] = {
    "synthetic": {"num_epochs": 20, "learning_rate": 5e-4, "test_time_flip": True},
    "generated": {"num_epochs": 15, "test_time_flip": True},
}

FRLL_EXAMPLE = r"^(?P<a>\d{3})_(?:\d{2}|(?P<b>\d{3}))\."  # an identity_pattern for FRLL
# Keys a `test` run may change freely: they choose what to evaluate, not what the model is.
EVAL_KEYS = frozenset({"batch_size", "num_workers", "num_threads", "data", "output_dir",
                       "image_cache_mb", "precision", "compile"})
# Keys that decide which image is in which split: training keys, which `test` may never change
# (the model file records the split they made; see madlab.data.recorded).
SPLIT_KEYS = frozenset({"identity_pattern", "seed", "train_val_pct", "dev_pct"})


def parse_identity_pattern(pattern: str) -> re.Pattern[str]:
    """Compile an ``identity_pattern``: a regex searched in each file name (with extension).

    Every named group that matches is one identity, in the pattern's order: a bona fide
    image must yield exactly one, a morph at least one (its contributors). For FRLL, whose
    bona fides are ``001_03.jpg`` and morphs ``001_002.jpg``: ``^(?P<a>\\d{3})_(?:\\d{2}|(?P<b>\\d{3}))\\.``.

    Raises:
        MadlabError: If the regex does not compile or has no named group.
    """
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise MadlabError(f"identity_pattern={pattern!r} is not a valid regular expression: {err}") from None
    if not compiled.groupindex:
        raise MadlabError(
            f"identity_pattern={pattern!r} has no named group; name one group per identity, e.g. {FRLL_EXAMPLE!r}"
            " for FRLL (bona fide 001_03.jpg, morph 001_002.jpg)")
    return compiled


class ConfigError(MadlabError):
    """A configuration value or override that cannot be used; the message names valid choices."""


@dataclass
class Config:
    """Every setting of a run; the names follow the seed (``SSL_MAE``) where it had one.

    Attributes mirror the seed guide: LoRA (``use_lora``, ``lora_r``, ``lora_alpha``,
    ``lora_dropout``, ``lora_target_modules``; ``lora_use_dora`` adds DoRA), optimisation (``learning_rate``,
    ``num_epochs``, ``batch_size``, ``weight_decay``, ``lr_scheduler``, early stopping),
    freezing (``freeze_strategy``, ``freeze_lastN``, ``warmup_epochs``, ``mid_epochs``) and
    data/model options particular to this example.
    """

    # LoRA. The seed guide's names; its values were r=4, alpha=32 on query/key/value for a small
    # ViT. The default backbone is now a real DINOv2 ViT-S/14: r=8, alpha=16 on query and value
    # (as MAD work with foundation models adapts them), chosen on the default run's dev split.
    use_lora: bool = True
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    lora_target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    lora_use_dora: bool = False  # DoRA: a trained magnitude per adapted row (inject_lora(use_dora=True))
    # Scale by alpha/sqrt(r) instead of alpha/r (rank-stabilised LoRA, as MADation uses).
    lora_use_rslora: bool = False
    lora_init: str = "normal"  # A ~ N(0, 0.02^2), or "kaiming"
    # What trains besides the adapters. With LoRA only backbone_only is meaningful (see model.py).
    freeze_strategy: str = "backbone_only"
    freeze_lastN: int = 2  # noqa: N815 - the seed's name, kept for its users
    warmup_epochs: int = 2
    mid_epochs: int = 5
    # Optimisation, sized for the default run (DINOv2 ViT-S/14 at 84 px on a 2-core CPU in under
    # 5 minutes); the seed's were lr 5e-4, 60 epochs, batch 32. Full fine-tuning wants less (compare).
    # None = by attack mode (DEFAULTS_BY_ATTACKS, else DEFAULT_*): read them as `lr` and `epochs`.
    learning_rate: float | None = None
    num_epochs: int | None = None
    batch_size: int = 16
    weight_decay: float = 0.05
    lr_scheduler: str = "cosine"
    eta_min: float = 0.0
    use_early_stopping: bool = True
    patience: int = 15
    min_delta: float = 0.001
    selection_metric: str = "dev_loss"
    # [bona fide, morph] loss weights; None = inverse class frequency of the training split.
    class_weights: list[float] | None = None
    dropout_p: float = 0.1
    use_cls_aug: bool = True
    # Score each image and its mirror image and average the two logits, wherever the model scores
    # (dev epochs, thresholds, test, predict, export). None = by attack mode (DEFAULTS_BY_ATTACKS).
    test_time_flip: bool | None = None
    # Also score each view rolled this many pixels (at the model's input size) along both
    # diagonals and average all the logits; 0 = off. None = by attack mode (DEFAULTS_BY_ATTACKS).
    test_time_shift: int | None = None
    seed: int = 42
    # DataLoader workers that decode images (and fill the cache once); 0 = in the main process.
    num_workers: int = 2
    # None = all the cores this process may use; the small MAE ViT gets one (its
    # matrices are tiny: two threads on a shared 2-core machine were measured 8x slower).
    num_threads: int | None = None
    # Decoded images are kept as uint8 at the model's input size up to this many MiB (0 = off):
    # 20,000 images at 224 px need 2.9 GiB, so a bound keeps big sets from filling memory.
    image_cache_mb: int = 4096
    # "auto": bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16".
    precision: str = "auto"
    # torch.compile the detector; None = on with CUDA, off on CPU (see examples/README.md).
    compile: bool | None = None
    # Data: None = the embedded smoke test (embedded_data); else a folder root or a CSV manifest.
    data: str | None = None
    # "orl": the ORL faces of 40 people with landmark morphs; "lfw_subset": 100 tiny skimage crops
    # (no identities, too small for the face detector: needs face_crop=none; a fast test fixture).
    embedded_data: str = "orl"
    # ORL morphs get their contributors' mean contrast and sharpness, so that neither is a cue.
    morph_match_contributors: bool = True
    # "align": detect the face and align its 5 landmarks to a template at the backbone's input
    # size (images without a face are left out and counted); "none": the whole image, resized.
    # Recorded in the model file, so test (and every later command) crops the same way.
    face_crop: str = "align"
    face_margin: float = 0.125  # share of the face square added on each side of the crop
    train_val_pct: float = 0.6
    dev_pct: float = 0.2
    # The given methods of the embedded data, and what attacks=generated combines two photos by.
    morph_methods: list[str] = field(default_factory=lambda: ["blend", "splice"])
    # The synthetic methods (attacks=synthetic|both) and their mix: names of
    # attacks.synthesis.SYNTHETIC_METHODS, alone (even shares) or as name:weight.
    synthetic_methods: list[str] = field(default_factory=lambda: ["self_texture"])
    # Where synthetic attacks are matched to their photo's statistics (MATCH_REGIONS): "whole",
    # as tools sharpen a morph (attacks.sets.DEFAULT_MATCH), or "face", inside each attack's mask.
    synthetic_match: str = "whole"
    # How often a training item of either class is resampled (a small rotation, scaling and
    # shift) before the shared processing, when attacks are made from bona fides: morphs are
    # resampled, so resampling alone must not mark them.
    shared_resample_p: float = 0.0
    # How often a generated morph's two faces, once warped onto their 5 landmarks' average, are
    # also aligned along the optical flow between them, as tools with dense landmark meshes align
    # jaw, brows and glasses (attacks/morphs.py, flow_align).
    generated_flow_p: float = 0.0
    morphs_per_face: int = 2
    # Training attacks: the data's morphs ("given"), made from the training bona fides every
    # epoch (one photo altered: "synthetic"; two photos morphed: "generated"; bona fides alone
    # train), or a combination (ATTACK_MODES; "both" = given + synthetic). See attacks/sets.py.
    attacks: str = "given"
    # Morph methods kept out of the train and dev splits (the test split keeps them): the
    # leave-one-method-out protocol trains without a method and tests on it.
    exclude_methods: list[str] = field(default_factory=list)
    image_size: int | None = None
    # Regex over file names whose named groups are identities (bona fide: one; morph: its
    # contributors), so folder data can split by identity; FRLL: ^(?P<a>\d{3})_(?:\d{2}|(?P<b>\d{3}))\.
    identity_pattern: str | None = None
    # Model.
    # A name the example builds (dinov2-vits14-imgfocus: a real DINOv2 ViT-S/14 converted offline;
    # mae-vit-tiny: its own small ViT, MAE-pretrained on the training images), an HF checkpoint
    # folder or hub id, a timm hub folder, or timm:<architecture> (weights in backbone_weights).
    backbone: str | None = "dinov2-vits14-imgfocus"
    backbone_weights: str | None = None
    pretrain_epochs: int = 150
    pretrain_lr: float = 1.5e-3
    mae_mask_ratio: float = 0.75
    threshold_rule: str = "dev_eer"
    output_dir: str = "output"

    def validate(self) -> Config:
        """Check ranges and choices; return ``self``.

        Raises:
            ConfigError: Naming the bad key, its value and what is allowed.
        """
        choices = {
            "freeze_strategy": FREEZE_STRATEGIES,
            "selection_metric": SELECTION_METRICS,
            "threshold_rule": THRESHOLD_RULES,
            "lr_scheduler": ("cosine", "none"),
            "lora_init": LORA_INITS,
            "precision": PRECISIONS,
            "face_crop": FACE_CROPS,
            "embedded_data": EMBEDDED_SETS,
            "attacks": ATTACK_MODES,
            "synthetic_match": MATCH_REGIONS,
        }
        _check_types(self)
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of {allowed}")
        positive = ["lora_r", "num_epochs", "batch_size", "morphs_per_face", "pretrain_epochs"]
        for key in positive:
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        for key in ("num_workers", "image_cache_mb", "weight_decay", "eta_min", "freeze_lastN",
                    "warmup_epochs", "mid_epochs", "seed", "min_delta"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        for key in ("patience",):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        # At warmup_epochs the last blocks would thaw, but at mid_epochs the whole backbone already
        # has (or at the same epoch does), so the middle stage would be skipped without a word.
        if self.freeze_strategy == "gradual_unfreeze" and self.warmup_epochs >= self.mid_epochs:
            raise ConfigError(
                f"gradual_unfreeze needs warmup_epochs < mid_epochs (head only, then the last freeze_lastN blocks"
                f" from warmup_epochs, then everything from mid_epochs), got warmup_epochs={self.warmup_epochs}"
                f" and mid_epochs={self.mid_epochs}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if self.eta_min >= self.lr:
            raise ConfigError(f"eta_min={self.eta_min!r} must be below learning_rate={self.lr!r}"
                              " (the cosine schedule's floor)")
        if not self.output_dir.strip():
            raise ConfigError("output_dir must name a folder, got an empty string")
        for key in ("data", "backbone", "backbone_weights"):
            if getattr(self, key) is not None and not getattr(self, key).strip():
                raise ConfigError(f"{key} must be a path (or None), got an empty string")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1 (or None for all cores), got {self.num_threads!r}")
        if self.test_time_shift is not None and self.test_time_shift < 0:
            raise ConfigError(f"test_time_shift must be >= 0 pixels (0 = off, or None for the attack mode's"
                              f" default), got {self.test_time_shift!r}")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"image_size must be >= 1 (or None for the backbone's own), got {self.image_size!r}")
        for key in ("lora_dropout", "dropout_p", "mae_mask_ratio"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key} must be in [0, 1), got {getattr(self, key)!r}")
        for key in ("shared_resample_p", "generated_flow_p"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key} must be a probability in [0, 1], got {getattr(self, key)!r}")
        if not (0 < self.train_val_pct < 1 and 0 < self.dev_pct < 1 and self.train_val_pct + self.dev_pct < 1):
            raise ConfigError(
                f"train_val_pct={self.train_val_pct} and dev_pct={self.dev_pct} must be in (0, 1)"
                " and leave a test share (sum < 1)"
            )
        if not 0.0 <= self.face_margin <= 1.0:
            raise ConfigError(f"face_margin must be in [0, 1] (0.125 = 12.5 % of the face on each side),"
                              f" got {self.face_margin!r}")
        if self.data is None and self.embedded_data == "lfw_subset" and self.face_crop == "align":
            raise ConfigError("embedded_data=lfw_subset holds 25 x 25 px face crops, too small for the face"
                              " detector; use it with face_crop=none")
        if self.lr <= 0 or self.pretrain_lr <= 0:
            raise ConfigError("learning_rate and pretrain_lr must be positive")
        if self.class_weights is not None and (
            len(self.class_weights) != 2 or min(self.class_weights) <= 0
        ):
            raise ConfigError(
                f"class_weights must be two positive numbers [bona_fide, morph], got {self.class_weights}")
        if not self.lora_target_modules:
            raise ConfigError("lora_target_modules must name at least one module, e.g. query,key,value")
        if self.identity_pattern is not None:
            try:
                parse_identity_pattern(self.identity_pattern)
            except MadlabError as err:
                raise ConfigError(str(err)) from None
        # morph_methods and synthetic_methods name entries of the attack registries, which check
        # them where they are (madlab.attacks.sets.check_attack_config); this floor cannot see them.
        if self.use_lora and self.freeze_strategy != "backbone_only":
            raise ConfigError(
                f"use_lora=True trains the adapters and the head with the backbone frozen, so"
                f" freeze_strategy must be 'backbone_only', got {self.freeze_strategy!r}; use"
                " use_lora=False for the strategies none/freeze_except_lastN/gradual_unfreeze"
            )
        return self

    @property
    def epochs(self) -> int:
        """The number of training epochs: ``num_epochs``, or the attack mode's default when it is None."""
        return int(self._by_attacks("num_epochs", DEFAULT_EPOCHS))

    @property
    def lr(self) -> float:
        """The peak learning rate: ``learning_rate``, or the attack mode's default when it is None."""
        return float(self._by_attacks("learning_rate", DEFAULT_LEARNING_RATE))

    @property
    def flip_scores(self) -> bool:
        """Whether scores average each image's logit with its mirror image's: ``test_time_flip``, or
        the attack mode's default when it is None.

        Training already flips images at random (``use_cls_aug``), so the mirror image is a second
        view of the same face. Averaging the two raised the dev folder's mean AUC over five seeds,
        for ``generated`` (higher on four, level on one) and for ``synthetic`` (higher on four, a
        little lower on one; examples/README.md, "Test-time flip"); the other modes were not
        trained with it, so they keep scoring one view.
        """
        return bool(self._by_attacks("test_time_flip", False))

    @property
    def shift_scores(self) -> int:
        """The pixels of the four diagonal rolls scored beside each view: ``test_time_shift``, or
        the attack mode's default when it is None (0: no rolls).

        Training already rolls images by up to 1/16 of their size (``use_cls_aug``), so a small
        roll is one more view of the same face, seen through another patch grid.
        """
        return int(self._by_attacks("test_time_shift", 0))

    def _by_attacks(self, key: str, fallback: float | bool) -> float | bool:
        value = getattr(self, key)
        return value if value is not None else DEFAULTS_BY_ATTACKS.get(self.attacks, {}).get(key, fallback)

    @property
    def schedule(self) -> str:
        """``epochs`` and ``lr`` in words: ``at most 20 epochs at learning rate 0.0005``."""
        return f"at most {self.epochs} epoch{'s' * (self.epochs != 1)} at learning rate {self.lr:g}"

    @property
    def schedule_note(self) -> str:
        """``epochs`` and ``lr`` in words, saying where each came from."""
        words = {"num_epochs": f"at most {self.epochs} epoch{'s' * (self.epochs != 1)}",
                 "learning_rate": f"learning rate {self.lr:g}"}
        mode = [words[key] for key in words if getattr(self, key) is None]
        chosen = [words[key] for key in words if getattr(self, key) is not None]
        parts = [f"{', '.join(mode)} (the defaults for attacks={self.attacks})"] if mode else []
        parts += [f"{', '.join(chosen)} (as set)"] if chosen else []
        return "; ".join(parts)

    @property
    def strategy(self) -> str:
        """A short name for what trains: ``lora``, ``full_ft``, ``linear_probe`` or the freeze strategy."""
        if self.use_lora:
            return "lora"
        return {"none": "full_ft", "backbone_only": "linear_probe"}.get(self.freeze_strategy, self.freeze_strategy)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Rebuild a config saved by :meth:`to_dict` (e.g. from an adapter file's metadata).

        Raises:
            ConfigError: If a key is unknown (a file from another version) or a value is invalid.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**values).validate()

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _type_ok(value: Any, hint: Any) -> bool:
    args = getattr(hint, "__args__", ())
    if type(None) in args:
        return value is None or _type_ok(value, next(a for a in args if a is not type(None)))
    if getattr(hint, "__origin__", None) is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_types(config: Config) -> None:
    """Every key holds a value of its declared type (a config file or a caller may bypass ``--override``).

    Raises:
        ConfigError: Naming the key, its value and the type it needs.
    """
    for key, hint in _field_types().items():
        value = getattr(config, key)
        if not _type_ok(value, hint):
            name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            raise ConfigError(f"{key}={value!r} must be {'a finite ' if hint is float else ''}{name}")


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}
_NONE = {"none", "null", ""}


def _field_types() -> dict[str, Any]:
    return get_type_hints(Config)


def _convert(key: str, raw: str, hint: Any) -> Any:
    """Convert ``raw`` to the type annotated for ``key`` (not the type of its current value,
    so that ``None`` defaults and lists parse properly)."""
    text = raw.strip()
    args = getattr(hint, "__args__", ())
    optional = type(None) in args
    if optional:
        if text.lower() in _NONE:
            return None
        hint = next(a for a in args if a is not type(None))
    origin = getattr(hint, "__origin__", None)
    if origin is list:
        (item,) = hint.__args__
        if text.startswith("["):  # JSON list, e.g. ["query","value"]
            try:
                values = json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{key}={raw!r} is not a valid JSON list: {err}") from None
            if not isinstance(values, list):
                raise ConfigError(f"{key}={raw!r} must be a list")
        else:
            values = [v.strip() for v in text.split(",") if v.strip()]
        return [_convert(key, str(v), item) for v in values]
    if hint is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{key}={raw!r} is not a boolean; use one of true/false/1/0/yes/no")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={raw!r} is not an integer") from None
    if hint is float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{key}={raw!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}={raw!r} must be finite")
        return value
    return text


def parse_override(item: str) -> tuple[str, Any]:
    """Parse one ``key=value`` into the key and a value typed by the key's declared type.

    Booleans accept true/false/1/0/yes/no; lists take comma-separated values (or a JSON
    list); ``None`` (or ``null``) sets an optional key back to its ``None`` default.

    Raises:
        ConfigError: If the item has no ``=``, the key is unknown (the message lists the
            valid keys) or the value does not convert.

    Example:
        >>> parse_override("lora_target_modules=query,value")
        ('lora_target_modules', ['query', 'value'])
        >>> parse_override("use_lora=no")
        ('use_lora', False)
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    types = _field_types()
    if key not in types:
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(types))}")
    return key, _convert(key, raw, types[key])


def apply_overrides(config: Config, items: list[str] | None) -> Config:
    """Return a copy of ``config`` with every ``key=value`` in ``items`` applied, validated."""
    values = config.to_dict()
    for item in items or []:
        key, value = parse_override(item)
        values[key] = value
    return Config(**values).validate()
