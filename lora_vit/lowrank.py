"""`LowRankAdapters`: the named adapters over one base weight, shared by both layer kinds.

A layer (:class:`~lora_vit.LoRALinear` over an ``nn.Linear``, or
:class:`~lora_vit.LoRAMultiheadAttention` over its packed ``in_proj_weight``) holds any number
of named adapters, each an :class:`~lora_vit.spec.AdapterSpec` (whose kind, LoRA, DoRA or a
registered one, says what the factors mean: :mod:`lora_vit.kinds`) plus its parameters registered
on the layer. The adapter named ``"default"`` keeps the historical parameter names (``lora_A``,
``lora_B_q``, ...); another adapter ``x`` uses ``lora_A__x``, ``lora_B_q__x``, so a model's
``state_dict`` holds every adapter while files (one adapter each) always use the plain names.

Each adapter is seen through its :class:`AdapterView` (made once, when it is added): the one
object that reads its parameters under their relative names and asks its kind for the factors,
the forward and the merge. The layer runs one adapter (its *active* one, see
:func:`lora_vit.set_adapter`) or, inside :func:`lora_vit.adapter_per_sample`, every sample through
its own (:mod:`lora_vit.mixed_batch`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .errors import LoRAError
from .functional import dora_row_norms
from .spec import DEFAULT_ADAPTER, AdapterSpec

__all__ = ["AdapterView", "LowRankAdapters", "parameter_name"]


def parameter_name(adapter: str, relative: str) -> str:
    """The layer attribute holding parameter ``relative`` (``lora_A_q``) of ``adapter``."""
    return relative if adapter == DEFAULT_ADAPTER else f"{relative}__{adapter}"


class AdapterView:
    """One named adapter of a layer, seen as if it were the layer's only adapter.

    State I/O, files, fingerprints, merging, verification and the forward work on views:
    ``view.param("lora_A_q")`` (or ``getattr(view, "lora_A_q")``) is that adapter's factor
    whatever its name in the model.
    """

    def __init__(self, layer: LowRankAdapters, name: str, spec: AdapterSpec) -> None:
        self.layer = layer
        self.name = name
        self.spec = spec
        self.kind = spec.kind
        self.slices = spec.slices
        self.scalings = spec.scalings
        self.use_dora = spec.use_dora
        self.use_rslora = spec.use_rslora
        self.dropout = spec.dropout
        self.init = spec.init
        self.in_features: int = layer.in_features
        self.out_features: int = layer.out_features
        self.covers_all_rows = spec.covers_all_rows(layer.out_features)
        self.a_names = tuple(parameter_name(name, s.a_name) for s in spec.slices)
        self.b_names = tuple(parameter_name(name, s.b_name) for s in spec.slices)
        # In AdapterSpec.shapes order: A, B, then the kind's own parameters, per slice.
        self.parameter_names = tuple(parameter_name(name, n) for n, _ in spec.shapes(layer.in_features))

    def param(self, relative: str) -> Tensor:
        """This adapter's parameter ``relative`` (``lora_A_q``, ``lora_magnitude``, ...)."""
        return getattr(self.layer, parameter_name(self.name, relative))  # type: ignore[no-any-return]

    def __getattr__(self, relative: str) -> Tensor:
        if relative.startswith("lora_"):
            return self.param(relative)
        raise AttributeError(relative)

    @property
    def weight(self) -> Tensor:
        return self.layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.layer.bias  # type: ignore[attr-defined,no-any-return]

    def adapter_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(relative name, shape)`` of every parameter, in slice order (A, B, the kind's own)."""
        return self.spec.shapes(self.in_features)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [getattr(self.layer, n) for n in self.parameter_names]

    def stacked_a(self) -> Tensor:
        """All slices' ``A`` stacked: ``(sum of ranks, in_features)``."""
        if len(self.a_names) == 1:
            return getattr(self.layer, self.a_names[0])  # type: ignore[no-any-return]
        return torch.cat([getattr(self.layer, n) for n in self.a_names])

    def scaled_b(self, dtype: torch.dtype | None = None) -> Tensor:
        """Every slice's ``scaling * B`` placed at its rows: ``(out_features, sum of ranks)``; zero elsewhere."""
        blocks = [getattr(self.layer, n) for n in self.b_names]
        if dtype is not None:
            blocks = [block.to(dtype) for block in blocks]
        blocks = [block * c for block, c in zip(blocks, self.scalings)]
        if self.covers_all_rows:
            return blocks[0]
        out = blocks[0].new_zeros(self.out_features, self.spec.total_rank)
        col = 0
        for s, block in zip(self.slices, blocks):
            out[s.start : s.stop, col : col + s.r] = block
            col += s.r
        return out

    def factors(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """The update as ``A`` ``(R, in)`` and scaled ``B`` ``(out, R)``, as the kind forms them."""
        return self.kind.factors(self, dtype)

    def merge_dtype(self) -> torch.dtype:
        """Float32, or the base dtype where it is wider (a float64 base merges in float64)."""
        return torch.promote_types(self.weight.dtype, torch.float32)

    def delta_weight(self) -> Tensor:
        """The update ``scaled B @ A`` in :meth:`merge_dtype`: ``(out_features, in_features)``."""
        b_times_a = self.factors(self.merge_dtype())
        return b_times_a[1] @ b_times_a[0]

    def row_norms(self) -> Tensor:
        """``||W + scaled B @ A||`` per output row, float32 or wider, no gradient."""
        return dora_row_norms(self.weight, *self.factors())

    def row_scale(self, norms: Tensor | None = None) -> Tensor:
        """The kind's per-row output scale (DoRA's ``m / ||W + dW||``), 1 where it has none."""
        scale = self.kind.row_scale(self, *self.factors(), norms)
        return scale if scale is not None else self.weight.new_ones(self.out_features, dtype=self.merge_dtype())

    def merged_weight(self) -> Tensor:
        """The weight that computes what this adapter computes, formed wide and rounded once."""
        with torch.no_grad():
            a, b = self.factors(self.merge_dtype())
            merged = self.weight.to(self.merge_dtype()) + b @ a
            return self.kind.merge_rows(self, merged, a, b).to(self.weight.dtype)

    def forward(self, x: Tensor, training: bool, output_modified_in_place: bool = False) -> Tensor:
        """``base(x)`` plus this adapter's update: one autograd node (see :mod:`lora_vit.functional`)."""
        a, b = self.factors()
        scale = self.kind.row_scale(self, a, b) if self.kind.scales_rows else None
        p = self.dropout if training else 0.0
        return self.kind.forward(x, self.weight, self.bias, a, b, scale, p, output_modified_in_place)

    def config(self) -> dict:
        """The file record of this adapter on this layer (see :meth:`AdapterSpec.config`)."""
        return self.spec.config(self.in_features, self.out_features, **self.layer.layer_fields())

    def describe(self) -> str:
        return self.spec.describe(self.out_features)


class _OfPrimary:
    """An attribute of the layer's primary adapter, read through the layer: the single-adapter API.

    ``layer.slices``, ``layer.scalings``, ... are those of the active adapter, or of the first
    where the active one is not on this layer; ``missing`` without adapters.
    """

    def __init__(self, missing: Any, attribute: str = "") -> None:
        self.missing = missing
        self.attribute = attribute

    def __set_name__(self, owner: type, name: str) -> None:
        self.attribute = self.attribute or name

    def __get__(self, layer: LowRankAdapters | None, owner: type | None = None) -> Any:
        if layer is None:
            return self
        if not layer._lora_adapters:
            return self.missing
        return getattr(layer.adapter(), self.attribute)


class LowRankAdapters:
    """Mixin holding named adapters over ``self.weight`` (``(out_features, in_features)``).

    The layer class calls :meth:`_init_adapters` in its ``__init__``, then :meth:`add_adapter`.
    It provides ``weight``, ``bias``, ``in_features``, ``out_features`` and :meth:`layer_fields`.
    """

    in_features: int
    out_features: int
    weight: Tensor
    # Set only by lora_vit.disable_lora: the base layer's function, adapters kept in place.
    _lora_disabled = False

    def _init_adapters(self) -> None:
        self._lora_adapters: dict[str, AdapterView] = {}
        # What this layer runs (None: its base function). Which adapter a model runs is recorded
        # once, on the model (lora_vit.registry.active_adapter); every operation that changes it
        # ends by writing it here (registry.sync_active), because the forward and a compiled
        # graph's guards read it on every call. A lone layer runs its first adapter.
        self._lora_running: AdapterView | None = None

    def layer_fields(self) -> dict:
        """Extra fields of this layer kind's file record (``kind``, ``num_heads``)."""
        return {}

    # ------------------------------------------------------------------ the named adapters

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self._lora_adapters)

    def add_adapter(self, name: str, spec: AdapterSpec) -> None:
        """Register ``spec``'s parameters under ``name``, freshly initialised and trainable.

        Raises:
            LoRAError: If this layer already has an adapter ``name``, or a parameter name is taken.
        """
        if name in self._lora_adapters:
            raise LoRAError(f"this layer already has an adapter named {name!r}")
        view = AdapterView(self, name, spec)
        module: nn.Module = self  # type: ignore[assignment]
        taken = [n for n in view.parameter_names if n in module._parameters]
        if taken:
            raise LoRAError(f"adapter {name!r} would reuse parameter names {taken} of another adapter")
        if spec.slices[-1].stop > self.out_features:
            raise LoRAError(f"adapter {name!r} has rows beyond out_features={self.out_features}")
        device = self.weight.device
        for (relative, shape), param_name in zip(spec.shapes(self.in_features), view.parameter_names):
            dtype = spec.kind.parameter_dtype(relative, self.weight.dtype)
            module.register_parameter(param_name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        self._lora_adapters[name] = view
        spec.kind.initialise(view)
        if len(self._lora_adapters) == 1:
            self._lora_running = view

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` and its parameters (the layer runs its base function if it ran it)."""
        view = self._lora_adapters.pop(name)
        module: nn.Module = self  # type: ignore[assignment]
        for param_name in view.parameter_names:
            delattr(module, param_name)
        if self._lora_running is view:
            self._lora_running = None

    def set_active(self, name: str | None) -> None:
        """Run adapter ``name`` (the base function where this layer has no such adapter, or ``None``)."""
        self._lora_running = self._lora_adapters.get(name) if name is not None else None

    def adapter(self, name: str | None = None) -> AdapterView:
        """The view of adapter ``name``; ``None``: the running one, else the first.

        Raises:
            LoRAError: If this layer has no adapter of that name (or none at all).
        """
        if name is None:
            running = self._lora_running
            name = running.name if running is not None else next(iter(self._lora_adapters), None)
        if name not in self._lora_adapters:
            raise LoRAError(f"this layer has no adapter named {name!r} (it has {list(self._lora_adapters)})")
        return self._lora_adapters[name]  # type: ignore[index]

    def all_adapter_parameters(self) -> list[nn.Parameter]:
        """The parameters of every named adapter."""
        return [p for view in self._lora_adapters.values() for p in view.adapter_parameters()]

    def reset_parameters(self) -> None:
        """Re-initialise every adapter as its kind starts it (LoRA: A random, B zero); base untouched."""
        for view in self._lora_adapters.values():
            view.kind.initialise(view)

    # ------------------------------------------------------------------ the primary adapter
    # The single-adapter API (a layer with one adapter, as before names existed): the primary
    # adapter's view, which owns the arithmetic (see AdapterView for what each member means).

    def _primary(self) -> AdapterView | None:
        return self.adapter() if self._lora_adapters else None

    slices = _OfPrimary(())
    scalings = _OfPrimary(())
    covers_all_rows = _OfPrimary(False)
    use_dora = _OfPrimary(False)
    use_rslora = _OfPrimary(False)
    init = _OfPrimary("normal")

    def adapter_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return self.adapter().adapter_shapes() if self._lora_adapters else []

    def adapter_parameters(self) -> list[nn.Parameter]:
        return self.adapter().adapter_parameters() if self._lora_adapters else []

    def stacked_a(self) -> Tensor:
        return self.adapter().stacked_a()

    def scaled_b(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.adapter().scaled_b(dtype)

    def merge_dtype(self) -> torch.dtype:
        return torch.promote_types(self.weight.dtype, torch.float32)

    def delta_weight(self) -> Tensor:
        return self.adapter().delta_weight()

    def row_norms(self) -> Tensor:
        return self.adapter().row_norms()

    def row_scale(self, norms: Tensor | None = None) -> Tensor:
        return self.adapter().row_scale(norms)

    def merged_weight(self) -> Tensor:
        return self.adapter().merged_weight()

    def config(self) -> dict:
        return self.adapter().config()
