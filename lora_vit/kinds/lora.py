"""LoRA (Hu et al. 2021): the low-rank pair alone, ``y = x W^T + b + dropout(x) A^T B^T * scaling``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import AdapterKind

__all__ = ["LORA", "LoRAKind"]


@dataclass(frozen=True)
class LoRAKind(AdapterKind):
    """Plain LoRA: :class:`AdapterKind`'s math, recorded as files always recorded it (no kind field)."""

    name: str = "lora"

    @property
    def option(self) -> str:
        return "LoRA"

    def record(self) -> dict[str, Any]:
        return {}  # files of plain LoRA name no kind: as before kinds existed

    def peft_fields(self) -> dict[str, Any]:
        return {"use_dora": False}

    def label(self) -> str:
        return ""


LORA = LoRAKind()
