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
