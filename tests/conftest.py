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
