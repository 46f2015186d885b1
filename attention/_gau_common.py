"""Pieces shared by the gated attention unit (`gau`) and FLASH (`flash`).

Hua et al., ICML 2022, "Transformer Quality in Linear Time" (arXiv 2202.10447), §2 and §3;
attention_spec.md §4. Both methods are full blocks: they replace attention + FFN, so the
model builds them as ``x + unit(norm(x))`` and the unit returns ``(U ⊙ Ŷ) W_o`` without
the residual.

Shape letters: B batch, n sequence length, D model width, e expanded width (expansion·D),
s shared query/key width, G chunks, C chunk length, P number of scale-offset projections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from attention.base import AttentionOptions, make_linear, upcast


class GatedUnitOptions(AttentionOptions):
    """Options common to GAU and FLASH; defaults are the paper's (s = 128, e = 2D)."""

    expansion: int = Field(2, ge=1, description="e = expansion * d_model (paper: 2)")
    qk_dim: int = Field(128, ge=1, description="s, the shared query/key width (paper: 128)")
    max_relative_distance: int = Field(
        128,
        ge=0,
        description="learned Toeplitz bias b_{t-s}, distances clipped to ±this; 0 turns it off",
    )
    rotary: bool = Field(
        False, description="RoPE on every query/key view (lucidrains adds it; off = spec math)"
    )
    bias: bool = True

    @model_validator(mode="after")
    def _check_rotary(self) -> GatedUnitOptions:
        if self.rotary and self.qk_dim % 2:
            raise ValueError(f"rotary needs an even qk_dim, got {self.qk_dim}")
        return self


class GatedUnitCore(nn.Module):
    """The projections of a gated unit: U, V (gate and values), and P scale-offset views of Z.

    U = SiLU(x W_u), V = SiLU(x W_v) in [B, n, e]; Z = SiLU(x W_z) in [B, n, s];
    view p is Z ⊙ γ_p + β_p (γ ~ N(0, 0.02²), β = 0 at init, as in the paper's pseudocode).
    """

    def __init__(self, d_model: int, options: GatedUnitOptions, num_views: int) -> None:
        super().__init__()
        hidden = options.expansion * d_model
        self.hidden_dim = hidden
        self.qk_dim = options.qk_dim
        self.rotary = options.rotary
        # Under tensor parallelism the expanded width e is cut (U, V column-wise, W_o
        # row-wise); Z, its views and the relu² weights are computed on every rank.
        self.to_gate_value = make_linear(
            d_model, 2 * hidden, bias=options.bias, split="column", parts=2
        )
        self.to_shared = make_linear(d_model, options.qk_dim, bias=options.bias)
        self.gamma = nn.Parameter(torch.randn(num_views, options.qk_dim) * 0.02)
        self.beta = nn.Parameter(torch.zeros(num_views, options.qk_dim))
        self.out = make_linear(hidden, d_model, bias=options.bias, split="row")
        self.relative_bias = (
            ToeplitzBias(options.max_relative_distance)
            if options.max_relative_distance > 0
            else None
        )

    def check_tensor_parallel(self, name: str, tp: int) -> None:
        """Raise a one-line ValueError when the expanded width cannot be cut over tp ranks."""
        if self.hidden_dim % tp != 0:
            raise ValueError(
                f"attention '{name}' expanded width (expansion * model.d_model = "
                f"{self.hidden_dim}) must be divisible by parallel.tp ({tp})"
            )

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """x [B, n, D] -> U [B, n, e], V [B, n, e] (e / tp each under TP), P views [B, n, s] of Z."""
        gate, value = F.silu(self.to_gate_value(x)).chunk(2, dim=-1)
        shared = F.silu(self.to_shared(x))
        # All P views in one fused op [B, n, P, s] (4x fewer passes than P separate ones).
        views = torch.addcmul(self.beta, shared.unsqueeze(-2), self.gamma)
        if self.rotary:
            views = rotate(views, positions_dim=-3)
        return gate, value, list(views.unbind(-2))

    def bias_matrix(
        self, length: int, causal: bool, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor | None:
        """b_{t-s} [length, length], −inf above the diagonal when causal; None if neither.

        relu²(−inf) = 0 with a zero gradient, so the causal mask is exact and costs no
        extra pass over the [.., t, m] weights.
        """
        bias = None if self.relative_bias is None else self.relative_bias(length, device)
        if causal:
            future = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
            if bias is None:
                bias = torch.zeros(length, length, dtype=dtype, device=device)
            bias = bias.masked_fill(future, float("-inf"))
        return None if bias is None else bias.to(dtype)


def key_padding_bias(keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """0 for real keys and −inf for pad keys, from a bool mask (True = real), or None."""
    if keep is None:
        return None
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
        ~keep, float("-inf")
    )


def rotate(t: torch.Tensor, positions_dim: int, base: float = 10000.0) -> torch.Tensor:
    """RoPE (Su et al. 2021) on the last dim of t, position = index along ``positions_dim``.

    Pairs (i, i + s/2) rotate by angle position · base^(-2i/s): x·cos + rotate_half(x)·sin.
    """
    width, length = t.shape[-1], t.shape[positions_dim]
    # Angles in float64 on the CPU (exact at long lengths, any device), then moved.
    frequencies = base ** (-torch.arange(0, width // 2, dtype=torch.float64) * 2 / width)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * frequencies
    angles = torch.cat([angles, angles], dim=-1).to(t.device, upcast(t).dtype)
    shape = [1] * t.dim()
    shape[positions_dim], shape[-1] = length, width
    cos, sin = angles.cos().view(shape), angles.sin().view(shape)
    first, second = t.chunk(2, dim=-1)
    return t * cos + torch.cat([-second, first], dim=-1) * sin


class ToeplitzBias(nn.Module):
    """A learned scalar bias per clipped relative distance t - s (one head), zero at init."""

    def __init__(self, max_distance: int) -> None:
        super().__init__()
        self.max_distance = max_distance
        self.table = nn.Parameter(torch.zeros(2 * max_distance + 1))

    def forward(self, length: int, device: torch.device) -> torch.Tensor:
        """[length, length] fp32 (fp64 for fp64 tables) with entry [t, s] = table[clip(t - s, ±max) + max]."""
        positions = torch.arange(length, device=device)
        distance = positions[:, None] - positions[None, :]
        index = distance.clamp(-self.max_distance, self.max_distance) + self.max_distance
        return upcast(self.table)[index]


def relu_squared_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    divisor: torch.Tensor | float,
    biases: tuple[torch.Tensor | None, ...] = (),
) -> torch.Tensor:
    """relu²(q kᵀ / divisor + Σ biases) in fp32 (or fp64), no softmax: q [.., t, s], k [.., m, s].

    Returns [.., t, m]. ``divisor`` is a float or a tensor broadcastable to the queries
    (per-sequence lengths); each bias broadcasts to the scores, −inf entries give weight 0
    (masks: exact, since relu²(−inf) = 0 and its gradient is 0). Scores are computed in fp32
    whatever the input dtype (relu² overflows fp16/bf16 easily).
    """
    query = upcast(query) / divisor  # [.., t, s] is cheaper to scale than [.., t, m]
    scores = query @ upcast(key).transpose(-1, -2)
    for bias in biases:
        if bias is not None:
            scores += bias  # in place: the matmul's backward does not need its output
    return F.relu(scores).square()


def real_lengths(
    key_padding_mask: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    """Number of real tokens per sequence as fp32 [B] (at least 1), n when there is no mask."""
    if key_padding_mask is None:
        return torch.full((batch,), float(length), device=device)
    return key_padding_mask.sum(dim=-1).clamp(min=1).float()
