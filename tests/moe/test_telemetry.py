"""Routing telemetry (moe/telemetry.py) against hand-computed values."""

import math
from types import SimpleNamespace

import pytest
import torch

from moe import MoELayer
from moe.telemetry import RoutingTelemetry


def stats(counts, dropped, entropy, capacity):
    return SimpleNamespace(
        tokens_per_expert=torch.tensor(counts),
        dropped_fraction=torch.tensor(dropped),
        router_entropy=torch.tensor(entropy),
        capacity=capacity,
    )


def test_summary_against_hand_computed_values():
    telemetry = RoutingTelemetry(num_layers=2, num_experts=4)
    telemetry.update([stats([3, 1, 0, 0], 0.5, 1.0, 3), stats([1, 1, 1, 1], 0.0, 1.3, 2)])
    telemetry.update([stats([1, 1, 2, 0], 0.25, 0.8, 3), stats([2, 2, 0, 0], 0.0, 1.1, 2)])
    metrics = telemetry.summary()
    # layer 0: counts [4, 2, 2, 0] of 8 kept; slots 2 x 4 x 3 = 24
    assert [metrics[f"train/moe0/load_e{j}"] for j in range(4)] == [0.5, 0.25, 0.25, 0.0]
    assert metrics["train/moe0/imbalance"] == pytest.approx(4 / 2)
    assert metrics["train/moe0/drop_rate"] == pytest.approx(0.375)
    assert metrics["train/moe0/capacity_use"] == pytest.approx(8 / 24)
    assert metrics["train/moe0/entropy"] == pytest.approx(0.9)
    # layer 1: counts [3, 3, 1, 1] of 8; slots 16
    assert metrics["train/moe1/imbalance"] == pytest.approx(3 / 2)
    assert metrics["train/moe1/capacity_use"] == pytest.approx(0.5)
    assert telemetry.summary(split="eval") == {}
    telemetry.reset()
    assert telemetry.summary() == {}


def test_layer_outputs_feed_telemetry():
    layer = MoELayer(8, 16, 4, capacity_factor=1.0, min_capacity=1)
    out = layer(torch.randn(20, 8))
    telemetry = RoutingTelemetry(num_layers=1, num_experts=4)
    telemetry.update([out], split="eval")
    metrics = telemetry.summary(split="eval")
    kept = out.tokens_per_expert.sum().item()
    assert out.capacity == 5 and metrics["eval/moe0/capacity_use"] == pytest.approx(kept / 20)
    assert metrics["eval/moe0/drop_rate"] == pytest.approx(out.dropped_fraction.item())
    assert sum(metrics[f"eval/moe0/load_e{j}"] for j in range(4)) == pytest.approx(1.0)


def test_wrong_layer_count_fails():
    with pytest.raises(ValueError, match="got stats of 1 layers, expected 2"):
        RoutingTelemetry(2, 4).update([stats([1, 0, 0, 0], 0.0, 0.0, 1)])


def test_capacity_use_is_nan_without_a_capacity():
    telemetry = RoutingTelemetry(1, 2)
    telemetry.update([SimpleNamespace(
        tokens_per_expert=torch.tensor([1, 1]), dropped_fraction=torch.tensor(0.0),
        router_entropy=torch.tensor(0.5),
    )])  # fmt: skip
    assert math.isnan(telemetry.summary()["train/moe0/capacity_use"])
