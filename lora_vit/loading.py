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

import torch
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
from .layer import LoRASlice
from .state import adapter_tensors, check_tensors, copy_tensors, lora_state_dict

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
    check_layers: Callable[[Mapping[str, AdaptedLayer]], None] | None = None,
    pad: bool = False,
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
        pad: On an adapted model whose slices match but whose ranks are higher (injected with
            a maximum rank), accept lower ranks: see :func:`padded_tensors`.

    Raises:
        LoRAError: If the layout differs from the model's adapters, a layer or module is
            missing or of another shape, injecting would happen under a DDP/FSDP wrapper,
            or a tensor is missing, unexpected, mis-shaped or not finite.
    """
    existing = adapted_layers(model)
    planned: dict[str, AdaptedLayer] = {}
    if existing:
        same = {n: _comparable(layer.config()) for n, layer in existing.items()} == {
            n: _comparable(c) for n, c in configs.items()
        }
        if not same and pad and _paddable(existing, configs, where):
            tensors = padded_tensors(existing, configs, tensors, where)
        elif not same:
            only_model = sorted(set(existing) - set(configs))
            only_source = sorted(set(configs) - set(existing))
            raise LoRAError(
                f"the model already has adapters with another layout than {where}"
                f" (only in the model: {only_model}; only in the source: {only_source}; or ranks,"
                " slices or alphas differ). Load it into a fresh base model instead, or pass pad=True to swap"
                " lower ranks into adapters injected with a maximum rank."
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


def _slice_layout(config: Mapping[str, Any]) -> tuple:
    """Everything of a layer config but ranks, alphas and dropout."""
    rest = {k: v for k, v in config.items() if k not in ("dropout", "slices", "use_rslora")}
    return tuple(sorted(rest.items())), tuple((s["name"], s["start"], s["stop"]) for s in config["slices"])


def _paddable(existing: Mapping[str, AdaptedLayer], configs: Mapping[str, Mapping[str, Any]], where: str) -> bool:
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
    return True


def padded_tensors(
    existing: Mapping[str, AdaptedLayer],
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
            a_padded = a.new_zeros(s.r, layer.in_features, dtype=torch.float32)
            b_padded = b.new_zeros(s.rows, s.r, dtype=torch.float32)
            a_padded[:r] = a.float()
            b_padded[:, :r] = b.float() * (source / scaling)
            padded[f"{name}.{s.a_name}"], padded[f"{name}.{s.b_name}"] = a_padded, b_padded
    return padded
