"""No hangs: a frozen rank ends the job within the configured bound with one line, and the
test harness's own watchdog turns a hung distributed test into a failure with stacks.

Frozen peer (SIGSTOP on rank 1, ep=1, torchrun): rank 0 waits in a collective (the engine's
gradient reduction or the trainer's metrics all_reduce) until ``parallel.timeout_s``, then
names rank 1 from its silent heartbeat and exits; when rank 1 runs again torchrun's SIGTERM
ends it quietly. Bound for rank 0: timeout_s + STALE_AFTER_SECONDS, plus start-up slack.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from launch.launcher import free_port
from parallel import rendezvous
from parallel.heartbeat import STALE_AFTER_SECONDS
from tests.dist import run_ranks
from tests.launch import elastic

pytestmark = pytest.mark.slow
TIMEOUT_S = 10.0
SLACK_SECONDS = 20.0


def test_a_frozen_rank_ends_the_job_within_the_timeout_with_one_line(elastic_config, tmp_path):
    command = elastic.torchrun(
        "--nproc_per_node=2", f"--master_port={free_port()}",
        train_args=[
            str(elastic_config), "--run-dir", str(tmp_path / "run"),
            f"--set=parallel.timeout_s={TIMEOUT_S}", "--set=train.steps=100000",
            "--set=checkpoint.every=100000",
        ],
    )  # fmt: skip
    log = tmp_path / "log.txt"
    launch = elastic.start(command, tmp_path, log)
    try:
        ranks = elastic.workers(launch, 2)
        metrics = tmp_path / "run" / "metrics.jsonl"
        elastic.wait_for(
            lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3,
            200,
            "the first training steps",
        )
        os.kill(ranks[1].pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        ranks[0].wait(timeout=TIMEOUT_S + STALE_AFTER_SECONDS + SLACK_SECONDS)
        survivor_seconds = time.monotonic() - frozen_at
        os.kill(ranks[1].pid, signal.SIGCONT)  # torchrun's pending SIGTERM can now end it
        launch.wait(timeout=60)
    finally:
        elastic.stop(launch)
    output = log.read_text()
    assert TIMEOUT_S - 1 < survivor_seconds < TIMEOUT_S + STALE_AFTER_SECONDS + SLACK_SECONDS
    assert launch.returncode == 4, output[-4000:]  # the survivor's status: a peer was lost
    assert "ChildFailedError" not in output, output[-4000:]  # torchrun adds no report
    lines = elastic.error_lines(output)
    assert len(lines) == 1, output[-4000:]
    assert "rank 1 stopped responding" in lines[0] and "rank 0 stopped" in lines[0], lines
    assert "launch/trainer.py" not in output, output[-4000:]  # no worker traceback


def _group_timeouts(rank: int, world_size: int) -> list[float]:
    """Groups made the way DeepSpeed and DeviceMesh make them, before and after bounding."""
    from torch.distributed.device_mesh import init_device_mesh

    derived = dist.new_group(list(range(world_size)))
    mesh = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("edp", "ep"))
    groups = [None, derived, mesh.get_group("edp")]
    before = [rendezvous.group_timeout(g).total_seconds() for g in groups]
    rendezvous.bound_group_timeouts(timedelta(seconds=7))
    after = [rendezvous.group_timeout(g).total_seconds() for g in groups]
    return before + after


def test_every_group_gets_the_run_timeout(tmp_path):
    (before_and_after,) = {tuple(r) for r in run_ranks(2, _group_timeouts, tmp_path, timeout=120)}
    before, after = before_and_after[:3], before_and_after[3:]
    assert before[1] == timedelta(minutes=30).total_seconds()  # new_group ignores the default's
    assert after == (7.0, 7.0, 7.0)


def _one_rank_never_arrives(rank: int, world_size: int) -> None:
    if rank == 1:
        time.sleep(60)
    dist.barrier()


def test_the_harness_fails_a_hung_test_within_its_bound(tmp_path):
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 0 failed") as failure:
        run_ranks(2, _one_rank_never_arrives, tmp_path, timeout=25)
    assert time.monotonic() - started < 25 + 15
    assert "Timed out" in str(failure.value) or "timed out" in str(failure.value)
