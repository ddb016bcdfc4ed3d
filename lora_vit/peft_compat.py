"""PEFT interoperability: write and read PEFT's LoRA adapter folders, refusing what cannot map.

A PEFT LoRA folder is ``adapter_config.json`` plus ``adapter_model.safetensors`` whose keys are
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (and the full state of every
``modules_to_save`` module under ``base_model.model.<module>.<key>``). lora-vit's plain
(unsliced) :class:`LoRALinear` computes exactly PEFT's ``lora.Linear`` formula, so adapters
move both ways without changing outputs. DoRA (``use_dora: true``) on Linear layers maps too:
PEFT stores the magnitude as ``base_model.model.<module>.lora_magnitude_vector``; outputs agree
whenever dropout is inactive (eval, or ``lora_dropout`` 0). With dropout while training the two
differ in what is dropped: lora-vit drops only the LoRA branch's input, PEFT also feeds the
dropped input to its ``(m / norm - 1) W`` correction (an extra full matmul); both have the same
expectation. Everything PEFT can express that lora-vit cannot (trained biases, Conv/Embedding
LoRA, other PEFT methods, ...) is a :class:`LoRAError`, never a silent difference.
``nn.MultiheadAttention`` adapters move where both libraries compute the same function (one
pair over the whole in-projection, and an ``out_proj`` adapter of the same rank and alpha, read
the way PEFT 0.22.0 reads a folder's ``peft_version``). This module does not import ``peft``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from .errors import LoRAError
from .io import write_atomically
from .kinds import kind_of_peft
from .loading import load_adapters
from .lowrank import AdapterView
from .mha import LoRAMultiheadAttention, check_packed_kind
from .registry import adapter_names, adapter_views, find_module, resolve_adapter, trainable_modules, unwrap_model
from .spec import DEFAULT_ADAPTER, PEFT_MAGNITUDE, AdapterSpec, check_adapter_name
from .state import lora_state_dict

__all__ = ["PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME", "load_peft_adapter", "save_peft_adapter"]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."

# Config fields that only describe *which* modules PEFT adapts (the tensors in the file say that
# exactly), record provenance, or only matter while training: they never change the outputs.
_HARMLESS = {
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern",
    "alpha_pattern", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "modules_to_save", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
    "auto_mapping", "megatron_core", "megatron_config", "qalora_group_size", "ensure_weight_tying",
    "init_lora_weights", "loftq_config", "use_dora",
}
# Fields whose non-default value changes what the adapter computes; the value listed is the only
# one lora-vit can represent. Any *other* unknown field must be empty (None, False, {}, []).
_MUST_BE = {
    "bias": "none",
    "lora_bias": False,
    "fan_in_fan_out": False,
}
# init_lora_weights values that PEFT applies to the *base* weights when the adapter is created
# (PiSSA, OLoRA, LoftQ, CorDA, EVA rewrite W), so the folder alone does not reproduce the model.
_PLAIN_INITS = (True, False, "gaussian")


def _peft_key(name: str, factor: str) -> str:
    if factor == PEFT_MAGNITUDE:  # saved without PEFT's inner ``.weight``
        return f"{_PREFIX}{name}.{factor}"
    return f"{_PREFIX}{name}.{factor}.weight"


def _pattern_key(patterns: Mapping[str, Any], key: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of ``key`` as a regex."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


# PEFT's (experimental) MultiheadAttention LoRA adapts the whole packed in-projection with one
# pair (keys ``<mha>.lora_A/B``) and always out_proj too, with the same rank, alpha and dropout
# (keys ``<mha>.base_layer.out_proj.lora_A/B``). Before peft 0.22.0 its forward added the
# out_proj update twice; 0.22.0 adds it once and, loading a folder that an earlier release
# wrote, doubles that lora_B so the adapter keeps the outputs it was trained with. Both
# directions follow that rule, keyed by the folder's ``peft_version``.
_OUT_PROJ_APPLIED_ONCE_SINCE = "0.22.0"
_BASE_OUT_PROJ = ".base_layer.out_proj"


def _mha_parent(model: nn.Module, name: str) -> str | None:
    """The name of the LoRAMultiheadAttention whose ``out_proj`` ``name`` is, else None."""
    parent, _, child = name.rpartition(".")
    if child != "out_proj":
        return None
    return parent if isinstance(_module_or_none(model, parent), LoRAMultiheadAttention) else None


def _check_mha_exportable(model: nn.Module, layers: Mapping[str, AdapterView]) -> None:
    for name, layer in layers.items():
        parent = _mha_parent(model, name)
        if parent is not None and parent not in layers:
            raise LoRAError(
                f"{name!r} adapts an nn.MultiheadAttention's out_proj alone; PEFT's MultiheadAttention LoRA"
                " always adapts the in-projection too (target the attention module itself, or 'all-linear',"
                " with one rank), so it has no form for this; keep save_lora"
            )
        mha = layer.layer
        if not isinstance(mha, LoRAMultiheadAttention):
            continue
        if not layer.covers_all_rows or layer.slices[0].name:
            raise LoRAError(
                f"PEFT's MultiheadAttention LoRA adapts the whole in-projection with one pair; {name!r} has"
                f" {layer.describe()}. Adapt the attention module by name (e.g. '*.self_attention') to"
                " export, or keep save_lora"
            )
        inner = layers.get(name + ".out_proj")
        if inner is not None:
            ours, theirs = layer.spec.peft_fields(), inner.spec.peft_fields()
            differ = {key: (value, theirs.get(key)) for key, value in ours.items() if value != theirs.get(key)}
            if differ:
                raise LoRAError(
                    f"PEFT's MultiheadAttention LoRA gives the in-projection and out_proj of {name!r} one"
                    f" adapter setting, but they differ: {differ} (in-projection, out_proj); inject them"
                    " with one r and alpha to export, or keep save_lora"
                )


def _inner_out_projs(model: nn.Module, layers: Mapping[str, AdapterView]) -> set[str]:
    """The adapted ``out_proj`` layers that PEFT keeps inside an exported MultiheadAttention's adapter."""
    return {name for name in layers if _mha_parent(model, name) in layers}


def _peft_module_name(name: str, inner: set[str]) -> str:
    """Where PEFT keeps the factors of layer ``name`` (an inner out_proj under ``base_layer``)."""
    return name.removesuffix(".out_proj") + _BASE_OUT_PROJ if name in inner else name


def _check_exportable(model: nn.Module, layers: Mapping[str, AdapterView]) -> None:
    _check_mha_exportable(model, layers)
    sliced = [name for name, layer in layers.items() if not layer.covers_all_rows or layer.slices[0].name]
    if sliced:
        raise LoRAError(
            f"PEFT has no form for adapters on fused q/k/v slices, used by {sliced}; adapt whole"
            " layers (separate q_proj/k_proj/v_proj, or the literal fused layer name) to export to"
            " PEFT, or keep lora-vit's own format (save_lora)"
        )
    if len({layer.use_rslora for layer in layers.values()}) > 1:
        raise LoRAError(
            "PEFT has one use_rslora flag per adapter, but these layers mix both:"
            f" use_rslora on {[n for n, la in layers.items() if la.use_rslora]}"
        )
    kinds = {name: layer.kind.name for name, layer in layers.items()}
    if len(set(kinds.values())) > 1:
        raise LoRAError(f"PEFT has one kind per adapter (its use_dora flag), but these layers mix kinds: {kinds}")


def _config(model: nn.Module, layers: Mapping[str, AdapterView], adapter: str) -> dict[str, Any]:
    names = list(layers)
    fields = {name: layer.spec.peft_fields() for name, layer in layers.items()}
    ranks = {name: f["r"] for name, f in fields.items()}
    alphas = {name: f["lora_alpha"] for name, f in fields.items()}
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    # PEFT matches target_modules by suffix and patterns by regex suffix, so a name that ends
    # another adapted name could catch it; then spell every layer out, longest first.
    collide = any(a != b and a.endswith("." + b) for a in names for b in names)
    ordered = sorted(names, key=len, reverse=True)
    rank_pattern = {re.escape(n): ranks[n] for n in ordered if collide or ranks[n] != r}
    alpha_pattern = {re.escape(n): _number(alphas[n]) for n in ordered if collide or alphas[n] != alpha}
    all_names = [n for n, _ in model.named_modules() if n]
    suffix_clash = any(m not in layers and m.endswith("." + n) for m in all_names for n in names)
    target_modules: list[str] | str = (
        "|".join(re.escape(n) for n in ordered) if suffix_clash else sorted(names)
    )
    first = next(iter(layers.values()))
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _number(alpha),
        "lora_dropout": _most_common([f["lora_dropout"] for f in fields.values()]),
        "use_rslora": first.use_rslora,
        "target_modules": target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": list(trainable_modules(model, adapter)) or None,
        "bias": "none",
        **(first.kind.peft_fields() or {}),  # use_dora; a kind without a PEFT form was refused above
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }


def _number(value: float) -> int | float:
    """Whole alphas as ints, the way PEFT users write them."""
    return int(value) if float(value).is_integer() else value


def save_peft_adapter(model: nn.Module, directory: str | os.PathLike[str], *, adapter: str | None = None) -> Path:
    """Write the adapters of ``model`` as a PEFT LoRA folder.

    ``peft.PeftModel.from_pretrained(base, directory)`` then loads it onto the same base model
    and computes the same outputs (to float rounding). Module names are the model's own, so
    pass the model PEFT will wrap (e.g. the ``ViTForImageClassification``, not its ``.vit``).
    Whole modules made trainable by ``inject_lora(..., trainable=...)`` become
    ``modules_to_save``. Each file is written atomically. A model with ``nn.MultiheadAttention``
    adapters gets ``"peft_version": "0.22.0"``: PEFT before that release added an ``out_proj``
    update twice, so such a folder needs peft 0.22.0 or later.

    Args:
        model: A model adapted by :func:`inject_lora` (or loaded with :func:`load_lora`).
        directory: Folder to write ``adapter_config.json`` and ``adapter_model.safetensors``
            into; created if missing.
        adapter: Which named adapter to write; may be omitted when the model holds one.

    Returns:
        The folder written.

    Raises:
        LoRAError: If the model has no adapters, an adapter covers fused q/k/v slices (PEFT
            has no such form), layers mix ``use_rslora`` or ``use_dora`` settings, or an
            ``nn.MultiheadAttention``'s ``out_proj`` adapter is alone or set apart (rank,
            alpha, dropout) from its in-projection's.

    Example:
        >>> import tempfile, torch
        >>> from lora_vit import inject_lora
        >>> model = inject_lora(nn.Sequential(nn.Linear(4, 4)), targets=["0"], r=2, alpha=4)
        >>> folder = save_peft_adapter(model, tempfile.mkdtemp())
        >>> sorted(p.name for p in folder.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    adapter_name = resolve_adapter(model, adapter, "export")
    layers = adapter_views(model, adapter_name)
    if "" in layers:
        raise LoRAError(
            f"a single {type(unwrap_model(model)).__name__} has no module name for PEFT's keys"
            " (base_model.model.<module>.lora_A.weight); export the model that holds it"
        )
    _check_exportable(model, layers)
    inner = _inner_out_projs(model, layers)
    state = lora_state_dict(model, adapter=adapter_name)
    tensors = {
        _peft_key(_peft_module_name(name, inner), peft_name): state.pop(f"{name}.{ours}")
        for name, layer in layers.items()
        for ours, peft_name in AdapterSpec.peft_tensor_names(layer.kind)
    }
    tensors.update({_PREFIX + key: value for key, value in state.items()})
    for name, layer in layers.items():
        if isinstance(layer.layer, LoRAMultiheadAttention) and name + ".out_proj" not in inner:
            # PEFT's layer always has out_proj factors: a zero update where ours has none.
            a, embed = layer.stacked_a(), layer.layer.embed_dim
            tensors[_peft_key(name + _BASE_OUT_PROJ, "lora_A")] = a.new_zeros(a.shape[0], embed)
            tensors[_peft_key(name + _BASE_OUT_PROJ, "lora_B")] = a.new_zeros(embed, a.shape[0])
    # Clones: safetensors refuses tensors that share storage (tied weights).
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    config = _config(model, {n: layer for n, layer in layers.items() if n not in inner}, adapter_name)
    if any(isinstance(layer.layer, LoRAMultiheadAttention) for layer in layers.values()):
        # Its out_proj pair is read as this release reads it (an older version would double it).
        config["peft_version"] = _OUT_PROJ_APPLIED_ONCE_SINCE
    folder = Path(directory)
    write_atomically(folder / PEFT_WEIGHTS_NAME, safetensors_bytes(tensors, metadata={"format": "pt"}))
    write_atomically(folder / PEFT_CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return folder


def _empty(value: object) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / PEFT_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no PEFT adapter config at {str(path)!r}")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise LoRAError(f"{str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{str(path)!r} should hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise LoRAError(
            f"{str(path)!r} is a {config.get('peft_type')!r} adapter; lora-vit reads only peft_type 'LORA'"
        )
    for field, allowed in _MUST_BE.items():
        if config.get(field, allowed) != allowed:
            raise LoRAError(
                f"{str(path)!r} sets {field}={config[field]!r}, which lora-vit cannot represent"
                f" (only {allowed!r}); loading it would silently compute something else"
            )
    if config.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise LoRAError(
            f"{str(path)!r} sets init_lora_weights={config['init_lora_weights']!r}, which rewrites the"
            " base weights when PEFT creates the adapter; convert it to a plain LoRA adapter with PEFT"
            " first (valid: True, False, 'gaussian')"
        )
    unknown = {k: v for k, v in config.items() if k not in _HARMLESS and k not in _MUST_BE and not _empty(v)}
    if unknown:
        raise LoRAError(
            f"{str(path)!r} uses PEFT features lora-vit cannot represent: {unknown}."
            f" Supported fields: {sorted(_HARMLESS | set(_MUST_BE))}"
        )
    for field, kind in (("r", int), ("lora_alpha", (int, float))):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise LoRAError(f"{str(path)!r}: {field} should be a number, got {value!r}")
    if not isinstance(config.get("use_dora", False), bool):
        raise LoRAError(f"{str(path)!r}: use_dora should be true or false, got {config['use_dora']!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise LoRAError(f"{str(path)!r}: {field} should be a mapping, got {config[field]!r}")
    return config


def _read_tensors(folder: Path) -> dict[str, Tensor]:
    path = folder / PEFT_WEIGHTS_NAME
    if not path.is_file():
        pickled = folder / "adapter_model.bin"
        hint = " (only a pickled adapter_model.bin is there; lora-vit never unpickles)" if pickled.exists() else ""
        raise FileNotFoundError(f"no {PEFT_WEIGHTS_NAME} in {str(folder)!r}{hint}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise LoRAError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {err}") from None


def _split_keys(
    tensors: Mapping[str, Tensor], where: str, use_dora: bool
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """``({module: {"lora_A": A, "lora_B": B[, "lora_magnitude": m]}}, {other key: tensor})``, prefix removed."""
    lora: dict[str, dict[str, Tensor]] = {}
    other: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(_PREFIX):
            raise LoRAError(f"{where}: tensor {key!r} does not start with {_PREFIX!r}, PEFT's prefix")
        rest = key[len(_PREFIX):]
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", rest)
        # Other PEFT versions may save the magnitude with an inner ``.weight``.
        magnitude = re.fullmatch(rf"(.+)\.{PEFT_MAGNITUDE}(\.weight)?", rest)
        if match:
            lora.setdefault(match[1], {})[match[2]] = value
        elif magnitude and use_dora:
            lora.setdefault(magnitude[1], {})["lora_magnitude"] = value
        elif magnitude:
            raise LoRAError(f"{where}: tensor {key!r} is a DoRA magnitude, but the config does not set use_dora")
        elif re.search(r"\.lora_[A-Za-z_]+(\.|$)", rest):
            raise LoRAError(
                f"{where}: tensor {key!r} is a LoRA variant lora-vit cannot represent (only"
                " lora_A.weight / lora_B.weight on Linear layers)"
            )
        else:
            other[rest] = value
    for name, pair in lora.items():
        needed = {ours for ours, _ in AdapterSpec.peft_tensor_names(use_dora and not name.endswith(_BASE_OUT_PROJ))}
        if set(pair) != needed:
            dora = f" and {PEFT_MAGNITUDE} (use_dora)" if "lora_magnitude" in needed else ""
            raise LoRAError(f"{where}: module {name!r} has {sorted(pair)} but needs both lora_A and lora_B{dora}")
    return lora, other


def _layer_spec(name: str, pair: Mapping[str, Tensor], config: Mapping[str, Any], where: str) -> tuple[int, Any]:
    """``(r, alpha)`` of one adapted module, resolved with PEFT's pattern rules."""
    a, b = pair["lora_A"], pair["lora_B"]
    if a.dim() != 2 or b.dim() != 2:
        raise LoRAError(
            f"{where}: {name!r} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}; lora-vit"
            " adapts only Linear layers (2-D factors), not Conv or Embedding LoRA"
        )
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_key, alpha_key = _pattern_key(rank_pattern, name), _pattern_key(alpha_pattern, name)
    r = rank_pattern[r_key] if r_key is not None else config["r"]
    alpha = alpha_pattern[alpha_key] if alpha_key is not None else config["lora_alpha"]
    if a.shape[0] != r:
        raise LoRAError(
            f"{where}: {name!r} has rank {a.shape[0]} in its tensors but r={r!r} in the config"
            " (r / rank_pattern); the folder is inconsistent"
        )
    return r, alpha


def _module_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return find_module(model, name)
    except AttributeError:
        return None


def _mha_configs(
    name: str, base: nn.MultiheadAttention, pair: Mapping[str, Tensor], lora: Mapping[str, Mapping[str, Tensor]],
    r: int, alpha: Any, config: Mapping[str, Any], where: str,
) -> dict[str, dict[str, Any]]:
    """PEFT's MultiheadAttention LoRA as lora-vit's: one unsliced in-projection pair, and an
    ``out_proj`` adapter where PEFT's out_proj update is not zero."""
    out_pair = lora.get(name + _BASE_OUT_PROJ)
    if out_pair is None:
        raise LoRAError(f"{where}: nn.MultiheadAttention {name!r} has no out_proj adapter, which PEFT always saves")
    if out_pair["lora_A"].shape[0] != r:
        raise LoRAError(
            f"{where}: {name!r} has an out_proj adapter of rank {out_pair['lora_A'].shape[0]} and an in-projection"
            f" of rank {r}; PEFT gives both one rank, so the folder is inconsistent"
        )
    embed = base.embed_dim
    fields = {"kind": "multihead_attention", "num_heads": base.num_heads}
    configs = {name: AdapterSpec.peft_record(embed, 3 * embed, r, alpha, config, **fields)}
    if bool(out_pair["lora_B"].ne(0).any()):
        configs[name + ".out_proj"] = AdapterSpec.peft_record(embed, embed, r, alpha, config)
    return configs


def _release(version: str) -> tuple[tuple[int, ...], bool] | None:
    """``(release numbers, a dev build?)`` of a recorded ``peft_version`` ("0.22.0", "0.21.1.dev0@abc1234")."""
    match = re.fullmatch(r"(\d+(?:\.\d+)*)(.*)", version.partition("@")[0].strip())
    if match is None:
        return None
    numbers = tuple(int(part) for part in match[1].split("."))
    return numbers + (0,) * (3 - len(numbers)), "dev" in match[2]


def _out_proj_applied_twice(config: Mapping[str, Any], where: str) -> bool:
    """Whether the PEFT that wrote ``config`` added a MultiheadAttention's out_proj update twice.

    PEFT 0.22.0's own rule, so both libraries read a folder alike: a folder without
    ``peft_version`` (written before 0.18.0), a release before 0.22.0, or a dev build before
    0.21.1 (main carried the fix as 0.21.x dev builds).
    """
    version = config.get("peft_version")
    if version is None:
        return True
    parsed = _release(str(version))
    if parsed is None:
        raise LoRAError(f"{where}: peft_version {version!r} is not a version number such as '0.22.0'")
    numbers, dev = parsed
    once_since, _ = _release(_OUT_PROJ_APPLIED_ONCE_SINCE)  # type: ignore[misc]  # a literal version
    return numbers < (0, 21, 1) or (not dev and numbers < once_since)


def _given_tensors(
    lora: Mapping[str, Mapping[str, Tensor]], configs: Mapping[str, Any], config: Mapping[str, Any], where: str
) -> dict[str, Tensor]:
    """The folder's factors under lora-vit's layer names: an out_proj update PEFT once applied twice, doubled."""
    given: dict[str, Tensor] = {}
    for name, pair in lora.items():
        ours = name.removesuffix(_BASE_OUT_PROJ) + ".out_proj" if name.endswith(_BASE_OUT_PROJ) else name
        if ours not in configs:
            continue  # a MultiheadAttention's zero out_proj pair: nothing to adapt
        given.update({f"{ours}.{factor}": value for factor, value in pair.items()})
        if ours != name and _out_proj_applied_twice(config, where):
            given[f"{ours}.lora_B"] = 2 * pair["lora_B"]
    return given


def _layer_configs(
    model: nn.Module, lora: Mapping[str, Mapping[str, Tensor]], config: Mapping[str, Any], where: str
) -> dict[str, dict[str, Any]]:
    """Each PEFT module as lora-vit's own layer config (one unsliced adapter over the whole Linear)."""
    configs: dict[str, dict[str, Any]] = {}
    for name, pair in lora.items():
        if name.endswith(_BASE_OUT_PROJ):
            continue  # with its MultiheadAttention below
        if ".base_layer." in name:
            raise LoRAError(f"{where}: module {name!r} is a PEFT layer nested in another, which lora-vit cannot map")
        r, alpha = _layer_spec(name, pair, config, where)
        base = _module_or_none(model, name)
        if isinstance(base, nn.MultiheadAttention):
            try:
                check_packed_kind(kind_of_peft(config))
            except LoRAError as err:
                raise LoRAError(f"{where}, nn.MultiheadAttention {name!r}: {err}") from None
            configs.update(_mha_configs(name, base, pair, lora, r, alpha, config, where))
            continue
        # Shapes from the model where it has the layer, so a mis-shaped tensor is named as such.
        if isinstance(base, nn.Linear):
            in_features, out_features = base.in_features, base.out_features
        else:
            in_features, out_features = int(pair["lora_A"].shape[1]), int(pair["lora_B"].shape[0])
        configs[name] = AdapterSpec.peft_record(in_features, out_features, r, alpha, config)
    return configs


def _modules_to_save(model: nn.Module, config: Mapping[str, Any], other: Mapping[str, Tensor], where: str) -> list[str]:
    """Whole modules that ``other`` (the non-LoRA tensors) restores, as PEFT's modules_to_save."""
    entries = config.get("modules_to_save") or []
    if isinstance(entries, str):
        entries = [entries]
    names = [n for n, _ in model.named_modules() if n and any(n.endswith(e) for e in entries)]
    # PEFT wraps the outermost match; modules inside it come along.
    names = [n for n in names if not any(n.startswith(p + ".") for p in names)]
    holders = [n for n in names if any(k.startswith(n + ".") for k in other)]
    strays = [k for k in other if not any(k.startswith(n + ".") for n in holders)]
    if strays:
        raise LoRAError(
            f"{where}: tensors {strays} belong to no LoRA layer and to no modules_to_save module"
            f" ({entries}) of this model; lora-vit restores only whole modules"
        )
    return holders


def load_peft_adapter(
    model: nn.Module, directory: str | os.PathLike[str], *, adapter: str | None = None, pad: bool = False
) -> nn.Module:
    """Load a PEFT LoRA adapter folder into ``model``, injecting the adapters it describes.

    Ranks come from the tensors (checked against ``r``/``rank_pattern``), alphas from
    ``lora_alpha``/``alpha_pattern`` with PEFT's matching rules, ``use_rslora``, ``use_dora``
    (DoRA magnitudes from ``lora_magnitude_vector``) and ``lora_dropout`` from the config;
    ``modules_to_save`` become ``trainable`` modules. The result computes what
    ``peft.PeftModel.from_pretrained(base, directory)`` computes. Only
    ``adapter_model.safetensors`` is read (never a pickled ``.bin``). Everything is validated
    before the model is touched, so a failed load leaves it unchanged.

    Args:
        model: The base model PEFT wrapped (e.g. a ``ViTForImageClassification``), without
            adapters, or already carrying exactly the adapters the folder describes.
        directory: A folder written by PEFT's ``save_pretrained`` or :func:`save_peft_adapter`.
        adapter: The name to load it under: added beside the model's other adapters, or, when
            the model has an adapter of that name, swapped into it (as :func:`lora_vit.load_lora`
            does). Default: the folder's adapter name (a subfolder ``x`` of a PEFT multi-adapter
            save is adapter ``x``, else ``"default"``), which must be new to the model: without
            ``adapter=`` a PEFT load never replaces an adapter the model holds.
        pad: As in :func:`lora_vit.load_lora`: lower ranks into adapters injected with a
            maximum rank, without recompiling.

    Returns:
        ``model``, adapted and loaded.

    Raises:
        FileNotFoundError: If the config or the safetensors file is missing.
        LoRAError: If the folder uses anything lora-vit cannot represent (another
            ``peft_type``, ``bias`` other than ``"none"``, ``lora_bias``,
            ``fan_in_fan_out``, weight-rewriting inits, LoRA on non-Linear layers, partial
            ``modules_to_save``, unknown non-empty fields), names modules the model lacks, or
            holds inconsistent, mis-shaped or non-finite tensors.

    Example:
        >>> import copy, tempfile, torch
        >>> from lora_vit import inject_lora
        >>> base = nn.Sequential(nn.Linear(4, 4))
        >>> model = inject_lora(copy.deepcopy(base), targets=["0"], r=2, alpha=4)
        >>> folder = save_peft_adapter(model, tempfile.mkdtemp())
        >>> type(load_peft_adapter(copy.deepcopy(base), folder)[0]).__name__
        'LoRALinear'
    """
    folder = Path(directory)
    where = repr(str(folder))
    config = _read_config(folder)
    lora, other = _split_keys(_read_tensors(folder), where, config.get("use_dora", False))
    if not lora:
        raise LoRAError(f"{where} holds no lora_A/lora_B tensors")
    # Translate the folder into lora-vit's own terms, then the pipeline load_lora uses.
    trainable = _modules_to_save(unwrap_model(model), config, other, where)
    configs = _layer_configs(model, lora, config, where)
    given = _given_tensors(lora, configs, config, where)
    given.update(other)
    name = check_adapter_name(_folder_adapter(folder) if adapter is None else adapter)
    if adapter is None and name in adapter_names(model):
        raise LoRAError(
            f"{where} would load as adapter {name!r}, which the model already has ({list(adapter_names(model))});"
            f" pass adapter=<a new name> to add it beside, or adapter={name!r} to swap its values in"
        )
    return load_adapters(model, configs, trainable, given, where, adapter=name, pad=pad)


def _folder_adapter(folder: Path) -> str:
    """The adapter name PEFT gave ``folder``: its own name inside a multi-adapter save, else ``"default"``.

    PEFT's ``save_pretrained`` writes the adapter ``"default"`` at the top and every other adapter
    ``x`` in a subfolder ``x`` (beside the top's ``adapter_config.json``); the config itself holds no name.
    """
    if (folder.parent / PEFT_CONFIG_NAME).is_file():
        try:
            return check_adapter_name(folder.name)
        except LoRAError:
            pass
    return DEFAULT_ADAPTER
