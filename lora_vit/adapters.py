"""Which adapter class adapts which base module: the one place that knows both layer kinds.

An *adapted layer* is a module holding ``lora_A*`` / ``lora_B*`` factors over one base weight
matrix: a :class:`~lora_vit.layer.LoRALinear` (over an ``nn.Linear``), or a
:class:`~lora_vit.mha.LoRAMultiheadAttention` with in-projection adapters (over its packed
``in_proj_weight``). Both expose the same interface (``slices``, ``scalings``, ``weight``,
``in_features``/``out_features``, ``adapter_parameters()``, ``merged_weight()``, ``config()``),
so state, files, fingerprints and verification treat them alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

from torch import nn

from .errors import LoRAError
from .layer import LoRALinear
from .mha import LoRAMultiheadAttention

__all__ = ["AdaptedLayer", "adapter_from_config", "build_adapter", "is_adapted", "merged_module"]

AdaptedLayer = Union[LoRALinear, LoRAMultiheadAttention]  # noqa: UP007 (evaluated at run time on 3.10)


def is_adapted(module: nn.Module) -> bool:
    """Whether ``module`` holds adapter factors of its own (a routing-only MHA does not)."""
    return isinstance(module, LoRALinear) or (isinstance(module, LoRAMultiheadAttention) and bool(module.slices))


def build_adapter(
    base: nn.Module,
    r: int | Mapping[str, int],
    alpha: float | Mapping[str, float],
    dropout: float,
    *,
    slices: Mapping[str, tuple[int, int]] | None,
    init: str,
    use_rslora: bool,
    use_dora: bool = False,
) -> AdaptedLayer:
    """The adapter for ``base`` (an ``nn.Linear`` or ``nn.MultiheadAttention``).

    Raises:
        LoRAError: For DoRA on an ``nn.MultiheadAttention``'s in-projection (not supported;
            its ``out_proj`` is an ``nn.Linear`` and takes DoRA).
    """
    if isinstance(base, nn.MultiheadAttention):
        if use_dora:
            raise LoRAError(
                "use_dora is not supported on nn.MultiheadAttention's packed in-projection (q/k/v);"
                " DoRA works on nn.Linear layers, including its out_proj (target 'o')"
            )
        return LoRAMultiheadAttention(base, r, alpha, dropout, slices=slices, init=init, use_rslora=use_rslora)
    if isinstance(base, nn.Linear):
        return LoRALinear(
            base, r, alpha, dropout, slices=slices, init=init, use_rslora=use_rslora, use_dora=use_dora
        )
    raise LoRAError(f"lora-vit adapts nn.Linear and nn.MultiheadAttention, got {type(base).__name__}")


def adapter_from_config(base: nn.Module, config: Mapping[str, Any]) -> AdaptedLayer:
    """Rebuild an adapter described by ``layer.config()`` on ``base``.

    Raises:
        LoRAError: If the config's kind does not fit ``base`` or is unknown.
    """
    kind = config.get("kind", "linear")
    if kind == "multihead_attention":
        return LoRAMultiheadAttention.from_config(base, config)
    if kind != "linear":
        raise LoRAError(f"unknown adapter kind {kind!r} (known: 'linear', 'multihead_attention')")
    if not isinstance(base, nn.Linear):
        raise LoRAError(f"the adapter is for an nn.Linear, found {type(base).__name__}")
    return LoRALinear.from_config(base, config)


def merged_module(layer: nn.Module) -> nn.Module:
    """The plain module an adapter (or a routing-only MHA) merges into.

    Raises:
        LoRAError: If a merged weight would contain NaN or Inf.
    """
    if isinstance(layer, LoRAMultiheadAttention):
        return layer.merged_module()
    assert isinstance(layer, LoRALinear)
    return layer.merged_linear()
