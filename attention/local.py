"""Sliding-window softmax attention (LongT5-style block-local) with T5 relative position buckets.

Shape letters: B batch, n length, D model width, H heads, d head width, b block length
(= radius + 1), G number of blocks (n / b), W keys in a block's window (3b, or 2b causal).

Query i attends to the keys j with |i - j| <= radius (and j <= i when causal). The sequence
is cut into blocks of b = radius + 1 positions; every query block reads the keys of its
previous, own and next block (previous and own when causal), so the window covers every
allowed key and the cost is O(n · 3b · d) instead of O(n² d). This is the local attention of
SPADE (Zuo et al., 2022; microsoft/EfficientLongSequenceModeling ``local_attention.py``),
which takes it from LongT5. ``attention/spade.py`` reuses ``local_window_attention``.

Defaults: ``radius = 127``. SPADE's WikiText-103 run (``run_lm.sh``) uses 511 on 3072-token
samples; at the benchmark's n <= 8192 a 3·512-key window is a fifth of dense attention and
loses most of the saving, so the default is 127 (set ``radius: 511`` to follow the paper's
run). T5 relative position bias with 32 buckets and max distance 128 (as in that run), one
table per model shared by every layer of the method through ``build_shared`` (T5 keeps one
table in the first layer and hands it up). Deviation: the table starts at zero (T5 draws it
from a normal), so that an untrained layer is plain windowed softmax attention. A learned
bias makes SDPA take its math path (the fused kernels give no gradient for the mask);
``relative_bias: false`` is about 1.5x faster on CPU.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from attention.base import (
    Attention,
    AttentionOptions,
    default_scale,
)
from attention.registry import register
from parallel.tensor_parallel import mark_tensor_parallel


class LocalOptions(AttentionOptions):
    """Options of sliding-window attention."""

    radius: int = Field(127, ge=0, description="query i sees keys with |i - j| <= radius")
    relative_bias: bool = Field(True, description="add a learned T5 relative position bias")
    num_buckets: int = Field(32, ge=2, description="T5 relative position buckets")
    max_distance: int = Field(128, ge=2, description="distance of the last T5 bucket")
    bias: bool = Field(True, description="biases in the q/k/v and output projections")


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5 bucket (int64, same shape) of each relative position j - i (key minus query).

    Half the buckets (per direction) hold exact distances 0..exact-1; the rest cover
    distances up to ``max_distance`` on a log scale; larger distances share the last bucket.
    Causal (one-directional) use only looks at j <= i.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp_min(0)
    exact = num_buckets // 2
    log_ratio = torch.log(distance.clamp_min(1).double() / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (num_buckets - exact)).long()
    large = large.clamp_max(num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, large)


class RelativePositionBias(nn.Module):
    """A learned scalar bias per (T5 bucket, head); one table shared by a model's layers."""

    def __init__(self, num_heads: int, num_buckets: int, max_distance: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.table = nn.Parameter(torch.zeros(num_buckets, num_heads))
        self.num_heads = num_heads

    def keep_heads(self, heads: slice) -> None:
        """Keep the columns of ``heads`` (tensor parallelism); idempotent, since every layer
        that shares the table asks for the same heads."""
        if self.table.shape[1] != self.num_heads:
            if self.table.shape[1] != heads.stop - heads.start:
                raise ValueError(
                    f"the shared relative position table was cut to {self.table.shape[1]} heads, "
                    f"this layer needs {heads.stop - heads.start}"
                )
            return
        param = nn.Parameter(self.table.detach()[:, heads].clone())
        param.requires_grad_(self.table.requires_grad)
        mark_tensor_parallel(param, partition_dim=1)
        self.table = param

    def forward(self, relative_position: torch.Tensor, *, bidirectional: bool) -> torch.Tensor:
        """Bias [H, *relative_position.shape] for relative positions j - i (int64)."""
        buckets = relative_position_bucket(
            relative_position,
            bidirectional=bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.table[buckets].movedim(-1, 0)


def local_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    radius: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    position_bias: RelativePositionBias | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Softmax attention of q [B, H, n, d] over keys with |i - j| <= radius; returns [B, H, n, d].

    ``key_padding_mask`` bool [B, n] (True = real token) removes padded keys; a query with no
    allowed key (only possible for a padded query) gets 0. Each block of b queries runs
    ``scaled_dot_product_attention`` over its window of W keys. ``dropout`` is applied to the
    attention probabilities.
    """
    batch, heads, n, head_dim = q.shape
    block = max(1, min(radius + 1, n))
    num_blocks = -(-n // block)
    pad = num_blocks * block - n
    valid = key_padding_mask
    if valid is None:
        valid = torch.ones(batch, n, dtype=torch.bool, device=q.device)
    # Padded tail plus one empty block on each side, so every block has a full window.
    # Layout [B·G, H, ., d]: 4-d inputs let SDPA take its fused CPU/GPU kernels.
    valid = F.pad(valid, (block, block + pad), value=False)

    def blocks(t: torch.Tensor, before: int, after: int) -> torch.Tensor:
        t = F.pad(t, (0, 0, before, after)).view(batch, heads, -1, block, head_dim)
        return t.transpose(1, 2)  # [B, G(+2), H, b, d]

    q = blocks(q, 0, pad).reshape(batch * num_blocks, heads, block, head_dim)
    k, v = blocks(k, block, block + pad), blocks(v, block, block + pad)
    offsets = (0, 1) if causal else (0, 1, 2)
    window = len(offsets) * block
    k_window = torch.cat([k[:, o : o + num_blocks] for o in offsets], dim=3)
    v_window = torch.cat([v[:, o : o + num_blocks] for o in offsets], dim=3)
    k_window = k_window.view(batch * num_blocks, heads, window, head_dim)
    v_window = v_window.view(batch * num_blocks, heads, window, head_dim)
    valid = valid.view(batch, num_blocks + 2, block)
    valid_window = torch.cat([valid[:, o : o + num_blocks] for o in offsets], dim=2)

    # Key w of a block's window sits at (g - 1)·b + w, query t at g·b + t: j - i = w - b - t.
    relative = torch.arange(window, device=q.device)[None, :] - block
    relative = relative - torch.arange(block, device=q.device)[:, None]
    allowed = relative.abs() <= radius
    if causal:
        allowed = allowed & (relative <= 0)
    mask = allowed[None, None, :, :] & valid_window[:, :, None, :]  # [B, G, b, W]
    mask = mask.view(batch * num_blocks, 1, block, window)

    # SDPA on the blocks, with padding, window and bias merged into one additive float mask:
    # finfo.min (not -inf) keeps rows without any allowed key finite; they are zeroed below.
    additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
    additive = additive.masked_fill(~mask, torch.finfo(q.dtype).min)
    if position_bias is not None:
        additive = additive + position_bias(relative, bidirectional=not causal).to(q.dtype)
    out = F.scaled_dot_product_attention(
        q, k_window, v_window, attn_mask=additive, dropout_p=dropout, scale=default_scale(head_dim)
    )
    out = out * mask.any(dim=-1, keepdim=True).to(out.dtype)  # [B·G, H, b, d]
    out = out.view(batch, num_blocks, heads, block, head_dim).transpose(1, 2)
    return out.reshape(batch, heads, num_blocks * block, head_dim)[:, :, :n]


@register
class LocalAttention(Attention):
    """Multi-head sliding-window softmax attention, O(n · radius · d); causal and padding aware."""

    name = "local"
    supports_causal = True
    supports_padding = True
    supports_tensor_parallel = True  # the shared bias table is cut by heads
    Options = LocalOptions

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        options: LocalOptions = self.options  # type: ignore[assignment]
        self.make_qkv_projections(options.bias)
        shared = kwargs.get("shared")
        if shared is None and options.relative_bias:
            shared = self.build_shared(d_model, num_heads, options)
        self.position_bias = shared if options.relative_bias else None

    @classmethod
    def build_shared(
        cls, d_model: int, num_heads: int, options: AttentionOptions
    ) -> nn.Module | None:
        """The T5 relative position table shared by every layer of this method (or None)."""
        if not options.relative_bias:  # type: ignore[attr-defined]
            return None
        return RelativePositionBias(num_heads, options.num_buckets, options.max_distance)  # type: ignore[attr-defined]

    def shard_heads(self) -> None:
        if self.position_bias is not None:
            self.position_bias.keep_heads(self.local_head_slice())

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None,
        state: Any,
    ) -> tuple[torch.Tensor, None]:
        """q, k, v [B, H, n, d], key_padding_mask bool [B, n] -> ([B, H, n, d], None)."""
        y = local_window_attention(
            q,
            k,
            v,
            radius=self.options.radius,
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            position_bias=self.position_bias,
            dropout=self.options.dropout if self.training else 0.0,
        )
        return y, None

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """Multiply-adds per token of one forward: (projections, scores).

        With n = ``seq_len``, b = min(radius + 1, n) the block, G = ceil(n / b) blocks and a
        window of W = 3 b keys (2 b causal) per block:

            projections = 4 D^2
            scores      = 2 W D G b / n     (Q K^T and the weighted sum over each window)

        What the module computes: every query scores its block's whole window, including keys
        past the radius, before the causal cut and in the padded tail (G b >= n); so about
        3 (radius + 1) keys per query, not the 2 radius + 1 it may see.
        """
        block = max(1, min(self.options.radius + 1, seq_len))
        num_blocks = -(-seq_len // block)
        window = (2 if self.causal else 3) * block
        projections = 4.0 * self.d_model * self.d_model
        return projections, 2.0 * window * self.d_model * num_blocks * block / seq_len

    def local(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Local attention with its projections: x [B, n, D] -> [B, n, D] (replicated)."""
        q, k, v = self.project_qkv(x)
        y, _ = self.attend(q, k, v, key_padding_mask=key_padding_mask, state=None)
        return self.project_out(y)
