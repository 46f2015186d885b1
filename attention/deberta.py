"""DeBERTa disentangled attention: content-to-content + content-to-position + position-to-content.

He et al., ICLR 2021 (arXiv 2006.03654), v2/v3 variant as in microsoft/DeBERTa
``disentangled_attention.py``; attention_spec.md §10. Not an efficient-attention method:
O(n²d) time and O(n²) memory, plus O(n·k·d) for the position projections.

Shape letters: B batch, n length, D model width, H heads, d = D / H, k bucket span
(the table has 2k rows), r table rows actually used for this length (r <= 2k).

    Ã_ij = Q_i·K_jᵀ + Q_i·K^r_{δ(i,j)}ᵀ + K_j·Q^r_{p(i,j)}ᵀ,   scaled by 1/√(d·(1 + #terms))
    δ(i,j) = clip(bucket(i − j), −k, k − 1) + k

bucket() is exact within ±k/2 and logarithmic out to ``max_relative_positions``. K^r and Q^r
project one relative-position table P [2k, D] that every layer shares (``build_shared``;
LayerNorm on P as in v2/v3); with ``share_att_key`` (v2/v3 default) they reuse the content
key and query projections. There are no absolute positions, so the layer is relative-shift
invariant.

Spec open item 5, the p2c index p(i, j): the paper prints δ(j, i); the released code (its
gather of ``clamp(-r_pos + k)`` followed by a transpose) computes δ(i, j), the same index
as c2p. Default ``p2c_index="code"`` (what every released checkpoint was trained with);
``"paper"`` gives δ(j, i). Both are tested against a naive double loop.

Causal use is a mask on the scores (``supports_causal = True``, not in the paper, which is an
encoder). Defaults (deberta-v3-base): position_buckets 256, max_relative_positions 512,
pos_att_type c2p + p2c, share_att_key, LayerNorm on the table.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from attention.base import (
    Attention,
    AttentionOptions,
    upcast,
)
from attention.registry import register


class DebertaOptions(AttentionOptions):
    position_buckets: int = Field(
        256, ge=0, description="k; 0 = no log buckets, plain clip at ±max_relative_positions"
    )
    max_relative_positions: int = Field(512, ge=1, description="distance where log buckets end")
    pos_att_type: tuple[Literal["c2p", "p2c"], ...] = ("c2p", "p2c")
    share_att_key: bool = True
    norm_rel_embeddings: bool = True
    p2c_index: Literal["code", "paper"] = "code"
    bias: bool = True

    @model_validator(mode="after")
    def _check(self) -> DebertaOptions:
        if len(set(self.pos_att_type)) != len(self.pos_att_type):
            raise ValueError(f"pos_att_type {self.pos_att_type} has a repeated term")
        half = self.position_buckets // 2
        if self.position_buckets and (half < 1 or self.max_relative_positions <= half + 1):
            raise ValueError(
                f"position_buckets ({self.position_buckets}) must be >= 2 and "
                f"max_relative_positions ({self.max_relative_positions}) > position_buckets/2 + 1"
            )
        return self

    @property
    def span(self) -> int:
        """k: the table has 2k rows."""
        return self.position_buckets or self.max_relative_positions


class RelativePositionTable(nn.Module):
    """The relative-position embeddings P [2k, D] shared by every DeBERTa layer of a model."""

    def __init__(self, d_model: int, num_rows: int, layer_norm: bool) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(torch.randn(num_rows, d_model) * 0.02)
        self.norm = nn.LayerNorm(d_model) if layer_norm else nn.Identity()

    def forward(self) -> torch.Tensor:
        """P after the optional LayerNorm: [2k, D]."""
        return self.norm(self.embeddings)


def relative_buckets(distance: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """Map signed distances (int64, any shape) to signed buckets; identity when buckets = 0.

    |r| <= buckets/2 is kept; beyond, half + ceil(log(|r|/half) / log((max−1)/half)·(half−1)),
    which reaches buckets − 1 at |r| = max_distance − 1.
    """
    if buckets <= 0:
        return distance
    half = buckets // 2
    magnitude = distance.abs()
    ratio = magnitude.clamp(min=half).double() / half
    log_bucket = half + torch.ceil(
        torch.log(ratio) / math.log((max_distance - 1) / half) * (half - 1)
    )
    return torch.where(magnitude <= half, distance, distance.sign() * log_bucket.long())


def relative_index(length: int, options: DebertaOptions, device: torch.device) -> torch.Tensor:
    """δ(i, j) = clip(bucket(i − j), −k, k − 1) + k as int64 [n, n].

    Recomputed per call from arange (no cached table), so it is a pure function of n.
    """
    span = options.span
    distance = torch.arange(-(length - 1), length, device=device)  # i - j for 2n - 1 offsets
    buckets = relative_buckets(distance, options.position_buckets, options.max_relative_positions)
    per_offset = buckets.clamp(-span, span - 1) + span
    positions = torch.arange(length, device=device)
    return per_offset[positions[:, None] - positions[None, :] + length - 1]


@register
class DebertaAttention(Attention):
    """Disentangled multi-head attention with log-bucketed relative positions."""

    name = "deberta"
    supports_causal = True
    supports_padding = True
    # K^r and Q^r are projected per head by column-split linears; the table P stays
    # replicated (its gradient is summed over the group by those linears).
    supports_tensor_parallel = True
    Options = DebertaOptions

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        shared = kwargs.get("shared")
        super().__init__(d_model, num_heads, **kwargs)
        options = self.options
        if shared is None:
            shared = self.build_shared(d_model, num_heads, options)
        rows = 2 * options.span
        if not isinstance(shared, RelativePositionTable) or tuple(shared.embeddings.shape) != (
            rows,
            d_model,
        ):
            raise ValueError(
                f"shared must be the RelativePositionTable [{rows}, {d_model}] from "
                f"DebertaAttention.build_shared, got {type(shared).__name__}"
            )
        self.relative_table = shared
        self.query = self.make_linear(d_model, d_model, bias=options.bias, split="column")
        self.key = self.make_linear(d_model, d_model, bias=options.bias, split="column")
        self.value = self.make_linear(d_model, d_model, bias=options.bias, split="column")
        self.out = self.make_linear(d_model, d_model, bias=options.bias, split="row")
        if not options.share_att_key:
            self.position_key = self.make_linear(
                d_model, d_model, bias=options.bias, split="column"
            )
            self.position_query = self.make_linear(
                d_model, d_model, bias=options.bias, split="column"
            )

    @classmethod
    def build_shared(
        cls, d_model: int, num_heads: int, options: AttentionOptions
    ) -> RelativePositionTable:
        """One relative-position table [2k, D] for every layer of this method in a model."""
        assert isinstance(options, DebertaOptions), f"expected DebertaOptions, got {options!r}"
        return RelativePositionTable(d_model, 2 * options.span, options.norm_rel_embeddings)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, n, D] -> q, k, v [B, H, n, d] through the separate content projections."""
        query, key, value = (self.split_heads(p(x)) for p in (self.query, self.key, self.value))
        return query, key, value

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None,
        state: Any,
    ) -> tuple[torch.Tensor, None]:
        """q, k, v [B, H, n, d] (mask bool [B, n], True = real) -> ([B, H, n, d], None)."""
        length, out_dtype = q.shape[2], q.dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            # The official code keeps scores and its softmax in fp32 (spec §10 pitfalls).
            query, key, value = (upcast(t) for t in (q, k, v))
            scores = self.disentangled_scores(query, key, self.position_projections(length))
            allowed = self.allowed_keys(key_padding_mask, length, q.device)
            if allowed is not None:
                scores.masked_fill_(~allowed, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1)
            if self.training and self.options.dropout > 0:
                probs = F.dropout(probs, p=self.options.dropout)
            mixed = probs @ value
        return mixed.to(out_dtype), None

    def position_projections(self, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K^r and Q^r [H_local, r, d] for the table rows this length uses, and δ [n, n]."""
        options = self.options
        index = relative_index(length, options, self.relative_table.embeddings.device)
        # δ is monotone in i - j: its extremes are at the corners, read without a device sync.
        edges = relative_buckets(
            torch.tensor([1 - length, length - 1]),
            options.position_buckets,
            options.max_relative_positions,
        )
        low, high = (edges.clamp(-options.span, options.span - 1) + options.span).tolist()
        table = self.relative_table()[low : high + 1]
        key_proj = self.key if options.share_att_key else self.position_key
        query_proj = self.query if options.share_att_key else self.position_query
        rows, d = table.shape[0], self.head_dim
        position_key = key_proj(table).view(rows, -1, d).transpose(0, 1)
        position_query = query_proj(table).view(rows, -1, d).transpose(0, 1)
        return upcast(position_key), upcast(position_query), index - low

    def disentangled_scores(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        positions: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Scaled Ã [B, H, n, n] from q, k [B, H, n, d] and (K^r, Q^r [H, r, d], δ [n, n])."""
        position_key, position_query, index = positions
        terms = self.options.pos_att_type
        scale = 1.0 / math.sqrt(self.head_dim * (1 + len(terms)))
        scores = query @ key.transpose(-1, -2)
        batch, heads, length, _ = query.shape
        if "c2p" in terms:
            # [B, H, n, r] then pick column δ(i, j) for each (i, j).
            content_to_position = query @ position_key.transpose(-1, -2)
            scores += torch.gather(
                content_to_position, -1, index.expand(batch, heads, length, length)
            )
        if "p2c" in terms:
            # Rows are keys j: [B, H, n_j, r]; pick column p(i, j) at [j, i], then transpose.
            position_to_content = key @ position_query.transpose(-1, -2)
            p2c_index = index.T if self.options.p2c_index == "code" else index
            gathered = torch.gather(
                position_to_content, -1, p2c_index.expand(batch, heads, length, length)
            )
            scores += gathered.transpose(-1, -2)
        # In place: neither the matmul nor the adds need their outputs for backward, and
        # every [B, H, n, n] buffer saved is 4n² bytes per head.
        return scores.mul_(scale)

    def allowed_keys(
        self, key_padding_mask: torch.Tensor | None, length: int, device: torch.device
    ) -> torch.Tensor | None:
        """Bool [B or 1, 1, n, n], True = may attend: real keys, and s <= t when causal."""
        allowed = None
        if key_padding_mask is not None:
            allowed = key_padding_mask[:, None, None, :]
        if self.causal:
            causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            allowed = causal if allowed is None else allowed & causal
        return allowed
