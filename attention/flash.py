"""FLASH: the gated attention unit with mixed chunk attention (local quadratic + global linear).

Hua et al., ICML 2022, §3 (arXiv 2202.10447); attention_spec.md §4. Like GAU it replaces
attention + FFN (``replaces_ffn = True``; the model builds ``x + flash(norm(x))``).

Shape letters: B batch, n sequence length (padded up to N = G·C), D model width, G chunks,
C chunk length, e expanded width, s query/key width.

Four scale-offset views of the shared Z give Q_quad, K_quad, Q_lin, K_lin. For chunk g:

    Ŷ_quad[g] = relu²(Q_quad[g] K_quad[g]ᵀ / L_quad + b) V[g]    (tril inside g when causal)
    Ŷ_lin[g]  = Q_lin[g] · Σ_h K_lin[h]ᵀ V[h] / L_lin               (all h; h < g when causal)
    y = (U ⊙ (Ŷ_quad + Ŷ_lin)) W_o

The causal linear part is an *exclusive* prefix sum over chunks: the current chunk is seen
only through the quadratic part. Scale constants are an open item of the spec (§15, item 3);
the defaults follow its recommendation and are options: L_quad = C, L_lin = the number of
real tokens of the sequence (non-causal) or C (causal). Defaults: C = 256, s = 128, e = 2D,
Toeplitz bias clipped at ±128 (quadratic part only), RoPE off (option ``rotary``: all four
views, as in lucidrains/FLASH-pytorch). Cost O(n·C·(s + e) + n·s·e) time, O(n·C + G·s·e) memory.
``num_heads`` is accepted for the common interface and ignored: FLASH is single-head.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
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
    pad_to_multiple,
    upcast,
    zero_padded_queries,
)
from attention.registry import register
from parallel.collectives import COLLECTIVE_TIMEOUT
from parallel.tensor_parallel import group_size_and_rank


class FlashOptions(GatedUnitOptions):
    chunk_size: int = Field(256, ge=1, description="C, the local chunk length (paper: 256)")
    linear_part: bool = Field(True, description="the global linear attention across chunks")
    quad_divisor: int | None = Field(None, ge=1, description="L_quad; None = chunk_size")
    linear_divisor: int | None = Field(
        None,
        ge=1,
        description="L_lin; None = real tokens per sequence (non-causal) or chunk_size (causal)",
    )


@register
class FlashAttention(Attention):
    """FLASH mixed chunk attention, linear in n; causal and non-causal, with padding."""

    name = "flash"
    supports_causal = True
    supports_padding = True
    replaces_ffn = True
    # Single-head: tensor parallelism cuts the expanded width e, not heads.
    supports_tensor_parallel = True
    splits_heads = False
    Options = FlashOptions

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        self.core = GatedUnitCore(d_model, self.options, num_views=4)

    def parallelize(self, group: Any, *, timeout: timedelta = COLLECTIVE_TIMEOUT) -> None:
        self.core.check_tensor_parallel(self.name, group_size_and_rank(group)[0])
        super().parallelize(group, timeout=timeout)

    def forward(self, x, *, key_padding_mask=None, state=None):
        """x [B, n, D] (mask bool [B, n], True = real) -> (y [B, n, D], None)."""
        check_padding_mask(x, key_padding_mask)
        options = self.options
        chunk = options.chunk_size
        batch, length, _ = x.shape
        lengths = real_lengths(key_padding_mask, batch, length, x.device)
        x, mask, _ = pad_to_multiple(x, key_padding_mask, chunk)
        num_chunks = x.shape[1] // chunk
        gate, value, views = self.core.project(x)
        with fp32_region(x):
            q_quad, k_quad, q_lin, k_lin = (
                upcast(view).view(batch, num_chunks, chunk, -1) for view in views
            )
            value32 = upcast(value).view(batch, num_chunks, chunk, -1)
            chunk_mask = None if mask is None else mask.view(batch, num_chunks, 1, chunk)
            mixed = self._quadratic(q_quad, k_quad, value32, chunk_mask)
            if options.linear_part:
                keep = None if mask is None else chunk_mask.transpose(-1, -2).to(value32.dtype)
                mixed = self._add_linear(mixed, q_lin, k_lin, value32, keep, lengths)
        mixed = mixed.reshape(batch, num_chunks * chunk, -1).to(gate.dtype)
        y = self.core.out(gate * mixed)
        y = zero_padded_queries(y, mask)
        return y[:, :length], None

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """Multiply-adds per token of one forward: (projections, sequence mixing).

        The module pads n = ``seq_len`` to N = G C (C = ``chunk_size``) and computes on all
        N rows. With e the expanded width, s the query/key width, D model width:

            projections = (3 e D + s D) N / n   (U and V, Z and the output W_o on N rows)
            mixing      = N C (s + e) / n        local relu² scores and their sum of V
                          + 2 N s e / n          K_lin^T V and Q_lin times the state
                                                 (without ``linear_part``: 0)

        The causal linear part computes the same two products per chunk as the
        bidirectional one (a prefix sum between them), so both count 2 N s e. The unit
        replaces attention and the FFN, so this is the whole block's matmul work.
        """
        chunk = self.options.chunk_size
        padded = -(-seq_len // chunk) * chunk
        hidden, qk = self.core.hidden_dim, self.core.qk_dim
        projections = (3 * hidden * self.d_model + qk * self.d_model) * padded
        mixing = padded * chunk * (qk + hidden)
        if self.options.linear_part:
            mixing += 2 * padded * qk * hidden
        return projections / seq_len, mixing / seq_len

    def _quadratic(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        chunk_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Local relu² attention inside each chunk: [B, G, C, s|e] fp32 -> [B, G, C, e].

        ``chunk_mask`` bool [B, G, 1, C] (True = real key) becomes −inf on pad-key columns.
        """
        chunk = query.shape[2]
        divisor = float(self.options.quad_divisor or chunk)
        relative = self.core.bias_matrix(chunk, self.causal, query.dtype, query.device)
        padding = key_padding_bias(chunk_mask, query.dtype)
        weights = relu_squared_scores(query, key, divisor, (relative, padding))
        weights = self.enter_parallel_region(weights)  # read by this rank's channels of V
        if self.training and self.options.dropout > 0:
            weights = F.dropout(weights, p=self.options.dropout)
        return weights @ value

    def _add_linear(
        self,
        local: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        keep: torch.Tensor | None,
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        """local + global linear attention across chunks: [B, G, C, s|e] fp32 -> [B, G, C, e]."""
        batch, num_chunks, chunk, _ = query.shape
        # Replicated views read by this rank's channels of V only: gradients summed over TP.
        query, key = self.enter_parallel_region(query), self.enter_parallel_region(key)
        if keep is not None:
            key = key * keep  # zero K_lin rows at pad keys
        if not self.causal:
            # One state Σ_all k_lin ⊗ v [B, s, e] shared by every chunk: two flat GEMMs.
            flat_key = key.reshape(batch, num_chunks * chunk, -1)
            flat_value = value.reshape(batch, num_chunks * chunk, -1)
            if self.options.linear_divisor is None:
                divisor: torch.Tensor | float = lengths.view(-1, 1, 1)
            else:
                divisor = float(self.options.linear_divisor)
            state = (flat_key.transpose(-1, -2) @ flat_value) / divisor
            flat_query = query.reshape(batch, num_chunks * chunk, -1)
            flat_local = local.reshape(batch, num_chunks * chunk, -1)
            return torch.baddbmm(flat_local, flat_query, state).view_as(local)
        # Σ over the positions of each chunk of k_lin ⊗ v: [B, G, s, e]. Exclusive prefix sum
        # over chunks, built by shifting (not by subtracting the current chunk, which would
        # let future tokens of the chunk leak into the past by rounding).
        chunk_states = key.transpose(-1, -2) @ value
        shifted = F.pad(chunk_states[:, :-1], (0, 0, 0, 0, 1, 0))
        states = shifted.cumsum(dim=1) / float(self.options.linear_divisor or chunk)
        return torch.baddbmm(
            local.reshape(batch * num_chunks, chunk, -1),
            query.reshape(batch * num_chunks, chunk, -1),
            states.reshape(batch * num_chunks, *states.shape[-2:]),
        ).view_as(local)
