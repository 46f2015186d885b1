"""Megatron-style tensor-parallel linears and the four autograd functions they are made of.

What is split: a ``ColumnParallelLinear`` holds 1/tp of the output features (rows of the
weight [out, in], and of the bias); a ``RowParallelLinear`` holds 1/tp of the input features
(columns of the weight) and the whole bias, added once after the partial products are summed.
A column layer without gathered output feeding a row layer with parallel input is the
Megatron MLP: one all-reduce in the forward (after the row layer) and one in the backward
(before the column layer), nothing in between.

Shape legend: ``...`` any leading dims (batch, sequence), d_in / d_out the full feature
counts, tp the tensor-parallel group size; a shard of the last dim has d / tp features and
group rank r holds features [r * d / tp, (r + 1) * d / tp).

The four functions over the TP group (each is the identity when the group is None or has
one member):

    copy_to_region(x)      forward identity                backward all-reduce (sum)
    reduce_from_region(x)  forward all-reduce (sum)        backward identity
    gather_from_region(x)  forward all-gather along dim    backward keep own slice
    scatter_to_region(x)   forward keep own slice          backward all-gather along dim

(``dim`` defaults to the last, features; MoE layers under TP split token rows, dim 0.)

``group=None`` means "no tensor parallelism", not the default group. Every rank of a TP
group must build the layers from the same full weights (same seed, or ``from_linear`` of the
same ``nn.Linear``), so tp=2 starts from exactly the tp=1 weights.

    torch.manual_seed(0)
    up, down = nn.Linear(d, ff), nn.Linear(ff, d)            # the tp=1 weights
    up = ColumnParallelLinear.from_linear(up, tp_group)      # [..., d] -> [..., ff / tp]
    down = RowParallelLinear.from_linear(down, tp_group)     # [..., ff / tp] -> [..., d]
    y = down(torch.relu(up(x)))                              # == the tp=1 MLP

Only collectives gloo supports on CPU are used (all-reduce, all-gather of equal sizes), with
the timeout and group-naming errors of ``parallel.collectives``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.collectives import COLLECTIVE_TIMEOUT, all_gather_tensor, all_reduce_sum


def group_size_and_rank(group: Any) -> tuple[int, int]:
    """(tp, this process's rank in ``group``); (1, 0) when ``group`` is None."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _shard_size(layer: str, dim_name: str, size: int, tp: int) -> int:
    """``size / tp``, or a one-line ValueError naming the layer dimension, its size and tp."""
    if size % tp != 0:
        raise ValueError(
            f"{layer} {dim_name} ({size}) must be divisible by the tensor-parallel size tp ({tp})"
        )
    return size // tp


def _own_slice(x: torch.Tensor, tp: int, rank: int, dim: int) -> torch.Tensor:
    """This rank's contiguous shard of x along ``dim`` (size d -> d / tp)."""
    size = x.shape[dim]
    if size % tp != 0:
        raise ValueError(
            f"dim {dim} ({size}) of a tensor split over the TP group must be divisible by the "
            f"tensor-parallel size tp ({tp})"
        )
    width = size // tp
    return x.narrow(dim, rank * width, width).contiguous()


def _all_reduce(x: torch.Tensor, group: Any, timeout: timedelta) -> torch.Tensor:
    # A contiguous copy: the input (or an incoming gradient) may be shared with other users.
    return all_reduce_sum(x.clone(memory_format=torch.contiguous_format), group, timeout)


def _all_gather_dim(x: torch.Tensor, group: Any, timeout: timedelta, dim: int) -> torch.Tensor:
    """d / tp along ``dim`` on each rank -> d, pieces in group-rank order."""
    return torch.cat(all_gather_tensor(x.contiguous(), group, timeout).unbind(0), dim=dim)


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, timeout):  # noqa: ANN001, ANN205
        ctx.group, ctx.timeout = group, timeout
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return _all_reduce(grad, ctx.group, ctx.timeout), None, None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, timeout):  # noqa: ANN001, ANN205
        return _all_reduce(x, group, timeout)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad, None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, timeout, dim):  # noqa: ANN001, ANN205
        ctx.tp, ctx.rank = group_size_and_rank(group)
        ctx.dim = dim
        return _all_gather_dim(x, group, timeout, dim)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return _own_slice(grad, ctx.tp, ctx.rank, ctx.dim), None, None, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, timeout, dim):  # noqa: ANN001, ANN205
        ctx.group, ctx.timeout, ctx.dim = group, timeout, dim
        tp, rank = group_size_and_rank(group)
        return _own_slice(x, tp, rank, dim)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return _all_gather_dim(grad, ctx.group, ctx.timeout, ctx.dim), None, None, None


def _apply(
    function: type[torch.autograd.Function],
    x: torch.Tensor,
    group: Any,
    timeout: timedelta,
    *extra: Any,
) -> torch.Tensor:
    """``function`` over the group; the identity (the same tensor) without tensor parallelism."""
    if group_size_and_rank(group)[0] == 1:
        return x
    return function.apply(x, group, timeout, *extra)


def copy_to_region(
    x: torch.Tensor, group: Any, timeout: timedelta = COLLECTIVE_TIMEOUT
) -> torch.Tensor:
    """Enter a TP region with a replicated x [...]: forward identity, backward sums the grads."""
    return _apply(_CopyToRegion, x, group, timeout)


def reduce_from_region(
    x: torch.Tensor, group: Any, timeout: timedelta = COLLECTIVE_TIMEOUT
) -> torch.Tensor:
    """Leave a TP region with partial sums x [...]: forward sums over the group, backward identity."""
    return _apply(_ReduceFromRegion, x, group, timeout)


def gather_from_region(
    x: torch.Tensor, group: Any, timeout: timedelta = COLLECTIVE_TIMEOUT, dim: int = -1
) -> torch.Tensor:
    """d / tp along ``dim`` -> d by all-gather in group-rank order; backward keeps own slice.

    ``dim=-1``: features (a column layer's output); ``dim=0``: token rows (an MoE layer
    under TP, whose downstream is replicated)."""
    return _apply(_GatherFromRegion, x, group, timeout, dim)


def scatter_to_region(
    x: torch.Tensor, group: Any, timeout: timedelta = COLLECTIVE_TIMEOUT, dim: int = -1
) -> torch.Tensor:
    """Replicated x -> this rank's d / tp along ``dim``; backward all-gathers the grads (the
    replicated upstream needs the gradient of the whole tensor)."""
    return _apply(_ScatterToRegion, x, group, timeout, dim)


def mark_tensor_parallel(param: nn.Parameter, partition_dim: int) -> None:
    """Tag a sharded parameter as read by deepspeed.runtime.utils.is_model_parallel_parameter.

    DeepSpeed 0.19 reads only ``tensor_model_parallel`` (in ``is_model_parallel_parameter``,
    which ``runtime/utils.clip_grad_norm_`` and ZeRO 1/2's ``get_grad_norm_direct`` call): a
    tagged gradient counts on every model-parallel rank, an untagged one on rank 0 only, so
    without the tag the norm misses the other shards. ``partition_dim`` and
    ``partition_stride`` follow Megatron's convention, for checkpoint code that gathers shards.
    """
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = 1


def _full_linear(in_features: int, out_features: int, bias: bool, init_from: Any) -> nn.Linear:
    """The full layer to slice: ``init_from``, or an ``nn.Linear`` drawn from the current RNG."""
    if init_from is None:
        return nn.Linear(in_features, out_features, bias=bias)
    if not isinstance(init_from, nn.Linear):
        raise TypeError(f"init_from must be an nn.Linear, got {type(init_from).__name__}")
    wanted = (in_features, out_features, bias)
    got = (init_from.in_features, init_from.out_features, init_from.bias is not None)
    if got != wanted:
        raise ValueError(
            f"init_from has (in_features, out_features, bias) {got}, the layer wants {wanted}"
        )
    return init_from


class _ShardedLinear(nn.Module):
    """What the column and row layers share: being cut from a full ``nn.Linear``."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Any, **options: Any) -> _ShardedLinear:
        """This rank's shard of ``linear`` (same in/out features and bias); ``options`` are
        the layer's own keywords (``gather_output``, ``input_is_parallel``, ``timeout``)."""
        return cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            group,
            init_from=linear,
            **options,
        )


class ColumnParallelLinear(_ShardedLinear):
    """y = x W^T + b with W's output features (and b) split over the TP group.

    Args:
        in_features, out_features: full sizes d_in, d_out; d_out must be divisible by tp.
        bias: whether the layer has a bias (sharded like the output features).
        group: the TP process group; None (or one member) = an ordinary linear.
        gather_output: all-gather the output to [..., d_out] instead of [..., d_out / tp].
        init_from: the full ``nn.Linear`` to slice; None draws one from the current RNG
            (every TP rank must then share the seed).
        timeout: bound of each collective.

    Parameters: ``weight`` [d_out / tp, d_in] and ``bias`` [d_out / tp], tagged
    tensor-parallel with partition_dim 0. Input x [..., d_in], replicated over the group.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group: Any = None,
        gather_output: bool = False,
        init_from: nn.Linear | None = None,
        *,
        timeout: timedelta = COLLECTIVE_TIMEOUT,
    ) -> None:
        super().__init__()
        self.tp, self.tp_rank = group_size_and_rank(group)
        width = _shard_size("ColumnParallelLinear", "out_features", out_features, self.tp)
        self.in_features, self.out_features = in_features, out_features
        self.group, self.gather_output, self.timeout = group, gather_output, timeout
        full = _full_linear(in_features, out_features, bias, init_from)
        rows = slice(self.tp_rank * width, (self.tp_rank + 1) * width)
        self.weight = nn.Parameter(full.weight.detach()[rows].clone())
        mark_tensor_parallel(self.weight, partition_dim=0)
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(full.bias.detach()[rows].clone())
            mark_tensor_parallel(self.bias, partition_dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> [..., d_out / tp], or [..., d_out] with ``gather_output``."""
        y = F.linear(copy_to_region(x, self.group, self.timeout), self.weight, self.bias)
        return gather_from_region(y, self.group, self.timeout) if self.gather_output else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, tp={self.tp}, "
            f"bias={self.bias is not None}, gather_output={self.gather_output}"
        )


class RowParallelLinear(_ShardedLinear):
    """y = x W^T + b with W's input features split over the TP group; b added once.

    Args:
        in_features, out_features: full sizes d_in, d_out; d_in must be divisible by tp.
        bias: whether the layer has a bias (replicated, added after the all-reduce).
        group: the TP process group; None (or one member) = an ordinary linear.
        input_is_parallel: x is already this rank's [..., d_in / tp] (a column layer's
            output); otherwise x [..., d_in] is replicated and sliced here.
        init_from: the full ``nn.Linear`` to slice; None draws one from the current RNG
            (every TP rank must then share the seed).
        timeout: bound of each collective.

    Parameters: ``weight`` [d_out, d_in / tp], tagged tensor-parallel with partition_dim 1;
    ``bias`` [d_out], replicated and not tagged. The output [..., d_out] is replicated.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group: Any = None,
        input_is_parallel: bool = True,
        init_from: nn.Linear | None = None,
        *,
        timeout: timedelta = COLLECTIVE_TIMEOUT,
    ) -> None:
        super().__init__()
        self.tp, self.tp_rank = group_size_and_rank(group)
        width = _shard_size("RowParallelLinear", "in_features", in_features, self.tp)
        self.in_features, self.out_features = in_features, out_features
        self.group, self.input_is_parallel, self.timeout = group, input_is_parallel, timeout
        full = _full_linear(in_features, out_features, bias, init_from)
        cols = slice(self.tp_rank * width, (self.tp_rank + 1) * width)
        self.weight = nn.Parameter(full.weight.detach()[:, cols].clone())
        mark_tensor_parallel(self.weight, partition_dim=1)
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(full.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in / tp] (or [..., d_in] unless ``input_is_parallel``) -> [..., d_out]."""
        if not self.input_is_parallel:
            x = scatter_to_region(x, self.group, self.timeout)
        y = reduce_from_region(F.linear(x, self.weight), self.group, self.timeout)
        # Under autocast the partial products are bf16; nn.Linear would return bf16 too, so
        # the fp32 bias joins in their dtype instead of promoting the output to fp32.
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, tp={self.tp}, "
            f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}"
        )
