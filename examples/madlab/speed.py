"""How fast the detector runs: precision (autocast) and ``torch.compile``, chosen per device.

``precision="auto"`` and ``compile=None`` mean: bf16 autocast and a compiled detector on
CUDA (tensor cores and fused kernels), fp32 and eager on CPU. There, interleaved
micro-benchmarks measured bf16 slower than fp32, and a compiled step faster but only after
tens of seconds of compiling, more than a run of a few hundred steps saves
(examples/README.md, "Speed").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .config import Config

__all__ = ["autocast", "compiled", "resolve_compile", "resolve_precision"]


def resolve_precision(config: Config, device: torch.device) -> str:
    """``"fp32"`` or ``"bf16"``: the config's choice, or the device's default for ``"auto"``."""
    if config.precision != "auto":
        return config.precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def resolve_compile(config: Config, device: torch.device) -> bool:
    """Whether to ``torch.compile`` the detector: the config's choice, else only on CUDA."""
    return config.compile if config.compile is not None else device.type == "cuda"


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """bf16 autocast for ``"bf16"`` (matrix products in bf16, reductions and the loss in fp32); nothing for fp32."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def compiled(model: nn.Module, on: bool) -> nn.Module:
    """``torch.compile(model)`` when ``on`` (the LoRA layers' fused path), else ``model``.

    The compiled module shares the parameters of ``model``, so saving, loading and
    checkpoint selection keep working on ``model`` itself.
    """
    return torch.compile(model) if on else model
