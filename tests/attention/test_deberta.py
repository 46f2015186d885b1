"""DeBERTa disentangled attention (attention_spec.md §10): reductions, naive loops, probes.

Shape letters: B batch, H heads, n length, D model width, d head width, k bucket span.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attention.deberta import DebertaAttention, relative_buckets
from attention.registry import build, get
from tests.attention.probes import causality_probe, dense_softmax_oracle, padding_probe

D_MODEL, HEADS = 8, 2
SMALL = {"position_buckets": 4, "max_relative_positions": 10}


def make(causal: bool = False, seed: int = 0, **options) -> DebertaAttention:
    module = build(
        "deberta", d_model=D_MODEL, num_heads=HEADS, causal=causal, **{**SMALL, **options}
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return module.double().eval()


def heads(module: nn.Module, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return module.split_heads(linear(x))


def bucket_scalar(r: int, buckets: int, max_distance: int) -> int:
    """The log bucket of one distance, in plain Python (independent of the tensor version)."""
    half = buckets // 2
    if buckets == 0 or abs(r) <= half:
        return r
    steps = math.ceil(math.log(abs(r) / half) / math.log((max_distance - 1) / half) * (half - 1))
    return int(math.copysign(half + steps, r))


def naive_output(module: DebertaAttention, x: torch.Tensor, mask=None) -> torch.Tensor:
    """Scores built entry by entry with a quadruple loop, then the dense softmax oracle."""
    options = module.options
    span = options.span

    def delta(i: int, j: int) -> int:
        bucket = bucket_scalar(i - j, options.position_buckets, options.max_relative_positions)
        return max(-span, min(span - 1, bucket)) + span

    table = module.relative_table()
    key_proj = module.key if options.share_att_key else module.position_key
    query_proj = module.query if options.share_att_key else module.position_query
    position_key = key_proj(table).view(2 * span, HEADS, -1)
    position_query = query_proj(table).view(2 * span, HEADS, -1)
    q, k, v = (heads(module, lin, x) for lin in (module.query, module.key, module.value))
    batch, _, length, _ = q.shape
    scores = torch.zeros(batch, HEADS, length, length, dtype=torch.float64)
    for b in range(batch):
        for h in range(HEADS):
            for i in range(length):
                for j in range(length):
                    total = q[b, h, i] @ k[b, h, j]
                    if "c2p" in options.pos_att_type:
                        total = total + q[b, h, i] @ position_key[delta(i, j), h]
                    if "p2c" in options.pos_att_type:
                        p = delta(i, j) if options.p2c_index == "code" else delta(j, i)
                        total = total + k[b, h, j] @ position_query[p, h]
                    scores[b, h, i, j] = total
    allowed = torch.ones(batch, 1, length, length, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    if module.causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
    scale = 1.0 / math.sqrt(module.head_dim * (1 + len(options.pos_att_type)))
    zeros = torch.zeros_like(q)
    # softmax(scale·Ã) v through the oracle: q = 0 leaves only the bias term.
    mixed = dense_softmax_oracle(zeros, k, v, allowed=allowed, bias=scores * scale)
    y = module.out(module.merge_heads(mixed))
    return y if mask is None else y * mask[..., None]


@pytest.mark.parametrize(
    "options",
    [
        {"p2c_index": "code"},
        {"p2c_index": "paper"},
        {"position_buckets": 0, "max_relative_positions": 4},  # plain clip at ±k, k = 4
        {"share_att_key": False, "norm_rel_embeddings": False},
        {"pos_att_type": ("c2p",)},
        {"pos_att_type": ("p2c",), "p2c_index": "paper"},
    ],
)
def test_gathers_equal_naive_loop(options: dict) -> None:
    module = make(**options)
    x = torch.randn(2, 12, D_MODEL, dtype=torch.float64)  # n = 12 > k: clipping is exercised
    y, state = module(x)
    assert state is None
    torch.testing.assert_close(y, naive_output(module, x), atol=1e-10, rtol=0)


def test_p2c_conventions_differ() -> None:
    x = torch.randn(1, 9, D_MODEL, dtype=torch.float64)
    code = make(p2c_index="code")
    paper = make(p2c_index="paper")
    assert (code(x)[0] - paper(x)[0]).abs().max() > 1e-4


def reduce_to_content(module: DebertaAttention, query_bias: bool) -> None:
    """Zero P (hence K^r = b_k, Q^r = b_q) and the key bias; keep or zero the query bias."""
    with torch.no_grad():
        module.relative_table.embeddings.zero_()
        module.relative_table.norm.bias.zero_()
        module.key.bias.zero_()
        if not query_bias:
            module.query.bias.zero_()


@pytest.mark.parametrize("causal", [False, True])
def test_position_terms_off_is_sdpa_with_scale_of_three_terms(causal: bool) -> None:
    module = make(causal)
    reduce_to_content(module, query_bias=False)
    x = torch.randn(2, 10, D_MODEL, dtype=torch.float64)
    q, k, v = (heads(module, lin, x) for lin in (module.query, module.key, module.value))
    allowed = torch.ones(10, 10, dtype=torch.bool).tril() if causal else None
    scale = 1.0 / math.sqrt(3 * module.head_dim)
    expected = module.out(
        module.merge_heads(dense_softmax_oracle(q, k, v, allowed=allowed, scale=scale))
    )
    y, _ = module(x)
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=0)
    wrong_scale = module.out(module.merge_heads(dense_softmax_oracle(q, k, v, allowed=allowed)))
    assert (y - wrong_scale).abs().max() > 1e-4  # 1/sqrt(d) is not the reduction


def test_zero_table_with_query_bias_is_not_content_only() -> None:
    # Spec §10 test 1: with P = 0, p2c still adds K_j·b_q, which varies along the row.
    module = make()
    reduce_to_content(module, query_bias=True)
    x = torch.randn(2, 10, D_MODEL, dtype=torch.float64)
    q, k, v = (heads(module, lin, x) for lin in (module.query, module.key, module.value))
    scale = 1.0 / math.sqrt(3 * module.head_dim)
    content_only = module.out(module.merge_heads(dense_softmax_oracle(q, k, v, scale=scale)))
    assert (module(x)[0] - content_only).abs().max() > 1e-4


def test_bucket_function() -> None:
    distance = torch.arange(-600, 601)
    buckets = relative_buckets(distance, 256, 512)
    assert torch.equal(buckets[distance.abs() <= 128], distance[distance.abs() <= 128])
    assert torch.equal(buckets, -buckets.flip(0))
    assert bool((buckets[1:] >= buckets[:-1]).all())
    assert buckets[distance == 511].item() == 255
    assert buckets[distance == 129].item() == 129
    for r in (-300, -130, 131, 200, 511, 600):
        assert buckets[distance == r].item() == bucket_scalar(r, 256, 512)


@pytest.mark.parametrize("t", [0, 3, 7, 10])
def test_causality_probe(t: int) -> None:
    causality_probe(make(causal=True), torch.randn(2, 11, D_MODEL, dtype=torch.float64), t)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_probe_and_naive_loop_with_mask(causal: bool) -> None:
    module = make(causal)
    x = torch.randn(2, 11, D_MODEL, dtype=torch.float64)
    padding_probe(module, x, length=7)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 6:] = False
    y, _ = module(x, key_padding_mask=mask)
    torch.testing.assert_close(y, naive_output(module, x, mask), atol=1e-10, rtol=0)


def test_relative_shift_invariance() -> None:
    module = make()
    tokens = torch.randn(2, 6, D_MODEL, dtype=torch.float64)
    y, _ = module(tokens)
    offset = 5
    x = torch.randn(2, 14, D_MODEL, dtype=torch.float64) * 4.0
    x[:, offset : offset + 6] = tokens
    mask = torch.zeros(2, 14, dtype=torch.bool)
    mask[:, offset : offset + 6] = True
    shifted, _ = module(x, key_padding_mask=mask)
    torch.testing.assert_close(shifted[:, offset : offset + 6], y, atol=1e-12, rtol=0)
    assert shifted[:, :offset].abs().max() == 0


def test_shared_table_across_layers() -> None:
    options = get("deberta").Options(**SMALL)
    table = DebertaAttention.build_shared(D_MODEL, HEADS, options)
    assert tuple(table.embeddings.shape) == (2 * 4, D_MODEL)
    layers = nn.ModuleList(
        build("deberta", d_model=D_MODEL, num_heads=HEADS, layer_idx=i, shared=table, **SMALL)
        for i in range(2)
    )
    assert layers[0].relative_table is layers[1].relative_table is table
    assert sum(p is table.embeddings for p in layers.parameters()) == 1  # counted once
    x = torch.randn(2, 6, D_MODEL)
    layers[0](x)[0].sum().backward()
    grad_one = table.embeddings.grad.clone()
    layers[1](layers[0](x)[0])[0].sum().backward()
    assert not torch.allclose(table.embeddings.grad, 2 * grad_one)  # both layers contributed
    with pytest.raises(ValueError):
        build("deberta", d_model=D_MODEL, num_heads=HEADS, shared=nn.Linear(2, 2), **SMALL)
    separate = build("deberta", d_model=D_MODEL, num_heads=HEADS, **SMALL)
    assert separate.relative_table is not table


def test_gradcheck() -> None:
    module = make(causal=True)
    x = torch.randn(2, 8, D_MODEL, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    assert torch.autograd.gradcheck(lambda t: module(t, key_padding_mask=mask)[0], (x,))


def test_bf16_autocast_is_close_to_fp32() -> None:
    torch.manual_seed(0)
    module = build(
        "deberta", d_model=32, num_heads=4, position_buckets=16, max_relative_positions=64
    )
    module.eval()
    x = torch.randn(2, 40, 32)
    y32, _ = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = module(x)
    error = (y16.float() - y32).norm() / y32.norm()
    assert error < 3e-2, f"bf16 relative error {error:.3g}"


def test_flags_and_options() -> None:
    cls = get("deberta")
    assert cls.supports_causal and cls.supports_padding and not cls.replaces_ffn
    assert not cls.needs_cross_layer_state and not cls.stochastic_structure
    module = build("deberta", d_model=16, num_heads=2)
    assert module.options.position_buckets == 256 and module.options.max_relative_positions == 512
    assert tuple(module.relative_table.embeddings.shape) == (512, 16)
    bad_options = [
        {"position_buckets": -1},
        {"pos_att_type": ("c2p", "c2p")},
        {"pos_att_type": ("p2p",)},
        {"position_buckets": 256, "max_relative_positions": 100},
        {"p2c_index": "other"},
        {"buckets": 4},
    ]
    for bad in bad_options:
        with pytest.raises(ValueError):
            build("deberta", d_model=16, num_heads=2, **bad)
