"""MoELayer against a float64 naive loop; precision; argument errors."""

import pytest
import torch

from moe import MoELayer
from moe.experts import GroupedExperts, grouped_matmul
from tests.moe.reference import naive_moe

D, FF, E = 8, 16, 4


def make_inputs(seed: int, tokens: int = 23):
    torch.manual_seed(seed)
    x = torch.randn(tokens, D)
    x[:, 0] = x[:, 0].abs() + 1.0  # with router row 3 = -100 e_0, expert 3 is always last
    return x


def layer_and_reference(
    top_k, activation, capacity_factor, priority="sequence", layout="grouped", seed=0
):
    layer = MoELayer(
        D,
        FF,
        E,
        top_k=top_k,
        capacity_factor=capacity_factor,
        min_capacity=1,
        priority=priority,
        activation=activation,
        expert_layout=layout,
    )
    with torch.no_grad():
        layer.router.weight.mul_(20.0)  # sharper routing: fewer near-ties, real drops
        layer.router.weight[3] = 0.0
        layer.router.weight[3, 0] = -100.0
    x = make_inputs(seed)
    return layer, x


@pytest.mark.parametrize("layout", ["grouped", "buffer"])
@pytest.mark.parametrize("capacity_factor", [1.0, None])
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_output_and_gradients_equal_float64_naive_loop(top_k, activation, capacity_factor, layout):
    layer, x = layer_and_reference(top_k, activation, capacity_factor, layout=layout)
    x.requires_grad_(True)
    out = layer(x)
    assert out.tokens_per_expert[3].item() == 0, "expert 3 must receive no tokens"
    if capacity_factor == 1.0 and top_k == 1:
        assert out.dropped_fraction.item() > 0, "the dropping case must really drop"
    upstream = torch.randn_like(out.output)
    (out.output * upstream).sum().backward()

    params = {n: p.detach().double().requires_grad_(True) for n, p in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_(True)
    y64, slots = naive_moe(
        x64,
        params["router.weight"],
        params["experts.w1"],
        params["experts.w2"],
        params.get("experts.w3"),
        top_k=top_k,
        capacity_factor=capacity_factor,
        min_capacity=1,
        priority="sequence",
        activation=activation,
    )
    (y64 * upstream.double()).sum().backward()

    tol = dict(atol=2e-5, rtol=1e-4)  # fp32 layer vs float64 reference
    torch.testing.assert_close(out.output.double(), y64, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad.double(), params[name].grad, **tol, msg=name)
    assert layer.experts.w1.grad[3].abs().max() == 0  # idle expert: zero gradient


def test_probability_priority_equals_naive_loop():
    layer, x = layer_and_reference(2, "relu", 0.6, priority="probability")
    out = layer(x)
    w = {n: p.detach().double() for n, p in layer.named_parameters()}
    y64, _ = naive_moe(
        x.double(),
        w["router.weight"],
        w["experts.w1"],
        w["experts.w2"],
        None,
        top_k=2,
        capacity_factor=0.6,
        min_capacity=1,
        priority="probability",
        activation="relu",
    )
    torch.testing.assert_close(out.output.double(), y64, atol=2e-5, rtol=1e-4)


def test_shape_3d_input_and_shared_expert():
    layer = MoELayer(D, FF, E, shared_expert=True)
    x = torch.randn(2, 5, D)
    out = layer(x)
    assert out.output.shape == x.shape
    flat = layer(x.reshape(10, D)).output
    torch.testing.assert_close(out.output.reshape(10, D), flat)
    routed_only = out.output.reshape(10, D) - layer.shared_expert(x.reshape(10, D))
    layer.shared_expert = None
    torch.testing.assert_close(layer(x).output.reshape(10, D), routed_only, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_grouped_matmul_impls_agree(impl):
    torch.manual_seed(0)
    x = torch.randn(10, 4, dtype=torch.float64)
    w = torch.randn(4, 4, 8, dtype=torch.float64)
    sizes = torch.tensor([3, 0, 5, 2])
    expected = torch.cat([x[:3] @ w[0], x[3:8] @ w[2], x[8:] @ w[3]])
    if impl == "grouped" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    got = grouped_matmul(x.float(), w.float(), sizes, impl=impl)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_relu_experts_equal_the_unfused_matmuls(autocast):
    """The CPU relu path (one fused function, relu and its mask in place per expert) gives
    the output and gradients of grouped_matmul -> relu -> grouped_matmul, an empty expert's
    weight gradient included (exactly 0)."""
    torch.manual_seed(0)
    experts = GroupedExperts(4, 8, 16, activation="relu")
    sizes = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 8)
    grad = torch.randn(10, 8)

    def run(fused):
        experts.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                y = experts(xi, sizes)
            else:
                h = torch.relu(grouped_matmul(xi, experts.w1, sizes, impl="loop"))
                y = grouped_matmul(h, experts.w2, sizes, impl="loop")
        y.float().backward(grad)
        return y, xi.grad, experts.w1.grad, experts.w2.grad

    fused, unfused = run(True), run(False)
    assert fused[0].dtype == (torch.bfloat16 if autocast else torch.float32)
    for got, want in zip(fused, unfused):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert fused[2][1].abs().max() == 0 and fused[3][1].abs().max() == 0
    assert fused[2][0].abs().max() > 0


def test_fused_relu_experts_compute_only_the_gradients_asked_for():
    torch.manual_seed(0)
    experts = GroupedExperts(4, 8, 16, activation="relu")
    sizes = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 8, requires_grad=True)
    experts(x, sizes).sum().backward()
    full = (x.grad, experts.w1.grad, experts.w2.grad)
    experts.zero_grad(set_to_none=True)
    experts.w1.requires_grad_(False)
    experts(x.detach(), sizes).sum().backward()  # only w2's gradient
    assert experts.w1.grad is None and torch.equal(experts.w2.grad, full[2])
    experts.w1.requires_grad_(True)
    experts.w2.requires_grad_(False)
    experts.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_(True)
    experts(xi, sizes).sum().backward()  # input and w1, not w2
    assert torch.equal(xi.grad, full[0]) and torch.equal(experts.w1.grad, full[1])
    assert experts.w2.grad is None


def test_expert_choice_layer_runs_and_balances():
    layer = MoELayer(D, FF, E, router="expert_choice", capacity_factor=1.0)
    out = layer(torch.randn(16, D))
    assert out.tokens_per_expert.tolist() == [4, 4, 4, 4]


@pytest.mark.parametrize("mode", ["cast", "autocast"])
def test_router_stays_fp32_under_bf16(mode):
    layer = MoELayer(D, FF, E)
    x = torch.randn(2, 6, D)
    seen = {}
    layer.router.register_forward_hook(lambda m, i, o: seen.update(routing=o))
    orig_logits = layer.router.logits
    layer.router.logits = lambda t: seen.setdefault("logits", orig_logits(t))
    if mode == "cast":
        layer = layer.to(torch.bfloat16)
        out = layer(x.to(torch.bfloat16))
        assert layer.experts.w1.dtype == torch.bfloat16
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
    assert layer.router.weight.dtype == torch.float32
    assert seen["logits"].dtype == torch.float32
    r = seen["routing"]
    assert r.probs.dtype == r.gate.dtype == torch.float32
    assert out.aux_loss.dtype == out.z_loss.dtype == torch.float32
    assert out.output.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_k=5), r"top_k \(5\) must be between 1 and num_experts \(4\)"),
        (dict(capacity_factor=-0.5), r"capacity_factor must be >= 0 .*got -0.5"),
        (dict(eval_capacity_factor=-1.0), r"eval_capacity_factor must be >= 0"),
        (
            dict(activation="tanh"),
            r"activation must be one of \('relu', 'gelu', 'swiglu'\), got 'tanh'",
        ),
        (
            dict(priority="random"),
            r"priority must be one of \('sequence', 'probability'\), got 'random'",
        ),
        (dict(router="hash"), r"router must be one of"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoELayer(D, FF, E, **kwargs)


def test_wrong_input_width_raises():
    with pytest.raises(ValueError, match=r"last dim must be d_model \(8\), got shape \(3, 7\)"):
        MoELayer(D, FF, E)(torch.randn(3, 7))


def test_auto_layout_resolution():
    """auto: buffer for bf16 experts on CPU with a capacity, grouped otherwise; same outputs."""
    x = torch.randn(64, D)
    layer = MoELayer(D, FF, E)
    assert layer.expert_layout == "auto"
    assert layer.resolve_layout(x) == "grouped"  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.resolve_layout(x) == "buffer"
    assert (
        MoELayer(D, FF, E, capacity_factor=None).to(torch.bfloat16).resolve_layout(x) == "grouped"
    )
    assert MoELayer(D, FF, E, simulate_ep=2).to(torch.bfloat16).resolve_layout(x) == "grouped"
    assert (
        MoELayer(D, FF, E, expert_layout="grouped").to(torch.bfloat16).resolve_layout(x)
        == "grouped"
    )
    half = layer.to(torch.bfloat16)
    assert half.resolve_layout(x) == "buffer"
    explicit = MoELayer(D, FF, E, expert_layout="buffer").to(torch.bfloat16)
    explicit.load_state_dict(half.state_dict())
    xb = x.to(torch.bfloat16)
    assert torch.equal(half(xb).output, explicit(xb).output)


def test_buffer_cut_to_fullest_expert_matches_grouped():
    """With room to spare (cf 4), the CPU buffer holds only the fullest expert's rows, and
    outputs and gradients equal the grouped layout's (itself checked against float64)."""
    grouped, x = layer_and_reference(2, "swiglu", 4.0, layout="grouped")
    buffered = MoELayer(D, FF, E, top_k=2, capacity_factor=4.0, min_capacity=1,
                        activation="swiglu", expert_layout="buffer")  # fmt: skip
    buffered.load_state_dict(grouped.state_dict())
    routing = buffered.dispatcher.route(buffered.router, x)
    plan = buffered.dispatcher.plan(routing)
    rows, index = plan.buffer_rows, plan.buffer_index
    assert rows == int(routing.tokens_per_expert.max()) < plan.capacity
    assert index.max().item() < E * rows and index.unique().numel() == index.numel()
    upstream = torch.randn(x.shape)
    results = []
    for layer in (grouped, buffered):
        xi = x.detach().requires_grad_(True)
        (layer(xi).output * upstream).sum().backward()
        results.append([xi.grad, *(p.grad for p in layer.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
