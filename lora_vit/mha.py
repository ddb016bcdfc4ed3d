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
from torch.nn.modules.activation import _arg_requires_grad, _check_arg_device, _is_make_fx_tracing
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .errors import LoRAError
from .functional import as_base_weight, lora_linear
from .layer import LoRALinear, _build_slices, check_dropout, check_init

__all__ = ["LoRAMultiheadAttention", "check_adaptable_mha", "qkv_bounds"]

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


class LoRAMultiheadAttention(nn.MultiheadAttention):
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

    # The adapter math is LoRALinear's, over ``weight`` (= in_proj_weight): the same functions,
    # called on this module (it has every attribute they read), so the two layers cannot drift
    # apart (a test compares them).
    use_dora = False  # DoRA is refused on the in-projection (lora_vit.adapters.build_adapter)

    def reset_parameters(self) -> None:
        """Re-initialise the in-projection adapters (A random, B zero); base weights untouched."""
        LoRALinear.reset_parameters(self)  # type: ignore[arg-type]

    def adapter_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(attribute name, shape)`` of every in-projection adapter Parameter, in slice order."""
        return LoRALinear.adapter_shapes(self)  # type: ignore[arg-type]

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The in-projection adapter Parameters ``[A, B, ...]`` in slice order."""
        return LoRALinear.adapter_parameters(self)  # type: ignore[arg-type]

    def stacked_a(self) -> Tensor:
        """All slices' ``A`` stacked: ``(sum of ranks, embed_dim)``."""
        return LoRALinear.stacked_a(self)  # type: ignore[arg-type]

    def scaled_b(self, dtype: torch.dtype | None = None) -> Tensor:
        """Every slice's ``scaling * B`` at its rows: ``(3 * embed_dim, sum of ranks)``."""
        return LoRALinear.scaled_b(self, dtype)  # type: ignore[arg-type]

    def merge_dtype(self) -> torch.dtype:
        """Float32, or the base dtype where it is wider."""
        return LoRALinear.merge_dtype(self)  # type: ignore[arg-type]

    def delta_weight(self) -> Tensor:
        """The in-projection update ``scaling * B @ A`` in :meth:`merge_dtype`: ``(3 * embed_dim, embed_dim)``."""
        return LoRALinear.delta_weight(self)  # type: ignore[arg-type]

    def merged_weight(self) -> Tensor:
        """``in_proj_weight + scaling * B @ A``, summed in float32 and rounded once."""
        return LoRALinear.merged_weight(self)  # type: ignore[arg-type]

    # Set only by lora_vit.disable_lora: the base module's function, adapters kept in place.
    _lora_disabled = False

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
    ) -> None:
        if not isinstance(base, nn.MultiheadAttention):
            raise LoRAError(f"LoRAMultiheadAttention adapts nn.MultiheadAttention, got {type(base).__name__}")
        nn.Module.__init__(self)
        self.training = base.training
        for attr in _COPIED:
            setattr(self, attr, getattr(base, attr))
        for name, param in base._parameters.items():
            if name.startswith("lora_"):
                continue  # a routing-only LoRAMultiheadAttention has none, an adapted one is refused below
            self.register_parameter(name, param)
        if base.bias_k is None:
            self.bias_k = self.bias_v = None
        self.out_proj = base.out_proj
        projection = base.in_proj_weight if base._qkv_same_embed_dim else base.q_proj_weight
        self.base_requires_grad = projection.requires_grad  # before inject_lora freezes it: see disable_lora
        self.in_features = self.embed_dim
        self.out_features = 3 * self.embed_dim
        self.lora_dropout = check_dropout(dropout)
        self.init = check_init(init)
        self.use_rslora = bool(use_rslora)
        if isinstance(base, LoRAMultiheadAttention) and base.slices:
            raise LoRAError("this nn.MultiheadAttention already has in-projection adapters; merge or reload first")
        if slices is not None and len(slices) == 0:
            self.slices: tuple = ()
        else:
            check_adaptable_mha(base, type(base).__name__)
            self.slices = _build_slices(self.out_features, self.in_features, slices, r, alpha)
        self.scalings = tuple(s.scaling(self.use_rslora) for s in self.slices)
        self.covers_all_rows = len(self.slices) == 1 and self.slices[0].rows == self.out_features
        weight = self.in_proj_weight if self.slices else None
        for s in self.slices:
            assert weight is not None
            a = torch.empty(s.r, self.in_features, device=weight.device, dtype=weight.dtype)
            self.register_parameter(s.a_name, nn.Parameter(a))
            self.register_parameter(s.b_name, nn.Parameter(torch.empty(s.rows, s.r, device=a.device, dtype=a.dtype)))
        self.reset_parameters()
        self.register_forward_pre_hook(_route_parents_through_forward)

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

    # ------------------------------------------------------------------ files and merging

    def config(self) -> dict[str, Any]:
        """A JSON-ready description from which :meth:`from_config` rebuilds this layer's shape."""
        return {
            "kind": _KIND,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "num_heads": self.num_heads,
            "dropout": self.lora_dropout,
            "use_rslora": self.use_rslora,
            "slices": [s.config() for s in self.slices],
        }

    @classmethod
    def from_config(cls, base: nn.Module, config: Mapping[str, Any]) -> LoRAMultiheadAttention:
        """Adapt ``base`` as described by :meth:`config` (adapters freshly initialised).

        Raises:
            LoRAError: If ``base`` is not an ``nn.MultiheadAttention`` of the recorded shape.
        """
        expected = (config["in_features"], config.get("num_heads"))
        if not isinstance(base, nn.MultiheadAttention):
            raise LoRAError(f"expected an nn.MultiheadAttention, found {type(base).__name__}")
        found = (base.embed_dim, base.num_heads)
        if found != expected or config["out_features"] != 3 * base.embed_dim:
            raise LoRAError(
                f"expected an nn.MultiheadAttention with (embed_dim, num_heads) = {expected}, found {found}"
            )
        entries = config["slices"]
        if len(entries) == 1 and entries[0]["name"] == "":
            only = entries[0]
            if (only["start"], only["stop"]) != (0, config["out_features"]):
                raise LoRAError(f"an unnamed slice must cover all rows, got {only}")
            return cls(base, only["r"], only["alpha"], config["dropout"], use_rslora=config["use_rslora"])
        return cls(
            base,
            {e["name"]: e["r"] for e in entries},
            {e["name"]: e["alpha"] for e in entries},
            config["dropout"],
            slices={e["name"]: (e["start"], e["stop"]) for e in entries},
            use_rslora=config["use_rslora"],
        )

    def merged_module(self) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` with the adapters (here and in ``out_proj``) folded in.

        Merged weights are summed in float32 and rounded once; every other Parameter is shared
        with this module, and each keeps its ``requires_grad``.

        Raises:
            LoRAError: If a merged weight would contain NaN or Inf.
        """
        plain = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, dropout=self.dropout, bias=self.in_proj_bias is not None,
            add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn, kdim=self.kdim, vdim=self.vdim,
            batch_first=self.batch_first, device="meta",
        )
        for name, param in self._parameters.items():
            if not name.startswith("lora_"):
                setattr(plain, name, param)
        if self.slices:
            merged = self.merged_weight()
            if not bool(torch.isfinite(merged).all()):
                raise LoRAError("merging would put NaN or Inf into in_proj_weight")
            plain.in_proj_weight = nn.Parameter(merged, requires_grad=self.in_proj_weight.requires_grad)
        out_proj: nn.Module = self.out_proj
        if isinstance(out_proj, LoRALinear):
            out_proj = out_proj.merged_linear()
        if type(out_proj) is nn.Linear:  # PyTorch's own class for it, as in an unmodified model
            linear = NonDynamicallyQuantizableLinear(
                out_proj.in_features, out_proj.out_features, bias=out_proj.bias is not None, device="meta"
            )
            linear.weight, linear.bias = out_proj.weight, out_proj.bias
            out_proj = linear
        plain.out_proj = out_proj  # type: ignore[assignment]
        plain.train(self.training)
        return plain

    def extra_repr(self) -> str:
        if not self.slices:
            return "in_proj: no adapter"
        if self.covers_all_rows:
            s = self.slices[0]
            return f"in_proj: r={s.r}, alpha={s.alpha:g}, lora_dropout={self.lora_dropout}"
        parts = ", ".join(f"{s.name}[{s.start}:{s.stop}] r={s.r} alpha={s.alpha:g}" for s in self.slices)
        return f"in_proj: slices=({parts}), lora_dropout={self.lora_dropout}"

    # ------------------------------------------------------------------ forward

    def _tensors(self) -> tuple[Tensor | None, ...]:
        out_proj = self.out_proj
        extra = tuple(out_proj.adapter_parameters()) if isinstance(out_proj, LoRALinear) else ()
        return (
            self.in_proj_weight, self.in_proj_bias, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight,
            self.bias_k, self.bias_v, out_proj.weight, out_proj.bias, *self.adapter_parameters(), *extra,
        )

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
        if self._lora_disabled:  # lora_vit.disable_lora: exactly the base module's function
            return self._merged_forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal,
                adapted=False,
            )
        lora_dropout = (isinstance(self.out_proj, LoRALinear) and self.out_proj.dropout > 0) or self.lora_dropout > 0
        needs_grad = torch.is_grad_enabled() and any(
            _arg_requires_grad(t) for t in (query, key, value, *self._tensors())
        )
        if needs_grad or (self.training and lora_dropout):
            return self._adapter_forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        return self._merged_forward(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )

    def _merged_weights(self, adapted: bool) -> tuple[tuple[Tensor | None, ...], Tensor, Tensor | None]:
        """``((in_proj, q_proj, k_proj, v_proj), out_proj weight, out_proj bias)`` for PyTorch's attention."""
        projections: tuple[Tensor | None, ...] = (
            self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        )
        if not adapted:  # the base module's function: its weights presented as it held them
            projections = tuple(None if w is None else as_base_weight(w, self.base_requires_grad) for w in projections)
        elif self.slices:
            projections = (self.merged_weight(), *projections[1:])
        out_proj = self.out_proj
        out_adapted = adapted and isinstance(out_proj, LoRALinear) and not out_proj._lora_disabled
        out_weight = out_proj.merged_weight() if out_adapted else out_proj.weight  # type: ignore[operator]
        return projections, out_weight, out_proj.bias

    def _merged_forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None, need_weights: bool,
        attn_mask: Tensor | None, average_attn_weights: bool, is_causal: bool, adapted: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        # nn.MultiheadAttention.forward's own logic, with the merged weights in place of its Parameters.
        (in_weight, q_weight, k_weight, v_weight), out_weight, out_bias = self._merged_weights(adapted)
        float_mask = (attn_mask is not None and torch.is_floating_point(attn_mask)) or (
            key_padding_mask is not None and torch.is_floating_point(key_padding_mask)
        )
        batched = query.dim() == 3
        key_padding_mask, attn_mask = _canonical_masks(key_padding_mask, attn_mask, query)
        tensors = (query, key, value, in_weight, self.in_proj_bias, out_weight, out_bias)
        fast = (
            not float_mask
            and torch.backends.mha.get_fastpath_enabled()
            and batched
            and query is key
            and key is value
            and in_weight is not None
            and self.in_proj_bias is not None
            and out_bias is not None
            and query.dtype == self.in_proj_bias.dtype == in_weight.dtype
            and not self.training
            and self.num_heads % 2 == 0
            and self.batch_first
            and self.bias_k is None
            and self.bias_v is None
            and not self.add_zero_attn
            and self._qkv_same_embed_dim
            and not (query.is_nested and (key_padding_mask is not None or attn_mask is not None))
            and not torch.is_autocast_enabled()
            and not torch.overrides.has_torch_function(tensors)
            and all(_check_arg_device(t) for t in tensors)
            and not (torch.is_grad_enabled() and any(_arg_requires_grad(t) for t in tensors))
        )
        traced = fast and _is_make_fx_tracing()
        if fast and not traced:
            assert in_weight is not None and self.in_proj_bias is not None and out_bias is not None
            merged_mask, mask_type = self.merge_masks(attn_mask, key_padding_mask, query)
            return torch._native_multi_head_attention(
                query, key, value, self.embed_dim, self.num_heads, in_weight, self.in_proj_bias, out_weight,
                out_bias, merged_mask, need_weights, average_attn_weights, mask_type,
            )
        if query.is_nested or key.is_nested or value.is_nested:
            raise LoRAError("nested tensors are supported only on nn.MultiheadAttention's inference fast path")
        query, key, value = self._seq_first(query, key, value, batched)
        output, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, in_weight, self.in_proj_bias, self.bias_k,
            self.bias_v, self.add_zero_attn, self.dropout, out_weight, out_bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=not self._qkv_same_embed_dim, q_proj_weight=q_weight,
            k_proj_weight=k_weight, v_proj_weight=v_weight,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        if self.batch_first and batched:
            output = output.transpose(1, 0)
            if traced:  # the layout PyTorch gives when tracing blocks its fast path
                output = output.contiguous()
        return output, weights

    def _seq_first(self, query: Tensor, key: Tensor, value: Tensor, batched: bool) -> tuple[Tensor, Tensor, Tensor]:
        """``(N, L, E)`` -> ``(L, N, E)`` when ``batch_first``, keeping which inputs are the same tensor."""
        if not (self.batch_first and batched):
            return query, key, value
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        return query, key, value

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v in-projections ``(L, N, E)``, ``(S, N, E)``, ``(S, N, E)`` with the adapters applied."""
        w, b = self.in_proj_weight, self.in_proj_bias
        if not self.slices:
            if not self._qkv_same_embed_dim:
                bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
                return F._in_projection(  # type: ignore[attr-defined,no-any-return]
                    query, key, value, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight, bq, bk, bv
                )
            return F._in_projection_packed(query, key, value, w, b)  # type: ignore[attr-defined,no-any-return]
        E = self.embed_dim
        a, scaled_b = self.stacked_a(), self.scaled_b()
        p = self.lora_dropout if self.training else 0.0

        def rows(x: Tensor, start: int, stop: int) -> Tensor:
            bias = b[start:stop] if b is not None else None
            return lora_linear(x, w[start:stop], bias, a, scaled_b[start:stop], p)

        if key is value:
            if query is key:  # self-attention: one projection, one dropout mask for q, k and v
                q, k, v = rows(query, 0, 3 * E).unflatten(-1, (3, E)).movedim(-2, 0).contiguous()
                return q, k, v
            k, v = rows(key, E, 3 * E).unflatten(-1, (2, E)).movedim(-2, 0).contiguous()
            return rows(query, 0, E), k, v
        return rows(query, 0, E), rows(key, E, 2 * E), rows(value, 2 * E, 3 * E)

    def _adapter_forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None, need_weights: bool,
        attn_mask: Tensor | None, average_attn_weights: bool, is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        # The steps of F.multi_head_attention_forward, with the in-projection through the LoRA
        # node and out_proj called as a module.
        batched_input = query.dim() == 3
        key_padding_mask, attn_mask = _canonical_masks(key_padding_mask, attn_mask, query)
        if query.is_nested or key.is_nested or value.is_nested:
            raise LoRAError("nested tensors are supported only on nn.MultiheadAttention's inference fast path")
        query, key, value = self._seq_first(query, key, value, batched_input)
        H = self.num_heads
        batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, H)  # type: ignore[attr-defined]
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        L, N, E = query.shape
        if self.embed_dim != E:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {E}")
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method"
                " `generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        elif key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal
        if self._qkv_same_embed_dim and key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if not self._qkv_same_embed_dim and key.shape[:2] != value.shape[:2]:
            raise AssertionError(
                f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}"
            )
        q, k, v = self._project(query, key, value)
        S = key.shape[0]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (L, S):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(L, S)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (N * H, L, S):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be {(N * H, L, S)}."
                    )
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, N, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, N, 1)])
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        hd = self.head_dim
        q = q.view(L, N * H, hd).transpose(0, 1)
        k = k.view(k.shape[0], N * H, hd).transpose(0, 1)
        v = v.view(v.shape[0], N * H, hd).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((N * H, 1, hd), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        S = k.size(1)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (N, S):
                raise AssertionError(f"expecting key_padding_mask shape of {(N, S)}, but got {key_padding_mask.shape}")
            key_padding_mask = key_padding_mask.view(N, 1, 1, S).expand(-1, H, -1, -1).reshape(N * H, 1, S)
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            if is_causal and attn_mask is None:
                raise AssertionError("FIXME: is_causal not implemented for need_weights")
            q_scaled = q * (1.0 / hd) ** 0.5
            if attn_mask is not None:
                scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                scores = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            attended = torch.bmm(weights, v).transpose(0, 1).reshape(L * N, E)
            weights = weights.view(N, H, L, S)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            if attn_mask is not None:
                attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 else attn_mask.view(N, H, -1, S)
            attended = F.scaled_dot_product_attention(
                q.view(N, H, L, hd), k.view(N, H, S, hd), v.view(N, H, S, hd), attn_mask, dropout_p, is_causal
            )
            attended = attended.permute(2, 0, 1, 3).reshape(L * N, E)
        output = self.out_proj(attended).view(L, N, -1)
        if not batched:
            output = output.squeeze(1)
        elif self.batch_first:
            output = output.transpose(1, 0)
        return output, weights


def _canonical_masks(
    key_padding_mask: Tensor | None, attn_mask: Tensor | None, query: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """Both masks as float additive masks, checked as ``nn.MultiheadAttention`` checks them."""
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask", target_type=query.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype,
        check_other=False,
    )
    return key_padding_mask, attn_mask
