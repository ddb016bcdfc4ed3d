"""`AdapterSpec`: what one named adapter on one layer is, validated once, and its JSON form.

Every place that describes an adapter goes through this module: the layers build their factors
from a spec, files record :meth:`AdapterSpec.config` and rebuild it with
:meth:`AdapterSpec.from_config` (checking the recorded structure first), and the PEFT bridge
writes the same entries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import LoRAError
from .functional import keep_probability
from .kinds import DORA, LORA, PEFT_MAGNITUDE, AdapterKind, kind_of_peft, kind_of_record, resolve_kind

__all__ = [
    "ADAPTER_NAME",
    "DEFAULT_ADAPTER",
    "INITS",
    "PEFT_MAGNITUDE",
    "AdapterSpec",
    "LoRASlice",
    "check_adapter_name",
    "check_alpha",
    "check_dropout",
    "check_flag",
    "check_init",
    "check_rank",
    "value_for",
]

INITS = ("normal", "kaiming")
"""Valid values of ``init``: A ~ N(0, 0.02^2), or Kaiming-uniform as in the LoRA paper's code."""

DEFAULT_ADAPTER = "default"
"""The adapter name used when none is given (its parameters keep their historical names)."""

ADAPTER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_SLICE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class LoRASlice:
    """One block of output rows ``[start, stop)`` of a Linear with its own adapter.

    Attributes:
        name: Identifier used in parameter names (``lora_A_<name>``); ``""`` for the
            single adapter of an unsliced layer (parameters ``lora_A`` / ``lora_B``).
        start: First adapted output row.
        stop: One past the last adapted output row.
        r: Rank of this slice's adapter.
        alpha: Scaling numerator of this slice's adapter.
    """

    name: str
    start: int
    stop: int
    r: int
    alpha: float

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def a_name(self) -> str:
        return f"lora_A_{self.name}" if self.name else "lora_A"

    @property
    def b_name(self) -> str:
        return f"lora_B_{self.name}" if self.name else "lora_B"

    @property
    def magnitude_name(self) -> str:
        """Name of this slice's DoRA magnitude ``(rows,)`` (only on ``use_dora`` layers)."""
        return f"lora_magnitude_{self.name}" if self.name else "lora_magnitude"

    def scaling(self, use_rslora: bool) -> float:
        return self.alpha / (math.sqrt(self.r) if use_rslora else self.r)

    def config(self) -> dict[str, Any]:
        """The JSON-ready entry a layer's ``config()`` records for this slice."""
        return {"name": self.name, "start": self.start, "stop": self.stop, "r": self.r, "alpha": self.alpha}


def check_rank(r: object, limit: int, where: str) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoRAError(f"r must be a positive integer, got {r!r} for {where}")
    if r > limit:
        raise LoRAError(
            f"r={r} is larger than {where} allows: a rank above min(in_features, adapted rows)"
            f" = {limit} adds parameters without adding expressiveness"
        )
    return r


def check_alpha(alpha: object, where: str) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise LoRAError(f"alpha must be a positive number, got {alpha!r} for {where}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise LoRAError(f"alpha must be a positive finite number, got {alpha!r} for {where}")
    return float(alpha)


def check_dropout(dropout: object) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise LoRAError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise LoRAError(f"dropout must be in [0, 1), got {dropout!r}")
    if keep_probability(dropout) == 0.0:
        raise LoRAError(f"dropout={dropout!r} would drop every element (resolution 2**-16); use at most 0.9999")
    return float(dropout)


def check_init(init: object) -> str:
    if init not in INITS:
        raise LoRAError(f"init must be one of {INITS}, got {init!r}")
    return str(init)


def check_flag(value: object, name: str) -> bool:
    """``value`` itself if it is a bool; anything else (``"false"``, 0, None) is refused, not coerced."""
    if not isinstance(value, bool):
        raise LoRAError(f"{name} must be True or False, got {value!r}")
    return value


def check_adapter_name(name: object) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.match(name) or "__" in name:
        raise LoRAError(
            f"adapter names start with a letter and hold letters, digits, '-' and single '_' only, got {name!r}"
        )
    return name


def value_for(value: Any, key: str, what: str, kind: str) -> Any:
    """``value[key]`` when ``value`` is a per-slice or per-target mapping, else ``value`` itself."""
    if isinstance(value, Mapping):
        if key not in value:
            raise LoRAError(f"{what} is a mapping without an entry for {kind} {key!r}: {dict(value)}")
        return value[key]
    return value


def _build_slices(
    out_features: int,
    in_features: int,
    slices: Mapping[str, tuple[int, int]] | None,
    r: int | Mapping[str, int],
    alpha: float | Mapping[str, float],
) -> tuple[LoRASlice, ...]:
    if slices is None:
        if isinstance(r, Mapping) or isinstance(alpha, Mapping):
            raise LoRAError("per-slice r or alpha mappings need `slices`; pass plain numbers")
        where = f"a Linear({in_features}, {out_features})"
        rank = check_rank(r, min(in_features, out_features), where)
        return (LoRASlice("", 0, out_features, rank, check_alpha(alpha, where)),)
    if not isinstance(slices, Mapping) or not slices:
        raise LoRAError(f"slices must be a non-empty mapping name -> (start, stop), got {slices!r}")
    built = []
    for name, bounds in slices.items():
        if not isinstance(name, str) or not _SLICE_NAME.match(name):
            raise LoRAError(f"slice names must be Python identifiers, got {name!r}")
        try:
            start, stop = (int(b) for b in bounds)
        except (TypeError, ValueError):
            raise LoRAError(f"slice {name!r} must be (start, stop), got {bounds!r}") from None
        if not 0 <= start < stop <= out_features:
            raise LoRAError(
                f"slice {name!r} = ({start}, {stop}) is not a non-empty row range"
                f" inside [0, {out_features})"
            )
        where = f"slice {name!r} ({stop - start} rows, in_features={in_features})"
        rank = check_rank(value_for(r, name, "r", "slice"), min(in_features, stop - start), where)
        built.append(LoRASlice(name, start, stop, rank, check_alpha(value_for(alpha, name, "alpha", "slice"), where)))
    built.sort(key=lambda s: s.start)
    for left, right in zip(built, built[1:]):
        if right.start < left.stop:
            raise LoRAError(
                f"slices {left.name!r} [{left.start}, {left.stop}) and {right.name!r}"
                f" [{right.start}, {right.stop}) overlap"
            )
    return tuple(built)


_CONFIG_FIELDS: dict[str, Any] = {
    "in_features": int, "out_features": int, "dropout": (int, float), "use_rslora": bool, "slices": list
}
_SLICE_FIELDS: dict[str, Any] = {"name": str, "start": int, "stop": int, "r": int, "alpha": (int, float)}
# Files of LoRALinear layers written before these existed lack them; a plain LoRA layer's record
# names no adapter kind (DoRA's says use_dora, other kinds adapter_kind: AdapterKind.record).
_OPTIONAL_FIELDS: dict[str, Any] = {"kind": str, "num_heads": int, "use_dora": bool, "adapter_kind": str}


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter on one layer: which rows, ranks, alphas, dropout, scaling rule, kind and init.

    Built only through :meth:`build` (from user arguments) or :meth:`from_config` (from a file),
    both of which validate everything, so a spec in hand is always valid for its layer shape.

    Attributes:
        slices: The adapted row blocks, sorted by ``start``; one unnamed slice covers all rows.
        dropout: LoRA dropout on the branch's input while training.
        use_rslora: Scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        kind: LoRA, DoRA or a registered kind (:mod:`lora_vit.kinds`): what the pair is used for.
        init: How ``A`` starts (``"normal"`` or ``"kaiming"``).
    """

    slices: tuple[LoRASlice, ...]
    dropout: float
    use_rslora: bool
    kind: AdapterKind = LORA
    init: str = "normal"

    @classmethod
    def build(
        cls,
        out_features: int,
        in_features: int,
        r: int | Mapping[str, int],
        alpha: float | Mapping[str, float],
        dropout: float,
        *,
        slices: Mapping[str, tuple[int, int]] | None = None,
        init: str = "normal",
        use_rslora: bool = False,
        use_dora: bool = False,
        kind: str | None = None,
    ) -> AdapterSpec:
        """Validate user arguments into a spec for an ``(out_features, in_features)`` weight.

        ``use_dora=True`` is ``kind="dora"``; ``kind`` names any registered kind (:mod:`lora_vit.kinds`).

        Raises:
            LoRAError: Naming the invalid rank, alpha, dropout, init, flag, kind or slice.
        """
        return cls(
            slices=_build_slices(out_features, in_features, slices, r, alpha),
            dropout=check_dropout(dropout),
            use_rslora=check_flag(use_rslora, "use_rslora"),
            kind=resolve_kind(kind, check_flag(use_dora, "use_dora")),
            init=check_init(init),
        )

    @property
    def use_dora(self) -> bool:
        """Whether this is DoRA (the historical flag; :attr:`kind` says it for every kind)."""
        return self.kind == DORA

    @property
    def scalings(self) -> tuple[float, ...]:
        return tuple(s.scaling(self.use_rslora) for s in self.slices)

    @property
    def total_rank(self) -> int:
        return sum(s.r for s in self.slices)

    def covers_all_rows(self, out_features: int) -> bool:
        return len(self.slices) == 1 and self.slices[0].rows == out_features

    def shapes(self, in_features: int) -> list[tuple[str, tuple[int, ...]]]:
        """``(parameter name, shape)`` of every parameter, in slice order: A, B, the kind's own (DoRA: magnitude)."""
        shapes: list[tuple[str, tuple[int, ...]]] = []
        for s in self.slices:
            shapes += [(s.a_name, (s.r, in_features)), (s.b_name, (s.rows, s.r))]
            shapes += self.kind.extra_shapes(s, in_features)
        return shapes

    def config(self, in_features: int, out_features: int, **layer_fields: Any) -> dict[str, Any]:
        """The JSON-ready record a file stores for this adapter on a layer of that shape."""
        return {
            **layer_fields,
            "in_features": in_features,
            "out_features": out_features,
            "dropout": self.dropout,
            "use_rslora": self.use_rslora,
            # Nothing for plain LoRA, so that its configs (and files) stay as before kinds existed.
            **self.kind.record(),
            "slices": [s.config() for s in self.slices],
        }

    @staticmethod
    def check_config(config: object, what: str) -> dict[str, Any]:
        """Check the structure (types of every field) of a recorded layer config.

        Raises:
            LoRAError: ``"<what> is malformed: <config>"``.
        """
        ok = isinstance(config, dict) and all(isinstance(config.get(k), t) for k, t in _CONFIG_FIELDS.items())
        ok = ok and all(k not in config or isinstance(config[k], t) for k, t in _OPTIONAL_FIELDS.items())  # type: ignore[operator,index]
        ok = ok and bool(config["slices"]) and all(  # type: ignore[index]
            isinstance(s, dict) and all(isinstance(s.get(k), t) for k, t in _SLICE_FIELDS.items())
            for s in config["slices"]  # type: ignore[index]
        )
        if not ok:
            raise LoRAError(f"{what} is malformed: {config!r}")
        return config  # type: ignore[return-value]

    @classmethod
    def from_config(cls, config: Mapping[str, Any], init: str = "normal") -> AdapterSpec:
        """The spec a :meth:`config` record describes (values validated as :meth:`build` does).

        Raises:
            LoRAError: For an invalid record (an unnamed slice not covering every row, bad values).
        """
        cls.check_config(dict(config), "the adapter config")
        entries = config["slices"]
        out_features, in_features = config["out_features"], config["in_features"]
        kind = kind_of_record(config).name
        if len(entries) == 1 and entries[0]["name"] == "":
            only = entries[0]
            if (only["start"], only["stop"]) != (0, out_features):
                raise LoRAError(f"an unnamed slice must cover all rows, got {only}")
            return cls.build(
                out_features, in_features, only["r"], only["alpha"], config["dropout"],
                init=init, use_rslora=config["use_rslora"], kind=kind,
            )
        return cls.build(
            out_features, in_features,
            {e["name"]: e["r"] for e in entries},
            {e["name"]: e["alpha"] for e in entries},
            config["dropout"],
            slices={e["name"]: (e["start"], e["stop"]) for e in entries},
            init=init, use_rslora=config["use_rslora"], kind=kind,
        )

    @staticmethod
    def peft_record(
        in_features: int, out_features: int, r: Any, alpha: Any, peft_config: Mapping[str, Any], **layer_fields: Any
    ) -> dict[str, Any]:
        """The :meth:`config` record of PEFT's LoRA over a whole module (one unsliced pair).

        ``lora_dropout``, ``use_rslora`` and the kind (``use_dora``) come from PEFT's
        ``adapter_config.json``; values are checked when the record becomes a spec
        (:meth:`from_config`), where the loader names the layer.
        """
        return {
            **layer_fields,
            "in_features": in_features,
            "out_features": out_features,
            "dropout": peft_config.get("lora_dropout") or 0.0,
            "use_rslora": bool(peft_config.get("use_rslora", False)),
            **kind_of_peft(peft_config).record(),
            "slices": [{"name": "", "start": 0, "stop": out_features, "r": r, "alpha": alpha}],
        }

    @staticmethod
    def peft_tensor_names(kind: AdapterKind | bool) -> list[tuple[str, str]]:
        """``(lora-vit factor, PEFT tensor)`` names of an unsliced adapter: A, B, then the kind's own.

        PEFT stores ``<module>.lora_A.weight`` and ``<module>.lora_B.weight``, and DoRA's
        magnitude as ``<module>.lora_magnitude_vector`` (without its inner ``.weight``).
        ``kind`` may be the historical ``use_dora`` flag.
        """
        if isinstance(kind, bool):
            kind = DORA if kind else LORA
        return [("lora_A", "lora_A"), ("lora_B", "lora_B"), *kind.peft_tensor_names()]

    def peft_fields(self) -> dict[str, Any]:
        """This spec in PEFT's ``LoraConfig`` terms (``r``, ``lora_alpha``, ``lora_dropout``, flags).

        Raises:
            LoRAError: For fused-projection slices or a kind that PEFT has no form for.
        """
        if len(self.slices) != 1 or self.slices[0].name:
            raise LoRAError("PEFT has no form for adapters on fused q/k/v slices")
        kind_fields = self.kind.peft_fields()
        if kind_fields is None:
            raise LoRAError(f"PEFT has no form for adapters of kind {self.kind.name!r}; keep save_lora")
        s = self.slices[0]
        alpha = int(s.alpha) if float(s.alpha).is_integer() else s.alpha
        return {"r": s.r, "lora_alpha": alpha, "lora_dropout": self.dropout, "use_rslora": self.use_rslora,
                **kind_fields}

    def describe(self, out_features: int) -> str:
        """One line such as ``r=8, alpha=16`` or ``q[0:384] r=8, alpha=16, v[768:1152] ...``."""
        label = self.kind.label()
        kind = f", {label}" if label else ""
        if self.covers_all_rows(out_features):
            s = self.slices[0]
            return f"r={s.r}, alpha={s.alpha:g}{kind}"
        return ", ".join(f"{s.name}[{s.start}:{s.stop}] r={s.r}, alpha={s.alpha:g}" for s in self.slices) + kind
