"""The device the gpu-marked tests run on, and how they compare it with the CPU.

``DEVICE`` is CUDA unless ``MOEFORGE_TEST_DEVICE`` names another (``cpu`` runs every gpu test
on the CPU against the CPU: no kernel is checked then, but the tests' own code is). Without
CUDA the ``gpu`` marker skips them (tests/conftest.py) unless that variable says otherwise.

    MOEFORGE_TEST_DEVICE=cpu .venv/bin/python -m pytest -q -m gpu tests/gpu
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

DEVICE_VARIABLE = "MOEFORGE_TEST_DEVICE"
DEVICE = torch.device(os.environ.get(DEVICE_VARIABLE, "cuda"))


def on_device(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (same parameters, buffers and seeds) on DEVICE."""
    return copy.deepcopy(module).to(DEVICE)


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient on the CPU (zeros where a parameter received none)."""
    return {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu()
        for name, p in module.named_parameters()
    }


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, **tol: float) -> None:
    """actual (any device) equals expected (CPU) within tol; the message names ``what``."""
    torch.testing.assert_close(
        actual.detach().cpu(), expected.detach().cpu(), msg=lambda m: f"{what}: {m}", **tol
    )


def assert_same_grads(actual: nn.Module, expected: nn.Module, what: str, **tol: float) -> None:
    """Every parameter gradient of the two modules (same parameter names) agrees."""
    got, want = grads(actual), grads(expected)
    assert got.keys() == want.keys(), f"{what}: parameters differ: {got.keys() ^ want.keys()}"
    for name in want:
        assert_close(got[name], want[name], f"{what}: grad of {name}", **tol)
