"""Routing pinned by hand-worked examples and the published loss formulas."""

import math

import pytest
import torch

from moe.losses import load_balancing_loss, router_z_loss
from moe.router import (
    TopKRouter,
    choose_experts,
    compute_capacity,
    expert_choice_route,
    expert_softmax,
    route,
)
from tests.moe.reference import naive_route


def logits_for(choices: list[int], num_experts: int, strength: float = 4.0) -> torch.Tensor:
    """Logits whose argmax per token is the given expert."""
    logits = torch.zeros(len(choices), num_experts)
    logits[torch.arange(len(choices)), torch.tensor(choices)] = strength
    return logits


def test_capacity_arithmetic():
    assert compute_capacity(16, 4, 1, 1.0, 0) == 4
    assert compute_capacity(10, 4, 1, 1.0, 0) == 3  # ceil(2.5)
    assert compute_capacity(10, 4, 2, 1.25, 0) == 7  # ceil(6.25)
    assert compute_capacity(8, 4, 1, 1.0, 4) == 4  # min_capacity wins over 2
    assert compute_capacity(4096, 8, 1, 1.25, 4) == 640


def test_sequence_priority_drops_later_tokens():
    # 6 tokens, 2 experts, capacity = ceil(1.0 * 6 / 2) = 3; expert 0 wanted by 5 tokens.
    r = route(logits_for([0, 0, 1, 0, 0, 0], 2), top_k=1, capacity_factor=1.0, min_capacity=0)
    assert r.capacity == 3
    assert r.slot[:, 0].tolist() == [0, 1, 0, 2, -1, -1]
    assert r.tokens_per_expert.tolist() == [3, 1]
    assert r.dropped_fraction == pytest.approx(2 / 6)
    assert (r.gate[4:] == 0).all() and (r.gate[:4] > 0).all()


def test_probability_priority_keeps_highest_gates():
    logits = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [4.0, 0.0]])
    # capacity = max(ceil(0.5 * 4 / 2), 0) = 1: expert 0 keeps only its most confident token.
    r = route(logits, top_k=1, capacity_factor=0.5, min_capacity=0, priority="probability")
    assert r.slot[:, 0].tolist() == [-1, -1, -1, 0]
    r = route(logits, top_k=1, capacity_factor=1.0, min_capacity=0, priority="probability")
    assert r.slot[:, 0].tolist() == [-1, 1, -1, 0]


def test_top2_places_first_choices_before_second_choices():
    # Token 0's second choice is expert 1; tokens 1 and 2 choose expert 1 first.
    logits = torch.tensor([[5.0, 4.0, 0.0], [0.0, 5.0, 4.0], [0.0, 5.0, 4.0]])
    r = route(logits, top_k=2, capacity_factor=2 / 3, min_capacity=0)  # C = ceil(2/3*3*2/3) = 2
    assert r.capacity == 2
    assert r.expert_index.tolist() == [[0, 1], [1, 2], [1, 2]]
    # expert 1: first choices of tokens 1, 2 take slots 0, 1; token 0's second choice drops.
    assert r.slot.tolist() == [[0, -1], [0, 0], [1, 1]]
    gate_01 = torch.softmax(logits[0], -1)[:2]
    assert r.gate[0, 0].item() == pytest.approx((gate_01[0] / gate_01.sum()).item(), rel=1e-6)
    assert r.gate[0, 1].item() == 0.0


def test_dropless_keeps_everything_and_capacity_is_largest_count():
    r = route(logits_for([0, 0, 0, 0, 1], 3), top_k=1, capacity_factor=None)
    assert r.capacity == 4 and r.dropped_fraction == 0.0
    assert r.tokens_per_expert.tolist() == [4, 1, 0]
    r0 = route(logits_for([0, 0, 0, 0, 1], 3), top_k=1, capacity_factor=0)
    assert torch.equal(r0.slot, r.slot)


def test_min_capacity():
    r = route(logits_for([0] * 5, 4), top_k=1, capacity_factor=0.1, min_capacity=4)
    assert r.capacity == 4
    assert r.slot[:, 0].tolist() == [0, 1, 2, 3, -1]


def test_eval_capacity_factor_used_in_eval_mode():
    router = TopKRouter(4, 2, capacity_factor=0.5, eval_capacity_factor=2.0, min_capacity=0)
    x = torch.randn(8, 4)
    assert router.train()(x).capacity == 2  # ceil(0.5 * 8 / 2)
    assert router.eval()(x).capacity == 8  # ceil(2.0 * 8 / 2)


def test_expert_choice_each_expert_takes_its_top_tokens():
    logits = torch.tensor([[4.0, 0.0], [3.0, 1.0], [0.0, 4.0], [2.0, 0.5]])
    r = expert_choice_route(logits, capacity_factor=1.0, min_capacity=0)  # C = 2
    probs = torch.softmax(logits, -1)
    assert r.capacity == 2
    assert r.slot[:, 0].tolist() == [0, 1, -1, -1]  # expert 0: tokens 0 (best), 1
    top_e1 = torch.argsort(probs[:, 1], descending=True)[:2].tolist()
    assert [t for t in range(4) if r.slot[t, 1] >= 0] == sorted(top_e1)
    assert r.gate[0, 0].item() == pytest.approx(probs[0, 0].item())
    assert r.dropped_fraction == 0.0  # every token taken by one expert
    assert r.aux_loss.item() == 0.0
    # Both experts prefer token 0 and C = 1: tokens 1 and 2 are taken by nobody.
    same = torch.tensor([[4.0, 4.1], [3.0, 3.1], [0.0, 0.1]])
    r = expert_choice_route(same, capacity_factor=2 / 3, min_capacity=0)
    assert r.capacity == 1 and r.slot.tolist() == [[0, 0], [-1, -1], [-1, -1]]
    assert r.dropped_fraction == pytest.approx(2 / 3)


def test_aux_loss_matches_switch_formula():
    torch.manual_seed(0)
    logits = torch.randn(32, 4)
    r = route(logits, top_k=2, capacity_factor=1.0)
    probs = torch.softmax(logits, -1)
    first = probs.argmax(-1)
    expected = 4 * sum((first == e).float().mean() * probs[:, e].mean() for e in range(4))
    assert r.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    uniform = load_balancing_loss(torch.full((8, 4), 0.25), torch.arange(8) % 4)
    assert uniform.item() == pytest.approx(1.0)


def test_z_loss_matches_st_moe_formula():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2.0) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    assert route(logits, top_k=1, capacity_factor=1.0).z_loss.item() == pytest.approx(
        expected, rel=1e-6
    )


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("priority", ["sequence", "probability"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25, None])
def test_vectorised_routing_equals_naive_loop(top_k, priority, capacity_factor):
    torch.manual_seed(top_k * 7 + len(priority))
    logits = torch.randn(37, 5, dtype=torch.float64)
    r = route(
        logits, top_k=top_k, capacity_factor=capacity_factor, min_capacity=2, priority=priority
    )
    choices, gates, slots, capacity = naive_route(logits, top_k, capacity_factor, 2, priority)
    assert r.capacity == capacity
    assert r.expert_index.tolist() == choices
    assert r.slot.tolist() == slots
    kept = torch.tensor(slots) >= 0
    expected_gate = (
        torch.tensor([[g.item() for g in row] for row in gates], dtype=torch.float64) * kept
    )
    torch.testing.assert_close(r.gate.double(), expected_gate, atol=1e-6, rtol=1e-6)
    assert r.tokens_per_expert.sum().item() == int(kept.sum())


def test_routing_math_is_fp32_for_bf16_logits():
    r = route(torch.randn(8, 4, dtype=torch.bfloat16), top_k=1, capacity_factor=1.0)
    assert r.gate.dtype == r.aux_loss.dtype == r.z_loss.dtype == r.probs.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(top_k=5, capacity_factor=1.0),
            r"top_k \(5\) must be between 1 and num_experts \(4\)",
        ),
        (dict(top_k=1, capacity_factor=-1.0), r"capacity_factor must be >= 0"),
        (dict(top_k=1, capacity_factor=1.0, priority="random"), r"priority must be one of"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        route(torch.randn(3, 4), **kwargs)


@pytest.mark.parametrize("num_experts", [2, 8, 15, 16, 64])
def test_expert_softmax_equals_softmax_with_its_gradient(num_experts):
    """The CPU layout trick for few experts changes neither values nor gradients."""
    torch.manual_seed(0)
    logits = torch.randn(37, num_experts, requires_grad=True)
    weights = torch.randn(37, num_experts)
    probs = expert_softmax(logits)
    assert probs.is_contiguous() and probs.shape == (37, num_experts)
    (grad,) = torch.autograd.grad((probs * weights).sum(), logits)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = torch.softmax(ref_logits, dim=-1)
    (ref_grad,) = torch.autograd.grad((ref * weights.double()).sum(), ref_logits)
    torch.testing.assert_close(probs.double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("num_experts", [8, 64])
def test_z_loss_layouts_agree_with_float64(num_experts):
    torch.manual_seed(1)
    logits = torch.randn(29, num_experts, requires_grad=True)
    (grad,) = torch.autograd.grad(router_z_loss(logits), logits)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = torch.logsumexp(ref_logits, dim=-1).square().mean()
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    torch.testing.assert_close(router_z_loss(logits).double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-6)


def test_choose_experts_top1_is_topk_and_breaks_ties_by_lowest_id():
    torch.manual_seed(0)
    logits = torch.randn(50, 8)
    probs, top_probs, index, gate = choose_experts(logits, 1)
    want_probs, want_index = torch.topk(torch.softmax(logits, -1), 1, dim=-1)
    assert torch.equal(index, want_index)
    torch.testing.assert_close(top_probs, want_probs)
    assert gate is top_probs and index.shape == (50, 1)
    tied = torch.tensor([[0.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    assert choose_experts(tied, 1)[2].view(-1).tolist() == [1, 0]
    _, top2, index2, gate2 = choose_experts(logits, 2)
    torch.testing.assert_close(gate2, top2 / top2.sum(-1, keepdim=True))
    assert torch.equal(index2, torch.topk(logits, 2, dim=-1).indices)
