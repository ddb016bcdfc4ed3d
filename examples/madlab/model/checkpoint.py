"""Model files: LoRA runs go through ``lora_vit.save_lora``; the other strategies use plain safetensors.

Both carry the full training config, the backbone's location and fingerprint and the dev
threshold, so ``test`` rebuilds the model from the file alone. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lora_vit import LoRAError, load_lora, read_lora_metadata, save_lora

from ..io.errors import MadlabError
from ..io.files import write_atomically

__all__ = ["CheckpointError", "load_weights", "read_metadata", "save_model"]

_KEY = "madlab"  # metadata key of non-LoRA files


class CheckpointError(MadlabError):
    """A model file that cannot be used; the message names the file."""


def save_model(model: nn.Module, path: Path, metadata: dict[str, Any], use_lora: bool, head_only: bool) -> Path:
    """Save what training changed.

    LoRA: adapters and head through ``save_lora`` with ``metadata``. Otherwise the head
    alone (linear probe) or the whole model state, in a safetensors file whose metadata
    holds the same dictionary.
    """
    if use_lora:
        return save_lora(model, path, metadata=metadata)
    module = model.head if head_only else model
    prefix = "head." if head_only else ""
    state = {prefix + k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    meta = {_KEY: json.dumps(metadata), "head_only": json.dumps(head_only)}
    write_atomically(path, safetensors_bytes(state, metadata=meta))
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata dictionary of a model file of either kind.

    Raises:
        CheckpointError: If the file is missing or is neither kind.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {str(path)!r} does not exist")
    try:
        return read_lora_metadata(path)
    except LoRAError as lora_err:
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{str(path)!r} is not a readable safetensors model file: {err}") from None
        if _KEY not in header:
            raise CheckpointError(
                f"{str(path)!r} is neither a lora-vit adapter file nor a madlab model file: {lora_err}") from None
        return _json_field(header, _KEY, dict, path)


def _json_field(header: dict[str, str], key: str, kind: type, path: Path) -> Any:
    """The JSON value stored under ``key`` in a file's metadata, which must be a ``kind``.

    Raises:
        CheckpointError: Naming the file and the field, if it is not valid JSON or not a ``kind``.
    """
    try:
        value = json.loads(header[key])
    except ValueError as err:
        raise CheckpointError(
            f"{str(path)!r} has malformed metadata: field {key!r} is not valid JSON ({err})") from None
    if not isinstance(value, kind):
        raise CheckpointError(f"{str(path)!r} has malformed metadata: field {key!r} must hold a JSON"
                              f" {'object' if kind is dict else kind.__name__}, got {type(value).__name__}")
    return value


def load_weights(model: nn.Module, path: Path, use_lora: bool) -> nn.Module:
    """Put a file's weights into a freshly built detector (LoRA: re-injected from the file)."""
    if use_lora:
        try:
            return load_lora(model, path)
        except LoRAError as err:
            raise CheckpointError(f"cannot load {str(path)!r} onto this backbone: {err}") from None
    with safe_open(str(path), framework="pt") as handle:
        head_only = _json_field({"head_only": "false", **(handle.metadata() or {})}, "head_only", bool, path)
    state = safetensors_load(path.read_bytes())
    try:
        if head_only:
            model.head.load_state_dict({k.removeprefix("head."): v for k, v in state.items()}, strict=True)
        else:
            model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{str(path)!r} does not fit this backbone: {err}") from None
    return model
