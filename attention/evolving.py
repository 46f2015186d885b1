"""Evolving attention (Wang et al., ICML 2021): attention maps evolve through a residual conv.

Shape letters: B batch, n sequence length, D model width, H heads, d = D / H head width.

Layer l computes its logits ``S = q k^T / sqrt(d)`` [B, H, n, n] and receives the previous
layer's evolved logits ``A_prev`` (the cross-layer state; None in the first layer, which
skips the beta term), then (attention_spec.md §11):

    M = (1 - beta) S + beta A_prev
    C = LeakyReLU(Conv2d_{H -> H, 3x3}(M))       # the maps as an H-channel image
    A = alpha C + (1 - alpha) M
    y = softmax(A) V,  and A is passed to layer l + 1

Padding: padded rows and columns of M are zeroed before the conv (no halo from pads) and
padded keys are masked after it. Causal mode is our own masked extension (the paper and
code are bidirectional): future entries (j > i) of M are zeroed, the 3x3 kernel is shifted
to read rows i-2..i (so row i never reads a later query), and future keys are masked
before the softmax. The logits, conv and state are kept in fp32 (they drift across depth).
Time O(n^2 (d + 9 H)) per layer, memory O(H n^2) plus the carried state: quadratic.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from attention.base import Attention, AttentionOptions, check_padding_mask, zero_padded_queries
from attention.registry import register


class EvolvingOptions(AttentionOptions):
    """Evolving-attention options: alpha = 0.5, beta = 0.5 (TF ResNet code's beta)."""

    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    beta: float = Field(default=0.5, ge=0.0, le=1.0)
    # torch.nn.LeakyReLU's default, as in the PyTorch EA-DC-Transformer code.
    negative_slope: float = Field(default=0.01, ge=0.0, lt=1.0)
    bias: bool = True


def evolve_logits(
    logits: torch.Tensor,
    previous: torch.Tensor | None,
    conv: nn.Conv2d,
    *,
    alpha: float,
    beta: float,
    negative_slope: float,
    keep: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor:
    """A = alpha LeakyReLU(conv(M)) + (1 - alpha) M with M = (1 - beta) S + beta A_prev.

    logits S and previous A_prev [B, H, n, n]; keep bool broadcastable to [B, 1, n, n]
    (real, allowed pairs; M is zeroed elsewhere) or None. Returns A [B, H, n, n].
    """
    mixed = logits if previous is None else (1.0 - beta) * logits + beta * previous
    if keep is not None:
        mixed = mixed.masked_fill(~keep, 0.0)
    weight = conv.weight.to(mixed.dtype)
    bias = None if conv.bias is None else conv.bias.to(mixed.dtype)
    if causal:
        # Rows i-2..i and columns j-1..j+1: (pad left, right, top, bottom).
        convolved = F.conv2d(F.pad(mixed, (1, 1, 2, 0)), weight, bias)
    else:
        convolved = F.conv2d(mixed, weight, bias, padding=1)
    return alpha * F.leaky_relu(convolved, negative_slope) + (1.0 - alpha) * mixed


@register
class EvolvingAttention(Attention):
    """Evolving attention with the previous layer's logits as cross-layer state.

    Defaults: alpha = 0.5, beta = 0.5, LeakyReLU slope 0.01, one Conv2d(H, H, 3) per layer,
    scale 1/sqrt(d). ``forward`` returns (y, A) with A fp32 [B, H, n, n]; every layer of
    the method needs the same H (the conv maps H channels to H).
    """

    name = "evolving"
    supports_causal = True  # masked extension, see the module docstring
    supports_padding = True
    needs_cross_layer_state = True
    Options = EvolvingOptions

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=self.options.bias)
        self.out = nn.Linear(d_model, d_model, bias=self.options.bias)
        self.conv = nn.Conv2d(num_heads, num_heads, kernel_size=3, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, n, D], mask bool [B, n], state [B, H, n, n] or None -> (y [B, n, D], A)."""
        check_padding_mask(x, key_padding_mask)
        batch, n, _ = x.shape
        expected = (batch, self.num_heads, n, n)
        if state is not None and tuple(state.shape) != expected:
            raise ValueError(
                f"evolving attention state has shape {tuple(state.shape)}, expected "
                f"[B, H, n, n] = {expected}; consecutive layers need the same heads and length"
            )
        q, k, v = (self.split_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        keep, allowed = self._masks(key_padding_mask, n, x.device)
        with torch.autocast(x.device.type, enabled=False):
            logits = (q.to(compute_dtype) @ k.to(compute_dtype).transpose(-1, -2)) / math.sqrt(
                self.head_dim
            )
            previous = None if state is None else state.to(compute_dtype)
            evolved = evolve_logits(
                logits,
                previous,
                self.conv,
                alpha=self.options.alpha,
                beta=self.options.beta,
                negative_slope=self.options.negative_slope,
                keep=keep,
                causal=self.causal,
            )
            scores = evolved if allowed is None else evolved.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
        if self.training and self.options.dropout > 0.0:
            probs = F.dropout(probs, p=self.options.dropout)
        y = probs.to(v.dtype) @ v
        y = self.out(self.merge_heads(y))
        return zero_padded_queries(y, key_padding_mask), evolved

    def _masks(
        self, key_padding_mask: torch.Tensor | None, n: int, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(keep, allowed) bool [B or 1, 1, n, n] or None.

        keep: real (query, key) pairs, causal ones only in causal mode; M is zeroed
        elsewhere before the conv. allowed: keys a query may attend to after the conv;
        padded queries may attend to every key (their outputs are zeroed).
        """
        causal = None
        if self.causal:
            causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]
        if key_padding_mask is None:
            return causal, causal
        rows = key_padding_mask[:, None, :, None]
        cols = key_padding_mask[:, None, None, :]
        keep = rows & cols
        allowed = cols
        if causal is not None:
            keep = keep & causal
            allowed = allowed & causal
        return keep, allowed | ~rows
