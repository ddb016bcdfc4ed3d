"""Per-sample routing state: per call, never stored on the modules.

:func:`lora_vit.adapter_per_sample` opens a *block*: for each routed module of one model, the
index of every sample's adapter. Open blocks live in a :class:`~contextvars.ContextVar`, so a
block is seen only by the thread (or asyncio task) that opened it, and leaving blocks in any
order removes exactly the one left. A module asks :func:`current_route` for its entry.

``torch.compile`` cannot read a ``ContextVar`` (dynamo does not trace ``ContextVar.get``), but it
reads, and guards on, attributes of a ``threading.local``: compiled code reads a per-thread
mirror of the same routes, which entering and leaving a block keep equal to the thread's
context. The guards are evaluated in the calling thread on every call, so threads never see
each other's routing, compiled or not. The one case the mirror cannot follow is two asyncio
tasks of one thread interleaving *inside* blocks while calling a *compiled* model (the mirror
holds the routing of the block entered last); eager models follow each task's own context.

While a block is open on a model (in any thread), adding or removing adapters is refused
(:func:`check_not_routing`): the routes index each layer's adapters as they were on entering.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import nn

from .errors import LoRAError

__all__ = ["Block", "check_not_routing", "current_route", "enter", "leave"]


class Block(NamedTuple):
    """One open ``adapter_per_sample`` block: the (unwrapped) model and each routed module's route."""

    model: nn.Module
    routes: Mapping[int, Any]  # id(module) -> what that module needs (see current_route)
    modules: tuple[nn.Module, ...]  # kept alive, so that no id is reused while the block is open


class _Routing(NamedTuple):
    blocks: tuple[Block, ...]
    routes: Mapping[int, Any]  # every open block's routes merged, the block entered last winning


_NOTHING = _Routing((), MappingProxyType({}))
_STATE: ContextVar[_Routing] = ContextVar("lora_vit_routing", default=_NOTHING)
_MIRROR = threading.local()
_OPEN: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
_OPEN_LOCK = threading.Lock()


def current_route(module: nn.Module) -> Any | None:
    """The route of ``module`` in the calling context (``None``: not routed per sample)."""
    if torch.compiler.is_compiling():
        routes = getattr(_MIRROR, "routes", None)
        return None if routes is None else routes.get(id(module))
    return _STATE.get().routes.get(id(module))


def _set(blocks: tuple[Block, ...]) -> None:
    merged: dict[int, Any] = {}
    for block in blocks:
        merged.update(block.routes)
    _STATE.set(_Routing(blocks, merged))
    if merged:
        _MIRROR.routes = merged
    elif hasattr(_MIRROR, "routes"):
        del _MIRROR.routes  # an unrouted call compiles (and guards) as if no block ever existed


def enter(block: Block) -> None:
    """Open ``block`` in the calling context."""
    with _OPEN_LOCK:
        _OPEN[block.model] = _OPEN.get(block.model, 0) + 1
    _set((*_STATE.get().blocks, block))


def leave(block: Block) -> None:
    """Close ``block``, whichever blocks were opened after it."""
    _set(tuple(b for b in _STATE.get().blocks if b is not block))
    with _OPEN_LOCK:
        left = _OPEN.get(block.model, 1) - 1
        if left:
            _OPEN[block.model] = left
        else:
            _OPEN.pop(block.model, None)


def check_not_routing(model: nn.Module, action: str) -> None:
    """Refuse to change which adapters ``model`` holds while an ``adapter_per_sample`` block is open on it.

    Raises:
        LoRAError: Naming the action.
    """
    with _OPEN_LOCK:
        count = _OPEN.get(model, 0)
    if count:
        raise LoRAError(
            f"cannot {action} while {count} adapter_per_sample block(s) are open on this model: the routes"
            " were computed for the adapters it held on entering. Leave the block first"
        )
