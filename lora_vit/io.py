"""Adapter files: one self-describing ``.safetensors`` file, written atomically, never unpickled."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from . import fingerprint
from ._version import __version__
from .errors import LoRAError
from .loading import load_adapters
from .lowrank import AdapterView
from .registry import adapter_names, adapter_views, resolve_adapter, trainable_modules
from .spec import DEFAULT_ADAPTER, AdapterSpec, check_adapter_name
from .state import lora_state_dict

__all__ = ["FORMAT", "load_lora", "read_lora_metadata", "save_lora", "write_atomically"]

FORMAT = "lora_vit"
_FORMAT_VERSION = "1"


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp makes the file private (0600); give it the mode a plain open() would have.
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_current_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable where the platform allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def save_lora(
    model: nn.Module,
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
    *,
    adapter: str | None = None,
) -> Path:
    """Save one adapter (and the trainable modules) of ``model`` to one ``.safetensors`` file.

    The file's metadata records the format, the library version, each adapted layer's base
    shape, slices, ranks, alphas and dropout, the trainable module names, and a fingerprint
    of each adapted layer's base weight (a few sampled values, see
    :mod:`lora_vit.fingerprint`), so :func:`load_lora` can rebuild the adapters on a fresh
    base model and refuse a different one. The write is atomic: an interrupted save leaves
    any previous file at ``path`` intact.

    A model wrapped in DDP or ``torch.compile`` saves exactly what the plain model would
    (no ``module.`` prefixes). Under DDP call it on one rank only; under FSDP, on rank 0
    inside ``FSDP.summon_full_params(model)`` (see ``docs/distributed.md``).

    Args:
        model: A model adapted by :func:`inject_lora`.
        path: Destination file; missing parent folders are created.
        metadata: Optional JSON-serialisable mapping with string keys (e.g. a training
            config), returned by :func:`read_lora_metadata`.
        adapter: Which named adapter to save (its name is recorded in the file); may be
            omitted when the model holds one. A model with several adapters saves each to its
            own file.

    Returns:
        The path written.

    Raises:
        LoRAError: If the model has no adapters, holds several and ``adapter`` is omitted,
            or ``metadata`` is not JSON-serialisable.
    """
    state = lora_state_dict(model, adapter=adapter)
    name = resolve_adapter(model, adapter, "save") if adapter_names(model) else DEFAULT_ADAPTER
    layers = adapter_views(model, name)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise LoRAError(f"metadata must be a mapping with string keys, got {metadata!r}")
    try:
        user = json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise LoRAError(f"metadata must be JSON-serialisable: {err}") from None
    header = {
        "format": FORMAT,
        "format_version": _FORMAT_VERSION,
        "lora_vit_version": __version__,
        "layers": json.dumps({name: layer.config() for name, layer in layers.items()}),
        "trainable": json.dumps(list(trainable_modules(model, name))),
        "base_fingerprint": json.dumps(
            {"method": fingerprint.METHOD, "layers": fingerprint.layer_fingerprints(layers)}
        ),
        "user": user,
        "adapter": name,
    }
    # Clones: safetensors refuses tensors that share storage (tied weights).
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    path = Path(path)
    write_atomically(path, safetensors_bytes(tensors, metadata=header))
    return path


def _read(path: str | os.PathLike[str], tensors_too: bool = True) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The file's metadata header and (unless ``tensors_too`` is False) its tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            keys = list(handle.keys()) if tensors_too else []
            tensors = {key: handle.get_tensor(key) for key in keys}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise LoRAError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    if header.get("format") != FORMAT:
        raise LoRAError(
            f"{str(path)!r} is not a lora-vit adapter file: its metadata has format"
            f" {header.get('format')!r}, expected {FORMAT!r}"
        )
    return header, tensors


def _json_field(header: Mapping[str, str], key: str, kind: type, path: object) -> Any:
    try:
        value = json.loads(header[key])
    except (KeyError, TypeError, ValueError):
        raise LoRAError(f"{str(path)!r}: metadata field {key!r} is missing or not valid JSON") from None
    if not isinstance(value, kind):
        raise LoRAError(f"{str(path)!r}: metadata field {key!r} should be a {kind.__name__}")
    return value


def _layer_config(name: str, config: object, path: object) -> dict[str, Any]:
    """Check the structure of one layer's recorded config (values are checked by its spec)."""
    return AdapterSpec.check_config(config, f"{str(path)!r}: the recorded config of layer {name!r}")


def read_lora_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``metadata`` mapping that :func:`save_lora` stored in an adapter file.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        LoRAError: If the file is not a readable lora-vit adapter file.
    """
    header, _ = _read(path, tensors_too=False)  # the header only: no tensor is read
    return _json_field(header, "user", dict, path)


def _recorded_fingerprints(header: Mapping[str, str], configs: Mapping[str, Any], path: object) -> dict[str, list]:
    """The file's base fingerprints by layer; empty for files written before they existed."""
    if "base_fingerprint" not in header:
        return {}
    record = _json_field(header, "base_fingerprint", dict, path)
    if record.get("method") != fingerprint.METHOD:
        raise LoRAError(
            f"{str(path)!r}: base fingerprint method {record.get('method')!r} is unknown to this version of"
            f" lora-vit (expected {fingerprint.METHOD!r}); pass check_base=False to load without checking"
        )
    layers = record.get("layers")
    ok = isinstance(layers, dict) and all(
        name in configs
        and isinstance(values, list)
        and len(values) == fingerprint.SAMPLES
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        for name, values in layers.items()
    )
    if not ok:
        raise LoRAError(f"{str(path)!r}: metadata field 'base_fingerprint' is malformed: {record!r}"[:500])
    return layers  # type: ignore[return-value]


def _check_base(recorded: Mapping[str, list], layers: Mapping[str, AdapterView], path: object) -> None:
    """Refuse base weights other than those the adapters were trained on.

    Raises:
        LoRAError: Naming the first layers that differ and how much, and how to override.
    """
    current = fingerprint.layer_fingerprints(layers)
    differ = {}
    for name, values in recorded.items():
        if name in current:
            gap = fingerprint.mismatch([float(v) for v in values], current[name])
            if gap is not None:
                differ[name] = gap
    if differ:
        shown = ", ".join(f"{name!r} (max relative difference {gap:.3g})" for name, gap in list(differ.items())[:3])
        raise LoRAError(
            f"{str(path)!r} was trained on other base weights than this model's: the base weight of"
            f" {len(differ)} of {len(recorded)} adapted layers differs from the recorded fingerprint, e.g. {shown}."
            " Load it onto the checkpoint it was trained on; if you are sure, pass check_base=False"
        )


def _check_trainable_overlap(trainable: list[str], configs: Mapping[str, Any], path: object) -> None:
    # A trainable module that contains an adapted layer would store that layer twice, with
    # keys from before injection; inject_lora never writes such a file.
    for name in trainable:
        inside = [layer for layer in configs if name == "" or layer == name or layer.startswith(name + ".")]
        if inside:
            raise LoRAError(
                f"{str(path)!r}: trainable module {name!r} contains adapted layers {inside[:3]};"
                " a module cannot be both adapted and fully trainable"
            )


def load_lora(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    adapter: str | None = None,
    check_base: bool = True,
    pad: bool = False,
) -> nn.Module:
    """Load an adapter file into ``model`` under a name, first injecting the adapter it describes if needed.

    The file is loaded as adapter ``adapter``, or under the name recorded in it (files written
    before names existed: ``"default"``). On a fresh base model the adapter is created from
    the file's metadata (no need to repeat ``inject_lora``'s arguments); on a model holding
    other adapters it is added beside them (the running adapter does not change); on a model
    that already has an adapter of that name, the file's values are swapped into it, which
    must have the file's layout (or ``pad``). Everything is validated before the model is
    touched, so a failed load leaves it unchanged.

    The file's base fingerprint (sampled values of each adapted layer's base weight, see
    :mod:`lora_vit.fingerprint`) must match the model's weights up to one bfloat16
    rounding, so an adapter is never silently evaluated on another backbone. This is an
    error rather than a warning because such a model runs and produces plausible but
    meaningless outputs. Files written before fingerprints existed load without the check.

    Args:
        model: The base model (or one already injected with the same layout). A DDP or
            ``torch.compile`` wrapper is accepted when the model already has the adapters;
            injecting must happen before wrapping.
        path: A file written by :func:`save_lora`.
        adapter: The name to load it under (default: the name recorded in the file).
        check_base: Compare the base fingerprint (default). ``False`` loads onto any base
            weights of the right shapes, e.g. to study an adapter's transfer on purpose.
        pad: Into a model already adapted on the same layers and slices with higher ranks
            (``inject_lora(..., r=R)`` with ``R`` the largest rank to swap in), load a file of
            lower ranks by zero-padding its factors and folding its scaling into ``B``: the
            same outputs, the model's modules and constants untouched, so a compiled model
            does not recompile. Ranks above the model's are an error.

    Returns:
        ``model``, adapted and loaded.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        LoRAError: If the file is not a lora-vit adapter, is corrupt, describes layers the
            model lacks or has with other shapes, holds missing, unexpected, mis-shaped
            or non-finite tensors (the message names the layer or tensor), or was trained on
            other base weights (``check_base``).
    """
    header, tensors = _read(path)
    layer_configs = _json_field(header, "layers", dict, path)
    trainable = _json_field(header, "trainable", list, path)
    if not all(isinstance(t, str) for t in trainable):
        raise LoRAError(f"{str(path)!r}: metadata field 'trainable' should list module names")
    configs = {name: _layer_config(name, cfg, path) for name, cfg in layer_configs.items()}
    _check_trainable_overlap(trainable, configs, path)
    recorded = _recorded_fingerprints(header, configs, path)
    if adapter is None:
        adapter = header.get("adapter", DEFAULT_ADAPTER)
    try:
        adapter = check_adapter_name(adapter)
    except LoRAError as err:
        raise LoRAError(f"{str(path)!r}: {err}") from None
    return load_adapters(
        model, configs, trainable, tensors, repr(str(path)), adapter=adapter,
        check_layers=(lambda layers: _check_base(recorded, layers, path)) if check_base else None, pad=pad,
    )
