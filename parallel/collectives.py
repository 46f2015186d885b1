"""Autograd-aware collectives with a timeout and errors that name the group and its ranks.

Shape letters: R rows (tokens or buffer slots) sent or received, d width.

    rows_out = all_to_all(rows, send_splits, recv_splits, group)   # backward: reverse exchange
    counts = all_gather_rows(local_counts, group)                  # variable lengths, no grad

Every collective here waits with ``timeout`` (``COLLECTIVE_TIMEOUT`` by default) and, when it
fails or times out, raises ``CollectiveError`` naming the operation, the group and its global
ranks, so that a mismatch shows up as a message instead of a hang.
Only collectives gloo supports on CPU are used (``all_to_all_single`` with explicit splits,
``all_gather``), so the same code runs under NCCL on GPUs.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = timedelta(seconds=120)


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the group and its ranks."""


def group_ranks(group: Any) -> list[int]:
    """Global ranks of ``group`` (None = the default group), in group-rank order."""
    if group is None:
        return list(range(dist.get_world_size()))
    return dist.get_process_group_ranks(group)


def group_label(group: Any) -> str:
    """'name' (ranks [..]) for error messages; the name comes from ``group.group_desc``."""
    name = getattr(group, "group_desc", None) or ("default" if group is None else "unnamed")
    return f"group '{name}' (global ranks {group_ranks(group)})"


def _wait(work: Any, operation: str, group: Any, timeout: timedelta) -> None:
    """Wait for an async collective; re-raise any failure naming the group and this rank."""
    try:
        work.wait(timeout)
    except RuntimeError as err:
        raise CollectiveError(
            f"{operation} over {group_label(group)} failed on global rank {dist.get_rank()} "
            f"(timeout {timeout.total_seconds():.0f}s): {str(err).splitlines()[0]}"
        ) from err


def check_splits(name: str, splits: list[int], size: int, group: Any) -> None:
    """Split sizes must be one non-negative int per group member and sum to ``size``."""
    members = dist.get_world_size(group)
    if len(splits) != members or any(s < 0 for s in splits) or sum(splits) != size:
        raise ValueError(
            f"{name} {splits} must hold {members} non-negative sizes summing to {size} "
            f"for {group_label(group)}"
        )


def all_to_all_rows(
    rows: torch.Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group: Any,
    timeout: timedelta = COLLECTIVE_TIMEOUT,
) -> torch.Tensor:
    """No-grad exchange: rows [R_send, ...] -> [R_recv, ...]; ``send_splits[j]`` rows go to j."""
    check_splits("send_splits", send_splits, rows.shape[0], group)
    out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
    work = dist.all_to_all_single(
        out, rows.contiguous(), recv_splits, send_splits, group=group, async_op=True
    )
    _wait(work, "all_to_all_single", group, timeout)
    return out


class _AllToAll(torch.autograd.Function):
    """Forward sends with (send, recv) splits; backward sends the gradients back (recv, send)."""

    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, group, timeout):  # noqa: ANN001, ANN205
        ctx.splits = (send_splits, recv_splits)
        ctx.group = group
        ctx.timeout = timeout
        return all_to_all_rows(rows, send_splits, recv_splits, group, timeout)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        send_splits, recv_splits = ctx.splits
        grad_rows = all_to_all_rows(grad, recv_splits, send_splits, ctx.group, ctx.timeout)
        return grad_rows, None, None, None, None


def all_to_all(
    rows: torch.Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group: Any,
    timeout: timedelta = COLLECTIVE_TIMEOUT,
) -> torch.Tensor:
    """Autograd-aware all-to-all of rows [R_send, d] -> [R_recv, d] over ``group``.

    ``send_splits[j]`` consecutive rows go to group rank j, ``recv_splits[j]`` rows arrive from
    it (in group-rank order). The backward is the reverse exchange of the gradients.
    """
    return _AllToAll.apply(rows, list(send_splits), list(recv_splits), group, timeout)


def all_gather_tensor(
    tensor: torch.Tensor, group: Any, timeout: timedelta = COLLECTIVE_TIMEOUT
) -> torch.Tensor:
    """No-grad gather of same-shape tensors [...] -> [G, ...] in group-rank order."""
    members = dist.get_world_size(group)
    pieces = [torch.empty_like(tensor) for _ in range(members)]
    work = dist.all_gather(pieces, tensor.contiguous(), group=group, async_op=True)
    _wait(work, "all_gather", group, timeout)
    return torch.stack(pieces)


def all_gather_rows(
    rows: torch.Tensor, group: Any, timeout: timedelta = COLLECTIVE_TIMEOUT
) -> tuple[torch.Tensor, list[int]]:
    """No-grad gather of a variable number of rows [R_g, ...] from each member.

    Returns the concatenation [sum_g R_g, ...] in group-rank order and the list of R_g.
    Exchanges the row counts first, then pads every piece to the largest count.
    """
    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
    # A host read (a device sync on GPUs): gathering rows of unequal counts needs the counts
    # as Python ints to size and cut the pieces.
    counts = all_gather_tensor(count, group, timeout).view(-1).tolist()
    longest = max(counts)
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = all_gather_tensor(padded, group, timeout)
    return torch.cat([gathered[g, :n] for g, n in enumerate(counts)]), counts


def all_reduce_sum(
    tensor: torch.Tensor, group: Any, timeout: timedelta = COLLECTIVE_TIMEOUT
) -> torch.Tensor:
    """In-place sum of ``tensor`` over ``group`` (no grad); returns it."""
    work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)
    _wait(work, "all_reduce", group, timeout)
    return tensor
