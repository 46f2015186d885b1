"""SPADE (Zuo et al., 2022): a state-space layer beside local attention in the bottom layer.

Shape letters: B batch, n length, D model width (= SSM channels), N state size (complex modes
N/2 per channel), R directions (1 causal, 2 bidirectional), L kernel length (= n).

Layer ``layer_idx % ssm_every_n_layers == 0`` (by default only layer 0, like the reference's
``s4_every_n_layers=100``) computes a global branch G = SSM(x) and a local branch
L = LocalAttn(x) from the same input and combines them (microsoft/EfficientLongSequenceModeling
``spade-modules/spade_layer.py``):

* ``concat`` (default, the WikiText-103 run): W_agg [LN_g(G); LN_l(L)], W_agg: 2D -> D;
* ``add``: ssm_weight · LN_g(G) + (1 - ssm_weight) · LN_l(L);
* ``stack``: L = LocalAttn(G), no norms.

Every other layer is local attention only (``attention/local.py``, shared code). The
residual, dropout and FFN around the block are the transformer's, as for any method.

The SSM is S4D (Gu et al., 2022, "On the Parameterization and Initialization of Diagonal
State Space Models"), not the reference's S4: S4 needs a Cauchy kernel (pykeops or a CUDA
extension) we cannot depend on; S4D is the diagonal simplification by the same group, pure
PyTorch. Per channel, ``A = diag(a)`` with ``a = -exp(log_a_real) + i·a_imag`` (S4D-Lin init:
Re a = -1/2, Im a = π·k), step ``Δ = exp(log_dt)``, ``log Δ ~ U[log dt_min, log dt_max]``,
ZOH with B folded into C, so the kernel is ``K_l = 2·Re Σ_k C'_k exp(l·Δa_k)`` with
``C'_k = C_k (exp(Δa_k) - 1) / a_k``, and ``y = conv(u, K) + D ⊙ u`` by an FFT of length 2n
(no circular wrap), then GELU and a linear output map (S4's block). The Vandermonde product
is split as exp(l·Δa) = exp(p·M·Δa)·exp(r·Δa), l = p·M + r, M ≈ √n, so only O(N·√n)
exponentials are taken per channel and the rest is one complex matmul. Non-causal layers
use a bidirectional SSM (a second kernel over the future, as S4's ``bidirectional``);
causal layers only the causal kernel. Padded positions are zeroed before the convolution.
FFTs run in fp32 (complex64) under bf16/fp16, and in fp64 for fp64 inputs.

Defaults (``run_lm.sh``): d_state 64, dt in [0.001, 0.1], combine concat, T5 relative bias
32 buckets / distance 128; local radius 127 (see ``attention/local.py`` for why not 511).
``freeze_ssm`` follows the README ("initialize the S4 module and then freeze its
parameters"). The SSM's A and Δ carry ``_optim = {"lr": ssm_lr, "weight_decay": 0.0}``
(S4's convention) so a trainer can put them in their own optimizer group.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from attention.base import check_padding_mask, zero_padded_queries
from attention.local import LocalAttention, LocalOptions
from attention.registry import register


class SpadeOptions(LocalOptions):
    """Options of SPADE: the local attention ones plus the SSM and how it is combined."""

    d_state: int = Field(64, ge=2, multiple_of=2, description="SSM state size N (N/2 modes)")
    dt_min: float = Field(1e-3, gt=0.0)
    dt_max: float = Field(1e-1, gt=0.0)
    combine: Literal["concat", "add", "stack"] = "concat"
    ssm_weight: float = Field(0.5, ge=0.0, le=1.0, description="weight of the SSM in 'add'")
    ssm_every_n_layers: int = Field(1000, ge=1, description="layers with layer_idx % k == 0")
    freeze_ssm: bool = False
    ssm_lr: float = Field(1e-3, gt=0.0, description="learning rate hint for A and dt")


class DiagonalStateSpace(nn.Module):
    """S4D layer: u [B, n, D] -> GELU(conv(u, K) + D ⊙ u) W_out, one SSM per channel."""

    def __init__(
        self,
        channels: int,
        *,
        d_state: int = 64,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        bidirectional: bool = False,
        lr: float | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < dt_min <= dt_max:
            raise ValueError(f"dt_min ({dt_min}) must be > 0 and <= dt_max ({dt_max})")
        modes = d_state // 2
        directions = 2 if bidirectional else 1
        self.bidirectional = bidirectional
        log_dt = torch.rand(directions, channels) * (math.log(dt_max) - math.log(dt_min))
        self.log_dt = nn.Parameter(log_dt + math.log(dt_min))
        self.log_a_real = nn.Parameter(torch.full((directions, channels, modes), math.log(0.5)))
        a_imag = math.pi * torch.arange(modes, dtype=torch.float32)
        self.a_imag = nn.Parameter(a_imag.repeat(directions, channels, 1))
        # C ~ complex standard normal (variance 1 in total), stored as (real, imag) pairs.
        self.c = nn.Parameter(torch.randn(directions, channels, modes, 2) * math.sqrt(0.5))
        self.skip = nn.Parameter(torch.randn(channels))
        self.output = nn.Linear(channels, channels)
        if lr is not None:
            for param in (self.log_dt, self.log_a_real, self.a_imag):
                param._optim = {"lr": lr, "weight_decay": 0.0}  # type: ignore[attr-defined]

    def kernel(self, length: int) -> torch.Tensor:
        """Real SSM kernels [R, D, L]: K_l = 2 Re Σ_k C_k (exp(Δa_k) - 1)/a_k · exp(l Δa_k)."""
        complex_dtype = torch.complex128 if self.c.dtype == torch.float64 else torch.complex64
        dt = torch.exp(self.log_dt).unsqueeze(-1)  # [R, D, 1]
        a = torch.complex(-torch.exp(self.log_a_real), self.a_imag).to(complex_dtype)
        c = torch.view_as_complex(self.c.contiguous()).to(complex_dtype)
        c = c * (torch.exp(dt * a) - 1) / a  # ZOH with B folded into C: [R, D, N/2]
        decay, angle = dt * -torch.exp(self.log_a_real), dt * self.a_imag  # Δa = decay + i·angle
        # exp(l·Δa) = exp(p·M·Δa) · exp(r·Δa) for l = p·M + r: only O(N·√L) exponentials, and
        # the sum over modes becomes one real batched matmul. Large tensors stay real because
        # complex exp is not vectorised on CPU.
        inner_len = math.isqrt(max(length - 1, 0)) + 1
        outer_len = -(-length // inner_len)
        steps = torch.arange(inner_len, device=dt.device, dtype=dt.dtype)
        blocks = torch.arange(outer_len, device=dt.device, dtype=dt.dtype) * inner_len
        inner_abs = torch.exp(decay.unsqueeze(-1) * steps)  # [R, D, N/2, M]
        inner_cos = torch.cos(angle.unsqueeze(-1) * steps)
        inner_sin = torch.sin(angle.unsqueeze(-1) * steps)
        c_re, c_im = c.real.unsqueeze(-1), c.imag.unsqueeze(-1)
        inner_re = inner_abs * (c_re * inner_cos - c_im * inner_sin)
        inner_im = inner_abs * (c_re * inner_sin + c_im * inner_cos)
        outer_abs = torch.exp(decay.unsqueeze(-1) * blocks)  # [R, D, N/2, P]
        outer_re = outer_abs * torch.cos(angle.unsqueeze(-1) * blocks)
        outer_im = outer_abs * torch.sin(angle.unsqueeze(-1) * blocks)
        # Re(Σ_k outer·inner) = Σ_k (outer_re·inner_re - outer_im·inner_im).
        left = torch.cat([outer_re, -outer_im], dim=2).transpose(-1, -2)  # [R, D, P, N]
        right = torch.cat([inner_re, inner_im], dim=2)  # [R, D, N, M]
        powers = left @ right  # [R, D, P, M]
        return 2 * powers.reshape(*powers.shape[:2], -1)[..., :length]

    def convolve(self, u: torch.Tensor) -> torch.Tensor:
        """conv(u, K) + D ⊙ u for u [B, n, D] (pads already zeroed), in the kernel's dtype."""
        n = u.shape[1]
        kernels = self.kernel(n)  # [R, D, n]
        full = F.pad(kernels[0], (0, n))  # lags 0..n-1 (causal part), length 2n
        if self.bidirectional:
            # Lag -(j+1) sits at index 2n - 1 - j: keys after the query, the query itself excluded.
            full = full + F.pad(kernels[1].flip(-1), (n, 0))
        signal = u.transpose(1, 2).to(kernels.dtype)  # [B, D, n]
        spectrum = torch.fft.rfft(signal, n=2 * n) * torch.fft.rfft(full, n=2 * n)
        y = (
            torch.fft.irfft(spectrum, n=2 * n)[..., :n]
            + signal * self.skip.to(kernels.dtype)[:, None]
        )
        return y.transpose(1, 2)

    def forward(
        self, u: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """u [B, n, D] -> [B, n, D]; padded positions are zeroed before the convolution."""
        if key_padding_mask is not None:
            u = u * key_padding_mask.unsqueeze(-1).to(u.dtype)
        compute = torch.float64 if u.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=u.device.type, enabled=False):
            y = self.convolve(u.to(compute))
        return self.output(F.gelu(y).to(u.dtype))


@register
class SpadeAttention(LocalAttention):
    """SPADE block: S4D + local attention in the bottom layer, local attention above."""

    name = "spade"
    supports_causal = True
    supports_padding = True
    Options = SpadeOptions

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        options: SpadeOptions = self.options  # type: ignore[assignment]
        if options.dt_min > options.dt_max:
            raise ValueError(
                f"dt_min ({options.dt_min}) must be <= dt_max ({options.dt_max}); swap them"
            )
        self.has_ssm = self.layer_idx % options.ssm_every_n_layers == 0
        self.combine = options.combine
        if not self.has_ssm:
            return
        self.ssm = DiagonalStateSpace(
            d_model,
            d_state=options.d_state,
            dt_min=options.dt_min,
            dt_max=options.dt_max,
            bidirectional=not self.causal,
            lr=options.ssm_lr,
        )
        if options.freeze_ssm:
            self.ssm.requires_grad_(False)
        if self.combine in ("concat", "add"):
            self.norm_global = nn.LayerNorm(d_model)
            self.norm_local = nn.LayerNorm(d_model)
        if self.combine == "concat":
            self.aggregate = nn.Linear(2 * d_model, d_model)

    def forward(
        self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None, state: Any = None
    ) -> tuple[torch.Tensor, None]:
        """x [B, n, D], key_padding_mask bool [B, n] -> (y [B, n, D], None)."""
        check_padding_mask(x, key_padding_mask)
        if not self.has_ssm:
            return zero_padded_queries(self.local(x, key_padding_mask), key_padding_mask), None
        global_branch = self.ssm(x, key_padding_mask)
        if self.combine == "stack":
            y = self.local(global_branch, key_padding_mask)
        else:
            local_branch = self.norm_local(self.local(x, key_padding_mask))
            global_branch = self.norm_global(global_branch)
            if self.combine == "concat":
                y = self.aggregate(torch.cat([global_branch, local_branch], dim=-1))
            else:
                weight = self.options.ssm_weight
                y = weight * global_branch + (1.0 - weight) * local_branch
        return zero_padded_queries(y, key_padding_mask), None
