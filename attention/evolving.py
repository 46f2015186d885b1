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
The first layer convolves S itself (the spec's reading; the PyTorch time-series code has no
conv in its layer 0). The conv runs as 9 GEMMs over the flattened, padded map with a
hand-written backward (``_ConvLeakyMix``), about 2x faster than mkldnn for H channels.
Time O(n^2 (d + 9 H)) per layer, memory O(H n^2) plus the carried state: quadratic.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from attention.base import Attention, AttentionOptions
from attention.registry import register


class EvolvingOptions(AttentionOptions):
    """Evolving-attention options: alpha = 0.5, beta = 0.5 (TF ResNet code's beta)."""

    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    beta: float = Field(default=0.5, ge=0.0, le=1.0)
    # torch.nn.LeakyReLU's default, as in the PyTorch EA-DC-Transformer code.
    negative_slope: float = Field(default=0.01, ge=0.0, lt=1.0)
    bias: bool = True


def _padded_flat(maps: torch.Tensor, top: int) -> torch.Tensor:
    """[B, C, n, n] -> [B, C, (n + 3) (n + 2)]: ``top`` zero rows above, 3 - top below, 1
    zero column each side, flattened so that every 3x3 tap is one contiguous slice."""
    return F.pad(maps, (1, 1, top, 3 - top)).flatten(2)


class _ConvLeakyMix(torch.autograd.Function):
    """A = alpha LeakyReLU(conv3x3(M) + b) + (1 - alpha) M, with a GEMM-based 3x3 conv.

    A 3x3 H -> H conv on an n x n map is 9 [H, H] x [H, n (n + 2)] GEMMs over contiguous
    slices of the zero-padded, flattened map (the two pad columns absorb the row wrap).
    On CPU this is about twice as fast as the mkldnn convolution for few channels, and the
    backward keeps only M and a bool mask of the LeakyReLU's positive side.
    """

    @staticmethod
    def forward(ctx, mixed, weight, bias, alpha, negative_slope, top):
        batch, channels, n, _ = mixed.shape
        width, length = n + 2, n * (n + 2)
        padded = _padded_flat(mixed, top)
        conv = bias.view(1, channels, 1).expand(batch, channels, length).contiguous()
        for row in range(3):
            for col in range(3):
                start = row * width + col
                tap = weight[:, :, row, col].expand(batch, channels, channels)
                conv.baddbmm_(tap, padded[:, :, start : start + length])
        del padded
        # In place on the [B, C, n, n] view of the buffer: few full-size temporaries.
        activated = F.leaky_relu_(conv.view(batch, channels, n, width)[..., :n], negative_slope)
        positive = activated > 0  # the same side as the pre-activation (slope >= 0)
        evolved = torch.add(activated.mul_(alpha), mixed, alpha=1.0 - alpha)
        ctx.save_for_backward(mixed, weight, positive)
        ctx.settings = (alpha, negative_slope, top)
        return evolved

    @staticmethod
    def backward(ctx, grad_evolved):
        mixed, weight, positive = ctx.saved_tensors
        alpha, negative_slope, top = ctx.settings
        batch, channels, n, _ = mixed.shape
        width, length = n + 2, n * (n + 2)
        # Gradient at the conv output, written into a buffer with two zero pad columns.
        grad_flat = mixed.new_zeros(batch, channels, n, width)
        grad_conv = grad_flat[..., :n]
        slope = positive.to(mixed.dtype).mul_(alpha * (1.0 - negative_slope))
        grad_conv.copy_(grad_evolved).mul_(slope.add_(alpha * negative_slope))
        del slope
        grad_flat = grad_flat.flatten(2)  # [B, C, n (n + 2)]
        grad_mixed = grad_weight = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_bias = grad_conv.sum(dim=(0, 2, 3))
        if ctx.needs_input_grad[1]:
            padded = _padded_flat(mixed, top)
            grad_weight = torch.empty_like(weight)
            for row in range(3):
                for col in range(3):
                    start = row * width + col
                    taps = grad_flat @ padded[:, :, start : start + length].transpose(1, 2)
                    grad_weight[:, :, row, col] = taps.sum(0)
            del padded
        if ctx.needs_input_grad[0]:
            grad_padded = mixed.new_zeros(batch, channels, (n + 3) * width)
            for row in range(3):
                for col in range(3):
                    start = row * width + col
                    tap = weight[:, :, row, col].t().expand(batch, channels, channels)
                    grad_padded[:, :, start : start + length].baddbmm_(tap, grad_flat)
            del grad_flat
            grad_padded = grad_padded.view(batch, channels, n + 3, width)
            grad_mixed = torch.add(
                grad_padded[:, :, top : top + n, 1 : n + 1], grad_evolved, alpha=1.0 - alpha
            )
        return grad_mixed, grad_weight, grad_bias, None, None, None


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
    (real, allowed pairs; M is zeroed elsewhere) or None. The conv pads by one on every
    side, or in causal mode by two rows above and none below (rows i-2..i). Returns A
    [B, H, n, n].
    """
    mixed = logits if previous is None else torch.lerp(logits, previous, beta)
    if keep is not None:
        mixed = mixed.masked_fill(~keep, 0.0)
    weight = conv.weight.to(mixed.dtype)
    bias = conv.bias.to(mixed.dtype)
    return _ConvLeakyMix.apply(mixed, weight, bias, alpha, negative_slope, 2 if causal else 1)


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
    supports_tensor_parallel = False
    tensor_parallel_obstacle = "its 3x3 convolution mixes the attention maps of all heads"
    Options = EvolvingOptions

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        self.make_qkv_projections(self.options.bias)
        self.conv = nn.Conv2d(num_heads, num_heads, kernel_size=3, bias=True)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None,
        state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k, v [B, H, n, d], mask bool [B, n], state [B, H, n, n] or None -> (y, A).

        y [B, H, n, d] in the dtype of v; A fp32 (fp64 for fp64 inputs) [B, H, n, n].
        """
        batch, _, n, _ = q.shape
        expected = (batch, self.num_heads, n, n)
        if state is not None and tuple(state.shape) != expected:
            raise ValueError(
                f"evolving attention state has shape {tuple(state.shape)}, expected "
                f"[B, H, n, n] = {expected}; consecutive layers need the same heads and length"
            )
        compute_dtype = torch.promote_types(q.dtype, torch.float32)
        keep, allowed = self._masks(key_padding_mask, n, q.device)
        with torch.autocast(q.device.type, enabled=False):
            q = q.to(compute_dtype) / math.sqrt(self.head_dim)
            logits = q @ k.to(compute_dtype).transpose(-1, -2)
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
            del logits, previous
            scores = evolved if allowed is None else evolved.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
        if self.training and self.options.dropout > 0.0:
            probs = F.dropout(probs, p=self.options.dropout)
        return probs.to(v.dtype) @ v, evolved

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
