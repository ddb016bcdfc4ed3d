"""Where the adapters of a model are: adapted layers by name, named adapters, the running one.

Everything that needs to find adapters in a model goes through here (inject, load, state, merge,
toggling, routing), so module lookup and wrapper handling are the same everywhere. The model
itself records, as plain attributes (never in its ``state_dict``), the whole modules that train
with the adapters, the adapter names in the order they were added, and the adapter that runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Union

from torch import nn

from .errors import LoRAError
from .layer import LoRALinear
from .lowrank import AdapterView
from .mha import LoRAMultiheadAttention
from .readers import route_weight_readers
from .spec import DEFAULT_ADAPTER
from .wrappers import clean_name, is_wrapper, unwrap_model

__all__ = [
    "AdaptedLayer",
    "active_adapter",
    "adapted_layers",
    "adapter_names",
    "adapter_views",
    "apply_adapters",
    "check_routable",
    "find_module",
    "forget_injection",
    "is_adapted",
    "lora_modules",
    "record_adapter",
    "replace_module",
    "resolve_adapter",
    "set_active",
    "trainable_modules",
]

AdaptedLayer = Union[LoRALinear, LoRAMultiheadAttention]  # noqa: UP007 (evaluated at run time on 3.10)

_TRAINABLE_ATTR = "_lora_vit_trainable"
_NAMES_ATTR = "_lora_vit_adapters"
_ACTIVE_ATTR = "_lora_vit_active"


def is_adapted(module: nn.Module) -> bool:
    """Whether ``module`` holds adapter factors of its own (a routing-only MHA does not)."""
    return isinstance(module, (LoRALinear, LoRAMultiheadAttention)) and bool(module.adapter_names)


def _named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules by their unwrapped dotted names; where a wrapper and its content share a name, the content."""
    found: dict[str, nn.Module] = {}
    for name, module in unwrap_model(model).named_modules():
        if not is_wrapper(module):
            found[clean_name(name)] = module
    return found


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """Every layer holding adapters, by dotted name, in model order (names as if unwrapped)."""
    return {name: m for name, m in _named_modules(model).items() if is_adapted(m)}  # type: ignore[misc]


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Adapted layers plus routing-only ``LoRAMultiheadAttention`` modules: all that merging replaces."""
    return {
        name: m for name, m in _named_modules(model).items() if isinstance(m, (LoRALinear, LoRAMultiheadAttention))
    }


def trainable_modules(model: nn.Module) -> tuple[str, ...]:
    """Names of the whole modules that ``inject_lora(..., trainable=...)`` left trainable."""
    return tuple(getattr(unwrap_model(model), _TRAINABLE_ATTR, ()))


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    """The named adapters of ``model``, in the order they were added."""
    layers = adapted_layers(model)
    present = {n for layer in layers.values() for n in layer.adapter_names}
    recorded = [n for n in getattr(unwrap_model(model), _NAMES_ATTR, ()) if n in present]
    seen = [n for layer in layers.values() for n in layer.adapter_names]
    return tuple(dict.fromkeys([*recorded, *seen]))


def active_adapter(model: nn.Module) -> str | None:
    """The adapter ``model`` runs (``None``: the base model)."""
    names = adapter_names(model)
    inner = unwrap_model(model)
    if hasattr(inner, _ACTIVE_ATTR):
        active = getattr(inner, _ACTIVE_ATTR)
        return active if active in names else (names[0] if names and active is not None else None)
    return names[0] if names else None


def set_active(model: nn.Module, name: str | None) -> None:
    """Record ``name`` as the running adapter and make every adapted layer run it."""
    setattr(unwrap_model(model), _ACTIVE_ATTR, name)
    for layer in adapted_layers(model).values():
        layer.set_active(name)


def record_adapter(model: nn.Module, name: str) -> None:
    """Note that ``name`` was added; the first adapter of a model is the one it runs."""
    inner = unwrap_model(model)
    names = [n for n in getattr(inner, _NAMES_ATTR, ()) if n != name]
    setattr(inner, _NAMES_ATTR, (*names, name))


def resolve_adapter(model: nn.Module, adapter: str | None, action: str) -> str:
    """The adapter an API call with ``adapter=`` means: the given one, or the model's only one.

    Raises:
        LoRAError: If the model has no adapters, has several and none was named (listing
            them), or has none named ``adapter``.
    """
    names = adapter_names(model)
    if not names:
        purpose = "" if action == "save" else f" to {action}"
        raise LoRAError(
            f"{type(unwrap_model(model)).__name__} has no LoRA adapters{purpose}; call inject_lora first,"
            " or load_lora with an adapter file"
        )
    if adapter is None:
        if len(names) > 1:
            raise LoRAError(f"the model holds several adapters {list(names)}; pass adapter=<name> to {action}")
        return names[0]
    if adapter not in names:
        raise LoRAError(f"the model has no adapter named {adapter!r}; its adapters are {list(names)}")
    return adapter


def adapter_views(model: nn.Module, adapter: str) -> dict[str, AdapterView]:
    """Adapter ``adapter`` of every layer that has it, seen alone (see :class:`AdapterView`)."""
    layers = adapted_layers(model)
    return {name: layer.adapter(adapter) for name, layer in layers.items() if adapter in layer.adapter_names}


def find_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` that also sees through DDP/FSDP/compile wrappers.

    Raises:
        AttributeError: If no module has that (unwrapped) name.
    """
    inner = unwrap_model(model)
    try:
        return inner.get_submodule(name)
    except AttributeError:
        found = _named_modules(model).get(name)
        if found is None:
            raise
        return found


def forget_injection(model: nn.Module) -> None:
    """Drop the records of trainable modules and adapters (after merging, the model is plain)."""
    inner = unwrap_model(model)
    for attr in (_TRAINABLE_ATTR, _NAMES_ATTR, _ACTIVE_ATTR):
        if hasattr(inner, attr):
            delattr(inner, attr)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(find_module(model, parent_name), child, new)


def check_routable(model: nn.Module, layers: Mapping[str, nn.Module], where: str) -> None:
    """Refuse an adapted ``out_proj`` of an ``nn.MultiheadAttention`` that is the model itself.

    :func:`apply_adapters` replaces such a parent by a :class:`LoRAMultiheadAttention` so that it
    calls ``out_proj``; the model itself cannot be replaced in place.

    Raises:
        LoRAError: Naming the layer.
    """
    if isinstance(unwrap_model(model), nn.MultiheadAttention) and "out_proj" in layers:
        raise LoRAError(
            f"{where} adapts 'out_proj' of the nn.MultiheadAttention that is the model itself, which cannot"
            " be replaced in place; load into the module that holds it"
        )


def apply_adapters(
    model: nn.Module, layers: Mapping[str, AdaptedLayer], trainable: Iterable[str], adapter: str = DEFAULT_ADAPTER
) -> None:
    """Swap new ``layers`` into ``model``, record ``adapter``, then freeze all but adapters and ``trainable``.

    Callers build and validate everything first (adapters added to layers already in the model
    included), so this step cannot fail half-way.
    """
    # Parents first: an adapted MultiheadAttention takes over its out_proj child when built, so
    # an adapted out_proj must go into the new module, not the replaced one.
    for name in sorted(layers, key=lambda n: n.count(".")):
        if find_module(model, name) is not layers[name]:
            replace_module(model, name, layers[name])
    # Parents that read a layer's weight instead of calling it (timm EVA/BEiT qkv) must call it.
    route_weight_readers({name: find_module(model, name.rpartition(".")[0]) for name in layers})
    # nn.MultiheadAttention reads out_proj.weight itself: route it through its out_proj module.
    for name in layers:
        parent_name, _, child = name.rpartition(".")
        parent = find_module(model, parent_name)
        routed = isinstance(parent, LoRAMultiheadAttention)
        if child == "out_proj" and isinstance(parent, nn.MultiheadAttention) and not routed:
            replace_module(model, parent_name, LoRAMultiheadAttention.routing(parent))
    recorded = list(trainable_modules(model))
    recorded += [t for t in trainable if t not in recorded]
    setattr(unwrap_model(model), _TRAINABLE_ATTR, tuple(recorded))
    record_adapter(model, adapter)
    set_active(model, active_adapter(model))
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in adapted_layers(model).values():
        for param in layer.all_adapter_parameters():
            param.requires_grad_(True)
    for name in recorded:
        for param in find_module(model, name).parameters():
            param.requires_grad_(True)
