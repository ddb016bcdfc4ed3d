"""The one load pipeline: plan the adapters a source describes, check everything, apply, copy.

Every loader translates its source into the library's own terms first (per-layer configs as
``layer.config()`` writes them, trainable module names, tensors under
:func:`~lora_vit.lora_state_dict` keys): :func:`lora_vit.load_lora` from a lora-vit file,
:func:`lora_vit.load_peft_adapter` from a PEFT folder. :func:`load_adapters` then does the
rest the same way for both, so they cannot drift apart in how modules are looked up, how
wrappers are treated or what reaches the model: nothing is changed until every check passed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import spec_from_config
from .errors import LoRAError
from .inject import add_or_build, check_trainable_names
from .layer import LoRALinear
from .lowrank import AdapterView
from .mha import LoRAMultiheadAttention
from .registry import (
    adapter_module,
    adapter_names,
    adapter_views,
    apply_adapters,
    check_routable,
    find_module,
    plan_owned,
    trainable_modules,
)
from .routing import check_not_routing
from .spec import LoRASlice
from .state import adapter_tensors, check_tensors, copy_tensors
from .wrappers import check_not_wrapped, unwrap_model

__all__ = ["load_adapters", "padded_tensors"]


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
    adapter: str,
    check_layers: Callable[[Mapping[str, AdapterView]], None] | None = None,
    pad: bool = False,
) -> nn.Module:
    """Load adapter ``adapter`` described by ``configs`` with values ``tensors`` into ``model``.

    If the model has no adapter of that name, it is added (layers are built from ``configs``,
    beside any other adapters); if it has one, that adapter must have exactly that layout and
    the values are swapped in place (a compiled model does not recompile, and which
    parameters train is left as it is).

    Args:
        model: The base model, or one already adapted; DDP, DataParallel, FSDP and
            ``torch.compile`` wrappers are seen through, and refused where new modules or
            adapters would have to be added under them.
        configs: Dotted layer name -> ``config()``-shaped description.
        trainable: Whole modules whose state ``tensors`` also holds.
        tensors: Values under :func:`~lora_vit.lora_state_dict` keys.
        where: Names the source in error messages (a file or folder path, quoted).
        adapter: The adapter name to load into.
        check_layers: Called with the planned (or existing) adapter views before anything
            changes, e.g. to compare base-weight fingerprints; raises ``LoRAError`` to refuse.
        pad: On an adapter whose slices match but whose ranks are higher (injected with a
            maximum rank), accept lower ranks: see :func:`padded_tensors`.

    Raises:
        LoRAError: If the layout differs from the model's adapter of that name, a layer or
            module is missing or of another shape, adding would happen under a DDP/FSDP
            wrapper, or a tensor is missing, unexpected, mis-shaped or not finite.
    """
    if adapter in adapter_names(model):
        existing = adapter_views(model, adapter)
        _check_trainable(model, trainable, where)
        mine = trainable_modules(model, adapter)
        if set(trainable) != set(mine):
            raise LoRAError(
                f"{where} trains modules {sorted(trainable)}, but the model's adapter {adapter!r} trains"
                f" {sorted(mine)}; load it under another adapter= name instead"
            )
        tensors = _swappable(existing, configs, tensors, where, pad)
        modules = {name: adapter_module(model, name, adapter) for name in mine}
        _check_and_copy(existing, modules, tensors, where, check_layers)
        return model
    check_not_routing(unwrap_model(model), "load a new adapter")
    if configs or trainable:
        check_not_wrapped(model, "load adapters (which injects them) into")
    plans = {}
    for name, config in configs.items():
        try:
            base = find_module(model, name)
        except AttributeError:
            raise LoRAError(f"{where} adapts layer {name!r}, which this model does not have") from None
        try:
            plans[name] = spec_from_config(base, config)
        except LoRAError as err:
            raise LoRAError(f"{where}, layer {name!r}: {err}") from None
    check_routable(model, plans, where)
    if "" in plans and not isinstance(unwrap_model(model), (LoRALinear, LoRAMultiheadAttention)):
        raise LoRAError(
            f"{where} adapts the model itself (a {type(unwrap_model(model)).__name__}), which cannot be replaced in"
            " place; load it into a LoRALinear built over it, or into the module that holds it"
        )
    _check_trainable(model, trainable, where)
    check_trainable_names(model, trainable, adapter, where)
    owned = plan_owned(model, adapter, trainable)
    for name, mine in owned.items():
        if mine is not find_module(model, name):  # a new copy takes the source's shapes (a head of other classes)
            fit_shapes(mine, name, tensors)
    layers = add_or_build(model, plans, adapter, where)
    try:
        views = {name: layer.adapter(adapter) for name, layer in layers.items()}
        _check_and_copy(views, owned, tensors, where, check_layers, copy=False)
    except BaseException:
        for name, layer in layers.items():
            if find_module(model, name) is layer:  # added in place: taken out again (new layers were never swapped in)
                layer.remove_adapter(adapter)
        raise
    apply_adapters(unwrap_model(model), layers, owned, adapter)
    copy_tensors(adapter_tensors(adapter_views(model, adapter), owned), tensors)
    return model


def _check_trainable(model: nn.Module, trainable: list[str], where: str) -> None:
    for name in trainable:
        try:
            find_module(model, name)
        except AttributeError:
            raise LoRAError(f"{where} trains module {name!r}, which this model does not have") from None


def fit_shapes(module: nn.Module, name: str, tensors: Mapping[str, Tensor]) -> None:
    """Give ``module`` (a fresh copy) the shapes its tensors have in ``tensors`` (under ``name.``), uninitialised.

    So an adapter's head may have another number of classes than the base model's. The module's
    forward must accept its new shapes (``nn.Linear``'s does; its ``in/out_features`` follow).
    """
    for key, value in module.state_dict().items():
        given = tensors.get(f"{name}.{key}")
        if not isinstance(given, Tensor) or given.shape == value.shape:
            continue
        path, _, attr = key.rpartition(".")
        owner = module.get_submodule(path)
        fresh = torch.empty(given.shape, dtype=value.dtype, device=value.device)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(fresh)
        elif attr in owner._buffers:
            owner._buffers[attr] = fresh
        if isinstance(owner, nn.Linear) and attr == "weight" and given.dim() == 2:
            owner.out_features, owner.in_features = given.shape


def _swappable(
    existing: Mapping[str, AdapterView],
    configs: Mapping[str, Mapping[str, Any]],
    tensors: Mapping[str, Tensor],
    where: str,
    pad: bool,
) -> Mapping[str, Tensor]:
    """``tensors`` (padded when ``pad`` allows) if they fit the existing adapter's layout.

    Raises:
        LoRAError: Describing the layout difference.
    """
    same = {n: _comparable(view.config()) for n, view in existing.items()} == {
        n: _comparable(c) for n, c in configs.items()
    }
    if same:
        return tensors
    if pad and _paddable(existing, configs, where):
        return padded_tensors(existing, configs, tensors, where)
    only_model = sorted(set(existing) - set(configs))
    only_source = sorted(set(configs) - set(existing))
    raise LoRAError(
        f"the model already has adapters with another layout than {where}"
        f" (only in the model: {only_model}; only in the source: {only_source}; or ranks,"
        " slices or alphas differ). Load it into a fresh base model instead, or under another"
        " adapter= name, or pass pad=True to swap lower ranks into adapters injected with a maximum rank."
    )


def _check_and_copy(
    views: Mapping[str, AdapterView],
    modules: Mapping[str, nn.Module],
    tensors: Mapping[str, Tensor],
    where: str,
    check_layers: Callable[[Mapping[str, AdapterView]], None] | None,
    copy: bool = True,
) -> None:
    if check_layers is not None:
        check_layers(views)
    expected = adapter_tensors(views, modules)
    try:
        check_tensors(expected, tensors, strict=True)
    except LoRAError as err:
        raise LoRAError(f"{where}: {err}") from None
    if copy:
        copy_tensors(expected, tensors)


def _slice_layout(config: Mapping[str, Any]) -> tuple:
    """Everything of a layer config but ranks, alphas and dropout."""
    rest = {k: v for k, v in config.items() if k not in ("dropout", "slices", "use_rslora")}
    return tuple(sorted(rest.items())), tuple((s["name"], s["start"], s["stop"]) for s in config["slices"])


def _paddable(existing: Mapping[str, AdapterView], configs: Mapping[str, Mapping[str, Any]], where: str) -> bool:
    """Whether ``configs`` fit into ``existing`` by padding ranks; False if the layouts differ otherwise.

    Raises:
        LoRAError: If they fit but some rank is above the model's.
    """
    if set(existing) != set(configs):
        return False
    if any(_slice_layout(existing[n].config()) != _slice_layout(c) for n, c in configs.items()):
        return False
    too_big = [
        f"{name}[{s.name}]" if s.name else name
        for name, config in configs.items()
        for s, entry in zip(existing[name].slices, config["slices"])
        if entry["r"] > s.r
    ]
    if too_big:
        raise LoRAError(
            f"{where} has higher ranks than this model's adapters can hold ({too_big}): padding only"
            " swaps in ranks up to the injected ones. Inject with a larger r (the maximum rank to swap in)"
        )
    # Padding fills A and B only; a kind whose own parameters grow with the rank has no padded form.
    growing = sorted({
        view.kind.name
        for view in existing.values()
        for s in view.slices
        if view.kind.extra_shapes(s, view.layer.in_features)
        != view.kind.extra_shapes(dataclasses.replace(s, r=s.r + 1), view.layer.in_features)
    })
    if growing:
        raise LoRAError(
            f"{where}: pad=True swaps lower ranks into A and B only, but adapter kind(s) {growing} add"
            " parameters whose shape depends on the rank; load into a model injected with the file's ranks"
        )
    return True


def padded_tensors(
    existing: Mapping[str, AdapterView],
    configs: Mapping[str, Mapping[str, Any]],
    tensors: Mapping[str, Tensor],
    where: str,
) -> dict[str, Tensor]:
    """Lower-rank factors in the shapes of the model's (higher-rank) adapters, computing the same update.

    For a slice of rank ``r <= R``: ``A`` gets zero rows ``r..R``, and ``B`` zero columns, with
    the source's scaling folded in (``B * scaling_source / scaling_model``), so
    ``scaling_model * B_padded @ A_padded == scaling_source * B @ A`` and the model's structure
    and constants (hence a compiled graph) stay as they are.

    Raises:
        LoRAError: Naming a tensor that is missing, mis-shaped or not finite in the source.
    """
    expected: dict[str, Tensor] = {}
    for name, config in configs.items():
        layer = existing[name]
        for s, entry in zip(layer.slices, config["slices"]):
            like = getattr(layer, s.a_name)
            expected[f"{name}.{s.a_name}"] = torch.empty(entry["r"], layer.in_features, dtype=like.dtype, device="meta")
            expected[f"{name}.{s.b_name}"] = torch.empty(s.rows, entry["r"], dtype=like.dtype, device="meta")
    try:
        check_tensors(expected, {k: v for k, v in tensors.items() if k in expected}, strict=True)
    except LoRAError as err:
        raise LoRAError(f"{where}: {err}") from None
    padded = dict(tensors)
    for name, config in configs.items():
        layer = existing[name]
        for s, scaling, entry in zip(layer.slices, layer.scalings, config["slices"]):
            r = entry["r"]
            source = LoRASlice(s.name, s.start, s.stop, r, float(entry["alpha"])).scaling(config["use_rslora"])
            a, b = tensors[f"{name}.{s.a_name}"], tensors[f"{name}.{s.b_name}"]
            # At least float32, and the model's dtype where wider (a float64 model gets float64 factors).
            wide = torch.promote_types(getattr(layer, s.a_name).dtype, torch.float32)
            a_padded = a.new_zeros(s.r, layer.in_features, dtype=wide)
            b_padded = b.new_zeros(s.rows, s.r, dtype=wide)
            a_padded[:r] = a.to(wide)
            b_padded[:, :r] = b.to(wide) * (source / scaling)
            padded[f"{name}.{s.a_name}"], padded[f"{name}.{s.b_name}"] = a_padded, b_padded
    return padded
