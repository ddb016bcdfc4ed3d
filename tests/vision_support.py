"""Import torchvision and open_clip's ``transformer`` module for the tests, or skip.

Where they come from: an environment where torchvision imports normally, or else the folder
``.vision-packages`` at the repository root, where the README's test command installs them
(``pip install --no-deps --target .vision-packages torchvision==0.28.0 open_clip_torch==3.3.0``).
They are kept out of the virtual environment on purpose: a torchvision that cannot import
breaks ``transformers``' ViT import in every process that has not applied the workaround
below (the example's subprocesses, users' scripts), so only the tests that need it put that
folder on ``sys.path``.

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
from pathlib import Path

import pytest
import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None
PACKAGES = Path(__file__).resolve().parents[1] / ".vision-packages"


def _find(name: str):
    """The import spec of ``name``, looking in ``.vision-packages`` too (added to ``sys.path`` if used)."""
    spec = importlib.util.find_spec(name)
    if spec is None and PACKAGES.is_dir() and str(PACKAGES) not in sys.path:
        sys.path.append(str(PACKAGES))
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(name)
    return spec


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
    if _find("torchvision") is None:
        pytest.skip("torchvision is not installed (see README's test command and tests/vision_support.py)")
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
    spec = _find("open_clip") if "open_clip" not in sys.modules else None
    if spec is None and "open_clip" not in sys.modules:
        pytest.skip("open_clip_torch is not installed (see README's test command and tests/vision_support.py)")
    import_torchvision()
    if "open_clip" not in sys.modules:
        # The package without its __init__ (which imports the tokenizers' dependencies).
        package = types.ModuleType("open_clip")
        package.__path__ = list(spec.submodule_search_locations)  # type: ignore[union-attr]
        package.__spec__ = spec
        sys.modules["open_clip"] = package
    import open_clip.transformer

    return open_clip.transformer
