"""`LoRALinear`: a frozen `nn.Linear` plus trainable low-rank updates (named adapters) on some of its rows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LoRAError
from .functional import as_base_weight
from .lowrank import LowRankAdapters
from .mixed_batch import routed_lora
from .routing import current_route
from .spec import (
    DEFAULT_ADAPTER,
    INITS,
    AdapterSpec,
    LoRASlice,
    _build_slices,
    check_adapter_name,
    check_dropout,
    check_init,
    value_for,
)

__all__ = ["INITS", "LoRALinear", "LoRASlice", "_build_slices", "check_dropout", "check_init", "value_for"]


class LoRALinear(LowRankAdapters, nn.Module):
    """A frozen linear layer with a low-rank trainable update.

    ``y = x @ W.T + b + dropout(x) @ A.T @ B.T * scaling`` with ``A: (r, in_features)``,
    ``B: (rows, r)`` and ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
    The base layer's ``weight`` and ``bias`` Parameters are taken over under the same names,
    so a base checkpoint's keys still match. ``B`` starts at zero, so a new layer computes
    exactly what ``base`` computed.

    With ``slices``, only the named blocks of output rows are adapted, each by its own
    ``lora_A_<name>`` / ``lora_B_<name>`` pair with its own rank and alpha; rows outside
    every slice are untouched. This is how q and v of a fused ``qkv`` projection are adapted
    while k is not.

    With ``use_dora`` the layer is DoRA (weight-decomposed LoRA, Liu et al. 2024): each adapted
    row ``i`` is ``m_i * (W_i + dW_i) / ||W_i + dW_i||`` with a trainable magnitude
    ``lora_magnitude`` (``lora_magnitude_<name>`` per slice, shape ``(rows,)``, float32 or
    wider) that starts at ``||W_i||``, so a new layer still computes exactly what ``base``
    computed. The norm is a constant in backward (the paper's section 4.3, as PEFT does).
    Dropout acts on the LoRA branch's input only:
    ``y = b + m / ||W + dW|| * (x @ W.T + dropout(x) @ A.T @ B.T * scaling)``.

    Args:
        base: The ``nn.Linear`` to adapt. Its parameters are reused, not copied.
        r: Rank, or a mapping slice name -> rank.
        alpha: Scaling numerator, or a mapping slice name -> alpha.
        dropout: Probability of zeroing an input element of the LoRA branch while training
            (an independent mask per call, regenerated in backward rather than stored; see
            :mod:`lora_vit.functional` for the exact semantics).
        slices: Optional mapping name -> ``(start, stop)`` output rows to adapt.
        init: How ``A`` starts: ``"normal"`` (std 0.02) or ``"kaiming"`` (uniform).
        use_rslora: Scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        use_dora: Add DoRA's per-row magnitude (see above); the same as ``kind="dora"``.
        kind: The adapter kind by name (:mod:`lora_vit.kinds`; default LoRA, or DoRA with ``use_dora``).
        spec: A prebuilt :class:`~lora_vit.spec.AdapterSpec`, used instead of ``r`` ... ``kind``.
        adapter: Name of this first adapter (more are added by ``inject_lora(..., adapter=...)``).

    Shape:
        - Input: ``(*, in_features)``.
        - Output: ``(*, out_features)``.

    Raises:
        LoRAError: If ``base`` is not an ``nn.Linear``, ``r`` is not in
            ``[1, min(in_features, rows)]``, ``alpha <= 0``, ``dropout`` is outside
            ``[0, 1)``, ``init`` is unknown, or the slices are empty, out of range or overlap.

    Example:
        >>> layer = LoRALinear(nn.Linear(16, 8), r=2, alpha=4, dropout=0.0)
        >>> layer(torch.randn(3, 5, 16)).shape
        torch.Size([3, 5, 8])
    """

    output_modified_in_place: bool = False
    """Set (by :func:`lora_vit.inject_lora`) when the parent modifies this layer's output in
    place, as timm's EVA/BEiT ``qkv += bias`` does; DoRA, which saves its output for backward,
    then returns a copy (one more ``(N, out)`` activation for such layers only)."""

    def __init__(
        self,
        base: nn.Linear,
        r: int | Mapping[str, int] = 4,
        alpha: float | Mapping[str, float] = 32,
        dropout: float = 0.1,
        *,
        slices: Mapping[str, tuple[int, int]] | None = None,
        init: str = "normal",
        use_rslora: bool = False,
        use_dora: bool = False,
        kind: str | None = None,
        adapter: str = DEFAULT_ADAPTER,
        spec: AdapterSpec | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise LoRAError(f"LoRALinear adapts nn.Linear layers, got {type(base).__name__}")
        # The mode of the layer it replaces: adapting a model in eval() must not switch on dropout.
        self.training = base.training
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.base_requires_grad = base.weight.requires_grad  # before inject_lora freezes it: see disable_lora
        self._init_adapters()
        if spec is None:
            spec = AdapterSpec.build(
                self.out_features, self.in_features, r, alpha, dropout,
                slices=slices, init=init, use_rslora=use_rslora, use_dora=use_dora, kind=kind,
            )
        self.add_adapter(check_adapter_name(adapter), spec)

    @property
    def dropout(self) -> float:
        """The LoRA dropout of the primary adapter (the active one, else the first)."""
        primary = self._primary()
        return primary.dropout if primary is not None else 0.0

    def forward(self, x: Tensor) -> Tensor:
        running = self._lora_running
        route = current_route(self)
        if self._lora_disabled or (running is None and route is None):
            # The base function (disabled, or the running adapter is not on this layer). Only a
            # non-contiguous batched input lets ATen's kernel depend on requires_grad.
            folded = x.dim() > 2 and not x.is_contiguous()
            return F.linear(x, as_base_weight(self.weight, folded and self.base_requires_grad), self.bias)
        if route is not None:  # lora_vit.adapter_per_sample
            return routed_lora(x, self.weight, self.bias, self, route, self.training)
        assert running is not None
        # One autograd node (see functional.py): no dropped copy of x is kept for backward.
        return running.forward(x, self.training, self.output_modified_in_place)

    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding :meth:`merged_weight` (the primary adapter folded in).

        The bias Parameter is shared with this layer, and the weight keeps the base
        weight's ``requires_grad``.

        Raises:
            LoRAError: If the merged weight has a NaN or Inf entry (including an overflow
                when rounding to a low-precision base dtype).
        """
        merged = self.merged_weight()
        if not bool(torch.isfinite(merged).all()):
            raise LoRAError("merging would put NaN or Inf into the weight")
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(merged, requires_grad=self.weight.requires_grad)
        linear.bias = self.bias
        linear.train(self.training)
        return linear

    def plain_linear(self) -> nn.Linear:
        """The base ``nn.Linear`` again (its own Parameters), every adapter dropped."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        linear.train(self.training)
        return linear

    @classmethod
    def from_config(cls, base: nn.Linear, config: Mapping[str, Any], adapter: str = DEFAULT_ADAPTER) -> LoRALinear:
        """Adapt ``base`` as described by a ``config()`` record (adapters freshly initialised).

        Raises:
            LoRAError: If ``base`` does not have the recorded shape or the config is invalid.
        """
        expected = (config["in_features"], config["out_features"])
        found = (getattr(base, "in_features", None), getattr(base, "out_features", None))
        if found != expected:
            raise LoRAError(f"expected a Linear{expected} (in, out), found {type(base).__name__}{found}")
        return cls(base, adapter=adapter, spec=AdapterSpec.from_config(config))

    def extra_repr(self) -> str:
        head = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        parts = []
        for name in self.adapter_names:
            view = self.adapter(name)
            kind = f", {view.kind.label()}=True" if view.kind.label() else ""
            if view.covers_all_rows:
                s = view.slices[0]
                what = f"r={s.r}, alpha={s.alpha:g}, scaling={view.scalings[0]:g}"
            else:
                what = "slices=(" + ", ".join(
                    f"{s.name}[{s.start}:{s.stop}] r={s.r} alpha={s.alpha:g}" for s in view.slices
                ) + ")"
            label = "" if self.adapter_names == (DEFAULT_ADAPTER,) else f"{name}: "
            parts.append(f"{label}dropout={view.dropout}{kind}, {what}")
        return "; ".join([head, *parts])
