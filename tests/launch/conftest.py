"""Fixtures shared by the torchrun tests (restart, multi-node, hang): one tiny fp32 config
and one uninterrupted two-rank run to compare against, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.launcher import free_port
from tests.launch import elastic


@pytest.fixture(scope="session")
def elastic_config(tmp_path_factory) -> Path:
    return elastic.write_config(tmp_path_factory.mktemp("elastic"))


@pytest.fixture(scope="session")
def two_rank_reference(elastic_config, tmp_path_factory) -> list[dict]:
    """Per-step records of an uninterrupted 2-rank single-node run of ``elastic_config``."""
    root = tmp_path_factory.mktemp("reference")
    command = elastic.torchrun(
        "--nproc_per_node=2", f"--master_port={free_port()}",
        train_args=[str(elastic_config), "--run-dir", str(root / "run")],
    )  # fmt: skip
    launch = elastic.start(command, root, root / "log.txt")
    try:
        assert launch.wait(timeout=300) == 0, (root / "log.txt").read_text()[-3000:]
    finally:
        elastic.stop(launch)
    rows = elastic.records(root / "run")
    assert [r["step"] for r in rows] == list(range(1, elastic.STEPS + 1))
    return rows
