"""`AdapterKind`: what one kind of low-rank adapter (LoRA, DoRA, ...) adds to LoRA's factor pair.

Every kind is built on LoRA's per-slice pair ``A`` ``(r, in)``, ``B`` ``(rows, r)`` with its
scaling (:class:`~lora_vit.spec.LoRASlice`); a kind may add parameters per slice, initialises
them, turns them into what the forward applies (low-rank factors and, optionally, a per-row output
scale), merges, and says how files and PEFT name it. Layers, files, merging and routing ask the
kind; none of them tests for a particular one. The defaults here are plain LoRA's math, so a kind
overrides only where it differs. A new kind is one module (a frozen dataclass subclassing
:class:`AdapterKind`) and one entry in :data:`lora_vit.kinds.KINDS` (or
:func:`lora_vit.kinds.register_kind`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from ..functional import lora_linear

if TYPE_CHECKING:
    from ..spec import AdapterSpec, LoRASlice

__all__ = ["AdapterKind", "AdapterParameters"]

_NORMAL_INIT_STD = 0.02


class AdapterParameters(Protocol):
    """What a kind sees of one adapter on one layer (a :class:`lora_vit.lowrank.AdapterView`).

    ``view.param("lora_A_q")`` is that adapter's parameter under its relative name (the name a
    file uses), whatever its attribute name in the model.
    """

    spec: AdapterSpec
    in_features: int
    out_features: int

    @property
    def weight(self) -> Tensor: ...

    def param(self, relative: str) -> Tensor: ...

    def stacked_a(self) -> Tensor: ...

    def scaled_b(self, dtype: torch.dtype | None = None) -> Tensor: ...


@dataclass(frozen=True)
class AdapterKind:
    """One kind of adapter; the methods are plain LoRA's behaviour, overridden where a kind differs.

    Attributes:
        name: The kind's name (``kind=`` of :func:`lora_vit.inject_lora`, file records).
        packed_in_projection: Whether it works on ``nn.MultiheadAttention``'s packed
            in-projection (whose forward applies only low-rank factors, no row scale).
        scales_rows: Whether :meth:`row_scale` returns a scale (known before computing one).
    """

    name: str
    packed_in_projection: ClassVar[bool] = True
    scales_rows: ClassVar[bool] = False

    # Immutable constants: a copied model shares them (its specs then name the table's own kinds).
    def __copy__(self) -> AdapterKind:
        return self

    def __deepcopy__(self, memo: dict) -> AdapterKind:
        return self

    # ------------------------------------------------------------------ identity

    @property
    def option(self) -> str:
        """How a user asks for this kind, for messages."""
        return f"kind={self.name!r}"

    def record(self) -> dict[str, Any]:
        """The fields a file's layer record carries to name this kind."""
        return {"adapter_kind": self.name}

    def peft_fields(self) -> dict[str, Any] | None:
        """This kind's fields of PEFT's ``LoraConfig``; ``None``: PEFT has no form for it."""
        return None

    def peft_tensor_names(self) -> list[tuple[str, str]]:
        """``(lora-vit, PEFT)`` names of this kind's parameters beyond ``lora_A``/``lora_B`` (unsliced)."""
        return []

    def label(self) -> str:
        """What a one-line description adds (``""`` for plain LoRA)."""
        return self.name

    # ------------------------------------------------------------------ parameters

    def extra_shapes(self, s: LoRASlice, in_features: int) -> list[tuple[str, tuple[int, ...]]]:
        """``(relative name, shape)`` of the parameters this kind adds to slice ``s``'s ``A``, ``B``."""
        return []

    def parameter_dtype(self, relative: str, base_dtype: torch.dtype) -> torch.dtype:
        """The dtype of parameter ``relative`` over a base weight of ``base_dtype``."""
        return base_dtype

    def initialise(self, view: AdapterParameters) -> None:
        """A fresh adapter: ``A`` random (``spec.init``), ``B`` zero, so it computes the base function."""
        with torch.no_grad():
            for s in view.spec.slices:
                a = view.param(s.a_name)
                if view.spec.init == "normal":
                    nn.init.normal_(a, mean=0.0, std=_NORMAL_INIT_STD)
                else:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(view.param(s.b_name))

    # ------------------------------------------------------------------ forward and merge

    def factors(self, view: AdapterParameters, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """The update as ``A`` ``(R, in)`` and scaled ``B`` ``(out, R)``: ``dW = Bs @ A`` (``dtype``: scale in it)."""
        a = view.stacked_a()
        return (a if dtype is None else a.to(dtype)), view.scaled_b(dtype)

    def row_scale(
        self, view: AdapterParameters, a: Tensor, scaled_b: Tensor, norms: Tensor | None = None
    ) -> Tensor | None:
        """A per-row factor ``(out,)`` on the adapted output, given :meth:`factors` (and, if known,
        the row norms of ``W + scaled_b @ a``), or ``None`` (no scale: only kinds with :attr:`scales_rows`)."""
        return None

    def forward(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, scaled_b: Tensor,
        row_scale: Tensor | None, p: float, output_modified_in_place: bool,
    ) -> Tensor:
        """The adapted layer's output: ``x W^T + b + dropout_p(x) A^T Bs^T`` as one autograd node."""
        return lora_linear(x, weight, bias, a, scaled_b, p)

    def merge_rows(self, view: AdapterParameters, merged: Tensor, a: Tensor, scaled_b: Tensor) -> Tensor:
        """The merged weight from the dense ``merged = W + scaled_b @ a`` (formed wide); LoRA: itself."""
        return merged
