"""GAU and FLASH (attention_spec.md §4): dense float64 oracles, reductions and probes.

Shape letters: B batch, n length, D model width, C chunk length, e expanded width.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attention.registry import build, get
from tests.attention.probes import causality_probe, padding_probe

D_MODEL = 8
SMALL = {"expansion": 2, "qk_dim": 6, "max_relative_distance": 3}


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter (biases, offsets β, Toeplitz table) a nonzero random value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return module


def make(name: str, causal: bool = False, **options) -> nn.Module:
    module = build(name, d_model=D_MODEL, num_heads=2, causal=causal, **{**SMALL, **options})
    return randomise(module).double().eval()


def oracle_projections(core, x: torch.Tensor):
    """U, V and the scale-offset views, from the weights, in float64 (no module code)."""
    hidden = F.silu(x @ core.to_gate_value.weight.T + core.to_gate_value.bias)
    gate, value = hidden[..., : core.hidden_dim], hidden[..., core.hidden_dim :]
    shared = F.silu(x @ core.to_shared.weight.T + core.to_shared.bias)
    views = [shared * core.gamma[p] + core.beta[p] for p in range(core.gamma.shape[0])]
    if core.rotary:
        views = [rope_oracle(view) for view in views]
    return gate, value, views


def rope_oracle(t: torch.Tensor) -> torch.Tensor:
    """RoPE through complex numbers: pair (i, i + s/2) times exp(1j · pos · 10000^(-2i/s))."""
    half = t.shape[-1] // 2
    pairs = torch.complex(t[..., :half], t[..., half:])
    frequencies = 10000.0 ** (-2.0 * torch.arange(half, dtype=torch.float64) / (2 * half))
    positions = torch.arange(t.shape[-2], dtype=torch.float64)[:, None]
    rotated = pairs * torch.polar(torch.ones((), dtype=torch.float64), positions * frequencies)
    return torch.cat([rotated.real, rotated.imag], dim=-1)


def toeplitz(core, t: int, s: int) -> float:
    table = core.relative_bias.table
    reach = core.relative_bias.max_distance
    return table[max(-reach, min(reach, t - s)) + reach]


def flash_oracle(module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """y = (U ⊙ M V) W_o with the spec's M built entry by entry (§4 Tests, item 2)."""
    core, options = module.core, module.options
    chunk = options.chunk_size
    gate, value, (q_quad, k_quad, q_lin, k_lin) = oracle_projections(core, x)
    batch, length, _ = x.shape
    real = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask
    outputs = []
    for b in range(batch):
        lin_scale = 1.0 / chunk if module.causal else 1.0 / real[b].sum().item()
        matrix = torch.zeros(length, length, dtype=torch.float64)
        for t in range(length):
            for s in range(length):
                if not real[b, s]:
                    continue
                same = t // chunk == s // chunk
                if same and (s <= t or not module.causal):
                    score = q_quad[b, t] @ k_quad[b, s] / chunk + toeplitz(core, t, s)
                    matrix[t, s] += torch.relu(score) ** 2
                if not module.causal or t // chunk > s // chunk:
                    matrix[t, s] += (q_lin[b, t] @ k_lin[b, s]) * lin_scale
        outputs.append(gate[b] * (matrix @ value[b]))
    y = torch.stack(outputs) @ core.out.weight.T + core.out.bias
    return y * real[..., None]


def gau_oracle(module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Quadratic relu² GAU with A = relu²(QKᵀ/L + b), L = real length, built entry by entry."""
    core = module.core
    gate, value, (query, key) = oracle_projections(core, x)
    batch, length, _ = x.shape
    real = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask
    outputs = []
    for b in range(batch):
        weights = torch.zeros(length, length, dtype=torch.float64)
        for t in range(length):
            for s in range(length):
                if real[b, s] and (s <= t or not module.causal):
                    score = query[b, t] @ key[b, s] / real[b].sum() + toeplitz(core, t, s)
                    weights[t, s] = torch.relu(score) ** 2
        outputs.append(gate[b] * (weights @ value[b]))
    y = torch.stack(outputs) @ core.out.weight.T + core.out.bias
    return y * real[..., None]


def ragged_mask(batch: int, length: int, real: int) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[-1, real:] = False
    return mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("rotary", [False, True])
def test_gau_matches_dense_oracle(causal: bool, padded: bool, rotary: bool) -> None:
    module = make("gau", causal, rotary=rotary)
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    mask = ragged_mask(2, 9, 6) if padded else None
    y, state = module(x, key_padding_mask=mask)
    assert state is None
    torch.testing.assert_close(y, gau_oracle(module, x, mask), atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("rotary", [False, True])
def test_flash_matches_dense_m_oracle(causal: bool, padded: bool, rotary: bool) -> None:
    # n = 11 is not a multiple of C = 4: the module pads to 12 internally.
    module = make("flash", causal, chunk_size=4, rotary=rotary)
    x = torch.randn(2, 11, D_MODEL, dtype=torch.float64)
    mask = ragged_mask(2, 11, 6) if padded else None
    y, _ = module(x, key_padding_mask=mask)
    torch.testing.assert_close(y, flash_oracle(module, x, mask), atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_one_chunk_without_linear_part_is_gau(causal: bool) -> None:
    length = 10
    flash = make("flash", causal, chunk_size=length, linear_part=False)
    gau = make("gau", causal)
    with torch.no_grad():
        for name in ("to_gate_value", "to_shared", "out", "relative_bias"):
            getattr(gau.core, name).load_state_dict(getattr(flash.core, name).state_dict())
        gau.core.gamma.copy_(flash.core.gamma[:2])
        gau.core.beta.copy_(flash.core.beta[:2])
    x = torch.randn(2, length, D_MODEL, dtype=torch.float64)
    y_flash, _ = flash(x)
    y_gau, _ = gau(x)
    torch.testing.assert_close(y_flash, y_gau, atol=1e-12, rtol=0)
    # The linear part is really on by default: turning it on changes the output.
    flash_linear = make("flash", causal, chunk_size=length // 2)
    flash_linear.load_state_dict(flash.state_dict())
    flash_linear.options = flash_linear.options.model_copy(update={"linear_part": False})
    y_off, _ = flash_linear(x)
    flash_linear.options = flash_linear.options.model_copy(update={"linear_part": True})
    y_on, _ = flash_linear(x)
    assert (y_on - y_off).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["gau", "flash"])
def test_no_hidden_normaliser_relu_squared_is_two_homogeneous(name: str) -> None:
    options = {"chunk_size": 4, "linear_part": False} if name == "flash" else {}
    module = make(name, False, **options)
    with torch.no_grad():
        module.core.relative_bias.table.zero_()
        module.core.beta.zero_()
        module.core.out.bias.zero_()
    x = torch.randn(2, 8, D_MODEL, dtype=torch.float64)
    y1, _ = module(x)
    with torch.no_grad():
        module.core.gamma[0].mul_(3.0)  # Q_quad -> 3 Q_quad
    y3, _ = module(x)
    torch.testing.assert_close(y3, 9.0 * y1, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "name,length,probe_at", [("gau", 9, [0, 4, 8]), ("flash", 11, [0, 2, 3, 4, 6, 10])]
)
def test_causality_probe(name: str, length: int, probe_at: list[int]) -> None:
    options = {"chunk_size": 4} if name == "flash" else {}
    module = make(name, True, rotary=True, **options)
    x = torch.randn(2, length, D_MODEL, dtype=torch.float64)
    for t in probe_at:
        causality_probe(module, x, t)


@pytest.mark.parametrize("name", ["gau", "flash"])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_probe(name: str, causal: bool) -> None:
    options = {"chunk_size": 4} if name == "flash" else {}
    module = make(name, causal, rotary=causal, **options)
    x = torch.randn(2, 11, D_MODEL, dtype=torch.float64)
    padding_probe(module, x, length=6)  # 6 is not a multiple of C = 4
    padding_probe(module, x, length=8)


@pytest.mark.parametrize("name", ["gau", "flash"])
def test_gradcheck(name: str) -> None:
    options = {"chunk_size": 3, "qk_dim": 4, "expansion": 1} if name == "flash" else {"qk_dim": 4}
    module = make(name, True, **options)
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64, requires_grad=True)
    mask = ragged_mask(2, 7, 5)
    assert torch.autograd.gradcheck(lambda t: module(t, key_padding_mask=mask)[0], (x,))


@pytest.mark.parametrize("name", ["gau", "flash"])
def test_bf16_autocast_is_close_to_fp32(name: str) -> None:
    options = {"chunk_size": 8} if name == "flash" else {}
    torch.manual_seed(0)
    module = build(name, d_model=32, num_heads=4, causal=True, **options).eval()
    with torch.no_grad():
        module.core.gamma.normal_(0.0, 0.5)  # larger than init so the scores matter
    x = torch.randn(2, 20, 32)
    y32, _ = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = module(x)
    assert y16.dtype == torch.bfloat16
    error = (y16.float() - y32).norm() / y32.norm()
    assert error < 3e-2, f"bf16 relative error {error:.3g}"


def test_flags_and_options() -> None:
    for name in ("gau", "flash"):
        cls = get(name)
        assert cls.replaces_ffn and cls.supports_causal and cls.supports_padding
        assert not cls.needs_cross_layer_state and not cls.stochastic_structure
    flash = build("flash", d_model=16, num_heads=2)
    assert flash.options.chunk_size == 256 and flash.options.qk_dim == 128
    assert flash.core.hidden_dim == 32
    for bad in ({"chunk_size": 0}, {"qk_dim": 0}, {"expansion": 0}, {"chunk": 4}):
        with pytest.raises(ValueError):
            build("flash", d_model=16, num_heads=2, **bad)
    with pytest.raises(ValueError):
        build("gau", d_model=16, num_heads=2, score_divisor=0)
    with pytest.raises(ValueError):
        build("gau", d_model=16, num_heads=2, rotary=True, qk_dim=5)
