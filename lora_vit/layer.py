"""`LoRALinear`: a frozen `nn.Linear` plus a trainable low-rank update on some of its rows."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LoRAError
from .functional import as_base_weight, dora_linear, dora_row_norms, keep_probability, lora_linear

__all__ = ["INITS", "LoRALinear", "LoRASlice"]

INITS = ("normal", "kaiming")
"""Valid values of ``init``: A ~ N(0, 0.02^2), or Kaiming-uniform as in the LoRA paper's code."""

_NORMAL_INIT_STD = 0.02
_SLICE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class LoRASlice:
    """One block of output rows ``[start, stop)`` of a Linear with its own adapter.

    Attributes:
        name: Identifier used in parameter names (``lora_A_<name>``); ``""`` for the
            single adapter of an unsliced layer (parameters ``lora_A`` / ``lora_B``).
        start: First adapted output row.
        stop: One past the last adapted output row.
        r: Rank of this slice's adapter.
        alpha: Scaling numerator of this slice's adapter.
    """

    name: str
    start: int
    stop: int
    r: int
    alpha: float

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def a_name(self) -> str:
        return f"lora_A_{self.name}" if self.name else "lora_A"

    @property
    def b_name(self) -> str:
        return f"lora_B_{self.name}" if self.name else "lora_B"

    @property
    def magnitude_name(self) -> str:
        """Name of this slice's DoRA magnitude ``(rows,)`` (only on ``use_dora`` layers)."""
        return f"lora_magnitude_{self.name}" if self.name else "lora_magnitude"

    def scaling(self, use_rslora: bool) -> float:
        return self.alpha / (math.sqrt(self.r) if use_rslora else self.r)

    def config(self) -> dict[str, Any]:
        """The JSON-ready entry a layer's ``config()`` records for this slice."""
        return {"name": self.name, "start": self.start, "stop": self.stop, "r": self.r, "alpha": self.alpha}


def check_rank(r: object, limit: int, where: str) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoRAError(f"r must be a positive integer, got {r!r} for {where}")
    if r > limit:
        raise LoRAError(
            f"r={r} is larger than {where} allows: a rank above min(in_features, adapted rows)"
            f" = {limit} adds parameters without adding expressiveness"
        )
    return r


def check_alpha(alpha: object, where: str) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise LoRAError(f"alpha must be a positive number, got {alpha!r} for {where}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise LoRAError(f"alpha must be a positive finite number, got {alpha!r} for {where}")
    return float(alpha)


def check_dropout(dropout: object) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise LoRAError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise LoRAError(f"dropout must be in [0, 1), got {dropout!r}")
    if keep_probability(dropout) == 0.0:
        raise LoRAError(f"dropout={dropout!r} would drop every element (resolution 2**-16); use at most 0.9999")
    return float(dropout)


def check_init(init: object) -> str:
    if init not in INITS:
        raise LoRAError(f"init must be one of {INITS}, got {init!r}")
    return str(init)


def value_for(value: Any, key: str, what: str, kind: str) -> Any:
    """``value[key]`` when ``value`` is a per-slice or per-target mapping, else ``value`` itself."""
    if isinstance(value, Mapping):
        if key not in value:
            raise LoRAError(f"{what} is a mapping without an entry for {kind} {key!r}: {dict(value)}")
        return value[key]
    return value


def _build_slices(
    out_features: int,
    in_features: int,
    slices: Mapping[str, tuple[int, int]] | None,
    r: int | Mapping[str, int],
    alpha: float | Mapping[str, float],
) -> tuple[LoRASlice, ...]:
    if slices is None:
        if isinstance(r, Mapping) or isinstance(alpha, Mapping):
            raise LoRAError("per-slice r or alpha mappings need `slices`; pass plain numbers")
        where = f"a Linear({in_features}, {out_features})"
        rank = check_rank(r, min(in_features, out_features), where)
        return (LoRASlice("", 0, out_features, rank, check_alpha(alpha, where)),)
    if not isinstance(slices, Mapping) or not slices:
        raise LoRAError(f"slices must be a non-empty mapping name -> (start, stop), got {slices!r}")
    built = []
    for name, bounds in slices.items():
        if not isinstance(name, str) or not _SLICE_NAME.match(name):
            raise LoRAError(f"slice names must be Python identifiers, got {name!r}")
        try:
            start, stop = (int(b) for b in bounds)
        except (TypeError, ValueError):
            raise LoRAError(f"slice {name!r} must be (start, stop), got {bounds!r}") from None
        if not 0 <= start < stop <= out_features:
            raise LoRAError(
                f"slice {name!r} = ({start}, {stop}) is not a non-empty row range"
                f" inside [0, {out_features})"
            )
        where = f"slice {name!r} ({stop - start} rows, in_features={in_features})"
        rank = check_rank(value_for(r, name, "r", "slice"), min(in_features, stop - start), where)
        built.append(LoRASlice(name, start, stop, rank, check_alpha(value_for(alpha, name, "alpha", "slice"), where)))
    built.sort(key=lambda s: s.start)
    for left, right in zip(built, built[1:]):
        if right.start < left.stop:
            raise LoRAError(
                f"slices {left.name!r} [{left.start}, {left.stop}) and {right.name!r}"
                f" [{right.start}, {right.stop}) overlap"
            )
    return tuple(built)


class LoRALinear(nn.Module):
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
        use_dora: Add DoRA's per-row magnitude (see above).

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
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise LoRAError(f"LoRALinear adapts nn.Linear layers, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.slices = _build_slices(base.out_features, base.in_features, slices, r, alpha)
        self.dropout = check_dropout(dropout)
        self.init = check_init(init)
        self.use_rslora = bool(use_rslora)
        if not isinstance(use_dora, bool):
            raise LoRAError(f"use_dora must be True or False, got {use_dora!r}")
        self.use_dora = use_dora
        self.scalings = tuple(s.scaling(self.use_rslora) for s in self.slices)
        self.covers_all_rows = len(self.slices) == 1 and self.slices[0].rows == self.out_features

        self.weight = base.weight
        self.bias = base.bias
        self.base_requires_grad = base.weight.requires_grad  # before inject_lora freezes it: see disable_lora
        device, dtype = base.weight.device, base.weight.dtype
        for s in self.slices:
            a = torch.empty(s.r, self.in_features, device=device, dtype=dtype)
            self.register_parameter(s.a_name, nn.Parameter(a))
            self.register_parameter(s.b_name, nn.Parameter(torch.empty(s.rows, s.r, device=device, dtype=dtype)))
            if self.use_dora:
                # At least float32: a low-precision magnitude would not divide the norm to exactly 1.
                wide = torch.promote_types(dtype, torch.float32)
                self.register_parameter(s.magnitude_name, nn.Parameter(torch.empty(s.rows, device=device, dtype=wide)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise the adapters (A random, B zero, DoRA magnitudes the base row norms).

        The base weights are not touched.
        """
        with torch.no_grad():
            for s in self.slices:
                a = getattr(self, s.a_name)
                if self.init == "normal":
                    nn.init.normal_(a, mean=0.0, std=_NORMAL_INIT_STD)
                else:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(getattr(self, s.b_name))
            if self.use_dora:
                # With B = 0 these are the row norms the forward computes, so m / norm == 1 exactly.
                norms = self.row_norms()
                for s in self.slices:
                    getattr(self, s.magnitude_name).copy_(norms[s.start : s.stop])

    def adapter_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(attribute name, shape)`` of every adapter Parameter, in slice order (A, B, magnitude)."""
        shapes: list[tuple[str, tuple[int, ...]]] = []
        for s in self.slices:
            shapes += [(s.a_name, (s.r, self.in_features)), (s.b_name, (s.rows, s.r))]
            if self.use_dora:
                shapes.append((s.magnitude_name, (s.rows,)))
        return shapes

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter Parameters ``[A, B, (magnitude,) ...]`` in slice order."""
        return [getattr(self, name) for name, _ in self.adapter_shapes()]

    def stacked_a(self) -> Tensor:
        """All slices' ``A`` stacked: ``(sum of ranks, in_features)``."""
        if len(self.slices) == 1:
            return getattr(self, self.slices[0].a_name)
        return torch.cat([getattr(self, s.a_name) for s in self.slices])

    def scaled_b(self, dtype: torch.dtype | None = None) -> Tensor:
        """Every slice's ``scaling * B`` placed at its rows: ``(out_features, sum of ranks)``.

        Rows outside every slice are zero, so ``scaled_b() @ stacked_a()`` is the full update.
        """
        blocks = [getattr(self, s.b_name) for s in self.slices]
        if dtype is not None:
            blocks = [block.to(dtype) for block in blocks]
        blocks = [block * c for block, c in zip(blocks, self.scalings)]
        if self.covers_all_rows:
            return blocks[0]
        total_rank = sum(s.r for s in self.slices)
        out = blocks[0].new_zeros(self.out_features, total_rank)
        col = 0
        for s, block in zip(self.slices, blocks):
            out[s.start : s.stop, col : col + s.r] = block
            col += s.r
        return out

    def merge_dtype(self) -> torch.dtype:
        """Float32, or the base dtype where it is wider (a float64 base merges in float64)."""
        return torch.promote_types(self.weight.dtype, torch.float32)

    def delta_weight(self) -> Tensor:
        """The update ``scaling * B @ A`` in :meth:`merge_dtype`: ``(out_features, in_features)``."""
        wide = self.merge_dtype()
        return self.scaled_b(wide) @ self.stacked_a().to(wide)

    def row_norms(self) -> Tensor:
        """``||W + scaling * B @ A||`` per output row, without forming that matrix: ``(out_features,)``.

        Float32 (float64 for a float64 base), no gradient; see :func:`lora_vit.functional.dora_row_norms`.
        """
        return dora_row_norms(self.weight, self.stacked_a(), self.scaled_b())

    def row_scale(self, norms: Tensor | None = None) -> Tensor:
        """DoRA's per-row factor ``m / ||W + dW||``, 1 on rows outside every slice: ``(out_features,)``.

        Differentiable in the magnitudes only (the norm is a constant in backward).
        """
        if norms is None:
            norms = self.row_norms()
        pieces = []
        row = 0
        for s in self.slices:
            if s.start > row:
                pieces.append(norms.new_ones(s.start - row))
            pieces.append(getattr(self, s.magnitude_name) / norms[s.start : s.stop])
            row = s.stop
        if row < self.out_features:
            pieces.append(norms.new_ones(self.out_features - row))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    # Set only by lora_vit.disable_lora: the base layer's function, adapters kept in place.
    _lora_disabled = False

    def forward(self, x: Tensor) -> Tensor:
        if self._lora_disabled:
            # Only a non-contiguous batched input lets ATen's kernel depend on requires_grad.
            folded = x.dim() > 2 and not x.is_contiguous()
            return F.linear(x, as_base_weight(self.weight, folded and self.base_requires_grad), self.bias)
        # One autograd node (see functional.py): no dropped copy of x is kept for backward.
        p = self.dropout if self.training else 0.0
        a, scaled_b = self.stacked_a(), self.scaled_b()
        if self.use_dora:
            row_scale = self.row_scale(dora_row_norms(self.weight, a, scaled_b))
            out = dora_linear(x, self.weight, self.bias, a, scaled_b, row_scale, p)
            return out.clone() if self.output_modified_in_place else out
        return lora_linear(x, self.weight, self.bias, a, scaled_b, p)

    def merged_weight(self) -> Tensor:
        """``W + scaling * B @ A`` (DoRA: each row rescaled to ``m_i / ||row||``), in float32, rounded once.

        A float64 base is merged in float64 (see :meth:`merge_dtype`).
        """
        with torch.no_grad():
            wide = self.merge_dtype()
            merged = self.weight.to(wide) + self.delta_weight()
            if self.use_dora:
                # Dense and exact here: merging may form the (out, in) matrix the step avoids.
                norms = torch.linalg.vector_norm(merged, dim=1).clamp_min(torch.finfo(wide).tiny)
                merged = merged * self.row_scale(norms).to(wide)[:, None]
            return merged.to(self.weight.dtype)

    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding :meth:`merged_weight`.

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
        return linear

    def config(self) -> dict[str, Any]:
        """A JSON-ready description from which :meth:`from_config` rebuilds this layer's shape."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "dropout": self.dropout,
            "use_rslora": self.use_rslora,
            # Only when set, so that configs (and files) of plain LoRA layers stay as before.
            **({"use_dora": True} if self.use_dora else {}),
            "slices": [s.config() for s in self.slices],
        }

    @classmethod
    def from_config(cls, base: nn.Linear, config: Mapping[str, Any]) -> LoRALinear:
        """Adapt ``base`` as described by :meth:`config` (adapters freshly initialised).

        Raises:
            LoRAError: If ``base`` does not have the recorded shape or the config is invalid.
        """
        expected = (config["in_features"], config["out_features"])
        found = (getattr(base, "in_features", None), getattr(base, "out_features", None))
        if found != expected:
            raise LoRAError(f"expected a Linear{expected} (in, out), found {type(base).__name__}{found}")
        entries = config["slices"]
        use_dora = config.get("use_dora", False)
        if len(entries) == 1 and entries[0]["name"] == "":
            only = entries[0]
            if (only["start"], only["stop"]) != (0, base.out_features):
                raise LoRAError(f"an unnamed slice must cover all rows, got {only}")
            return cls(
                base, only["r"], only["alpha"], config["dropout"], use_rslora=config["use_rslora"], use_dora=use_dora
            )
        return cls(
            base,
            {e["name"]: e["r"] for e in entries},
            {e["name"]: e["alpha"] for e in entries},
            config["dropout"],
            slices={e["name"]: (e["start"], e["stop"]) for e in entries},
            use_rslora=config["use_rslora"],
            use_dora=use_dora,
        )

    def extra_repr(self) -> str:
        head = (
            f"in_features={self.in_features}, out_features={self.out_features},"
            f" bias={self.bias is not None}, dropout={self.dropout}"
        )
        if self.use_dora:
            head += ", dora=True"
        if self.covers_all_rows:
            s = self.slices[0]
            return f"{head}, r={s.r}, alpha={s.alpha:g}, scaling={self.scalings[0]:g}"
        parts = ", ".join(f"{s.name}[{s.start}:{s.stop}] r={s.r} alpha={s.alpha:g}" for s in self.slices)
        return f"{head}, slices=({parts})"
