"""The table of adapter kinds: LoRA and DoRA, and any kind a user registers.

An adapter's kind (:class:`~lora_vit.kinds.base.AdapterKind`) is part of its
:class:`~lora_vit.spec.AdapterSpec`; everything kind-specific (extra parameters, their init, the
forward, the merge, the file record, the PEFT fields) is asked of it. Adding a kind is one module
beside these and one entry below, or :func:`register_kind` from user code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import LoRAError
from .base import AdapterKind, AdapterParameters
from .dora import DORA, PEFT_MAGNITUDE
from .lora import LORA

__all__ = [
    "DORA", "KINDS", "LORA", "PEFT_MAGNITUDE", "AdapterKind", "AdapterParameters", "kind_named", "kind_of_peft",
    "kind_of_record", "register_kind", "resolve_kind",
]

KINDS: dict[str, AdapterKind] = {LORA.name: LORA, DORA.name: DORA}
"""Every known kind by name; plain LoRA is the kind of a record that names none."""


def register_kind(kind: AdapterKind) -> AdapterKind:
    """Add ``kind`` to :data:`KINDS`, so that ``inject_lora(..., kind=name)`` and files know it.

    Returns the registered kind: registering an equal kind again returns the one in the table.

    Raises:
        LoRAError: If ``kind`` is not an :class:`AdapterKind`, or its name or file record is another kind's.
    """
    if not isinstance(kind, AdapterKind):
        raise LoRAError(f"register_kind takes an AdapterKind (a frozen dataclass subclassing it), got {kind!r}")
    known = KINDS.get(kind.name)
    if known is not None:
        if known != kind:
            raise LoRAError(f"an adapter kind named {kind.name!r} is already registered: {known!r}")
        return known
    clash = [k.name for k in KINDS.values() if k.name != kind.name and k.record() == kind.record()]
    if clash:
        raise LoRAError(f"kind {kind.name!r} would be recorded in files as {clash[0]!r} is ({kind.record()})")
    KINDS[kind.name] = kind
    return kind


def kind_named(name: object) -> AdapterKind:
    """The registered kind ``name``.

    Raises:
        LoRAError: Listing the known kinds.
    """
    if not isinstance(name, str) or name not in KINDS:
        raise LoRAError(f"unknown adapter kind {name!r} (known: {sorted(KINDS)})")
    return KINDS[name]


def resolve_kind(kind: str | None, use_dora: bool) -> AdapterKind:
    """The kind of ``inject_lora(..., kind=, use_dora=)``: ``use_dora=True`` is ``kind="dora"``.

    Raises:
        LoRAError: For an unknown kind, or ``use_dora=True`` beside another kind.
    """
    if kind is None:
        return DORA if use_dora else LORA
    found = kind_named(kind)
    if use_dora and found is not DORA:
        raise LoRAError(f"use_dora=True asks for DoRA, but kind={kind!r} was given too; pass one of them")
    return found


def kind_of_record(config: Mapping[str, Any]) -> AdapterKind:
    """The kind a file's layer record names (by the fields :meth:`AdapterKind.record` writes).

    Raises:
        LoRAError: For an ``adapter_kind`` that is not registered.
    """
    if "adapter_kind" in config:
        return kind_named(config["adapter_kind"])
    named = [k for k in KINDS.values() if k.record() and all(config.get(f) == v for f, v in k.record().items())]
    return named[0] if named else LORA


def kind_of_peft(peft_config: Mapping[str, Any]) -> AdapterKind:
    """The kind a PEFT ``adapter_config.json`` describes (LoRA unless its fields name another)."""
    named = [
        k for k in KINDS.values()
        if (fields := k.peft_fields()) and any(fields.values())
        and all(bool(peft_config.get(f, False)) == v for f, v in fields.items())
    ]
    return named[0] if named else LORA
