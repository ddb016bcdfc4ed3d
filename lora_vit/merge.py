"""`merge_lora`: fold every adapter into its base weight and go back to plain `nn.Linear`."""

from __future__ import annotations

import torch
from torch import nn

from .errors import LoRAError
from .inject import adapted_layers, forget_injection, replace_module
from .layer import LoRALinear

__all__ = ["merge_lora"]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold ``scaling * B @ A`` into each adapted weight and restore plain ``nn.Linear`` layers.

    The sum is formed in float32 and rounded once to the base dtype, so fp16/bf16 bases
    lose no more than one rounding. Afterwards the model has exactly the base model's
    modules and ``state_dict`` keys and runs at the base model's speed. Merging is one-way
    and explicit (``eval()`` never merges); keep the adapter file to go back.

    Args:
        model: A model adapted by :func:`inject_lora`, or a single :class:`LoRALinear`. A
            DDP or ``torch.compile`` wrapper is seen through (merge after training, for
            inference: the wrapper's registered parameter list is not updated).

    Returns:
        ``model`` with its adapters merged, or the new ``nn.Linear`` when ``model`` is a
        single ``LoRALinear`` (a module cannot replace itself in place).

    Raises:
        LoRAError: If the model has no adapters, or any merged weight would contain NaN or
            Inf; the message names those layers and the model is left untouched.

    Example:
        >>> from lora_vit import inject_lora
        >>> model = inject_lora(nn.Sequential(nn.Linear(4, 4)), targets=["0"], r=2)
        >>> type(merge_lora(model)[0]).__name__
        'Linear'
    """
    layers = adapted_layers(model)
    if not layers:
        raise LoRAError(f"{type(model).__name__} has no LoRA adapters to merge")
    # Check every layer first, so a bad one leaves the whole model untouched.
    bad = [
        name or type(layer).__name__
        for name, layer in layers.items()
        if not bool(torch.isfinite(layer.merged_weight()).all())
    ]
    if bad:
        raise LoRAError(f"merging would put NaN or Inf into {bad}; the model was left unmerged")
    if isinstance(model, LoRALinear):
        return model.merged_linear()
    for name, layer in layers.items():
        replace_module(model, name, layer.merged_linear())
    forget_injection(model)
    return model
