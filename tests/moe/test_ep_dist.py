"""Real expert parallelism (gloo, 2 and 4 processes) equals one process and the simulation.

Layouts: ep=2 on 2 ranks; ep=4 and dp=4 x ep=2 on 4 ranks (one spawn each, every case
batched into it). Each case compares, against the one-process reference of
tests/moe/ep_cases.py: which assignments drop (exactly), outputs, mean aux and z losses, and
gradients of the input, the router and every expert (rtol = atol = 1e-5, fp32 rounding), and
the same for ``SimulatedDispatcher`` with as many virtual ranks. Token counts per rank are
uneven, expert 3 never receives a token, top-1 and top-2, dropping and dropless, per_rank
and global capacity scope.
"""

import io
from datetime import timedelta

import pytest
import torch

from moe.router import route
from parallel.collectives import CollectiveError, all_to_all
from parallel.layout import ParallelLayout
from tests.dist import run_ranks
from tests.moe.ep_cases import (
    CASES,
    E,
    assert_same_run,
    full_state,
    gather_ranks,
    make_batch,
    make_layer,
    reference,
    run_rank,
    simulated,
)

SIZES = {2: [7, 5], 4: [5, 3, 6, 4]}
EQUAL = {2: [6, 6], 4: [4, 4, 4, 4]}
GLOBAL_18 = [8, 10]  # the 4-rank batch (18 tokens) split over 2 ranks


def one_process_kept(name: str, state: dict, num_tokens: int) -> torch.Tensor:
    """Which assignments one process (ep=1) keeps for the first ``num_tokens`` batch rows."""
    layer = make_layer(**{k: v for k, v in CASES[name].items() if k != "capacity_scope"})
    layer.load_state_dict(state)
    with torch.no_grad():
        return layer.router(make_batch([num_tokens])[0]).slot >= 0


def states() -> dict[str, dict[str, torch.Tensor]]:
    return {name: full_state(make_layer(**kwargs)) for name, kwargs in CASES.items()}


def body(rank: int, world_size: int, eps: list[int], case_states: dict) -> dict:
    results: dict = {}
    for ep in eps:
        groups = ParallelLayout(dp=world_size, ep=ep).build(num_experts=E)
        if rank == 0:
            results[("report", ep)] = groups.report(E)
        for name, kwargs in CASES.items():
            results[(ep, name)] = run_rank(
                kwargs, case_states[name], SIZES[world_size], rank, groups.ep_group
            )
        kwargs = CASES["top2_drop_buffer"]
        results[(ep, "equal_tokens")] = run_rank(
            kwargs, case_states["top2_drop_buffer"], EQUAL[world_size], rank, groups.ep_group, True
        )
    # Global scope on the 18-token batch of the 4-rank run, at ep=2 (rank sizes 8 and 10).
    if world_size == 2:
        name = "top1_drop_global"
        results["global18"] = run_rank(
            CASES[name], case_states[name], GLOBAL_18, rank, groups.ep_group
        )
    # A wrong layout fails on every rank, before any collective, with one line.
    messages = []
    for layout in (ParallelLayout(dp=world_size, ep=3), ParallelLayout(dp=world_size + 1, ep=1)):
        try:
            layout.build(num_experts=E)
        except ValueError as err:
            messages.append(str(err))
    results["layout_errors"] = messages
    # A collective that only some ranks join fails with the group named instead of hanging.
    if rank == 0:
        try:
            all_to_all(torch.zeros(world_size, 1), [1] * world_size, [1] * world_size, None,
                       timedelta(seconds=2))  # fmt: skip
        except CollectiveError as err:
            results["timeout"] = str(err)
    return to_bytes(results)


def to_bytes(value: object) -> bytes:
    """Tensors leave a child as bytes: shared-memory handles die with the child process."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def check_world(world_size: int, eps: list[int], tmp_path) -> None:
    case_states = states()
    raw = run_ranks(world_size, body, tmp_path, eps, case_states, timeout=600)
    results = [torch.load(io.BytesIO(r), weights_only=False) for r in raw]
    for ep in eps:
        for name, kwargs in CASES.items():
            label = f"world {world_size} ep {ep} {name}"
            expected = reference(kwargs, case_states[name], SIZES[world_size], ep)
            real = gather_ranks([r[(ep, name)] for r in results])
            assert_same_run(real, expected, label)
            assert_same_run(
                simulated(kwargs, case_states[name], SIZES[world_size], ep), real, label
            )
        if ep == world_size:  # global scope over all ranks: the drops of ep=1 (one process)
            for name in ("top1_drop_global", "top2_drop_global_prob", "top2_dropless_global"):
                real = gather_ranks([r[(ep, name)] for r in results])
                kept = one_process_kept(name, case_states[name], sum(SIZES[world_size]))
                assert torch.equal(real["kept"], kept), (world_size, ep, name)
        name = "top2_drop_buffer"
        expected = reference(CASES[name], case_states[name], EQUAL[world_size], ep)
        real = gather_ranks([r[(ep, "equal_tokens")] for r in results])
        assert_same_run(real, expected, f"world {world_size} ep {ep} equal_tokens")
        assert (
            f"expert-parallel groups: {ParallelLayout(world_size, ep).ep_group_ranks()}"
            in (results[0][("report", ep)])
        )
    for r in results:
        assert len(r["layout_errors"]) == 2 and all("\n" not in m for m in r["layout_errors"])
        assert r["layout_errors"] == results[0]["layout_errors"]
    assert "parallel.ep (3) must divide the data-parallel degree" in results[0]["layout_errors"][0]
    assert "does not match the world size" in results[0]["layout_errors"][1]
    if world_size == 2:  # ep=2 drops on the 18-token batch equal ep=1's (and ep=4's, below)
        name = "top1_drop_global"
        real = gather_ranks([r["global18"] for r in results])
        kept = one_process_kept(name, case_states[name], 18)
        assert not kept.all() and torch.equal(real["kept"], kept)
        assert_same_run(real, reference(CASES[name], case_states[name], GLOBAL_18, 2), "global18")
    assert "all_to_all_single over group 'default'" in results[0]["timeout"]
    assert f"global ranks {list(range(world_size))}" in results[0]["timeout"]


@pytest.mark.slow
def test_ep2_equals_one_process(tmp_path):
    check_world(2, [2], tmp_path)


@pytest.mark.slow
def test_ep4_and_dp4_ep2_equal_one_process(tmp_path):
    check_world(4, [4, 2], tmp_path)


def test_global_scope_drops_match_at_ep_1_2_4():
    """With global scope the real dispatcher's slots come from ``group_slots`` on the group's
    tokens; here: the same slots as one process for the sizes used above (no spawn)."""
    layer = make_layer(top_k=1, capacity_factor=1.0)
    x, _ = make_batch(SIZES[4])
    from moe.simulate import SimulatedDispatcher

    with torch.no_grad():
        single = route(layer.router.logits(x), top_k=1, capacity_factor=1.0, min_capacity=1)
        for ep in (1, 2, 4):
            routing = SimulatedDispatcher(
                ep, capacity_scope="global", tokens_per_rank=None if ep == 1 else
                ([12, 6] if ep == 2 else SIZES[4])
            ).route(layer.router, x)  # fmt: skip
            assert torch.equal(routing.slot, single.slot), ep
