"""Parallel building blocks: layout and process groups, autograd-aware collectives, and the
one bridge module to DeepSpeed (tensor-parallel layers and pipeline stages come later);
``rendezvous`` joins the default group (a fresh key prefix per torchrun restart, one timeout
for every group) and ``heartbeat`` names the rank that died or froze when a collective fails.

Imports nothing from ``moe/``, ``attention/`` or ``launch/``. The DeepSpeed bridge is not
imported here, so ``import parallel`` does not pull in deepspeed.

    from parallel import ParallelLayout
    layout = ParallelLayout(dp=4, ep=2)      # checked against the world size; groups built once
"""

from parallel.layout import ParallelLayout, ProcessGroups

__all__ = ["ParallelLayout", "ProcessGroups"]
