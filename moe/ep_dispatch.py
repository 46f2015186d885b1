"""Expert-parallel dispatch: the local dispatcher plus an all-to-all over the EP group.

Shape letters: T tokens, k choices, E experts, E_l = E / ep local experts, C capacity,
d width, ep EP group size, M rows this rank's experts receive.

Each EP rank holds experts [ep_rank * E_l, (ep_rank + 1) * E_l). Phases (Megatron-Core names):
*route* (the router on this rank's tokens; capacity per rank or over the EP group),
*plan* (index vectors, plus the split sizes every rank agrees on), *permute* (local, from
``LocalDispatcher``), *exchange* (``all_to_all_single``; the only communication),
experts, *exchange back* (the reverse all-to-all), *unpermute* (local). Three paths:

* per_rank capacity (default, as DeepSpeed and Megatron do): tokens are dropped *before* the
  exchange. With ``fixed_buffers`` (the layer's ``expert_layout="buffer"``) every rank sends
  fixed [E, C, d] capacity buffers: C comes from each rank's own token count; when ranks may
  hold different counts ``plan`` gathers every rank's C (one int), and with
  ``equal_tokens=True`` all C are equal by construction and nothing else is sent (static
  shapes). Without it (``expert_layout="grouped"``, the default) ``route`` first gathers each
  rank's kept counts per expert and only kept rows travel, so no expert computes padding.
* dropless (capacity factor 0 or None): ``route`` gathers every rank's kept counts per expert
  (the split sizes) first, then only real rows travel, in variable lengths.
* global capacity scope: ``route`` gathers every rank's choices, so capacity and priority are
  decided over all tokens of the EP group exactly as one process holding them would
  (``moe.router.group_slots``); the drops are then the same at ep = 1, 2, 4, ... Split sizes
  follow from the gathered routing; no further exchange is needed.

On the receiving rank rows arrive source-major (rank 0's rows for each local expert, then
rank 1's, ...) and are reordered expert-major for one grouped matmul, so expert e sees the
same rows in the same order as in ``SimulatedDispatcher``'s merged buffer.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from moe.dispatch import DispatchPlan, LocalDispatcher, make_plan
from moe.router import (
    Router,
    Routing,
    TopKRouter,
    is_dropless,
    route_member,
    top_k_choice,
)
from parallel.collectives import (
    COLLECTIVE_TIMEOUT,
    all_gather_rows,
    all_gather_tensor,
    all_to_all,
)

CAPACITY_SCOPES = ("per_rank", "global")


def check_capacity_scope(value: str) -> None:
    if value not in CAPACITY_SCOPES:
        raise ValueError(f"capacity_scope must be one of {CAPACITY_SCOPES}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ExpertParallelPlan(DispatchPlan):
    """A DispatchPlan plus what the exchange needs; identical split sizes on every rank.

    Attributes (beyond DispatchPlan):
        send_splits: rows sent to each EP rank (list of ep ints).
        recv_splits: rows received from each EP rank.
        local_order: [M] int64 source-major received row -> expert-major position.
        inverse_order: [M] int64 the inverse permutation.
        local_group_sizes: [E_l] int64 rows per local expert after the exchange.
        padded: rows are fixed [E, C] capacity buffers (per_rank scope with a capacity).
    """

    send_splits: list[int]
    recv_splits: list[int]
    local_order: torch.Tensor
    inverse_order: torch.Tensor
    local_group_sizes: torch.Tensor
    padded: bool


def source_to_expert_order(recv_counts: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Index that reorders rows received source-major ([ep, E_l] counts) to expert-major.

    ``total``: the number of rows, when the caller knows it on the host; then nothing here
    reads the device (the counts may live on the GPU)."""
    flat = recv_counts.reshape(-1)
    starts = (torch.cumsum(flat, 0) - flat).view_as(recv_counts)
    counts_em = recv_counts.t().reshape(-1)
    starts_em = starts.t().reshape(-1)
    if total is None:
        total = int(flat.sum())
    within = torch.arange(total, device=flat.device) - torch.repeat_interleave(
        torch.cumsum(counts_em, 0) - counts_em, counts_em, output_size=total
    )
    return torch.repeat_interleave(starts_em, counts_em, output_size=total) + within


class _Permutation(torch.autograd.Function):
    """rows[order]; the backward gathers with the inverse order (no zeros + index_add)."""

    @staticmethod
    def forward(ctx, rows, order, inverse):  # noqa: ANN001, ANN205
        ctx.save_for_backward(inverse)
        return rows.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(rows: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """rows [M, d] -> rows[order] for a permutation ``order`` whose inverse is ``inverse``."""
    return _Permutation.apply(rows, order, inverse)


class AllToAllDispatcher(LocalDispatcher):
    """LocalDispatcher + all-to-all over an EP process group (gloo on CPU, NCCL on GPU).

    Args:
        group: the EP process group (``ProcessGroups.ep_group``); its size is ep.
        num_experts: E over the whole group (ep must divide it).
        capacity_scope: "per_rank" or "global" (see the module docstring).
        fixed_buffers: per_rank scope with a capacity sends fixed [E, C, d] buffers (padding
            included) instead of kept rows with exchanged counts.
        equal_tokens: every rank routes the same number of tokens (fixed batch shapes): the
            fixed-buffer path then needs no gather of capacities.
        timeout: for every collective; a failure names the group and its ranks.
    """

    def __init__(
        self,
        group: Any,
        num_experts: int,
        *,
        capacity_scope: str = "per_rank",
        fixed_buffers: bool = False,
        equal_tokens: bool = False,
        timeout: timedelta = COLLECTIVE_TIMEOUT,
    ) -> None:
        check_capacity_scope(capacity_scope)
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep_size != 0:
            raise ValueError(
                f"num_experts ({num_experts}) must be divisible by the EP group size ({self.ep_size})"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.capacity_scope = capacity_scope
        self.fixed_buffers = fixed_buffers
        self.equal_tokens = equal_tokens
        self.timeout = timeout

    @property
    def expert_offset(self) -> int:
        """Global id of this rank's first expert."""
        return self.ep_rank * self.num_local_experts

    def route(self, router: Router, tokens: torch.Tensor) -> Routing:
        """Routing of this rank's tokens; global scope and dropless gather what all ranks need."""
        dropless = is_dropless(router.active_capacity_factor())
        if self.capacity_scope == "global":
            if not isinstance(router, TopKRouter):
                raise ValueError("capacity_scope 'global' needs router='token_choice'")
            logits = router.logits(tokens)
            expert_index, key = top_k_choice(logits, router.top_k)
            group_index, sizes = all_gather_rows(expert_index, self.group, self.timeout)
            group_key = (
                all_gather_rows(key, self.group, self.timeout)[0]
                if router.priority == "probability"
                else torch.zeros(group_index.shape[0], device=key.device)
            )
            slot, capacity = router.group_slots(group_index, group_key)
            return route_member(
                logits, group_index, slot, capacity, sizes, self.ep_rank, top_k=router.top_k
            )
        routing = router(tokens)
        if dropless or not self.fixed_buffers:
            # The split sizes go first: the receiver sizes its buffer from them (dropless).
            counts = all_gather_tensor(routing.tokens_per_expert, self.group, self.timeout)
            routing = dataclasses.replace(routing, group_tokens_per_expert=counts)
        return routing

    def plan(self, routing: Routing) -> ExpertParallelPlan:
        """Index vectors plus split sizes; gathers capacities only for per_rank with uneven T.

        Host syncs on a GPU: the split sizes of the kept-rows exchange (dropless, grouped,
        global scope) are read once, as ``all_to_all_single`` takes Python lists, and they
        also give this rank's kept count N; the fixed-buffer path reads the gathered
        capacities (not with ``equal_tokens``) and N (``make_plan``). The reorder indices
        and group sizes are built on the device from device counts (no host-to-device copy).
        """
        ep, local = self.ep_size, self.num_local_experts
        mine = slice(self.expert_offset, self.expert_offset + local)
        device = routing.slot.device
        num_kept = None
        if routing.group_tokens_per_expert is not None:
            counts = routing.group_tokens_per_expert.to(torch.long)
            host = counts.cpu()  # the one sync: the exchange's split sizes
            send_host = host[self.ep_rank].view(ep, local)
            recv_host = host[:, mine]
            recv_counts = counts[:, mine]
            num_kept = int(send_host.sum())
            padded = False
        else:
            if self.equal_tokens:
                capacities = [routing.capacity] * ep
                recv_counts = torch.full((ep, local), routing.capacity, device=device)
            else:
                # Created on the routing's device: NCCL gathers device tensors only.
                capacity = torch.tensor([routing.capacity], dtype=torch.long, device=device)
                gathered = all_gather_tensor(capacity, self.group, self.timeout).view(-1)
                capacities = gathered.tolist()  # receive sizes differ per rank: on the host
                recv_counts = gathered[:, None].expand(ep, local)
            send_host = torch.full((ep, local), routing.capacity, dtype=torch.long)
            recv_host = torch.tensor(capacities, dtype=torch.long)[:, None].expand(ep, local)
            padded = True
        base = make_plan(routing, num_kept=num_kept)
        total = int(recv_host.sum())
        local_order = source_to_expert_order(recv_counts.to(torch.long), total)
        inverse_order = torch.empty_like(local_order)
        inverse_order.index_copy_(0, local_order, torch.arange(total, device=device))
        return ExpertParallelPlan(
            **{f.name: getattr(base, f.name) for f in dataclasses.fields(DispatchPlan)},
            send_splits=send_host.sum(1).tolist(),
            recv_splits=recv_host.sum(1).tolist(),
            local_order=local_order,
            inverse_order=inverse_order,
            local_group_sizes=recv_counts.sum(0).to(torch.long),
            padded=padded,
        )

    def permute(self, x: torch.Tensor, plan: ExpertParallelPlan) -> torch.Tensor:
        """x [T, d] -> rows to send: the flat [E * C, d] buffer (padded) or kept rows [N, d]."""
        rows = super().permute(x, plan)
        if not plan.padded:
            return rows
        buffer = x.new_zeros(plan.num_experts * plan.capacity, x.shape[-1])
        return buffer.index_copy(0, plan.buffer_index, rows)

    def unpermute(self, y: torch.Tensor, plan: ExpertParallelPlan) -> torch.Tensor:
        """Rows back from the experts (layout of ``permute``) -> [T, d], gate-weighted."""
        if plan.padded:  # read the kept slots only; padding rows are never used
            y = y.index_select(0, plan.buffer_index)
        return super().unpermute(y, plan)

    def permute_to_buffer(self, x: torch.Tensor, plan: ExpertParallelPlan) -> torch.Tensor:
        """x [T, d] -> [E, C, d] fixed capacity buffer (per_rank scope with a capacity)."""
        self._check_buffer(plan)
        return self.permute(x, plan).view(plan.num_experts, plan.capacity, x.shape[-1])

    def unpermute_from_buffer(self, buffer: torch.Tensor, plan: ExpertParallelPlan) -> torch.Tensor:
        """[E, C, d] -> [T, d], gate-weighted (unused slots are never read)."""
        return self.unpermute(buffer.reshape(-1, buffer.shape[-1]), plan)

    def exchange(self, rows: torch.Tensor, plan: ExpertParallelPlan) -> torch.Tensor:
        """Rows sorted by global expert -> this rank's experts' rows [M, d], expert-major."""
        received = all_to_all(rows, plan.send_splits, plan.recv_splits, self.group, self.timeout)
        return permute_rows(received, plan.local_order, plan.inverse_order)

    def exchange_back(self, rows: torch.Tensor, plan: ExpertParallelPlan) -> torch.Tensor:
        """Expert outputs [M, d] (expert-major) -> this rank's rows, in ``permute``'s order."""
        source_major = permute_rows(rows, plan.inverse_order, plan.local_order)
        return all_to_all(
            source_major, plan.recv_splits, plan.send_splits, self.group, self.timeout
        )

    def expert_group_sizes(self, plan: ExpertParallelPlan) -> torch.Tensor:
        return plan.local_group_sizes

    def _check_buffer(self, plan: ExpertParallelPlan) -> None:
        if not plan.padded:
            raise ValueError(
                "expert_layout 'buffer' under expert parallelism needs capacity_scope 'per_rank' "
                "and a capacity factor > 0; use expert_layout 'grouped'"
            )

    def exchange_buffer(self, buffer: torch.Tensor, plan: ExpertParallelPlan) -> torch.Tensor:
        """[E, C, d] -> [E_l, sum over ranks of C, d] (each local expert's slots, rank-major)."""
        self._check_buffer(plan)
        rows = self.exchange(buffer.reshape(-1, buffer.shape[-1]), plan)
        return rows.view(self.num_local_experts, -1, buffer.shape[-1])

    def exchange_buffer_back(self, buffer: torch.Tensor, plan: ExpertParallelPlan) -> torch.Tensor:
        """Inverse of ``exchange_buffer``: [E_l, M_e, d] -> [E, C, d]."""
        rows = self.exchange_back(buffer.reshape(-1, buffer.shape[-1]), plan)
        return rows.view(plan.num_experts, plan.capacity, buffer.shape[-1])
