"""Parallel building blocks: the layout and its process groups (one mesh for tp, dp, pp and
the expert axes ep / edp, and the model-parallel unit DeepSpeed takes), autograd-aware
collectives, tensor-parallel linears (``tensor_parallel``), the expert mark (``markers``),
and the one bridge module to DeepSpeed (pipeline stages come later);
``rendezvous`` joins the default group (a fresh key prefix per torchrun restart, one timeout
for every group) and ``heartbeat`` names the rank that died or froze when a collective fails.

Imports nothing from ``moe/``, ``attention/`` or ``launch/``. The DeepSpeed bridge is not
imported here, so ``import parallel`` does not pull in deepspeed.

    from parallel import ParallelLayout
    layout = ParallelLayout(dp=2, tp=2, ep=2)   # "dp=2 x tp=2, ep=2" on 4 ranks
    groups = layout.build(num_experts=8)        # checked against the world size; built once
    groups.tp_group, groups.ep_group, groups.mpu
"""

from parallel.layout import ModelParallelUnit, ParallelLayout, ProcessGroups
from parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

__all__ = [
    "ColumnParallelLinear",
    "ModelParallelUnit",
    "ParallelLayout",
    "ProcessGroups",
    "RowParallelLinear",
]
