"""Transformer-MGK (Nguyen et al., ICML 2022): every key is a mixture of Gaussians.

Shape letters: B batch, n query length, m key length (= n), D model width, H heads,
d = D / H head width, M mixture components, L ``max_len`` (per-position priors), c query
chunk.

Key j of a head has M means ``k_{j,r} = W_K^{(r)} x_j``, isotropic variances sigma_r^2 and
priors pi_r; the attention is the posterior that query i came from key j
(attention_spec.md §6):

    A_ij = sum_r pi_r N(q_i; k_{j,r}, sigma_r^2) / sum_j' sum_r pi_r N(q_i; k_{j',r}, sigma_r^2)

computed in log space (``log pi_r - ||q_i - k_{j,r}||^2 / 2 sigma_r^2``, logsumexp over r,
masked softmax over j) and in fp32 at least, with ||q - k||^2 expanded as
||q||^2 - 2 q.k + ||k||^2 (not ``cdist`` squared). Causal and padding masks are -inf
logits, which is the reference's "mask, then renormalise".

Priors (option ``prior``):
* ``learned``: a parameter, clamped to [1e-6, 1] (the reference clamps to [0, 1]; the
  floor keeps the log finite);
* ``soft_em``: a buffer set in training to the mean responsibility of each component
  (the E-step), all-reduced over ``em_group`` when torch.distributed is initialised;
* ``hard_em``: no prior, the closest component wins (max over r of the log-score).

Priors are per head (position independent) by default, a flagged deviation from the
reference's per-key-position priors, which only work up to a fixed length; set
``prior_per_position=True`` (with ``max_len``) for the reference behaviour. With M = 1,
equal-norm keys and sigma^2 = sqrt(d) this is exactly softmax attention. The paper's claim
is that 4 MGK heads with M = 2 match 8 softmax heads: ``num_components`` is exposed.
Time O(n^2 M d). The soft mixture runs as one fused SDPA call over the M*m (key,
component) pairs (see ``mgk_attention``), so its memory is that of SDPA's backend; the
hard-EM variant and the E-step statistics use the explicit O(n^2 M) form (the E-step in
chunks of ``query_chunk`` queries, without gradients).
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from attention.base import Attention, AttentionOptions
from attention.registry import register
from parallel.collectives import COLLECTIVE_TIMEOUT
from parallel.tensor_parallel import group_size_and_rank

PRIOR_FLOOR = 1e-6


class MGKOptions(AttentionOptions):
    """MGK options; defaults follow the LRA code (M = 2, sigma_r^2 = sqrt(d), learned pi)."""

    num_components: int = Field(default=2, ge=1, le=16)
    prior: Literal["learned", "soft_em", "hard_em"] = "learned"
    prior_per_position: bool = False
    max_len: int = Field(default=256, ge=1)
    # sigma_r^2 = variance_multipliers[r] * sqrt(d); None = all 1 (LRA). The LM code uses
    # [1.0, 1/3] for M = 2.
    variance_multipliers: list[float] | None = None
    query_chunk: int = Field(default=1024, ge=1)  # queries per chunk of the E-step statistics
    bias: bool = True

    @model_validator(mode="after")
    def _check_variances(self) -> MGKOptions:
        multipliers = self.variance_multipliers
        if multipliers is not None:
            if len(multipliers) != self.num_components:
                raise ValueError(
                    f"variance_multipliers has {len(multipliers)} entries, but num_components "
                    f"is {self.num_components}; give one per component"
                )
            if any(not (value > 0.0 and math.isfinite(value)) for value in multipliers):
                raise ValueError(f"variance_multipliers must be finite and > 0, got {multipliers}")
        return self


def component_log_scores(
    q: torch.Tensor, keys: torch.Tensor, variances: torch.Tensor
) -> torch.Tensor:
    """-||q_i - k_{j,r}||^2 / (2 sigma_r^2): q [B, H, n, d], keys [M, B, H, m, d] -> [M, B, H, n, m]."""
    q_sq = (q * q).sum(-1, keepdim=True)  # [B, H, n, 1]
    k_sq = (keys * keys).sum(-1).unsqueeze(-2)  # [M, B, H, 1, m]
    cross = q.unsqueeze(0) @ keys.transpose(-1, -2)  # [M, B, H, n, m]
    distance = (q_sq - 2.0 * cross + k_sq).clamp_min(0.0)
    return distance * (-0.5 / variances.view(-1, 1, 1, 1, 1))


def mixture_logits(
    q: torch.Tensor,
    keys: torch.Tensor,
    variances: torch.Tensor,
    log_prior: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-component and mixed attention logits (the explicit O(n^2 M) form).

    q [B, H, n, d], keys [M, B, H, m, d], variances [M], log_prior broadcastable to
    [M, B, H, n, m] (None = hard E-step: max over components). Returns
    (component logits [M, B, H, n, m], mixed logits [B, H, n, m]).
    """
    scores = component_log_scores(q, keys, variances)
    if log_prior is None:
        return scores, scores.amax(dim=0)
    scores = scores + log_prior
    return scores, torch.logsumexp(scores, dim=0)


def mgk_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    v: torch.Tensor,
    *,
    variances: torch.Tensor,
    log_prior: torch.Tensor | None,
    allowed: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Mixture-of-Gaussian-keys attention.

    q [B, H, n, d], keys [M, B, H, m, d], v [B, H, m, d], variances [M], log_prior
    broadcastable to [M, 1, H, 1, m] (None = hard E-step), allowed bool broadcastable to
    [B, H, n, m] (True = may attend; every row needs one True). Returns [B, H, n, d].

    A soft mixture is one softmax over the M*m (key, component) pairs followed by a sum over
    components: A_ij = sum_r softmax_(j', r')(s)_(j, r), with s_ijr = log pi_r -
    ||q_i - k_jr||^2 / 2 sigma_r^2. So it runs as a fused SDPA call over M*m keys with the
    values repeated M times; the softmax subtracts the row max (log-space stable), and the
    logsumexp over r is folded into it. ||q - k||^2 is expanded into the dot product of
    augmented vectors q' = [q, 1, ||q||^2] and k' = [k / sigma^2, log pi - ||k||^2 / 2
    sigma^2, -1 / 2 sigma^2]; the ||q||^2 column is dropped when all sigma_r are equal (it
    is then constant along the softmax axis).
    """
    if log_prior is None:
        _, logits = mixture_logits(q, keys, variances, None)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if dropout > 0.0:
            probs = F.dropout(probs, p=dropout)
        return probs @ v
    num_components, batch, heads, m, _ = keys.shape
    inverse_variance = (1.0 / variances).view(-1, 1, 1, 1, 1)
    key_sq = (keys * keys).sum(-1, keepdim=True)
    bias = log_prior.transpose(-1, -2) - 0.5 * inverse_variance * key_sq  # [M, B, H, m, 1]
    key_parts = [keys * inverse_variance, bias]
    query_parts = [q, torch.ones_like(q[..., :1])]
    if bool((variances != variances[0]).any()):
        key_parts.append((-0.5 * inverse_variance).expand_as(bias))
        query_parts.append((q * q).sum(-1, keepdim=True))
    query_aug = torch.cat(query_parts, dim=-1)
    key_aug = torch.cat(key_parts, dim=-1)  # [M, B, H, m, d + 2]
    key_aug = key_aug.permute(1, 2, 0, 3, 4).reshape(batch, heads, num_components * m, -1)
    # Zero-padding V to the width of q' keeps SDPA on its fused CPU kernel (which wants one
    # head width for q, k and v); the padded output columns are dropped.
    extra = query_aug.shape[-1] - v.shape[-1]
    value_rep = F.pad(v, (0, extra)).repeat(1, 1, num_components, 1)  # [B, H, M m, d + extra]
    mask = None if allowed is None else allowed.repeat(1, 1, 1, num_components)
    out = F.scaled_dot_product_attention(
        query_aug, key_aug, value_rep, attn_mask=mask, dropout_p=dropout, scale=1.0
    )
    return out[..., : v.shape[-1]]


def responsibility_sums(
    q: torch.Tensor,
    keys: torch.Tensor,
    variances: torch.Tensor,
    log_prior: torch.Tensor,
    counted: torch.Tensor | None,
    per_position: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """E-step statistics: sums of responsibilities over counted (query, key) pairs.

    counted bool broadcastable to [B, 1, n, m], or None for every pair. Returns (sums
    [M, H] or [M, H, m], counts [] or [m]); the new prior is sums / counts.
    """
    scores, mixed = mixture_logits(q, keys, variances, log_prior)
    shape = (q.shape[0], 1, q.shape[-2], keys.shape[-2])  # [B, 1, n, m]
    if counted is None:
        weight = torch.ones(shape, dtype=scores.dtype, device=q.device)
    else:
        weight = counted.to(scores.dtype).expand(shape)
    responsibility = torch.exp(scores - mixed) * weight  # [M, B, H, n, m]
    if per_position:
        return responsibility.sum(dim=(1, 3)), weight.sum(dim=(0, 1, 2))
    return responsibility.sum(dim=(1, 3, 4)), weight.sum()


def inside_backward() -> bool:
    """True while autograd runs a backward pass (activation-checkpoint recompute)."""
    # Private but stable since torch 1.13; -1 outside any graph task.
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


@register
class MixtureGaussianKeysAttention(Attention):
    """Transformer-MGK attention (learned, soft-EM or hard-EM priors), causal and not.

    Defaults: M = 2 components, sigma_r^2 = sqrt(d), learned per-head priors 1/M.
    Soft-EM state: ``prior`` is used; the E-step result is kept in ``prior_pending`` and
    applied at the start of the next forward that is not an activation-checkpoint
    recompute, so a recompute sees the same priors as the forward it replays and the
    update happens once per step (the same sequence of priors as the reference, which uses
    the old prior and then overwrites it). Recomputes also skip the E-step itself.
    """

    name = "mgk"
    supports_causal = True
    supports_padding = True
    # Priors are per head and cut with the heads; variances are shared by all heads.
    supports_tensor_parallel = True
    Options = MGKOptions

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        opts = self.options
        num_components = opts.num_components
        self.num_components = num_components
        self.qkv = self.make_linear(
            d_model,
            (2 + num_components) * d_model,
            bias=opts.bias,
            split="column",
            parts=2 + num_components,
        )
        self.out = self.make_linear(d_model, d_model, bias=opts.bias, split="row")
        multipliers = opts.variance_multipliers or [1.0] * num_components
        variances = torch.tensor(multipliers, dtype=torch.float64) * math.sqrt(self.head_dim)
        self.register_buffer("variances", variances.float(), persistent=False)
        prior_shape = (num_components, num_heads)
        if opts.prior_per_position:
            prior_shape = prior_shape + (opts.max_len,)
        initial = torch.full(prior_shape, 1.0 / num_components)
        if opts.prior == "learned":
            self.prior = nn.Parameter(initial)
        elif opts.prior == "soft_em":
            self.register_buffer("prior", initial)
            self.register_buffer("prior_pending", initial.clone())
            self.register_buffer("pending_ready", torch.zeros((), dtype=torch.bool))
        else:
            self.prior = None
        # Process group of the soft-EM all-reduce: None = the default group. Under tensor
        # parallelism the model builder must set the data-parallel group (heads differ
        # across tensor-parallel ranks).
        self.em_group: Any = None

    def parallelize(self, group: Any, *, timeout: timedelta = COLLECTIVE_TIMEOUT) -> None:
        if group_size_and_rank(group)[0] > 1 and self.options.prior == "soft_em":
            if self.em_group is None:
                # The default group would sum the E-step statistics of different heads.
                raise ValueError(
                    "attention 'mgk' with prior='soft_em' under tensor parallelism needs "
                    "em_group set to the data-parallel group (the ranks holding the same "
                    "heads) before parallelize"
                )
        super().parallelize(group, timeout=timeout)

    def shard_heads(self) -> None:
        if self.prior is not None:
            self.shard_head_tensor("prior", dim=1)
        if self.options.prior == "soft_em":
            self.shard_head_tensor("prior_pending", dim=1)

    def extra_repr(self) -> str:
        opts = self.options
        return (
            f"M={self.num_components}, prior={opts.prior}, per_position={opts.prior_per_position}"
        )

    def _log_prior(self, m: int, dtype: torch.dtype) -> torch.Tensor | None:
        """log pi broadcastable to [M, B, H, n, m], or None for hard-EM."""
        if self.prior is None:
            return None
        prior = self.prior.to(dtype)
        if self.options.prior == "learned":
            prior = prior.clamp(PRIOR_FLOOR, 1.0)
        log_prior = torch.log(prior.clamp_min(PRIOR_FLOOR))
        if self.options.prior_per_position:
            return log_prior[:, :, :m].reshape(self.num_components, 1, -1, 1, m)
        return log_prior.reshape(self.num_components, 1, -1, 1, 1)

    @torch.no_grad()
    def _apply_pending_prior(self) -> None:
        if self.options.prior == "soft_em" and bool(self.pending_ready) and not inside_backward():
            self.prior.copy_(self.prior_pending)
            self.pending_ready.fill_(False)

    @torch.no_grad()
    def _e_step(self, q, keys, log_prior, counted) -> None:
        """Store mean responsibilities in ``prior_pending`` (all-reduced when distributed)."""
        per_position = self.options.prior_per_position
        m = keys.shape[-2]
        sums = torch.zeros(self.prior.shape[:2] + ((m,) if per_position else ()), dtype=q.dtype)
        sums = sums.to(q.device)
        counts = torch.zeros((m,) if per_position else (), dtype=q.dtype, device=q.device)
        chunk = self.options.query_chunk
        for start in range(0, q.shape[-2], chunk):
            part_sums, part_counts = responsibility_sums(
                q[:, :, start : start + chunk],
                keys,
                self.variances.to(q.dtype),
                log_prior,
                None if counted is None else counted[:, :, start : start + chunk],
                per_position,
            )
            sums += part_sums
            counts += part_counts
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, group=self.em_group)
            dist.all_reduce(counts, group=self.em_group)
        new_prior = self.prior.clone()
        if per_position:
            seen = counts > 0
            new_prior[:, :, :m] = torch.where(
                seen, sums / counts.clamp_min(1.0), self.prior[:, :, :m].to(sums.dtype)
            ).to(new_prior.dtype)
        elif counts > 0:
            new_prior.copy_(sums / counts)
        self.prior_pending.copy_(new_prior)
        self.pending_ready.fill_(True)

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        state: Any = None,
    ) -> tuple[torch.Tensor, None]:
        """x [B, n, D], key_padding_mask bool [B, n] -> (y [B, n, D], None)."""
        n = x.shape[1]
        opts = self.options
        if opts.prior_per_position and n > opts.max_len:
            raise ValueError(
                f"sequence length {n} exceeds mgk max_len {opts.max_len} of the per-position "
                "priors; raise max_len or set prior_per_position=False"
            )
        self._apply_pending_prior()
        return super().forward(x, key_padding_mask=key_padding_mask, state=state)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, n, D] -> q [B, H, n, d], keys [M, B, H, n, d] (one per component), v."""
        projected = self.qkv(x).chunk(2 + self.num_components, dim=-1)
        keys = torch.stack([self.split_heads(t) for t in projected[1:-1]])
        return self.split_heads(projected[0]), keys, self.split_heads(projected[-1])

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None,
        state: Any,
    ) -> tuple[torch.Tensor, None]:
        """q, v [B, H, n, d] and the component keys k [M, B, H, n, d] -> ([B, H, n, d], None)."""
        n, out_dtype, opts = q.shape[2], q.dtype, self.options
        # fp32 island (spec §0.3.6): exp-based scores never run in bf16.
        compute_dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            q, keys, v = (t.to(compute_dtype) for t in (q, k, v))
            allowed, counted = self._masks(key_padding_mask, n, q.device)
            log_prior = self._log_prior(n, compute_dtype)
            variances = self.variances.to(compute_dtype)
            dropout = opts.dropout if self.training else 0.0
            if self.training and opts.prior == "soft_em" and not inside_backward():
                self._e_step(q.detach(), keys.detach(), log_prior, counted)
            y = mgk_attention(
                q, keys, v, variances=variances, log_prior=log_prior, allowed=allowed,
                dropout=dropout,
            )  # fmt: skip
        return y.to(out_dtype), None

    def _masks(
        self, key_padding_mask: torch.Tensor | None, n: int, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(allowed, counted): bool [B or 1, 1, n, n] masks, or None for "every pair".

        ``allowed`` lets padded queries see themselves (outputs zeroed later) so no row is
        empty; ``counted`` marks the real (query, key) pairs the E-step averages over.
        """
        allowed = None
        if self.causal:
            allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]
        if key_padding_mask is None:
            return allowed, allowed
        valid_pairs = key_padding_mask[:, None, :, None] & key_padding_mask[:, None, None, :]
        keys_ok = key_padding_mask[:, None, None, :]
        if allowed is not None:
            keys_ok = keys_ok & allowed
            valid_pairs = valid_pairs & allowed
        eye = torch.eye(n, dtype=torch.bool, device=device)
        return keys_ok | (eye & ~key_padding_mask[:, None, :, None]), valid_pairs
