"""DP x EP training through the DeepSpeed engine equals one simulated process (gloo, 4 ranks).

Layout dp=4 with ep=2 (written "dp=2 x ep=2"): EP groups {0, 1}, {2, 3}; each expert is
replicated on an expert-data-parallel group ({0, 2} or {1, 3}). A tiny model (linear ->
MoE layer, MSE + aux + z losses) trains 10 AdamW steps through ``bridge.initialize`` with
ZeRO 0, 1 and 2 in one spawn. Checks, per stage:
* each step's loss, averaged over ranks, equals one process running the same global batch
  with ``SimulatedDispatcher(4 virtual ranks, EP groups of 2)`` and torch's AdamW
  (atol 2e-5: fp32 rounding through 10 Adam steps), and equals the one-process simulation too: one
  process with ``simulate_ep=2`` accumulating gradients over two micro-batches, each the
  rows of one EP group (ranks {0, 1}, then {2, 3});
* afterwards each expert's replicas are bitwise identical across its EDP group, differ from
  the other experts, and equal the one-process model's experts (atol 2e-5).
"""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe.expert_parallel import gather_expert_weights, shard_experts, simulate_layout
from moe.layer import MoELayer
from tests.dist import run_ranks

D, FF, E, WORLD, EP, TOKENS, STEPS, LR = 8, 16, 4, 4, 2, 12, 10, 1e-2
STAGES = (0, 1, 2)


class TinyMoEModel(nn.Module):
    """x [T, D] -> tanh(linear) -> MoE (+ residual); loss = MSE + 0.1 aux + 0.01 z."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(D, D)
        self.moe = MoELayer(D, FF, E, top_k=2, capacity_factor=1.0, min_capacity=1)
        with torch.no_grad():
            self.moe.router.weight.mul_(10.0)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.proj(x))
        out = self.moe(hidden)
        loss = F.mse_loss(hidden + out.output, target)
        return loss + 0.1 * out.aux_loss + 0.01 * out.z_loss


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(WORLD * TOKENS, D, generator=generator)
    return x, torch.randn(WORLD * TOKENS, D, generator=generator)


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}},
        "steps_per_print": 10**9,
    }  # fmt: skip


def train_steps(engine, rank: int, steps: range, dtype: torch.dtype | None = None) -> list[float]:
    """Engine steps on this rank's rows of each global batch (cast to ``dtype`` for an engine
    with bf16 parameters); the rank-averaged losses."""
    rows = slice(rank * TOKENS, (rank + 1) * TOKENS)
    world_size = torch.distributed.get_world_size()
    losses = []
    for step in steps:
        x, target = (t[rows].to(dtype or t.dtype) for t in global_batch(step))
        loss = engine(x, target)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float().clone()
        torch.distributed.all_reduce(mean)
        losses.append(mean.item() / world_size)
    return losses


def body(rank: int, world_size: int) -> bytes:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    from parallel import deepspeed_bridge as bridge
    from parallel.layout import ParallelLayout

    bridge.init_distributed("gloo")
    groups = ParallelLayout.from_world(world_size, ep=EP).build(num_experts=E)
    results = {}
    for stage in STAGES:
        model = TinyMoEModel()
        shard_experts(model, groups.ep_group, equal_tokens=True)
        engine = bridge.initialize(
            model, ds_config(stage), num_experts_per_layer=[E], ep_size=EP, zero_stage=stage
        )
        results[stage] = {
            "losses": train_steps(engine, rank, range(STEPS)),
            "local_w1": model.moe.experts.w1.detach().clone(),
            "full": gather_expert_weights(model, groups.ep_group),
            "edp_size": torch.distributed.get_world_size(bridge.expert_data_parallel_group(EP)),
        }
    buffer = io.BytesIO()
    torch.save(results, buffer)
    return buffer.getvalue()


def reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    model = TinyMoEModel()
    simulate_layout(model, WORLD, ep=EP)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        x, target = global_batch(step)
        optimizer.zero_grad()
        loss = model(x, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {n: p.detach() for n, p in model.named_parameters() if "experts" in n}


def reference_simulate_ep2_accumulated() -> list[float]:
    """One process, ``simulate_ep=2``, the global batch as two micro-batches of one EP group."""
    model = TinyMoEModel()
    simulate_layout(model, EP)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    micro_steps = WORLD // EP
    losses = []
    for step in range(STEPS):
        x, target = global_batch(step)
        optimizer.zero_grad()
        total = 0.0
        for micro in range(micro_steps):
            rows = slice(micro * EP * TOKENS, (micro + 1) * EP * TOKENS)
            loss = model(x[rows], target[rows]) / micro_steps
            loss.backward()
            total += loss.item()
        optimizer.step()
        losses.append(total)
    return losses


@pytest.mark.slow
def test_dp4_ep2_engine_matches_simulated_process(tmp_path):
    raw = run_ranks(WORLD, body, tmp_path, timeout=600)
    results = [torch.load(io.BytesIO(r), weights_only=False) for r in raw]
    expected_losses, expected_experts = reference()
    assert expected_losses[-1] < expected_losses[0], "the reference must train"
    accumulated = reference_simulate_ep2_accumulated()
    assert accumulated == pytest.approx(expected_losses, abs=2e-5)
    for stage in STAGES:
        per_rank = [r[stage] for r in results]
        assert per_rank[0]["edp_size"] == WORLD // EP
        for rank_result in per_rank:
            assert rank_result["losses"] == pytest.approx(expected_losses, abs=2e-5), stage
        # replicas of each expert (ranks r and r + EP) are identical; experts differ
        for rank in range(EP):
            assert torch.equal(per_rank[rank]["local_w1"], per_rank[rank + EP]["local_w1"])
        assert not torch.allclose(per_rank[0]["local_w1"], per_rank[1]["local_w1"])
        for name, full in per_rank[0]["full"].items():
            torch.testing.assert_close(full, expected_experts[name], rtol=0, atol=2e-5)
