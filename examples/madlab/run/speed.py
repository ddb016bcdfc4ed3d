"""How fast the detector runs: precision (autocast) and ``torch.compile``, chosen per device.

``precision="auto"`` and ``compile=None`` mean: bf16 autocast and a compiled detector on
CUDA (tensor cores and fused kernels); on CPU eager, and bf16 only for a backbone of ViT-B
width or more on a CPU with AMX-bf16 matrix units, fp32 otherwise. Measured on an AMX Xeon
(examples/README.md, "Speed"): a ViT-B/16 step ran 2.16x faster in bf16, while the tiny
default model and a ViT-Ti ran 1.3-1.6x slower (too little matrix work per element cast);
without AMX, CPU bf16 matmuls are emulated and slower. A compiled CPU step is faster but
only after tens of seconds of compiling, more than a run of a few hundred steps saves.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..io.config import Config
from ..model.named import is_small_vit

__all__ = [
    "CPU_BF16_MIN_WIDTH",
    "autocast",
    "available_cores",
    "compiled",
    "cpu_has_amx_bf16",
    "inductor_options",
    "resolve_compile",
    "resolve_precision",
    "threads",
]


# Narrowest backbone (feature width) measured faster in bf16 than fp32 on an AMX CPU: ViT-B.
CPU_BF16_MIN_WIDTH = 768


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """Whether this CPU advertises AMX bf16 matrix units (Linux ``/proc/cpuinfo``; False elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and "amx_bf16" in line.split() for line in text.splitlines())


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, not the whole machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS/Windows have no affinity masks
        return os.cpu_count() or 1


def threads(config: Config) -> int:
    """``num_threads``, else one for the small MAE ViT, else every available core."""
    if config.num_threads is not None:
        return config.num_threads
    return 1 if is_small_vit(config.backbone) else available_cores()


def resolve_precision(config: Config, device: torch.device, width: int | None = None) -> str:
    """``"fp32"`` or ``"bf16"``: the config's choice, or the device's default for ``"auto"``.

    Args:
        config: The run's config (``precision``).
        device: Where the detector runs.
        width: The backbone's feature width; on CPU, ``"auto"`` picks bf16 only from
            :data:`CPU_BF16_MIN_WIDTH` up and only with AMX-bf16 (see the module docstring).
    """
    if config.precision != "auto":
        return config.precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    wide = width is not None and width >= CPU_BF16_MIN_WIDTH
    return "bf16" if device.type == "cpu" and wide and cpu_has_amx_bf16() else "fp32"


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
    return torch.compile(model, options=inductor_options()) if on else model


# ATen's CPU capability -> the vector width (bits) Inductor generates C++ for; 1 = scalar code.
_X86_VECTOR_BITS = {"AVX512": 512, "AVX2": 256, "DEFAULT": 1}


def inductor_options() -> dict[str, int]:
    """Compile options that name the CPU vector width, so that Inductor's graph cache keys on it.

    torch 2.13's FX graph cache leaves the width out of its key: a graph cached by a process
    that generated AVX-512 loops (16 floats a step) is served to one that compiles its kernels
    for AVX2 (8 floats a vector), whose loads and stores then run past their buffers (NaN
    outputs, or glibc aborting on a corrupt heap). That happens when ``ATEN_CPU_CAPABILITY``
    differs between runs or a cache folder is shared by machines of both kinds. Naming the
    width Inductor would pick anyway puts it into the key; the generated code is unchanged.
    Only on x86, whose capabilities map to widths one to one (elsewhere: no options).
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        return {}
    bits = _X86_VECTOR_BITS.get(torch.backends.cpu.get_cpu_capability())
    return {} if bits is None else {"cpp.simdlen": bits}
