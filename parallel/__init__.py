"""Parallel building blocks: layout and process groups, autograd-aware collectives, and the
one bridge module to DeepSpeed (tensor-parallel layers and pipeline stages come later).

Imports nothing from ``moe/``, ``attention/`` or ``launch/``. The DeepSpeed bridge is not
imported here, so ``import parallel`` does not pull in deepspeed.

    from parallel import ParallelLayout
    layout = ParallelLayout(dp=4, ep=2)      # checked against the world size; groups built once
"""

from parallel.layout import ParallelLayout, ProcessGroups

__all__ = ["ParallelLayout", "ProcessGroups"]
