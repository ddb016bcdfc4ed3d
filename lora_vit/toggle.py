"""`disable_lora`: the base model's outputs with the adapters left in place, for a while."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .errors import LoRAError
from .registry import lora_modules

__all__ = ["disable_lora"]


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes exactly what its base model computes.

    Every adapted layer computes its base layer's function (``F.linear`` with the base weight;
    an adapted ``nn.MultiheadAttention`` runs PyTorch's own attention with its base weights),
    bit for bit on every CPU: the weights are presented as trainable or frozen as they were when
    the layer was adapted, since ATen picks its kernels by that (see
    :func:`lora_vit.functional.as_base_weight`). The adapters stay in place, trainable and
    untouched: for comparing against the base, or computing a frozen teacher's features in
    self-distillation. On leaving the block, by the
    end of it or by an exception, every layer gets back exactly the state it had on entering,
    so nested blocks (and layers disabled by an outer block) come out as they went in.

    Under ``torch.compile`` the disabled state is guarded like any module attribute: the first
    disabled call compiles one more graph (no graph break), and both graphs are reused after.

    Args:
        model: A model with adapters (a DDP, DataParallel, FSDP or ``torch.compile`` wrapper is
            seen through), or a single adapted layer.

    Yields:
        ``model`` itself.

    Raises:
        LoRAError: If ``model`` has no adapters.

    Example:
        >>> import copy, torch
        >>> from lora_vit import inject_lora
        >>> base = nn.Sequential(nn.Linear(4, 4))
        >>> model = inject_lora(copy.deepcopy(base), ["0"], r=2, dropout=0.0)
        >>> _ = torch.nn.init.ones_(model[0].lora_B)
        >>> x = torch.randn(2, 4)
        >>> with disable_lora(model):
        ...     torch.equal(model(x), base(x))
        True
        >>> torch.equal(model(x), base(x))
        False
    """
    layers = list(lora_modules(model).values())
    if not layers:
        raise LoRAError(f"{type(model).__name__} has no LoRA adapters to disable")
    previous = [(layer, layer.__dict__.get("_lora_disabled")) for layer in layers]
    try:
        for layer in layers:
            setattr(layer, "_lora_disabled", True)  # noqa: B010 (a plain attribute, not a submodule)
        yield model
    finally:
        for layer, state in previous:
            if state is None:
                layer.__dict__.pop("_lora_disabled", None)  # back to the class default
            else:
                setattr(layer, "_lora_disabled", state)  # noqa: B010
