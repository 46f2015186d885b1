"""The trainer's hooks for method-specific schedules and optimizer settings."""

import torch
from torch import nn

import attention
from launch.trainer import notify_step
from parallel.deepspeed_bridge import optimizer_param_groups


def test_params_with_optim_overrides_get_their_own_group():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    special = nn.Parameter(torch.zeros(3, 2))
    special._optim = {"lr": 1e-3, "weight_decay": 0.0}
    model.register_parameter("ssm_a", special)
    groups = optimizer_param_groups(model, weight_decay=0.1)
    custom = [g for g in groups if g["name"].startswith("custom")]
    assert len(custom) == 1 and custom[0]["params"] == [special]
    assert custom[0]["lr"] == 1e-3 and custom[0]["weight_decay"] == 0.0
    others = [p for g in groups if g is not custom[0] for p in g["params"]]
    assert all(p is not special for p in others)


def test_spade_state_space_params_are_grouped():
    layer = attention.build("spade", d_model=16, num_heads=2)
    groups = optimizer_param_groups(layer, weight_decay=0.1)
    custom = [p for g in groups if g["name"].startswith("custom") for p in g["params"]]
    assert custom, "SPADE's A and delta must get their own optimizer group"


def test_notify_step_drives_treeformer_bootstrap():
    layer = attention.build(
        "treeformer", d_model=16, num_heads=2, bootstrap_dense_steps=5, bootstrap_grow_every=10
    )
    model = nn.Sequential(layer)
    notify_step(model, 0)
    assert layer.height == 0
    notify_step(model, 5)
    assert layer.height == 1
    notify_step(model, 25)
    assert layer.height == 3
