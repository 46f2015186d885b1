"""Exact softmax attention through ``scaled_dot_product_attention``: the reference."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attention.base import Attention, AttentionOptions, check_padding_mask, zero_padded_queries
from attention.registry import register


class FullOptions(AttentionOptions):
    bias: bool = True


@register
class FullAttention(Attention):
    """Multi-head softmax attention, O(n^2); the oracle every approximation is tested against."""

    name = "full"
    supports_causal = True
    supports_padding = True
    Options = FullOptions

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=self.options.bias)
        self.out = nn.Linear(d_model, d_model, bias=self.options.bias)

    def forward(self, x, *, key_padding_mask=None, state=None):
        check_padding_mask(x, key_padding_mask)
        q, k, v = (self.split_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        mask = attention_mask(key_padding_mask, x.shape[1], self.causal, x.device)
        dropout = self.options.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=self.causal and mask is None
        )
        y = zero_padded_queries(self.out(self.merge_heads(y)), key_padding_mask)
        return y, None


def attention_mask(
    key_padding_mask: torch.Tensor | None, n: int, causal: bool, device: torch.device
) -> torch.Tensor | None:
    """Merge a key padding mask and causality into one SDPA bool mask [B, 1, n, n] (True = attend).

    Rows of padded queries are let attend to themselves so no row is fully masked (a fully
    masked row is NaN on the math backend); their outputs are zeroed afterwards.
    """
    if key_padding_mask is None:
        return None
    mask = key_padding_mask[:, None, None, :].expand(-1, 1, n, n)
    if causal:
        mask = mask & torch.ones(n, n, dtype=torch.bool, device=device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=device)
    return mask | (eye & ~key_padding_mask[:, None, :, None])
