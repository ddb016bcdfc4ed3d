"""What each config key means, in one line: the one source of ``--help``'s key list and of the
key table in examples/README.md (a test regenerates both and compares them with the code).

Defaults are not written here: they are read from :class:`~.config.Config`, so a changed
default shows up in the help and the table without a second edit.
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Any

from .config import DEFAULT_EPOCHS, DEFAULT_LEARNING_RATE, DEFAULTS_BY_ATTACKS, Config

__all__ = ["DESCRIPTIONS", "default_text", "help_listing", "markdown_table"]


def _by_attacks(key: str, fallback: float | bool) -> str:
    """What ``key`` left at None means: its value for each mode of DEFAULTS_BY_ATTACKS, and otherwise."""

    def word(value: float | bool) -> str:
        return ("on" if value else "off") if isinstance(value, bool) else f"{value:g}"

    modes_by_value: dict[str, list[str]] = {}  # modes sharing a value are named together, in table order
    for mode, values in DEFAULTS_BY_ATTACKS.items():
        if key in values:
            modes_by_value.setdefault(word(values[key]), []).append(mode)
    said = [f"{value} for attacks={' or '.join(modes)}" for value, modes in modes_by_value.items()]
    return ", ".join([*said, f"{word(fallback)} otherwise"])


DESCRIPTIONS: dict[str, str] = {
    # LoRA
    "use_lora": "train LoRA adapters on the frozen backbone (false: a freeze_strategy without adapters)",
    "lora_r": "rank of each adapter update",
    "lora_alpha": "adapter scaling numerator: scaling = lora_alpha / lora_r",
    "lora_dropout": "dropout on the adapters' input, training only",
    "lora_target_modules": "layers that get adapters: logical names (q, k, v, o, fc1, fc2, presets) or module names",
    "lora_use_dora": "DoRA: a trained magnitude per adapted row over the LoRA direction",
    "lora_use_rslora": "scale by lora_alpha / sqrt(lora_r) instead of lora_alpha / lora_r (rsLoRA)",
    "lora_init": "initialisation of A: normal (N(0, 0.02^2)) or kaiming",
    # What trains
    "freeze_strategy": "without LoRA: none (full fine-tuning), backbone_only (linear probe), freeze_except_lastN,"
                       " gradual_unfreeze; with LoRA only backbone_only",
    "freeze_lastN": "blocks trained by freeze_except_lastN, and thawed at warmup_epochs by gradual_unfreeze",
    "warmup_epochs": "gradual_unfreeze: epochs with the head alone before the last freeze_lastN blocks thaw",
    "mid_epochs": "gradual_unfreeze: the epoch from which the whole backbone trains",
    # Optimisation
    "learning_rate": "AdamW peak learning rate; none = " + _by_attacks("learning_rate", DEFAULT_LEARNING_RATE),
    "num_epochs": "training epochs (at most: early stopping may end sooner); none = "
                  + _by_attacks("num_epochs", DEFAULT_EPOCHS),
    "batch_size": "images per batch, for training and scoring",
    "weight_decay": "AdamW weight decay",
    "lr_scheduler": "cosine (annealed to eta_min over num_epochs) or none",
    "eta_min": "the cosine schedule's final learning rate",
    "use_early_stopping": "stop when the dev selection metric has not improved for patience epochs",
    "patience": "epochs without dev improvement before early stopping",
    "min_delta": "how much the dev selection metric must improve to count",
    "selection_metric": "which epoch is restored at the end: dev_loss or dev_eer (ties broken by dev loss)",
    "class_weights": "[bona fide, morph] loss weights; None = inverse class frequency of the training split",
    "dropout_p": "dropout on the pooled feature before the head",
    "use_cls_aug": "random flips and small shifts of the training images",
    "test_time_flip": "score each image and its mirror image and average the two logits (dev, test, predict,"
                      " export); none = " + _by_attacks("test_time_flip", False),
    "test_time_shift": "also score each view rolled this many pixels along both diagonals and average all"
                       " the logits (0 = off); none = " + _by_attacks("test_time_shift", 0),
    "seed": "seed of the split, the morphs, the initialisation and the batch order",
    # Resources
    "num_workers": "DataLoader processes that decode images (0 = in the main process)",
    "num_threads": "torch threads; None = every core this process may use (the small MAE ViT gets one)",
    "image_cache_mb": "MiB of decoded images kept in memory at the model's input size (0 = off)",
    "precision": "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16",
    "compile": "torch.compile the detector; None = on with CUDA, off on CPU",
    # Data
    "data": "a folder ROOT[/SPLIT]/{bona_fide,morph}/[METHOD/] or a CSV manifest; None = embedded_data",
    "embedded_data": "the built-in smoke-test data when data is None: orl (40 people) or lfw_subset (a test"
                     " fixture; needs face_crop=none)",
    "morph_match_contributors": "embedded ORL morphs get their contributors' mean contrast and sharpness",
    "face_crop": "align (detect the face, align its 5 landmarks) or none (the whole image, resized)",
    "face_margin": "share of the face square added on each side of an aligned crop",
    "train_val_pct": "share of the identities (or images) in the training split",
    "dev_pct": "share in the dev split (threshold and epoch choice); the rest is the test split",
    "morph_methods": "landmark morph methods made for the embedded data, and by attacks=generated",
    "synthetic_methods": "synthetic attacks (attacks=synthetic|both): names, or name:weight for a mix",
    "synthetic_match": "where synthetic attacks get their photo's colour, contrast and sharpness: whole (the image,"
                       " as tools sharpen a morph) or face (inside each attack's mask)",
    "shared_resample_p": "made attacks: how often an item of either class is resampled before the shared processing",
    "generated_flow_p": "modes with generated morphs: how often a morph's two faces are also aligned along their"
                        " optical flow (0 = landmarks alone)",
    "morphs_per_face": "embedded data: morphs made per bona fide image",
    "attacks": "training attacks: given (the data's morphs), synthetic (one photo altered), generated (two"
               " photos morphed), or both (given+synthetic), synthetic+generated, given+generated",
    "exclude_methods": "morph methods kept out of train and dev (the test split keeps them)",
    "image_size": "input size in pixels; None = the backbone's own",
    "identity_pattern": "regex over file names whose named groups are identities, so folders split by person",
    # Model
    "backbone": "dinov2-vits14-imgfocus, mae-vit-tiny, an HF checkpoint folder or hub id, a timm hub folder,"
                " or timm:ARCHITECTURE",
    "backbone_weights": "for timm:ARCHITECTURE: a .safetensors file or a timm hub folder",
    "pretrain_epochs": "mae-vit-tiny (or pretrain on a vit_mae folder): MAE pretraining epochs",
    "pretrain_lr": "MAE pretraining learning rate",
    "mae_mask_ratio": "share of patches masked in MAE pretraining",
    "threshold_rule": "how the decision threshold is fixed on dev: dev_eer, dev_apcer5 or dev_apcer10",
    "output_dir": "folder of the model file, logs, scores, metrics and plots",
}


def default_text(key: str) -> str:
    """The key's default as ``--override`` would take it back: ``8``, ``query,value``, ``None``."""
    field = Config.__dataclass_fields__[key]
    value: Any = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if isinstance(value, list):
        return ",".join(str(v) for v in value) if value else "(empty)"
    return str(value)


def _keys(only: frozenset[str] | None) -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if only is None or f.name in only]


def help_listing(only: frozenset[str] | None = None, width: int = 100) -> str:
    """One entry per key (``key (default X): what it does``), wrapped for a terminal, in the
    order of :class:`Config`; ``only`` restricts it (``test`` may change only ``EVAL_KEYS``)."""
    lines = []
    for key in _keys(only):
        entry = f"{key} (default {default_text(key)}): {DESCRIPTIONS[key]}"
        lines += textwrap.wrap(entry, width, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


def markdown_table() -> str:
    """The README's table of every key: name, default, description."""
    rows = ["| key | default | what it does |", "|---|---|---|"]
    for key in _keys(None):
        rows.append(f"| `{key}` | `{default_text(key)}` | {DESCRIPTIONS[key].replace('|', '/')} |")
    return "\n".join(rows)

