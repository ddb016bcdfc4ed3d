"""`merge_lora`: fold every adapter into its base weight; plain `nn.Linear`/`nn.MultiheadAttention` again."""

from __future__ import annotations

import torch
from torch import nn

from .adapters import merged_module
from .errors import LoRAError
from .layer import LoRALinear
from .mha import LoRAMultiheadAttention
from .named import delete_adapter
from .registry import adapter_names, forget_injection, is_adapted, lora_modules, per_adapter_modules, replace_module
from .routing import check_not_routing
from .wrappers import unwrap_model

__all__ = ["merge_lora"]


def merge_lora(model: nn.Module, *, adapter: str | None = None, discard_others: bool = False) -> nn.Module:
    """Fold ``scaling * B @ A`` into each adapted weight and restore plain ``nn.Linear`` layers.

    A model holding several named adapters merges one, ``adapter``; the others would be lost
    with the adapted layers, so that is an error unless ``discard_others=True`` says to drop
    them (save them first with :func:`lora_vit.save_lora` to keep them).

    Trainable modules with per-adapter copies become the merged adapter's copy (its original
    where it has none), a plain module again under its own name.

    An adapted ``nn.MultiheadAttention`` becomes a plain ``nn.MultiheadAttention`` again, its
    in-projection and ``out_proj`` adapters folded into ``in_proj_weight`` and ``out_proj.weight``.

    The sum is formed in float32 and rounded once to the base dtype, so fp16/bf16 bases
    lose no more than one rounding. Afterwards the model has exactly the base model's
    modules and ``state_dict`` keys and runs at the base model's speed. Merging is one-way
    and explicit (``eval()`` never merges); keep the adapter file to go back.

    Args:
        model: A model adapted by :func:`inject_lora`, or a single :class:`LoRALinear` or
            :class:`LoRAMultiheadAttention`. A
            DDP or ``torch.compile`` wrapper is seen through (merge after training, for
            inference: the wrapper's registered parameter list is not updated).
        adapter: The named adapter to merge; may be omitted when the model holds one.
        discard_others: Drop every other adapter (instead of refusing to merge).

    Returns:
        ``model`` with its adapters merged, or the new ``nn.Linear`` (``nn.MultiheadAttention``)
        when ``model`` is a single ``LoRALinear`` (``LoRAMultiheadAttention``): a module
        cannot replace itself in place.

    Raises:
        LoRAError: If the model has no adapters, holds others than ``adapter`` (without
            ``discard_others``), or any merged weight would contain NaN or Inf; the message
            names those layers and the model is left untouched.

    Example:
        >>> from lora_vit import inject_lora
        >>> model = inject_lora(nn.Sequential(nn.Linear(4, 4)), targets=["0"], r=2)
        >>> type(merge_lora(model)[0]).__name__
        'Linear'
    """
    modules = lora_modules(model)
    if not any(is_adapted(m) for m in modules.values()):
        raise LoRAError(f"{type(model).__name__} has no LoRA adapters to merge")
    check_not_routing(unwrap_model(model), "merge adapters")
    names = adapter_names(model) if not isinstance(model, (LoRALinear, LoRAMultiheadAttention)) else model.adapter_names
    if adapter is not None and adapter not in names:
        raise LoRAError(f"the model has no adapter named {adapter!r}; its adapters are {list(names)}")
    others = [n for n in names if n != adapter]
    if adapter is None and len(names) > 1:
        raise LoRAError(f"the model holds several adapters {list(names)}; pass adapter=<name> to merge one")
    if adapter is not None and others and not discard_others:
        raise LoRAError(
            f"merging {adapter!r} would silently drop the model's other adapters {others}; save them"
            " (save_lora(..., adapter=name)) and pass discard_others=True to merge anyway"
        )
    if adapter is not None and others:
        _check_finite(modules, adapter)
        for other in others:
            if isinstance(model, (LoRALinear, LoRAMultiheadAttention)):
                model.remove_adapter(other)
            else:
                delete_adapter(model, other)
        modules = lora_modules(model)
    # An adapted out_proj is merged by the LoRAMultiheadAttention holding it, as part of it.
    units = {
        name: module
        for name, module in modules.items()
        if not isinstance(modules.get(name.rpartition(".")[0]), LoRAMultiheadAttention)
    }
    if isinstance(model, (LoRALinear, LoRAMultiheadAttention)):
        units = {"": model}
    # Build every merged module first (each weight once), so a bad one leaves the model untouched.
    built: dict[str, nn.Module] = {}
    bad: list[str] = []
    for name, module in units.items():
        try:
            built[name] = merged_module(module)
        except LoRAError:
            bad.append(name or type(module).__name__)
    if bad:
        raise LoRAError(f"merging would put NaN or Inf into {bad}; the model was left unmerged")
    if "" in built:
        return built[""]
    for name, module in built.items():
        replace_module(model, name, module)
    # Trainable modules: the merged adapter's own copy stays, as the model's module again.
    for name, holder in per_adapter_modules(model).items():
        replace_module(model, name, next(iter(holder.per_adapter.values()), holder.original))
    forget_injection(model)
    return model


def _check_finite(modules: dict[str, nn.Module], adapter: str) -> None:
    """Refuse (before other adapters are dropped) an ``adapter`` whose merged weights are not finite.

    Raises:
        LoRAError: Naming the layers.
    """
    bad = [
        name for name, module in modules.items()
        if is_adapted(module) and adapter in module.adapter_names  # type: ignore[operator]
        and not bool(torch.isfinite(module.adapter(adapter).merged_weight()).all())  # type: ignore[operator]
    ]
    if bad:
        raise LoRAError(f"merging would put NaN or Inf into {bad}; the model was left unmerged")
