"""The detector (ViT backbone + binary head) and what each training strategy leaves trainable."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lora_vit import inject_lora, lora_summary

from .config import Config, ConfigError

__all__ = ["MorphDetector", "apply_strategy"]


class MorphDetector(nn.Module):
    """``logit = head(dropout(CLS token of the backbone's last layer))``; P(morph) = sigmoid(logit).

    Args:
        backbone: A ``transformers.ViTModel`` (no pooler, no masking).
        dropout_p: Dropout on the representation before the head.
    """

    def __init__(self, backbone: nn.Module, dropout_p: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout_p)
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=0.01)

    @property
    def image_size(self) -> int:
        return int(self.backbone.config.image_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(pixel_values=pixel_values).last_hidden_state
        return self.head(self.dropout(hidden[:, 0])).squeeze(-1)  # (B,), also for B == 1


def _blocks(model: MorphDetector) -> nn.ModuleList:
    return model.backbone.encoder.layer if hasattr(model.backbone, "encoder") else model.backbone.layers


def _set_trainable(modules: list[nn.Module], flag: bool = True) -> None:
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(flag)


def apply_strategy(model: MorphDetector, config: Config) -> tuple[list[nn.Parameter], Callable[[int], str | None]]:
    """Freeze/adapt ``model`` for ``config`` and say which parameters the optimiser must hold.

    * ``use_lora``: adapters on ``lora_target_modules`` plus the head (``inject_lora``).
    * ``none``: everything trains (full fine-tuning).
    * ``backbone_only``: only the head trains (linear probe).
    * ``freeze_except_lastN``: the last ``freeze_lastN`` blocks, the final LayerNorm and the head.
    * ``gradual_unfreeze``: the head; after ``warmup_epochs`` epochs also the last
      ``freeze_lastN`` blocks; after ``mid_epochs`` epochs everything.

    Returns:
        The parameters to give the optimiser (every parameter that will ever train, so that
        blocks unfrozen later really are updated; AdamW skips parameters whose grad is
        None while they are frozen), and a callback ``on_epoch(epoch)`` that applies the
        schedule before each epoch and returns a message when something changed.
    """
    blocks = _blocks(model)
    n = config.freeze_lastN
    if config.freeze_strategy in ("freeze_except_lastN", "gradual_unfreeze") and not 1 <= n <= len(blocks):
        raise ConfigError(f"freeze_lastN={n} must be between 1 and the backbone's {len(blocks)} blocks")
    last = [*list(blocks)[-n:], model.backbone.layernorm] if n else []

    def nothing(epoch: int) -> str | None:
        return None

    if config.use_lora:
        inject_lora(
            model, targets=config.lora_target_modules, r=config.lora_r, alpha=config.lora_alpha,
            dropout=config.lora_dropout, trainable=["head"],
        )
        return [p for p in model.parameters() if p.requires_grad], nothing
    _set_trainable([model], False)
    _set_trainable([model.head])
    if config.freeze_strategy == "none":
        _set_trainable([model])
    elif config.freeze_strategy == "freeze_except_lastN":
        _set_trainable(last)
    if config.freeze_strategy != "gradual_unfreeze":
        return [p for p in model.parameters() if p.requires_grad], nothing

    def on_epoch(epoch: int) -> str | None:
        if epoch == config.mid_epochs:
            _set_trainable([model])
            return f"gradual_unfreeze: epoch {epoch + 1}: whole backbone trainable"
        if epoch == config.warmup_epochs and epoch < config.mid_epochs:
            _set_trainable(last)
            return f"gradual_unfreeze: epoch {epoch + 1}: last {n} blocks trainable"
        return None

    return list(model.parameters()), on_epoch


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(model: nn.Module, config: Config) -> str:
    """One paragraph on what trains, using ``lora_summary`` for LoRA runs."""
    if config.use_lora:
        return str(lora_summary(model))
    total = sum(p.numel() for p in model.parameters())
    n = count_trainable(model)
    return f"strategy {config.strategy}: trainable params {n:,} of {total:,} ({100 * n / total:.3f}%)"
