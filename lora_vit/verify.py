"""`verify_lora`: prove every adapter is on the forward path by perturbing it and watching the output."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .errors import LoRAError
from .lowrank import AdapterView
from .registry import adapter_views, choice, choose_adapter, resolve_adapter, restore_choice

__all__ = ["verify_lora"]

_SEED = 20240531


def _tensors(output: Any) -> list[Tensor]:
    """Every floating-point tensor in a model output (tensor, tuple, list, dict or ModelOutput)."""
    if isinstance(output, Tensor):
        return [output.detach()] if output.is_floating_point() or output.is_complex() else []
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in _tensors(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in _tensors(value)]
    return []


def _difference(a: list[Tensor], b: list[Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")  # the output's structure itself changed
    diffs = [(x.float() - y.float()).abs().nan_to_num(nan=float("inf")).max().item() for x, y in zip(a, b) if x.numel()]
    return max(diffs, default=0.0)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``eval()`` for the duration (no dropout noise), then each module's own mode back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def _perturbation(layer: AdapterView, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """New ``(A, B)`` for one slice whose update has the RMS of the rows it adapts (at least 1e-2).

    So large a change cannot vanish in rounding; an adapter whose output still does not move
    is not being computed at all.
    """
    s = layer.slices[index]
    a = torch.randn(s.r, layer.in_features, generator=generator)
    b = torch.randn(s.rows, s.r, generator=generator)
    delta = layer.scalings[index] * (b @ a)
    target = max(layer.weight.detach()[s.start : s.stop].float().pow(2).mean().sqrt().item(), 1e-2)
    b = b * (target / delta.pow(2).mean().sqrt().clamp_min(1e-30).item())
    like = getattr(layer, s.a_name)
    return a.to(like.device, like.dtype), b.to(like.device, like.dtype)


def verify_lora(
    model: nn.Module, *example_inputs: Any, adapter: str | None = None, **example_kwargs: Any
) -> dict[str, float]:
    """Check that every adapter changes the model's output, i.e. sits on the forward path.

    Each adapter (each slice of a fused projection separately) is replaced by a large random
    update in turn, the model is run on the example inputs in eval mode with a fixed random
    seed (so models that sample, such as MAE masking, compare like with like), and the change
    of every floating-point output tensor is measured against two unperturbed runs. An adapter
    whose perturbation changes nothing is off the forward path: typically its parent reads
    ``layer.weight`` with ``F.linear`` instead of calling the layer. Afterwards every adapter
    tensor, each module's train/eval mode and the global random state are restored exactly.

    Args:
        model: A model with LoRA adapters (from :func:`inject_lora` or :func:`load_lora`).
        *example_inputs: Positional inputs for ``model(...)``, e.g. an image batch
            ``(batch, channels, height, width)``.
        adapter: Which named adapter to verify (it runs for the duration); may be omitted
            when the model holds one.
        **example_kwargs: Keyword inputs for ``model(...)``, e.g. ``pixel_values=...``.

    Returns:
        For each adapter (``"layer"`` or ``"layer[slice]"``), the largest absolute change in
        any output element that its perturbation caused.

    Raises:
        LoRAError: If the model has no adapters (or several and ``adapter`` is omitted),
            produces no floating-point output, produces NaN or Inf on the example inputs
            (nothing can be compared then), or some adapters do not change the output; the
            message names them and says why.

    Example:
        >>> import torch.nn.functional as F
        >>> from lora_vit import inject_lora
        >>> class ReadsWeight(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.called, self.read = nn.Linear(4, 4), nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return self.called(x) + F.linear(x, self.read.weight, self.read.bias)
        >>> model = inject_lora(ReadsWeight(), ["called", "read"], r=2)
        >>> try:
        ...     verify_lora(model, torch.randn(2, 4))
        ... except LoRAError as err:
        ...     print(str(err).splitlines()[0])
        1 of 2 LoRA adapters do not change the output of ReadsWeight: ['read']
    """
    name = resolve_adapter(model, adapter, "verify")
    layers = adapter_views(model, name)
    chosen = choice(model)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})

    def run() -> list[Tensor]:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(_SEED)
            return _tensors(model(*example_inputs, **example_kwargs))

    generator = torch.Generator().manual_seed(_SEED)
    choose_adapter(model, name)
    try:
        with _evaluating(model):
            changes = _changes(model, layers, run, generator)
    finally:
        restore_choice(model, chosen)
    return _report(model, changes)


_NOISE = "<run-to-run noise>"  # not a module name: a standalone layer is named ""


def _changes(
    model: nn.Module, layers: Mapping[str, AdapterView], run: Callable[[], list[Tensor]], generator: torch.Generator
) -> dict[str, float]:
    """The output change each adapter's perturbation causes, every tensor restored after."""
    changes: dict[str, float] = {}
    reference = run()
    if not reference:
        raise LoRAError(f"{type(model).__name__} returned no floating-point tensor to compare")
    if not all(bool(torch.isfinite(t).all()) for t in reference):
        raise LoRAError(
            f"{type(model).__name__} returns NaN or Inf on the example inputs, so no change can be"
            " measured; verify with inputs on which the model's output is finite"
        )
    # Nondeterministic kernels (some CUDA reductions) make two identical runs differ a little.
    noise = _difference(reference, run())
    changes[_NOISE] = noise  # the run-to-run noise, for _report
    for name, layer in layers.items():
        for index, s in enumerate(layer.slices):
            a_param, b_param = getattr(layer, s.a_name), getattr(layer, s.b_name)
            saved = (a_param.detach().clone(), b_param.detach().clone())
            a_new, b_new = _perturbation(layer, index, generator)
            try:
                with torch.no_grad():
                    a_param.copy_(a_new)
                    b_param.copy_(b_new)
                changes[f"{name}[{s.name}]" if s.name else name] = _difference(reference, run())
            finally:
                with torch.no_grad():
                    a_param.copy_(saved[0])
                    b_param.copy_(saved[1])
    return changes


def _report(model: nn.Module, changes: dict[str, float]) -> dict[str, float]:
    """``changes`` if every adapter moved the output.

    Raises:
        LoRAError: Naming the adapters that did not.
    """
    noise = changes.pop(_NOISE, 0.0)
    inert = [key for key, change in changes.items() if change <= 10 * noise]
    if inert:
        raise LoRAError(
            f"{len(inert)} of {len(changes)} LoRA adapters do not change the output of"
            f" {type(model).__name__}: {inert}\n"
            "A large random change to each of them left every output element the same, so the"
            " model never uses what they compute: their parent most likely reads `layer.weight`"
            " directly (F.linear(x, layer.weight, ...)) instead of calling the layer, or their"
            " output does not reach the model's output for these inputs. Adapt other layers, call"
            " the layer in the parent's forward, or merge (merge_lora) before running such code."
        )
    return changes
