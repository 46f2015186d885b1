"""Helpers for tests that run `moeforge train` under torchrun and act on its workers.

Every launch runs in its own session (process group) and is killed with everything under it
in ``finally``; every wait is bounded. Workers are found as the torchrun process's children
that carry a RANK variable, so a test can kill or freeze one rank exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.launch.corpus import write_corpus

REPO = Path(__file__).resolve().parents[2]
STEPS = 24

TINY_FP32 = """
model: {d_model: 32, num_layers: 2, num_heads: 2, d_ff: 64, max_seq_len: 32, dropout: 0.1}
moe: {num_experts: 4, capacity_factor: 1.0, jitter_eps: 0.1}
data: {seq_len: 32, path: CORPUS}
optimizer: {lr: 0.003}
schedule: {warmup_steps: 2}
train: {steps: STEPS, micro_batch: 2, log_every: 1, eval_every: 0, eval_batches: 2}
checkpoint: {every: 4, keep_last: 2}
precision: fp32
logging: {progress: false, tensorboard: false, csv: false}
"""


def write_config(root: Path) -> Path:
    """A tiny fp32 config (dropout and jitter on: the restart must restore the RNG too)."""
    corpus = write_corpus(root)
    path = root / "tiny.yaml"
    path.write_text(TINY_FP32.replace("CORPUS", str(corpus)).replace("STEPS", str(STEPS)))
    return path


def torchrun(*launch_args: str, train_args: list[str]) -> list[str]:
    """The command line of ``torchrun LAUNCH_ARGS -m launch.cli train TRAIN_ARGS``."""
    return [
        sys.executable, "-m", "torch.distributed.run", *launch_args,
        "-m", "launch.cli", "train", *train_args,
    ]  # fmt: skip


def start(command: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start ``command`` in its own session, stdout and stderr into ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with log.open("w") as out:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def stop(process: subprocess.Popen) -> None:
    """Kill the launch and everything in its session (frozen workers included)."""
    if process.poll() is None or _session_alive(process.pid):
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _session_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.02) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def workers(launcher: subprocess.Popen, world_size: int, timeout: float = 120.0) -> dict:
    """{rank: psutil.Process} of the launcher's worker processes (waits for all of them)."""
    found: dict[int, psutil.Process] = {}

    def all_there() -> bool:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if rank is not None:
                found[int(rank)] = child
        return len(found) == world_size

    wait_for(all_there, timeout, f"{world_size} workers", poll=0.1)
    return found


def records(run_dir: Path) -> list[dict]:
    """The per-step training records of ``run_dir/metrics.jsonl``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def error_lines(output: str) -> list[str]:
    """The ``moeforge: error:`` lines of a launch's output (torchrun prefixes none of them)."""
    return [line for line in output.splitlines() if "moeforge: error:" in line]
