"""Turn a model's MoE layers expert-parallel (or simulated) after it is built, and back.

Shape letters: E experts, E_l = E / ep local experts, d width, f expert hidden width.

    model = Transformer(...)                       # every rank builds all E experts (same seed)
    groups = ParallelLayout.from_world(world, ep=2).build(num_experts=E)
    apply_expert_parallel(model, groups, timeout=timeout)  # keep experts [ep_rank*E_l, (ep_rank+1)*E_l)
    full = gather_expert_weights(model, groups.ep_group)   # [E, ...] per name, for checkpoints

Expert weights are found by their ``parallel.markers.is_expert`` mark (set by GroupedExperts),
never by name; sharding replaces them with new Parameters, which are marked again.

Because every rank builds the full model from the same seed before sharding, the global
expert weights are exactly those of the one-process model: a run at ep=N starts from the
same weights as one process with ``simulate_ep=N`` (``moe/simulate.py``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe.ep_dispatch import AllToAllDispatcher
from moe.layer import MoELayer
from moe.simulate import SimulatedDispatcher
from parallel.collectives import COLLECTIVE_TIMEOUT, all_gather_tensor
from parallel.markers import is_expert, mark_expert

EXPERT_WEIGHTS = ("w1", "w2", "w3")


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """(name, layer) of every MoELayer in ``model``, in module order."""
    return [
        (name, module) for name, module in model.named_modules() if isinstance(module, MoELayer)
    ]


def shard_experts(
    model: nn.Module,
    ep_group: Any,
    *,
    equal_tokens: bool = False,
    timeout: timedelta = COLLECTIVE_TIMEOUT,
) -> int:
    """Keep this EP rank's block of experts in every MoE layer and exchange tokens all-to-all.

    ``timeout``: how long each exchange waits for the other EP ranks (the run's
    ``parallel.timeout_s``). Call before the optimizer (or DeepSpeed engine) is built.
    Returns the number of layers.
    """
    ep_size, ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    layers = moe_layers(model)
    for name, layer in layers:
        if isinstance(layer.dispatcher, SimulatedDispatcher):
            raise ValueError(
                f"{name}: moe.simulate_ep ({layer.dispatcher.num_ranks}) must be 1 under real "
                f"expert parallelism (parallel.ep={ep_size})"
            )
        if layer.experts.num_experts != layer.num_experts:
            raise ValueError(
                f"{name} is already sharded ({layer.experts.num_experts} experts here)"
            )
        dispatcher = AllToAllDispatcher(
            ep_group,
            layer.num_experts,
            capacity_scope=layer.capacity_scope,
            fixed_buffers=layer.expert_layout == "buffer",
            equal_tokens=equal_tokens,
            timeout=timeout,
        )
        local = dispatcher.num_local_experts
        offset = ep_rank * local
        for weight_name in EXPERT_WEIGHTS:
            weight = getattr(layer.experts, weight_name)
            if weight is not None:
                block = weight.detach()[offset : offset + local].clone()
                setattr(layer.experts, weight_name, mark_expert(nn.Parameter(block)))
        layer.experts.num_experts = local
        layer.dispatcher = dispatcher
        layer.expert_offset = offset
    return len(layers)


def simulate_layout(model: nn.Module, num_ranks: int, ep: int | None = None) -> int:
    """Give every MoE layer a SimulatedDispatcher of ``num_ranks`` virtual ranks (EP groups of
    ``ep``): one process then computes what that data-parallel x expert-parallel run does."""
    layers = moe_layers(model)
    for _, layer in layers:
        layer.dispatcher = SimulatedDispatcher(
            num_ranks, capacity_scope=layer.capacity_scope, ep=ep
        )
    return len(layers)


def gather_expert_weights(
    model: nn.Module, ep_group: Any | None = None, tensors: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Full [E, ...] expert tensors keyed by parameter name, gathered over the EP group.

    ``tensors`` (name -> local [E_l, ...] tensor, e.g. Adam moments) defaults to the expert
    weights. Without a group (one process) the local tensors are already full. Collective:
    every rank of the EP group must call it.
    """
    if tensors is None:
        tensors = {
            name: param.detach() for name, param in model.named_parameters() if is_expert(param)
        }
    if ep_group is None or dist.get_world_size(ep_group) == 1:
        return {name: value.clone() for name, value in tensors.items()}
    return {
        name: all_gather_tensor(value, ep_group).flatten(0, 1) for name, value in tensors.items()
    }


def local_expert_block(full: torch.Tensor, ep_size: int, ep_rank: int) -> torch.Tensor:
    """Rows of a full [E, ...] expert tensor that EP rank ``ep_rank`` of ``ep_size`` holds."""
    if full.shape[0] % ep_size != 0:
        raise ValueError(f"{full.shape[0]} experts cannot be split over ep={ep_size} ranks")
    local = full.shape[0] // ep_size
    return full[ep_rank * local : (ep_rank + 1) * local]


def apply_expert_parallel(
    model: nn.Module,
    groups: Any,
    *,
    log: Any = None,
    timeout: timedelta = COLLECTIVE_TIMEOUT,
) -> Any:
    """The trainer's hook: shard every MoE layer over ``groups.ep_group`` when
    ``groups.layout.ep`` > 1 (rank 0 logs ``groups.report`` when given ``log``); returns
    ``groups``, or None when nothing was sharded (no groups, ep == 1, no MoE layer).

    ``groups`` is the run's ``parallel.layout.ProcessGroups``, built once by the caller and
    handed on to whatever else needs it (checkpoints); this function builds none.
    ``timeout`` bounds every token exchange (``parallel.timeout_s``). Call after the model is
    built on every rank from the same seed (and after ``apply_tensor_parallel``), before the
    engine.
    """
    if groups is None or groups.layout.ep == 1:
        return None
    layers = moe_layers(model)
    if not layers:
        return None
    num_experts = layers[0][1].num_experts
    if log is not None and dist.get_rank() == 0:
        log.info(groups.report(num_experts))
    shard_experts(model, groups.ep_group, timeout=timeout)
    return groups
