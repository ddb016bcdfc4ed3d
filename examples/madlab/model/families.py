"""The backbones users bring: local HF transformers folders of several families, and timm, offline.

Each loader returns the vision encoder and a :class:`BackboneSpec` that says everything the
rest of the example needs to know about it: its input size, its normalisation (read from the
folder's ``preprocessor_config.json`` or timm's pretrained config), which output is the image
feature, and what to load again at test time. The spec is stored in the model file, so
``test --model_path`` rebuilds the same backbone.

Supported, by ``model_type`` in the folder's ``config.json``:

* ``vit``, ``deit``, ``vit_mae`` (the encoder only, converted to a mask-free ``ViTModel``),
  ``dinov2``, ``dinov2_with_registers``: the CLS token of the last (layer-normed) hidden state;
* ``clip`` (the vision tower of a full CLIP folder; the text tower's weights are never
  loaded) and ``clip_vision_model``: the pooled output (post-LayerNorm CLS token);
* ``siglip`` / ``siglip2`` (vision tower of a full folder) and ``siglip_vision_model`` /
  ``siglip2_vision_model``: the pooled output of the attention-pooling head (no CLS token);
* ``timm:<architecture>`` with ``backbone_weights`` a ``.safetensors`` file or a folder in
  timm's hub layout (``config.json`` + ``model.safetensors``), or such a folder given directly
  as the backbone: timm's own pooled pre-logits feature (``num_classes=0``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.errors import MadlabError
from . import hub
from .hub import is_hub_id

__all__ = [
    "HF_FAMILIES",
    "BackboneError",
    "BackboneSpec",
    "encode",
    "final_modules",
    "import_timm",
    "load_backbone",
    "load_from_spec",
    "quiet_transformers",
    "transformer_blocks",
]

TIMM_PREFIX = "timm:"


class BackboneError(MadlabError):
    """A backbone that cannot be loaded; the message names the path and what was expected."""


@dataclass(frozen=True)
class _Family:
    model_class: str  # transformers class that holds the vision encoder
    feature: str  # "cls" (token 0 of last_hidden_state) or "pooled" (pooler_output)
    default_norm: str  # which transformers constants a folder without preprocessor_config.json gets
    interpolates: bool  # whether forward takes interpolate_pos_encoding=True


HF_FAMILIES: dict[str, _Family] = {
    "vit": _Family("ViTModel", "cls", "standard", True),
    "vit_mae": _Family("ViTMAEModel", "cls", "standard", True),
    "deit": _Family("DeiTModel", "cls", "imagenet", True),
    "dinov2": _Family("Dinov2Model", "cls", "imagenet", False),  # always interpolates
    "dinov2_with_registers": _Family("Dinov2WithRegistersModel", "cls", "imagenet", False),
    "clip": _Family("CLIPVisionModel", "pooled", "clip", True),
    "clip_vision_model": _Family("CLIPVisionModel", "pooled", "clip", True),
    "siglip": _Family("SiglipVisionModel", "pooled", "standard", True),
    "siglip_vision_model": _Family("SiglipVisionModel", "pooled", "standard", True),
    "siglip2": _Family("Siglip2VisionModel", "pooled", "standard", False),  # native resolution
    "siglip2_vision_model": _Family("Siglip2VisionModel", "pooled", "standard", False),
}
SUPPORTED = (*HF_FAMILIES, "timm:<architecture>")


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is and how to feed it.

    Attributes:
        family: A key of :data:`HF_FAMILIES`, or ``"timm"``.
        source: The HF folder, or the timm architecture name.
        weights: timm only: the ``.safetensors`` file or hub-layout folder.
        image_size: Square input side in pixels.
        mean: Per-channel normalisation mean (RGB, for pixels in [0, 1]).
        std: Per-channel normalisation std.
        feature: ``"cls"`` or ``"pooled"``.
        hidden_size: Width of the feature.
        hub_id: The Hugging Face hub id it was resolved from (``source`` is then the snapshot
            folder in the local cache), or ``None`` for a local folder.
        revision: The hub commit that snapshot holds, so a later run loads the same weights.
    """

    family: str
    source: str
    weights: str | None
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature: str
    hidden_size: int
    hub_id: str | None = None
    revision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BackboneSpec:
        return cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as err:
        raise BackboneError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise BackboneError(f"{path} should hold a JSON object")
    return value


def _check_folder(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise BackboneError(f"backbone folder {str(path)!r} does not exist")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise BackboneError(
            f"{str(path)!r} is not a checkpoint folder (it needs config.json and model.safetensors):"
            " an HF transformers folder such as a downloaded facebook/dinov2-small, or a timm hub folder"
        )
    return _read_json(path / "config.json")


def _default_norm(kind: str) -> tuple[list[float], list[float]]:
    from transformers.utils import constants as c

    table = {
        "standard": (c.IMAGENET_STANDARD_MEAN, c.IMAGENET_STANDARD_STD),
        "imagenet": (c.IMAGENET_DEFAULT_MEAN, c.IMAGENET_DEFAULT_STD),
        "clip": (c.OPENAI_CLIP_MEAN, c.OPENAI_CLIP_STD),
    }
    mean, std = table[kind]
    return list(mean), list(std)


def _triple(values: Any, what: str, path: Path) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        values = [values] * 3
    if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise BackboneError(f"{path}: {what} should be three finite numbers, got {values!r}")
    if what.endswith("std") and min(values) <= 0:
        raise BackboneError(f"{path}: {what} must be positive, got {values!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


def _side(value: Any) -> int | None:
    """An image side from a processor's ``size``/``crop_size`` entry (int or dict)."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for key in ("height", "shortest_edge", "width"):
            if isinstance(value.get(key), int):
                return int(value[key])
    return None


def _processor_settings(path: Path, family: _Family, config: Any) -> tuple[int, list[float], list[float]]:
    """Input side and normalisation from ``preprocessor_config.json`` (the family's defaults without one)."""
    mean, std = _default_norm(family.default_norm)
    side = None
    processor = path / "preprocessor_config.json"
    if processor.is_file():
        values = _read_json(processor)
        mean = values.get("image_mean", mean)
        std = values.get("image_std", std)
        # The crop is what the model sees (DINOv2: resize 256, crop 224; CLIP: resize 224, crop 224).
        side = _side(values.get("crop_size")) if values.get("do_center_crop", True) else None
        side = side or _side(values.get("size"))
        if family.model_class == "Siglip2VisionModel" and isinstance(values.get("max_num_patches"), int):
            side = math.isqrt(values["max_num_patches"]) * config.patch_size
    if side is None:
        if family.model_class == "Siglip2VisionModel":
            side = math.isqrt(config.num_patches) * config.patch_size
        else:
            side = int(config.image_size)
    return side, mean, std


def _vision_config(config: Any) -> Any:
    return getattr(config, "vision_config", None) or config


def _load_hf(path: Path, model_type: str, image_size: int | None) -> tuple[nn.Module, BackboneSpec]:
    import transformers

    family = HF_FAMILIES[model_type]
    cls = getattr(transformers, family.model_class)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if family.model_class in ("ViTModel", "DeiTModel"):
        kwargs["add_pooling_layer"] = False
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise BackboneError(f"could not load the {model_type!r} weights in {str(path)!r}: {err}") from None
    # transformers fills weights absent from the file with random values and only warns; a
    # detector on a partly random backbone would train and mean nothing, so refuse it.
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise BackboneError(f"{str(path)!r} lacks {len(missing)} weights of its {model_type!r} vision encoder,"
                            f" e.g. {missing[:3]}; it would run partly random")
    if model_type == "vit_mae":
        model = _mae_to_vit(model, path)
    config = _vision_config(model.config)
    side, mean, std = _processor_settings(path, family, config)
    if image_size is not None:
        side = _check_image_size(image_size, config.patch_size, model_type)
    elif side % config.patch_size:  # a processor size the patches do not tile: the model's own
        side = int(config.image_size)
    spec = BackboneSpec(model_type, str(path), None, int(side), _triple(mean, "image_mean", path),
                        _triple(std, "image_std", path), family.feature, int(config.hidden_size))
    return model.eval(), spec


def _check_image_size(size: int, patch: int, what: str) -> int:
    if size < patch or size % patch:
        raise BackboneError(f"image_size={size} must be a positive multiple of the {what} patch size {patch}")
    return size


def _mae_to_vit(mae: nn.Module, path: Path) -> nn.Module:
    """ViTMAE's encoder as a ``ViTModel``: the same weights without the random masking, which
    must never run when classifying (or when training the detector)."""
    from transformers import ViTConfig, ViTModel

    c = mae.config
    config = ViTConfig(
        image_size=c.image_size, patch_size=c.patch_size, num_channels=c.num_channels,
        hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps, qkv_bias=c.qkv_bias,
    )
    vit = ViTModel(config, add_pooling_layer=False)
    missing, unexpected = vit.load_state_dict(mae.state_dict(), strict=False)
    if missing or unexpected:
        raise BackboneError(
            f"the ViTMAE encoder in {str(path)!r} does not map onto a ViT: missing {missing[:5]},"
            f" unexpected {unexpected[:5]}"
        )
    return vit


def quiet_transformers() -> None:
    """transformers' load reports and progress bars off: a command prints its own summary."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a hard requirement of the example
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def import_timm():
    try:
        import timm
    except ImportError as err:
        raise BackboneError(f"timm backbones need timm (pip install timm): {err}") from None
    return timm


def _load_timm(architecture: str | None, weights: str | None, image_size: int | None) -> tuple[nn.Module, BackboneSpec]:
    if not weights:
        raise BackboneError(
            f"--backbone timm:{architecture} needs its weights, offline: set backbone_weights (or"
            " --backbone_weights) to a .safetensors file or a folder in timm's hub layout"
            " (config.json + model.safetensors)")
    where = Path(weights).expanduser().resolve()  # stored in the model file: test may run elsewhere
    overlay: dict[str, Any] = {}
    model_args: dict[str, Any] = {}
    if where.is_dir():
        config = _check_folder(where)
        if "architecture" not in config:
            raise BackboneError(f"{where / 'config.json'} has no 'architecture': not a timm hub folder")
        folder_arch = str(config["architecture"])
        if architecture and architecture.split(".")[0] != folder_arch.split(".")[0]:
            raise BackboneError(f"timm:{architecture} was asked for, but {str(where)!r} holds a {folder_arch!r}")
        architecture = architecture or folder_arch
        overlay = dict(config.get("pretrained_cfg") or {})
        model_args = dict(config.get("model_args") or {})
        file = where / "model.safetensors"
        if not file.is_file():
            raise BackboneError(f"timm hub folder {str(where)!r} has no model.safetensors")
    else:
        file = where
        if not file.is_file() or file.suffix != ".safetensors":
            raise BackboneError(f"timm weights {str(where)!r} should be a .safetensors file or a timm hub folder")
    assert architecture is not None
    timm = import_timm()
    model_args.update(num_classes=0)  # timm's pooled pre-logits feature, no classifier
    if image_size is not None:
        model_args["img_size"] = image_size
    try:
        model = timm.create_model(architecture, pretrained=True,
                                  # source "" (timm's own): "hf-hub" would go online instead of reading file
                                  pretrained_cfg_overlay={**overlay, "file": str(file), "source": ""}, **model_args)
    except RuntimeError as err:  # before the generic catch: a size mismatch is the usual one
        raise BackboneError(f"the weights in {str(file)!r} do not fit timm:{architecture}: {err}") from None
    except (ValueError, KeyError, TypeError, OSError) as err:
        names = "" if "Unknown model" not in str(err) else " (see timm.list_models())"
        raise BackboneError(f"timm could not build {architecture!r} from {str(file)!r}: {err}{names}") from None
    cfg = model.pretrained_cfg
    grid = getattr(getattr(model, "patch_embed", None), "img_size", None)
    side = image_size or (int(grid[-1]) if grid else int(cfg["input_size"][-1]))
    spec = BackboneSpec("timm", architecture, str(where), int(side), _triple(cfg["mean"], "mean", file),
                        _triple(cfg["std"], "std", file), "pooled", int(model.num_features))
    return model.eval(), spec


def load_backbone(source: str | os.PathLike[str], weights: str | None = None,
                  image_size: int | None = None) -> tuple[nn.Module, BackboneSpec]:
    """Load a backbone offline and describe it.

    Args:
        source: An HF transformers checkpoint folder, a timm hub folder, or
            ``timm:<architecture>``.
        weights: For ``timm:<architecture>``: a ``.safetensors`` file or a timm hub folder.
        image_size: Input side to use instead of the backbone's own (position embeddings are
            interpolated); a multiple of the patch size.

    Returns:
        The encoder in eval mode, and its :class:`BackboneSpec`.

    Raises:
        BackboneError: For a missing folder or file, an unsupported model type (naming the
            supported ones), weights that do not fit, or an invalid ``image_size``.
    """
    source = os.fspath(source)
    if is_hub_id(source):
        return _load_hub(source, None, image_size)
    if source.startswith(TIMM_PREFIX):
        architecture = source[len(TIMM_PREFIX):].strip()
        if not architecture:
            raise BackboneError("--backbone timm: needs an architecture, e.g. timm:vit_small_patch14_dinov2.lvd142m")
        return _load_timm(architecture, weights, image_size)
    path = Path(source).expanduser()
    config = _check_folder(path)
    model_type = config.get("model_type")
    if model_type is None and "architecture" in config:  # timm's hub layout given directly
        return _load_timm(None, str(path), image_size)
    if model_type not in HF_FAMILIES:
        raise BackboneError(
            f"{str(path)!r} holds a {model_type!r} model; supported: {', '.join(SUPPORTED)}")
    return _load_hf(path, model_type, image_size)


def _load_hub(repo_id: str, revision: str | None, image_size: int | None) -> tuple[nn.Module, BackboneSpec]:
    """A hub id, resolved through the Hugging Face cache (:mod:`.hub`), loaded as its folder;
    the spec records the id and the commit."""
    folder, commit = hub.resolve(repo_id, revision)
    model, spec = load_backbone(str(folder), None, image_size)
    return model, replace(spec, hub_id=repo_id, revision=commit)


def load_from_spec(spec: BackboneSpec, source: str | None = None) -> tuple[nn.Module, BackboneSpec]:
    """Rebuild the backbone a model file was trained on, from its stored spec.

    Args:
        spec: As stored by training.
        source: Where the folder (or timm weights) is now, if it moved.
    """
    size = spec.image_size
    if spec.hub_id and source is None:  # the same commit, from this machine's cache
        return _load_hub(spec.hub_id, spec.revision, size)
    if spec.family == "timm":
        return load_backbone(TIMM_PREFIX + spec.source, source or spec.weights, size)
    return load_backbone(source or spec.source, None, size)


# --------------------------------------------------------------------------- using it


def encode(backbone: nn.Module, spec: BackboneSpec, pixels: torch.Tensor) -> torch.Tensor:
    """``B x hidden_size`` features of normalised ``B x 3 x S x S`` images, as the spec says."""
    if spec.family == "timm":
        return backbone(pixels)  # num_classes=0: timm's own pooling, pre-logits
    if spec.family.startswith("siglip2"):
        out = backbone(**siglip2_inputs(pixels, backbone.config.patch_size))
    elif HF_FAMILIES[spec.family].interpolates:
        out = backbone(pixel_values=pixels, interpolate_pos_encoding=True)
    else:
        out = backbone(pixel_values=pixels)
    return out.pooler_output if spec.feature == "pooled" else out.last_hidden_state[:, 0]


def siglip2_inputs(pixels: torch.Tensor, patch: int) -> dict[str, torch.Tensor]:
    """SigLIP2 takes flattened patches (``B x N x p*p*3``, channels last within a patch, rows
    first, as its image processor makes them), a patch mask and each image's patch grid."""
    b, c, h, w = pixels.shape
    rows, cols = h // patch, w // patch
    patches = pixels.reshape(b, c, rows, patch, cols, patch).permute(0, 2, 4, 3, 5, 1)
    return {
        "pixel_values": patches.reshape(b, rows * cols, patch * patch * c),
        "pixel_attention_mask": torch.ones(b, rows * cols, dtype=torch.long, device=pixels.device),
        "spatial_shapes": torch.tensor([[rows, cols]] * b, dtype=torch.long, device=pixels.device),
    }


def transformer_blocks(backbone: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (``encoder.layer``, ``encoder.layers``, ``layers``, timm ``blocks``)."""
    for path in ("encoder.layer", "encoder.layers", "layers", "layer", "blocks", "vision_model.encoder.layers"):
        module: Any = backbone
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList) and len(module):
            return module
    if isinstance(getattr(backbone, "blocks", None), nn.Sequential):  # timm keeps blocks in a Sequential
        return nn.ModuleList(list(backbone.blocks))
    raise BackboneError(f"cannot find the transformer blocks of {type(backbone).__name__}")


def final_modules(backbone: nn.Module) -> list[nn.Module]:
    """What follows the blocks: final norms and pooling heads (trained with the last blocks)."""
    names = ("layernorm", "post_layernorm", "norm", "fc_norm", "attn_pool")
    found = [getattr(backbone, n) for n in names if isinstance(getattr(backbone, n, None), nn.Module)]
    head = getattr(backbone, "head", None)
    # SigLIP's attention-pooling head; timm's classifier is called head too, but is empty here.
    if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
        found.append(head)
    return found
