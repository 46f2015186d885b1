"""Checkpoints independent of the EP size (parallel/expert_checkpoint.py), gloo, 4 ranks.

One spawn, ZeRO 1 (partitioned Adam moments) then ZeRO 0: train 3 steps at ep=4, save, train
3 more (the uninterrupted run); then fresh models at ep=2 and at ep=1 load the checkpoint and
train the same 3 steps. Their losses equal the uninterrupted run's (atol 1e-5; fp32), which
needs the weights, both Adam moments and the Adam step restored with every expert at its
global id. The data-parallel degree stays 4, so per-rank capacity gives the same routing.
"""

from __future__ import annotations

import io
import os

import pytest
import torch

from tests.dist import run_ranks

# the same tiny model, batches and DeepSpeed config as the engine test
from tests.parallel.test_ep_engine import TinyMoEModel, ds_config, train_steps

WORLD, E = 4, 4


def body(rank: int, world_size: int, directory: str) -> bytes:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    from moe.expert_parallel import shard_experts
    from parallel import deepspeed_bridge as bridge
    from parallel.expert_checkpoint import load_portable, portable_info, save_portable
    from parallel.layout import ParallelLayout

    bridge.init_distributed("gloo")

    def build(ep: int, stage: int):
        groups = ParallelLayout.from_world(world_size, ep=ep).build(num_experts=E)
        model = TinyMoEModel()
        if ep > 1:
            shard_experts(model, groups.ep_group, equal_tokens=True)
        engine = bridge.initialize(
            model, ds_config(stage), num_experts_per_layer=[E], ep_size=ep, zero_stage=stage
        )
        return groups, model, engine

    def train(engine, steps: range) -> list[float]:
        return train_steps(engine, rank, steps)

    results = {}
    for stage in (1, 0):
        path = os.path.join(directory, f"portable_stage{stage}.pt")
        groups, model, engine = build(4, stage)
        train(engine, range(3))
        save_portable(engine, model, groups, path)
        results[(stage, "ep4")] = train(engine, range(3, 6))
        for ep in (2, 1):
            groups, model, engine = build(ep, stage)
            meta = load_portable(engine, model, groups, path)
            assert meta["layout"]["ep"] == 4, meta
            results[(stage, f"ep{ep}")] = train(engine, range(3, 6))
        results[(stage, "info")] = portable_info(path)
    buffer = io.BytesIO()
    torch.save(results, buffer)
    return buffer.getvalue()


@pytest.mark.slow
def test_save_at_ep4_resume_at_ep2_and_ep1(tmp_path):
    raw = run_ranks(WORLD, body, tmp_path, str(tmp_path), timeout=600)
    results = [torch.load(io.BytesIO(r), weights_only=False) for r in raw]
    for stage in (1, 0):
        uninterrupted = results[0][(stage, "ep4")]
        for ep in ("ep2", "ep1"):
            for rank_results in results:
                assert rank_results[(stage, ep)] == pytest.approx(uninterrupted, abs=1e-5), (
                    stage, ep,
                )  # fmt: skip
        info = results[0][(stage, "info")]
        assert (
            info.startswith("saved with dp=4 x tp=1 x pp=1 (ep=4) on 4 ranks") and "step 3" in info
        )
