"""A rank killed under ``torchrun --max-restarts=1`` after a checkpoint: the run restarts by
itself in the same (default) run directory, resumes from the newest checkpoint, and its
losses equal an uninterrupted run's (atol 1e-6, fp32, dropout and router jitter on, so the
RNG state must come back too). The survivor's message names the dead rank, and it exits
within the stated bound: gloo fails its collective when the connection closes, and naming the
peer from its heartbeat takes at most parallel.heartbeat.STALE_AFTER_SECONDS (5 s).
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import torch

from launch.run_dir import default_run_dir
from parallel.heartbeat import STALE_AFTER_SECONDS
from tests.launch import elastic

pytestmark = pytest.mark.slow
SLACK_SECONDS = 20.0  # process start-up and scheduling on a loaded 2-core CI machine


def test_a_killed_rank_restarts_and_resumes_with_the_same_losses(
    elastic_config, two_rank_reference, tmp_path
):
    command = elastic.torchrun(
        "--standalone", "--nproc_per_node=2", "--max-restarts=1",
        train_args=[str(elastic_config)],  # no --run-dir: the default must survive the restart
    )  # fmt: skip
    log = tmp_path / "log.txt"
    launch = elastic.start(command, tmp_path, log)
    try:
        first = elastic.workers(launch, 2)
        elastic.wait_for(
            lambda: any(tmp_path.glob("runs/*/checkpoints/latest")), 200, "the first checkpoint"
        )
        os.kill(first[1].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        first[0].wait(timeout=STALE_AFTER_SECONDS + SLACK_SECONDS)
        survivor_seconds = time.monotonic() - killed_at
        assert launch.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        elastic.stop(launch)
    output = log.read_text()
    assert survivor_seconds < STALE_AFTER_SECONDS + SLACK_SECONDS, survivor_seconds

    run_dirs = [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]
    assert len(run_dirs) == 1, run_dirs  # restarted workers found the same run directory
    resumed_at = [int(s) for s in re.findall(r"resuming at step (\d+)", output)]
    assert len(resumed_at) == 1 and 0 < resumed_at[0] < elastic.STEPS, output[-4000:]

    # The survivor (rank 0) names rank 1 in one line, or torchrun stopped it first and the
    # launcher's own report names the failed worker.
    lines = elastic.error_lines(output)
    assert any("rank 1 stopped responding" in line for line in lines) or (
        "local_rank: 1" in output and "exitcode: -9" in output
    ), output[-4000:]
    assert all("rank 0 stopped responding" not in line for line in lines), lines

    rows = elastic.records(run_dirs[0])
    assert [r["step"] for r in rows] == list(range(1, elastic.STEPS + 1))
    for key in ("loss", "ce_loss", "aux_loss", "z_loss"):
        got = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        want = torch.tensor([r[key] for r in two_rank_reference], dtype=torch.float64)
        assert torch.allclose(got, want, rtol=0, atol=1e-6), (key, (got - want).abs().max())


def test_default_run_dir_is_shared_through_the_torchelastic_pointer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert default_run_dir("tiny", now=0).parent.name == "runs"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job/7")
    first = default_run_dir("tiny", now=0)
    later = default_run_dir("tiny", now=3600)  # a restarted worker, an hour later
    assert first == later and first.name.startswith("tiny-")
    assert (tmp_path / "runs" / ".torchelastic-job_7").read_text().strip() == first.name
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "another")
    assert default_run_dir("tiny", now=3600) != first
