"""Mixture-of-Experts: router -> dispatcher -> experts = MoELayer, and the transformer using it.

Belongs here: routing (pure functions on logits), token dispatch (local, simulated and
all-to-all), stacked experts, the composed layer, aux losses, and the transformer model.
Uses ``attention/`` and ``parallel/``; never imports deepspeed (that lives in
``parallel/deepspeed_bridge.py``).

    from moe import MoELayer, route
    layer = MoELayer(d_model=512, d_ff=2048, num_experts=8, top_k=1, capacity_factor=1.25)
    out = layer(x)            # x [B, S, 512]; out.output, out.aux_loss, out.z_loss, ...
"""

from moe.config import MoEConfig
from moe.dispatch import DispatchPlan, LocalDispatcher, make_plan
from moe.ep_dispatch import AllToAllDispatcher
from moe.experts import DenseFFN, GroupedExperts
from moe.layer import MoELayer, MoEOutput
from moe.losses import load_balancing_loss, router_entropy, router_z_loss
from moe.router import (
    ExpertChoiceRouter,
    Router,
    Routing,
    TopKRouter,
    compute_capacity,
    expert_choice_route,
    route,
)
from moe.simulate import SimulatedDispatcher
from moe.telemetry import RoutingTelemetry
from moe.transformer import AttentionConfig, ModelConfig, Transformer
from moe.vision import ImageConfig, PatchEmbedding

__all__ = [
    "AllToAllDispatcher",
    "AttentionConfig",
    "ImageConfig",
    "ModelConfig",
    "PatchEmbedding",
    "RoutingTelemetry",
    "SimulatedDispatcher",
    "Transformer",
    "DenseFFN",
    "DispatchPlan",
    "ExpertChoiceRouter",
    "GroupedExperts",
    "LocalDispatcher",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "Router",
    "Routing",
    "TopKRouter",
    "compute_capacity",
    "expert_choice_route",
    "load_balancing_loss",
    "make_plan",
    "route",
    "router_entropy",
    "router_z_loss",
]
