"""ParallelLayout arithmetic (no processes): validation messages and group ranks."""

import pytest

from parallel.layout import ParallelLayout


@pytest.mark.parametrize(
    "dp, ep, num_experts, world, match",
    [
        (4, 3, 6, 4, r"parallel.ep \(3\) must divide the data-parallel degree dp \(4 = world 4 "
         r"/ \(tp 1 x pp 1\)\); choose ep in \[1, 2, 4\]"),
        (4, 4, 6, 4, r"parallel.ep \(4\) must divide moe.num_experts \(6\) \(dp=4\); "
         r"choose ep in \[1, 2\]"),
        (4, 2, 8, 2, r"parallel layout dp=4 x tp=1 x pp=1 = 4 does not match the world size 2; "
         r"launch 4 processes or set dp to 2"),
        (0, 1, 8, 1, r"parallel.dp must be a positive integer, got 0"),
    ],
)  # fmt: skip
def test_wrong_layouts_fail_with_one_line(dp, ep, num_experts, world, match):
    with pytest.raises(ValueError, match=match) as info:
        ParallelLayout(dp=dp, ep=ep).check(world, num_experts)
    assert "\n" not in str(info.value)


def test_reserved_degrees_fail():
    with pytest.raises(ValueError, match=r"parallel.tp \(2\) and parallel.pp \(1\) must be 1"):
        ParallelLayout(dp=2, tp=2).check(4)


@pytest.mark.parametrize("world, ep", [(1, 1), (2, 2), (4, 2), (4, 4), (8, 2), (8, 4)])
def test_groups_partition_ranks(world, ep):
    layout = ParallelLayout.from_world(world, ep=ep)
    layout.check(world, num_experts=8)
    ep_groups, edp_groups = layout.ep_group_ranks(), layout.edp_group_ranks()
    assert sorted(r for g in ep_groups for r in g) == list(range(world))
    assert sorted(r for g in edp_groups for r in g) == list(range(world))
    assert all(len(g) == ep for g in ep_groups) and all(len(g) == world // ep for g in edp_groups)
    # every EDP group holds exactly one rank of each EP group, at the same EP rank
    for group in edp_groups:
        assert len({r // ep for r in group}) == world // ep and len({r % ep for r in group}) == 1
    experts = [list(layout.local_experts(8, r)) for r in range(ep)]
    assert sum(experts, []) == list(range(8))


def test_dp2_x_ep2_on_four_ranks():
    layout = ParallelLayout.from_world(4, ep=2)  # written "dp=2 x ep=2"
    assert (layout.dp, layout.ep, layout.edp) == (4, 2, 2)
    assert layout.ep_group_ranks() == [[0, 1], [2, 3]]
    assert layout.edp_group_ranks() == [[0, 2], [1, 3]]


@pytest.mark.parametrize("world, ep", [(2, 2), (4, 2), (4, 4), (8, 2)])
def test_groups_match_deepspeeds(world, ep):
    """DeepSpeed's default (expert before data) grouping is the one the engine reduces over."""
    from parallel.deepspeed_bridge import import_deepspeed

    import_deepspeed()
    from deepspeed.utils.groups import _get_expert_parallel_ranks

    ep_ranks, edp_ranks = _get_expert_parallel_ranks(world, 1, ep)
    layout = ParallelLayout.from_world(world, ep=ep)
    assert sorted(layout.ep_group_ranks()) == sorted(ep_ranks)
    assert sorted(layout.edp_group_ranks()) == sorted(edp_ranks)
