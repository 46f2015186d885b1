"""Evolving attention: reductions, float64 oracle, cross-layer state, probes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attention
from attention.evolving import EvolvingAttention
from tests.attention.probes import (
    causality_probe,
    dense_softmax_oracle,
    padding_probe,
    train_tiny_model,
)


def build(causal: bool = False, layer_idx: int = 0, **options) -> EvolvingAttention:
    return attention.build(
        "evolving", d_model=12, num_heads=3, causal=causal, layer_idx=layer_idx, **options
    )


class Stack(nn.Module):
    """Layers of one method threading the cross-layer state, as the transformer does."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x, *, key_padding_mask=None, state=None):
        for layer in self.layers:
            y, state = layer(x, key_padding_mask=key_padding_mask, state=state)
            x = x + y
        return x, state


def qkv(module, x):
    return (module.split_heads(t) for t in module.qkv(x).chunk(3, dim=-1))


def oracle(module, x, state=None, key_padding_mask=None):
    """float64 evolving attention with the 3x3 conv written as explicit shifted sums."""
    opts = module.options
    with torch.no_grad():
        q, k, v = (t.double() for t in qkv(module, x))
        b, h, n, _ = q.shape
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        mixed = s if state is None else (1 - opts.beta) * s + opts.beta * state.double()
        keep = torch.ones(b, 1, n, n, dtype=torch.bool)
        if module.causal:
            keep = keep & torch.ones(n, n, dtype=torch.bool).tril()
        if key_padding_mask is not None:
            keep = keep & key_padding_mask[:, None, :, None] & key_padding_mask[:, None, None, :]
        mixed = mixed * keep
        weight, bias = module.conv.weight.double(), module.conv.bias.double()
        row_offsets = (-2, -1, 0) if module.causal else (-1, 0, 1)
        conv = bias.view(1, h, 1, 1).expand(b, h, n, n).clone()
        padded = torch.zeros(b, h, n + 4, n + 4, dtype=torch.float64)
        padded[:, :, 2 : n + 2, 2 : n + 2] = mixed
        for a, dr in enumerate(row_offsets):
            for c, dc in enumerate((-1, 0, 1)):
                window = padded[:, :, 2 + dr : 2 + dr + n, 2 + dc : 2 + dc + n]
                conv = conv + torch.einsum("oi,bimn->bomn", weight[:, :, a, c], window)
        leaky = torch.where(conv >= 0, conv, opts.negative_slope * conv)
        evolved = opts.alpha * leaky + (1 - opts.alpha) * mixed
        allowed = torch.ones(b, 1, n, n, dtype=torch.bool)
        if module.causal:
            allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[:, None, None, :]
        probs = torch.softmax(evolved.masked_fill(~allowed, float("-inf")), dim=-1)
        y = module.out(module.merge_heads(torch.nan_to_num(probs) @ v).to(x.dtype))
    if key_padding_mask is not None:
        y = y * key_padding_mask[..., None]
    return y, evolved


def test_alpha_beta_zero_is_plain_attention():
    torch.manual_seed(0)
    module = build(alpha=0.0, beta=0.0).double().eval()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    previous = torch.randn(2, 3, 9, 9, dtype=torch.float64) * 5
    y, state = module(x, state=previous)
    with torch.no_grad():
        q, k, v = qkv(module, x)
        expected = module.out(module.merge_heads(dense_softmax_oracle(q, k, v)))
        logits = q @ k.transpose(-1, -2) / 2.0  # sqrt(d) = sqrt(4)
    assert torch.allclose(y, expected, atol=1e-10, rtol=0)
    assert torch.allclose(state, logits, atol=1e-10, rtol=0), "new state = this layer's logits"


def test_alpha_zero_beta_one_uses_previous_logits_only():
    torch.manual_seed(1)
    module = build(alpha=0.0, beta=1.0).double().eval()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    previous = torch.randn(2, 3, 7, 7, dtype=torch.float64) * 2
    y, state = module(x, state=previous)
    with torch.no_grad():
        _, _, v = qkv(module, x)
        expected = module.out(module.merge_heads(torch.softmax(previous, dim=-1) @ v))
    assert torch.allclose(y, expected, atol=1e-10, rtol=0)
    assert torch.equal(state, previous)


def test_zero_conv_alpha_one_gives_mean_of_valid_values():
    torch.manual_seed(2)
    module = build(alpha=1.0).double().eval()
    with torch.no_grad():
        module.conv.weight.zero_()
        module.conv.bias.zero_()
    x = torch.randn(2, 8, 12, dtype=torch.float64)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    y, state = module(x, key_padding_mask=mask)
    assert torch.count_nonzero(state) == 0
    with torch.no_grad():
        _, _, v = qkv(module, x)
        weights = mask[:, None, None, :].double() / mask.sum(-1).view(2, 1, 1, 1)
        expected = module.out(module.merge_heads((weights @ v).expand(-1, -1, 8, -1)))
    assert torch.allclose(y * mask[..., None], expected * mask[..., None], atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_float64_oracle(causal, with_state):
    torch.manual_seed(3)
    module = build(causal, alpha=0.7, beta=0.4).double().eval()
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False
    state = torch.randn(2, 3, 10, 10, dtype=torch.float64) if with_state else None
    y, evolved = module(x, key_padding_mask=mask, state=state)
    expected_y, expected_state = oracle(module, x, state, mask)
    assert torch.allclose(y, expected_y, atol=1e-10, rtol=0)
    assert torch.allclose(evolved, expected_state, atol=1e-10, rtol=0)


def test_fp32_matches_oracle():
    torch.manual_seed(4)
    module = build().eval()
    x = torch.randn(2, 10, 12)
    first, state = module(x)
    second_layer = build(layer_idx=1).eval()
    y, _ = second_layer(x, state=state)
    reference = second_layer.double()
    expected, _ = oracle(reference, x.double(), state.double())
    assert torch.allclose(y.double(), expected, atol=1e-5, rtol=1e-4)
    assert state.dtype == torch.float32


def test_state_is_carried_and_shape_checked():
    torch.manual_seed(5)
    module = build()
    x = torch.randn(1, 6, 12)
    y_first, state = module(x)
    y_second, _ = module(x, state=state)
    assert not torch.allclose(y_first, y_second), "the previous logits must change the output"
    with pytest.raises(ValueError, match="state"):
        module(x, state=torch.zeros(1, 3, 5, 5))
    assert EvolvingAttention.needs_cross_layer_state


@pytest.mark.parametrize("causal", [False, True])
def test_padding_probe_one_and_two_layers(causal):
    torch.manual_seed(6)
    x = torch.randn(2, 11, 12, dtype=torch.float64)
    padding_probe(build(causal).double(), x, length=7)
    stack = Stack([build(causal, layer_idx=i) for i in range(2)]).double()
    padding_probe(stack, x, length=7)


def test_causality_probe_two_layers():
    torch.manual_seed(7)
    stack = Stack([build(True, layer_idx=i) for i in range(2)]).double()
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    for t in (0, 4, 8):
        causality_probe(stack, x, t)


def test_bidirectional_mode_reads_the_future():
    """Sanity check of the probe: without the causal extension the conv leaks the future."""
    torch.manual_seed(8)
    stack = Stack([build(False, layer_idx=i) for i in range(2)]).double()
    with pytest.raises(AssertionError):
        causality_probe(stack, torch.randn(1, 8, 12, dtype=torch.float64), 3)


def test_gradcheck_float64():
    torch.manual_seed(9)
    module = build(True).double()
    x = torch.randn(2, 6, 12, dtype=torch.float64, requires_grad=True)
    state = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    assert torch.autograd.gradcheck(
        lambda a, s: module(a, key_padding_mask=mask, state=s)[0], (x, state)
    )


def test_bf16_runs_and_is_close_to_fp32():
    torch.manual_seed(10)
    stack = Stack([build(layer_idx=i) for i in range(2)]).eval()
    x = torch.randn(2, 16, 12)
    reference, state = stack(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, low_state = stack(x)
    assert low_state.dtype == torch.float32, "evolved logits stay fp32"
    rel = (low.float() - reference).norm() / reference.norm()
    assert rel < 3e-2, f"bf16 relative error {rel}"


def test_option_validation():
    with pytest.raises(ValueError, match="alpha"):
        build(alpha=1.5)
    with pytest.raises(ValueError, match="beta"):
        build(beta=-0.1)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["causal_lm", "masked_lm"])
def test_trains_in_tiny_moe_model(mode):
    losses = train_tiny_model("evolving", mode)
    assert losses[-1] < 0.3 * losses[0], f"loss did not fall: {losses[0]} -> {losses[-1]}"


@pytest.mark.parametrize("causal", [False, True])
def test_conv_gradients_match_autograd_of_conv2d(causal):
    """The GEMM-based conv and its hand-written backward against F.conv2d + autograd."""
    from attention.evolving import evolve_logits

    torch.manual_seed(11)
    conv = nn.Conv2d(3, 3, 3).double()
    logits = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    previous = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(2, 1, 7, 7) > 0.2
    kwargs = dict(alpha=0.6, beta=0.3, negative_slope=0.1, keep=keep, causal=causal)
    out = evolve_logits(logits, previous, conv, **kwargs)
    mixed = (0.7 * logits + 0.3 * previous).masked_fill(~keep, 0.0)
    padded = torch.nn.functional.pad(mixed, (1, 1, 2, 0) if causal else (1, 1, 1, 1))
    convolved = torch.nn.functional.conv2d(padded, conv.weight, conv.bias)
    expected = 0.6 * torch.nn.functional.leaky_relu(convolved, 0.1) + 0.4 * mixed
    assert torch.allclose(out, expected, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (logits, previous, conv.weight, conv.bias), grad)
    want = torch.autograd.grad(expected, (logits, previous, conv.weight, conv.bias), grad)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-10)
