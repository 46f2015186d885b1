"""Tensor parallelism of the FFN layers (moe/tensor_parallel.py) equals one process.

Cheap: the config checks' one-line messages, no-op without a group, the expert marker and
parameter counts, the swiglu gate/up reordering. Slow (2 gloo ranks, fp32, one spawn per
family): DenseFFN relu/gelu/swiglu at tp=2 and a whole small Transformer (dense and MoE
blocks; attention split by its own ``parallelize`` when it has one); MoELayer at tp=2 (top-1/top-2, dropless and
capacity factor 4.0, which drops nothing at these sizes; a swiglu shared expert); MoELayer at
tp=2 with ep=2 on the same ranks, and ep=2 through ``apply_expert_parallel(model, groups)``.
Each compares outputs, aux and z losses, counts and gradients with the unsplit layer on the
same input (atol 1e-5).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from moe.config import MoEConfig
from moe.expert_parallel import apply_expert_parallel, gather_expert_weights, shard_experts
from moe.experts import DenseFFN
from moe.layer import MoELayer
from moe.tensor_parallel import (
    TokenSplit,
    _interleave_gate_up,
    apply_tensor_parallel,
    check_tensor_parallel,
    check_token_rows,
)
from moe.transformer import AttentionConfig, ModelConfig, Transformer, count_parameters
from parallel.markers import expert_names, is_expert
from tests.dist import run_ranks

D, F_, E = 16, 32, 4
TOL = dict(rtol=1e-5, atol=1e-5)


def small_model(**moe_options) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(d_model=D, num_layers=2, num_heads=2, d_ff=F_, max_seq_len=16)
    moe = MoEConfig(num_experts=E, **moe_options)
    return Transformer(config, moe, AttentionConfig(), vocab_size=32)


# ---- cheap --------------------------------------------------------------------------------


def check(tp: int, *, heads: int = 4, d_ff: int = 64, **moe_options) -> None:
    model = ModelConfig(d_model=32, num_heads=heads, d_ff=d_ff, num_layers=2)
    moe = MoEConfig(num_experts=4, **moe_options) if moe_options != {"dense": True} else None
    check_tensor_parallel(model, moe, AttentionConfig(), tp)


@pytest.mark.parametrize(
    "tp, kwargs, message",
    [
        (3, {}, "model.num_heads (4) must be divisible by parallel.tp (3)"),
        (4, {"d_ff": 30}, "model.d_ff (30) must be divisible by parallel.tp (4)"),
        (4, {"d_ff": 30, "dense": True}, "model.d_ff (30) must be divisible by parallel.tp (4)"),
        (2, {"router": "expert_choice"}, "moe.router 'expert_choice' cannot run under parallel"),
        (2, {"simulate_ep": 2}, "moe.simulate_ep (2) must be 1 under parallel.tp (2)"),
        (0, {}, "parallel.tp must be a positive integer, got 0"),
    ],
)
def test_check_tensor_parallel_messages(tp: int, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        check(tp, **kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_check_tensor_parallel_accepts() -> None:
    check(1, heads=3, d_ff=7, router="expert_choice")  # tp=1 splits nothing
    check(2)
    check(4, d_ff=30, every=1)  # every FFN is MoE: experts are not split by TP, d_ff is free
    with pytest.raises(ValueError, match="model.d_ff"):
        check(4, d_ff=30, every=1, shared_expert=True)  # the shared expert is split


def test_apply_without_group_is_a_no_op() -> None:
    model = small_model(shared_expert=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_tensor_parallel(model, None) == 0
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(m.fc1) is torch.nn.Linear for m in model.modules() if isinstance(m, DenseFFN))


def test_expert_marker_and_counts() -> None:
    model = small_model(activation="swiglu", shared_expert=True)
    by_name = [n for n, _ in model.named_parameters() if ".experts.w" in n]
    assert by_name and expert_names(model) == by_name
    assert sorted(gather_expert_weights(model)) == sorted(by_name)
    counts = count_parameters(model)
    expected = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert counts["expert"] == expected > 0
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    # shared experts and routers are dense
    assert not any(is_expert(p) for n, p in model.named_parameters() if "shared" in n)


def test_row_split_without_group_and_uneven_rows() -> None:
    x = torch.randn(6, 3)
    split = TokenSplit(None)
    assert split.scatter(x) is x and split.gather(x) is x
    with pytest.raises(ValueError, match=r"15 tokens .* parallel.tp \(2\)"):
        check_token_rows(15, 2)


def test_swiglu_reorder_keeps_gate_up_pairs() -> None:
    torch.manual_seed(0)
    fc1 = torch.nn.Linear(8, 2 * 12)
    tp, block = 3, 12 // 3
    reordered = _interleave_gate_up(fc1, tp)
    for r in range(tp):
        mine = reordered.weight[r * 2 * block : (r + 1) * 2 * block]
        gate, up = mine.chunk(2)
        assert torch.equal(gate, fc1.weight[r * block : (r + 1) * block])
        assert torch.equal(up, fc1.weight[12 + r * block : 12 + (r + 1) * block])
        bias_gate, bias_up = reordered.bias[r * 2 * block : (r + 1) * 2 * block].chunk(2)
        assert torch.equal(bias_up, fc1.bias[12 + r * block : 12 + (r + 1) * block])
        assert torch.equal(bias_gate, fc1.bias[r * block : (r + 1) * block])


# ---- slow: 2 gloo ranks -------------------------------------------------------------------


def _inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen)
    weight = torch.randn(*shape, generator=gen)  # makes every output element's gradient differ
    return x, weight


def _swiglu_rows(full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rows of swiglu's full fc1 [2F, ...] that rank ``rank`` holds: its gate then its up."""
    gate, up = full.chunk(2)
    block = gate.shape[0] // tp
    own = slice(rank * block, (rank + 1) * block)
    return torch.cat([gate[own], up[own]])


def dense_body(rank: int, world_size: int) -> None:
    group = dist.group.WORLD
    for activation in ("relu", "gelu", "swiglu"):
        torch.manual_seed(0)
        ffn = DenseFFN(D, F_, activation)
        ref = copy.deepcopy(ffn)
        assert apply_tensor_parallel(ffn, group) == 1
        x, weight = _inputs((2, 8, D))
        outs = []
        for module in (ffn, ref):
            xi = x.clone().requires_grad_()
            y = module(xi)
            (y * weight).sum().backward()
            outs.append((y, xi.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0], **TOL)
        torch.testing.assert_close(outs[0][1], outs[1][1], **TOL)
        width = ffn.fc1.weight.shape[0]
        for name in ("weight", "bias"):
            full = getattr(ref.fc1, name).grad
            want = (
                _swiglu_rows(full, world_size, rank)
                if activation == "swiglu"
                else full[rank * width : (rank + 1) * width]
            )
            torch.testing.assert_close(getattr(ffn.fc1, name).grad, want, **TOL)
        cols = F_ // world_size
        want = ref.fc2.weight.grad[:, rank * cols : (rank + 1) * cols]
        torch.testing.assert_close(ffn.fc2.weight.grad, want, **TOL)
        torch.testing.assert_close(ffn.fc2.bias.grad, ref.fc2.bias.grad, **TOL)
        assert ffn.fc1.weight.tensor_model_parallel
        assert ffn.fc1.weight.partition_stride == (2 if activation == "swiglu" else 1)
    model_body(group)


def model_body(group) -> None:
    """A whole Transformer (block 0 dense swiglu, block 1 MoE top-2 with a shared expert)."""
    model = small_model(top_k=2, capacity_factor=None, activation="swiglu", shared_expert=True)
    ref = copy.deepcopy(model)
    # attention (when it can split heads), the dense FFN and the MoE layer
    assert apply_tensor_parallel(model, group) >= 2
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 32, (2, 8), generator=gen)
    targets = torch.randint(0, 32, (2, 8), generator=gen)
    got, want = model(ids, targets=targets), ref(ids, targets=targets)
    for key in ("logits", "loss", "aux_loss", "z_loss"):
        torch.testing.assert_close(getattr(got, key), getattr(want, key), **TOL, msg=key)
    assert torch.equal(got.routing[0].tokens_per_expert, want.routing[0].tokens_per_expert)
    got.loss.backward()
    want.loss.backward()
    full = dict(ref.named_parameters())
    compared = 0
    for name, param in model.named_parameters():
        if name not in full:  # a shard under a new name (the attention's own cut)
            assert getattr(param, "tensor_model_parallel", False), name
            continue
        if is_expert(param):
            total = param.grad.clone()
            dist.all_reduce(total)  # each TP rank's experts saw only its rows
            torch.testing.assert_close(total, full[name].grad, **TOL, msg=name)
            compared += 1
        elif not getattr(param, "tensor_model_parallel", False):
            # replicated: embedding, norms, router, row-parallel biases
            torch.testing.assert_close(param.grad, full[name].grad, **TOL, msg=name)
            compared += 1
    assert compared >= 10, compared


@pytest.mark.slow
def test_dense_ffn_and_model_tp2_equal_full(tmp_path) -> None:
    run_ranks(2, dense_body, tmp_path, timeout=120)


MOE_CASES = {
    "top1_dropless": dict(top_k=1, capacity_factor=None),
    "top1_cf4": dict(top_k=1, capacity_factor=4.0),
    "top2_dropless": dict(top_k=2, capacity_factor=None),
    "top2_cf4_swiglu_shared": dict(
        top_k=2, capacity_factor=4.0, activation="swiglu", shared_expert=True
    ),
}


def _run_layer(layer: MoELayer, x: torch.Tensor, weight: torch.Tensor) -> dict:
    xi = x.clone().requires_grad_()
    out = layer(xi)
    loss = (out.output * weight).sum() + 0.5 * out.aux_loss + 0.1 * out.z_loss
    loss.backward()
    return {
        "output": out.output.detach(),
        "aux": out.aux_loss.detach(),
        "z": out.z_loss.detach(),
        "tokens_per_expert": out.tokens_per_expert,
        "dropped": out.dropped_fraction,
        "entropy": out.router_entropy,
        "x_grad": xi.grad,
        "router_grad": layer.router.weight.grad,
        "capacity": out.capacity,
    }


def _assert_same_run(got: dict, want: dict) -> None:
    for key in ("output", "aux", "z", "dropped", "entropy", "x_grad", "router_grad"):
        torch.testing.assert_close(got[key], want[key], **TOL, msg=key)
    assert torch.equal(got["tokens_per_expert"], want["tokens_per_expert"])


def _layer_pair(kwargs: dict) -> tuple[MoELayer, MoELayer]:
    torch.manual_seed(0)
    layer = MoELayer(D, F_, E, expert_layout="grouped", **kwargs)
    return layer, copy.deepcopy(layer)


def moe_body(rank: int, world_size: int) -> None:
    group = dist.group.WORLD
    x, weight = _inputs((2, 8, D))
    for name, kwargs in MOE_CASES.items():
        layer, ref = _layer_pair(kwargs)
        changed = apply_tensor_parallel(layer, group)
        assert changed == 1, name  # the shared expert goes with its layer
        got, want = _run_layer(layer, x, weight), _run_layer(ref, x, weight)
        _assert_same_run(got, want)
        assert float(want["dropped"]) == 0.0, name
        # slots summed over the TP ranks: with a factor, each has half the rows and half of
        # tp=1's slots; dropless, each has its own fullest expert
        mine = torch.tensor([layer.router(layer.token_split.scatter(x.view(-1, D))).capacity])
        dist.all_reduce(mine)
        assert got["capacity"] == int(mine), name
        if kwargs["capacity_factor"] is not None:
            assert got["capacity"] == want["capacity"], name
        # Experts are replicated over TP (ep=1) and saw only this rank's rows: their summed
        # gradients are the full ones (DeepSpeed sums them over the expert-data-parallel group).
        for w in ("w1", "w2", "w3"):
            param = getattr(layer.experts, w)
            if param is None:
                continue
            total = param.grad.clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total, getattr(ref.experts, w).grad, **TOL, msg=w)
        if layer.shared_expert is not None:
            own = _swiglu_rows(ref.shared_expert.fc1.weight.grad, world_size, rank)
            torch.testing.assert_close(layer.shared_expert.fc1.weight.grad, own, **TOL)
    # Uneven rows fail on every rank with one line, before any collective.
    layer, _ = _layer_pair(MOE_CASES["top1_dropless"])
    apply_tensor_parallel(layer, group)
    with pytest.raises(ValueError, match=r"15 tokens"):
        layer(torch.randn(3, 5, D))
    with pytest.raises(ValueError, match="already tensor-parallel"):
        apply_tensor_parallel(layer, group)
    torch.manual_seed(0)
    chooser = MoELayer(D, F_, E, router="expert_choice", capacity_factor=1.0)
    with pytest.raises(ValueError, match="moe.router 'expert_choice' cannot run under parallel"):
        apply_tensor_parallel(chooser, group)


@pytest.mark.slow
def test_moe_layer_tp2_equals_tp1(tmp_path) -> None:
    run_ranks(2, moe_body, tmp_path, timeout=120)


def moe_ep_body(rank: int, world_size: int) -> None:
    group = dist.group.WORLD
    x, weight = _inputs((2, 8, D))
    local = E // world_size
    own = slice(rank * local, (rank + 1) * local)
    # tp=2 and ep=2 on the same two ranks: each routes half the rows, holds half the experts.
    for name in ("top1_cf4", "top2_dropless", "top2_cf4_swiglu_shared"):
        layer, ref = _layer_pair(MOE_CASES[name])
        apply_tensor_parallel(layer, group)
        shard_experts(layer, group)
        got, want = _run_layer(layer, x, weight), _run_layer(ref, x, weight)
        _assert_same_run(got, want)
        for w in ("w1", "w2", "w3"):
            param = getattr(layer.experts, w)
            if param is not None:
                assert is_expert(param)
                torch.testing.assert_close(param.grad, getattr(ref.experts, w).grad[own], **TOL)
    # ep=2 at tp=1 through the trainer's hook with the run's groups: both ranks route the same
    # batch here, so each expert's gradient is twice the one-process one.
    from parallel.layout import ParallelLayout

    groups = ParallelLayout(dp=world_size, ep=world_size).build(num_experts=E)
    torch.manual_seed(0)
    layer = MoELayer(D, F_, E, top_k=2, capacity_factor=None)
    ref = copy.deepcopy(layer)
    assert apply_expert_parallel(layer, groups) is groups
    assert expert_names(layer) == ["experts.w1", "experts.w2"]
    got, want = _run_layer(layer, x, weight), _run_layer(ref, x, weight)
    torch.testing.assert_close(got["output"], want["output"], **TOL)
    torch.testing.assert_close(layer.experts.w1.grad, 2 * ref.experts.w1.grad[own], **TOL)
    one = ParallelLayout(dp=world_size, ep=1).build(num_experts=E)
    assert apply_expert_parallel(copy.deepcopy(ref), one) is None


@pytest.mark.slow
def test_moe_layer_tp2_ep2_equals_one_process(tmp_path) -> None:
    run_ranks(2, moe_ep_body, tmp_path, timeout=120)
