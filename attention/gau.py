"""The gated attention unit (GAU), quadratic: one relu²-attention head gating an expanded MLP.

Hua et al., ICML 2022, §2 (arXiv 2202.10447); attention_spec.md §4. Replaces attention + FFN
(the paper stacks two GAUs per former attention + FFN pair), so ``replaces_ffn = True`` and
the model builds the block as ``x + gau(norm(x))``.

Shape letters: B batch, n sequence length, D model width, e expanded width, s query/key
width.

    y = (U ⊙ (A V)) W_o,   A = relu²(Q Kᵀ / L + b),   Q = Z ⊙ γ_q + β_q,  K = Z ⊙ γ_k + β_k

Defaults: expansion 2 (e = 2D), s = 128, learned Toeplitz bias clipped at ±128, RoPE off
(option ``rotary``), and L = the number of real tokens of each sequence (the paper's ``/ n``,
computed from the padding mask so that padding a batch does not change the scale; spec §4
pitfalls). ``score_divisor`` fixes L instead (JunnYu's port uses 512). In causal mode L is
still the sequence's real length: it is known when training on fixed-length blocks, but set
``score_divisor`` for token-by-token generation, where the length grows.
``num_heads`` is accepted for the common interface and ignored: GAU is single-head.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.nn.functional as F
from pydantic import Field

from attention._gau_common import (
    GatedUnitCore,
    GatedUnitOptions,
    key_padding_bias,
    real_lengths,
    relu_squared_scores,
)
from attention.base import (
    Attention,
    check_padding_mask,
    fp32_region,
    upcast,
    zero_padded_queries,
)
from attention.registry import register
from parallel.collectives import COLLECTIVE_TIMEOUT
from parallel.tensor_parallel import group_size_and_rank


class GAUOptions(GatedUnitOptions):
    score_divisor: int | None = Field(
        None,
        ge=1,
        description="L in relu²(QKᵀ/L + b); None = real tokens per sequence (paper's n)",
    )


@register
class GatedAttentionUnit(Attention):
    """Quadratic GAU, O(n²(s + e)) time and O(n²) memory; causal via a lower-triangular A."""

    name = "gau"
    supports_causal = True
    supports_padding = True
    replaces_ffn = True
    # Single-head: tensor parallelism cuts the expanded width e, not heads.
    supports_tensor_parallel = True
    splits_heads = False
    Options = GAUOptions

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        self.core = GatedUnitCore(d_model, self.options, num_views=2)

    def parallelize(self, group: Any, *, timeout: timedelta = COLLECTIVE_TIMEOUT) -> None:
        self.core.check_tensor_parallel(self.name, group_size_and_rank(group)[0])
        super().parallelize(group, timeout=timeout)

    def forward(self, x, *, key_padding_mask=None, state=None):
        """x [B, n, D] (mask bool [B, n], True = real) -> (y [B, n, D], None)."""
        check_padding_mask(x, key_padding_mask)
        batch, length, _ = x.shape
        gate, value, (query, key) = self.core.project(x)
        if self.options.score_divisor is None:
            divisor = real_lengths(key_padding_mask, batch, length, x.device)[:, None, None]
        else:
            divisor = float(self.options.score_divisor)
        with fp32_region(x):
            dtype = upcast(query).dtype
            relative = self.core.bias_matrix(length, self.causal, dtype, x.device)
            padding = None
            if key_padding_mask is not None:
                padding = key_padding_bias(key_padding_mask[:, None, :], dtype)
            weights = relu_squared_scores(query, key, divisor, (relative, padding))
            weights = self.enter_parallel_region(weights)  # read by this rank's channels of V
            if self.training and self.options.dropout > 0:
                weights = F.dropout(weights, p=self.options.dropout)
            mixed = weights @ upcast(value)
        y = self.core.out(gate * mixed.to(gate.dtype))
        return zero_padded_queries(y, key_padding_mask), None

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """Multiply-adds per token of one forward: (projections, sequence mixing).

        With n = ``seq_len``, e the expanded width, s the query/key width, D model width:

            projections = 3 e D + s D   (U and V: 2 e D, Z: s D, the output W_o: e D)
            mixing      = n (s + e)     (relu² scores Q K^T over n keys and their sum of V)

        The unit replaces attention and the FFN, so this is the whole block's matmul work.
        """
        hidden, qk = self.core.hidden_dim, self.core.qk_dim
        return float(3 * hidden * self.d_model + qk * self.d_model), float(seq_len * (qk + hidden))
