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
        buffer_index: [N] int64 row in the flattened [E * R] buffer (expert * R + slot).
        gate: [N] fp32 combine weight of each kept assignment (carries the router gradient).
        tokens_per_expert: [E] int64 kept assignments per expert (group sizes of the
            grouped layout).
        inverse: [T, k] int64 row of each (token, choice) in the grouped layout (0 where
            dropped: those rows are zeroed after the gather).
        dropped: [D] int64 flat positions t * k + j of the dropped (token, choice) pairs.
        num_tokens: T.
        capacity: C.
        buffer_rows: R, rows per expert in the buffer layout: C, or with ``trim_buffer`` the
            fullest expert's kept count when that is smaller.
    """

    token_index: torch.Tensor
    buffer_index: torch.Tensor
    gate: torch.Tensor
    tokens_per_expert: torch.Tensor
    inverse: torch.Tensor
    dropped: torch.Tensor
    num_tokens: int
    capacity: int
    buffer_rows: int

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert.numel()


def make_plan(
    routing: Routing, *, trim_buffer: bool = False, num_kept: int | None = None
) -> DispatchPlan:
    """Turn a Routing into sorted index vectors (one argsort over every (token, choice) pair).

    ``trim_buffer``: cut the buffer layout to the fullest expert's kept count R when it is
    below the capacity (kept slots are 0..count-1, so only the stride changes): the experts'
    batched matmul then skips rows that would only hold padding. It reads that count on the
    host, so only CPU callers ask for it; the expert-parallel exchange needs C.

    ``num_kept``: N when the caller already holds it on the host (the expert-parallel plan
    reads its split sizes there). Otherwise N is read from the device: the one host sync of
    a plan, since the grouped layout's row count depends on the routing. Everything else is
    sized by T * k or computed on the device (no boolean-mask indexing, no ``nonzero``).
    """
    num_tokens, top_k = routing.slot.shape
    total = num_tokens * top_k
    slot = routing.slot.reshape(-1)
    kept = slot >= 0
    rows = routing.capacity
    if trim_buffer and routing.tokens_per_expert.numel():
        fullest = int(routing.tokens_per_expert.max())
        rows = fullest if 0 < fullest < rows else rows
    device = slot.device
    position = torch.arange(total, device=device)
    # Kept pairs sort by buffer row (expert, slot); dropped ones after all of them, in flat
    # order. Keys are unique, so the split at N gives both index vectors from one argsort.
    past_end = routing.tokens_per_expert.numel() * rows
    key = torch.where(kept, routing.expert_index.reshape(-1) * rows + slot, past_end + position)
    order_all = torch.argsort(key)
    if num_kept is None:
        num_kept = int(kept.sum())
    order = order_all[:num_kept]
    inverse = torch.zeros(total, dtype=torch.long, device=device)
    inverse.index_copy_(0, order, position[:num_kept])
    return DispatchPlan(
        token_index=torch.div(order, top_k, rounding_mode="floor"),
        buffer_index=key.index_select(0, order),
        gate=routing.gate.reshape(-1).index_select(0, order),
        tokens_per_expert=routing.tokens_per_expert,
        inverse=inverse.view(num_tokens, top_k),
        dropped=order_all[num_kept:],
        num_tokens=num_tokens,
        capacity=routing.capacity,
        buffer_rows=rows,
    )


def _gather_sum(
    rows: torch.Tensor,
    inverse: torch.Tensor,
    dropped: torch.Tensor,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[t] = sum_j gate[i] * rows[i], i = inverse[t, j], over the kept pairs (flat positions
    not in ``dropped``); without ``gate`` the weights are 1.

    One gather, then the gate multiply in place while the rows are fresh, and the few dropped
    rows zeroed (no copy of ``rows`` with a zero row appended).
    """
    num_tokens, top_k = inverse.shape
    if rows.shape[0] == 0:  # everything was dropped
        return rows.new_zeros(num_tokens, rows.shape[-1])
    flat = inverse.reshape(-1)
    gathered = rows.index_select(0, flat)
    if gate is not None:
        gathered.mul_(gate.index_select(0, flat).unsqueeze(-1))
    if dropped.numel():
        gathered.index_fill_(0, dropped, 0)
    if top_k == 1:
        return gathered
    return gathered.view(num_tokens, top_k, -1).sum(dim=1)


class _Permute(torch.autograd.Function):
    """rows = x[token_index]; backward gathers (no scatter-add): grad_x[t] = sum_j grad[inverse[t, j]]."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        token_index: torch.Tensor,
        inverse: torch.Tensor,
        dropped: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse, dropped)
        return x.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inverse, dropped = ctx.saved_tensors
        return _gather_sum(grad, inverse, dropped), None, None, None


class _Combine(torch.autograd.Function):
    """out[t] = sum_j gate[i] * rows[i], i = inverse[t, j] (the gate-weighted unpermute).

    One function instead of a multiply then a gather: the forward scales the gathered rows in
    place, and the backward gathers the output gradient once, takes the gate gradient as a
    row-wise dot with the rows, and scales in place (two fewer passes over [N, d]).
    """

    @staticmethod
    def forward(
        ctx,
        rows: torch.Tensor,
        gate: torch.Tensor,
        token_index: torch.Tensor,
        inverse: torch.Tensor,
        dropped: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(rows, gate, token_index)
        return _gather_sum(rows, inverse, dropped, gate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, gate, token_index = ctx.saved_tensors
        grad_rows = grad.index_select(0, token_index)  # each kept row's token's gradient
        grad_gate = torch.linalg.vecdot(grad_rows, rows) if ctx.needs_input_grad[1] else None
        grad_rows = grad_rows.mul_(gate.unsqueeze(-1)) if ctx.needs_input_grad[0] else None
        return grad_rows, grad_gate, None, None, None


class LocalDispatcher:
    """Single-process dispatch: every expert lives here.

    Two layouts of the same permutation:
    * grouped: [N, d], rows of expert 0 then expert 1 ..., no padding (local compute);
    * buffer: [E, C, d], each expert's rows at its slots, unused slots zero (the fixed-size
      layout an all-to-all exchanges).
    """

    # Kept slots of each expert are 0..count-1 (``make_plan``'s trim_buffer relies on it); the
    # simulated dispatcher's merged buffer places each virtual rank at its own offset.
    trims_buffer = True

    def route(self, router: Router, tokens: torch.Tensor) -> Routing:
        """Gating and selection over this process's tokens [T, d] (the simulated and
        expert-parallel dispatchers decide capacity over virtual ranks or the EP group)."""
        return router(tokens)

    def plan(self, routing: Routing) -> DispatchPlan:
        on_cpu = routing.slot.device.type == "cpu"  # trimming reads a count on the host
        return make_plan(routing, trim_buffer=self.trims_buffer and on_cpu)

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
        return _Permute.apply(x, plan.token_index, plan.inverse, plan.dropped)

    def unpermute(self, y: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """grouped expert outputs [N, d] -> [T, d], each scaled by its gate and summed per token.

        Dropped assignments contribute zero (the residual connection carries the token).
        """
        gate = plan.gate.to(y.dtype)
        return _Combine.apply(y, gate, plan.token_index, plan.inverse, plan.dropped)

    def permute_to_buffer(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """x [T, d] -> buffer [E, R, d] (zeros where a slot is unused), R = plan.buffer_rows."""
        rows = self.permute(x, plan)
        buffer = x.new_zeros(plan.num_experts * plan.buffer_rows, x.shape[-1])
        buffer = buffer.index_copy(0, plan.buffer_index, rows)
        return buffer.view(plan.num_experts, plan.buffer_rows, x.shape[-1])

    def unpermute_from_buffer(self, buffer: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """buffer [E, R, d] -> [T, d], scaled by the gate (unused slots are never read)."""
        rows = buffer.reshape(-1, buffer.shape[-1]).index_select(0, plan.buffer_index)
        return self.unpermute(rows, plan)
