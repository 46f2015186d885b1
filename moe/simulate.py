"""Simulated expert parallelism: one process computes exactly what N real ranks compute.

Shape letters: T tokens (all virtual ranks), T_r tokens of virtual rank r, k choices,
E experts, C_r capacity of rank r, d width, N virtual ranks.

    layer = MoELayer(..., simulate_ep=4)                  # or capacity_scope="global"
    layer.dispatcher = SimulatedDispatcher(4, ep=2)       # dp=4 with ep=2: two EP groups

The batch [T, d] splits into N contiguous chunks, one per virtual rank, as a data loader
hands each data-parallel rank its rows (sizes as ``torch.tensor_split`` cuts them, or given).
Per virtual rank it reproduces a real rank of ``AllToAllDispatcher``:

* per_rank scope: each chunk is routed on its own (capacity ceil(cf * T_r * k / E), its own
  priority order and drops);
* global scope: capacity and priority are decided over each EP group's chunks together
  (``moe.router.group_slots``), exactly as the real dispatcher after its gather.

The per-rank routings merge into one Routing whose slots are offset per rank (rank r's slots
of expert e follow ranks 0..r-1's), so one grouped matmul sees each expert's rows in the
order a real EP rank receives them (rank-major), and the buffer layout is the real receive
buffer [E, sum_r C_r, d]. Losses are averaged the way a real run averages them: aux_loss,
z_loss and drop rate are the mean over virtual ranks of each rank's own value (a data-parallel
run averages its ranks' losses and gradients). Expert gradients sum over virtual ranks as
the real all-to-all backward sums over source ranks.
"""

from __future__ import annotations

import torch

from moe.dispatch import LocalDispatcher
from moe.ep_dispatch import check_capacity_scope
from moe.router import (
    Router,
    Routing,
    TopKRouter,
    route_member,
    top_k_choice,
)


def split_sizes(num_tokens: int, num_ranks: int) -> list[int]:
    """Tokens per virtual rank as ``torch.tensor_split`` cuts T rows into N chunks."""
    base, extra = divmod(num_tokens, num_ranks)
    return [base + (1 if r < extra else 0) for r in range(num_ranks)]


def merge_routings(routings: list[Routing], slot_offsets: list[int], capacity: int) -> Routing:
    """One Routing over the concatenated tokens of virtual ranks.

    Rank r's kept slots move by ``slot_offsets[r]``; the merged buffer has ``capacity`` slots
    per expert. Losses and the drop rate are the mean over ranks; ``group_tokens_per_expert``
    [N, E] holds each rank's kept counts.
    """
    slots = [
        torch.where(r.slot >= 0, r.slot + offset, r.slot)
        for r, offset in zip(routings, slot_offsets)
    ]
    counts = torch.stack([r.tokens_per_expert for r in routings])
    return Routing(
        expert_index=torch.cat([r.expert_index for r in routings]),
        gate=torch.cat([r.gate for r in routings]),
        slot=torch.cat(slots),
        tokens_per_expert=counts.sum(0),
        capacity=capacity,
        aux_loss=torch.stack([r.aux_loss for r in routings]).mean(),
        z_loss=torch.stack([r.z_loss for r in routings]).mean(),
        drop_rate=torch.stack([r.drop_rate for r in routings]).mean(),
        probs=torch.cat([r.probs for r in routings]),
        group_tokens_per_expert=counts,
    )


class SimulatedDispatcher(LocalDispatcher):
    """LocalDispatcher whose routing reproduces N expert-parallel ranks in one process.

    Args:
        num_ranks: virtual data-parallel ranks N (``simulate_ep``).
        capacity_scope: "per_rank" or "global".
        ep: EP group size (default N); global scope decides capacity within each block of
            ``ep`` consecutive virtual ranks, as the real EP groups do.
        tokens_per_rank: explicit chunk sizes (summing to T); default ``split_sizes``.
    """

    def __init__(
        self,
        num_ranks: int,
        *,
        capacity_scope: str = "per_rank",
        ep: int | None = None,
        tokens_per_rank: list[int] | None = None,
    ) -> None:
        check_capacity_scope(capacity_scope)
        if not isinstance(num_ranks, int) or num_ranks < 1:
            raise ValueError(f"simulate_ep must be a positive integer, got {num_ranks!r}")
        ep = num_ranks if ep is None else ep
        if ep < 1 or num_ranks % ep != 0:
            raise ValueError(f"ep ({ep}) must divide the number of virtual ranks ({num_ranks})")
        if tokens_per_rank is not None and len(tokens_per_rank) != num_ranks:
            raise ValueError(
                f"tokens_per_rank has {len(tokens_per_rank)} entries, expected {num_ranks}"
            )
        self.num_ranks = num_ranks
        self.capacity_scope = capacity_scope
        self.ep = ep
        self.tokens_per_rank = tokens_per_rank

    trims_buffer = False  # the merged buffer is the real receive buffer [E, sum_r C_r, d]

    def sizes(self, num_tokens: int) -> list[int]:
        """Tokens of each virtual rank for a batch of ``num_tokens``."""
        if self.tokens_per_rank is None:
            return split_sizes(num_tokens, self.num_ranks)
        if sum(self.tokens_per_rank) != num_tokens:
            raise ValueError(
                f"tokens_per_rank {self.tokens_per_rank} sums to {sum(self.tokens_per_rank)}, "
                f"but the batch has {num_tokens} tokens"
            )
        return list(self.tokens_per_rank)

    def route(self, router: Router, tokens: torch.Tensor) -> Routing:
        """Route each virtual rank as its real counterpart would, then merge."""
        logits = router.logits(tokens)  # row-wise: the same logits each rank computes
        sizes = self.sizes(tokens.shape[0])
        chunks = list(logits.split(sizes))
        if self.capacity_scope == "per_rank":
            routings = [router.select(chunk) for chunk in chunks]
            offsets = [0]
            for routing in routings[:-1]:
                offsets.append(offsets[-1] + routing.capacity)
            return merge_routings(routings, offsets, offsets[-1] + routings[-1].capacity)
        if not isinstance(router, TopKRouter):
            raise ValueError("capacity_scope 'global' needs router='token_choice'")
        routings, offsets, block_start = [], [], 0
        for first in range(0, self.num_ranks, self.ep):
            members = sizes[first : first + self.ep]
            block_logits = torch.cat(chunks[first : first + self.ep])
            block_index, key = top_k_choice(block_logits, router.top_k)
            slot, capacity = router.group_slots(block_index, key)
            for member in range(self.ep):
                routings.append(
                    route_member(
                        chunks[first + member],
                        block_index,
                        slot,
                        capacity,
                        members,
                        member,
                        top_k=router.top_k,
                    )
                )
                offsets.append(block_start)
            block_start += capacity
        return merge_routings(routings, offsets, block_start)
