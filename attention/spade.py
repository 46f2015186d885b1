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
exponentials are taken per channel and the rest is one real matmul. Non-causal layers
use a bidirectional SSM (a second kernel over the future, as S4's ``bidirectional``) and the
FFT. Causal layers use the causal kernel only, computed by a chunked scan instead of the
FFT (``convolve_chunked``: Toeplitz matmul inside chunks of 64, diagonal state carried
across chunks): an FFT mixes rounding errors from every position into every output, so a
future token would change past outputs by ~1e-16 and the bit-exact causality probe would
fail; the scan never reads a later input. Both equal the recurrence (tests). Padded
positions are zeroed before the convolution. The SSM runs in fp32 under bf16/fp16 (autocast
off), and in fp64 for fp64 inputs.

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

from attention.base import check_padding_mask, make_linear, zero_padded_queries
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
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        if not 0.0 < dt_min <= dt_max:
            raise ValueError(f"dt_min ({dt_min}) must be > 0 and <= dt_max ({dt_max})")
        modes = d_state // 2
        directions = 2 if bidirectional else 1
        self.bidirectional = bidirectional
        self.chunk_size = chunk_size
        log_dt = torch.rand(directions, channels) * (math.log(dt_max) - math.log(dt_min))
        self.log_dt = nn.Parameter(log_dt + math.log(dt_min))
        self.log_a_real = nn.Parameter(torch.full((directions, channels, modes), math.log(0.5)))
        a_imag = math.pi * torch.arange(modes, dtype=torch.float32)
        self.a_imag = nn.Parameter(a_imag.repeat(directions, channels, 1))
        # C ~ complex standard normal (variance 1 in total), stored as (real, imag) pairs.
        self.c = nn.Parameter(torch.randn(directions, channels, modes, 2) * math.sqrt(0.5))
        self.skip = nn.Parameter(torch.randn(channels))
        self.output = make_linear(channels, channels)  # replicated under tensor parallelism
        if lr is not None:
            for param in (self.log_dt, self.log_a_real, self.a_imag):
                param._optim = {"lr": lr, "weight_decay": 0.0}  # type: ignore[attr-defined]

    def modes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ZOH modes in real form, each [R, D, N/2]: Re C', Im C', Re Δa, Im Δa (fp32 or fp64).

        C' = C (exp(Δa) - 1) / a folds B̄ into C, as S4D does.
        """
        real = torch.float64 if self.c.dtype == torch.float64 else torch.float32
        log_dt, log_a_real, a_imag, c_pair = (
            p.to(real) for p in (self.log_dt, self.log_a_real, self.a_imag, self.c)
        )
        dt = torch.exp(log_dt).unsqueeze(-1)  # [R, D, 1]
        a = torch.complex(-torch.exp(log_a_real), a_imag)
        c = torch.view_as_complex(c_pair.contiguous()) * (torch.exp(dt * a) - 1) / a
        return c.real, c.imag, dt * -torch.exp(log_a_real), dt * a_imag

    @staticmethod
    def powers(
        decay: torch.Tensor, angle: torch.Tensor, steps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Real and imaginary parts of exp(l·Δa) for l in steps [S]: each [..., N/2, S]."""
        magnitude = torch.exp(decay.unsqueeze(-1) * steps)
        phase = angle.unsqueeze(-1) * steps
        return magnitude * torch.cos(phase), magnitude * torch.sin(phase)

    def kernel(self, length: int) -> torch.Tensor:
        """Real SSM kernels [R, D, L]: K_l = 2 Re Σ_k C'_k exp(l Δa_k)."""
        c_re, c_im, decay, angle = self.modes()
        # exp(l·Δa) = exp(p·M·Δa) · exp(r·Δa) for l = p·M + r: only O(N·√L) exponentials, and
        # the sum over modes becomes one real batched matmul. Large tensors stay real because
        # complex exp is not vectorised on CPU.
        inner_len = math.isqrt(max(length - 1, 0)) + 1
        outer_len = -(-length // inner_len)
        steps = torch.arange(inner_len, device=decay.device, dtype=decay.dtype)
        inner_cos, inner_sin = self.powers(decay, angle, steps)  # [R, D, N/2, M]
        c_re, c_im = c_re.unsqueeze(-1), c_im.unsqueeze(-1)
        inner_re = c_re * inner_cos - c_im * inner_sin
        inner_im = c_re * inner_sin + c_im * inner_cos
        blocks = torch.arange(outer_len, device=decay.device, dtype=decay.dtype) * inner_len
        outer_re, outer_im = self.powers(decay, angle, blocks)  # [R, D, N/2, P]
        # Re(Σ_k outer·inner) = Σ_k (outer_re·inner_re - outer_im·inner_im).
        left = torch.cat([outer_re, -outer_im], dim=2).transpose(-1, -2).contiguous()  # [R,D,P,N]
        right = torch.cat([inner_re, inner_im], dim=2)  # [R, D, N, M]
        powers = left @ right  # [R, D, P, M]
        return 2 * powers.reshape(*powers.shape[:2], -1)[..., :length]

    def convolve_fft(self, u: torch.Tensor) -> torch.Tensor:
        """conv(u, K) + D ⊙ u for u [B, n, D] by an FFT of length 2n (no circular wrap)."""
        n = u.shape[1]
        kernels = self.kernel(n)  # [R, D, n]
        full = F.pad(kernels[0], (0, n))  # lags 0..n-1 (causal part), length 2n
        if self.bidirectional:
            # Lag -(j+1) sits at index 2n - 1 - j: keys after the query, the query itself excluded.
            full = full + F.pad(kernels[1].flip(-1), (n, 0))
        signal = u.transpose(1, 2).to(kernels.dtype)  # [B, D, n]
        spectrum = torch.fft.rfft(signal, n=2 * n) * torch.fft.rfft(full, n=2 * n)
        y = torch.fft.irfft(spectrum, n=2 * n)[..., :n]
        return (y + signal * self.skip.to(kernels.dtype)[:, None]).transpose(1, 2)

    def convolve_chunked(self, u: torch.Tensor) -> torch.Tensor:
        """Causal conv(u, K) + D ⊙ u for u [B, n, D], exactly causal (no FFT rounding leak).

        Chunks of C positions: a lower-triangular Toeplitz matmul inside each chunk, and the
        diagonal state h_g = exp(CΔa) h_(g-1) + Σ_s exp((C-1-s)Δa) u_s carried across chunks
        (one small step per chunk). O(n·C·D + n·N·D). An output never reads a later input,
        so the causality probe holds bit for bit, which an FFT cannot give.
        """
        batch, n, channels = u.shape
        chunk = min(self.chunk_size, n)
        num_chunks = -(-n // chunk)
        c_re, c_im, decay, angle = (t[0] for t in self.modes())  # [D, N/2]
        modes, real = decay.shape[-1], decay.dtype
        # Channel-major, contiguous [D, C, B·G] columns so every product is one plain bmm.
        u_pad = F.pad(u.to(real), (0, 0, 0, num_chunks * chunk - n))
        u_pad = u_pad.view(batch, num_chunks, chunk, channels).permute(3, 2, 0, 1)
        columns = u_pad.reshape(channels, chunk, batch * num_chunks)
        # Lower-triangular Toeplitz T[d, t, s] = K[d, t - s]: windows of the left-padded kernel.
        kernel = F.pad(self.kernel(chunk)[0], (chunk - 1, 0))  # [D, 2C - 1], zeros for t < s
        toeplitz = kernel.unfold(-1, chunk, 1).flip(-1)  # [D, C, C]
        y = toeplitz @ columns  # within each chunk: [D, C, B·G]

        # Chunk-end states x_g = Σ_s exp((C-1-s)Δa) u_s, then h_g = exp(CΔa) h_(g-1) + x_g.
        to_end = torch.arange(chunk - 1, -1, -1, device=u.device, dtype=real)
        end = torch.cat(self.powers(decay, angle, to_end), dim=1)  # [D, 2·N/2, C]
        x = (end @ columns).view(channels, 2, modes, batch, num_chunks)
        step = torch.tensor([float(chunk)], device=u.device, dtype=real)
        z_re, z_im = (t for t in self.powers(decay, angle, step))  # exp(CΔa): [D, N/2, 1]
        # unbind (not x[..., g]): its backward is one stack, not a full-size zero tensor per g.
        chunks_re, chunks_im = x[:, 0].unbind(-1), x[:, 1].unbind(-1)  # each [D, N/2, B]
        h_re, h_im = [torch.zeros_like(chunks_re[0])], [torch.zeros_like(chunks_im[0])]
        for g in range(num_chunks - 1):  # the state entering chunk g + 1
            previous_re, previous_im = h_re[-1], h_im[-1]
            h_re.append(z_re * previous_re - z_im * previous_im + chunks_re[g])
            h_im.append(z_re * previous_im + z_im * previous_re + chunks_im[g])
        state = torch.stack([torch.stack(h_re, -1), torch.stack(h_im, -1)], dim=1)
        state = state.view(channels, 2 * modes, batch * num_chunks)

        # y_t += 2 Re Σ_k C'_k exp((t+1)Δa_k) h_k for t in the chunk.
        ahead = torch.arange(1, chunk + 1, device=u.device, dtype=real)
        p_re, p_im = self.powers(decay, angle, ahead)  # [D, N/2, C]
        e_re = c_re.unsqueeze(-1) * p_re - c_im.unsqueeze(-1) * p_im
        e_im = c_re.unsqueeze(-1) * p_im + c_im.unsqueeze(-1) * p_re
        readout = torch.cat([e_re, -e_im], dim=1).transpose(1, 2).contiguous()  # [D, C, N]
        y = y + 2 * (readout @ state)
        y = y.view(channels, chunk, batch, num_chunks).permute(2, 3, 1, 0)
        y = y.reshape(batch, num_chunks * chunk, channels)[:, :n]
        return y + u.to(real) * self.skip.to(real)

    def convolve(self, u: torch.Tensor) -> torch.Tensor:
        """The SSM convolution of u [B, n, D]: FFT when bidirectional, chunked scan when causal."""
        return self.convolve_fft(u) if self.bidirectional else self.convolve_chunked(u)

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
    # The local attention's heads are cut as in ``local``; the S4D branch, its norms and the
    # aggregate run on every rank on the replicated x (replicated parameters).
    supports_tensor_parallel = True
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
            self.aggregate = self.make_linear(2 * d_model, d_model)

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
