"""The one load pipeline: plan the adapters a source describes, check everything, apply, copy.

Every loader translates its source into the library's own terms first (per-layer configs as
``layer.config()`` writes them, trainable module names, tensors under
:func:`~lora_vit.lora_state_dict` keys): :func:`lora_vit.load_lora` from a lora-vit file,
:func:`lora_vit.load_peft_adapter` from a PEFT folder. :func:`load_adapters` then does the
rest the same way for both, so they cannot drift apart in how modules are looked up, how
wrappers are treated or what reaches the model: nothing is changed until every check passed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from .adapters import AdaptedLayer, adapter_from_config
from .errors import LoRAError
from .inject import (
    adapted_layers,
    apply_adapters,
    check_not_wrapped,
    check_routable,
    find_module,
    trainable_modules,
    unwrap_model,
)
from .state import adapter_tensors, check_tensors, copy_tensors, lora_state_dict

__all__ = ["load_adapters"]


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a layer config that change outputs (dropout only matters in training)."""
    return {k: v for k, v in config.items() if k != "dropout"}


def load_adapters(
    model: nn.Module,
    configs: Mapping[str, Mapping[str, Any]],
    trainable: list[str],
    tensors: Mapping[str, Tensor],
    where: str,
    *,
    check_layers: Callable[[Mapping[str, AdaptedLayer]], None] | None = None,
) -> nn.Module:
    """Load adapters described by ``configs`` with values ``tensors`` into ``model``.

    On a model without adapters the layers are built from ``configs``; on an adapted model
    its adapters must have exactly that layout (values are then swapped in place, so a
    compiled model does not recompile).

    Args:
        model: The base model, or one already adapted with the same layout; DDP, DataParallel,
            FSDP and ``torch.compile`` wrappers are seen through, and refused where new modules
            would have to be added under them.
        configs: Dotted layer name -> ``layer.config()``-shaped description.
        trainable: Whole modules whose state ``tensors`` also holds.
        tensors: Values under :func:`~lora_vit.lora_state_dict` keys.
        where: Names the source in error messages (a file or folder path, quoted).
        check_layers: Called with the planned (or existing) layers before anything changes,
            e.g. to compare base-weight fingerprints; raises ``LoRAError`` to refuse.

    Raises:
        LoRAError: If the layout differs from the model's adapters, a layer or module is
            missing or of another shape, injecting would happen under a DDP/FSDP wrapper,
            or a tensor is missing, unexpected, mis-shaped or not finite.
    """
    existing = adapted_layers(model)
    planned: dict[str, AdaptedLayer] = {}
    if existing:
        if {n: _comparable(layer.config()) for n, layer in existing.items()} != {
            n: _comparable(c) for n, c in configs.items()
        }:
            only_model = sorted(set(existing) - set(configs))
            only_source = sorted(set(configs) - set(existing))
            raise LoRAError(
                f"the model already has adapters with another layout than {where}"
                f" (only in the model: {only_model}; only in the source: {only_source}; or ranks,"
                " slices or alphas differ). Load it into a fresh base model instead."
            )
        layers: Mapping[str, AdaptedLayer] = existing
    else:
        if configs or set(trainable) - set(trainable_modules(model)):
            check_not_wrapped(model, "load adapters (which injects them) into")
        for name, config in configs.items():
            try:
                base = find_module(model, name)
            except AttributeError:
                raise LoRAError(f"{where} adapts layer {name!r}, which this model does not have") from None
            try:
                planned[name] = adapter_from_config(base, config)
            except LoRAError as err:
                raise LoRAError(f"{where}, layer {name!r}: {err}") from None
        check_routable(model, planned, where)
        layers = planned
    for name in trainable:
        try:
            find_module(model, name)
        except AttributeError:
            raise LoRAError(f"{where} trains module {name!r}, which this model does not have") from None
    if check_layers is not None:
        check_layers(layers)
    expected = adapter_tensors(model, layers, sorted(set(trainable) | set(trainable_modules(model))))
    try:
        check_tensors(expected, tensors, strict=True)
    except LoRAError as err:
        raise LoRAError(f"{where}: {err}") from None
    apply_adapters(unwrap_model(model), planned, trainable)
    copy_tensors(lora_state_dict(model), tensors)
    return model
