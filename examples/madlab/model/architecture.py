"""A backbone's architecture as plain JSON, and the module rebuilt from it without its weights folder.

An exported detector (:mod:`.export`) carries its merged weights; to load them anywhere it
also needs the module they fit. For an HF transformers encoder that is its class and config;
for timm, the architecture name and the keyword arguments it was created with. Nothing here
is executed from the file: the class name must be one of the supported families' classes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from .families import HF_FAMILIES, BackboneError, BackboneSpec, import_timm

__all__ = ["build_backbone", "describe_backbone"]

_HF_CLASSES = frozenset({f.model_class for f in HF_FAMILIES.values()} | {"ViTModel"})


def describe_backbone(backbone: nn.Module, spec: BackboneSpec) -> dict[str, Any]:
    """What :func:`build_backbone` needs to make an untrained module of ``backbone``'s architecture."""
    if spec.family == "timm":
        return {"kind": "timm", "architecture": spec.source, "model_args": _timm_model_args(spec)}
    return {"kind": "transformers", "model_class": type(backbone).__name__,
            "config": json.loads(backbone.config.to_json_string(use_diff=False)),
            "pooling_layer": getattr(backbone, "pooler", None) is not None}


def _timm_model_args(spec: BackboneSpec) -> dict[str, Any]:
    args: dict[str, Any] = {}
    folder = Path(spec.weights or "")
    if spec.weights and folder.is_dir() and (folder / "config.json").is_file():
        args = dict(json.loads((folder / "config.json").read_text()).get("model_args") or {})
    return {**args, "num_classes": 0, "img_size": spec.image_size}


def build_backbone(description: dict[str, Any]) -> nn.Module:
    """An untrained module of the described architecture, in eval mode.

    Raises:
        BackboneError: For an unknown kind or class, or a config the class refuses.
    """
    kind = description.get("kind")
    if kind == "timm":
        timm = import_timm()
        try:
            model = timm.create_model(description["architecture"], pretrained=False, **description["model_args"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise BackboneError(f"timm cannot build {description.get('architecture')!r}: {err}") from None
        return model.eval()
    if kind != "transformers" or description.get("model_class") not in _HF_CLASSES:
        raise BackboneError(f"unknown backbone description {kind!r}/{description.get('model_class')!r};"
                            f" expected a timm model or one of {sorted(_HF_CLASSES)}")
    import transformers

    cls = getattr(transformers, description["model_class"])
    try:
        config = cls.config_class.from_dict(description["config"])
        kwargs = {} if description["model_class"] not in ("ViTModel", "DeiTModel") else {
            "add_pooling_layer": bool(description.get("pooling_layer"))}
        return cls(config, **kwargs).eval()
    except (ValueError, KeyError, TypeError) as err:
        raise BackboneError(f"cannot build a {description['model_class']} from the stored config: {err}") from None
