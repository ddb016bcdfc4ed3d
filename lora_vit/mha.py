"""`LoRAMultiheadAttention`: LoRA inside ``nn.MultiheadAttention`` (torchvision ViT, open_clip).

``nn.MultiheadAttention`` never calls a Linear for its input projection: it multiplies by its
packed ``in_proj_weight`` (``(3 * embed_dim, embed_dim)``, rows q, k, v) and reads
``out_proj.weight`` directly, so an adapter on ``out_proj`` would never run. This subclass keeps
every Parameter and buffer of the module it adapts under the same names (a base checkpoint still
loads), and adds adapters on row slices of ``in_proj_weight`` exactly as :class:`LoRALinear` does
on a fused ``qkv`` (the same ``lora_A_<slice>`` / ``lora_B_<slice>`` factors and math), and calls
``out_proj`` as a module, so ``out_proj`` may itself be a :class:`LoRALinear`.

The forward takes one of two routes, both computing ``nn.MultiheadAttention``'s function with
the adapted weights:

- When gradients flow (training), the in-projection goes through the library's one-node LoRA
  map (:func:`lora_vit.functional.lora_linear`: no dropped copy of the input is saved, the
  dropout mask is regenerated in backward), and the attention itself follows
  ``F.multi_head_attention_forward`` step by step (masks, ``need_weights``, ``is_causal``,
  ``add_bias_kv``, ``add_zero_attn``, attention dropout, batched or not, ``batch_first``).
- When no gradient is needed (inference) and LoRA dropout is off, the adapted weights
  ``W + scaling * B @ A`` are formed once per call in float32, rounded once to the weight dtype
  (what :func:`lora_vit.merge_lora` stores), and handed to PyTorch's own code, including the
  fused ``torch._native_multi_head_attention`` fast path whenever PyTorch itself would use it.
  Forming them costs ``3 * embed_dim**2 * r`` multiply-adds, a small fraction of the
  projection at any batch size a ViT runs.

Dropout semantics: the LoRA dropout (``lora_dropout``) is :class:`LoRALinear`'s, applied to
the in-projection's input while training; in self-attention one mask is shared by the q, k
and v slices (one input, as for a fused ``qkv``). ``dropout`` keeps its PyTorch meaning, the
probability of dropping attention weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._attention import NonDynamicallyQuantizableLinear, adapter_attention, any_requires_grad, merged_attention
from .errors import LoRAError
from .functional import as_base_weight, lora_linear
from .kinds import AdapterKind
from .layer import LoRALinear
from .lowrank import LowRankAdapters
from .mixed_batch import routed_lora
from .routing import current_route
from .spec import DEFAULT_ADAPTER, AdapterSpec, check_adapter_name

__all__ = ["LoRAMultiheadAttention", "check_adaptable_mha", "check_mha_config", "check_packed_kind", "qkv_bounds"]

_COPIED = ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first", "head_dim",
           "add_zero_attn")
_KIND = "multihead_attention"


def _route_parents_through_forward(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing: its presence is what matters.

    ``nn.TransformerEncoderLayer``'s inference fast path reads ``self_attn.in_proj_weight`` and
    ``out_proj.weight`` itself instead of calling ``self_attn``, which would leave the adapters
    out; PyTorch skips that fast path whenever a submodule has a forward hook, so this hook
    makes such a parent call this module (whose own inference route still uses the fused
    attention kernel). Merged modules are plain again, without it.
    """
    return None


def qkv_bounds(mha: nn.MultiheadAttention, role: str) -> tuple[int, int]:
    """Rows of ``in_proj_weight`` that project ``role`` (``"q"``, ``"k"`` or ``"v"``)."""
    index = "qkv".index(role)
    return index * mha.embed_dim, (index + 1) * mha.embed_dim


def check_adaptable_mha(mha: nn.MultiheadAttention, name: str) -> None:
    """Refuse an ``nn.MultiheadAttention`` whose in-projection is not one packed matrix.

    Raises:
        LoRAError: For separate ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``
            (``kdim`` or ``vdim`` other than ``embed_dim``).
    """
    if not mha._qkv_same_embed_dim:
        raise LoRAError(
            f"{name!r} is an nn.MultiheadAttention with separate q/k/v weights (embed_dim={mha.embed_dim},"
            f" kdim={mha.kdim}, vdim={mha.vdim}); lora-vit adapts only the packed in_proj_weight. Its"
            " out_proj can still be adapted (target 'o')"
        )


def check_packed_kind(kind: AdapterKind) -> None:
    """Refuse a kind that cannot run on the packed in-projection, such as DoRA (the one place that says so).

    Raises:
        LoRAError: For a kind without :attr:`~lora_vit.kinds.AdapterKind.packed_in_projection`.
    """
    if not kind.packed_in_projection:
        raise LoRAError(
            f"{kind.option} is not supported on nn.MultiheadAttention's packed in-projection (q/k/v);"
            " it works on nn.Linear layers, including its out_proj (target 'o')"
        )


class LoRAMultiheadAttention(LowRankAdapters, nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` with low-rank adapters on its packed in-projection.

    ``in_proj(x) = x @ W.T + b + dropout(x) @ A.T @ B.T * scaling`` on the adapted rows of
    ``in_proj_weight``, as :class:`LoRALinear` computes for a fused ``qkv``; everything else is
    ``nn.MultiheadAttention`` (same arguments, outputs, masks and fast path). ``out_proj`` is
    called as a module, so it may be a :class:`LoRALinear` (logical target ``o``). With
    ``slices={}`` there is no in-projection adapter: the module only routes ``out_proj``.

    The Parameters of ``base`` are taken over under their own names (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj.weight``, ...), so the ``state_dict`` holds the base keys plus
    ``lora_A_<slice>`` / ``lora_B_<slice>``. ``weight`` and ``bias`` name ``in_proj_weight`` and
    ``in_proj_bias``, the matrix the adapters update, as on a :class:`LoRALinear`. Hooks
    registered on ``base`` itself are not carried over.

    Args:
        base: The ``nn.MultiheadAttention`` to adapt; its Parameters are reused, not copied.
        r: Rank, or a mapping slice name -> rank.
        alpha: Scaling numerator, or a mapping slice name -> alpha.
        dropout: LoRA dropout on the in-projection's input while training (stored as
            ``lora_dropout``; ``dropout`` stays the attention-weight dropout of ``base``).
        slices: Mapping name -> ``(start, stop)`` rows of ``in_proj_weight`` (``{"q": (0, E)}``
            adapts q only); ``None`` adapts all ``3 * embed_dim`` rows with one pair;
            ``{}`` adapts none.
        init: How ``A`` starts: ``"normal"`` (std 0.02) or ``"kaiming"``.
        use_rslora: Scale by ``alpha / sqrt(r)``.
        kind: The adapter kind by name (:mod:`lora_vit.kinds`; default LoRA); DoRA is refused here.
        adapter: Name of this first adapter (more are added by ``inject_lora(..., adapter=...)``).
        spec: A prebuilt :class:`~lora_vit.spec.AdapterSpec` used instead of ``r`` ... ``kind``.

    Shape:
        As ``nn.MultiheadAttention``: ``query`` ``(L, N, E)`` (``(N, L, E)`` with
        ``batch_first``, ``(L, E)`` unbatched); returns ``(output, weights or None)``.

    Raises:
        LoRAError: If ``base`` is not an ``nn.MultiheadAttention``, has separate q/k/v weights
            and slices are requested, or ``r``/``alpha``/``dropout``/``init``/``slices`` are invalid.

    Example:
        >>> mha = LoRAMultiheadAttention(nn.MultiheadAttention(16, 4, batch_first=True),
        ...                              r=2, alpha=4, slices={"q": (0, 16), "v": (32, 48)})
        >>> x = torch.randn(2, 5, 16)
        >>> mha(x, x, x, need_weights=False)[0].shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        base: nn.MultiheadAttention,
        r: int | Mapping[str, int] = 4,
        alpha: float | Mapping[str, float] = 32,
        dropout: float = 0.1,
        *,
        slices: Mapping[str, tuple[int, int]] | None = None,
        init: str = "normal",
        use_rslora: bool = False,
        kind: str | None = None,
        adapter: str = DEFAULT_ADAPTER,
        spec: AdapterSpec | None = None,
    ) -> None:
        if not isinstance(base, nn.MultiheadAttention):
            raise LoRAError(f"LoRAMultiheadAttention adapts nn.MultiheadAttention, got {type(base).__name__}")
        nn.Module.__init__(self)
        self.training = base.training
        for attr in _COPIED:
            setattr(self, attr, getattr(base, attr))
        if isinstance(base, LoRAMultiheadAttention) and base.adapter_names:
            raise LoRAError("this nn.MultiheadAttention already has in-projection adapters; merge or reload first")
        for name, param in base._parameters.items():
            if not name.startswith("lora_"):  # a routing-only LoRAMultiheadAttention has none
                self.register_parameter(name, param)
        if base.bias_k is None:
            self.bias_k = self.bias_v = None
        self.out_proj = base.out_proj
        projection = base.in_proj_weight if base._qkv_same_embed_dim else base.q_proj_weight
        self.base_requires_grad = getattr(base, "base_requires_grad", projection.requires_grad)  # see disable_lora
        self.in_features = self.embed_dim
        self.out_features = 3 * self.embed_dim
        self._init_adapters()
        if spec is not None or slices is None or len(slices) > 0:
            check_adaptable_mha(base, type(base).__name__)
            if spec is None:
                spec = AdapterSpec.build(
                    self.out_features, self.in_features, r, alpha, dropout,
                    slices=slices, init=init, use_rslora=use_rslora, kind=kind,
                )
            self.add_adapter(check_adapter_name(adapter), spec)
        self.register_forward_pre_hook(_route_parents_through_forward)

    def add_adapter(self, name: str, spec: AdapterSpec) -> None:
        """:meth:`LowRankAdapters.add_adapter`, refusing kinds the packed in-projection cannot run (DoRA).

        Raises:
            LoRAError: For such a kind (:func:`check_packed_kind`), or as the base method does.
        """
        check_packed_kind(spec.kind)
        check_adaptable_mha(self, type(self).__name__)
        super().add_adapter(name, spec)

    @classmethod
    def routing(cls, base: nn.MultiheadAttention) -> LoRAMultiheadAttention:
        """``base`` without in-projection adapters, calling ``out_proj`` as a module."""
        return cls(base, slices={})

    @property
    def weight(self) -> Tensor:
        """The adapted matrix, ``in_proj_weight`` ``(3 * embed_dim, embed_dim)``."""
        return self.in_proj_weight

    @property
    def bias(self) -> Tensor | None:
        return self.in_proj_bias

    @property
    def lora_dropout(self) -> float:
        """The primary in-projection adapter's LoRA dropout (``dropout`` is the attention dropout)."""
        primary = self._primary()
        return primary.dropout if primary is not None else 0.0

    def layer_fields(self) -> dict[str, Any]:
        return {"kind": _KIND, "num_heads": self.num_heads}

    # ------------------------------------------------------------------ files and merging

    @classmethod
    def from_config(
        cls, base: nn.Module, config: Mapping[str, Any], adapter: str = DEFAULT_ADAPTER
    ) -> LoRAMultiheadAttention:
        """Adapt ``base`` as described by a ``config()`` record (adapters freshly initialised).

        Raises:
            LoRAError: If ``base`` is not an ``nn.MultiheadAttention`` of the recorded shape.
        """
        check_mha_config(base, config)
        return cls(base, adapter=adapter, spec=AdapterSpec.from_config(config))  # type: ignore[arg-type]

    def merged_module(self) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` with the adapters (here and in ``out_proj``) folded in.

        See :func:`plain_attention`.

        Raises:
            LoRAError: If a merged weight would contain NaN or Inf.
        """
        return plain_attention(self)

    def extra_repr(self) -> str:
        if not self._lora_adapters:
            return "in_proj: no adapter"
        parts = []
        for name in self.adapter_names:
            view = self.adapter(name)
            label = "" if self.adapter_names == (DEFAULT_ADAPTER,) else f"{name}: "
            if view.covers_all_rows:
                s = view.slices[0]
                parts.append(f"in_proj: {label}r={s.r}, alpha={s.alpha:g}, lora_dropout={view.dropout}")
            else:
                what = ", ".join(f"{s.name}[{s.start}:{s.stop}] r={s.r} alpha={s.alpha:g}" for s in view.slices)
                parts.append(f"in_proj: {label}slices=({what}), lora_dropout={view.dropout}")
            if view.kind.label():
                parts[-1] += f", {view.kind.label()}=True"
        return "; ".join(parts)

    # ------------------------------------------------------------------ forward

    def _tensors(self) -> tuple[Tensor | None, ...]:
        out_proj = self.out_proj
        extra = tuple(out_proj.all_adapter_parameters()) if isinstance(out_proj, LoRALinear) else ()
        return (
            self.in_proj_weight, self.in_proj_bias, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight,
            self.bias_k, self.bias_v, out_proj.weight, out_proj.bias, *self.all_adapter_parameters(), *extra,
        )

    def _routed(self) -> bool:
        return current_route(self) is not None or current_route(self.out_proj) is not None

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention.forward`` with the adapters applied (same arguments and outputs)."""
        masks = (key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        out_proj = self.out_proj
        if self._lora_disabled:  # lora_vit.disable_lora: exactly the base module's function
            # Its weights presented as the base held them (ATen's kernel choice depends on it).
            projections = tuple(
                None if w is None else as_base_weight(w, self.base_requires_grad)
                for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            )
            return merged_attention(self, projections, out_proj.weight, out_proj.bias, query, key, value, *masks)
        running = self._lora_running
        out_running = getattr(out_proj, "_lora_running", None)
        lora_dropout = (out_running is not None and out_running.dropout > 0) or (
            running is not None and running.dropout > 0
        )
        needs_grad = any_requires_grad((query, key, value, *self._tensors()))
        if needs_grad or (self.training and lora_dropout) or self._routed():
            return adapter_attention(self, self._project, self._out_projection, query, key, value, *masks)
        in_weight = running.merged_weight() if running is not None else self.in_proj_weight
        out_adapted = out_running is not None and not out_proj._lora_disabled
        out_weight = out_proj.merged_weight() if out_adapted else out_proj.weight  # type: ignore[operator]
        projections = (in_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        return merged_attention(self, projections, out_weight, out_proj.bias, query, key, value, *masks)

    def _out_projection(self, attended: Tensor, length: int, batch: int) -> Tensor:
        """``out_proj`` on ``(L * N, E)``, as ``(L, N, E)``; batch first while routing per sample."""
        if current_route(self.out_proj) is not None:
            return self.out_proj(attended.view(length, batch, -1).transpose(0, 1)).transpose(0, 1)
        return self.out_proj(attended).view(length, batch, -1)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v in-projections ``(L, N, E)``, ``(S, N, E)``, ``(S, N, E)`` with the adapters applied."""
        w, b = self.in_proj_weight, self.in_proj_bias
        running, route = self._lora_running, current_route(self)
        if route is None and running is None:
            if not self._qkv_same_embed_dim:
                bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
                return F._in_projection(  # type: ignore[attr-defined,no-any-return]
                    query, key, value, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight, bq, bk, bv
                )
            return F._in_projection_packed(query, key, value, w, b)  # type: ignore[attr-defined,no-any-return]
        E = self.embed_dim
        if route is not None:
            def rows(x: Tensor, start: int, stop: int) -> Tensor:
                # Seq-first (L, N, E) in; every row of the packed projection, then the block wanted.
                out = routed_lora(x.transpose(0, 1), w, b, self, route, self.training).transpose(0, 1)
                return out[..., start:stop]
        else:
            assert running is not None
            a, scaled = running.factors()
            p = running.dropout if self.training else 0.0

            def rows(x: Tensor, start: int, stop: int) -> Tensor:
                bias = b[start:stop] if b is not None else None
                return lora_linear(x, w[start:stop], bias, a, scaled[start:stop], p)

        if key is value:
            if query is key:  # self-attention: one projection, one dropout mask for q, k and v
                q, k, v = rows(query, 0, 3 * E).unflatten(-1, (3, E)).movedim(-2, 0).contiguous()
                return q, k, v
            k, v = rows(key, E, 3 * E).unflatten(-1, (2, E)).movedim(-2, 0).contiguous()
            return rows(query, 0, E), k, v
        return rows(query, 0, E), rows(key, E, 2 * E), rows(value, 2 * E, 3 * E)


def check_mha_config(base: nn.Module, config: Mapping[str, Any]) -> None:
    """Refuse a base that is not an ``nn.MultiheadAttention`` of a record's shape.

    Raises:
        LoRAError: Naming what was expected and what was found.
    """
    expected = (config["in_features"], config.get("num_heads"))
    if not isinstance(base, nn.MultiheadAttention):
        raise LoRAError(f"expected an nn.MultiheadAttention, found {type(base).__name__}")
    found = (base.embed_dim, base.num_heads)
    if found != expected or config["out_features"] != 3 * base.embed_dim:
        raise LoRAError(f"expected an nn.MultiheadAttention with (embed_dim, num_heads) = {expected}, found {found}")


def plain_attention(layer: LoRAMultiheadAttention) -> nn.MultiheadAttention:
    """A plain ``nn.MultiheadAttention`` computing what ``layer`` runs, its adapters folded in.

    Merged weights are summed in float32 and rounded once; every other Parameter is shared
    with ``layer``, and each keeps its ``requires_grad``. A layer (or ``out_proj``) without
    adapters gives its base weights back.

    Raises:
        LoRAError: If a merged weight would contain NaN or Inf.
    """
    plain = nn.MultiheadAttention(
        layer.embed_dim, layer.num_heads, dropout=layer.dropout, bias=layer.in_proj_bias is not None,
        add_bias_kv=layer.bias_k is not None, add_zero_attn=layer.add_zero_attn, kdim=layer.kdim, vdim=layer.vdim,
        batch_first=layer.batch_first, device="meta",
    )
    for name, param in layer._parameters.items():
        if not name.startswith("lora_"):
            setattr(plain, name, param)
    if layer._lora_adapters:
        merged = layer.merged_weight()
        if not bool(torch.isfinite(merged).all()):
            raise LoRAError("merging would put NaN or Inf into in_proj_weight")
        plain.in_proj_weight = nn.Parameter(merged, requires_grad=layer.in_proj_weight.requires_grad)
    out_proj: nn.Module = layer.out_proj
    if isinstance(out_proj, LoRALinear):
        out_proj = out_proj.merged_linear() if out_proj.adapter_names else out_proj.plain_linear()
    if type(out_proj) is nn.Linear:  # PyTorch's own class for it, as in an unmodified model
        linear = NonDynamicallyQuantizableLinear(
            out_proj.in_features, out_proj.out_features, bias=out_proj.bias is not None, device="meta"
        )
        linear.weight, linear.bias = out_proj.weight, out_proj.bias
        out_proj = linear
    plain.out_proj = out_proj  # type: ignore[assignment]
    plain.train(layer.training)
    return plain

