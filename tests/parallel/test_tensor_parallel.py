"""Tensor-parallel linears (parallel/tensor_parallel.py) equal nn.Linear of the same seed.

Cheap: without a group (tp=1) each layer is an nn.Linear, and the four region functions are
the identity; sizes not divisible by tp fail in one line; sharded parameters carry the tags
DeepSpeed's gradient norm reads. Slow (gloo processes, fp32, atol 1e-6): at tp=2 column
(gather_output both ways) and row (input_is_parallel both ways) layers, and the column ->
relu -> row MLP, equal the full layers in output and in the gradients of the input, weight
and bias (each rank's shard against the matching slice of the reference gradient); on 4
ranks the MLP at tp=4 and at tp=2 in two groups [0, 1] and [2, 3] (group rank != global rank).
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import torch.distributed as dist
from torch import nn

from parallel import tensor_parallel as tpl
from parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_region,
    gather_from_region,
    reduce_from_region,
    scatter_to_region,
)
from tests.dist import run_ranks

D_IN, D_OUT, FF = 8, 12, 16
ATOL = 1e-6  # fp32: sharded matmuls and the all-reduce only reorder the sums


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL, msg=lambda m: f"{what}: {m}")


def shard(t: torch.Tensor, dim: int, tp: int, rank: int) -> torch.Tensor:
    return t.chunk(tp, dim=dim)[rank]


def batch(d: int, seed: int = 1) -> torch.Tensor:
    """x [2, 3, d], the same on every rank."""
    return torch.randn(2, 3, d, generator=torch.Generator().manual_seed(seed))


def upstream(shape: tuple[int, ...], seed: int = 2) -> torch.Tensor:
    """A fixed upstream gradient, so that every output element gets its own weight."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- cheap: no processes -------------------------------------------------------------------


def test_without_a_group_the_layers_are_nn_linear_of_the_same_seed():
    for layer_cls in (ColumnParallelLinear, RowParallelLinear):
        torch.manual_seed(0)
        ref = nn.Linear(D_IN, D_OUT)
        torch.manual_seed(0)
        layer = layer_cls(D_IN, D_OUT)
        assert layer.tp == 1 and torch.equal(layer.weight, ref.weight)
        assert torch.equal(layer.bias, ref.bias)
        x_ref, x = batch(D_IN).requires_grad_(), batch(D_IN).requires_grad_()
        g = upstream((2, 3, D_OUT))
        (ref(x_ref) * g).sum().backward()
        y = layer(x)
        (y * g).sum().backward()
        assert torch.equal(y, ref(x_ref))
        assert torch.equal(x.grad, x_ref.grad)
        assert torch.equal(layer.weight.grad, ref.weight.grad)
        assert torch.equal(layer.bias.grad, ref.bias.grad)
        again = layer_cls.from_linear(ref, None)
        assert torch.equal(again.weight, ref.weight) and again.weight is not ref.weight


def test_without_a_group_the_region_functions_are_the_identity():
    x = batch(D_IN)
    for fn in (copy_to_region, reduce_from_region, gather_from_region, scatter_to_region):
        assert fn(x, None) is x


def test_sizes_not_divisible_by_tp_fail_in_one_line(monkeypatch):
    monkeypatch.setattr(tpl, "group_size_and_rank", lambda group: (3, 0))
    cases = [
        (ColumnParallelLinear, "ColumnParallelLinear out_features (8) must be divisible"),
        (RowParallelLinear, "RowParallelLinear in_features (8) must be divisible"),
    ]
    for layer_cls, message in cases:
        full = f"{message} by the tensor-parallel size tp (3)"
        with pytest.raises(ValueError, match=f"^{re.escape(full)}$"):
            layer_cls(8, 8, group=object())
    with pytest.raises(ValueError, match=r"dim -1 \(8\) .* tensor-parallel size tp \(3\)"):
        tpl._own_slice(torch.zeros(2, 8), 3, 0, -1)
    with pytest.raises(ValueError, match=r"dim 0 \(2\) .* tensor-parallel size tp \(3\)"):
        tpl._own_slice(torch.zeros(2, 8), 3, 0, 0)


def test_init_from_must_match_the_layer():
    with pytest.raises(ValueError, match=r"init_from has .* \(8, 4, True\), the layer wants"):
        ColumnParallelLinear(8, 6, init_from=nn.Linear(8, 4))
    with pytest.raises(TypeError, match="init_from must be an nn.Linear, got Tensor"):
        RowParallelLinear(8, 6, init_from=torch.zeros(6, 8))


def test_sharded_parameters_carry_the_tags_deepspeed_reads():
    from deepspeed.runtime.utils import clip_grad_norm_, is_model_parallel_parameter

    # The contract: the norm code decides per parameter through is_model_parallel_parameter.
    assert "is_model_parallel_parameter(p)" in inspect.getsource(clip_grad_norm_)
    column, row = ColumnParallelLinear(D_IN, FF), RowParallelLinear(FF, D_IN)
    for param, dim in ((column.weight, 0), (column.bias, 0), (row.weight, 1)):
        assert is_model_parallel_parameter(param)
        assert param.tensor_model_parallel is True
        assert (param.partition_dim, param.partition_stride) == (dim, 1)
    assert not is_model_parallel_parameter(row.bias)
    assert not hasattr(row.bias, "partition_dim")


# ---- slow: gloo processes ------------------------------------------------------------------


def check_column(group, gather_output: bool) -> None:
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    torch.manual_seed(3)
    ref = nn.Linear(D_IN, D_OUT)
    layer = ColumnParallelLinear.from_linear(ref, group, gather_output=gather_output)
    x_ref, x = batch(D_IN).requires_grad_(), batch(D_IN).requires_grad_()
    g = upstream((2, 3, D_OUT))
    y_ref = ref(x_ref)
    (y_ref * g).sum().backward()
    y = layer(x)
    what = f"column tp={tp} gather_output={gather_output}"
    if gather_output:
        close(y, y_ref, f"{what} output")
        (y * g).sum().backward()
    else:
        close(y, shard(y_ref, -1, tp, rank), f"{what} output")
        (y * shard(g, -1, tp, rank)).sum().backward()
    close(x.grad, x_ref.grad, f"{what} input grad")
    close(layer.weight.grad, shard(ref.weight.grad, 0, tp, rank), f"{what} weight grad")
    close(layer.bias.grad, shard(ref.bias.grad, 0, tp, rank), f"{what} bias grad")


def check_row(group, input_is_parallel: bool) -> None:
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    torch.manual_seed(4)
    ref = nn.Linear(D_IN, D_OUT)
    layer = RowParallelLinear.from_linear(ref, group, input_is_parallel=input_is_parallel)
    x_ref = batch(D_IN).requires_grad_()
    x = (shard(batch(D_IN), -1, tp, rank) if input_is_parallel else batch(D_IN)).requires_grad_()
    g = upstream((2, 3, D_OUT))
    y_ref = ref(x_ref)
    (y_ref * g).sum().backward()
    y = layer(x)
    (y * g).sum().backward()
    what = f"row tp={tp} input_is_parallel={input_is_parallel}"
    close(y, y_ref, f"{what} output")
    expected_x_grad = shard(x_ref.grad, -1, tp, rank) if input_is_parallel else x_ref.grad
    close(x.grad, expected_x_grad, f"{what} input grad")
    close(layer.weight.grad, shard(ref.weight.grad, 1, tp, rank), f"{what} weight grad")
    close(layer.bias.grad, ref.bias.grad, f"{what} bias grad")


def check_mlp(group) -> None:
    """Column (no gather) -> relu -> row (parallel input) == the two full linears."""
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    torch.manual_seed(5)
    up_ref, down_ref = nn.Linear(D_IN, FF), nn.Linear(FF, D_IN)
    # Same seed, no init_from: each rank draws the full layers and keeps its shard.
    torch.manual_seed(5)
    up, down = ColumnParallelLinear(D_IN, FF, group=group), RowParallelLinear(FF, D_IN, group=group)
    x_ref, x = batch(D_IN).requires_grad_(), batch(D_IN).requires_grad_()
    g = upstream((2, 3, D_IN))
    y_ref = down_ref(torch.relu(up_ref(x_ref)))
    (y_ref * g).sum().backward()
    y = down(torch.relu(up(x)))
    (y * g).sum().backward()
    what = f"mlp tp={tp} (group rank {rank})"
    close(y, y_ref, f"{what} output")
    close(x.grad, x_ref.grad, f"{what} input grad")
    close(up.weight.grad, shard(up_ref.weight.grad, 0, tp, rank), f"{what} up weight grad")
    close(up.bias.grad, shard(up_ref.bias.grad, 0, tp, rank), f"{what} up bias grad")
    close(down.weight.grad, shard(down_ref.weight.grad, 1, tp, rank), f"{what} down weight grad")
    close(down.bias.grad, down_ref.bias.grad, f"{what} down bias grad")


def body_tp2(rank: int, world_size: int) -> str:
    group = dist.new_group(list(range(world_size)))
    for gather_output in (False, True):
        check_column(group, gather_output)
    for input_is_parallel in (True, False):
        check_row(group, input_is_parallel)
    check_mlp(group)
    try:
        ColumnParallelLinear(D_IN, 7, group=group)
    except ValueError as err:
        assert "out_features (7)" in str(err) and "tp (2)" in str(err), err
    else:
        raise AssertionError("out_features 7 at tp=2 was accepted")
    return "ok"


def body_four_ranks(rank: int, world_size: int) -> str:
    check_mlp(dist.new_group(list(range(world_size))))
    # dp=2 x tp=2: TP groups are consecutive ranks; new_group is collective, so every rank
    # creates both and uses its own.
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    check_mlp(pairs[rank // 2])
    return "ok"


@pytest.mark.slow
def test_tp2_column_row_and_mlp_equal_nn_linear(tmp_path):
    assert run_ranks(2, body_tp2, tmp_path, timeout=120) == ["ok"] * 2


@pytest.mark.slow
def test_mlp_at_tp4_and_in_two_tp2_groups_equals_nn_linear(tmp_path):
    assert run_ranks(4, body_four_ranks, tmp_path, timeout=120) == ["ok"] * 4
