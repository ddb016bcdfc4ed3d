"""Import torchvision and open_clip's ``transformer`` module for the tests, or skip.

The torchvision wheel on PyPI is built against CUDA torch; with the CPU ``torch==2.13.0`` its
C++ extension does not load, and its Python side then fails at import time registering fake
kernels for ``torchvision::nms`` and ``torchvision::qnms``, operators that would have come from
that extension. Defining those two schemas (no kernels) first lets ``import torchvision``
succeed; the models used here (``vit_b_16``) never call them, and any call would raise
"no kernel". ``tests/conftest.py`` calls :func:`define_missing_torchvision_ops` before any test
imports torchvision (transformers and timm import it when it is installed).

open_clip's package ``__init__`` imports its tokenizers (``ftfy``, ``regex``), which the tests
do not need; :func:`import_open_clip_transformer` loads only ``open_clip.transformer`` (which
needs torchvision and numpy) without running the package ``__init__``.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None


def define_missing_torchvision_ops() -> None:
    """Define the torchvision operator schemas its import needs, if torchvision's extension lacks them."""
    global _library
    if _library is not None or importlib.util.find_spec("torchvision") is None:
        return
    missing = [name for name in _SCHEMAS if not _has_op(name)]
    if not missing:
        return
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _library.define(_SCHEMAS[name])


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def import_torchvision():
    """The torchvision module, or a pytest skip when it is not installed or does not import."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (pip install --no-deps torchvision, see README)")
    define_missing_torchvision_ops()
    try:
        import torchvision
    except (ImportError, RuntimeError) as err:  # pragma: no cover - depends on the wheel
        pytest.skip(f"torchvision does not import here: {err}")
    return torchvision


def import_open_clip_transformer():
    """``open_clip.transformer``, or a pytest skip when open_clip is not installed."""
    if "open_clip.transformer" in sys.modules:
        return sys.modules["open_clip.transformer"]
    spec = importlib.util.find_spec("open_clip") if "open_clip" not in sys.modules else None
    if spec is None and "open_clip" not in sys.modules:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch, see README)")
    import_torchvision()
    if "open_clip" not in sys.modules:
        # The package without its __init__ (which imports the tokenizers' dependencies).
        package = types.ModuleType("open_clip")
        package.__path__ = list(spec.submodule_search_locations)  # type: ignore[union-attr]
        package.__spec__ = spec
        sys.modules["open_clip"] = package
    import open_clip.transformer

    return open_clip.transformer
