"""`inject_lora`: put adapters into a model in place, freeze the rest, and report what changed."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from .adapters import AdaptedLayer, build_adapter, is_adapted
from .errors import LoRAError
from .layer import LoRALinear, check_dropout, check_init, value_for
from .mha import LoRAMultiheadAttention
from .readers import route_weight_readers
from .targets import TargetMatch, resolve_modules, resolve_targets
from .wrappers import check_not_wrapped, clean_name, is_wrapper, unwrap_model

__all__ = [
    "LoRASummary",
    "adapted_layers",
    "check_routable",
    "find_module",
    "inject_lora",
    "lora_modules",
    "lora_summary",
    "trainable_modules",
    "unwrap_model",
]

logger = logging.getLogger("lora_vit")

# Recorded on the model itself so that state I/O knows which whole modules belong with the
# adapters; it is a plain attribute, so it never appears in the model's state_dict.
_TRAINABLE_ATTR = "_lora_vit_trainable"

def _named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules by their unwrapped dotted names; where a wrapper and its content share a name, the content."""
    found: dict[str, nn.Module] = {}
    for name, module in unwrap_model(model).named_modules():
        if not is_wrapper(module):
            found[clean_name(name)] = module
    return found


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """Every adapted layer in ``model`` by dotted name, in model order (names as if unwrapped).

    That is every ``LoRALinear`` and every ``LoRAMultiheadAttention`` with in-projection adapters.
    """
    return {name: m for name, m in _named_modules(model).items() if is_adapted(m)}  # type: ignore[misc]


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Adapted layers plus routing-only ``LoRAMultiheadAttention`` modules: all that merging replaces."""
    return {
        name: m for name, m in _named_modules(model).items() if isinstance(m, (LoRALinear, LoRAMultiheadAttention))
    }


def trainable_modules(model: nn.Module) -> tuple[str, ...]:
    """Names of the whole modules that ``inject_lora(..., trainable=...)`` left trainable."""
    return tuple(getattr(unwrap_model(model), _TRAINABLE_ATTR, ()))


def find_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` that also sees through DDP/FSDP/compile wrappers.

    Raises:
        AttributeError: If no module has that (unwrapped) name.
    """
    inner = unwrap_model(model)
    try:
        return inner.get_submodule(name)
    except AttributeError:
        found = _named_modules(model).get(name)
        if found is None:
            raise
        return found


def forget_injection(model: nn.Module) -> None:
    """Drop the record of trainable modules (after merging, the model is a plain model)."""
    inner = unwrap_model(model)
    if hasattr(inner, _TRAINABLE_ATTR):
        delattr(inner, _TRAINABLE_ATTR)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(find_module(model, parent_name), child, new)


def check_routable(model: nn.Module, layers: Mapping[str, AdaptedLayer], where: str) -> None:
    """Refuse an adapted ``out_proj`` of an ``nn.MultiheadAttention`` that is the model itself.

    :func:`apply_adapters` replaces such a parent by a :class:`LoRAMultiheadAttention` so that it
    calls ``out_proj``; the model itself cannot be replaced in place.

    Raises:
        LoRAError: Naming the layer.
    """
    if isinstance(unwrap_model(model), nn.MultiheadAttention) and "out_proj" in layers:
        raise LoRAError(
            f"{where} adapts 'out_proj' of the nn.MultiheadAttention that is the model itself, which cannot"
            " be replaced in place; load into the module that holds it"
        )


def apply_adapters(model: nn.Module, layers: Mapping[str, AdaptedLayer], trainable: Iterable[str]) -> None:
    """Swap ``layers`` into ``model``, then freeze all but adapters and ``trainable`` modules.

    Callers build and validate everything first, so this step cannot fail half-way.
    """
    # Parents first: an adapted MultiheadAttention takes over its out_proj child when built, so
    # an adapted out_proj must go into the new module, not the replaced one.
    for name in sorted(layers, key=lambda n: n.count(".")):
        replace_module(model, name, layers[name])
    # Parents that read a layer's weight instead of calling it (timm EVA/BEiT qkv) must call it.
    route_weight_readers({name: find_module(model, name.rpartition(".")[0]) for name in layers})
    # nn.MultiheadAttention reads out_proj.weight itself: route it through its out_proj module.
    for name in layers:
        parent_name, _, child = name.rpartition(".")
        parent = find_module(model, parent_name)
        routed = isinstance(parent, LoRAMultiheadAttention)
        if child == "out_proj" and isinstance(parent, nn.MultiheadAttention) and not routed:
            replace_module(model, parent_name, LoRAMultiheadAttention.routing(parent))
    recorded = list(trainable_modules(model))
    recorded += [t for t in trainable if t not in recorded]
    setattr(unwrap_model(model), _TRAINABLE_ATTR, tuple(recorded))
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in adapted_layers(model).values():
        for param in layer.adapter_parameters():
            param.requires_grad_(True)
    for name in recorded:
        for param in find_module(model, name).parameters():
            param.requires_grad_(True)


def _build_layer(
    base: nn.Module,
    matches: list[TargetMatch],
    r: int | Mapping[str, int],
    alpha: float | Mapping[str, float],
    dropout: float,
    init: str,
    use_rslora: bool,
    use_dora: bool,
) -> AdaptedLayer:
    if matches[0].slice is None:
        target = matches[0].target
        return build_adapter(
            base,
            value_for(r, target, "r", "target"),
            value_for(alpha, target, "alpha", "target"),
            dropout,
            slices=None,
            init=init,
            use_rslora=use_rslora,
            use_dora=use_dora,
        )
    return build_adapter(
        base,
        {m.slice: value_for(r, m.target, "r", "target") for m in matches},  # type: ignore[misc]
        {m.slice: value_for(alpha, m.target, "alpha", "target") for m in matches},  # type: ignore[misc]
        dropout,
        slices={m.slice: m.bounds for m in matches},  # type: ignore[misc]
        init=init,
        use_rslora=use_rslora,
        use_dora=use_dora,
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
) -> nn.Module:
    """Replace the targeted layers of ``model`` by :class:`LoRALinear` (or, for an
    ``nn.MultiheadAttention``, :class:`LoRAMultiheadAttention`), in place.

    Every parameter of the model is frozen except the new adapters and the parameters of
    the modules named in ``trainable`` (for example a classification head). Nothing is
    changed if any argument or target is invalid. Call :func:`lora_summary` to see what was
    adapted and how many parameters train.

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
        init: ``"normal"`` (A ~ N(0, 0.02^2), the default) or ``"kaiming"``.
        use_rslora: Scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
        use_dora: DoRA: a trainable magnitude per adapted output row over the normalised
            ``W + dW`` (see :class:`LoRALinear`); on fused projections only the chosen slices' rows.

    Returns:
        ``model`` itself, adapted. A ``torch.compile`` (or checkpoint) wrapper is seen through:
        the model inside it is adapted and the wrapper returned.

    Raises:
        LoRAError: For a target or trainable name that matches nothing (listing the model's
            Linear layers), a layer that already has an adapter, an invalid ``r``,
            ``alpha``, ``dropout``, ``init`` or ``use_dora``, or a module both adapted and in
            ``trainable``.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = inject_lora(model, targets=["0"], r=2, alpha=4, trainable=["2"])
        >>> lora_summary(model).trainable_params
        50
    """
    check_not_wrapped(model, "inject_lora into")
    wrapper, model = model, unwrap_model(model)  # a torch.compile wrapper: adapt what it runs
    dropout = check_dropout(dropout)
    init = check_init(init)
    if not isinstance(use_dora, bool):
        raise LoRAError(f"use_dora must be True or False, got {use_dora!r}")
    trainable_names = resolve_modules(model, trainable) if trainable else []
    target_list = [targets] if isinstance(targets, str) else list(targets)
    if not target_list and not trainable_names:
        raise LoRAError(
            "targets is empty and nothing is trainable; name targets such as ('q', 'k', 'v'),"
            " or pass only trainable=[...] to train whole modules without adapters (a linear probe)"
        )
    matches = resolve_targets(model, target_list, exclude=trainable_names) if target_list else []
    grouped: dict[str, list[TargetMatch]] = {}
    for match in matches:
        grouped.setdefault(match.module, []).append(match)
    for name in grouped:
        owner = next((t for t in trainable_names if name == t or name.startswith(t + ".")), None)
        if owner is not None:
            raise LoRAError(f"{name!r} is both a LoRA target and inside trainable module {owner!r}")
    layers = {
        name: _build_layer(model.get_submodule(name), group, r, alpha, dropout, init, use_rslora, use_dora)
        for name, group in grouped.items()
    }
    apply_adapters(model, layers, trainable_names)
    logger.info("%s", lora_summary(model))
    return wrapper


@dataclass(frozen=True)
class LoRASummary:
    """What :func:`inject_lora` did, printable as a small report.

    Attributes:
        adapted: ``(module name, description)`` per adapted layer, e.g.
            ``("blocks.0.attn.qkv", "q[0:384] r=8, v[768:1152] r=8")``.
        trainable_modules: Whole modules left trainable.
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


def _describe(layer: AdaptedLayer) -> str:
    dora = ", dora" if layer.use_dora else ""
    if layer.covers_all_rows:
        s = layer.slices[0]
        return f"r={s.r}, alpha={s.alpha:g}{dora}"
    return ", ".join(f"{s.name}[{s.start}:{s.stop}] r={s.r}, alpha={s.alpha:g}" for s in layer.slices) + dora


def lora_summary(model: nn.Module) -> LoRASummary:
    """Count what is adapted and what trains in ``model`` right now.

    Example:
        >>> model = inject_lora(nn.Sequential(nn.Linear(8, 8)), targets=["0"], r=2)
        >>> print(lora_summary(model))  # doctest: +NORMALIZE_WHITESPACE
        LoRA adapters on 1 layers:
          0: r=2, alpha=32
        trainable params: 32 of 104 (30.769%), adapters 32
    """
    layers = adapted_layers(model)
    params = list(unwrap_model(model).parameters())
    return LoRASummary(
        adapted=tuple((name, _describe(layer)) for name, layer in layers.items()),
        trainable_modules=trainable_modules(model),
        adapter_params=sum(p.numel() for layer in layers.values() for p in layer.adapter_parameters()),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
    )
