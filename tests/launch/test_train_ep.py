"""``moeforge train`` at ep=2 (2 gloo ranks) equals one process with ``moe.simulate_ep=2``.

The trainer's global batch is the same in both runs (micro batch m per rank at dp=2, 2m in
one process; rows in rank order), so each step's logged loss, CE, aux and z loss (averaged
over ranks the way the trainer averages) must agree: atol 1e-4 over 10 AdamW steps in fp32
(routing decisions identical; only matmul rounding differs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.dist import run_ranks

OVERRIDES = [
    "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64",
    "model.max_seq_len=16", "data.seq_len=16", "moe.num_experts=4", "moe.every=1",
    "moe.capacity_factor=1.0", "precision=fp32", "train.steps=10", "train.log_every=1",
    "train.eval_every=0", "checkpoint.every=0", "schedule.warmup_steps=1",
]  # fmt: skip
MICRO_BATCH = 2


def body(rank: int, world_size: int, overrides: list[str], run_dir: str) -> list[dict]:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    from launch.config import load_config
    from launch.trainer import train

    train(load_config(None, overrides), Path(run_dir))
    metrics = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if rank == 0 else []


@pytest.mark.slow
def test_ep2_training_equals_simulated_one_process(tmp_path):
    ep_overrides = [*OVERRIDES, "parallel.ep=2", f"train.micro_batch={MICRO_BATCH}"]
    real = run_ranks(2, body, tmp_path, ep_overrides, str(tmp_path / "ep2"), timeout=600)[0]
    sim_overrides = [*OVERRIDES, "moe.simulate_ep=2", f"train.micro_batch={2 * MICRO_BATCH}"]
    simulated = run_ranks(1, body, tmp_path, sim_overrides, str(tmp_path / "sim"), timeout=600)[0]
    real = [r for r in real if "loss" in r]
    simulated = [r for r in simulated if "loss" in r]
    assert [r["step"] for r in real] == list(range(1, 11)) == [r["step"] for r in simulated]
    for key in ("loss", "ce_loss", "aux_loss", "z_loss"):
        assert [r[key] for r in real] == pytest.approx([r[key] for r in simulated], abs=1e-4), key
    assert real[-1]["loss"] < real[0]["loss"]


def resume_body(rank: int, world_size: int, overrides: list[str], root: str) -> list[list[dict]]:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    from launch.config import load_config
    from launch.trainer import train

    train(load_config(None, overrides), Path(root) / "straight")
    train(load_config(None, [*overrides, "train.stop_at=3"]), Path(root) / "resumed")
    train(load_config(None, overrides), Path(root) / "resumed", resume=True)
    if rank != 0:
        return []
    return [
        [
            json.loads(line)
            for line in (Path(root) / name / "metrics.jsonl").read_text().splitlines()
        ]
        for name in ("straight", "resumed")
    ]


@pytest.mark.slow
def test_ep2_checkpoint_resume_continues_with_the_same_losses(tmp_path):
    """At ep=2 the engine's module state holds rank 0's experts only; the portable file
    (launch/checkpoint.py -> parallel/expert_checkpoint.py) restores every rank's experts."""
    overrides = [
        *[o for o in OVERRIDES if not o.startswith("train.steps")], "train.steps=6",
        "parallel.ep=2", f"train.micro_batch={MICRO_BATCH}",
    ]  # fmt: skip
    straight, resumed = run_ranks(2, resume_body, tmp_path, overrides, str(tmp_path), timeout=600)[
        0
    ]
    straight = {r["step"]: r["loss"] for r in straight if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in resumed if "loss" in r}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx(
        [straight[s] for s in (4, 5, 6)], abs=1e-5
    )
    assert (tmp_path / "resumed" / "checkpoints" / "step00000003" / "portable.pt").is_file()
