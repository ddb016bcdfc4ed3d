"""Choosing among a model's named adapters: which one runs, per-sample routing, deleting one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from .errors import LoRAError
from .layer import LoRALinear
from .mha import LoRAMultiheadAttention
from .mixed_batch import BATCH_FIRST, ROUTING_MISMATCH, route_index
from .registry import (
    adapted_layers,
    adapter_module,
    adapter_names,
    adapter_views,
    choice,
    choose_adapter,
    detach_owned,
    forget_choice,
    lora_modules,
    per_adapter_modules,
    replace_module,
    resolve_adapter,
    sync_active,
    trainable_modules,
)
from .routing import Block, check_not_routing, enter, leave
from .wrappers import unwrap_model

__all__ = ["adapter_parameters", "adapter_per_sample", "delete_adapter", "set_adapter"]


def set_adapter(model: nn.Module, name: str | None) -> nn.Module:
    """Make ``model`` run adapter ``name``; ``None`` runs the base model.

    Layers that ``name`` does not adapt compute their base function, and trainable modules it
    has no copy of (a head another adapter trains) run their original. Only which adapter runs
    changes, in place: every adapter stays and keeps its ``requires_grad``. The choice lasts
    until the next ``set_adapter``, or until adapter ``name`` is deleted (then the first adapter
    left runs); without a choice the first adapter added runs. Under ``torch.compile``, each
    choice compiles its own graph once (the choice is guarded).

    Args:
        model: A model with named adapters (a wrapper is seen through).
        name: One of the model's adapter names, or ``None``.

    Returns:
        ``model``.

    Raises:
        LoRAError: If ``name`` is not one of the model's adapters (the message lists them).

    Example:
        >>> from lora_vit import inject_lora
        >>> model = inject_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2, adapter="a")
        >>> model = inject_lora(model, ["0"], r=2, adapter="b")
        >>> _ = set_adapter(model, "b")
        >>> model[0]._lora_running.name
        'b'
    """
    if name is not None:
        resolve_adapter(model, name, "run")
    choose_adapter(model, name)
    return model


def adapter_parameters(model: nn.Module, adapter: str | None = None) -> list[nn.Parameter]:
    """The Parameters of one named adapter: its factors on every layer, then its own module copies.

    For an optimiser (or parameter group) of one adapter, or to freeze the adapters a run does
    not train: under ``DistributedDataParallel`` a parameter that requires a gradient but gets
    none (an adapter :func:`set_adapter` does not run, or its head) stalls the gradient
    reduction, so freeze those (``p.requires_grad_(False)``) before wrapping. Mixed batches
    (:func:`adapter_per_sample`) need nothing: every adapter of a layer, and every copy of a
    head, gets a gradient, zero where no sample used it. Nothing is changed.

    Args:
        model: A model with named adapters (a wrapper is seen through).
        adapter: Which adapter; may be omitted when the model holds one.

    Returns:
        Its ``A``, ``B`` (and DoRA magnitude) Parameters, layer by layer in model order and in
        slice order, then the Parameters of its copies of ``trainable`` modules (a head).

    Raises:
        LoRAError: If the model has no adapter of that name, or several and none was named.

    Example:
        >>> from lora_vit import inject_lora
        >>> model = inject_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2, adapter="a")
        >>> model = inject_lora(model, ["0"], r=1, adapter="b")
        >>> [tuple(p.shape) for p in adapter_parameters(model, "b")]
        [(1, 4), (4, 1)]
    """
    name = resolve_adapter(model, adapter, "list the parameters of")
    factors = [p for view in adapter_views(model, name).values() for p in view.adapter_parameters()]
    copies = [p for m in trainable_modules(model, name) for p in adapter_module(model, m, name).parameters()]
    return factors + copies


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` (its factors and its copies of trainable modules) from ``model``, in place.

    A layer left without adapters becomes its plain base module again (an ``nn.Linear``, or an
    ``nn.MultiheadAttention`` once neither it nor its ``out_proj`` holds any); a trainable module
    left without copies becomes its original again. If ``name`` was chosen with
    :func:`set_adapter`, the choice is dropped: the first remaining adapter runs (on a model
    left without adapters, the next adapter added runs). ``requires_grad`` of everything else is
    untouched.

    Args:
        model: A model with named adapters (a torch.compile wrapper is seen through), or one
            :class:`LoRALinear` / :class:`LoRAMultiheadAttention` holding several adapters.

    Returns:
        ``model``.

    Raises:
        LoRAError: If the model has no adapter ``name`` (the message lists its adapters), an
            ``adapter_per_sample`` block is open on it, or ``model`` is a single layer whose
            last adapter this is (a module cannot replace itself: use ``plain_linear()``, or
            :func:`lora_vit.merge_lora`, which returns the plain module).
    """
    resolve_adapter(model, name, "delete")
    check_not_routing(unwrap_model(model), "delete an adapter")
    inner = unwrap_model(model)
    layers = adapted_layers(model)
    itself = layers.get("")  # a standalone layer: the model cannot replace itself
    if isinstance(itself, LoRALinear) and itself.adapter_names == (name,):
        raise LoRAError(
            f"cannot delete {name!r}, the last adapter of this {type(itself).__name__}: a module cannot replace"
            " itself in place. Use layer.plain_linear() (or merge_lora, which returns the plain module)"
        )
    for layer_name, layer in layers.items():
        if name not in layer.adapter_names:
            continue
        if layer_name and isinstance(layer, LoRALinear) and layer.adapter_names == (name,):
            replace_module(model, layer_name, layer.plain_linear())
        else:
            layer.remove_adapter(name)
    for layer_name, module in lora_modules(model).items():
        emptied = isinstance(module, LoRAMultiheadAttention) and not module.adapter_names
        if layer_name and emptied and not isinstance(module.out_proj, LoRALinear):
            replace_module(model, layer_name, module.merged_module())
    detach_owned(model, name)
    if hasattr(inner, "_lora_vit_adapters"):
        inner._lora_vit_adapters = tuple(n for n in inner._lora_vit_adapters if n != name)
    if choice(model) == name or not adapter_names(model):
        forget_choice(model)
    else:
        sync_active(model)
    return model


def _check_names(model: nn.Module, names: Sequence[str | None]) -> list[str | None]:
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise LoRAError(f"names must be a sequence of adapter names (one per sample), got {names!r}")
    known = adapter_names(model)
    if not known:
        raise LoRAError(f"{type(unwrap_model(model)).__name__} has no LoRA adapters to route samples through")
    if len(names) == 0:
        raise LoRAError("names is empty; give one adapter name (or None for the base model) per sample")
    for i, name in enumerate(names):
        if name is not None and name not in known:
            raise LoRAError(f"names[{i}] = {name!r} is not an adapter of this model; its adapters are {list(known)}")
    return list(names)


def _routing_error(err: BaseException) -> str | None:
    """The routing LoRAError's message inside a dynamo error, else None."""
    if isinstance(err, LoRAError) or type(err).__module__.split(".")[0] != "torch":
        return None
    text = str(err).replace("\\'", "'")
    start = text.find(ROUTING_MISMATCH)
    if start < 0:
        return None
    end = text.find(BATCH_FIRST, start)
    return text[start : end + len(BATCH_FIRST)] if end >= 0 else text[start:]


@contextlib.contextmanager
def adapter_per_sample(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, sample ``i`` of each forward call runs through adapter ``names[i]``.

    ``None`` runs that sample through the base model. One batch, one graph: every adapted layer
    stacks its adapters' factors and gathers each sample's pair, so a mixed batch costs two
    batched matmuls per layer whatever the mix, in training and inference, for
    :class:`LoRALinear` (whole and fused-slice adapters, LoRA and DoRA) and
    :class:`LoRAMultiheadAttention`. Trainable modules with per-adapter copies (heads) route
    too: sample ``i`` goes through ``names[i]``'s copy, or the original where that adapter has
    none (and for ``None``); the copies run on the whole batch and each sample's row is kept.
    Gradients reach each adapter only from its own samples: a mixed step equals the
    per-adapter sub-batch steps summed. Under ``torch.compile(fullgraph=True)`` the routing is
    a tensor input of the graph, so a new mix of the same batch size neither recompiles nor
    breaks the graph.

    The routing belongs to the calling thread (or asyncio task), not to the model: other
    threads calling the same model meanwhile run it as they would without this block, or
    with their own. Blocks nest, and leaving blocks in any order restores what was there.
    The model itself is not changed. While a block is open, adding, loading (as a new
    adapter), deleting or merging adapters of the model is refused, from any thread.

    The batch is dimension 0 of every adapted layer's input (as in ViTs: ``(N, tokens,
    features)``; an ``nn.MultiheadAttention`` routes by its own batch dimension) and of every
    per-adapter module's output. A forward whose batch is not ``len(names)`` raises a
    ``LoRAError`` at the first adapted layer, before that layer computes anything.

    Args:
        model: A model with named adapters (a wrapper is seen through).
        names: One adapter name (or ``None``) per sample.

    Yields:
        ``model`` itself.

    Raises:
        LoRAError: If ``names`` is not a non-empty sequence, names an unknown adapter, or
            mixes adapters whose copies of a module have state of different shapes (heads of
            different numbers of classes, whose outputs cannot be stacked); raised on
            entering, before anything runs.

    Example:
        >>> import torch
        >>> from lora_vit import inject_lora
        >>> model = inject_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2, dropout=0.0, adapter="a")
        >>> model = inject_lora(model, ["0"], r=2, dropout=0.0, adapter="b")
        >>> _ = nn.init.ones_(model[0].lora_B__b)
        >>> x = torch.randn(3, 4)
        >>> with adapter_per_sample(model, ["a", "b", None]):
        ...     mixed = model(x)
        >>> _ = set_adapter(model, "b")
        >>> base = torch.nn.functional.linear(x, model[0].weight, model[0].bias)
        >>> torch.allclose(mixed[1], model(x)[1]) and torch.allclose(mixed[2], base[2])
        True
    """
    checked = _check_names(model, names)
    inner = unwrap_model(model)
    layers = list(adapted_layers(model).values())
    routes: dict[int, object] = {id(layer): route_index(layer, checked) for layer in layers}
    heads = per_adapter_modules(model)
    routes.update({id(module): module.route(checked, where) for where, module in heads.items()})
    block = Block(inner, routes, (*layers, *heads.values()))
    enter(block)
    try:
        yield model
    except Exception as err:
        # Under torch.compile(fullgraph=True) dynamo reports the LoRAError a layer raises while
        # tracing (a batch of the wrong size) as its own "Unsupported"; give the user ours.
        cause = _routing_error(err)
        if cause is None:
            raise
        raise LoRAError(cause) from None
    finally:
        leave(block)
