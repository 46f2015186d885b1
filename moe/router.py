"""Routing: gating (fp32 logits from a router module) and selection (pure functions).

Shape letters: T tokens, E experts, k choices per token, C capacity (slots per expert).

``route`` is token choice (Switch top-1, GShard top-k); ``expert_choice_route`` lets each
expert take its top-C tokens (Zhou et al. 2022). Both return a frozen ``Routing`` so that
dispatch and combine never keep state on a module between calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe.losses import experts_first, load_balancing_loss, router_z_loss
from parallel.collectives import COLLECTIVE_TIMEOUT
from parallel.tensor_parallel import copy_to_region

PRIORITIES = ("sequence", "probability")


@dataclass(frozen=True)
class Routing:
    """Where each token goes.

    Attributes:
        expert_index: [T, k] int64 chosen expert per token and choice.
        gate: [T, k] fp32 combine weight (renormalised over the k choices for k > 1; 0 where
            dropped).
        slot: [T, k] int64 row of the token in its expert's buffer, -1 where dropped.
        tokens_per_expert: [E] int64 kept assignments per expert (after dropping).
        capacity: slots per expert (for dropless, the largest expert count).
        aux_loss: 0-dim fp32 load-balancing loss.
        z_loss: 0-dim fp32 router z-loss.
        drop_rate: 0-dim fp32 fraction of assignments dropped (expert choice: of tokens
            that no expert took).
        probs: [T, E] fp32 router probabilities.
        group_tokens_per_expert: [G, E] int64 kept assignments of every member of the capacity
            group (G ranks or virtual ranks, in rank order) when routing was decided over a
            group; None for a single process's own routing. Expert-parallel dispatch derives
            its split sizes from it without another exchange.
    """

    expert_index: torch.Tensor
    gate: torch.Tensor
    slot: torch.Tensor
    tokens_per_expert: torch.Tensor
    capacity: int
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    drop_rate: torch.Tensor
    probs: torch.Tensor
    group_tokens_per_expert: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def dropped_fraction(self) -> float:
        """Fraction of assignments dropped, as a Python float (synchronises on GPU)."""
        return float(self.drop_rate)


def is_dropless(capacity_factor: float | None) -> bool:
    return capacity_factor is None or capacity_factor == 0


def check_capacity_factor(name: str, value: float | None) -> None:
    if value is not None and (not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be >= 0 (0 or None = dropless), got {value}")


def compute_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int
) -> int:
    """ceil(capacity_factor * T * k / E), at least ``min_capacity``."""
    return max(math.ceil(capacity_factor * num_tokens * top_k / num_experts), min_capacity)


def priority_order(
    expert_index: torch.Tensor, priority_key: torch.Tensor, priority: str
) -> torch.Tensor:
    """Order in which the T*k assignments claim slots, as flat indices j*T + t.

    Every first choice comes before any second choice (GShard). Within a choice rank,
    ``sequence`` keeps token order; ``probability`` orders tokens by ``priority_key`` [T]
    (their highest router probability), descending (V-MoE batch-prioritized routing), the
    same order for each rank.
    """
    num_tokens, top_k = expert_index.shape
    device = expert_index.device
    if priority == "sequence":
        return torch.arange(num_tokens * top_k, device=device)
    token_order = torch.argsort(priority_key, descending=True, stable=True)
    offsets = torch.arange(top_k, device=device)[:, None] * num_tokens
    return (token_order[None, :] + offsets).reshape(-1)


def rank_within_expert(
    expert_index: torch.Tensor, order: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of each assignment among those of its expert, in priority ``order``.

    Uses one stable sort (O(Tk log Tk)), never a [T, E] or [T, E, C] one-hot.
    Returns rank [T, k] int64 and counts [E] int64 (assignments per expert before dropping).
    """
    num_tokens, top_k = expert_index.shape
    flat_expert = expert_index.t().reshape(-1)  # index j*T + t
    ordered_expert = flat_expert[order]
    sorted_expert, sort_idx = torch.sort(ordered_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = (
        torch.arange(flat_expert.numel(), device=flat_expert.device) - starts[sorted_expert]
    )
    rank_ordered = torch.empty_like(rank_sorted)
    rank_ordered[sort_idx] = rank_sorted
    rank_flat = torch.empty_like(rank_sorted)
    rank_flat[order] = rank_ordered
    return rank_flat.view(top_k, num_tokens).t(), counts


def expert_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over experts of fp32 logits [T, E] -> [T, E] (contiguous); few experts on CPU
    go through the transposed copy (``moe.losses.experts_first``)."""
    if experts_first(logits):
        return torch.softmax(logits.t().contiguous(), dim=0).t().contiguous()
    return torch.softmax(logits, dim=-1)


def choose_experts(
    logits: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities [T, E], top-k probabilities [T, k], their experts [T, k] and the gates.

    Gates are the top-k probabilities renormalised over the k choices when k > 1. For k = 1
    ``max`` replaces ``topk`` (3x faster on CPU; on a tie it takes the lowest expert id,
    where topk's pick is unspecified).
    """
    probs = expert_softmax(logits)
    if top_k == 1:
        top_probs, expert_index = probs.max(dim=-1, keepdim=True)
        return probs, top_probs, expert_index, top_probs
    top_probs, expert_index = torch.topk(probs, top_k, dim=-1)
    return probs, top_probs, expert_index, top_probs / top_probs.sum(dim=-1, keepdim=True)


def route(
    logits: torch.Tensor,
    *,
    top_k: int,
    capacity_factor: float | None,
    min_capacity: int = 4,
    priority: str = "sequence",
) -> Routing:
    """Token-choice top-k routing under a capacity limit.

    Args:
        logits: [T, E] router logits; cast to fp32 here.
        top_k: choices per token (1 = Switch).
        capacity_factor: slots per expert = ceil(cf * T * k / E) (at least min_capacity);
            None or 0 = dropless (capacity = the largest expert count).
        min_capacity: lower bound on the capacity.
        priority: "sequence" or "probability" (see ``priority_order``).
    Returns:
        Routing with [T, k] fields.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {tuple(logits.shape)}")
    num_tokens, num_experts = logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k ({top_k}) must be between 1 and num_experts ({num_experts})")
    check_capacity_factor("capacity_factor", capacity_factor)
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
    if min_capacity < 0:
        raise ValueError(f"min_capacity must be >= 0, got {min_capacity}")

    logits = logits.float()
    probs, top_probs, expert_index, gate = choose_experts(logits, top_k)

    slot, capacity, counts = assign_slots(
        expert_index,
        top_probs[:, 0],
        num_experts=num_experts,
        capacity_factor=capacity_factor,
        min_capacity=min_capacity,
        priority=priority,
    )
    kept = slot >= 0
    dropped = (counts - capacity).clamp_min(0).sum()
    return Routing(
        expert_index=expert_index,
        gate=gate * kept,
        slot=slot,
        tokens_per_expert=counts.clamp_max(capacity),
        capacity=capacity,
        aux_loss=load_balancing_loss(probs, expert_index[:, 0]),
        z_loss=router_z_loss(logits),
        drop_rate=dropped.float() / max(num_tokens * top_k, 1),
        probs=probs,
    )


def group_slots(
    group_expert_index: torch.Tensor,
    group_priority_key: torch.Tensor,
    *,
    num_experts: int,
    capacity_factor: float | None,
    min_capacity: int,
    priority: str,
) -> tuple[torch.Tensor, int]:
    """Slots decided over a whole capacity group (capacity scope ``global``).

    Args:
        group_expert_index: [Tg, k] int64 choices of every token of the group, members in rank
            order (the concatenation a single process would see).
        group_priority_key: [Tg] fp32 each token's highest router probability (read only for
            ``priority="probability"``).
    Returns:
        slot [Tg, k] int64 (-1 dropped) and the capacity ceil(cf * Tg * k / E): exactly what
        ``route`` gives one process holding all Tg tokens, whatever the number of members.
    """
    slot, capacity, _ = assign_slots(
        group_expert_index,
        group_priority_key,
        num_experts=num_experts,
        capacity_factor=capacity_factor,
        min_capacity=min_capacity,
        priority=priority,
    )
    return slot, capacity


def assign_slots(
    expert_index: torch.Tensor,
    priority_key: torch.Tensor,
    *,
    num_experts: int,
    capacity_factor: float | None,
    min_capacity: int,
    priority: str,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Slots [T, k] (-1 dropped), the capacity, and assignments per expert [E] before dropping.

    The one place that turns choices into slots: ``route`` (one process) and ``group_slots``
    (a capacity group of ranks) both call it.
    """
    num_tokens, top_k = expert_index.shape
    order = priority_order(expert_index, priority_key, priority)
    rank, counts = rank_within_expert(expert_index, order, num_experts)
    if is_dropless(capacity_factor):
        # A host read (a device sync on GPUs): the dropless capacity is the largest expert's
        # count, which sizes the buffers after it; inherent to dropless routing.
        capacity = int(counts.max()) if num_tokens > 0 else 0
    else:
        capacity = compute_capacity(num_tokens, num_experts, top_k, capacity_factor, min_capacity)
    return torch.where(rank < capacity, rank, torch.full_like(rank, -1)), capacity, counts


def member_kept_counts(
    group_expert_index: torch.Tensor,
    group_slot: torch.Tensor,
    member_sizes: list[int],
    num_experts: int,
) -> torch.Tensor:
    """[G, E] int64 kept assignments per member and expert, from group-wide slots [Tg, k]."""
    device = group_expert_index.device
    member = torch.repeat_interleave(
        torch.arange(len(member_sizes), device=device),
        torch.tensor(member_sizes, device=device),
    )
    kept = group_slot >= 0
    key = (member[:, None] * num_experts + group_expert_index)[kept]
    return torch.bincount(key, minlength=len(member_sizes) * num_experts).view(-1, num_experts)


def route_member(
    logits: torch.Tensor,
    group_expert_index: torch.Tensor,
    group_slot: torch.Tensor,
    capacity: int,
    member_sizes: list[int],
    member: int,
    *,
    top_k: int,
) -> Routing:
    """One member's Routing when slots were decided over the group (``group_slots``).

    ``logits`` [T, E] are this member's own (T = member_sizes[member]); its slots are rows
    sum(member_sizes[:member]) onwards of ``group_slot``. The aux and z losses are this
    member's own (over its T tokens), as each rank of a real run computes them; a run
    averages them over its ranks like any other loss.
    """
    logits = logits.float()
    num_tokens, num_experts = logits.shape
    if num_tokens != member_sizes[member]:
        raise ValueError(
            f"logits have {num_tokens} tokens but member_sizes[{member}] is {member_sizes[member]}"
        )
    probs, _, expert_index, gate = choose_experts(logits, top_k)
    start = sum(member_sizes[:member])
    slot = group_slot[start : start + num_tokens]
    if not torch.equal(expert_index, group_expert_index[start : start + num_tokens]):
        raise ValueError(f"member {member}'s choices differ from its rows of group_expert_index")
    kept = slot >= 0
    group_counts = member_kept_counts(group_expert_index, group_slot, member_sizes, num_experts)
    dropped = (~kept).sum()
    return Routing(
        expert_index=expert_index,
        gate=gate * kept,
        slot=slot,
        tokens_per_expert=group_counts[member],
        capacity=capacity,
        aux_loss=load_balancing_loss(probs, expert_index[:, 0]),
        z_loss=router_z_loss(logits),
        drop_rate=dropped.float() / max(num_tokens * top_k, 1),
        probs=probs,
        group_tokens_per_expert=group_counts,
    )


def top_k_choice(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-k experts [T, k] int64 and its highest probability [T] fp32."""
    _, top_probs, expert_index, _ = choose_experts(logits.float(), top_k)
    return expert_index, top_probs[:, 0]


def expert_choice_route(
    logits: torch.Tensor, *, capacity_factor: float, min_capacity: int = 4
) -> Routing:
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by probability.

    C = ceil(cf * T / E) (at least min_capacity, at most T). A token may be taken by any
    number of experts, so the Routing has k = E columns: column e is expert e, gate is the
    softmax probability where taken and 0 elsewhere. Balanced by construction, so aux_loss is
    0; z_loss is computed as usual.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {tuple(logits.shape)}")
    if is_dropless(capacity_factor) or capacity_factor < 0:
        raise ValueError(
            f"capacity_factor must be > 0 for router='expert_choice', got {capacity_factor}"
        )
    logits = logits.float()
    num_tokens, num_experts = logits.shape
    probs = expert_softmax(logits)
    capacity = min(
        compute_capacity(num_tokens, num_experts, 1, capacity_factor, min_capacity), num_tokens
    )
    _, chosen = torch.topk(probs.t(), capacity, dim=-1)  # [E, C] token ids, best first
    experts = torch.arange(num_experts, device=logits.device)
    slot = torch.full((num_tokens, num_experts), -1, dtype=torch.long, device=logits.device)
    slot[chosen, experts[:, None]] = torch.arange(capacity, device=logits.device)
    taken = slot >= 0
    untaken = (~taken.any(dim=-1)).float().mean() if num_tokens else probs.sum() * 0.0
    return Routing(
        expert_index=experts.expand(num_tokens, num_experts),
        gate=probs * taken,
        slot=slot,
        tokens_per_expert=torch.full(
            (num_experts,), capacity, dtype=torch.long, device=logits.device
        ),
        capacity=capacity,
        aux_loss=probs.sum() * 0.0,
        z_loss=router_z_loss(logits),
        drop_rate=untaken,
        probs=probs,
    )


class Router(nn.Module):
    """Gating: an fp32 weight [E, d] and fp32 logits, whatever the model's dtype.

    The weight stays fp32 when the module is cast (``.to(bf16)``) unless ``keep_fp32`` is
    False (DeepSpeed's classic bf16 mode needs every parameter in bf16); the input is cast to
    fp32 and autocast is off for the logits (Switch Transformer's selective precision).

    Under tensor parallelism (``tensor_parallel_group``, set by
    ``moe.tensor_parallel.apply_tensor_parallel``) the weight stays replicated but each TP
    rank routes different token rows, so the weight enters the logits through
    ``copy_to_region``: its gradient is summed over the TP group in the backward.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = 2.0,
        min_capacity: int = 4,
        jitter_eps: float = 0.0,
    ) -> None:
        super().__init__()
        check_capacity_factor("capacity_factor", capacity_factor)
        check_capacity_factor("eval_capacity_factor", eval_capacity_factor)
        if not 0.0 <= jitter_eps < 1.0:
            raise ValueError(f"jitter_eps must be in [0, 1), got {jitter_eps}")
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.jitter_eps = jitter_eps
        self.keep_fp32 = True
        self.tensor_parallel_group: object | None = None
        self.tensor_parallel_timeout = COLLECTIVE_TIMEOUT
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, dtype=torch.float32))
        # Switch Transformer init: truncated normal, std sqrt(0.1 / fan_in).
        nn.init.trunc_normal_(self.weight, std=math.sqrt(0.1 / d_model))

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch's signature
        super()._apply(fn, recurse)
        if self.keep_fp32 and self.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.float()
        return self

    def active_capacity_factor(self) -> float | None:
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] (any dtype) -> logits [T, E] fp32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.training and self.jitter_eps > 0:
                noise = torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
                x = x * noise
            weight = self.weight.float()
            if self.tensor_parallel_group is not None:
                weight = copy_to_region(
                    weight, self.tensor_parallel_group, self.tensor_parallel_timeout
                )
            return F.linear(x, weight)


class TopKRouter(Router):
    """Token choice: each token picks its top-k experts (Switch: k = 1)."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        top_k: int = 1,
        priority: str = "sequence",
        **kwargs,
    ) -> None:
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k ({top_k}) must be between 1 and num_experts ({num_experts})")
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
        super().__init__(d_model, num_experts, **kwargs)
        self.top_k = top_k
        self.priority = priority

    def forward(self, x: torch.Tensor) -> Routing:
        return self.select(self.logits(x))

    def select(self, logits: torch.Tensor) -> Routing:
        """Routing of fp32 logits [T, E] under this router's settings (no gating)."""
        return route(
            logits,
            top_k=self.top_k,
            capacity_factor=self.active_capacity_factor(),
            min_capacity=self.min_capacity,
            priority=self.priority,
        )

    def group_slots(
        self, group_expert_index: torch.Tensor, group_priority_key: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """``group_slots`` over a capacity group's choices under this router's settings."""
        return group_slots(
            group_expert_index,
            group_priority_key,
            num_experts=self.num_experts,
            capacity_factor=self.active_capacity_factor(),
            min_capacity=self.min_capacity,
            priority=self.priority,
        )


class ExpertChoiceRouter(Router):
    """Expert choice: each expert picks its top-C tokens (Zhou et al. 2022)."""

    def __init__(self, d_model: int, num_experts: int, **kwargs) -> None:
        super().__init__(d_model, num_experts, **kwargs)
        for name in ("capacity_factor", "eval_capacity_factor"):
            if is_dropless(getattr(self, name)):
                raise ValueError(
                    f"{name} must be > 0 for router='expert_choice' (no dropless mode)"
                )

    def forward(self, x: torch.Tensor) -> Routing:
        return self.select(self.logits(x))

    def select(self, logits: torch.Tensor) -> Routing:
        """Routing of fp32 logits [T, E] under this router's settings (no gating)."""
        return expert_choice_route(
            logits,
            capacity_factor=self.active_capacity_factor(),
            min_capacity=self.min_capacity,
        )
