"""The adapter state: what `inject_lora` left trainable, as a flat tensor dict, and loading it back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .errors import LoRAError
from .lowrank import AdapterView
from .registry import adapter_module, adapter_views, resolve_adapter, trainable_modules

__all__ = ["LoadResult", "adapter_tensors", "check_tensors", "load_lora_state_dict", "lora_state_dict"]


class LoadResult(NamedTuple):
    """Keys that :func:`load_lora_state_dict` did not find or did not expect (``strict=False``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def lora_state_dict(model: nn.Module, *, adapter: str | None = None) -> dict[str, Tensor]:
    """Every tensor of one adapter, plus the state of modules ``inject_lora`` made fully trainable.

    Keys are the model's own dotted names (``blocks.0.attn.qkv.lora_A_q``, ``head.weight``),
    values are detached tensors sharing storage with the model, as in ``state_dict()``. A model
    wrapped in DDP, DataParallel, FSDP or ``torch.compile`` gives the same keys as the plain
    model (no ``module.`` prefix); under FSDP call it inside ``FSDP.summon_full_params``.
    An adapter's factors have the same keys whatever its name (``lora_A``, not ``lora_A__x``),
    so the state of any named adapter loads into any other of the same layout.

    Args:
        model: An adapted model.
        adapter: Which named adapter; may be omitted when the model holds one.

    Raises:
        LoRAError: If the model has no adapters and no trainable modules, or holds several
            adapters and ``adapter`` is omitted (the message lists them), or none of that name.

    Example:
        >>> from lora_vit import inject_lora
        >>> model = inject_lora(nn.Sequential(nn.Linear(4, 4)), targets=["0"], r=2)
        >>> sorted(lora_state_dict(model))
        ['0.lora_A', '0.lora_B']
    """
    name = resolve_adapter(model, adapter, "save")
    modules = {m: adapter_module(model, m, name) for m in trainable_modules(model, name)}
    state = adapter_tensors(adapter_views(model, name), modules)
    if not state:
        raise LoRAError(
            f"{type(model).__name__} has no LoRA adapters; call inject_lora first, or load_lora"
            " with an adapter file"
        )
    return state


def adapter_tensors(layers: Mapping[str, AdapterView], modules: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """The adapter Parameters of ``layers`` and the state of the trainable ``modules`` (one adapter's copies).

    Both may be planned, not yet in the model (a load); keys are dotted names as in
    :func:`lora_state_dict` (a copy's state under the module's own name), values detached
    tensors sharing storage.

    Raises:
        LoRAError: If an adapter Parameter has another shape than its layer implies (an FSDP
            shard outside ``summon_full_params``).
    """
    state: dict[str, Tensor] = {}
    for name, layer in layers.items():
        for param_name, shape in layer.adapter_shapes():
            param = getattr(layer, param_name)
            if tuple(param.shape) != shape:
                # FSDP with use_orig_params=True leaves each rank a flat shard outside
                # forward; saving that would write a file no model can load.
                raise LoRAError(
                    f"{name}.{param_name} has shape {tuple(param.shape)} instead of {shape}: the model"
                    " looks sharded (FSDP). Call this inside FSDP.summon_full_params(model)"
                )
            state[f"{name}.{param_name}"] = param.detach()
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            state[f"{name}.{key}"] = value
    return state


def check_tensors(expected: Mapping[str, Tensor], given: Mapping[str, object], strict: bool) -> LoadResult:
    """Validate ``given`` against ``expected`` without changing anything.

    Raises:
        LoRAError: Naming the first tensor that is not a tensor, has another shape, a
            non-float dtype where a float is expected, or NaN/Inf values; and, with
            ``strict``, the missing and unexpected keys.
    """
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected}")
        raise LoRAError(f"adapter state does not match the model: {'; '.join(parts)}")
    for key, target in expected.items():
        if key not in given:
            continue
        _check_one(key, target, given[key])
    return LoadResult(missing, unexpected)


def _check_one(key: str, target: Tensor, value: object) -> None:
    if not isinstance(value, Tensor):
        raise LoRAError(f"{key!r} must be a tensor, got {type(value).__name__}")
    if value.is_meta or value.layout != torch.strided:
        raise LoRAError(f"{key!r} must be a dense tensor with data, got layout {value.layout} on {value.device}")
    if value.shape != target.shape:
        raise LoRAError(f"{key!r} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}")
    if not target.is_floating_point():
        if value.dtype != target.dtype:
            raise LoRAError(f"{key!r} has dtype {value.dtype}, the model expects {target.dtype}")
        return
    if not value.is_floating_point():
        raise LoRAError(f"{key!r} has dtype {value.dtype}, the model expects a float ({target.dtype})")
    # Checked after casting to the parameter's dtype: a float64 1e39 is finite, but it would be
    # copied in as inf; and float8 values have no isfinite kernel of their own.
    with torch.no_grad():
        cast = value.detach().to(dtype=target.dtype)
        if cast.dtype.itemsize < 2:
            cast = cast.to(torch.float32)
        if not bool(torch.isfinite(cast).all()):
            raise LoRAError(
                f"{key!r} contains NaN or Inf values (in the model's dtype {target.dtype}); refusing to load them"
            )


def copy_tensors(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for key, target in expected.items():
            if key in given:
                target.copy_(given[key])


def load_lora_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True, *, adapter: str | None = None
) -> LoadResult:
    """Copy adapter (and trainable-module) tensors into an injected model.

    Everything is checked before anything is copied, so a failed load leaves the model as
    it was. Values are cast to each parameter's dtype and device.

    Args:
        model: A model adapted by :func:`inject_lora` (or :func:`load_lora`).
        state_dict: As returned by :func:`lora_state_dict`.
        strict: Require exactly the keys of ``lora_state_dict(model)``.
        adapter: Which named adapter to load into; may be omitted when the model holds one.

    Returns:
        The missing and unexpected keys (both empty when ``strict``).

    Raises:
        LoRAError: If the model has no adapters, or a tensor is missing, unexpected
            (``strict``), mis-shaped, of a non-float dtype, or not finite; the message names it.
    """
    if not isinstance(state_dict, Mapping):
        raise LoRAError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    expected = lora_state_dict(model, adapter=adapter)
    result = check_tensors(expected, state_dict, strict)
    copy_tensors(expected, state_dict)
    return result
