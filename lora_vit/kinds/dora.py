"""DoRA (Liu et al. 2024): LoRA's direction with a trainable magnitude per adapted output row.

Each adapted row ``i`` is ``m_i * (W_i + dW_i) / ||W_i + dW_i||``; the magnitude ``m`` (one
``lora_magnitude[_<slice>]`` ``(rows,)`` per slice, float32 or wider, so that ``m / ||W||`` is 1
exactly) starts at ``||W_i||``. The norm is a constant in backward and never forms ``W + dW`` in
the step (:func:`lora_vit.functional.dora_row_norms`); see ``docs/design.md`` (DoRA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..functional import dora_linear, dora_row_norms
from .base import AdapterKind, AdapterParameters

if TYPE_CHECKING:
    from ..spec import LoRASlice

__all__ = ["DORA", "PEFT_MAGNITUDE", "DoRAKind"]

PEFT_MAGNITUDE = "lora_magnitude_vector"
"""PEFT's name of the DoRA magnitude tensor (stored without an inner ``.weight``)."""


@dataclass(frozen=True)
class DoRAKind(AdapterKind):
    """DoRA; ``inject_lora(..., use_dora=True)``. Not on a packed MHA in-projection (its forward has no row scale)."""

    name: str = "dora"
    packed_in_projection: ClassVar[bool] = False
    scales_rows: ClassVar[bool] = True

    @property
    def option(self) -> str:
        return "use_dora"

    def record(self) -> dict[str, Any]:
        return {"use_dora": True}

    def peft_fields(self) -> dict[str, Any]:
        return {"use_dora": True}

    def peft_tensor_names(self) -> list[tuple[str, str]]:
        return [("lora_magnitude", PEFT_MAGNITUDE)]

    def extra_shapes(self, s: LoRASlice, in_features: int) -> list[tuple[str, tuple[int, ...]]]:
        return [(s.magnitude_name, (s.rows,))]

    def parameter_dtype(self, relative: str, base_dtype: torch.dtype) -> torch.dtype:
        # At least float32: a low-precision magnitude would not divide the norm to 1 exactly.
        return torch.promote_types(base_dtype, torch.float32) if relative.startswith("lora_magnitude") else base_dtype

    def initialise(self, view: AdapterParameters) -> None:
        super().initialise(view)
        with torch.no_grad():
            # With B = 0 these are the row norms the forward computes, so m / norm == 1 exactly.
            norms = dora_row_norms(view.weight, *self.factors(view))
            for s in view.spec.slices:
                view.param(s.magnitude_name).copy_(norms[s.start : s.stop])

    def row_scale(self, view: AdapterParameters, a: Tensor, scaled_b: Tensor, norms: Tensor | None = None) -> Tensor:
        """``m / ||W + dW||`` per row, 1 outside every slice, differentiable in ``m`` only: ``(out,)``."""
        if norms is None:
            norms = dora_row_norms(view.weight, a, scaled_b)
        pieces = []
        row = 0
        for s in view.spec.slices:
            if s.start > row:
                pieces.append(norms.new_ones(s.start - row))
            pieces.append(view.param(s.magnitude_name) / norms[s.start : s.stop])
            row = s.stop
        if row < view.out_features:
            pieces.append(norms.new_ones(view.out_features - row))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, scaled_b: Tensor,
        row_scale: Tensor | None, p: float, output_modified_in_place: bool,
    ) -> Tensor:
        assert row_scale is not None
        out = dora_linear(x, weight, bias, a, scaled_b, row_scale, p)
        # The node saves its output for backward: a parent that changes it in place gets a copy.
        return out.clone() if output_modified_in_place else out

    def merge_rows(self, view: AdapterParameters, merged: Tensor, a: Tensor, scaled_b: Tensor) -> Tensor:
        # Dense and exact here: merging may form the (out, in) matrix the step avoids.
        norms = torch.linalg.vector_norm(merged, dim=1).clamp_min(torch.finfo(merged.dtype).tiny)
        return merged * self.row_scale(view, a, scaled_b, norms).to(merged.dtype)[:, None]


DORA = DoRAKind()
