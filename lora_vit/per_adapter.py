"""`AdapterModules`: a whole module (a classification head) trained per adapter.

``inject_lora(..., trainable=["head"], adapter=name)`` gives adapter ``name`` its own copy of
``head``. Once an adapter other than ``"default"`` owns a copy (or two adapters do), ``head``
is replaced by an :class:`AdapterModules` holding the untrained ``original`` (frozen) and one
copy per adapter in ``per_adapter``; it runs the copy of the running adapter, the original
where that adapter has none or for ``None`` (the base model), and, inside
:func:`lora_vit.adapter_per_sample`, each sample through its own adapter's copy. A module
trained only by the ``"default"`` adapter stays in place, as before names existed, so the keys
of single-adapter models and files do not change.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import LoRAError
from .mixed_batch import BATCH_FIRST, ROUTING_MISMATCH
from .routing import current_route

__all__ = ["AdapterModules", "fresh_copy", "module_signature"]

def fresh_copy(original: nn.Module) -> nn.Module:
    """A trainable deep copy of ``original`` (an adapter's own copy starts from the original)."""
    made = copy.deepcopy(original)
    for param in made.parameters():
        param.requires_grad_(True)
    return made


def module_signature(module: nn.Module) -> tuple:
    """What must agree for two copies' outputs to stack: their class and state shapes and dtypes."""
    return (type(module), *((k, tuple(v.shape), v.dtype) for k, v in module.state_dict().items()))


class AdapterModules(nn.Module):
    """One module of a model in one copy per adapter, plus the original for the base model.

    Args:
        original: The module as the base model has it; kept frozen, run for ``None`` and for
            adapters without a copy.

    Inside ``adapter_per_sample`` every copy that the mix could use (all copies whose state
    has the shapes of the used ones) runs on the whole batch and each sample's row is taken
    from its own adapter's copy, so a new mix of one batch size reuses one compiled graph.
    Copies with batch statistics (BatchNorm) therefore see the whole batch.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original.requires_grad_(False)
        self.per_adapter = nn.ModuleDict()
        self._lora_running: str | None = None

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self.per_adapter.keys())

    def set_active(self, name: str | None) -> None:
        """Run ``name``'s copy (the original where it has none, or for ``None``)."""
        self._lora_running = name if name is not None and name in self.per_adapter else None

    def running(self) -> nn.Module:
        name = self._lora_running
        return self.per_adapter[name] if name is not None else self.original

    def entries(self) -> list[nn.Module]:
        """The copies in adapter order, then the original: what routes index."""
        return [*self.per_adapter.values(), self.original]

    def route(self, names: Sequence[str | None], where: str) -> tuple[Tensor, tuple[int, ...]]:
        """Each sample's position in the group of entries to run, and that group (indices into :meth:`entries`).

        Raises:
            LoRAError: If the copies the mix uses have state of different shapes (their outputs
                could not be stacked), naming ``where`` and the adapters.
        """
        entries = self.entries()
        position = {name: i for i, name in enumerate(self.per_adapter)}
        base = len(position)
        index = [position.get(n, base) if n is not None else base for n in names]
        signatures = [module_signature(m) for m in entries]
        used = sorted(set(index))
        if len({signatures[j] for j in used}) > 1:
            label = [*self.per_adapter, "None (the original)"]
            shapes = {label[j]: [tuple(s[1]) for s in signatures[j][1:]] for j in used}
            raise LoRAError(
                f"adapter_per_sample cannot mix {where!r}: the copies of the adapters in the mix have state"
                f" of different shapes {shapes}, so their outputs cannot be stacked into one batch. Route"
                " samples with one output shape together, or use set_adapter for each"
            )
        group = tuple(j for j in range(len(entries)) if signatures[j] == signatures[used[0]])
        device = next((t.device for t in self.original.state_dict().values()), None)
        route = torch.tensor([group.index(j) for j in index], dtype=torch.long, device=device)
        return route, group

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        routed = current_route(self)
        if routed is None:
            return self.running()(*args, **kwargs)
        route, group = routed
        entries = self.entries()
        return pick_per_sample([entries[j](*args, **kwargs) for j in group], route)


def pick_per_sample(outputs: list[Any], route: Tensor) -> Tensor:
    """Row ``i`` of ``outputs[route[i]]`` for every sample ``i``: a chain of ``where`` (one fused loop compiled).

    Raises:
        LoRAError: If an output is not a tensor batched on dimension 0 like the route, or
            the outputs' shapes differ.
    """
    n = route.shape[0]
    first = outputs[0]
    for out in outputs:
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != n:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise LoRAError(
                f"{ROUTING_MISMATCH} {n} adapter names, but a per-adapter module returned {shape}: the names"
                f" must be as many as the batch {BATCH_FIRST}, and per-adapter modules must return one tensor"
            )
        if out.shape != first.shape:
            raise LoRAError(
                f"adapter_per_sample: the per-adapter copies returned shapes {tuple(first.shape)} and"
                f" {tuple(out.shape)}, which cannot be stacked into one batch"
            )
    if len(outputs) == 1:
        return first
    mask_shape = (n,) + (1,) * (first.dim() - 1)
    picked = first
    for j, out in enumerate(outputs[1:], start=1):
        picked = torch.where((route == j).view(mask_shape), out, picked)
    return picked
