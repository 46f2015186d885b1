"""Performer / FAVOR+ attention (Choromanski et al., ICLR 2021; attention_spec.md §3).

Shape letters: B batch, H heads, n sequence length, D model width, d = D / H head width,
m random features, g chunks, c chunk length (n = g·c after padding).

Softmax attention softmax(q·k/√d) is estimated with positive random features
φ(x)_i = m^{-1/2}·exp(ω_i·x̃ − |x̃|²/2), x̃ = x·d^{-1/4}, ω_i orthogonal Gaussian rows, so
that E[φ(q)·φ(k)] = exp(q·k/√d). Bidirectional: Y = D⁻¹ φ(Q)(φ(K)ᵀV). Causal: the same
with prefix sums, run chunked (a quadratic inside each chunk plus a carried m×d state
between chunks), so no [n, m, d] prefix tensor is ever stored.

Stabilisers. Every feature row is computed as exp(ω·x̃ − max_i ω_i·x̃) + eps, and the row
max (minus |x̃|²/2) is kept as a log-scale. Query log-scales cancel in the ratio. Key rows
are re-weighted by exp(log-scale − M), where M is the max log-scale over the keys a query
may see: over all valid keys (bidirectional) or a running max over keys s ≤ t (causal; the
inter-chunk carry is rescaled like a streaming softmax). M is one constant per query, so
it cancels exactly, and in causal mode it never reads the future: outputs at t are
bit-identical when later inputs change. Maxima carry no gradient. With eps > 0 the
effective feature is exp(u) + eps·exp(max u), u = ω·x̃ − |x̃|²/2, i.e. eps is relative to
the row's own largest feature (the reference adds it relative to one max over all keys,
which leaks the future in causal mode; spec §3 pitfalls).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from attention.base import Attention, AttentionOptions
from attention.registry import register

RELU_KERNEL_EPSILON = 1e-3  # official generalised-kernel default (spec §3)
_NEG_LOG = -1.0e30  # log-scale of padded keys: below any real one, finite in fp32
_SEED_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def mixed_seed(seed: int, layer_idx: int, redraw_count: int) -> int:
    """One 63-bit generator seed from (seed, layer_idx, redraw_count); a pure function."""
    value = 0
    for part, multiplier in zip((seed, layer_idx, redraw_count), _SEED_MIX):
        value = (value ^ (part * multiplier)) * 0xFF51AFD7ED558CCD % (1 << 64)
    return value % (1 << 63)


def draw_projection(
    num_features: int, head_dim: int, *, seed: int, orthogonal: bool = True, scaling: int = 0
) -> torch.Tensor:
    """Random feature matrix ω [m, d] float64 on CPU, from a private generator seeded by ``seed``.

    Orthogonal: ⌈m/d⌉ independent d×d blocks with orthonormal rows (QR of a Gaussian
    matrix, done on CPU), first m rows kept, rows rescaled to chi-distributed norms
    (scaling=0) or to √d (scaling=1). Otherwise rows are iid N(0, I_d).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if not orthogonal:
        return torch.randn(num_features, head_dim, generator=generator, dtype=torch.float64)
    num_blocks = math.ceil(num_features / head_dim)
    gaussian = torch.randn(num_blocks, head_dim, head_dim, generator=generator, dtype=torch.float64)
    q_factor, r_factor = torch.linalg.qr(gaussian)
    # Fix the column signs with diag(R) so Q is Haar-distributed. LAPACK's Householder QR
    # picks those signs from the data (the first column's first entry is always <= 0),
    # which biases exp(ω·x); the reference code skips this step.
    q_factor = q_factor * torch.sign(torch.diagonal(r_factor, dim1=-2, dim2=-1)).unsqueeze(-2)
    rows = q_factor.transpose(-1, -2).reshape(num_blocks * head_dim, head_dim)[:num_features]
    if scaling == 0:
        norms = torch.randn(num_features, head_dim, generator=generator, dtype=torch.float64)
        multiplier = norms.norm(dim=-1)
    else:
        multiplier = torch.full((num_features,), math.sqrt(head_dim), dtype=torch.float64)
    return rows * multiplier[:, None]


def favor_features(
    x: torch.Tensor, projection: torch.Tensor, *, kernel: str = "softmax", eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature rows and log-scales: x [..., n, d], ω [m, d] -> rows [..., n, m], log-scale [..., n].

    Softmax kernel: rows = exp(ω·x̃ − max_i ω_i·x̃) + eps and log_scale = max_i ω_i·x̃ − |x̃|²/2,
    so that with eps = 0 the positive feature is φ(x) = m^{-1/2}·exp(log_scale)·rows. The
    row max is a stabiliser without gradient; the |x̃|² term keeps its gradient. The m^{-1/2}
    factor cancels in attention and is left out. Relu kernel: rows = ReLU(ωx) + 1e-3,
    log_scale 0.
    """
    if kernel == "relu":
        logits = x @ projection.transpose(0, 1)
        return torch.relu(logits) + RELU_KERNEL_EPSILON, logits.new_zeros(logits.shape[:-1])
    normaliser = x.shape[-1] ** -0.25
    logits = x @ (projection * normaliser).transpose(0, 1)  # ω·x̃, scaling the small matrix
    row_max = logits.detach().amax(dim=-1, keepdim=True)
    rows = torch.exp(logits - row_max) + eps
    log_scale = row_max.squeeze(-1) - (0.5 * normaliser**2) * x.square().sum(dim=-1)
    return rows, log_scale


def _key_reference(log_scale: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Key log-scales with pads at a large negative value (they never set a max), no grad."""
    log_scale = log_scale.detach()
    if valid is None:
        return log_scale
    return log_scale.masked_fill(~valid, _NEG_LOG)


def _masked_exp(log_weight: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """exp(log_weight) where allowed, exactly 0 elsewhere (no gradient leaks through)."""
    if allowed is None:
        return torch.exp(log_weight)
    return torch.exp(log_weight.masked_fill(~allowed, -math.inf))


def _ratio(out: torch.Tensor) -> torch.Tensor:
    """[..., d + 1] (numerator | denominator) -> numerator / denominator [..., d]."""
    denominator = out[..., -1:]
    return out[..., :-1] / denominator.clamp_min(torch.finfo(denominator.dtype).tiny)


def bidirectional_favor(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    log_k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """D⁻¹ φ(Q)(φ(K)ᵀV): rows [B, H, n, m], log_k [B, H, n], v [B, H, n, d], valid [B, 1, n] -> [B, H, n, d]."""
    reference = _key_reference(log_k, valid).amax(dim=-1, keepdim=True)
    weight = _masked_exp(log_k - reference, valid).unsqueeze(-1)  # [B, H, n, 1]
    # Numerator and denominator in one matmul: values get a trailing column of ones.
    key_value = phi_k.transpose(-1, -2) @ torch.cat([v * weight, weight], dim=-1)
    return _ratio(phi_q @ key_value)


def causal_favor(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    log_k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """Prefix-sum FAVOR+, chunked: same shapes as ``bidirectional_favor``; n % chunk_size == 0.

    Inside a chunk a masked c×c quadratic; between chunks an m×(d+1) state (numerator and
    denominator), kept at the scale of the running key max so every exp(·) is at most 1.
    The carry is one [g, g] matrix product over chunks, so there is no Python loop.
    """
    b, h, n, m = phi_q.shape
    d = v.shape[-1]
    g, c = n // chunk_size, chunk_size
    assert g * c == n, f"sequence length {n} is not a multiple of chunk_size {c}"
    running = torch.cummax(_key_reference(log_k, valid), dim=-1).values  # M_t [B, H, n]
    phi_q, phi_k = phi_q.view(b, h, g, c, m), phi_k.view(b, h, g, c, m)
    log_k, running = log_k.view(b, h, g, c), running.view(b, h, g, c)
    values = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1).view(b, h, g, c, d + 1)
    key_ok = None if valid is None else valid.view(*valid.shape[:-1], g, c)

    # Intra-chunk: weight of key s for query t is exp(log_k[s] - M_t) for s <= t.
    allowed = torch.ones(c, c, dtype=torch.bool, device=v.device).tril()
    if key_ok is not None:
        allowed = allowed & key_ok.unsqueeze(-2)
    weight = _masked_exp(log_k.unsqueeze(-2) - running.unsqueeze(-1), allowed)
    out = ((phi_q @ phi_k.transpose(-1, -2)) * weight) @ values  # [B, H, g, c, d + 1]

    # Inter-chunk: chunk summaries at the chunk-end scale E_j, then the carried state.
    chunk_end = running[..., -1]  # E_j [B, H, g]
    summary_weight = _masked_exp(log_k - chunk_end.unsqueeze(-1), key_ok).unsqueeze(-1)
    summary = phi_k.transpose(-1, -2) @ (values * summary_weight)  # [B, H, g, m, d + 1]
    # S_j = sum_{i<j} summary_i * exp(E_i - E_{j-1}), one [g, g] lower-triangular mix per
    # (batch, head). E is non-decreasing, so every factor is at most 1 and none reads chunk j.
    previous_end = torch.cat([running.new_full((b, h, 1), _NEG_LOG), chunk_end[..., :-1]], dim=-1)
    earlier = torch.ones(g, g, dtype=torch.bool, device=v.device).tril(diagonal=-1)
    mix = _masked_exp(chunk_end.unsqueeze(-2) - previous_end.unsqueeze(-1), earlier)
    state = (mix @ summary.flatten(3)).view(b, h, g, m, d + 1)  # S_j at scale E_{j-1}
    carry = torch.exp(previous_end.unsqueeze(-1) - running).unsqueeze(-1)  # [B, H, g, c, 1]
    out = out + (phi_q @ state) * carry
    return _ratio(out).view(b, h, n, d)


def favor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    *,
    causal: bool = False,
    valid: torch.Tensor | None = None,
    kernel: str = "softmax",
    eps: float = 1e-6,
    chunk_size: int = 128,
) -> torch.Tensor:
    """FAVOR+ attention: q, k, v [B, H, n, d], ω [m, d], valid bool [B, n] -> [B, H, n, d].

    Runs in the dtype of q (call it with fp32 or fp64). Padded keys (valid False) get
    φ(k) = 0, which removes them from numerator and denominator.
    """
    phi_q, _ = favor_features(q, projection, kernel=kernel, eps=eps)
    phi_k, log_k = favor_features(k, projection, kernel=kernel, eps=eps)
    key_valid = None if valid is None else valid[:, None, :]
    if not causal:
        return bidirectional_favor(phi_q, phi_k, log_k, v, key_valid)
    n = q.shape[2]
    pad = (-n) % chunk_size
    if pad:
        spec = [0, 0, 0, pad]
        phi_q, phi_k, v = (nn.functional.pad(t, spec) for t in (phi_q, phi_k, v))
        log_k = nn.functional.pad(log_k, [0, pad])
        base = (
            torch.ones(q.shape[0], n, dtype=torch.bool, device=q.device) if valid is None else valid
        )
        key_valid = nn.functional.pad(base, [0, pad], value=False)[:, None, :]
    return causal_favor(phi_q, phi_k, log_k, v, key_valid, chunk_size)[:, :, :n]


class PerformerOptions(AttentionOptions):
    """Options of ``performer``; None for nb_features means ⌊d·ln d⌋ (266 at d = 64)."""

    dropout: float = Field(0.0, ge=0.0, le=0.0, description="FAVOR+ has no attention matrix")
    nb_features: int | None = Field(None, ge=1)
    kernel: Literal["softmax", "relu"] = "softmax"
    orthogonal: bool = True
    ortho_scaling: Literal[0, 1] = 0
    eps: float = Field(1e-6, ge=0.0)
    feature_redraw_interval: int | None = Field(1000, ge=1)
    seed: int = Field(0, ge=0)
    chunk_size: int = Field(128, ge=1)
    bias: bool = True


@register
class PerformerAttention(Attention):
    """FAVOR+ with positive orthogonal random features, bidirectional or causal.

    Defaults: nb_features ⌊d·ln d⌋ (lucidrains; Θ(d log d) in the paper), orthogonal rows
    with chi norms, eps 1e-6 (official), redraw every 1000 training forwards (lucidrains),
    causal chunk 128. One feature matrix per layer shared by all heads (official code).
    The features are a pure function of (seed, layer_idx, redraw_count); redraws happen
    only in train mode and never during an activation-checkpoint recompute. For
    gradient accumulation keep feature_redraw_interval a multiple of the micro-batches
    per step, so every micro-batch of a step (and its recompute) sees the same features.
    """

    name = "performer"
    supports_causal = True
    supports_padding = True
    stochastic_structure = True
    # One feature matrix for all heads, a pure function of (seed, layer, redraw count): the
    # same on every tensor-parallel rank, so it stays replicated.
    supports_tensor_parallel = True
    Options = PerformerOptions

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        opts = self.options
        self.num_features = opts.nb_features or max(1, int(self.head_dim * math.log(self.head_dim)))
        self.make_qkv_projections(opts.bias)
        # Counters are plain ints (no device sync per call), saved through get_extra_state.
        self.forward_count = 0
        self.redraw_count = 0
        self.register_buffer("projection", self._draw(0).float())

    def _draw(self, redraw_count: int) -> torch.Tensor:
        """The feature matrix ω [m, d] float64 for one redraw count."""
        opts = self.options
        seed = mixed_seed(opts.seed, self.layer_idx, redraw_count)
        return draw_projection(
            self.num_features,
            self.head_dim,
            seed=seed,
            orthogonal=opts.orthogonal,
            scaling=opts.ortho_scaling,
        )

    def _load_draw(self) -> None:
        fresh = self._draw(self.redraw_count)
        self.projection.copy_(fresh.to(self.projection.device, self.projection.dtype))

    def redraw_features(self) -> None:
        """Advance the redraw count and load the matching feature matrix."""
        self.redraw_count += 1
        self._load_draw()

    def _maybe_redraw(self) -> None:
        interval = self.options.feature_redraw_interval
        # A forward inside backward is an activation-checkpoint recompute: never redraw there.
        if not self.training or torch._C._current_graph_task_id() != -1:
            return
        if interval is not None and self.forward_count > 0 and self.forward_count % interval == 0:
            self.redraw_features()
        self.forward_count += 1

    def get_extra_state(self) -> dict[str, int]:
        return {"forward_count": self.forward_count, "redraw_count": self.redraw_count}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.forward_count = int(state["forward_count"])
        self.redraw_count = int(state["redraw_count"])

    def forward(self, x, *, key_padding_mask=None, state=None):
        self._maybe_redraw()
        return super().forward(x, key_padding_mask=key_padding_mask, state=state)

    def attend(self, q, k, v, *, key_padding_mask, state):
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        # exp-based features in fp32 whatever the autocast dtype (spec §0.3.6).
        with torch.autocast(device_type=q.device.type, enabled=False):
            y = favor_attention(
                q.to(compute_dtype),
                k.to(compute_dtype),
                v.to(compute_dtype),
                self.projection.to(compute_dtype),
                causal=self.causal,
                valid=key_padding_mask,
                kernel=self.options.kernel,
                eps=self.options.eps,
                chunk_size=self.options.chunk_size,
            )
        return y.to(v.dtype), None


__all__ = [
    "PerformerAttention",
    "PerformerOptions",
    "draw_projection",
    "favor_attention",
    "favor_features",
    "mixed_seed",
]
