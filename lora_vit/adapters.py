"""Which adapter class adapts which base module: the one place that knows both layer kinds.

An *adapted layer* is a module holding named adapters (``lora_A*`` / ``lora_B*`` factors) over
one base weight matrix: a :class:`~lora_vit.layer.LoRALinear` (over an ``nn.Linear``), or a
:class:`~lora_vit.mha.LoRAMultiheadAttention` with in-projection adapters (over its packed
``in_proj_weight``). Both share :class:`~lora_vit.lowrank.LowRankAdapters`, so state, files,
fingerprints and verification treat them alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .errors import LoRAError
from .layer import LoRALinear
from .mha import LoRAMultiheadAttention, check_mha_config
from .registry import AdaptedLayer
from .spec import AdapterSpec

__all__ = ["adapter_from_config", "build_adapter", "merged_module", "spec_from_config"]


def build_adapter(base: nn.Module, spec: AdapterSpec, adapter: str) -> AdaptedLayer:
    """A new adapted layer over ``base`` (an ``nn.Linear`` or ``nn.MultiheadAttention``) holding ``spec``.

    Raises:
        LoRAError: For a kind an ``nn.MultiheadAttention``'s in-projection cannot run (DoRA; its
            ``out_proj`` is an ``nn.Linear`` and takes it), or another module type.
    """
    if isinstance(base, nn.MultiheadAttention):
        return LoRAMultiheadAttention(base, adapter=adapter, spec=spec)
    if isinstance(base, nn.Linear):
        return LoRALinear(base, adapter=adapter, spec=spec)
    raise LoRAError(f"lora-vit adapts nn.Linear and nn.MultiheadAttention, got {type(base).__name__}")


def spec_from_config(base: nn.Module, config: Mapping[str, Any]) -> AdapterSpec:
    """The spec a file's layer record describes, checked against ``base``'s kind and shape.

    Raises:
        LoRAError: If the record's kind does not fit ``base``, is unknown, or is invalid.
    """
    kind = config.get("kind", "linear")
    if kind == "multihead_attention":
        check_mha_config(base, config)
    elif kind != "linear":
        raise LoRAError(f"unknown adapter kind {kind!r} (known: 'linear', 'multihead_attention')")
    elif not isinstance(base, (nn.Linear, LoRALinear)):
        raise LoRAError(f"the adapter is for an nn.Linear, found {type(base).__name__}")
    else:
        expected = (config["in_features"], config["out_features"])
        found = (base.in_features, base.out_features)
        if found != expected:
            raise LoRAError(f"expected a Linear{expected} (in, out), found {type(base).__name__}{found}")
    return AdapterSpec.from_config(config)


def adapter_from_config(base: nn.Module, config: Mapping[str, Any], adapter: str) -> AdaptedLayer:
    """A new adapted layer over a plain ``base`` as a ``config()`` record describes.

    Raises:
        LoRAError: If the record's kind does not fit ``base`` or is unknown.
    """
    return build_adapter(base, spec_from_config(base, config), adapter)


def merged_module(layer: nn.Module) -> nn.Module:
    """The plain module an adapter (or a routing-only MHA) merges into.

    Raises:
        LoRAError: If a merged weight would contain NaN or Inf.
    """
    if isinstance(layer, LoRAMultiheadAttention):
        return layer.merged_module()
    assert isinstance(layer, LoRALinear)
    return layer.merged_linear()
