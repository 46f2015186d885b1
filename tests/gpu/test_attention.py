"""Every registered attention method, forward and backward on DEVICE (CUDA), equals its CPU
result in fp32 (atol 1e-4, rtol 1e-4): output, input gradient and every parameter gradient.

The cases are tests/attention/test_tensor_parallel.py's small settings (every code path at
n = 12); a method without a case there runs with its defaults, its length-bound option set to
n. The device copy is a deep copy of the CPU module, so parameters, buffers and the seeds of
random structure (BigBird's blocks, Performer's features, Treeformer's hyperplanes) agree;
eval mode turns off dropout and redraws. Where a method takes a padding mask, the second
sequence's last three positions are padding.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attention
from tests.attention.test_tensor_parallel import CASES as TENSOR_PARALLEL_CASES
from tests.gpu.device import DEVICE, assert_close, assert_same_grads, on_device

pytestmark = pytest.mark.gpu

D, H, B, N = 16, 4, 2, 12
TOL = dict(atol=1e-4, rtol=1e-4)
LENGTH_OPTIONS = ("n_max", "max_len", "max_seq_len", "max_length", "max_position_embeddings")


def cases() -> list[tuple[str, str, bool, dict[str, Any]]]:
    """(label, method, causal, options): the tensor-parallel cases, then every other method."""
    listed = list(TENSOR_PARALLEL_CASES)
    covered = {method for _, method, _, _ in listed}
    for name in attention.available():
        if name not in covered:
            cls = attention.get(name)
            options = {key: N for key in LENGTH_OPTIONS if key in cls.Options.model_fields}
            listed.append((name, name, cls.supports_causal, options))
            if cls.supports_causal:
                listed.append((f"{name}/bidirectional", name, False, options))
    return listed


CASES = cases()


def run(
    module: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor, mask: torch.Tensor | None
):
    device = next(module.parameters()).device
    xd = x.to(device).requires_grad_(True)
    kwargs = {} if mask is None else {"key_padding_mask": mask.to(device)}
    y, _ = module(xd, **kwargs)
    (y * upstream.to(device)).sum().backward()
    return y, xd.grad


@pytest.mark.parametrize(
    "label, method, causal, options", CASES, ids=[label for label, *_ in CASES]
)
def test_method_equals_cpu(label: str, method: str, causal: bool, options: dict) -> None:
    torch.manual_seed(0)
    cpu = attention.build(method, d_model=D, num_heads=H, causal=causal, **options).eval()
    dev = on_device(cpu).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(B, N, D, generator=generator)
    upstream = torch.randn(B, N, D, generator=generator)
    mask = None
    if attention.get(method).supports_padding and not causal:
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[1, -3:] = False
    want, want_dx = run(cpu, x, upstream, mask)
    got, got_dx = run(dev, x, upstream, mask)
    assert got.device.type == DEVICE.type, f"{label}: output on {got.device}"
    assert_close(got, want, f"{label}: output", **TOL)
    assert_close(got_dx, want_dx, f"{label}: input grad", **TOL)
    assert_same_grads(dev, cpu, label, **TOL)
