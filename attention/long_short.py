"""Transformer-LS, long-short attention (Zhu et al., NeurIPS 2021; attention_spec.md §5).

Shape letters: B batch, H heads, n sequence length (padded), D model width, d = D / H head
width, r projected (landmark) keys, w window / segment length, e = w // 2 window extension,
g number of segments or blocks, l causal chunk length.

Each query takes one softmax over the concatenation of
* long range: r keys and values made by a data-dependent projection of the whole sequence,
  K̄ = Pᵀ K, V̄ = Pᵀ V with P = softmax over positions of x W_P (pads excluded);
* short term: a sliding window. Bidirectional: the sequence is cut into segments of w, and a
  segment's queries see their segment plus e = max(w // 2, 1) tokens on each side. Causal:
  query t sees keys t − w < s ≤ t.
DualLN: one LayerNorm for the window keys/values and one for the projected ones, so their
scales match before the shared softmax.

Causal (the autoregressive variant of the official code): the projection runs per chunk
of l tokens, giving chunk_rank keys per chunk, and a query sees only the projected keys of
chunks strictly before its own. Left out from that code: Transformer-XL relative positions
and the memory cache (the moeforge model gives positions), the optional CLS token and the
depthwise-conv value branch.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from attention.base import (
    Attention,
    AttentionOptions,
    check_padding_mask,
    pad_to_multiple,
    zero_padded_queries,
)
from attention.registry import register
from parallel.tensor_parallel import copy_to_region, mark_tensor_parallel, reduce_from_region

BIDIRECTIONAL_WINDOW = 8  # LRA scripts: (w, r) = (8, 32)
CAUSAL_WINDOW = 512  # enwik8 base: window 512, chunk 16, chunk rank 1
CAUSAL_BLOCK = 256  # queries per causal window tile (a speed knob, not a model choice)


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over ``dim`` of the allowed entries; a slice with none allowed gives zeros."""
    any_allowed = allowed.any(dim=dim, keepdim=True)
    logits = logits.masked_fill(~allowed, -math.inf).masked_fill(~any_allowed, 0.0)
    return torch.softmax(logits, dim=dim) * any_allowed


class LongShortOptions(AttentionOptions):
    """Options of ``long_short``; window_size None means 8 bidirectional, 512 causal."""

    window_size: int | None = Field(None, ge=0)
    num_landmarks: int = Field(32, ge=0, description="bidirectional projected keys r")
    chunk_size: int = Field(16, ge=1, description="causal projection chunk l")
    chunk_rank: int = Field(1, ge=0, description="causal projected keys per chunk")
    dual_ln: bool = True
    bias: bool = True


@register
class LongShortAttention(Attention):
    """Transformer-LS: dynamic projection (long range) + sliding window (short term), DualLN.

    Defaults from the official scripts: bidirectional (w, r) = (8, 32) (LRA); causal window
    512, chunk 16, chunk rank 1 (enwik8 base). Time O(n·(2w + r)·d) bidirectional; the
    causal variant attends to n·rank/l projected keys, so it is O(n²·rank/l·d + n·w·d).
    Softmaxes run in fp32 (the official ``fp32_attn``).
    """

    name = "long_short"
    supports_causal = True
    supports_padding = True
    supports_tensor_parallel = True  # landmarks are per head; DualLN sums over the group
    Options = LongShortOptions

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        opts = self.options
        default_window = CAUSAL_WINDOW if self.causal else BIDIRECTIONAL_WINDOW
        self.window_size = default_window if opts.window_size is None else opts.window_size
        self.rank = opts.chunk_rank if self.causal else opts.num_landmarks
        if self.causal and self.window_size == 0:
            raise ValueError(
                "long_short option window_size (0) must be >= 1 when causal: queries of the "
                "first chunk would have no key"
            )
        if self.window_size == 0 and self.rank == 0:
            raise ValueError(
                "long_short options window_size (0) and num_landmarks (0) leave no key to "
                "attend; set one of them >= 1"
            )
        self.query = self.make_linear(d_model, d_model, bias=opts.bias, split="column")
        self.key = self.make_linear(d_model, d_model, bias=opts.bias, split="column")
        self.value = self.make_linear(d_model, d_model, bias=opts.bias, split="column")
        self.out = self.make_linear(d_model, d_model, bias=opts.bias, split="row")
        # Output features ordered (head, landmark): a column cut keeps each rank's heads.
        self.landmark = (
            self.make_linear(d_model, num_heads * self.rank, split="column")
            if self.rank > 0
            else None
        )
        self.norm_local = nn.LayerNorm(d_model) if opts.dual_ln else nn.Identity()
        self.norm_global = nn.LayerNorm(d_model) if opts.dual_ln else nn.Identity()

    def shard_heads(self) -> None:
        # DualLN normalises over all D features, i.e. across heads: under tensor parallelism
        # each rank keeps its heads' features and the statistics are summed over the group.
        features = slice(
            self.local_head_slice().start * self.head_dim,
            self.local_head_slice().stop * self.head_dim,
        )
        for name in ("norm_local", "norm_global"):
            norm = getattr(self, name)
            if isinstance(norm, nn.LayerNorm):
                setattr(
                    self, name, ShardedLayerNorm(norm, features, self.tp_group, self.tp_timeout)
                )

    # Long range -------------------------------------------------------------------------

    def project(self, x: torch.Tensor, valid: torch.Tensor, group: int) -> torch.Tensor:
        """P: fp32 softmax over positions inside each group of ``group`` tokens.

        x [B, n, D], valid [B, n] -> [B, H, n / group, r, group].
        """
        b, n, _ = x.shape
        logits = self.landmark(x).view(b, n // group, group, self.num_local_heads, self.rank)
        logits = logits.permute(0, 3, 1, 4, 2).to(_compute_dtype(x))
        allowed = valid.view(b, 1, n // group, 1, group)
        return masked_softmax(logits, allowed, dim=-1)

    def compress(self, weights: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """norm_global(Pᵀ T): weights [B, H, g, r, l], t [B, H, n, d] -> [B, H, g·r, d] (fp32).

        The LayerNorm runs in the dtype of t, so bf16 parameters work without autocast.
        """
        b, h, g, r, group = weights.shape
        t_groups = t.to(weights.dtype).reshape(b, h, g, group, self.head_dim)
        projected = (weights @ t_groups).reshape(b, h, g * r, self.head_dim)
        normed = self.norm_global(self.merge_heads(projected.to(t.dtype)))
        return self.split_heads(normed).to(weights.dtype)

    # Forward ----------------------------------------------------------------------------

    def forward(self, x, *, key_padding_mask=None, state=None):
        check_padding_mask(x, key_padding_mask)
        multiple = self._block(x.shape[1]) if self.causal else max(1, self._segment(x.shape[1]))
        padded, mask, n = pad_to_multiple(x, key_padding_mask, multiple)
        valid = (
            torch.ones(padded.shape[:2], dtype=torch.bool, device=x.device)
            if mask is None
            else mask
        )
        if self.causal:
            y = self._causal(padded, valid, block=multiple)
        else:
            y = self._bidirectional(padded, valid, segment=multiple)
        y = self.out(self.merge_heads(y.to(x.dtype))[:, :n])  # all-reduced under TP
        return zero_padded_queries(y, key_padding_mask), None

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """Multiply-adds per token of one forward: (projections, sequence mixing).

        The module pads n to N, a multiple of the segment (bidirectional, ``_segment``) or of
        the causal query block (``_block``), and computes on all N rows. With r projected keys
        per group (``num_landmarks``; causal: ``chunk_rank`` per chunk of l), H heads:

            projections = (3 D^2 N + D H r N + D^2 n) / n   (q, k, v and landmark logits on N
                                                             rows; the output on n)
            mixing      = (2 r N D + 2 N R D + 2 N S D) / n

        2 r N D: P^T K and P^T V; 2 N R D: scores against the R projected keys and their
        weighted sum (bidirectional R = r; causal R = N r / l, every chunk's keys, masked
        after the matmul: quadratic in n); 2 N S D: each tile of queries against its S keys
        (bidirectional S = w + 2 max(w // 2, 1) with w the segment; causal S = w + b with b
        the query block). The paper's causal cost counts only the earlier chunks' keys
        (about half of R) and the w window keys, not the tile's w + b.
        """
        n, width = seq_len, self.d_model
        if self.causal:
            multiple = self._block(n)
        else:
            multiple = max(1, self._segment(n))
        padded = -(-n // multiple) * multiple
        rank = self.rank
        projections = 3 * width * width * padded + width * self.num_heads * rank * padded
        projections += width * width * n
        if self.causal:
            projected_keys = padded // self.options.chunk_size * rank
            span = self.window_size + multiple
        else:
            projected_keys = rank
            segment = multiple
            span = segment + 2 * max(segment // 2, 1) if self.window_size > 0 else 0
        mixing = 2 * rank * padded * width + 2 * padded * projected_keys * width
        mixing += 2 * padded * span * width
        return projections / n, mixing / n

    def _segment(self, n: int) -> int:
        """Bidirectional segment length: w, or n when w >= n (the same keys, less padding)."""
        return min(self.window_size, n)

    def _block(self, n: int) -> int:
        """Causal query block: a multiple of the chunk near min(w, n, 256).

        A block of b queries scores w + b keys, of which w are used; the key tiles copy
        (w + b) / b times K. b ≈ 256 balances the two at the default w = 512.
        """
        chunk = self.options.chunk_size
        return chunk * math.ceil(min(self.window_size, n, CAUSAL_BLOCK) / chunk)

    def _heads(self, x: torch.Tensor, norm_keys: bool) -> tuple[torch.Tensor, ...]:
        """Queries (scaled by d^-1/2), keys, values [B, H, n, d]; keys/values through norm_local."""
        q = self.split_heads(self.query(x)) * self.head_dim**-0.5
        k, v = self.key(x), self.value(x)
        if norm_keys:
            k, v = self.norm_local(k), self.norm_local(v)
        return q, self.split_heads(k), self.split_heads(v)

    def _bidirectional(self, x: torch.Tensor, valid: torch.Tensor, segment: int) -> torch.Tensor:
        """x [B, n, D] with n a multiple of the segment -> [B, H, n, d] (fp32 or fp64)."""
        b, n, _ = x.shape
        q, k, v = self._heads(x, norm_keys=True)  # LRA code: norm_local before the projection
        weights = self.project(x, valid, group=n) if self.rank > 0 else None
        compute = _compute_dtype(x)
        scores, values = [], []
        if weights is not None:
            k_bar, v_bar = self.compress(weights, k), self.compress(weights, v)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v = q.to(compute), k.to(compute), v.to(compute)
            if weights is not None:
                scores.append(q @ k_bar.transpose(-1, -2))  # [B, H, n, r]
                values.append(v_bar)
            if self.window_size > 0:
                w = segment
                extension = max(w // 2, 1)
                span = w + 2 * extension
                key_ok = _tiles(valid[:, None, :, None], extension, extension, span, w, False)
                position = torch.arange(w, device=x.device)[:, None]
                own = torch.arange(span, device=x.device)[None, :] == position + extension
                allowed = key_ok.squeeze(-1).unsqueeze(-2) | own  # padded queries see themselves
                query_tiles = q.view(b, self.num_local_heads, n // w, w, self.head_dim)
                k_tiles = _tiles(k, extension, extension, span, w)  # [B, H, g, span, d]
                window = (query_tiles @ k_tiles.transpose(-1, -2)).masked_fill(~allowed, -math.inf)
                scores.append(window.view(b, self.num_local_heads, n, span))
                values.append(_tiles(v, extension, extension, span, w))
            return self._combine(scores, values)

    def _causal(self, x: torch.Tensor, valid: torch.Tensor, block: int) -> torch.Tensor:
        """x [B, n, D] with n a multiple of the block (and chunk) -> [B, H, n, d] (fp32 or fp64)."""
        b, n, _ = x.shape
        chunk, w = self.options.chunk_size, self.window_size
        q, k_raw, v_raw = self._heads(x, norm_keys=False)
        compute = _compute_dtype(x)
        scores, values = [], []
        if self.rank > 0:  # AR code: chunks compress the raw keys/values
            weights = self.project(x, valid, group=chunk)  # [B, H, n / l, r, l]
            k_bar, v_bar = self.compress(weights, k_raw), self.compress(weights, v_raw)
        k = self.split_heads(self.norm_local(self.merge_heads(k_raw)))  # the window's own norm
        v = self.split_heads(self.norm_local(self.merge_heads(v_raw)))
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v = q.to(compute), k.to(compute), v.to(compute)
            if self.rank > 0:
                query_chunk = torch.arange(n, device=x.device) // chunk
                key_chunk = torch.arange(n // chunk, device=x.device).repeat_interleave(self.rank)
                has_token = valid.view(b, n // chunk, chunk).any(-1)
                has_token = has_token.repeat_interleave(self.rank, dim=-1)
                allowed = (key_chunk[None, :] < query_chunk[:, None]) & has_token[:, None, None, :]
                scores.append((q @ k_bar.transpose(-1, -2)).masked_fill(~allowed, -math.inf))
                values.append(v_bar)
            # Block j of b queries sees keys [j·b − w, j·b + b); query i keeps tile keys a with
            # i < a <= i + w, i.e. absolute t − w < s <= t (a = i + w is itself).
            span = w + block
            key_ok = _tiles(valid[:, None, :, None], w, 0, span, block, False).squeeze(-1)
            offset = torch.arange(span, device=x.device)[None, :]
            offset = offset - torch.arange(block, device=x.device)[:, None]
            in_window = (offset > 0) & (offset <= w)
            allowed = (key_ok.unsqueeze(-2) & in_window) | (offset == w)
            query_tiles = q.view(b, self.num_local_heads, n // block, block, self.head_dim)
            k_tiles = _tiles(k, w, 0, span, block)
            window = (query_tiles @ k_tiles.transpose(-1, -2)).masked_fill(~allowed, -math.inf)
            scores.append(window.view(b, self.num_local_heads, n, span))
            values.append(_tiles(v, w, 0, span, block))
            return self._combine(scores, values)

    def _combine(self, scores: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """One softmax over the concatenated score blocks, then each block times its values.

        scores: [B, H, n, r] (projected) and/or [B, H, n, span] (window); values: [B, H, r, d]
        and/or window tiles [B, H, g, span, d] -> [B, H, n, d].
        """
        widths = [s.shape[-1] for s in scores]
        probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
        if self.training and self.options.dropout > 0:
            probs = F.dropout(probs, p=self.options.dropout)
        out = 0
        for part, value in zip(probs.split(widths, dim=-1), values):
            if value.dim() == 4:  # projected keys shared by every query
                out = out + part @ value
            else:  # window tiles: one block of queries per tile
                b, h, g, span, d = value.shape
                tiled = part.reshape(b, h, g, -1, span) @ value
                out = out + tiled.reshape(b, h, -1, d)
        return out


class ShardedLayerNorm(nn.Module):
    """LayerNorm over D features of which this rank holds a slice x [..., D / tp].

    The mean and variance are sums over every rank's features: all-reduced in the forward,
    and their gradients all-reduced in the backward too (each rank's normalised features
    depend on them). Weight and bias keep the local features (partition_dim 0).
    """

    def __init__(self, norm: nn.LayerNorm, features: slice, group: Any, timeout: timedelta) -> None:
        super().__init__()
        (self.width,) = norm.normalized_shape
        self.eps, self.group, self.timeout = norm.eps, group, timeout
        self.weight = nn.Parameter(norm.weight.detach()[features].clone())
        self.bias = nn.Parameter(norm.bias.detach()[features].clone())
        mark_tensor_parallel(self.weight, partition_dim=0)
        mark_tensor_parallel(self.bias, partition_dim=0)

    def _total(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the group, forward and backward."""
        summed = reduce_from_region(t, self.group, self.timeout)
        return copy_to_region(summed, self.group, self.timeout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D / tp] -> the matching slice of LayerNorm(x over all D)."""
        mean = self._total(x.sum(-1, keepdim=True)) / self.width
        centred = x - mean
        variance = self._total(centred.square().sum(-1, keepdim=True)) / self.width
        return centred * torch.rsqrt(variance + self.eps) * self.weight + self.bias


def _tiles(
    t: torch.Tensor, left: int, right: int, span: int, step: int, fill: Any = 0.0
) -> torch.Tensor:
    """Overlapping tiles along dim 2: pad (left, right) with ``fill`` then windows of ``span``
    every ``step``: [B, H, n, d] -> [B, H, g, span, d] (a strided view, no copy)."""
    padded = F.pad(t, [0, 0, left, right], value=fill)
    return padded.unfold(2, span, step).transpose(-1, -2)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


__all__ = ["LongShortAttention", "LongShortOptions", "masked_softmax"]
