"""A mixed batch on one layer: every sample through its own adapter, in one pass.

Inside :func:`lora_vit.adapter_per_sample`, a layer stacks every adapter's factors (as its kind
forms them: :meth:`lora_vit.lowrank.AdapterView.factors`), zero-padded to the largest rank, plus a
zero entry for the base model, gathers each sample's pair and applies them with two batched
matmuls, so the cost does not depend on the mix. Kinds that scale output rows (DoRA) add each
sample's row scale (1 for the others and the base).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import LoRAError
from .lowrank import LowRankAdapters

__all__ = ["BATCH_FIRST", "ROUTING_MISMATCH", "gather_per_sample", "route_index", "routed_factors", "routed_lora"]

ROUTING_MISMATCH = "adapter_per_sample was given"
BATCH_FIRST = "(dimension 0, batch first)"


def route_index(layer: LowRankAdapters, names: list[str | None]) -> Tensor:
    """The stacked-factor index of each sample's adapter (the base where ``layer`` lacks it)."""
    position = {name: i for i, name in enumerate(layer._lora_adapters)}
    base = len(position)
    return torch.tensor([position.get(n, base) if n is not None else base for n in names],
                        dtype=torch.long, device=layer.weight.device)


def routed_factors(layer: LowRankAdapters, dtype: torch.dtype, route: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Each sample's adapter factors, gathered by ``route`` (index ``n``: the base, all zero).

    Args:
        layer: The layer whose adapters are stacked.
        dtype: The compute dtype of the factors.
        route: ``(N,)`` adapter indices (see :func:`route_index`).

    Returns:
        ``A`` ``(N, R, in)``, scaled ``B`` ``(N, out, R)`` with ``R`` the largest rank (smaller
        ones zero-padded), and the row scales ``(N, out)`` (1 for adapters without one and the
        base), or None when no adapter's kind scales rows.
    """
    views = list(layer._lora_adapters.values())
    pairs = [view.factors() for view in views]
    rank = max(a.shape[0] for a, _ in pairs)
    scaled_rows = any(view.kind.scales_rows for view in views)
    a_list, b_list, scales = [], [], []
    for view, (a, b) in zip(views, pairs):
        if scaled_rows:
            scale = view.kind.row_scale(view, a, b) if view.kind.scales_rows else None
            ones = layer.weight.new_ones(layer.out_features, dtype=dtype)
            scales.append(scale.to(dtype) if scale is not None else ones)
        a, b = a.to(dtype), b.to(dtype)
        pad = rank - a.shape[0]
        a_list.append(F.pad(a, (0, 0, 0, pad)) if pad else a)
        b_list.append(F.pad(b, (0, pad)) if pad else b)
    return (gather_per_sample(a_list, route, 0.0), gather_per_sample(b_list, route, 0.0),
            gather_per_sample(scales, route, 1.0) if scaled_rows else None)


def _dropout_probabilities(layer: LowRankAdapters) -> Tensor:
    """Each adapter's LoRA dropout, the base (0) last: ``(n + 1,)``."""
    return torch.tensor([view.dropout for view in layer._lora_adapters.values()] + [0.0])


def gather_per_sample(entries: list[Tensor], route: Tensor, base_value: float) -> Tensor:
    """``entries[route[i]]`` for each sample ``i``, ``base_value`` everywhere where ``route[i]`` is ``len(entries)``.

    Eager, the entries are stacked and gathered with ``index_select`` (one kernel each). Under
    ``torch.compile`` a stack of many small tensors becomes one copy loop per entry (Inductor's
    pointwise ``cat`` takes at most 8 inputs), each a parallel region with its own thread
    barrier, which cost a 2-thread CPU training step 40 % under load; a chain of ``where``s is
    one fused loop forwards and one fused reduction backwards, however many adapters there are.

    Args:
        entries: ``n`` tensors of one shape ``S``.
        route: ``(N,)`` indices in ``[0, n]``.
        base_value: The value of the base entry ``n``.

    Returns:
        ``(N, *S)``.
    """
    if torch.compiler.is_compiling():
        index = route.view(-1, *([1] * entries[0].dim()))
        out = torch.where(index == 0, entries[0], base_value)
        for i, entry in enumerate(entries[1:], start=1):
            out = torch.where(index == i, entry, out)
        return out
    stacked = torch.stack([*entries, torch.full_like(entries[0], base_value)])
    # index_select, not stacked[route]: the same gather, tens of times faster on CPU (torch 2.13).
    return stacked.index_select(0, route)


def routed_lora(
    x: Tensor, weight: Tensor, bias: Tensor | None, layer: LowRankAdapters, route: Tensor, training: bool
) -> Tensor:
    """``base(x)`` plus, for each sample ``i`` (dim 0 of ``x``), adapter ``route[i]``'s update.

    Each sample's factors are gathered from the stacked adapters and applied with two batched
    matmuls, so the cost does not depend on the mix, and the gradient of an adapter's factors
    comes only from its own samples (the gather's backward adds into its own slot). Adapters
    whose kind scales rows (DoRA: ``m / ||W + dW||``) scale their samples' output rows; dropout
    uses each sample's own adapter's probability.

    Args:
        x: ``(N, *, in_features)``, batch first.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.
        layer: The layer whose adapters are stacked.
        route: ``(N,)`` adapter indices (:func:`route_index`; ``n``: the base).
        training: Whether dropout is active.

    Returns:
        ``(N, *, out_features)``.

    Raises:
        LoRAError: If ``x``'s first dimension is not the number of routed samples.
    """
    n = route.shape[0]
    if x.dim() < 2 or x.shape[0] != n:
        raise LoRAError(
            f"adapter_per_sample was given {n} adapter names, but this layer's input has shape"
            f" {tuple(x.shape)}: the names must be as many as the batch (dimension 0, batch first)"
        )
    # Without a row scale the bias goes into the base matmul and the update is added by baddbmm
    # in one pass over the output; a row scale (DoRA) applies to base + update before the bias.
    scaled_rows = any(view.kind.scales_rows for view in layer._lora_adapters.values())
    base = F.linear(x, weight, None if scaled_rows else bias)
    dtype = base.dtype  # the autocast dtype under autocast
    a_per_sample, b_per_sample, scales = routed_factors(layer, dtype, route)
    x3 = x.reshape(n, -1, x.shape[-1]).to(dtype)
    if training and any(view.dropout > 0 for view in layer._lora_adapters.values()):
        keep = (1.0 - _dropout_probabilities(layer).to(x.device, dtype)).index_select(0, route)[:, None, None]
        x3 = x3 * (torch.rand_like(x3) < keep) / keep
    hidden = torch.bmm(x3, a_per_sample.transpose(1, 2))  # (N, T, R)
    out = torch.baddbmm(base.reshape(n, -1, base.shape[-1]), hidden, b_per_sample.transpose(1, 2))
    if scales is not None:
        out = out * scales[:, None, :]
        if bias is not None:
            out = out + bias.to(dtype)
    return out.view(*x.shape[:-1], base.shape[-1])
