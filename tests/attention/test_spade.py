"""SPADE (S4D state space + local attention) against float64 references (spec §9)."""

from __future__ import annotations

import math

import pytest
import torch

import attention
from attention.spade import DiagonalStateSpace
from tests.attention.probes import causality_probe, padding_probe

D, H = 16, 2


def build(**options):
    torch.manual_seed(0)
    options.setdefault("radius", 4)
    return attention.build("spade", d_model=D, num_heads=H, **options).double().eval()


def inputs(batch=2, n=19, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, D, generator=generator, dtype=torch.float64)


def random_ssm(bidirectional: bool, channels: int = 3, d_state: int = 8) -> DiagonalStateSpace:
    torch.manual_seed(4)
    ssm = DiagonalStateSpace(channels, d_state=d_state, bidirectional=bidirectional).double()
    with torch.no_grad():  # move away from the symmetric init so every term is exercised
        ssm.log_a_real.add_(0.3 * torch.randn_like(ssm.log_a_real))
        ssm.a_imag.add_(torch.randn_like(ssm.a_imag))
        ssm.log_dt.fill_(math.log(0.3))
    return ssm


def recurrence(ssm: DiagonalStateSpace, u: torch.Tensor, direction: int) -> torch.Tensor:
    """x_t = Ā x_{t-1} + B̄ u_t, y_t = 2 Re(C x_t): u [B, n, D] -> [B, n, D] (fp64, complex128)."""
    a = torch.complex(-torch.exp(ssm.log_a_real[direction]), ssm.a_imag[direction]).to(
        torch.complex128
    )
    dt = torch.exp(ssm.log_dt[direction]).unsqueeze(-1).to(torch.complex128)
    a_bar = torch.exp(dt * a)
    b_bar = (a_bar - 1) / a
    c = torch.view_as_complex(ssm.c[direction].contiguous()).to(torch.complex128)
    state = torch.zeros(u.shape[0], *a.shape, dtype=torch.complex128)
    outputs = []
    for t in range(u.shape[1]):
        state = a_bar * state + b_bar * u[:, t].unsqueeze(-1)
        outputs.append(2 * (c * state).sum(-1).real)
    return torch.stack(outputs, 1)


@pytest.mark.parametrize("n", [1, 7, 37])
def test_fft_and_chunked_convolution_equal_causal_recurrence(n):
    ssm = random_ssm(bidirectional=False)
    ssm.chunk_size = 5  # several chunks and a ragged last one
    u = torch.randn(2, n, 3, dtype=torch.float64)
    expected = recurrence(ssm, u, 0) + ssm.skip * u
    assert torch.allclose(ssm.convolve_fft(u), expected, atol=1e-10, rtol=0)
    assert torch.allclose(ssm.convolve_chunked(u), expected, atol=1e-10, rtol=0)


def test_bidirectional_convolution_equals_two_recurrences():
    ssm = random_ssm(bidirectional=True)
    u = torch.randn(2, 29, 3, dtype=torch.float64)
    forward = recurrence(ssm, u, 0)
    # The backward kernel sees only later positions: run over the reversed input, shift by one.
    backward = recurrence(ssm, u.flip(1), 1).flip(1)
    backward = torch.cat([backward[:, 1:], torch.zeros_like(backward[:, :1])], dim=1)
    expected = forward + backward + ssm.skip * u
    assert torch.allclose(ssm.convolve(u), expected, atol=1e-10, rtol=0)


def test_two_level_kernel_equals_vandermonde():
    ssm = random_ssm(bidirectional=True, channels=2, d_state=6)
    n = 50
    a = torch.complex(-torch.exp(ssm.log_a_real), ssm.a_imag).to(torch.complex128)
    dt_a = torch.exp(ssm.log_dt).unsqueeze(-1).to(torch.complex128) * a
    c = torch.view_as_complex(ssm.c.contiguous()).to(torch.complex128) * (torch.exp(dt_a) - 1) / a
    powers = torch.exp(dt_a.unsqueeze(-1) * torch.arange(n, dtype=torch.float64))
    expected = 2 * (c.unsqueeze(-1) * powers).sum(-2).real
    assert torch.allclose(ssm.kernel(n), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_ssm_off_and_radius_at_least_n_is_full_attention(causal):
    n = 21
    module = build(radius=n, causal=causal, combine="add", ssm_weight=0.0, relative_bias=False)
    full = attention.build("full", d_model=D, num_heads=H, causal=causal).double().eval()
    full.load_state_dict(
        {name: p for name, p in module.state_dict().items() if name[:3] in ("qkv", "out")}
    )
    x = inputs(n=n)
    expected = module.norm_local(full(x)[0])  # the add combine normalises each branch
    assert torch.allclose(module(x)[0], expected, atol=1e-10, rtol=0)
    upper = attention.build(
        "spade", d_model=D, num_heads=H, causal=causal, radius=n, relative_bias=False, layer_idx=1
    ).double()
    assert not upper.has_ssm and not hasattr(upper, "ssm")
    full.load_state_dict(upper.state_dict())
    assert torch.allclose(upper(x)[0], full(x)[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("combine", ["concat", "add", "stack"])
@pytest.mark.parametrize("t", [0, 9])
def test_causality_probe(combine, t):
    causality_probe(build(causal=True, combine=combine), inputs(n=17), t)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("combine", ["concat", "stack"])
def test_padding_probe(causal, combine):
    padding_probe(build(causal=causal, combine=combine), inputs(n=20), length=13)


def test_non_causal_ssm_sees_the_future():
    module = build(causal=False, radius=1)
    x = inputs(n=16)
    x2 = x.clone()
    x2[:, 12:] += 1.0
    assert (module(x)[0][:, 0] - module(x2)[0][:, 0]).abs().max() > 1e-6


def test_frozen_ssm_gets_no_gradient():
    module = build(freeze_ssm=True)
    module(inputs(n=12))[0].sum().backward()
    assert all(p.grad is None for p in module.ssm.parameters())
    assert module.qkv.weight.grad is not None and module.aggregate.weight.grad is not None
    trainable = build()
    assert trainable.ssm.log_dt._optim == {"lr": 1e-3, "weight_decay": 0.0}


def test_options_are_validated():
    with pytest.raises(ValueError):
        attention.build("spade", d_model=D, num_heads=H, d_state=7)
    with pytest.raises(ValueError):
        attention.build("spade", d_model=D, num_heads=H, combine="mean")
    with pytest.raises(ValueError, match="dt_min"):
        attention.build("spade", d_model=D, num_heads=H, dt_min=0.5, dt_max=0.1)


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_close_to_fp32(causal):
    torch.manual_seed(0)
    module = attention.build("spade", d_model=D, num_heads=H, radius=5, causal=causal)
    x = torch.randn(2, 30, D)
    y32, _ = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights, the SSM stays fp32
        y_autocast, _ = module(x)
    assert y_autocast.dtype == torch.bfloat16
    assert (y_autocast.float() - y32).norm() / y32.norm() < 2e-2
    # All-bf16 weights round the SSM's Im(a) up to 31π, so the tolerance is looser.
    y16, _ = module.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).norm() / y32.norm() < 5e-2


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["causal_lm", "masked_lm"])
def test_trains_in_tiny_moe_model(mode):
    from tests.attention.probes import train_tiny_model

    losses = train_tiny_model("spade", mode, radius=3, d_state=16)
    assert losses[-1] < 0.3 * losses[0], f"loss did not fall: {losses[0]} -> {losses[-1]}"
