"""The transformer and its model hooks (per-layer attention, shared state), with fake attention classes.

Shape letters: B batch, n sequence length, D model width, V vocabulary.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attention import Attention, AttentionOptions, register
from moe.blocks import TransformerBlock, register_input
from moe.config import MoEConfig
from moe.layer import MoELayer
from moe.transformer import (
    AttentionConfig,
    LayerAttentionConfig,
    ModelConfig,
    Transformer,
    check_attention,
    count_parameters,
    is_moe_block,
)

VOCAB = 40


class ScaleOptions(AttentionOptions):
    scale: float = 1.0


@register
class MixAttention(Attention):
    """Test method: y = scale * mean over allowed keys of W x (causal or not), masks honoured."""

    name = "test_mix"
    supports_causal = True
    Options = ScaleOptions
    seen_masks: ClassVar[list[Any]] = []

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x, *, key_padding_mask=None, state=None):
        MixAttention.seen_masks.append(key_padding_mask)
        n = x.shape[1]
        allowed = torch.ones(n, n, dtype=torch.bool)
        if self.causal:
            allowed = allowed.tril()
        weights = allowed[None].float().expand(x.shape[0], n, n)
        if key_padding_mask is not None:
            weights = weights * key_padding_mask[:, None, :].float()
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1.0)
        return self.options.scale * weights.to(x.dtype) @ self.proj(x), None


@register
class EncoderOnlyAttention(MixAttention):
    name = "test_encoder_only"
    supports_causal = False


@register
class UnitAttention(MixAttention):
    """Replaces the FFN (like GAU/FLASH): the block must be x + attn(norm(x)) only."""

    name = "test_unit"
    replaces_ffn = True


@register
class StatefulAttention(MixAttention):
    """Cross-layer state: returns the list of layer indices that ran before it, plus itself."""

    name = "test_state"
    needs_cross_layer_state = True
    received: ClassVar[list[tuple[int, Any]]] = []

    def forward(self, x, *, key_padding_mask=None, state=None):
        StatefulAttention.received.append((self.layer_idx, state))
        y, _ = super().forward(x, key_padding_mask=key_padding_mask)
        return y, (state or []) + [self.layer_idx]


@register
class SharedAttention(MixAttention):
    """Shares one module across layers (like DeBERTa's relative table)."""

    name = "test_shared"
    build_calls: ClassVar[int] = 0

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        self.table = kwargs["shared"]

    @classmethod
    def build_shared(cls, d_model, num_heads, options):
        cls.build_calls += 1
        return nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, *, key_padding_mask=None, state=None):
        y, _ = super().forward(x, key_padding_mask=key_padding_mask)
        return y + self.table(x), None


def make_model(
    mode: str = "causal_lm", moe: MoEConfig | None = None, attention=None, **kw
) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        mode=mode, d_model=16, num_layers=4, num_heads=2, d_ff=32, max_seq_len=12, **kw
    )
    moe = moe if moe is not None else MoEConfig(num_experts=4, capacity_factor=None)
    return Transformer(config, moe, attention or AttentionConfig(name="test_mix"), vocab_size=VOCAB)


def test_moe_every_other_block_and_dense_model():
    model = make_model()
    assert [b.is_moe for b in model.blocks] == [False, True, False, True]
    assert [is_moe_block(i, MoEConfig(num_experts=2, every=1)) for i in range(3)] == [True] * 3
    dense = Transformer(
        ModelConfig(d_model=16, num_layers=2, num_heads=2, d_ff=32),
        None,
        AttentionConfig(),
        vocab_size=VOCAB,
    )
    assert not any(b.is_moe for b in dense.blocks)
    counts = count_parameters(model)
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert counts["expert"] == expert and counts["active"] == counts["total"] - expert + expert // 4


def test_loss_is_cross_entropy_plus_weighted_aux_and_z_against_float64():
    moe = MoEConfig(num_experts=4, aux_loss_coef=0.5, z_loss_coef=0.25, capacity_factor=None)
    model = make_model(moe=moe).double()
    tokens = torch.randint(0, VOCAB, (3, 9))
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    reference_ce = F.cross_entropy(
        out.logits.reshape(-1, VOCAB).double(), tokens[:, 1:].reshape(-1)
    )
    assert torch.allclose(out.ce_loss.double(), reference_ce, atol=1e-6)
    # aux and z are sums of the two MoE layers' own losses, collected explicitly.
    aux, z = [], []

    def record(module, inputs, output) -> None:
        aux.append(output.aux_loss)
        z.append(output.z_loss)

    for block in model.blocks:
        if block.is_moe:
            block.ffn.register_forward_hook(record)
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    assert len(aux) == 2 and len(out.routing) == 2
    assert torch.allclose(out.aux_loss.double(), (aux[0] + aux[1]).double())
    expected = reference_ce + 0.5 * (aux[0] + aux[1]).double() + 0.25 * (z[0] + z[1]).double()
    assert torch.allclose(out.loss.double(), expected, atol=1e-6)


def test_causal_lm_does_not_see_the_future_and_encoders_do():
    tokens = torch.randint(0, VOCAB, (2, 10))
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % VOCAB
    causal = make_model("causal_lm").eval()
    a, b = causal(tokens).logits, causal(changed).logits
    assert torch.equal(a[:, :6], b[:, :6]) and not torch.allclose(a[:, 6:], b[:, 6:])
    encoder = make_model("masked_lm").eval()
    a, b = encoder(tokens).logits, encoder(changed).logits
    assert a.shape == (2, 10, VOCAB) and not torch.allclose(a[:, :6], b[:, :6])
    assert encoder.layers[-1].transform is not None  # MLM head: dense, gelu, norm
    assert encoder.layers[-1].decoder.weight is encoder.layers[0].embed.token.weight  # tied


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classify_head_pools_real_tokens_only(pooling):
    model = make_model("classify", num_classes=3, pooling=pooling).eval()
    tokens = torch.randint(0, VOCAB, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    noisy = tokens.clone()
    noisy[0, 5:] = (noisy[0, 5:] + 7) % VOCAB
    a = model(tokens, padding_mask=mask).logits
    b = model(noisy, padding_mask=mask).logits
    assert a.shape == (2, 3)
    assert torch.allclose(a, b, atol=1e-6)  # padded content never reaches the pooled features
    labels = torch.tensor([0, 2])
    out = model(tokens, targets=labels, padding_mask=mask)
    assert torch.allclose(out.ce_loss, F.cross_entropy(a.float(), labels), atol=1e-6)


def test_padding_mask_is_threaded_to_every_attention_layer():
    MixAttention.seen_masks.clear()
    model = make_model("masked_lm")
    mask = torch.ones(2, 8, dtype=torch.bool)
    model(torch.randint(0, VOCAB, (2, 8)), padding_mask=mask)
    assert len(MixAttention.seen_masks) == 4 and all(m is mask for m in MixAttention.seen_masks)


def test_per_layer_override_builds_that_method_with_its_options():
    attn = AttentionConfig(
        name="test_mix",
        options={"scale": 2.0},
        layers={"2": LayerAttentionConfig(name="full", options={"bias": False})},
    )
    model = make_model(attention=attn)
    names = [type(b.attention).name for b in model.blocks]
    assert names == ["test_mix", "test_mix", "full", "test_mix"]
    assert (
        model.blocks[0].attention.options.scale == 2.0
        and model.blocks[2].attention.qkv.bias is None
    )
    assert [b.attention.layer_idx for b in model.blocks] == [0, 1, 2, 3]


def test_causal_mode_with_encoder_only_method_fails_at_config_time():
    attn = AttentionConfig(
        name="test_mix", layers={"3": LayerAttentionConfig(name="test_encoder_only")}
    )
    with pytest.raises(
        ValueError, match=r"^attention\.layers\.3\.name: layer 3 uses 'test_encoder_only'"
    ):
        check_attention(ModelConfig(num_layers=4), attn)
    check_attention(ModelConfig(num_layers=4, mode="masked_lm"), attn)  # fine in encoder mode
    with pytest.raises(ValueError, match=r"attention\.layers\.7: layer index"):
        check_attention(
            ModelConfig(num_layers=4),
            AttentionConfig(layers={"7": LayerAttentionConfig(name="full")}),
        )
    with pytest.raises(ValueError, match=r"^attention: unknown attention 'nope'"):
        check_attention(ModelConfig(), AttentionConfig(name="nope"))
    with pytest.raises(ValueError, match=r"^attention: attention 'test_mix' options: scalee"):
        check_attention(ModelConfig(), AttentionConfig(name="test_mix", options={"scalee": 1}))


def test_replaces_ffn_block_is_residual_attention_only():
    attn = AttentionConfig(name="test_mix", layers={"1": LayerAttentionConfig(name="test_unit")})
    model = make_model(attention=attn).double()
    block = model.blocks[1]
    assert block.ffn is None and block.norm2 is None and not block.is_moe
    assert sum(b.is_moe for b in model.blocks) == 1  # block 1 would have been MoE; block 3 still is
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    acts = model.layers[0](torch.randint(0, VOCAB, (2, 5)), None)
    acts = type(acts)(hidden=x, padding_mask=None, aux_loss=acts.aux_loss, z_loss=acts.z_loss)
    out = block(acts)
    expected = x + block.attention(block.norm1(x))[0]
    assert torch.allclose(out.hidden, expected, atol=1e-12)


def test_cross_layer_state_flows_between_layers_of_the_same_method():
    StatefulAttention.received.clear()
    attn = AttentionConfig(
        name="test_state",
        layers={"1": LayerAttentionConfig(name="test_mix")},
    )
    model = make_model(attention=attn)
    model(torch.randint(0, VOCAB, (1, 6)))
    assert StatefulAttention.received == [(0, None), (2, [0]), (3, [0, 2])]
    StatefulAttention.received.clear()
    model(torch.randint(0, VOCAB, (1, 6)))  # a new forward starts without state
    assert StatefulAttention.received[0] == (0, None)


def test_shared_module_built_once_per_method_and_registered_once():
    SharedAttention.build_calls = 0
    attn = AttentionConfig(name="test_shared", layers={"2": LayerAttentionConfig(name="test_mix")})
    model = make_model(attention=attn)
    assert SharedAttention.build_calls == 1
    tables = {
        id(b.attention.table) for b in model.blocks if type(b.attention).name == "test_shared"
    }
    assert (
        len(tables) == 1
        and model.shared_attention["test_shared"] is model.blocks[0].attention.table
    )
    names = [n for n, _ in model.named_parameters() if "table" in n or "shared_attention" in n]
    assert names == ["shared_attention.test_shared.weight"]  # one parameter, not one per layer
    out = model(torch.randint(0, VOCAB, (2, 6)), targets=torch.randint(0, VOCAB, (2, 6)))
    out.loss.backward()
    assert model.shared_attention["test_shared"].weight.grad.abs().sum() > 0


def test_input_embedding_hook_replaces_token_embedding():
    class Features(nn.Module):
        def __init__(self, d_model: int, vocab_size: int | None, max_seq_len: int) -> None:
            super().__init__()
            self.proj = nn.Linear(3, d_model)

        def forward(self, x):  # x: [B, N, 3] features -> [B, N, D]
            return self.proj(x)

    register_input("test_features")(Features)
    torch.manual_seed(0)
    config = ModelConfig(
        mode="classify", input="test_features", d_model=16, num_layers=2, num_heads=2, d_ff=32
    )
    model = Transformer(config, MoEConfig(num_experts=2), AttentionConfig(name="test_mix"))
    assert isinstance(model.layers[0].embed, Features)
    assert model(torch.randn(2, 5, 3)).logits.shape == (2, 2)
    with pytest.raises(ValueError, match="model.input 'pixels' is unknown"):
        check_attention(ModelConfig(input="pixels"), AttentionConfig())


def test_flat_layer_list_runs_stage_by_stage():
    model = make_model().eval()
    tokens = torch.randint(0, VOCAB, (2, 7))
    acts = model.layers[0](tokens, None)
    for layer in model.layers[1:-1]:
        assert isinstance(layer, TransformerBlock)
        acts = layer(acts)
    assert torch.equal(model.layers[-1](acts), model(tokens).logits)
    assert len(acts.routing) == 2 and acts.aux_loss.dtype == torch.float32
    assert isinstance(model.blocks[1].ffn, MoELayer)
