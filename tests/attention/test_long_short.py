"""Transformer-LS (attention_spec.md §5): reductions to SDPA and to mean(V), a dense float64
oracle of the one-softmax-over-both-branches rule, causality, padding, precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attention
from attention import long_short
from tests.attention.probes import causality_probe, dense_softmax_oracle, padding_probe

F64 = torch.float64
D, H = 8, 2


def build(causal=False, seed=0, **options):
    torch.manual_seed(seed)
    module = attention.build("long_short", d_model=D, num_heads=H, causal=causal, **options)
    module = module.double().eval()
    for norm in (module.norm_local, module.norm_global):  # non-trivial DualLN affine maps
        if isinstance(norm, torch.nn.LayerNorm):
            torch.nn.init.normal_(norm.weight, 1.0, 0.3)
            torch.nn.init.normal_(norm.bias, 0.0, 0.3)
    return module


def heads(module, t):
    return module.split_heads(t)


def project_keys(module, x, k, v, valid, group):
    """Dense P (softmax over the positions of each group, pads excluded), K̄ and V̄ in float64."""
    b, n, _ = x.shape
    logits = module.landmark(x).view(b, n // group, group, H, module.rank).permute(0, 3, 1, 4, 2)
    logits = logits.masked_fill(~valid.view(b, 1, n // group, 1, group), float("-inf"))
    weights = torch.nan_to_num(torch.softmax(logits, dim=-1))  # empty chunk -> zero row
    out = []
    for t in (k, v):
        projected = weights @ t.reshape(b, H, n // group, group, -1)
        projected = projected.reshape(b, H, -1, t.shape[-1])
        out.append(heads(module, module.norm_global(module.merge_heads(projected))))
    return out


def dense_long_short(module, x, valid):
    """Float64 oracle: full n×n window mask + projected keys, one softmax, then W_o."""
    b, n0, _ = x.shape
    group = module.options.chunk_size if module.causal else n0
    pad = (-n0) % group
    x = F.pad(x, [0, 0, 0, pad])
    valid = F.pad(valid, [0, pad], value=False)
    n = n0 + pad
    q = heads(module, module.query(x)) * (D // H) ** -0.5
    k_raw, v_raw = module.key(x), module.value(x)
    k_loc, v_loc = (heads(module, module.norm_local(t)) for t in (k_raw, v_raw))
    t_idx, s_idx = torch.arange(n)[:, None], torch.arange(n)[None, :]
    w = module.window_size
    if module.causal:
        window = (s_idx <= t_idx) & (s_idx > t_idx - w)
    else:
        w = min(w, n0)
        extension = max(w // 2, 1)
        start = (t_idx // max(w, 1)) * w
        window = (s_idx >= start - extension) & (s_idx < start + w + extension) & (w > 0)
    own = (t_idx == s_idx) & (module.window_size > 0)  # padded queries see themselves
    window = (window & valid[:, None, None, :]) | own
    scores = [(q @ k_loc.transpose(-1, -2)).masked_fill(~window, float("-inf"))]
    values = [v_loc]
    if module.rank > 0:
        source = (heads(module, k_raw), heads(module, v_raw)) if module.causal else (k_loc, v_loc)
        k_bar, v_bar = project_keys(module, x, *source, valid, group)
        long_scores = q @ k_bar.transpose(-1, -2)
        if module.causal:
            key_chunk = torch.arange(n // group).repeat_interleave(module.rank)
            has_token = valid.view(b, n // group, group).any(-1).repeat_interleave(module.rank, -1)
            allowed = (key_chunk[None, :] < (t_idx // group)) & has_token[:, None, None, :]
            long_scores = long_scores.masked_fill(~allowed, float("-inf"))
        scores.insert(0, long_scores)
        values.insert(0, v_bar)
    probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
    out = probs @ torch.cat(values, dim=-2)
    y = module.out(module.merge_heads(out))[:, :n0]
    return y * valid[:, :n0, None]


CONFIGS = [
    dict(causal=False, window_size=4, num_landmarks=3),
    dict(causal=False, window_size=3, num_landmarks=2),  # odd w, partial last segment
    dict(causal=False, window_size=1, num_landmarks=1),  # the paper's "best LRA" setting
    dict(causal=False, window_size=0, num_landmarks=4),
    dict(causal=False, window_size=5, num_landmarks=0),
    dict(causal=True, window_size=3, chunk_size=2, chunk_rank=2),
    dict(causal=True, window_size=4, chunk_size=3, chunk_rank=1),
    dict(causal=True, window_size=2, chunk_size=4, chunk_rank=0),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("padded", [False, True])
def test_matches_dense_oracle(config, padded):
    module = build(**config)
    x = torch.randn(2, 13, D, dtype=F64)
    valid = torch.ones(2, 13, dtype=torch.bool)
    if padded:
        valid[0, 9:] = False
    y, _ = module(x, key_padding_mask=valid if padded else None)
    torch.testing.assert_close(y, dense_long_short(module, x, valid), atol=1e-10, rtol=0)


def test_causal_blocks_smaller_than_the_window(monkeypatch):
    """Query blocks below w (the speed knob for large windows) keep the same keys."""
    monkeypatch.setattr(long_short, "CAUSAL_BLOCK", 2)
    module = build(causal=True, window_size=5, chunk_size=2, chunk_rank=1)
    assert module._block(13) == 2
    x = torch.randn(2, 13, D, dtype=F64)
    valid = torch.ones(2, 13, dtype=torch.bool)
    valid[1, 10:] = False
    y, _ = module(x, key_padding_mask=valid)
    torch.testing.assert_close(y, dense_long_short(module, x, valid), atol=1e-10, rtol=0)
    causality_probe(module, x, 6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_no_projection_full_window_no_norm_is_sdpa(causal, padded):
    rank = {"chunk_rank": 0} if causal else {"num_landmarks": 0}
    module = build(causal=causal, window_size=16, dual_ln=False, **rank)
    x = torch.randn(2, 11, D, dtype=F64)
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, 7:] = not padded
    y, _ = module(x, key_padding_mask=valid if padded else None)
    q, k, v = (heads(module, proj(x)) for proj in (module.query, module.key, module.value))
    allowed = valid[:, None, None, :].expand(2, 1, 11, 11)
    if causal:
        allowed = allowed & torch.ones(11, 11, dtype=torch.bool).tril()
    expected = module.out(module.merge_heads(dense_softmax_oracle(q, k, v, allowed=allowed)))
    expected = expected * valid[..., None]
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=0)
    if not padded:  # and SDPA itself
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(y, module.out(module.merge_heads(sdpa)), atol=1e-10, rtol=0)


def test_uniform_projection_without_window_gives_mean_of_values():
    module = build(window_size=0, num_landmarks=3, dual_ln=False)
    torch.nn.init.zeros_(module.landmark.weight)
    torch.nn.init.zeros_(module.landmark.bias)
    x = torch.randn(2, 10, D, dtype=F64)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, 6:] = False
    y, _ = module(x, key_padding_mask=valid)
    v = module.value(x) * valid[..., None]
    mean_v = v.sum(1, keepdim=True) / valid.sum(1)[:, None, None]
    expected = module.out(mean_v).expand(-1, 10, -1) * valid[..., None]
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)


def test_causality_probe_and_bidirectional_fails_it():
    x = torch.randn(2, 14, D, dtype=F64)
    causal = build(causal=True, window_size=3, chunk_size=2, chunk_rank=2)
    for t in (0, 1, 4, 7, 13):
        causality_probe(causal, x, t)
    bidirectional = build(window_size=4, num_landmarks=2)
    with pytest.raises(AssertionError):  # guards against mislabelling (spec §5 test 4)
        causality_probe(bidirectional, x, 6)


@pytest.mark.parametrize("config", CONFIGS[:2] + CONFIGS[3:6], ids=str)
def test_padding_probe(config):
    padding_probe(build(**config), torch.randn(2, 11, D, dtype=F64), length=6)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[5]], ids=str)
def test_gradcheck(config):
    module = build(**config)
    x = torch.randn(2, 8, D, dtype=F64, requires_grad=True)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 6:] = False
    assert torch.autograd.gradcheck(lambda t: module(t, key_padding_mask=valid)[0], (x,))


def test_defaults_flags_and_validation():
    cls = attention.registry.get("long_short")
    assert cls.supports_causal and cls.supports_padding and not cls.stochastic_structure
    bidirectional = attention.build("long_short", d_model=D, num_heads=H)
    causal = attention.build("long_short", d_model=D, num_heads=H, causal=True)
    assert (bidirectional.window_size, bidirectional.rank) == (8, 32)
    assert (causal.window_size, causal.rank, causal.options.chunk_size) == (512, 1, 16)
    bad = [
        dict(causal=True, window_size=0),
        dict(window_size=0, num_landmarks=0),
        dict(window_size=-1),
        dict(chunk_size=0),
        dict(unknown=1),
    ]
    for options in bad:
        with pytest.raises(ValueError):
            attention.build("long_short", d_model=D, num_heads=H, **options)


@pytest.mark.parametrize("causal", [False, True])
def test_fp32_matches_fp64_and_bf16_is_close(causal):
    torch.manual_seed(0)
    options = dict(window_size=8, chunk_size=4) if causal else dict(window_size=4, num_landmarks=4)
    module = attention.build("long_short", d_model=32, num_heads=2, causal=causal, **options)
    module.eval()
    x = torch.randn(2, 24, 32)
    y32, _ = module(x)
    y64, _ = module.double()(x.double())
    torch.testing.assert_close(y32.double(), y64, atol=1e-5, rtol=1e-4)
    module.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = module(x.bfloat16())
    relative = ((y16.float() - y32).norm() / y32.norm()).item()
    assert relative < 3e-2, f"bf16 relative error {relative}"
    y_params16, _ = module.bfloat16()(x.bfloat16())  # bf16 parameters, no autocast
    relative = ((y_params16.float() - y32).norm() / y32.norm()).item()
    assert relative < 5e-2, f"bf16-parameter relative error {relative}"


def test_dropout_only_in_training():
    module = build(window_size=4, num_landmarks=2, dropout=0.5)
    x = torch.randn(1, 8, D, dtype=F64)
    assert torch.equal(module(x)[0], module(x)[0])
    module.train()
    assert not torch.equal(module(x)[0], module(x)[0])
