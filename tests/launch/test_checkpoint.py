"""Checkpoint atomicity, manifests and pruning with a fake engine (no processes, no DeepSpeed)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from launch import checkpoint


class FakeEngine:
    """Writes one file per save like the engine does; can crash half way."""

    def __init__(self, crash: bool = False) -> None:
        self.crash = crash
        self.loaded: str | None = None

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # moeforge owns the 'latest' pointer
        (Path(save_dir) / tag).mkdir(parents=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_text(json.dumps(client_state))
        if self.crash:
            raise RuntimeError("disk full")

    def load_checkpoint(self, load_dir, tag, **kwargs):
        self.loaded = tag
        state = json.loads((Path(load_dir) / tag / "mp_rank_00_model_states.pt").read_text())
        return str(Path(load_dir) / tag), state


def save(run_dir: Path, step: int, engine: FakeEngine | None = None, keep_last: int = 2) -> None:
    checkpoint.save(
        engine or FakeEngine(),
        run_dir,
        step,
        world_size=1,
        config_yaml="model: {}\n",
        keep_last=keep_last,
    )


def test_save_publishes_latest_last_and_keeps_the_newest(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step)
    root = checkpoint.checkpoint_dir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step00000020", "step00000030"]
    assert checkpoint.latest_tag(tmp_path) == "step00000030"
    assert checkpoint.saved_state(tmp_path) == {"step": 30, "world_size": 1}
    assert checkpoint.saved_config_text(tmp_path) == "model: {}\n"


def test_crash_mid_save_leaves_the_last_good_checkpoint(tmp_path):
    save(tmp_path, 10)
    with pytest.raises(RuntimeError, match="disk full"):
        save(tmp_path, 20, FakeEngine(crash=True))
    root = checkpoint.checkpoint_dir(tmp_path)
    assert checkpoint.latest_tag(tmp_path) == "step00000010"
    assert (root / ".tmp-step00000020").is_dir() and not (root / "step00000020").exists()
    engine = FakeEngine()
    torch.manual_seed(123)
    state = checkpoint.load(engine, tmp_path)
    assert engine.loaded == "step00000010" and state["step"] == 10
    save(tmp_path, 20)  # a later save clears the leftovers of the crashed one
    assert (
        not (root / ".tmp-step00000020").exists()
        and checkpoint.latest_tag(tmp_path) == "step00000020"
    )


def test_a_dangling_latest_pointer_is_ignored(tmp_path):
    save(tmp_path, 10)
    (checkpoint.checkpoint_dir(tmp_path) / "latest").write_text("step00000099")
    assert checkpoint.latest_tag(tmp_path) is None and checkpoint.saved_state(tmp_path) is None


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save(tmp_path, 5)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.load(FakeEngine(), tmp_path)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_pruning_counts_only_checkpoints_that_pass_their_size_check(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 20)
    root = checkpoint.checkpoint_dir(tmp_path)
    (root / "step00000020" / "mp_rank_00_model_states.pt").write_text("")  # damaged
    save(tmp_path, 30)  # keep_last=2: the new one and the newest valid older one
    assert sorted(p.name for p in root.glob("step*")) == ["step00000010", "step00000030"]
