"""The detector (ViT backbone + binary head) and what each training strategy leaves trainable."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lora_vit import inject_lora, lora_summary

from ..io.config import Config, ConfigError
from .families import BackboneSpec, encode, final_modules, transformer_blocks

__all__ = ["HEAD", "MorphDetector", "apply_strategy"]


class MorphDetector(nn.Module):
    """``logit = head(dropout(feature))``; P(morph) = sigmoid(logit).

    The feature is what ``spec.feature`` says: the CLS token of the last layer, or the
    family's pooled output (CLIP's post-LayerNorm CLS, SigLIP's attention pooling, timm's
    pre-logits).

    Args:
        backbone: The vision encoder (no masking), as :func:`~madlab.model.families.load_backbone` gives it.
        spec: What the backbone is and how to feed it.
        dropout_p: Dropout on the representation before the head.
        flip_average: In eval mode, return the mean of the logits of each image and of its
            mirror image (config ``test_time_flip``); training mode always scores one view.
        shift: In eval mode, also score each of those views rolled ``shift`` pixels along both
            diagonals (four more positions) and return the mean of all the logits (config
            ``test_time_shift``; 0 = no rolls).

    Shapes:
        ``forward``: ``B x 3 x S x S`` normalised images -> ``B`` logits.
    """

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, dropout_p: float = 0.1, *,
                 flip_average: bool = False, shift: int = 0) -> None:
        super().__init__()
        if not 0 <= shift < spec.image_size // 2:
            raise ConfigError(f"test_time_shift={shift} must be in [0, {spec.image_size // 2}) pixels for"
                              f" {spec.image_size} px inputs")
        self.backbone = backbone
        self.spec = spec
        self.flip_average = flip_average
        self.shift = shift
        self.dropout = nn.Dropout(dropout_p)
        self.head = nn.Linear(spec.hidden_size, 1)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=0.01)

    @classmethod
    def from_config(cls, backbone: nn.Module, spec: BackboneSpec, config: Config) -> MorphDetector:
        """The detector ``config`` describes: its head dropout and the views it scores."""
        return cls(backbone, spec, config.dropout_p, flip_average=config.flip_scores, shift=config.shift_scores)

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        views = self.views(pixel_values)
        if len(views) == 1:
            return self._logits(pixel_values)
        # One batch of V x B images, so the views cost one backbone call; no layer of a ViT
        # mixes the images of a batch, so each logit is the one it would get alone.
        return self._logits(torch.cat(views)).view(len(views), -1).mean(0)

    def views(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The ``B x 3 x S x S`` batches scored in this mode: the images alone while training."""
        if self.training:
            return [pixel_values]
        views = [pixel_values, pixel_values.flip(-1)] if self.flip_average else [pixel_values]
        s = self.shift
        rolls = [(s, s), (-s, -s), (s, -s), (-s, s)] if s else []
        return views + [view.roll(r, dims=(-2, -1)) for r in rolls for view in views]

    def _logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feature = encode(self.backbone, self.spec, pixel_values)
        return self.head(self.dropout(feature)).squeeze(-1).float()  # (B,), also for B == 1; fp32 under autocast

    def extra_repr(self) -> str:
        return f"flip_average={self.flip_average}, shift={self.shift}"


# The detector's own head, matched exactly: a glob without wildcards would also match a
# backbone module ending in ".head" (SigLIP's attention-pooling head), which must stay frozen.
HEAD = "[h]ead"


def _blocks(model: MorphDetector) -> nn.ModuleList:
    return transformer_blocks(model.backbone)


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
    last = [*list(blocks)[-n:], *final_modules(model.backbone)] if n else []

    def nothing(epoch: int) -> str | None:
        return None

    if config.use_lora:
        inject_lora(
            model, targets=config.lora_target_modules, r=config.lora_r, alpha=config.lora_alpha,
            dropout=config.lora_dropout, trainable=[HEAD], init=config.lora_init,
            use_rslora=config.lora_use_rslora, use_dora=config.lora_use_dora,
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
