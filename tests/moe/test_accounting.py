"""Parameter and FLOP accounting (moe/accounting.py) against what torch counts and holds."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moe.accounting import account, account_config, padded_rows_per_token, saved_flops
from moe.config import MoEConfig
from moe.layer import MoELayer
from moe.transformer import AttentionConfig, ModelConfig, Transformer, count_parameters

VOCAB, BATCH, SEQ = 64, 2, 16


def _model(
    moe: MoEConfig | None,
    mode: str = "causal_lm",
    attention: str = "full",
    options: dict | None = None,
) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        mode=mode, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_seq_len=SEQ, vocab_size=VOCAB
    )
    return Transformer(config, moe, AttentionConfig(name=attention, options=options or {}))


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


# Efficient methods whose ``flops_per_token`` counts what the module computes. k = 8 and
# radius 3 are below SEQ so the sub-quadratic path is the one measured (Linformer's default
# k = 256 > n would compress 16 rows up to 256).
EFFICIENT = [
    ("linformer", "masked_lm", {"k": 8}),
    ("linformer", "masked_lm", {"k": 8, "share_kv": True}),
    ("local", "causal_lm", {"radius": 3}),
    ("local", "masked_lm", {"radius": 4, "relative_bias": False}),  # G b > n: padded tail
    ("long_short", "masked_lm", {"window_size": 5, "num_landmarks": 3}),  # padded to 20
    ("long_short", "causal_lm", {"window_size": 6, "chunk_size": 4, "chunk_rank": 2}),
    ("gau", "causal_lm", {"qk_dim": 8}),  # replaces the FFN: the whole block
    ("flash", "masked_lm", {"qk_dim": 8, "chunk_size": 5}),  # padded to 20
    ("bigbird", "masked_lm", {"block_size": 3, "num_random_blocks": 2}),  # padded to 18
    ("bigbird", "masked_lm", {"block_size": 3, "variant": "etc", "num_global_tokens": 2}),
]


@pytest.mark.parametrize(
    ("attention", "mode", "options"),
    EFFICIENT,
    ids=[
        "linformer",
        "linformer-share-kv",
        "local-causal",
        "local-bidirectional",
        "long-short-bidirectional",
        "long-short-causal",
        "gau-causal",
        "flash-bidirectional",
        "bigbird-itc",
        "bigbird-etc",
    ],
)
def test_efficient_attention_flops_match_torch_flop_counter(
    attention: str, mode: str, options: dict
) -> None:
    model = _model(None, mode=mode, attention=attention, options=options)
    acc = account(model, SEQ)
    counted = _counted_training_flops(model)
    assert acc.approximate == ()
    # The issue asks for 2%; the formulas count exactly what runs, so hold them to rounding
    # (full attention's formula is within 2% of some of these small models).
    assert acc.training.total * BATCH * SEQ == pytest.approx(counted, rel=1e-9)
    full = account(_model(None, mode=mode), SEQ)
    assert acc.training.total != full.training.total  # the method's formula, not full's


def test_efficient_attention_formulas_by_hand() -> None:
    d, k, n = 32, 8, SEQ
    linformer = account(_model(None, "masked_lm", "linformer", {"k": k}), n)
    # Per layer: q, out 2 d^2; key, value on k rows 2 d^2 k / n; E X and F X 2 k d; scores 2 k d.
    assert linformer.forward.attention == 2 * 2 * (2 * k * d + 2 * k * d)
    local = account(_model(None, "causal_lm", "local", {"radius": 3}), n)
    # Blocks of 4, a causal window of 8 keys per query.
    assert local.forward.attention == 2 * 2 * (2 * 8 * d)
    longer = account(_model(None, "causal_lm", "local", {"radius": 3}), 2 * n)
    assert longer.forward.attention == local.forward.attention  # linear in n


def test_unmodelled_attention_is_marked_approximate() -> None:
    acc = account(_model(DROPLESS_TOP2, mode="masked_lm", attention="performer"), SEQ)
    assert acc.approximate == ("performer",)
    assert "approximate: performer" in acc.describe()
    full = account(_model(DROPLESS_TOP2, mode="masked_lm"), SEQ)
    assert acc.forward.attention == full.forward.attention  # full attention's formula
    # SPADE inherits local attention's formula but adds an S4D branch: not modelled.
    spade = account(_model(None, attention="spade", options={"radius": 3}), SEQ)
    assert spade.approximate == ("spade",)


def _capacity_limited(layout: str, capacity_factor: float) -> Transformer:
    moe = MoEConfig(
        num_experts=4,
        top_k=1,
        capacity_factor=capacity_factor,
        min_capacity=1,
        every=1,
        expert_layout=layout,
    )
    model = _model(moe)
    for block in model.blocks:
        # The CPU dispatcher trims the buffer to its fullest expert; fixed [E, C, d]
        # buffers (accelerators, expert parallelism) keep all C rows.
        block.ffn.dispatcher.trims_buffer = False
    return model


def test_padded_flops_are_what_a_fixed_buffer_adds() -> None:
    # T = 32 tokens, top-1 over 4 experts, capacity factor 1.5: C = ceil(1.5 * 32 / 4) = 12,
    # 48 buffer rows for 32 assignments: half a padded row per token.
    model = _capacity_limited("buffer", 1.5)
    acc = account(model, SEQ, routed_tokens=BATCH * SEQ)
    layer = model.blocks[0].ffn
    assert isinstance(layer, MoELayer)
    assert padded_rows_per_token(layer, BATCH * SEQ) == 0.5
    per_row = 2 * (32 * 64 + 64 * 32)  # one expert row: fc1 and fc2 multiply-adds, x 2 FLOPs
    assert acc.forward.padded == 2 * 0.5 * per_row  # two MoE layers
    assert acc.training.total == account(model, SEQ).training.total  # padding not in total
    counted = _counted_training_flops(model)
    assert (acc.training.total + acc.training.padded) * BATCH * SEQ == pytest.approx(counted)
    # Without T, the large-T limit c k - k; the grouped layout pads nothing.
    assert account(model, SEQ).forward.padded == pytest.approx(acc.forward.padded)
    grouped = account(_capacity_limited("grouped", 1.5), SEQ, routed_tokens=BATCH * SEQ)
    assert grouped.forward.padded == 0
    assert "padding +" in acc.describe()
    with pytest.raises(ValueError, match="routed_tokens"):
        account(model, SEQ, routed_tokens=0)


def test_saved_flops_are_the_dropped_assignments_expert_work() -> None:
    model = _capacity_limited("grouped", 0.5)  # C = 4 slots per expert for 32 tokens
    acc = account(model, SEQ)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        out = model(ids, targets=ids)
        out.loss.backward()
    dropped = [float(stats.dropped_fraction) for stats in out.routing]
    assert all(f >= 0.5 for f in dropped), dropped  # at most 16 of 32 tokens kept
    saved = saved_flops(acc, sum(dropped) / len(dropped))
    ran = (acc.training.total - saved) * BATCH * SEQ
    assert ran == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert saved_flops(acc, 0.0) == 0 and saved_flops(acc, 1.0) == acc.training.experts
    with pytest.raises(ValueError, match="dropped_fraction"):
        saved_flops(acc, 1.5)


def test_bad_sequence_length_is_refused() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        account(_model(None), 0)
