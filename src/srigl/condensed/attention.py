"""``nn.MultiheadAttention`` with condensable projections: :class:`CondensedMultiheadAttention`.

``nn.MultiheadAttention`` reads its projections as raw tensors, so they cannot be swapped one by one;
this module re-implements its forward over two projection *modules*, each a
:class:`~srigl.condensed.layers.CondensedLinear` when its tensor is constant fan-in. Shared by
:func:`srigl.condensed.condense` (inference) and compact training (:mod:`srigl.storage.compact`), which also
share :func:`why_attention_not_condensable` and :func:`masked_dense_twin`.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from srigl.masks import get_mask, set_mask
from srigl.condensed.layers import CondensedLinear
from srigl.errors import InvalidConfigError

__all__ = ["CondensedMultiheadAttention", "masked_dense_twin", "why_attention_not_condensable"]



def masked_dense_twin(module: nn.Module, dense_type: type[nn.Module] | None = None) -> nn.Module:
    """The dense twin of a condensed Linear/Conv2d (a new ``dense_type``, default its own dense type),
    zero outside its ``weight_mask`` buffer; the bias Parameter is shared."""
    dense = module.to_dense()
    if dense_type is not None and type(dense) is not dense_type:
        converted = dense_type(dense.in_features, dense.out_features, bias=dense.bias is not None, device="meta")
        converted.weight = dense.weight
        converted.bias = dense.bias
        dense = converted
    if module.bias is not None:
        dense.bias = module.bias
    dense.weight.requires_grad_(module.values.requires_grad)
    set_mask(dense, "weight", module.dense_mask().view_as(dense.weight))
    return dense


def _condensed_projection(linear: nn.Linear, mask: torch.Tensor, name: str) -> CondensedLinear:
    """An attention projection condensed under ``mask``, sharing the original bias Parameter."""
    condensed = CondensedLinear.from_dense(linear, mask, name=name)
    if linear.bias is not None:
        condensed.bias = linear.bias
    return condensed


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask: a bool mask (True = not allowed) becomes 0 / -inf, a float mask is kept."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class CondensedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` whose two projections are modules, so that each can be condensed.

    ``in_proj`` maps ``E -> 3E`` (the rows of ``in_proj_weight``: q, then k, then v) and ``out_proj``
    ``E -> E``. Each is a :class:`CondensedLinear` when its tensor is sparse with constant fan-in,
    else an ``nn.Linear`` holding the original Parameters. :func:`srigl.condensed.condense` uses it for inference and
    compact storage (:mod:`srigl.storage.compact`) for compact training.
    ``forward`` computes what ``nn.MultiheadAttention.forward`` computes, with the same arguments:
    batch-first or not, unbatched inputs, ``key_padding_mask`` and ``attn_mask`` (bool or float),
    ``need_weights``, ``average_attn_weights``, ``is_causal``. Self-attention (``query is key is value``) projects
    once; otherwise each input is projected by the whole ``in_proj`` and its third is kept.

    Only attentions with ``kdim == vdim == embed_dim``, no ``bias_k``/``bias_v`` and no
    ``add_zero_attn`` are converted (see :func:`why_attention_not_condensable`).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, batch_first: bool = False,
                 in_proj: nn.Module | None = None, out_proj: nn.Module | None = None):
        super().__init__()
        if embed_dim % num_heads:
            raise InvalidConfigError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        # None: the projections are added later with add_module (a model loaded from a file).
        if in_proj is not None:
            self.in_proj = in_proj
        if out_proj is not None:
            self.out_proj = out_proj

    @classmethod
    def from_masked(
        cls,
        mha: nn.MultiheadAttention,
        masks: Mapping[str, torch.Tensor],
        name: str = "attn",
        condense_projection: Callable[[nn.Linear, torch.Tensor, str], nn.Module] | None = None,
    ) -> "CondensedMultiheadAttention":
        """Convert ``mha``; ``masks`` maps ``"in_proj_weight"`` and/or ``"out_proj.weight"`` to masks.

        Both projections keep the original bias Parameters; a projection without a mask keeps its
        original weight Parameter too.

        Args:
            mha: the attention; ``kdim == vdim == embed_dim``, no ``bias_k``/``bias_v``, no
                ``add_zero_attn``.
            masks: constant fan-in masks shaped like the projections' weights.
            name: the attention's module name, for error messages.
            condense_projection: ``(linear, mask, tensor name) -> module``; by default
                :meth:`CondensedLinear.from_dense` sharing the original bias Parameter.
        """
        condense_projection = condense_projection or _condensed_projection
        embed_dim = mha.embed_dim
        # A Linear view of in_proj_weight: created on the meta device, then given the real Parameters.
        in_linear = nn.Linear(embed_dim, 3 * embed_dim, bias=mha.in_proj_bias is not None, device="meta")
        in_linear.weight = mha.in_proj_weight
        if mha.in_proj_bias is not None:
            in_linear.bias = mha.in_proj_bias
        in_proj, out_proj = in_linear, mha.out_proj
        if "in_proj_weight" in masks:
            in_proj = condense_projection(in_linear, masks["in_proj_weight"], f"{name}.in_proj_weight")
        if "out_proj.weight" in masks:
            out_proj = condense_projection(mha.out_proj, masks["out_proj.weight"], f"{name}.out_proj.weight")
        return cls(embed_dim, mha.num_heads, mha.dropout, mha.batch_first, in_proj, out_proj)

    def to_dense(self) -> tuple[nn.MultiheadAttention, dict[str, torch.Tensor]]:
        """The equivalent ``nn.MultiheadAttention`` (biases and dense weights shared) and the masks
        of its compact projections, by local name (``"in_proj_weight"``, ``"out_proj.weight"``)."""
        in_proj, out_proj = self.in_proj, self.out_proj
        reference = in_proj.values if isinstance(in_proj, CondensedLinear) else in_proj.weight
        mha = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, dropout=self.dropout, bias=in_proj.bias is not None,
            batch_first=self.batch_first, device="meta", dtype=reference.dtype,
        )
        masks: dict[str, torch.Tensor] = {}
        if isinstance(in_proj, CondensedLinear):
            mha.in_proj_weight = nn.Parameter(in_proj.dense_weight(), requires_grad=in_proj.values.requires_grad)
            masks["in_proj_weight"] = in_proj.dense_mask()
        else:
            mha.in_proj_weight = in_proj.weight
        if in_proj.bias is not None:
            mha.in_proj_bias = in_proj.bias
        if isinstance(out_proj, CondensedLinear):
            mha.out_proj = masked_dense_twin(out_proj, nn.modules.linear.NonDynamicallyQuantizableLinear)
            masks["out_proj.weight"] = get_mask(mha.out_proj, "weight")
        else:
            mha.out_proj = out_proj
        if "in_proj_weight" in masks:
            set_mask(mha, "in_proj_weight", masks["in_proj_weight"])
        return mha, masks

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: ``(output, weights or None)``."""
        if is_causal and attn_mask is None:
            raise InvalidConfigError("is_causal is a hint that attn_mask is causal: pass attn_mask too")
        batched = query.dim() == 3

        def batch_first(t: torch.Tensor) -> torch.Tensor:  # -> (B, L, E)
            if not batched:
                return t.unsqueeze(0)
            return t if self.batch_first else t.transpose(0, 1)

        embed_dim, heads, head_dim = self.embed_dim, self.num_heads, self.head_dim
        if query is key and key is value:
            q, k, v = self.in_proj(batch_first(query)).chunk(3, dim=-1)  # (B, L, 3E) -> 3 x (B, L, E)
        else:
            q = self.in_proj(batch_first(query))[..., :embed_dim]  # (B, L, E)
            projected_key = self.in_proj(batch_first(key))  # (B, S, 3E)
            k = projected_key[..., embed_dim : 2 * embed_dim]
            v = (projected_key if key is value else self.in_proj(batch_first(value)))[..., 2 * embed_dim :]
        batch, length, source = q.shape[0], q.shape[1], k.shape[1]
        q = q.reshape(batch, length, heads, head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = k.reshape(batch, source, heads, head_dim).transpose(1, 2)  # (B, H, S, hd)
        v = v.reshape(batch, source, heads, head_dim).transpose(1, 2)  # (B, H, S, hd)

        # As nn.MultiheadAttention: is_causal replaces the mask only when nothing else must be merged in.
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None
        if attn_mask is not None and not causal:
            mask = _float_mask(attn_mask, q.dtype)
            # (L, S) or (1, L, S) -> (1, 1, L, S); (B * H, L, S) -> (B, H, L, S)
            mask = mask.reshape(1, 1, length, source) if mask.dim() == 2 or mask.shape[0] == 1 else \
                mask.reshape(batch, heads, length, source)
        if key_padding_mask is not None:
            padding = _float_mask(key_padding_mask, q.dtype).reshape(batch, 1, 1, source)  # (B, 1, 1, S)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * head_dim**-0.5) @ k.transpose(-2, -1)  # (B, H, L, S)
            weights = (scores if mask is None else scores + mask).softmax(dim=-1)
            out = F.dropout(weights, dropout) @ v if dropout > 0 else weights @ v  # (B, H, L, hd)
            if average_attn_weights:
                weights = weights.mean(dim=1)  # (B, L, S)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, embed_dim))  # (B, H, L, hd) -> (B, L, E)
        if not batched:
            out = out.squeeze(0)  # (L, E)
        elif not self.batch_first:
            out = out.transpose(0, 1)  # (L, B, E)
        return out, weights

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}"
        )


def why_attention_not_condensable(mha: nn.MultiheadAttention, parent: nn.Module | None) -> str | None:
    """Why ``mha`` (child of ``parent``) cannot become a :class:`CondensedMultiheadAttention`, or None.

    Used by :func:`srigl.condensed.condense` and by compact training (:mod:`srigl.storage.compact`) alike.
    """
    if mha.in_proj_weight is None or mha.bias_k is not None or mha.add_zero_attn:
        return "MultiheadAttention with kdim/vdim != embed_dim, bias_k/bias_v or add_zero_attn"
    if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return f"MultiheadAttention inside {type(parent).__name__}, whose fast path reads its raw tensors"
    if parent is None:
        return "the root module cannot be swapped"
    return None
