"""Performer / FAVOR+ (attention_spec.md §3): exactness of the linear-attention machinery with
fixed features, unbiasedness, error ~ 1/sqrt(m), causality, padding, redraw, precision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.utils.checkpoint as activation_checkpoint

import attention
from attention.performer import draw_projection, favor_attention, favor_features
from tests.attention.probes import causality_probe, padding_probe

F64 = torch.float64


def exact_features(x: torch.Tensor, projection: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Dense float64 positive features, written from the formula (no stabiliser).

    eps = 0: φ(x) = exp(ω·x̃ − |x̃|²/2); eps > 0: the documented effective feature
    exp(u) + eps·exp(max u). The m^{-1/2} factor cancels in attention and is left out.
    """
    x_scaled = x.double() * x.shape[-1] ** -0.25
    u = x_scaled @ projection.double().T - 0.5 * x_scaled.square().sum(-1, keepdim=True)
    return torch.exp(u) + eps * torch.exp(u.amax(-1, keepdim=True))


def dense_phi_attention(q, k, v, projection, allowed, eps=0.0):
    """normalize((φ(Q)φ(K)ᵀ) ⊙ allowed) V in float64; allowed [B, 1 or H, n, n]."""
    scores = exact_features(q, projection, eps) @ exact_features(k, projection, eps).transpose(
        -1, -2
    )
    scores = scores * allowed
    total = scores.sum(-1, keepdim=True)
    return torch.where(total > 0, scores / total, 0.0) @ v.double()  # rows with no key give 0


def allowed_mask(valid, n, causal, batch):
    allowed = torch.ones(batch, 1, n, n, dtype=torch.bool)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    return allowed


def qkv(batch=2, heads=2, n=13, d=4, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, heads, n, d, generator=generator, dtype=F64) * scale for _ in range(3)
    ]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 16])
@pytest.mark.parametrize("padded", [False, True])
def test_fixed_features_equal_dense_phi_formula(causal, chunk_size, padded):
    q, k, v = qkv()
    projection = draw_projection(9, 4, seed=3)
    valid = None
    if padded:  # right padding in one row, left padding in the other (all keys stay general)
        valid = torch.ones(2, 13, dtype=torch.bool)
        valid[0, 9:] = False
        valid[1, :5] = False
    y = favor_attention(
        q, k, v, projection, causal=causal, valid=valid, eps=0.0, chunk_size=chunk_size
    )
    expected = dense_phi_attention(q, k, v, projection, allowed_mask(valid, 13, causal, 2))
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_eps_gives_the_documented_effective_features(causal):
    q, k, v = qkv(scale=1.5, seed=1)
    projection = draw_projection(12, 4, seed=5)
    y = favor_attention(q, k, v, projection, causal=causal, eps=1e-2, chunk_size=4)
    expected = dense_phi_attention(q, k, v, projection, allowed_mask(None, 13, causal, 2), eps=1e-2)
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_relu_kernel_matches_dense_formula(causal):
    q, k, v = qkv(seed=4)
    projection = draw_projection(7, 4, seed=2)
    y = favor_attention(q, k, v, projection, causal=causal, kernel="relu", chunk_size=4)
    phi_q, phi_k = (torch.relu(t @ projection.T) + 1e-3 for t in (q, k))
    scores = (phi_q @ phi_k.transpose(-1, -2)) * allowed_mask(None, 13, causal, 2)
    expected = scores / scores.sum(-1, keepdim=True) @ v
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=0)


def test_large_norms_stay_finite_in_fp32():
    q, k, v = (t.float() for t in qkv(n=64, d=16, scale=12.0, seed=2))
    projection = draw_projection(32, 16, seed=1).float()
    for causal in (False, True):
        y = favor_attention(q, k, v, projection, causal=causal, chunk_size=16)
        assert torch.isfinite(y).all(), f"non-finite output at large norms (causal={causal})"


def test_features_are_unbiased():
    """Mean of φ(q)·φ(k) over many independent orthogonal draws -> exp(q·k/√d)."""
    d, m, draws = 8, 8, 3000
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(3, d, generator=generator, dtype=F64) * 0.4 for _ in range(2))
    estimates = []
    for seed in range(draws):
        projection = draw_projection(m, d, seed=seed)
        rows_q, log_q = favor_features(q, projection, eps=0.0)
        rows_k, log_k = favor_features(k, projection, eps=0.0)
        estimate = (rows_q * rows_k).sum(-1) * torch.exp(log_q + log_k) / m
        estimates.append(estimate)
    estimates = torch.stack(estimates)
    truth = torch.exp((q * k).sum(-1) / math.sqrt(d))
    standard_error = estimates.std(0) / math.sqrt(draws)
    assert ((estimates.mean(0) - truth).abs() < 5 * standard_error).all(), (
        f"mean {estimates.mean(0)} vs exp(q·k/√d) {truth} (5 s.e. = {5 * standard_error})"
    )


def attention_matrix_error(m: int, seed: int, orthogonal: bool = True) -> float:
    """Relative Frobenius error of the FAVOR+ attention matrix, d=16, n=128, entries N(0, 0.5²)."""
    d, n = 16, 128
    generator = torch.Generator().manual_seed(1000 + seed)
    q, k = (torch.randn(n, d, generator=generator, dtype=F64) * 0.5 for _ in range(2))
    projection = draw_projection(m, d, seed=seed, orthogonal=orthogonal)
    estimate = exact_features(q, projection) @ exact_features(k, projection).T
    estimate = estimate / estimate.sum(-1, keepdim=True)
    exact = torch.softmax(q @ k.T / math.sqrt(d), dim=-1)
    return ((estimate - exact).norm() / exact.norm()).item()


def test_error_falls_like_inverse_sqrt_m():
    sizes = [32, 128, 512, 2048]
    errors = [sum(attention_matrix_error(m, s) for s in range(6)) / 6 for m in sizes]
    assert all(a > b for a, b in zip(errors, errors[1:])), f"error not decreasing: {errors}"
    slope = (math.log(errors[-1]) - math.log(errors[0])) / (
        math.log(sizes[-1]) - math.log(sizes[0])
    )
    assert -0.7 <= slope <= -0.25, f"log-log slope {slope:.3f} outside [-0.7, -0.25]; {errors}"


def test_orthogonal_features_beat_iid_on_average():
    orthogonal = sum(attention_matrix_error(64, s, True) for s in range(10))
    iid = sum(attention_matrix_error(64, s, False) for s in range(10))
    assert orthogonal < iid, f"ORF error {orthogonal / 10:.4f} >= iid error {iid / 10:.4f}"


def test_orthogonal_blocks_and_norms():
    projection = draw_projection(10, 4, seed=7)  # blocks of 4, 4, 2 rows
    unit = projection / projection.norm(dim=-1, keepdim=True)
    for block in (unit[:4], unit[4:8], unit[8:]):
        torch.testing.assert_close(block @ block.T, torch.eye(len(block), dtype=F64))
    fixed = draw_projection(10, 4, seed=7, scaling=1)
    torch.testing.assert_close(fixed.norm(dim=-1), torch.full((10,), 2.0, dtype=F64))
    assert torch.equal(draw_projection(10, 4, seed=7), projection), "draw is not a pure function"


def build(causal=False, **options):
    torch.manual_seed(0)
    module = attention.build("performer", d_model=8, num_heads=2, causal=causal, **options)
    return module.double()


def test_flags_and_option_validation():
    cls = attention.registry.get("performer")
    assert cls.supports_causal and cls.supports_padding and cls.stochastic_structure
    assert build().num_features == int(4 * math.log(4))
    for bad in ({"nb_features": 0}, {"dropout": 0.1}, {"chunk_size": 0}, {"eps": -1.0}, {"foo": 1}):
        with pytest.raises(ValueError):
            attention.build("performer", d_model=8, num_heads=2, **bad)


def test_causality_probe():
    module = build(causal=True, chunk_size=4)
    x = torch.randn(2, 14, 8, dtype=F64)
    for t in (0, 5, 8, 13):
        causality_probe(module, x, t)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_probe(causal):
    module = build(causal=causal, chunk_size=4)
    padding_probe(module, torch.randn(2, 11, 8, dtype=F64), length=6)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    q, k, v = (t.requires_grad_() for t in qkv(n=9))
    projection = draw_projection(6, 4, seed=0)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, 7:] = False

    def run(q, k, v):
        return favor_attention(
            q, k, v, projection, causal=causal, valid=valid, eps=0.0, chunk_size=4
        )

    assert torch.autograd.gradcheck(run, (q, k, v))
    module = build(causal=causal, eps=0.0, chunk_size=4)
    x = torch.randn(2, 6, 8, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: module(x)[0], (x,))


def test_features_depend_only_on_seed_and_layer():
    same = [
        attention.build("performer", d_model=8, num_heads=2, layer_idx=1, seed=5) for _ in range(2)
    ]
    assert torch.equal(same[0].projection, same[1].projection)
    other_layer = attention.build("performer", d_model=8, num_heads=2, layer_idx=2, seed=5)
    other_seed = attention.build("performer", d_model=8, num_heads=2, layer_idx=1, seed=6)
    assert not torch.equal(same[0].projection, other_layer.projection)
    assert not torch.equal(same[0].projection, other_seed.projection)
    torch.manual_seed(123)  # the global RNG neither feeds nor is touched by a draw
    third = attention.build("performer", d_model=8, num_heads=2, layer_idx=1, seed=5)
    assert torch.equal(third.projection, same[0].projection)
    state = torch.get_rng_state()
    third.redraw_features()
    assert torch.equal(third.projection, same[0]._draw(1).float())
    assert torch.equal(torch.get_rng_state(), state), "a feature redraw consumed global RNG"


def test_redraw_only_in_training_and_in_lockstep():
    ranks = [build(feature_redraw_interval=2) for _ in range(2)]
    x = torch.randn(1, 5, 8, dtype=F64)
    initial = ranks[0].projection.clone()
    for module in ranks:
        module.eval()
        for _ in range(5):
            module(x)
    assert torch.equal(ranks[0].projection, initial) and int(ranks[0].redraw_count) == 0
    draws = []
    for module in ranks:
        module.train()
        seen = []
        for _ in range(5):  # forwards 0, 1 use draw 0; 2, 3 draw 1; 4 draw 2
            module(x)
            seen.append(module.projection.clone())
        draws.append(seen)
    assert torch.equal(draws[0][1], initial) and not torch.equal(draws[0][2], initial)
    assert torch.equal(draws[0][2], draws[0][3]) and not torch.equal(draws[0][3], draws[0][4])
    assert int(ranks[0].redraw_count) == 2
    torch.testing.assert_close(draws[0][4], ranks[0]._draw(2).double(), atol=0, rtol=0)
    for a, b in zip(*draws):  # two "ranks" stepping in lockstep draw identical features
        assert torch.equal(a, b)
    resumed = build(feature_redraw_interval=2)  # a checkpoint restores counters and features
    resumed.load_state_dict(ranks[0].state_dict())
    assert (resumed.forward_count, resumed.redraw_count) == (5, 2)
    assert torch.equal(resumed.projection, ranks[0].projection)
    resumed.train()
    for _ in range(2):  # forward 5 keeps draw 2, forward 6 redraws to draw 3
        resumed(x)
        ranks[0](x)
    assert resumed.redraw_count == 3 and torch.equal(resumed.projection, ranks[0].projection)


def test_no_redraw_during_checkpoint_recompute():
    module = build(feature_redraw_interval=1)
    module.train()
    x = torch.randn(1, 6, 8, dtype=F64, requires_grad=True)
    module(x)  # forward 0 uses draw 0; the checkpointed forward 1 redraws to draw 1
    y = activation_checkpoint.checkpoint(lambda t: module(t)[0], x, use_reentrant=False)
    used = module.projection.clone()
    assert int(module.redraw_count) == 1 and int(module.forward_count) == 2
    x.grad = None
    y.square().sum().backward()  # recomputes the forward inside backward: must not redraw
    assert int(module.forward_count) == 2 and int(module.redraw_count) == 1
    assert torch.equal(module.projection, used)
    recomputed_grad = x.grad.clone()
    module.eval()  # same features, no redraw: the gradient a plain forward gives
    x.grad = None
    module(x)[0].square().sum().backward()
    torch.testing.assert_close(x.grad, recomputed_grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_fp32_matches_fp64_and_bf16_is_close(causal):
    torch.manual_seed(0)
    module = attention.build(
        "performer", d_model=32, num_heads=2, causal=causal, chunk_size=8
    ).eval()
    x = torch.randn(2, 20, 32)
    y32, _ = module(x)
    y64, _ = module.double()(x.double())
    torch.testing.assert_close(y32.double(), y64, atol=1e-5, rtol=1e-4)
    module.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = module(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    relative = ((y16.float() - y32).norm() / y32.norm()).item()
    assert relative < 3e-2, f"bf16 relative error {relative}"
    y_params16, _ = module.bfloat16()(x.bfloat16())  # bf16 parameters, no autocast
    relative = ((y_params16.float() - y32).norm() / y32.norm()).item()
    assert relative < 5e-2, f"bf16-parameter relative error {relative}"
