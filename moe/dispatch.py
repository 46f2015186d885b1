"""Token dispatch: permute tokens to their experts and back, by index.

Shape letters: T tokens, k choices, E experts, C capacity, N kept assignments, d width.

Phases are named as in Megatron-Core: *permute* (local gather into expert order),
*exchange* (communication; none here, the expert-parallel dispatcher subclasses this one
and adds only that), *unpermute* (local scatter-add back to token order, scaled by the
gate). Nothing builds a one-hot [T, E, C] tensor: plans are index vectors of length N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.router import Router, Routing


@dataclass(frozen=True)
class DispatchPlan:
    """Index vectors that move kept assignments between token order and expert order.

    Attributes:
        token_index: [N] int64 source token of each kept assignment, sorted by (expert, slot).
        buffer_index: [N] int64 row in a flattened [E * C] capacity buffer (expert * C + slot).
        gate: [N] fp32 combine weight of each kept assignment (carries the router gradient).
        tokens_per_expert: [E] int64 kept assignments per expert (group sizes of the
            grouped layout).
        num_tokens: T.
        capacity: C.
    """

    token_index: torch.Tensor
    buffer_index: torch.Tensor
    gate: torch.Tensor
    tokens_per_expert: torch.Tensor
    num_tokens: int
    capacity: int

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert.numel()


def make_plan(routing: Routing) -> DispatchPlan:
    """Turn a Routing into sorted index vectors (one argsort over the kept assignments)."""
    num_tokens, top_k = routing.slot.shape
    slot = routing.slot.reshape(-1)
    kept = slot >= 0
    token = torch.arange(num_tokens, device=slot.device).repeat_interleave(top_k)[kept]
    buffer_index = routing.expert_index.reshape(-1)[kept] * routing.capacity + slot[kept]
    order = torch.argsort(buffer_index)
    return DispatchPlan(
        token_index=token[order],
        buffer_index=buffer_index[order],
        gate=routing.gate.reshape(-1)[kept][order],
        tokens_per_expert=routing.tokens_per_expert,
        num_tokens=num_tokens,
        capacity=routing.capacity,
    )


class LocalDispatcher:
    """Single-process dispatch: every expert lives here.

    Two layouts of the same permutation:
    * grouped: [N, d], rows of expert 0 then expert 1 ..., no padding (local compute);
    * buffer: [E, C, d], each expert's rows at its slots, unused slots zero (the fixed-size
      layout an all-to-all exchanges).
    """

    def route(self, router: Router, tokens: torch.Tensor) -> Routing:
        """Gating and selection over this process's tokens [T, d] (the simulated and
        expert-parallel dispatchers decide capacity over virtual ranks or the EP group)."""
        return router(tokens)

    def plan(self, routing: Routing) -> DispatchPlan:
        return make_plan(routing)

    def exchange(self, rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Send permuted rows to the ranks of their experts; nothing to send locally."""
        return rows

    def exchange_back(self, rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Return expert outputs to the ranks of their tokens; nothing to send locally."""
        return rows

    def exchange_buffer(self, buffer: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Buffer [E, C, d] -> this rank's experts' buffer; the identity locally."""
        return buffer

    def exchange_buffer_back(self, buffer: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Inverse of ``exchange_buffer``; the identity locally."""
        return buffer

    def expert_group_sizes(self, plan: DispatchPlan) -> torch.Tensor:
        """[E_local] int64 rows each local expert receives after ``exchange``."""
        return plan.tokens_per_expert

    def permute(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """x [T, d] -> grouped [N, d]."""
        return x.index_select(0, plan.token_index)

    def unpermute(self, y: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """grouped expert outputs [N, d] -> [T, d], each scaled by its gate and summed per token.

        Dropped assignments contribute zero (the residual connection carries the token).
        """
        weighted = y * plan.gate.to(y.dtype).unsqueeze(-1)
        out = y.new_zeros(plan.num_tokens, y.shape[-1])
        return out.index_add(0, plan.token_index, weighted)

    def permute_to_buffer(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """x [T, d] -> buffer [E, C, d] (zeros where a slot is unused)."""
        rows = x.index_select(0, plan.token_index)
        buffer = x.new_zeros(plan.num_experts * plan.capacity, x.shape[-1])
        buffer = buffer.index_copy(0, plan.buffer_index, rows)
        return buffer.view(plan.num_experts, plan.capacity, x.shape[-1])

    def unpermute_from_buffer(self, buffer: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """buffer [E, C, d] -> [T, d], scaled by the gate (unused slots are never read)."""
        rows = buffer.reshape(-1, buffer.shape[-1]).index_select(0, plan.buffer_index)
        return self.unpermute(rows, plan)
