"""Fixtures for the whole suite."""

from __future__ import annotations

import os

import pytest

# What a launcher sets for its workers (launch/launcher.py fills them for one process too).
LAUNCHER_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
)  # fmt: skip
_AT_START = {key: os.environ.get(key) for key in LAUNCHER_VARIABLES}


def _reset_launcher_variables() -> None:
    for key, value in _AT_START.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def launcher_variables_as_at_start():
    """Every test starts and ends with the launcher variables the session started with.

    An in-process ``moeforge train`` (in a test or in a module-scoped fixture) fills RANK,
    WORLD_SIZE and MASTER_PORT as a launcher would and leaves its store listening on that
    port; a later subprocess that inherited them would take itself for a torchrun rank and
    try to host a store on the busy port.
    """
    _reset_launcher_variables()
    yield
    _reset_launcher_variables()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are collected everywhere and skipped, with the reason, where
    torch sees no CUDA device, unless MOEFORGE_TEST_DEVICE names a non-CUDA device to run them
    on instead (tests/gpu/device.py)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or not os.environ.get("MOEFORGE_TEST_DEVICE", "cuda").startswith("cuda"):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="gpu: torch.cuda.is_available() is False (no CUDA device or a CPU-only torch); "
        "MOEFORGE_TEST_DEVICE=cpu runs these tests on the CPU"
    )
    for item in gpu_items:
        item.add_marker(skip)
