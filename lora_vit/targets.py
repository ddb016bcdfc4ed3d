"""Turn target names (logical, preset, literal, suffix or glob) into the Linear layers to adapt.

Logical names describe a role in a transformer block, not a spelling, so one call works on
HF transformers ViT/ViTMAE (4.x ``attention.attention.query``, 5.x ``attention.q_proj``),
timm (fused ``attn.qkv``, whose q/k/v thirds become slices), ``nn.MultiheadAttention``
(torchvision, open_clip: q/k/v are thirds of its packed ``in_proj_weight``, ``o`` its ``out_proj``)
and most other families.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from .errors import LoRAError
from .layer import LoRALinear
from .mha import LoRAMultiheadAttention, check_adaptable_mha, qkv_bounds
from .wrappers import unwrap_model

__all__ = ["LOGICAL_TARGETS", "PRESETS", "TargetMatch", "resolve_modules", "resolve_targets"]

_SEPARATE = {
    "q": {"q", "query", "q_proj", "to_q", "wq", "q_lin"},
    "k": {"k", "key", "k_proj", "to_k", "wk", "k_lin"},
    "v": {"v", "value", "v_proj", "to_v", "wv", "v_lin"},
}
_FUSED_QKV = {"qkv", "qkv_proj", "in_proj", "to_qkv", "Wqkv", "c_attn"}
_QKV_INDEX = {"q": 0, "k": 1, "v": 2}
# Name endings (whole dotted components) per role, for the roles spelled with a path.
_ENDINGS = {
    "o": [("o_proj",), ("out_proj",), ("wo",), ("out_lin",), ("attn", "proj"), ("attention", "proj"),
          ("attention", "output", "dense"), ("to_out", "0")],
    # torchvision's MLPBlock is an nn.Sequential: mlp.0 and mlp.3 are its two Linear layers.
    "fc1": [("fc1",), ("lin1",), ("c_fc",), ("intermediate", "dense"), ("mlp", "0")],
    "fc2": [("fc2",), ("lin2",), ("output", "dense"), ("mlp", "c_proj"), ("mlp", "3")],
}

LOGICAL_TARGETS = ("q", "k", "v", "o", "fc1", "fc2")
"""Roles that name the same layer across model families."""

_ALIASES = {"query": "q", "key": "k", "value": "v"}

PRESETS: dict[str, tuple[str, ...]] = {
    "qkv": ("q", "k", "v"),
    "attn": ("q", "k", "v", "o"),
    "mlp": ("fc1", "fc2"),
    "all-linear": (),
}
"""Named groups of logical targets; ``all-linear`` is every Linear not marked trainable."""

_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class TargetMatch:
    """One adapter to create.

    Attributes:
        module: Dotted name of the ``nn.Linear`` (or ``nn.MultiheadAttention``) in the model.
        target: The target string (as the user wrote it) that selected it.
        slice: ``"q"``, ``"k"`` or ``"v"`` for a third of a fused projection, else ``None``.
        bounds: ``(start, stop)`` output rows of that slice, else ``None``.
    """

    module: str
    target: str
    slice: str | None = None
    bounds: tuple[int, int] | None = None


def _ends_with(parts: list[str], ending: tuple[str, ...]) -> bool:
    return tuple(parts[-len(ending):]) == ending


_Match = tuple[str | None, tuple[int, int] | None]


def _logical_match(role: str, name: str, module: nn.Module) -> _Match | None:
    """``(slice, bounds)`` if ``name`` plays ``role``, ``(None, None)`` for a whole layer."""
    parts = name.split(".")
    if isinstance(module, nn.MultiheadAttention):
        if role not in _SEPARATE:
            return None
        check_adaptable_mha(module, name)
        return role, qkv_bounds(module, role)
    if role in _SEPARATE:
        if parts[-1] in _SEPARATE[role]:
            return None, None
        if parts[-1] in _FUSED_QKV:
            out = int(module.out_features)  # type: ignore[arg-type]
            if out % 3:
                raise LoRAError(
                    f"{name!r} looks like a fused q/k/v projection but its {out} output rows do"
                    " not split into three equal parts; target it by its literal name instead"
                )
            third = out // 3
            index = _QKV_INDEX[role]
            return role, (index * third, (index + 1) * third)
        return None
    if role == "fc2" and _ends_with(parts, ("attention", "output", "dense")):
        return None
    if any(_ends_with(parts, ending) for ending in _ENDINGS[role]):
        return None, None
    return None


def _literal_match(target: str, name: str) -> bool:
    if _GLOB_CHARS.search(target):
        return fnmatch.fnmatchcase(name, target)
    return name == target or name.endswith("." + target)


def _summarise_names(names: Iterable[str], limit: int = 40) -> str:
    """Collapse ``layer.0.x ... layer.11.x`` into ``layer.*.x (x12)`` for readable errors."""
    counts: dict[str, int] = {}
    for name in names:
        key = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name)
        counts[key] = counts.get(key, 0) + 1
    shown = [k if n == 1 else f"{k} (x{n})" for k, n in counts.items()]
    more = f", ... and {len(shown) - limit} more" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more if shown else "(none)"


def _expand(targets: Iterable[str]) -> list[tuple[str, str]]:
    """(user target, atomic target) pairs, presets and aliases expanded."""
    if isinstance(targets, str):
        targets = [targets]
    expanded: list[tuple[str, str]] = []
    for target in targets:
        if not isinstance(target, str) or not target:
            raise LoRAError(f"targets must be non-empty strings, got {target!r}")
        atoms = PRESETS.get(target, (target,)) if target != "all-linear" else ("all-linear",)
        expanded.extend((target, _ALIASES.get(atom, atom)) for atom in atoms)
    if not expanded:
        raise LoRAError("targets is empty; name at least one, e.g. ('q', 'k', 'v')")
    return expanded


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers and ``nn.MultiheadAttention`` modules (whose in-projection is a linear map)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, LoRALinear, nn.MultiheadAttention)) and name:
            found[name] = module
    return found


def _check_adaptable(
    name: str, module: nn.Module, target: str, parents: dict[str, nn.Module], adapter: str
) -> None:
    if isinstance(module, (LoRALinear, LoRAMultiheadAttention)) and adapter in module.adapter_names:
        raise LoRAError(
            f"{name!r} already has a LoRA adapter named {adapter!r} (target {target!r});"
            " injecting twice would stack a second adapter. Inject under another adapter= name,"
            " or merge or reload the base model first."
        )
    if isinstance(module, nn.MultiheadAttention):
        check_adaptable_mha(module, name)
    parent_name = name.rpartition(".")[0]
    if parent_name == "" and isinstance(parents.get(""), nn.MultiheadAttention):
        raise LoRAError(
            f"{name!r} belongs to the nn.MultiheadAttention that is the model itself, which cannot be"
            " replaced in place; adapt the module that holds it, or use LoRAMultiheadAttention directly"
        )


def resolve_targets(
    model: nn.Module, targets: Iterable[str], *, exclude: Iterable[str] = (), adapter: str = "default"
) -> list[TargetMatch]:
    """Find the Linear layers (and fused q/k/v slices) that ``targets`` name in ``model``.

    Args:
        model: The model to search.
        targets: Logical names (``q k v o fc1 fc2``, and the aliases ``query key value``),
            presets (``qkv attn mlp all-linear``), full module names, dotted suffixes of
            them (``attention.query``) or glob patterns over full names (``*.attn.qkv``). A
            literal name of an ``nn.MultiheadAttention`` adapts its whole in-projection.
        exclude: Module names whose Linear layers ``all-linear`` skips (trainable modules).
        adapter: The adapter name to add; a layer that already has one of that name is refused.

    Returns:
        One match per adapter to create, in model order.

    Raises:
        LoRAError: If a target matches no Linear layer (the message lists the model's
            Linear layers), a matched layer already has an adapter of that name, is an
            ``nn.MultiheadAttention`` with separate q/k/v weights, or is matched both whole and
            as a fused slice.
    """
    model = unwrap_model(model)  # names as inject_lora and the loaders resolve them
    candidates = _candidates(model)
    excluded = tuple(exclude)
    parents = dict(model.named_modules())
    matches: dict[tuple[str, str | None], TargetMatch] = {}
    for user_target, atom in _expand(targets):
        hits = []
        for name, module in candidates.items():
            if atom == "all-linear":
                if any(name == e or name.startswith(e + ".") for e in excluded):
                    continue
                if isinstance(module, nn.MultiheadAttention) and not module._qkv_same_embed_dim:
                    continue  # three separate matrices, not one linear map: only its out_proj
                found: _Match | None = (None, None)
            elif atom in LOGICAL_TARGETS:
                found = _logical_match(atom, name, module)
            else:
                found = (None, None) if _literal_match(atom, name) else None
            if found is not None:
                hits.append(TargetMatch(name, user_target, *found))
        if not hits:
            raise LoRAError(
                f"target {user_target!r} matches no Linear layer of {type(model).__name__}."
                f" Its Linear layers are: {_summarise_names(candidates)}."
                f" Valid targets: logical {LOGICAL_TARGETS}, presets {tuple(PRESETS)},"
                " or literal names, dotted suffixes or glob patterns of the layers above."
            )
        for hit in hits:
            matches.setdefault((hit.module, hit.slice), hit)
    position = {name: i for i, name in enumerate(candidates)}
    ordered = sorted(matches.values(), key=lambda m: position[m.module])  # stable: slices keep their order
    for match in ordered:
        _check_adaptable(match.module, candidates[match.module], match.target, parents, adapter)
    by_module: dict[str, set[str | None]] = {}
    for match in ordered:
        by_module.setdefault(match.module, set()).add(match.slice)
    for name, slices in by_module.items():
        if None in slices and len(slices) > 1:
            raise LoRAError(
                f"{name!r} is targeted both as a whole and as the fused slices"
                f" {sorted(s for s in slices if s)}; pick one"
            )
    return ordered


def resolve_modules(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Full names of the modules that literal names, dotted suffixes or globs select.

    Raises:
        LoRAError: If a name selects no module (the message lists the top-level children).
    """
    if isinstance(names, str):
        names = [names]
    model = unwrap_model(model)
    all_names = [n for n, _ in model.named_modules() if n]
    selected: list[str] = []
    for pattern in names:
        if not isinstance(pattern, str) or not pattern:
            raise LoRAError(f"module names must be non-empty strings, got {pattern!r}")
        hits = [n for n in all_names if _literal_match(pattern, n)]
        if not hits:
            children = [n for n, _ in model.named_children()]
            raise LoRAError(
                f"{pattern!r} matches no module of {type(model).__name__}; its top-level modules"
                f" are {children}"
            )
        selected.extend(h for h in hits if h not in selected)
    # A module inside another selected one adds nothing.
    return [n for n in selected if not any(n.startswith(p + ".") for p in selected)]
