"""Import timm for the tests without torchvision.

timm imports torchvision at import time (``FrozenBatchNorm2d``, data transforms), but nothing
in the models used here (ViT, DeiT, EVA, BEiT built with ``pretrained=False``) calls it. The
torchvision wheel that ``pip install timm`` pulls is built for CUDA torch and does not import
with the CPU torch (``operator torchvision::nms does not exist``), which then also breaks
transformers' ViT import. So the test setup installs timm with ``--no-deps`` (see README) and,
when torchvision is absent, imports timm once with placeholder ``torchvision`` modules that are
removed again right after: nothing else in the process ever sees them. Any use of a placeholder
raises, so a test cannot silently depend on one.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import pytest


class _Placeholder:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, item: str) -> _Placeholder:
        if item.startswith("__"):
            raise AttributeError(item)
        return _Placeholder(f"{self._name}.{item}")

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{self._name} needs torchvision, which the test environment leaves out")

    def __mro_entries__(self, bases: tuple) -> tuple:
        return (object,)  # timm subclasses torchvision classes at import time


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def module_getattr(item: str, _prefix: str = spec.name) -> _Placeholder:
            if item.startswith("__"):
                raise AttributeError(item)
            return _Placeholder(f"{_prefix}.{item}")

        module.__getattr__ = module_getattr  # type: ignore[method-assign]
        return module

    def exec_module(self, module):
        pass


def import_timm():
    """The timm module, or a pytest skip when timm is not installed."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install --no-deps timm, see README)", allow_module_level=True)
    if importlib.util.find_spec("torchvision") is not None:
        import timm

        return timm
    finder = _PlaceholderFinder()
    sys.meta_path.insert(0, finder)
    try:
        import timm
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    return timm
