"""Where the adapters of a model are: adapted layers by name, named adapters, the running one.

Everything that needs to find adapters in a model goes through here (inject, load, state, merge,
toggling, routing), so module lookup and wrapper handling are the same everywhere. The model
itself records, as plain attributes (never in its ``state_dict``), the whole modules that train
with the adapters, the adapter names in the order they were added, the adapter the user chose to run (absent:
the first added runs), and frozen copies of the originals of modules that the ``"default"``
adapter trains in place (see :mod:`lora_vit.per_adapter`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Union

from torch import nn

from .errors import LoRAError
from .layer import LoRALinear
from .lowrank import AdapterView
from .mha import LoRAMultiheadAttention
from .per_adapter import AdapterModules, fresh_copy
from .readers import route_weight_readers
from .spec import DEFAULT_ADAPTER
from .wrappers import clean_name, is_wrapper, unwrap_model

__all__ = [
    "AdaptedLayer",
    "active_adapter",
    "adapted_layers",
    "adapter_module",
    "adapter_names",
    "adapter_views",
    "apply_adapters",
    "check_routable",
    "choice",
    "choose_adapter",
    "detach_owned",
    "find_module",
    "forget_choice",
    "forget_injection",
    "is_adapted",
    "lora_modules",
    "per_adapter_modules",
    "plan_owned",
    "record_adapter",
    "replace_module",
    "resolve_adapter",
    "restore_choice",
    "sync_active",
    "trainable_modules",
]

AdaptedLayer = Union[LoRALinear, LoRAMultiheadAttention]  # noqa: UP007 (evaluated at run time on 3.10)

_TRAINABLE_ATTR = "_lora_vit_trainable"
_NAMES_ATTR = "_lora_vit_adapters"
_ACTIVE_ATTR = "_lora_vit_active"
_ORIGINALS_ATTR = "_lora_vit_originals"


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


def _owners(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Adapter -> the whole modules it trains (its own copies), as recorded on the model."""
    recorded = getattr(unwrap_model(model), _TRAINABLE_ATTR, {})
    if not isinstance(recorded, dict):  # a model adapted before modules belonged to adapters
        return {DEFAULT_ADAPTER: tuple(recorded)} if recorded else {}
    return dict(recorded)


def trainable_modules(model: nn.Module, adapter: str | None = None) -> tuple[str, ...]:
    """Names of the whole modules that ``inject_lora(..., trainable=...)`` left trainable.

    With ``adapter``, those that adapter trains (its own copies); else every adapter's, in the
    order they were first named.
    """
    owners = _owners(model)
    if adapter is not None:
        return owners.get(adapter, ())
    return tuple(dict.fromkeys(n for names in owners.values() for n in names))


def record_owned(model: nn.Module, adapter: str, names: Iterable[str]) -> None:
    """Note that ``adapter`` trains its own copy of each module in ``names`` (added to what it had)."""
    owners = _owners(model)
    owners[adapter] = tuple(dict.fromkeys([*owners.get(adapter, ()), *names]))
    setattr(unwrap_model(model), _TRAINABLE_ATTR, {k: v for k, v in owners.items() if v})


def forget_owned(model: nn.Module, adapter: str) -> None:
    owners = _owners(model)
    owners.pop(adapter, None)
    setattr(unwrap_model(model), _TRAINABLE_ATTR, owners)


def per_adapter_modules(model: nn.Module) -> dict[str, AdapterModules]:
    """Every module that holds per-adapter copies, by dotted name."""
    return {name: m for name, m in _named_modules(model).items() if isinstance(m, AdapterModules)}


def adapter_module(model: nn.Module, name: str, adapter: str) -> nn.Module:
    """Adapter ``adapter``'s copy of trainable module ``name`` (the module in place if it is not per-adapter).

    Raises:
        LoRAError: If ``name`` holds per-adapter copies but none of ``adapter``.
    """
    module = find_module(model, name)
    if isinstance(module, AdapterModules):
        if adapter not in module.per_adapter:
            raise LoRAError(f"adapter {adapter!r} has no copy of module {name!r} (copies: {list(module.per_adapter)})")
        return module.per_adapter[adapter]
    return module


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    """The named adapters of ``model``, in the order they were added.

    An adapter is there while it has low-rank factors on a layer or a copy of a trainable module.
    """
    layers = adapted_layers(model)
    seen = [n for layer in layers.values() for n in layer.adapter_names]
    seen += [adapter for adapter, names in _owners(model).items() if names]
    present = set(seen)
    recorded = [n for n in getattr(unwrap_model(model), _NAMES_ATTR, ()) if n in present]
    return tuple(dict.fromkeys([*recorded, *seen]))


def active_adapter(model: nn.Module) -> str | None:
    """The adapter ``model`` runs (``None``: the base model).

    The one chosen with :func:`lora_vit.set_adapter` while it exists, else the first added.
    """
    names = adapter_names(model)
    inner = unwrap_model(model)
    if _ACTIVE_ATTR in inner.__dict__:
        chosen = inner.__dict__[_ACTIVE_ATTR]
        if chosen is None or chosen in names:
            return chosen  # type: ignore[no-any-return]
    return names[0] if names else None


def choose_adapter(model: nn.Module, name: str | None) -> None:
    """Record ``name`` as the user's choice (``None``: the base model) and make every module run it."""
    unwrap_model(model).__dict__[_ACTIVE_ATTR] = name
    sync_active(model)


_UNCHOSEN = object()


def choice(model: nn.Module) -> object:
    """The raw record of the user's choice, for :func:`restore_choice` (an opaque marker if none)."""
    return unwrap_model(model).__dict__.get(_ACTIVE_ATTR, _UNCHOSEN)


def restore_choice(model: nn.Module, recorded: object) -> None:
    if recorded is _UNCHOSEN:
        forget_choice(model)
    else:
        choose_adapter(model, recorded)  # type: ignore[arg-type]


def forget_choice(model: nn.Module) -> None:
    """Drop the user's choice: the first adapter runs again."""
    unwrap_model(model).__dict__.pop(_ACTIVE_ATTR, None)
    sync_active(model)


def sync_active(model: nn.Module) -> None:
    """Make every adapted layer and per-adapter module run :func:`active_adapter`.

    The model's record is the one truth; layers cache what it says because their forward (and
    a compiled graph's guards) read it on every call.
    """
    name = active_adapter(model)
    for layer in adapted_layers(model).values():
        layer.set_active(name)
    for module in per_adapter_modules(model).values():
        module.set_active(name)


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
    for attr in (_TRAINABLE_ATTR, _NAMES_ATTR, _ACTIVE_ATTR, _ORIGINALS_ATTR):
        inner.__dict__.pop(attr, None)


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


def _originals(model: nn.Module) -> dict[str, nn.Module]:
    return unwrap_model(model).__dict__.setdefault(_ORIGINALS_ATTR, {})  # type: ignore[no-any-return]


def _like(module: nn.Module, reference: nn.Module) -> nn.Module:
    """``module`` on the device (and float dtype) of ``reference``'s first tensor."""
    first = next(iter(reference.state_dict().values()), None)
    if first is None:
        return module
    return module.to(device=first.device, dtype=first.dtype) if first.is_floating_point() else module.to(first.device)


def plan_owned(model: nn.Module, adapter: str, names: Iterable[str]) -> dict[str, nn.Module]:
    """The module that will be ``adapter``'s own copy of each trainable module in ``names`` it lacks.

    A new copy (of the original, untrained), or the module in place for the ``"default"`` adapter
    where no adapter trains it yet (single-adapter models keep their keys). Nothing in the model
    changes; :func:`apply_adapters` puts the copies in.
    """
    owners = _owners(model)
    planned: dict[str, nn.Module] = {}
    for name in names:
        if name in owners.get(adapter, ()):
            continue
        module = find_module(model, name)
        owned = any(name in names_ for names_ in owners.values())
        if isinstance(module, AdapterModules):
            planned[name] = fresh_copy(module.original)
        elif adapter == DEFAULT_ADAPTER and not owned:
            planned[name] = module
        else:
            original = _originals(model).get(name, module) if owned else module
            planned[name] = _like(fresh_copy(original), module)
    return planned


def _attach_owned(model: nn.Module, adapter: str, planned: Mapping[str, nn.Module]) -> None:
    owners = _owners(model)
    originals = _originals(model)
    for name, mine in planned.items():
        module = find_module(model, name)
        if mine is module:  # the default adapter trains it in place: keep its original for None
            originals.setdefault(name, copy.deepcopy(module).requires_grad_(False))
            continue
        if isinstance(module, AdapterModules):
            module.per_adapter[adapter] = mine.train(module.training)
            continue
        holders = [a for a, names in owners.items() if name in names]
        if holders:  # trained in place by the default adapter until now
            router = AdapterModules(_like(originals.pop(name, copy.deepcopy(module)), module))
            router.per_adapter[holders[0]] = module
        else:
            router = AdapterModules(module)
        router.per_adapter[adapter] = mine
        router.train(module.training)
        replace_module(model, name, router)
    record_owned(model, adapter, planned)


def detach_owned(model: nn.Module, adapter: str) -> None:
    """Remove ``adapter``'s copies; a module left with none is its original again."""
    originals = _originals(model)
    for name in trainable_modules(model, adapter):
        module = find_module(model, name)
        if isinstance(module, AdapterModules):
            if adapter in module.per_adapter:
                del module.per_adapter[adapter]
            if not module.per_adapter:
                replace_module(model, name, module.original)
        elif name in originals:
            replace_module(model, name, _like(originals.pop(name), module))
    forget_owned(model, adapter)


def apply_adapters(
    model: nn.Module,
    layers: Mapping[str, AdaptedLayer],
    owned: Mapping[str, nn.Module],
    adapter: str = DEFAULT_ADAPTER,
) -> None:
    """Swap new ``layers`` and ``adapter``'s own module copies (:func:`plan_owned`) into ``model``.

    Callers build and validate everything first (adapters added to layers already in the model
    included), so this step cannot fail half-way. On a model that held no adapter yet, every
    parameter is frozen first (the base model); then exactly the new factors of ``adapter`` on
    ``layers`` and its new copies are made trainable. What other adapters, heads or base
    parameters require is left as the user set it.
    """
    fresh = not adapter_names(model) and not trainable_modules(model)
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
    if fresh:
        for param in model.parameters():
            param.requires_grad_(False)
    _attach_owned(model, adapter, owned)
    record_adapter(model, adapter)
    sync_active(model)
    for layer in layers.values():
        for param in layer.adapter(adapter).adapter_parameters():
            param.requires_grad_(True)
    for module in owned.values():
        for param in module.parameters():
            param.requires_grad_(True)
