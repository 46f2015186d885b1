"""Exact softmax attention through ``scaled_dot_product_attention``: the reference."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from attention.base import Attention, AttentionOptions
from attention.registry import register


class FullOptions(AttentionOptions):
    bias: bool = True


@register
class FullAttention(Attention):
    """Multi-head softmax attention, O(n^2); the oracle every approximation is tested against."""

    name = "full"
    supports_causal = True
    supports_padding = True
    supports_tensor_parallel = True
    Options = FullOptions

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        self.make_qkv_projections(self.options.bias)

    def attend(self, q, k, v, *, key_padding_mask, state):
        mask = attention_mask(key_padding_mask, q.shape[2], self.causal, q.device)
        dropout = self.options.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=self.causal and mask is None
        )
        return y, None

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """Multiply-adds per token of one forward: (projections, scores).

        Projections 4 D^2 (q, k, v and output); scores 2 n D (Q K^T and the weighted sum of
        V over all n keys, causal or not, as torch's FlopCounterMode counts them).
        """
        return 4.0 * self.d_model * self.d_model, 2.0 * seq_len * self.d_model


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
