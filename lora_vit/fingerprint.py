"""A cheap fingerprint of the base weights under each adapter, to catch loading onto the wrong base.

An adapter is a small correction to one particular set of base weights; on other weights it
computes something meaningless without any error. :func:`save_lora` therefore records, for
every adapted layer, the values of its base weight at :data:`SAMPLES` fixed positions, and
:func:`load_lora` compares them with the model it loads into.

Why sampled values rather than a hash: a hash changes with the last bit, so the same
checkpoint in bfloat16, float16 or on another device (other matmul kernels never touch the
stored weights, but a cast does) would look like another base. Values compared with a
tolerance of one bfloat16 rounding do not: :func:`mismatch` accepts a relative difference of
up to ``2**-7`` plus an absolute ``2**-14`` (float16's smallest normal number), and any
other checkpoint differs by far more than that at almost every position.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["METHOD", "SAMPLES", "base_fingerprint", "mismatch"]

METHOD = "strided-samples-v1"
"""Name of the sampling scheme, stored beside the values so it can change without confusion."""

SAMPLES = 8
_RTOL = 2.0**-7
_ATOL = 2.0**-14
# Knuth's multiplicative-hash constant: i * K mod numel spreads the positions over the whole
# matrix (many rows, many columns) for any size, deterministically.
_STRIDE = 2654435761


def sample_positions(numel: int) -> list[int]:
    """The flat positions sampled from a weight with ``numel`` entries."""
    return [(i * _STRIDE) % numel for i in range(SAMPLES)]


def base_fingerprint(weight: torch.Tensor, shape: tuple[int, int]) -> list[float] | None:
    """The float32 values of ``weight`` at :func:`sample_positions`, or None if it cannot be read.

    ``None`` is returned for a weight without data (meta), of a non-float dtype (quantised),
    or not of its logical ``shape`` (an FSDP shard outside ``summon_full_params``).
    """
    numel = shape[0] * shape[1]
    if weight.is_meta or not weight.is_floating_point() or tuple(weight.shape) != shape or numel == 0:
        return None
    with torch.no_grad():
        index = torch.tensor(sample_positions(numel), device=weight.device)
        values = weight.detach().reshape(-1)[index].to(torch.float32).cpu()
    return [float(v) for v in values]


def layer_fingerprints(layers: Mapping[str, nn.Module]) -> dict[str, list[float]]:
    """:func:`base_fingerprint` of every adapted layer's base weight that can be read."""
    found: dict[str, list[float]] = {}
    for name, layer in layers.items():
        shape = (int(layer.out_features), int(layer.in_features))  # type: ignore[arg-type]
        values = base_fingerprint(layer.weight, shape)  # type: ignore[arg-type]
        if values is not None:
            found[name] = values
    return found


def mismatch(recorded: list[float], current: list[float]) -> float | None:
    """The largest relative difference if the two fingerprints differ beyond rounding, else None."""
    worst = 0.0
    differs = False
    for a, b in zip(recorded, current):
        gap = abs(a - b)
        if not gap <= _RTOL * max(abs(a), abs(b)) + _ATOL:  # also true for NaN
            differs = True
        worst = max(worst, gap / max(abs(a), abs(b), _ATOL)) if gap == gap else float("inf")
    return worst if differs else None
