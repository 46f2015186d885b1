"""Linformer: identity projections with k = n equal SDPA; pads zeroed before compression."""

from __future__ import annotations

import pytest
import torch

import attention
from tests.attention.probes import dense_softmax_oracle, padding_probe

D, H = 8, 2


def build(**options) -> attention.Attention:
    return attention.build("linformer", d_model=D, num_heads=H, **options).double().eval()


def set_identity(module, n: int) -> None:
    with torch.no_grad():
        for projection in module.projections():
            projection.weight.copy_(torch.eye(n, dtype=projection.weight.dtype))


def test_identity_projection_with_k_equal_n_is_full_attention() -> None:
    torch.manual_seed(0)
    n = 12
    module = build(k=n, n_max=n)
    set_identity(module, n)
    full = attention.build("full", d_model=D, num_heads=H).double().eval()
    with torch.no_grad():
        full.qkv.weight.copy_(torch.cat([module.query.weight, module.key_value.weight]))
        full.qkv.bias.copy_(torch.cat([module.query.bias, module.key_value.bias]))
        full.out.load_state_dict(module.out.state_dict())
    x = torch.randn(2, n, D, dtype=torch.float64)
    torch.testing.assert_close(module(x)[0], full(x)[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("share_kv", [False, True])
def test_matches_dense_low_rank_oracle_fp64_and_fp32(share_kv: bool) -> None:
    torch.manual_seed(1)
    n, k = 20, 6
    module = build(k=k, n_max=32, share_kv=share_kv)
    x = torch.randn(2, n, D, dtype=torch.float64)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, 15:] = False
    mask[0, 4] = False
    # fairseq ordering: compress the (pad-zeroed) input, then project keys and values.
    x_zeroed = x * mask[..., None]
    e_proj, f_proj = (p.weight[:, :n].double() for p in module.projections())
    weight_k, weight_v = module.key_value.weight.chunk(2)
    bias_k, bias_v = module.key_value.bias.chunk(2)
    q = module.split_heads(module.query(x))
    key = module.split_heads((e_proj @ x_zeroed) @ weight_k.T + bias_k)
    value = module.split_heads((f_proj @ x_zeroed) @ weight_v.T + bias_v)
    reference = dense_softmax_oracle(q, key, value)
    reference = module.out(module.merge_heads(reference)) * mask[..., None]
    y, state = module(x, key_padding_mask=mask)
    assert state is None
    torch.testing.assert_close(y, reference, atol=1e-10, rtol=0)
    y32, _ = module.float()(x.float(), key_padding_mask=mask)
    torch.testing.assert_close(y32.double(), reference, atol=1e-5, rtol=1e-4)


def test_padding_probe() -> None:
    torch.manual_seed(2)
    padding_probe(build(k=5, n_max=16), torch.randn(2, 16, D, dtype=torch.float64), length=11)


def test_sequence_longer_than_n_max_raises() -> None:
    module = build(k=4, n_max=8)
    module(torch.randn(1, 8, D, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"n_max \(8\)"):
        module(torch.randn(1, 9, D, dtype=torch.float64))


def test_sharing_modes_change_parameter_count() -> None:
    headwise = build(k=4, n_max=16)
    tied = build(k=4, n_max=16, share_kv=True)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(headwise) - count(tied) == 4 * 16
    first, second = tied.projections()
    assert first is second
    shared = attention.get("linformer").build_shared(D, H, tied.options.model_copy())
    assert shared is None
    layerwise_options = attention.parse_options(
        "linformer", {"share_kv": True, "share_layers": True, "k": 4, "n_max": 16}
    )
    shared = attention.get("linformer").build_shared(D, H, layerwise_options)
    layers = [
        attention.build(
            "linformer",
            d_model=D,
            num_heads=H,
            shared=shared,
            layer_idx=i,
            **layerwise_options.model_dump(),
        )
        for i in range(2)
    ]
    assert all(layer.projections()[0] is shared for layer in layers)
    # The model owns the shared table once (moe/transformer.py registers it); layers do not.
    assert count(layers[0]) == count(tied) - 4 * 16
    with pytest.raises(ValueError, match="share_layers"):
        attention.build("linformer", d_model=D, num_heads=H, share_layers=True)


def test_gradcheck() -> None:
    torch.manual_seed(3)
    module = build(k=4, n_max=12)
    x = torch.randn(2, 10, D, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False
    assert torch.autograd.gradcheck(lambda t: module(t, key_padding_mask=mask)[0], (x,))


def test_bf16_close_to_fp32() -> None:
    torch.manual_seed(4)
    module = attention.build("linformer", d_model=32, num_heads=2, k=16, n_max=64).eval()
    x = torch.randn(2, 64, 32)
    expected = module(x)[0]
    got = module.to(torch.bfloat16)(x.to(torch.bfloat16))[0].float()
    relative = (got - expected).norm() / expected.norm()
    assert relative < 3e-2, f"bf16 relative error {relative:.3g}"


def test_flags_and_invalid_options() -> None:
    cls = attention.get("linformer")
    assert not cls.supports_causal and cls.needs_fixed_max_len and cls.supports_padding
    with pytest.raises(ValueError, match="causal"):
        attention.build("linformer", d_model=D, num_heads=H, causal=True)
    with pytest.raises(ValueError, match="k"):
        attention.build("linformer", d_model=D, num_heads=H, k=0)
    with pytest.raises(ValueError, match="share_kv"):
        attention.build("linformer", d_model=D, num_heads=H, share_layers=True, share_kv=False)


def test_n_max_defaults_to_the_model_context_length() -> None:
    from moe.transformer import AttentionConfig, ModelConfig, Transformer

    shape = dict(mode="masked_lm", d_model=D, num_heads=H, num_layers=1, d_ff=16)
    for options, n_max in (({"k": 4}, 48), ({"k": 4, "n_max": 64}, 64)):
        model = Transformer(
            ModelConfig(max_seq_len=48, **shape),
            None,
            AttentionConfig(name="linformer", options=options),
            vocab_size=260,
        )
        key, value = model.blocks[0].attention.projections()
        assert key.weight.shape == value.weight.shape == (4, n_max)
    with pytest.raises(ValueError, match="linformer needs n_max"):
        attention.build("linformer", d_model=D, num_heads=H, k=4)
