"""The MoE benchmark's memory probe and table (no timing asserts)."""

import torch

from launch.bench_moe import _OursCall, format_table, saved_activation_bytes
from moe.layer import MoELayer


def test_moe_activation_memory_grows_linearly_in_tokens():
    layer = _OursCall(MoELayer(32, 64, 16, top_k=2, capacity_factor=1.25))
    small = saved_activation_bytes(layer, torch.randn(512, 32))
    large = saved_activation_bytes(layer, torch.randn(2048, 32))
    assert 3.8 < large / small < 4.2, (small, large)  # a [T, E, C] one-hot would give ~16x


def test_format_table_ratios():
    table = format_table(
        [(8, "fp32", {"dense FFN": 100.0, "moeforge": 105.0, "deepspeed MoE": 120.0})]
    )
    assert "| 8 | fp32 | 100.0 | 105.0 | 120.0 | 1.05x | 1.20x | 0.88x |" in table


def test_weight_traffic_counts_every_expert_weight():
    from launch.bench_moe import weight_traffic_ms

    mib, ms = weight_traffic_ms(MoELayer(32, 64, 4, activation="swiglu"), repeats=1)
    assert mib == 3 * 4 * 32 * 64 * 4 / 2**20  # w1, w2, w3 of 4 experts, fp32
    assert ms > 0


def test_experts_alone_runs_the_layers_experts_at_the_routed_sizes():
    from launch.bench_moe import _ExpertsAlone

    torch.manual_seed(0)
    x = torch.randn(64, 16)
    layer = MoELayer(16, 32, 4, capacity_factor=1.0)
    routed = layer(x)
    alone = _ExpertsAlone(layer, x)
    assert alone.grouped and alone.shape == (int(routed.tokens_per_expert.sum()), 16)
    rows, grad = alone.inputs(torch.float32)
    assert alone(rows).shape == rows.shape and grad.shape == rows.shape
    buffered = MoELayer(16, 32, 4, capacity_factor=1.0).to(torch.bfloat16)  # auto -> buffer
    alone = _ExpertsAlone(buffered, x.bfloat16())
    fullest = int(buffered(x.bfloat16()).tokens_per_expert.max())
    assert not alone.grouped and alone.shape == (4, fullest, 16)
    assert alone(alone.inputs(torch.bfloat16)[0]).dtype == torch.bfloat16


def test_format_table_prints_the_experts_alone_ratio():
    times = {"dense FFN": 100.0, "moeforge": 130.0, "deepspeed MoE": 150.0, "experts alone": 110.0}
    assert "| 1.30x | 1.50x | 0.87x | 1.10x |" in format_table([(8, "bf16", times)])
