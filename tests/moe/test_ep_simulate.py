"""Simulated expert parallelism in one process against the per-rank one-process reference."""

import pytest
import torch

from moe import MoELayer
from moe.ep_dispatch import source_to_expert_order
from moe.router import route
from moe.simulate import SimulatedDispatcher, split_sizes
from tests.moe.ep_cases import (
    CASES,
    FF,
    D,
    E,
    assert_same_run,
    full_state,
    make_batch,
    make_layer,
    reference,
    simulated,
)

LAYOUTS = {"ep2": ([7, 5], 2), "ep4": ([5, 3, 6, 4], 4), "dp4_ep2": ([5, 3, 6, 4], 2)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_simulated_equals_reference(case, layout):
    sizes, ep = LAYOUTS[layout]
    kwargs = CASES[case]
    state = full_state(make_layer(**kwargs))
    expected = reference(kwargs, state, sizes, ep)
    assert expected["grads"]["experts.w1"][3].abs().max() == 0, "expert 3 must be empty"
    if "drop" in case and "dropless" not in case:
        assert not expected["kept"].all(), "a dropping case must drop"
    assert_same_run(simulated(kwargs, state, sizes, ep), expected, f"{case}/{layout}")


def test_one_virtual_rank_is_the_local_layer():
    layer = make_layer(top_k=2, capacity_factor=1.0)
    x, _ = make_batch([13])
    local = layer(x)
    layer.dispatcher = SimulatedDispatcher(1)
    simulated_out = layer(x)
    torch.testing.assert_close(simulated_out.output, local.output, rtol=0, atol=0)
    assert simulated_out.aux_loss.item() == local.aux_loss.item()


@pytest.mark.parametrize("priority", ["sequence", "probability"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_global_scope_drops_do_not_depend_on_the_layout(top_k, priority):
    layer = make_layer(top_k=top_k, capacity_factor=1.0, priority=priority)
    x, _ = make_batch([24])
    with torch.no_grad():
        single = route(
            layer.router.logits(x), top_k=top_k, capacity_factor=1.0, min_capacity=1,
            priority=priority,
        )  # fmt: skip
        assert (single.slot < 0).any(), "the case must drop"
        for num_ranks in (1, 2, 4):
            sizes = [5, 7, 3, 9][:num_ranks] if num_ranks == 4 else split_sizes(24, num_ranks)
            dispatcher = SimulatedDispatcher(
                num_ranks, capacity_scope="global", tokens_per_rank=sizes
            )
            routing = dispatcher.route(layer.router, x)
            assert torch.equal(routing.slot, single.slot), num_ranks
            assert routing.capacity == single.capacity


def test_per_rank_capacity_and_offsets_follow_each_virtual_rank():
    layer = make_layer(top_k=1, capacity_factor=1.0)
    x, _ = make_batch([10, 6])
    with torch.no_grad():
        routing = SimulatedDispatcher(2, tokens_per_rank=[10, 6]).route(layer.router, x)
    # ceil(1.0 * 10 / 4) = 3 and ceil(1.0 * 6 / 4) = 2 slots; rank 1's slots start at 3.
    assert routing.capacity == 5
    assert routing.slot[:10].max() < 3 and (routing.slot[10:][routing.slot[10:] >= 0] >= 3).all()
    assert routing.group_tokens_per_expert.shape == (2, E)
    assert torch.equal(routing.group_tokens_per_expert.sum(0), routing.tokens_per_expert)


def test_split_sizes_and_errors():
    assert split_sizes(10, 4) == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="simulate_ep must be a positive integer"):
        SimulatedDispatcher(0)
    with pytest.raises(ValueError, match="capacity_scope must be one of"):
        MoELayer(D, FF, E, capacity_scope="world")
    with pytest.raises(ValueError, match=r"tokens_per_rank \[3, 3\] sums to 6"):
        SimulatedDispatcher(2, tokens_per_rank=[3, 3]).sizes(7)


def test_source_to_expert_order():
    counts = torch.tensor([[2, 1], [0, 3]])  # source 0: e0 x2, e1 x1; source 1: e1 x3
    # source-major rows: [s0e0, s0e0, s0e1, s1e1, s1e1, s1e1] -> expert-major
    assert source_to_expert_order(counts).tolist() == [0, 1, 2, 3, 4, 5]
    counts = torch.tensor([[1, 2], [2, 1]])
    # rows: s0e0 | s0e1 s0e1 | s1e0 s1e0 | s1e1 -> e0: 0, 3, 4; e1: 1, 2, 5
    assert source_to_expert_order(counts).tolist() == [0, 3, 4, 1, 2, 5]
