"""Parents that read an adapted layer's ``.weight`` directly, and routing them through the layer.

An adapter only acts when its layer is *called*. Some attention modules skip the call: timm's
EVA and BEiT families (``timm.models.eva.EvaAttention``, ``timm.models.beit.Attention``) compute
``F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias))`` whenever they have separate q/v
biases. Those modules carry their own switch, ``qkv_bias_separate``: when set they call
``self.qkv(x)`` and add the same bias afterwards, which is the same function (bit-identical on
CPU). So after an adapter goes into such a ``qkv``, the switch is turned on and the adapter is on
the forward path. Readers with no such switch are caught by :func:`lora_vit.verify_lora`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from torch import nn

__all__ = ["route_weight_readers"]

logger = logging.getLogger("lora_vit")


def _reads_qkv_weight(parent: nn.Module, child: str) -> bool:
    """timm EVA/BEiT attention: fused ``qkv`` without bias, separate q/v biases, F.linear path."""
    return (
        child == "qkv"
        and getattr(parent, "qkv_bias_separate", None) is False
        and getattr(parent, "q_bias", None) is not None
    )


def route_weight_readers(parents: Mapping[str, nn.Module]) -> list[str]:
    """Make parents that read these layers' weights call the layers instead, where they can.

    Args:
        parents: Dotted layer name -> the module holding that layer as a child.

    Returns:
        The names of the layers whose parent was switched, e.g. ``["blocks.0.attn.qkv"]``.
    """
    switched = []
    for name, parent in parents.items():
        if _reads_qkv_weight(parent, name.rpartition(".")[2]):
            # The model's own switch: qkv(x) + bias instead of F.linear(x, qkv.weight, bias).
            setattr(parent, "qkv_bias_separate", True)  # noqa: B010 (a plain attribute, not a submodule)
            # That path adds the bias to the layer's output in place (qkv += bias); a layer
            # that saves its output for backward (DoRA) must then hand out a copy.
            setattr(getattr(parent, name.rpartition(".")[2]), "output_modified_in_place", True)  # noqa: B010
            switched.append(name)
    if switched:
        logger.info("set qkv_bias_separate=True on the parents of %s so their adapters run", switched)
    return switched
