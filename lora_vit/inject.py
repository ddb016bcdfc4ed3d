"""`inject_lora`: put adapters into a model in place, freeze the rest, and report what changed."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from .adapters import build_adapter
from .errors import LoRAError
from .kinds import resolve_kind
from .layer import LoRALinear
from .mha import LoRAMultiheadAttention
from .registry import (
    AdaptedLayer,
    adapted_layers,
    adapter_names,
    adapter_views,
    apply_adapters,
    plan_owned,
    resolve_adapter,
    trainable_modules,
)
from .routing import check_not_routing
from .spec import DEFAULT_ADAPTER, AdapterSpec, check_adapter_name, check_dropout, check_flag, check_init, value_for
from .targets import TargetMatch, resolve_modules, resolve_targets
from .wrappers import check_not_wrapped, unwrap_model

__all__ = ["LoRASummary", "add_or_build", "inject_lora", "lora_summary"]

logger = logging.getLogger("lora_vit")


def add_or_build(
    model: nn.Module, plans: Mapping[str, AdapterSpec], adapter: str, where: str
) -> dict[str, AdaptedLayer]:
    """Put adapter ``adapter`` with ``plans`` (layer name -> spec) on the layers of ``model``.

    Layers that already hold adapters gain this one in place; plain layers get a new adapted
    layer, returned for :func:`~lora_vit.registry.apply_adapters` to swap in. If any step fails,
    the adapters added so far are removed again, so the model is unchanged.

    Raises:
        LoRAError: Naming the layer whose spec does not fit.
    """
    built: dict[str, AdaptedLayer] = {}
    added: list[AdaptedLayer] = []
    try:
        for name, spec in plans.items():
            module = unwrap_model(model).get_submodule(name)
            try:
                if isinstance(module, (LoRALinear, LoRAMultiheadAttention)) and module.adapter_names:
                    module.add_adapter(adapter, spec)
                    added.append(module)
                    built[name] = module
                else:
                    built[name] = build_adapter(module, spec, adapter)
            except LoRAError as err:
                raise LoRAError(f"{where}, layer {name!r}: {err}") from None
    except BaseException:
        for module in added:
            module.remove_adapter(adapter)
        raise
    return built


def check_trainable_names(model: nn.Module, names: list[str], adapter: str, where: str) -> None:
    """Refuse trainable modules that hold adapted layers, or nest in (or around) another adapter's.

    An adapter's copy of a module holding low-rank layers would copy those layers too, and
    nested copies would each route the same samples twice.

    Raises:
        LoRAError: Naming the module and what it conflicts with.
    """
    adapted = list(adapted_layers(model))
    others = [n for n in trainable_modules(model) if n not in trainable_modules(model, adapter)]
    for name in names:
        inside = [layer for layer in adapted if name == "" or layer == name or layer.startswith(name + ".")]
        if inside:
            raise LoRAError(f"{where}: trainable module {name!r} contains adapted layers {inside[:3]}")
        nested = [o for o in others if o != name and (o.startswith(name + ".") or name.startswith(o + "."))]
        if nested:
            raise LoRAError(
                f"{where}: trainable module {name!r} nests with modules other adapters train ({nested[:3]});"
                " name the same module for every adapter"
            )


def _layer_spec(
    base: nn.Module,
    matches: list[TargetMatch],
    r: int | Mapping[str, int],
    alpha: float | Mapping[str, float],
    dropout: float,
    init: str,
    use_rslora: bool,
    use_dora: bool,
    kind: str | None,
) -> AdapterSpec:
    out_features = 3 * base.embed_dim if isinstance(base, nn.MultiheadAttention) else base.out_features
    in_features = base.embed_dim if isinstance(base, nn.MultiheadAttention) else base.in_features
    if matches[0].slice is None:
        target = matches[0].target
        r_value, alpha_value = value_for(r, target, "r", "target"), value_for(alpha, target, "alpha", "target")
        slices = None
    else:
        r_value = {m.slice: value_for(r, m.target, "r", "target") for m in matches}
        alpha_value = {m.slice: value_for(alpha, m.target, "alpha", "target") for m in matches}
        slices = {m.slice: m.bounds for m in matches}
    return AdapterSpec.build(
        out_features, in_features, r_value, alpha_value, dropout,  # type: ignore[arg-type]
        slices=slices, init=init, use_rslora=use_rslora, use_dora=use_dora, kind=kind,  # type: ignore[arg-type]
    )


def inject_lora(
    model: nn.Module,
    targets: str | Iterable[str] = ("q", "k", "v"),
    r: int | Mapping[str, int] = 4,
    alpha: float | Mapping[str, float] = 32,
    dropout: float = 0.1,
    *,
    trainable: str | Iterable[str] = (),
    init: str = "normal",
    use_rslora: bool = False,
    use_dora: bool = False,
    kind: str | None = None,
    adapter: str = DEFAULT_ADAPTER,
) -> nn.Module:
    """Replace the targeted layers of ``model`` by :class:`LoRALinear` (or, for an
    ``nn.MultiheadAttention``, :class:`LoRAMultiheadAttention`), in place.

    On a model without adapters every parameter is frozen first; then the new adapter's
    factors and its modules named in ``trainable`` (for example a classification head) are
    made trainable, and nothing else changes ``requires_grad`` (what the user froze in other
    adapters or heads stays frozen). Nothing is changed if any argument or target is invalid,
    or while an :func:`~lora_vit.adapter_per_sample` block is open on the model. Call
    :func:`lora_summary` to see what was adapted and how many parameters train.

    Args:
        model: The model to adapt.
        targets: What to adapt (may be empty when ``trainable`` is given: a head-only
            run with no adapters): logical names ``q k v o fc1 fc2`` (``query key value`` are
            accepted as aliases), presets ``qkv attn mlp all-linear``, full module names,
            dotted suffixes (``attention.query``) or glob patterns (``blocks.1*.attn.qkv``).
            On a fused ``qkv`` projection, ``q``/``k``/``v`` adapt only their third of the rows;
            on an ``nn.MultiheadAttention``, their third of ``in_proj_weight`` (``o`` adapts
            its ``out_proj``).
        r: Rank, or a mapping target string -> rank.
        alpha: Scaling numerator (``scaling = alpha / r``), or a mapping target -> alpha.
        dropout: Dropout probability on the input of the LoRA branch, in ``[0, 1)``.
        trainable: Names (literal, suffix or glob) of modules to train fully, e.g. ``"head"``.
            They belong to ``adapter``: it trains its own copy of each (started from the
            untrained original, which ``None`` and adapters without a copy run), saved and
            loaded with it and routed per sample like its factors. The ``"default"`` adapter
            trains a module in place while no other adapter trains it, so single-adapter
            models keep their modules and keys.
        init: ``"normal"`` (A ~ N(0, 0.02^2), the default) or ``"kaiming"``.
        use_rslora: Scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
        use_dora: DoRA: a trainable magnitude per adapted output row over the normalised
            ``W + dW`` (see :class:`LoRALinear`); on fused projections only the chosen slices' rows.
            The same as ``kind="dora"``.
        kind: The adapter kind by name: ``"lora"`` (the default), ``"dora"``, or one added with
            :func:`lora_vit.kinds.register_kind` (see ``docs/adapters.md``, adapter kinds).
        adapter: Name of the adapter to add. A model may hold several named adapters, each
            with its own targets, ranks, alphas and flags (injecting into layers that already
            hold others); the first one added is the one the model runs (see
            :func:`lora_vit.set_adapter`, :func:`lora_vit.adapter_per_sample`). Injecting an
            existing name again extends that adapter to other layers (as before names existed);
            a layer that already holds it is an error.

    Returns:
        ``model`` itself, adapted. A ``torch.compile`` (or checkpoint) wrapper is seen through:
        the model inside it is adapted and the wrapper returned.

    Raises:
        LoRAError: For a target or trainable name that matches nothing (listing the model's
            Linear layers), a layer that already has an adapter of this name, an invalid ``r``,
            ``alpha``, ``dropout``, ``init``, ``use_dora`` or ``kind``, a kind the layer cannot run
            (DoRA on an ``nn.MultiheadAttention``'s in-projection), or a module both adapted and in
            ``trainable``.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = inject_lora(model, targets=["0"], r=2, alpha=4, trainable=["2"])
        >>> lora_summary(model).trainable_params
        50
    """
    check_not_wrapped(model, "inject_lora into")
    wrapper, model = model, unwrap_model(model)  # a torch.compile wrapper: adapt what it runs
    check_not_routing(model, "inject_lora")
    adapter = check_adapter_name(adapter)
    dropout = check_dropout(dropout)
    init = check_init(init)
    resolve_kind(kind, check_flag(use_dora, "use_dora"))
    check_flag(use_rslora, "use_rslora")
    trainable_names = resolve_modules(model, trainable) if trainable else []
    target_list = [targets] if isinstance(targets, str) else list(targets)
    if not target_list and not trainable_names:
        raise LoRAError(
            "targets is empty and nothing is trainable; name targets such as ('q', 'k', 'v'),"
            " or pass only trainable=[...] to train whole modules without adapters (a linear probe)"
        )
    check_trainable_names(model, trainable_names, adapter, "inject_lora")
    excluded = [*trainable_names, *trainable_modules(model)]  # every adapter's copies, never targets
    matches = resolve_targets(model, target_list, exclude=excluded, adapter=adapter) if target_list else []
    grouped: dict[str, list[TargetMatch]] = {}
    for match in matches:
        grouped.setdefault(match.module, []).append(match)
    for name in grouped:
        owner = next((t for t in trainable_names if name == t or name.startswith(t + ".")), None)
        if owner is not None:
            raise LoRAError(f"{name!r} is both a LoRA target and inside trainable module {owner!r}")
    plans = {
        name: _layer_spec(model.get_submodule(name), group, r, alpha, dropout, init, use_rslora, use_dora, kind)
        for name, group in grouped.items()
    }
    owned = plan_owned(model, adapter, trainable_names)
    layers = add_or_build(model, plans, adapter, "inject_lora")
    apply_adapters(model, layers, owned, adapter)
    if plans:
        logger.info("%s", lora_summary(model, adapter=adapter))
    return wrapper


@dataclass(frozen=True)
class LoRASummary:
    """What :func:`inject_lora` did, printable as a small report.

    Attributes:
        adapted: ``(module name, description)`` per adapted layer, e.g.
            ``("blocks.0.attn.qkv", "q[0:384] r=8, v[768:1152] r=8")``.
        trainable_modules: Whole modules the described adapter trains (its own copies).
        adapter_params: Parameters in all adapters.
        trainable_params: Parameters with ``requires_grad`` in the model.
        total_params: All parameters in the model (shared ones counted once).
    """

    adapted: tuple[tuple[str, str], ...]
    trainable_modules: tuple[str, ...]
    adapter_params: int
    trainable_params: int
    total_params: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        lines = [f"LoRA adapters on {len(self.adapted)} layers:"]
        lines += [f"  {name}: {what}" for name, what in self.adapted]
        if self.trainable_modules:
            lines.append(f"fully trainable modules: {', '.join(self.trainable_modules)}")
        lines.append(
            f"trainable params: {self.trainable_params:,} of {self.total_params:,}"
            f" ({100 * self.trainable_fraction:.3f}%), adapters {self.adapter_params:,}"
        )
        return "\n".join(lines)


def lora_summary(model: nn.Module, *, adapter: str | None = None) -> LoRASummary:
    """Count what is adapted and what trains in ``model`` right now.

    Args:
        model: An adapted model.
        adapter: Which named adapter to describe; may be omitted when the model has one
            (``adapter_params`` counts that adapter's factors; the trainable and total counts
            are the whole model's).

    Raises:
        LoRAError: If the model holds several adapters and ``adapter`` is omitted, or has none
            of that name.

    Example:
        >>> model = inject_lora(nn.Sequential(nn.Linear(8, 8)), targets=["0"], r=2)
        >>> print(lora_summary(model))  # doctest: +NORMALIZE_WHITESPACE
        LoRA adapters on 1 layers:
          0: r=2, alpha=32
        trainable params: 32 of 104 (30.769%), adapters 32
    """
    name = resolve_adapter(model, adapter, "describe") if adapter_names(model) else None
    views = adapter_views(model, name) if name is not None else {}
    params = list(unwrap_model(model).parameters())
    return LoRASummary(
        adapted=tuple((layer, view.describe()) for layer, view in views.items()),
        trainable_modules=trainable_modules(model, name),
        adapter_params=sum(p.numel() for view in views.values() for p in view.adapter_parameters()),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
    )
