"""Divergence: non-finite updates never reach the weights; the run stops naming the step.

Unit tests: the bridge's guard on a plain torch optimizer, the trainer's skip budget, and the
hook that names the first module whose output broke. End to end (slow): a healthy run
resumed with a learning rate that diverges stops with the step named and exit status 3, its
newest checkpoint holds finite weights, and ``train.skip_nonfinite`` skips that many steps
first.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from launch import checkpoint
from launch.divergence import DivergenceWatch, first_nonfinite_module, parameters_finite
from launch.errors import EXIT_DIVERGED, TrainingDiverged
from parallel.deepspeed_bridge import guard_nonfinite_steps
from tests.launch.corpus import write_corpus

REPO = Path(__file__).resolve().parents[2]


def test_guard_skips_a_nonfinite_update_and_names_the_parameter():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard_nonfinite_steps(optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(3, 4)).sum().backward()
    model[1].weight.grad[0, 0] = float("nan")
    optimizer.step()
    assert optimizer.overflow and optimizer.nonfinite_parameter is model[1].weight
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert not optimizer.state  # no Adam moments were touched either
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    assert not optimizer.overflow and optimizer.nonfinite_parameter is None
    assert not torch.equal(before[0], model[0].weight)


def test_watch_stops_at_once_by_default_and_names_the_step():
    watch = DivergenceWatch(skip_nonfinite=0)
    assert watch.after_step(3, True, [2.0], diagnose=lambda: None)
    with pytest.raises(TrainingDiverged) as err:
        watch.after_step(4, False, [float("nan")], diagnose=lambda: "layers.1.ffn")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("training diverged at step 4: the loss is nan")
    assert "(first non-finite output: layers.1.ffn)" in message
    assert "train.skip_nonfinite" in message


def test_watch_skips_up_to_the_budget_then_stops(caplog):
    watch = DivergenceWatch(skip_nonfinite=2)
    log = logging.getLogger("test-divergence")
    with caplog.at_level(logging.WARNING, logger="test-divergence"):
        assert not watch.after_step(5, False, [1.0], diagnose=lambda: None, log=log)
        assert not watch.after_step(6, False, [float("inf")], diagnose=lambda: None, log=log)
    assert "step 5: the gradient is not finite (the loss was finite); update skipped (1 of" in (
        caplog.text
    )
    with pytest.raises(TrainingDiverged, match="at step 9: the loss is nan"):
        watch.after_step(9, False, [float("nan")], diagnose=lambda: None)
    with pytest.raises(TrainingDiverged, match="at step 10: the mean loss"):
        watch.check_logged_loss(10, float("nan"))


class Explodes(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.zeros_like(x)


def test_first_nonfinite_module_is_the_innermost_first_to_break():
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.ReLU(), Explodes()), nn.Linear(3, 1))
    assert first_nonfinite_module(model, lambda: model(torch.ones(2, 3))) == "1.1"
    healthy = nn.Sequential(nn.Linear(3, 1))
    assert first_nonfinite_module(healthy, lambda: healthy(torch.ones(2, 3))) is None
    assert not healthy[0]._forward_hooks  # hooks are removed
    assert parameters_finite(healthy)
    with torch.no_grad():
        healthy[0].weight[0, 0] = float("inf")
    assert not parameters_finite(healthy)


TINY = """
model: {d_model: 32, num_layers: 2, num_heads: 2, d_ff: 64, max_seq_len: 32}
moe: {num_experts: 4, capacity_factor: 1.0}
data: {seq_len: 32, path: CORPUS}
optimizer: {lr: 0.003}
schedule: {warmup_steps: 2}
precision: fp32
train: {steps: 14, micro_batch: 4, log_every: 1, eval_every: 0, eval_batches: 2}
checkpoint: {every: 2, keep_last: 2}
logging: {progress: false, tensorboard: false, csv: false}
"""


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory) -> tuple[Path, Path]:
    """A config and a run directory holding a healthy checkpoint at step 4."""
    root = tmp_path_factory.mktemp("diverge")
    corpus = write_corpus(root)
    config = root / "tiny.yaml"
    config.write_text(TINY.replace("CORPUS", str(corpus)))
    run_dir = root / "healthy"
    done = moeforge(config, run_dir, "train.stop_at=4")
    assert done.returncode == 0, done.stderr[-3000:]
    return config, run_dir


def moeforge(config: Path, run_dir: Path, *sets: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["train", str(config), "--run-dir", str(run_dir), *[f"--set={s}" for s in sets]]
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def copy_run(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def newest_weights_are_finite(run_dir: Path) -> bool:
    tag = checkpoint.latest_tag(run_dir)
    state = torch.load(
        checkpoint.checkpoint_dir(run_dir) / tag / "mp_rank_00_model_states.pt",
        weights_only=False,
    )
    return all(torch.isfinite(t).all() for t in state["module"].values() if t.is_floating_point())


@pytest.mark.slow
def test_a_diverging_run_stops_naming_the_step_and_keeps_finite_checkpoints(healthy_run, tmp_path):
    config, healthy = healthy_run
    run_dir = copy_run(healthy, tmp_path / "run")
    done = moeforge(config, run_dir, "optimizer.lr=1e6")
    assert done.returncode == EXIT_DIVERGED, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("moeforge: error")]
    assert len(errors) == 1 and "training diverged at step" in errors[0], done.stderr[-3000:]
    step = int(errors[0].split("at step ")[1].split(":")[0])
    assert 4 < step < 14
    assert checkpoint.saved_state(run_dir)["step"] < step
    assert newest_weights_are_finite(run_dir)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert max(steps) < step  # nothing logged from the diverged step


@pytest.mark.slow
def test_skip_nonfinite_skips_that_many_steps_before_stopping(healthy_run, tmp_path):
    config, healthy = healthy_run
    run_dir = copy_run(healthy, tmp_path / "run")
    done = moeforge(config, run_dir, "optimizer.lr=1e6", "train.skip_nonfinite=2")
    assert done.returncode == EXIT_DIVERGED, done.stderr[-3000:]
    skipped = [line for line in done.stderr.splitlines() if "update skipped" in line]
    assert len(skipped) == 2 and "(2 of train.skip_nonfinite=2)" in skipped[1]
    assert newest_weights_are_finite(run_dir)


@pytest.mark.slow
def test_under_torchrun_a_diverged_run_is_one_line_status_3_and_not_restarted(
    healthy_run, tmp_path
):
    from launch.launcher import free_port

    config, _ = healthy_run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", "--max-restarts=1", "-m", "launch.cli", "train",
        str(config), "--run-dir", str(tmp_path / "run"), "--set=optimizer.lr=1e6",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_DIVERGED, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("moeforge: error")]
    assert len(errors) == 1 and "training diverged at step" in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
    assert done.stderr.count("world size 2") == 1  # started once: a diverged run is final
