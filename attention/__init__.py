"""Efficient attention: one module per published method behind one registry.

Belongs here: the ``Attention`` interface (``base.py``), the registry (``registry.py``) and
one file per method, each registering itself. Methods may use ``parallel/`` (tensor-parallel
projections) and nothing above it. See ../shared/attention_spec.md for every method's math.

    from attention import build, available
    attn = build("performer", d_model=256, num_heads=4, causal=True, nb_features=128)
    y, _ = attn(x)                      # x: [B, n, 256] -> y: [B, n, 256]
    attn.parallelize(tp_group)          # tensor parallel: this rank keeps 4 / tp heads
"""

from attention.base import Attention, AttentionOptions, make_linear, pad_to_multiple
from attention.registry import (
    available,
    build,
    check_tensor_parallel,
    get,
    parse_options,
    register,
    tensor_parallel_methods,
)

__all__ = [
    "Attention",
    "AttentionOptions",
    "available",
    "build",
    "check_tensor_parallel",
    "get",
    "make_linear",
    "pad_to_multiple",
    "parse_options",
    "register",
    "tensor_parallel_methods",
]
