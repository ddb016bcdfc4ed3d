"""PyTorch's ``nn.MultiheadAttention`` forward, step by step: the one copy of its internals.

:class:`lora_vit.LoRAMultiheadAttention` needs two things PyTorch does not expose: its forward
with other weights than its Parameters (:func:`merged_attention`, keeping the fused
``torch._native_multi_head_attention`` fast path where PyTorch itself takes it), and its
steps with the in- and out-projections replaced by callables (:func:`adapter_attention`).
Everything here follows ``torch/nn/modules/activation.py`` and ``torch/nn/functional.py``
(torch 2.13) so the results are PyTorch's; nothing else in lora-vit reaches into them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.activation import _arg_requires_grad, _check_arg_device, _is_make_fx_tracing
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .errors import LoRAError

__all__ = [
    "NonDynamicallyQuantizableLinear",
    "adapter_attention",
    "any_requires_grad",
    "canonical_masks",
    "merged_attention",
    "seq_first",
]


def any_requires_grad(tensors: tuple[Tensor | None, ...]) -> bool:
    """Whether autograd will want a gradient of any of ``tensors``, as PyTorch's attention decides it."""
    return torch.is_grad_enabled() and any(_arg_requires_grad(t) for t in tensors)


def merged_attention(
    self: nn.MultiheadAttention, projections: tuple[Tensor | None, ...], out_weight: Tensor, out_bias: Tensor | None,
    query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None, need_weights: bool,
    attn_mask: Tensor | None, average_attn_weights: bool, is_causal: bool,
) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward``'s own logic, with the given weights in place of its Parameters.

    ``projections`` is ``(in_proj_weight, q_proj_weight, k_proj_weight, v_proj_weight)``.
    """
    in_weight, q_weight, k_weight, v_weight = projections
    float_mask = (attn_mask is not None and torch.is_floating_point(attn_mask)) or (
        key_padding_mask is not None and torch.is_floating_point(key_padding_mask)
    )
    batched = query.dim() == 3
    key_padding_mask, attn_mask = canonical_masks(key_padding_mask, attn_mask, query)
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
    query, key, value = seq_first(self, query, key, value, batched)
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


def seq_first(
    self: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor, batched: bool
) -> tuple[Tensor, Tensor, Tensor]:
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


def adapter_attention(
    self: nn.MultiheadAttention, project: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
    out_projection: Callable[[Tensor, int, int], Tensor], query: Tensor, key: Tensor, value: Tensor,
    key_padding_mask: Tensor | None, need_weights: bool,
    attn_mask: Tensor | None, average_attn_weights: bool, is_causal: bool,
) -> tuple[Tensor, Tensor | None]:
    """The steps of ``F.multi_head_attention_forward``, with ``project`` as the in-projection and
    ``out_projection(attended (L * N, E), L, N) -> (L, N, E)`` as the output projection."""
    batched_input = query.dim() == 3
    key_padding_mask, attn_mask = canonical_masks(key_padding_mask, attn_mask, query)
    if query.is_nested or key.is_nested or value.is_nested:
        raise LoRAError("nested tensors are supported only on nn.MultiheadAttention's inference fast path")
    query, key, value = seq_first(self, query, key, value, batched_input)
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
    q, k, v = project(query, key, value)
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
    output = out_projection(attended, L, N)
    if not batched:
        output = output.squeeze(1)
    elif self.batch_first:
        output = output.transpose(1, 0)
    return output, weights



def canonical_masks(
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
