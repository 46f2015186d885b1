"""Sliding-window attention against the dense float64 oracle (SPADE's local branch, spec §9)."""

from __future__ import annotations

import pytest
import torch

import attention
from attention.local import relative_position_bucket
from tests.attention.probes import (
    causality_probe,
    dense_softmax_oracle,
    padding_probe,
    train_tiny_model,
)

D, H = 16, 2


def build(**options):
    torch.manual_seed(0)
    return attention.build("local", d_model=D, num_heads=H, **options).double().eval()


def inputs(batch=2, n=19, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, D, generator=generator, dtype=torch.float64)


def test_t5_buckets_known_values():
    relative = torch.tensor([0, 1, -1, -7, -8, -16, -128, -1000, 5, 200])
    bidirectional = relative_position_bucket(
        relative, bidirectional=True, num_buckets=32, max_distance=128
    )
    # 16 buckets per direction, 8 exact; log buckets: 8 + floor(8·log(dist/8)/log(16)).
    assert bidirectional.tolist() == [0, 17, 1, 7, 8, 10, 15, 15, 21, 31]
    causal = relative_position_bucket(
        relative, bidirectional=False, num_buckets=32, max_distance=128
    )
    # 32 buckets one way, 16 exact; future positions map to 0 (they are masked anyway).
    assert causal.tolist() == [0, 0, 1, 7, 8, 16, 31, 31, 0, 0]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("radius", [0, 3, 7])
def test_matches_dense_window_oracle_with_bias_and_padding(causal, radius):
    module = build(radius=radius, causal=causal)
    with torch.no_grad():
        module.position_bias.table.normal_(generator=torch.Generator().manual_seed(2))
    n = 19
    x = inputs(n=n)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, 13:] = False
    y, _ = module(x, key_padding_mask=mask)

    q, k, v = (module.split_heads(t) for t in module.qkv(x).chunk(3, dim=-1))
    positions = torch.arange(n)
    relative = positions[None, :] - positions[:, None]  # j - i
    allowed = relative.abs() <= radius
    if causal:
        allowed = allowed & (relative <= 0)
    allowed = allowed[None, None] & mask[:, None, None, :]
    bias = module.position_bias(relative, bidirectional=not causal)[None]
    expected = dense_softmax_oracle(q, k, v, allowed=allowed, bias=bias)
    expected = module.out(module.merge_heads(expected)) * mask.unsqueeze(-1)
    assert torch.allclose(y, expected, atol=1e-10, rtol=0), (y - expected).abs().max()


@pytest.mark.parametrize("causal", [False, True])
def test_radius_at_least_n_is_full_attention(causal):
    module = build(radius=40, causal=causal, relative_bias=False)
    full = attention.build("full", d_model=D, num_heads=H, causal=causal).double().eval()
    full.load_state_dict(module.state_dict())
    x = inputs(n=23)
    assert torch.allclose(module(x)[0], full(x)[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("t", [0, 5, 11])
def test_causality_probe(t):
    causality_probe(build(radius=4, causal=True), inputs(n=17), t)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_probe(causal):
    padding_probe(build(radius=3, causal=causal), inputs(n=21), length=14)


def test_gradcheck():
    module = build(radius=2)
    x = inputs(batch=1, n=9).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: module(t)[0], (x,), eps=1e-6, atol=1e-6)


def test_shared_bias_table_and_options():
    shared = attention.get("local").build_shared(D, H, attention.parse_options("local", {}))
    layers = [
        attention.build("local", d_model=D, num_heads=H, layer_idx=i, shared=shared)
        for i in range(2)
    ]
    assert layers[0].position_bias is layers[1].position_bias is shared
    with pytest.raises(ValueError):
        attention.build("local", d_model=D, num_heads=H, radius=-1)


def test_bf16_close_to_fp32():
    torch.manual_seed(0)
    module = attention.build("local", d_model=D, num_heads=H, radius=5)
    x = torch.randn(2, 30, D)
    y32, _ = module(x)
    y16, _ = module.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert (y16.float() - y32).norm() / y32.norm() < 3e-2


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["causal_lm", "masked_lm"])
def test_trains_in_tiny_moe_model(mode):
    losses = train_tiny_model("local", mode, radius=7)
    assert losses[-1] < 0.3 * losses[0], f"loss did not fall: {losses[0]} -> {losses[-1]}"
