"""Parallel building blocks: layout and process groups, autograd-aware collectives,
tensor-parallel layers, pipeline stages, and the one bridge module to DeepSpeed.

Imports nothing from ``moe/``, ``attention/`` or ``launch/``.
"""
