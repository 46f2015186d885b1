"""20 training steps of configs/tiny.yaml on one device through ``launch.trainer.train`` in
this process (as a one-process launcher would run it: RANK 0 of WORLD_SIZE 1): every logged
loss is finite and the last three steps' mean is below the first three's.

On a CUDA machine the trainer picks the GPU, NCCL and ``precision: auto`` (bf16 where the GPU
has it) by itself; the test checks that CUDA memory was used. About 10 s on a 2-core CPU
(``MOEFORGE_TEST_DEVICE=cpu``), a few seconds on a GPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from launch.launcher import free_port
from tests.gpu.device import DEVICE

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
STEPS = 20
OVERRIDES = [
    f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0", "train.eval_batches=2",
    "checkpoint.every=0", "logging.progress=false", "logging.tensorboard=false",
]  # fmt: skip


def test_tiny_trains_on_one_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from launch.config import load_config
    from launch.trainer import train

    for key, value in dict(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
    ).items():  # fmt: skip
        monkeypatch.setenv(key, value)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
    config = load_config(REPO / "configs" / "tiny.yaml", OVERRIDES)
    result = train(config, tmp_path / "run")
    assert result.step == STEPS, f"stopped at step {result.step} of {STEPS}"
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == STEPS, f"{len(losses)} logged losses, expected {STEPS}"
    assert all(math.isfinite(loss) for loss in losses), f"non-finite loss: {losses}"
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, f"loss did not decrease: first steps {losses[:3]}, last {losses[-3:]}"
    assert result.val_loss is not None and math.isfinite(result.val_loss)
    if DEVICE.type == "cuda":
        assert torch.cuda.max_memory_allocated(DEVICE) > 0, "the run allocated no CUDA memory"
