"""Linformer (Wang et al., 2020): low-rank projection of keys and values along the sequence.

Shape letters: B batch, n sequence length, D model width, H heads, d head width,
k projected length, N = n_max the longest sequence the projections cover.

    y = softmax( Q (E K)^T / sqrt(d) ) (F V),   E, F in R^{k x N}, sliced to their first n columns

Like fairseq, the *input* is compressed before the key and value projections:
``E K = (E X) W_K + b_K`` (the paper's ``E (X W_K)`` differs only in the bias term, which
there is scaled by E's column sums). Projecting k rows instead of n makes the key and value
projections nearly free: about 30% less fwd+bwd time at n = 8192 than projecting first.
Padded rows of X are zeroed *before* compression (the official self-attention path ignores
the mask, spec §13), so pad contents never reach the output; and because ``E[:, :n] X``
with zero rows past L equals ``E[:, :L] X[:L]``, a right-padded sequence gives the same
output as the unpadded one. Sharing: one E and one F per layer for all heads (headwise
sharing, as in fairseq and lucidrains); ``share_kv`` ties F = E (then X is compressed
once); ``share_layers`` makes every layer of the model use one E (= F) built once by
``build_shared`` (the paper's layerwise sharing; the model owns that module).
Not causal: E mixes every position, so the future would leak.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from attention.base import (
    Attention,
    AttentionOptions,
    check_padding_mask,
    default_scale,
    zero_padded_queries,
)
from attention.registry import register


class LinformerOptions(AttentionOptions):
    """Linformer options; k defaults to 256 (the paper's RoBERTa setting).

    ``n_max`` (the longest sequence E and F cover) has no fixed default: the transformer
    sets it to ``model.max_seq_len`` when the config leaves it unset; a standalone module
    needs it passed.
    """

    k: int = Field(256, ge=1)
    n_max: int | None = Field(None, ge=1)
    share_kv: bool = False
    share_layers: bool = False
    bias: bool = True

    @model_validator(mode="after")
    def _check(self) -> LinformerOptions:
        if self.share_layers and not self.share_kv:
            raise ValueError("share_layers=True needs share_kv=True (the paper's layerwise mode)")
        return self


class SequenceProjection(nn.Module):
    """A learned [k, n_max] matrix that projects the sequence axis n -> k (E or F)."""

    def __init__(self, k: int, n_max: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, n_max))
        # fairseq's init: Xavier uniform with gain 1/sqrt(2).
        nn.init.xavier_uniform_(self.weight, gain=1.0 / math.sqrt(2.0))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [..., n, C] -> [..., k, C], using the first n columns of the weight."""
        n = t.shape[-2]
        return torch.matmul(self.weight[:, :n].to(t.dtype), t)


def _require_n_max(options: AttentionOptions) -> None:
    if getattr(options, "n_max", None) is None:
        raise ValueError(
            "linformer needs n_max, the longest sequence its projections cover; pass n_max=... "
            "(a transformer sets it to model.max_seq_len)"
        )


@register
class LinformerAttention(Attention):
    """Linformer self-attention, O(n k d); encoder-only, needs n <= n_max.

    Defaults: k = 256, n_max = the model's context length (model.max_seq_len; the benchmark
    uses n_max = 8192), one E and one F per layer shared by the heads.
    """

    name = "linformer"
    supports_causal = False
    supports_padding = True
    needs_fixed_max_len = True
    length_option = "n_max"
    # E and F mix positions, not heads (one per layer for every head): replicated.
    supports_tensor_parallel = True
    Options = LinformerOptions

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        o = self.options
        _require_n_max(o)
        self.query = self.make_linear(d_model, d_model, bias=o.bias, split="column")
        self.key_value = self.make_linear(
            d_model, 2 * d_model, bias=o.bias, split="column", parts=2
        )
        self.out = self.make_linear(d_model, d_model, bias=o.bias, split="row")
        shared = kwargs.get("shared")
        if o.share_layers:
            if not isinstance(shared, SequenceProjection):
                raise ValueError("linformer share_layers=True needs shared= from build_shared")
            # Stored outside the module tree so that its parameter is owned by the model once.
            self._shared = [shared]
            self.key_projection = None
            self.value_projection = None
        else:
            self._shared = []
            self.key_projection = SequenceProjection(o.k, o.n_max)
            self.value_projection = None if o.share_kv else SequenceProjection(o.k, o.n_max)

    @classmethod
    def build_shared(
        cls, d_model: int, num_heads: int, options: AttentionOptions
    ) -> nn.Module | None:
        """One E (= F) for every layer when ``share_layers`` is set, else None."""
        if getattr(options, "share_layers", False):
            _require_n_max(options)
            return SequenceProjection(options.k, options.n_max)
        return None

    def projections(self) -> tuple[SequenceProjection, SequenceProjection]:
        """(E, F) used by this layer."""
        if self._shared:
            return self._shared[0], self._shared[0]
        key = self.key_projection
        return key, self.value_projection if self.value_projection is not None else key

    def forward(self, x, *, key_padding_mask=None, state=None):
        check_padding_mask(x, key_padding_mask)
        n = x.shape[1]
        if n > self.options.n_max:
            raise ValueError(
                f"linformer sequence length ({n}) exceeds n_max ({self.options.n_max}); "
                "build it with a larger n_max"
            )
        q = self.split_heads(self.query(x))
        if key_padding_mask is not None:  # zero pads before compression (spec §13)
            x = x * key_padding_mask[..., None].to(x.dtype)
        key_projection, value_projection = self.projections()
        compressed = key_projection(x)  # [B, k, D]
        if value_projection is key_projection:
            k, v = self.key_value(compressed).chunk(2, dim=-1)
        else:
            k = self.key_value.forward_part(0, compressed)
            v = self.key_value.forward_part(1, value_projection(x))
        k, v = self.split_heads(k), self.split_heads(v)  # [B, H, k, d]
        dropout = self.options.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=default_scale(self.head_dim)
        )
        y = zero_padded_queries(self.project_out(y), key_padding_mask)
        return y, None

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """Multiply-adds per token of one forward: (projections, sequence mixing).

        With n = ``seq_len``, k = ``options.k``, D model width and P = 1 projection with
        ``share_kv`` (X is compressed once), else 2:

            projections = 2 D^2 + 2 D^2 k / n   (query and output per token; key and value
                                                 on the k compressed rows)
            mixing      = P k D + 2 k D         (E X and F X; Q (E K)^T and the weighted sum)

        This is what the module computes: it compresses X before the key and value
        projections, so they cost 2 k D^2 per sequence instead of the paper's 2 n D^2, and
        the k x n compression stays a dense matmul (k rows even when n < k).
        """
        n, k, width = seq_len, self.options.k, self.d_model
        compressions = 1 if self.options.share_kv else 2
        projections = 2.0 * width * width + 2.0 * width * width * k / n
        return projections, float(compressions * k * width + 2 * k * width)
