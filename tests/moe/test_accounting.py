"""Parameter and FLOP accounting (moe/accounting.py) against what torch counts and holds."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moe.accounting import account, account_config
from moe.config import MoEConfig
from moe.transformer import AttentionConfig, ModelConfig, Transformer, count_parameters

VOCAB, BATCH, SEQ = 64, 2, 16


def _model(moe: MoEConfig | None, mode: str = "causal_lm", attention: str = "full") -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        mode=mode, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_seq_len=SEQ, vocab_size=VOCAB
    )
    return Transformer(config, moe, AttentionConfig(name=attention))


def _counted_training_flops(model: Transformer) -> float:
    """FLOPs torch counts in one forward + backward over BATCH x SEQ tokens.

    The counter has no formula for the CPU's fused attention kernel (it would count the
    scores as zero); the math backend runs them as batched matmuls, which it counts.
    """
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        out = model(ids, targets=ids)
        out.loss.backward()
    return counter.get_total_flops()


DROPLESS_TOP2 = MoEConfig(num_experts=4, top_k=2, capacity_factor=None, every=1)


@pytest.mark.parametrize(
    "moe",
    [None, DROPLESS_TOP2, MoEConfig(num_experts=4, top_k=1, capacity_factor=0, every=2)],
    ids=["dense", "moe-top2-every-layer", "moe-top1-every-other"],
)
def test_training_flops_match_torch_flop_counter(moe: MoEConfig | None) -> None:
    model = _model(moe)
    acc = account(model, SEQ)
    counted = _counted_training_flops(model)
    predicted = acc.training.total * BATCH * SEQ
    assert acc.approximate == ()
    assert predicted == pytest.approx(counted, rel=0.02), (predicted, counted)
    if moe is not None:
        assert acc.training.experts > 0 and acc.training.router > 0
    else:
        assert acc.training.experts == 0 and acc.training.router == 0


def test_expert_flops_scale_with_top_k_and_scores_with_length() -> None:
    one = account(_model(MoEConfig(num_experts=4, top_k=1, capacity_factor=None, every=1)), SEQ)
    two = account(_model(DROPLESS_TOP2), SEQ)
    assert two.forward.experts == pytest.approx(2 * one.forward.experts)
    assert two.forward.dense == one.forward.dense
    longer = account(_model(DROPLESS_TOP2), 2 * SEQ)
    assert longer.forward.attention == pytest.approx(2 * two.forward.attention)
    assert longer.forward.experts == two.forward.experts


def test_parameter_counts_agree_with_the_built_model() -> None:
    model = _model(DROPLESS_TOP2)
    acc = account(model, SEQ)
    counts = count_parameters(model)
    assert acc.total_params == counts["total"] == sum(p.numel() for p in model.parameters())
    assert acc.active_params == counts["active"]  # top_k of num_experts: 2 of 4
    embed = model.layers[0].embed
    assert acc.embedding_params == embed.token.weight.numel() + embed.position.weight.numel()
    assert acc.non_embedding_params == acc.total_params - acc.embedding_params
    assert acc.non_embedding_active_params < acc.non_embedding_params


def test_config_accounting_builds_nothing_and_equals_the_built_model() -> None:
    config = ModelConfig(
        d_model=32, num_layers=2, num_heads=4, d_ff=64, max_seq_len=SEQ, vocab_size=VOCAB
    )
    from_config = account_config(config, DROPLESS_TOP2, AttentionConfig(), seq_len=SEQ)
    assert from_config == account(_model(DROPLESS_TOP2), SEQ)
    # A model far too big to allocate here is counted all the same (meta device).
    big = ModelConfig(d_model=8192, num_layers=2, num_heads=64, d_ff=32768, vocab_size=50_000)
    acc = account_config(big, MoEConfig(num_experts=64), AttentionConfig(), seq_len=2048)
    assert acc.total_params > 30e9


def test_unmodelled_attention_is_marked_approximate() -> None:
    acc = account(_model(DROPLESS_TOP2, mode="masked_lm", attention="linformer"), SEQ)
    assert acc.approximate == ("linformer",)
    assert "approximate: linformer" in acc.describe()
    full = account(_model(DROPLESS_TOP2, mode="masked_lm"), SEQ)
    assert acc.forward.attention == full.forward.attention  # full attention's formula


def test_bad_sequence_length_is_refused() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        account(_model(None), 0)
