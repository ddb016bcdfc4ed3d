"""Wrappers around a model (DDP, DataParallel, FSDP, ``torch.compile``, checkpointing): seen through in one place.

Every public function resolves module names on :func:`unwrap_model`'s result, so a name means
the same module whether the caller passes the plain model or a wrapped one; functions that add
modules (injecting, loading into a plain model) first call :func:`check_not_wrapped`, which
refuses wrappers that have already registered their parameters.
"""

from __future__ import annotations

from torch import nn

from .errors import LoRAError

__all__ = ["check_not_wrapped", "clean_name", "is_wrapper", "unwrap_model"]

# Name segments that wrappers nested inside a model insert (FSDP auto-wrap, torch.compile of a
# submodule, activation checkpointing). ``module`` (DDP) is not one: users name modules so, and
# DDP only ever wraps the whole model, which unwrap_model removes.
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_WRAPPER_TYPES = frozenset(
    {"DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "OptimizedModule", "CheckpointWrapper"}
)


def is_wrapper(module: nn.Module) -> bool:
    # By class name, so that importing lora_vit never imports torch.distributed (absent on some builds).
    return type(module).__name__ in _WRAPPER_TYPES


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP, DataParallel, FSDP or ``torch.compile`` wrappers (itself if none).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> unwrap_model(nn.DataParallel(net)) is net
        True
    """
    while (inner := unwrap_one(model)) is not model:
        model = inner
    return model


def clean_name(name: str) -> str:
    """``name`` without the segments that nested wrappers insert (``blocks.0._fsdp_wrapped_module.attn``)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


_SYNCING = frozenset({"DistributedDataParallel", "FullyShardedDataParallel", "DataParallel"})


def check_not_wrapped(model: nn.Module, action: str) -> None:
    """Refuse to add modules under a DDP/FSDP/DataParallel wrapper, which would never see their parameters.

    The whole chain of wrappers is checked (``torch.compile(DDP(model))`` too); a
    ``torch.compile`` or checkpoint wrapper alone is fine, since it reads the inner model's
    modules on every call.

    Raises:
        LoRAError: If ``model`` is, or wraps, such a wrapper.
    """
    current = model
    while True:
        if type(current).__name__ in _SYNCING:
            raise LoRAError(
                f"cannot {action} a {type(current).__name__}-wrapped model: the wrapper has already registered"
                " its parameters, so new adapters would not be synchronised. Inject (or load_lora) into the"
                " plain model first, then wrap it (see docs/distributed.md)"
            )
        inner = unwrap_one(current)
        if inner is current:
            return
        current = inner


def unwrap_one(model: nn.Module) -> nn.Module:
    """The module directly inside one wrapper (``model`` itself if it is not a wrapper)."""
    if not is_wrapper(model):
        return model
    inner = getattr(model, "_orig_mod", None)
    if not isinstance(inner, nn.Module):
        inner = getattr(model, "_fsdp_wrapped_module", None) or getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model
