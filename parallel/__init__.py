"""Parallel building blocks: layout and process groups, autograd-aware collectives,
tensor-parallel linears (``tensor_parallel``), and the one bridge module to DeepSpeed
(pipeline stages come later);
``rendezvous`` joins the default group (a fresh key prefix per torchrun restart, one timeout
for every group) and ``heartbeat`` names the rank that died or froze when a collective fails.

Imports nothing from ``moe/``, ``attention/`` or ``launch/``. The DeepSpeed bridge is not
imported here, so ``import parallel`` does not pull in deepspeed.

    from parallel import ParallelLayout
    layout = ParallelLayout(dp=4, ep=2)      # checked against the world size; groups built once
"""

from parallel.layout import ParallelLayout, ProcessGroups
from parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

__all__ = ["ColumnParallelLinear", "ParallelLayout", "ProcessGroups", "RowParallelLinear"]
