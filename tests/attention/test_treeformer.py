"""Treeformer (TF / TC tree attention) against float64 oracles (attention_spec.md §8)."""

from __future__ import annotations

import pytest
import torch

import attention
import attention.treeformer as treeformer_module
from attention.treeformer import NodeSums, StraightThroughStep
from tests.attention.probes import dense_softmax_oracle, padding_probe

D, H = 16, 2


def build(**options):
    torch.manual_seed(0)
    return attention.build("treeformer", d_model=D, num_heads=H, **options).double().eval()


def inputs(batch=2, n=40, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, D, generator=generator, dtype=torch.float64)


def padding_mask(batch, n, lengths):
    mask = torch.zeros(batch, n, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, :length] = True
    return mask


def routes(module, x, mask=None):
    """q, k, v, per-sequence heights and the two routings the module uses for x."""
    q, k, v = module.project(x)
    heights = module.tree_heights(mask, x.shape[1], x.shape[0])
    query_route, key_route = module.route_queries_keys(q, k, heights)
    return q, k, v, heights, query_route, key_route


def finish(module, y_heads, mask):
    """Output projection and zeroed pads, as the module does after attention."""
    y = module.out(module.merge_heads(y_heads))
    return y if mask is None else y * mask.unsqueeze(-1)


@pytest.mark.parametrize("with_mask", [False, True])
def test_height_zero_tf_is_full_attention(with_mask):
    module = build(height=0)
    full = attention.build("full", d_model=D, num_heads=H).double().eval()
    full.load_state_dict(
        {
            "qkv.weight": module.qkv.weight,
            "qkv.bias": module.qkv.bias,
            "out.weight": module.out.weight,
            "out.bias": module.out.bias,
        }
    )
    x = inputs()
    mask = padding_mask(2, 40, [40, 29]) if with_mask else None
    y, _ = module(x, key_padding_mask=mask)
    y_full, _ = full(x, key_padding_mask=mask)
    assert torch.allclose(y, y_full, atol=1e-10, rtol=0), (y - y_full).abs().max()


def test_hyperplanes_sending_everything_to_one_leaf_give_full_attention():
    module = build(height=3, leaf_size=None, query_block=8)
    with torch.no_grad():  # w = 0, b = 1: every query and key goes right at every node
        module.hyperplanes.zero_()
        module.offsets.fill_(1.0)
    full = attention.build("full", d_model=D, num_heads=H).double().eval()
    full.load_state_dict({k: p for k, p in module.state_dict().items() if k[:3] in ("qkv", "out")})
    x = inputs()
    assert torch.allclose(module(x)[0], full(x)[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("aggregate", ["mean", "sum"])
def test_height_zero_tc_is_root_aggregate(aggregate):
    module = build(mode="tc", height=0, tc_aggregate=aggregate)
    x = inputs()
    mask = padding_mask(2, 40, [40, 23])
    y, _ = module(x, key_padding_mask=mask)
    _, _, v = module.project(x)
    keep = mask[:, None, :, None].double()
    root = (v * keep).sum(2, keepdim=True)
    if aggregate == "mean":
        root = root / keep.sum(2, keepdim=True)
    expected = finish(module, root.expand_as(v), mask)
    assert torch.allclose(y, expected, atol=1e-10, rtol=0), (y - expected).abs().max()


@pytest.mark.parametrize("shared_tree", [True, False])
def test_tf_matches_dense_same_leaf_oracle(shared_tree):
    module = build(height=3, leaf_size=None, shared_tree=shared_tree, query_block=8)
    x = inputs(n=40)
    mask = padding_mask(2, 40, [40, 31])
    y, _ = module(x, key_padding_mask=mask)
    q, k, v, heights, query_route, key_route = routes(module, x, mask)
    assert heights == [3, 3]
    leaf_q = query_route.leaf.view(2, H, 40)
    leaf_k = key_route.leaf.view(2, H, 40)
    assert len(leaf_k.unique()) > 2, "the tree should spread the keys over several leaves"
    allowed = (leaf_q.unsqueeze(-1) == leaf_k.unsqueeze(-2)) & mask[:, None, None, :]
    expected = finish(module, dense_softmax_oracle(q, k, v, allowed=allowed), mask)
    assert torch.allclose(y, expected, atol=1e-10, rtol=0), (y - expected).abs().max()


def test_tc_matches_loop_oracle():
    module = build(mode="tc", height=3, leaf_size=None)
    n = 24
    x = inputs(n=n)
    mask = padding_mask(2, n, [n, 17])
    y, _ = module(x, key_padding_mask=mask)
    q, k, v, _, query_route, key_route = routes(module, x, mask)
    q, k, v = (t.reshape(2 * H, n, D // H) for t in (q, k, v))
    valid = mask.repeat_interleave(H, dim=0)
    out = torch.zeros_like(q)
    for row in range(2 * H):
        for i in range(n):
            scores, values = [], []
            for node in query_route.nodes[row, i].tolist():
                members = [j for j in range(n) if valid[row, j] and node in key_route.nodes[row, j]]
                if members:
                    scores.append(q[row, i] @ k[row, members].mean(0) / (D // H) ** 0.5)
                    values.append(v[row, members].mean(0))
            probs = torch.softmax(torch.stack(scores), 0)
            out[row, i] = (probs[:, None] * torch.stack(values)).sum(0)
    expected = finish(module, out.view(2, H, n, D // H), mask)
    assert torch.allclose(y, expected, atol=1e-10, rtol=0), (y - expected).abs().max()


@pytest.mark.parametrize("mode", ["tf", "tc"])
def test_padding_probe(mode):
    module = build(mode=mode, leaf_size=4, query_block=4)
    padding_probe(module, inputs(n=24), length=17)


@pytest.mark.parametrize("mode", ["tf", "tc"])
def test_permutation_equivariance(mode):
    module = build(mode=mode, height=2, leaf_size=None, query_block=4)
    x = inputs(n=20)
    permutation = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    y, _ = module(x)
    y_permuted, _ = module(x[:, permutation])
    assert torch.allclose(y[:, permutation], y_permuted, atol=1e-12, rtol=0)


def gated_node_sums(x, gates, nodes):
    """Σ_j g_jl x_j per node, directly: [R, n, c], [R, n, L], [R, n, L] -> [R, 2^L - 1, c]."""
    rows, n, channels = x.shape
    levels = nodes.shape[-1]
    src = (x.unsqueeze(2) * gates.unsqueeze(-1)).reshape(rows, n * levels, channels)
    index = nodes.reshape(rows, n * levels, 1).expand(-1, -1, channels)
    total = torch.zeros(rows, 2**levels - 1, channels, dtype=x.dtype)
    return total.scatter_add(1, index, src)


def test_node_sums_equal_gated_scatter():
    rows, n, channels, levels = 3, 11, 4, 4
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(rows, n, channels, dtype=torch.float64, generator=generator)
    bits = torch.randint(0, 2, (rows, n, levels - 1), generator=generator)
    node = torch.zeros(rows, n, dtype=torch.long)
    nodes = [node]
    for level in range(levels - 1):
        node = 2 * node + 1 + bits[..., level]
        nodes.append(node)
    nodes = torch.stack(nodes, -1)
    gates = torch.ones(rows, n, levels, dtype=torch.float64)
    x1, g1 = x.clone().requires_grad_(), gates.clone().requires_grad_()
    x2, g2 = x.clone().requires_grad_(), gates.clone().requires_grad_()
    fast = NodeSums.apply(x1, g1, nodes)
    direct = gated_node_sums(x2, g2, nodes)
    assert torch.allclose(fast, direct, atol=1e-12, rtol=0)
    weight = torch.randn(fast.shape, dtype=torch.float64, generator=generator)
    (fast * weight).sum().backward()
    (direct * weight).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-12, rtol=0)
    assert torch.allclose(g1.grad, g2.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["tf", "tc"])
def test_straight_through_gradient_matches_surrogate_finite_difference(mode, monkeypatch):
    """The STE gradient on the hyperplanes equals the finite difference of the surrogate
    model whose decision is hard(s) + sigmoid(s/τ) - sigmoid(s0/τ) (s0: scores at w0)."""
    module = build(mode=mode, height=2, leaf_size=None, query_block=4, temperature=0.5)
    x = inputs(n=16)
    weight = torch.randn(2, 16, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    y, _ = module(x)
    (y * weight).sum().backward()
    grads = [module.hyperplanes.grad.clone(), module.offsets.grad.clone()]
    assert all(g.abs().sum() > 0 for g in grads), "no gradient reached the routing hyperplanes"

    recorded: list[torch.Tensor] = []
    original = StraightThroughStep.apply

    def recording(scores, temperature):
        recorded.append(scores.detach().clone())
        return original(scores, temperature)

    monkeypatch.setattr(treeformer_module.StraightThroughStep, "apply", recording)
    with torch.no_grad():
        module(x)
    base_scores = list(recorded)

    def surrogate_loss() -> float:
        calls = iter(base_scores)

        def surrogate(scores, temperature):
            base = next(calls)
            assert torch.equal(scores > 0, base > 0), "a decision flipped; use a smaller step"
            hard = (scores > 0).to(scores.dtype)
            return hard + torch.sigmoid(scores / temperature) - torch.sigmoid(base / temperature)

        monkeypatch.setattr(treeformer_module.StraightThroughStep, "apply", surrogate)
        with torch.no_grad():
            out, _ = module(x)
        return (out * weight).sum().item()

    # NodeSums' forward assumes gates of exactly 1; the surrogate's are not, so the surrogate
    # model uses the gated sum it stands for (checked equal in the test above).
    monkeypatch.setattr(treeformer_module.NodeSums, "apply", gated_node_sums)
    generator = torch.Generator().manual_seed(11)
    for parameter, grad in zip((module.hyperplanes, module.offsets), grads):
        direction = torch.randn(parameter.shape, dtype=torch.float64, generator=generator)
        step = 1e-6
        with torch.no_grad():
            parameter.add_(step * direction)
            plus = surrogate_loss()
            parameter.sub_(2 * step * direction)
            minus = surrogate_loss()
            parameter.add_(step * direction)
        numeric = (plus - minus) / (2 * step)
        analytic = (grad * direction).sum().item()
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)


@pytest.mark.parametrize("mode", ["tf", "tc"])
def test_gradcheck_with_sharp_surrogate(mode):
    # With a tiny τ the surrogate derivative vanishes away from the hyperplanes, so the
    # analytic gradient is the exact gradient of the piecewise-smooth attention.
    module = build(mode=mode, height=1, leaf_size=None, query_block=4, temperature=1e-6)
    x = inputs(batch=1, n=8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: module(t)[0], (x,), eps=1e-7, atol=1e-6)


def test_bootstrap_schedule_and_set_height():
    module = build(height=3, leaf_size=None, bootstrap_dense_steps=10, bootstrap_grow_every=5)
    heights = []
    for step in (0, 9, 10, 14, 15, 20, 1000):
        module.set_training_step(step)
        heights.append(module.height)
    assert heights == [0, 0, 1, 1, 2, 3, 3]
    module.set_training_step(0)
    full = attention.build("full", d_model=D, num_heads=H).double().eval()
    full.load_state_dict(
        {name: p for name, p in module.state_dict().items() if name[:3] in ("qkv", "out")}
    )
    x = inputs()
    assert torch.allclose(module(x)[0], full(x)[0], atol=1e-10, rtol=0)
    module.set_height(2)
    assert module.tree_heights(None, 40, 2) == [2, 2]
    with pytest.raises(ValueError, match="height"):
        module.set_height(11)


def test_adaptive_height_follows_real_length():
    module = build(leaf_size=8, max_height=4)
    mask = padding_mask(3, 100, [100, 9, 3])
    assert module.tree_heights(mask, 100, 3) == [4, 1, 0]


def test_options_and_causal_are_validated():
    with pytest.raises(ValueError):
        attention.build("treeformer", d_model=D, num_heads=H, mode="fine")
    with pytest.raises(ValueError):
        attention.build("treeformer", d_model=D, num_heads=H, leaf_size=0)
    with pytest.raises(ValueError, match="max_height"):
        attention.build("treeformer", d_model=D, num_heads=H, height=5, max_height=3)
    with pytest.raises(ValueError, match="causal"):
        attention.build("treeformer", d_model=D, num_heads=H, causal=True)


@pytest.mark.parametrize("mode", ["tf", "tc"])
def test_bf16_runs_and_is_close_at_height_zero(mode):
    torch.manual_seed(0)
    module = attention.build("treeformer", d_model=D, num_heads=H, mode=mode, height=0)
    x = torch.randn(2, 32, D)
    y32, _ = module(x)
    y16, _ = module.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    error = (y16.float() - y32).norm() / y32.norm()
    assert error < 3e-2, error


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tf", "tc"])
def test_trains_in_tiny_moe_model(mode):
    from tests.attention.probes import train_tiny_model

    losses = train_tiny_model("treeformer", "masked_lm", mode=mode, height=2, leaf_size=None)
    assert losses[-1] < 0.3 * losses[0], f"loss did not fall: {losses[0]} -> {losses[-1]}"


@pytest.mark.parametrize("mode", ["tf", "tc"])
def test_gathered_deep_routing_equals_matmul_routing(mode, monkeypatch):
    """Levels below DENSE_ROUTING_LEVELS gather per-token hyperplanes; both paths agree."""
    module = build(mode=mode, height=3, leaf_size=None, query_block=4)
    x = inputs(n=24)
    y, _ = module(x)
    y.sum().backward()
    grad = module.hyperplanes.grad.clone()
    module.zero_grad()
    monkeypatch.setattr(treeformer_module, "DENSE_ROUTING_LEVELS", 1)
    y_gathered, _ = module(x)
    y_gathered.sum().backward()
    assert torch.allclose(y, y_gathered, atol=1e-12, rtol=0)
    assert torch.allclose(grad, module.hyperplanes.grad, atol=1e-12, rtol=0)


def test_tc_gathered_path_equals_gemm_path(monkeypatch):
    """TC scores deep trees by gathering each query's path; both paths agree."""
    module = build(mode="tc", height=3, leaf_size=None)
    x = inputs(n=24)
    mask = padding_mask(2, 24, [24, 15])
    y, _ = module(x, key_padding_mask=mask)
    y.sum().backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    monkeypatch.setattr(treeformer_module, "DENSE_PATH_NODES", 1)
    y_gathered, _ = module(x, key_padding_mask=mask)
    y_gathered.sum().backward()
    assert torch.allclose(y, y_gathered, atol=1e-12, rtol=0)
    for grad, parameter in zip(grads, module.parameters()):
        assert torch.allclose(grad, parameter.grad, atol=1e-12, rtol=0)
