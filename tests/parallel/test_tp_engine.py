"""tp=2 through the DeepSpeed engine equals tp=1 in one process (gloo, fp32, clipping on).

A small hand-built model: embedding -> column-parallel linear -> relu -> row-parallel
linear (+ residual) -> stacked "expert" weights (+ residual) -> head, cross-entropy on the
next token. Token t goes to expert t % E (fixed routing, so the test is about the engine,
not the router). Two expert arrangements at tp=2, dp=1:

* ``ep``: ep=2 folded over the two TP ranks; each rank holds one expert and computes it for
  its tokens of the replicated input (copy to / reduce from the EP group), so expert
  gradients live on one rank each and the EDP groups are single ranks;
* ``rows``: ep=1, every rank holds both experts and computes 1/tp of the token rows (the
  rows are gathered back), so expert gradients are partial sums the engine adds over the
  EDP group {0, 1}, which spans the TP group.

``gradient_clipping`` is 0.05, below every step's gradient norm, so clipping bites, at ZeRO 0
(the bridge's exact-norm clip) and ZeRO 1 (DeepSpeed's norm with experts tagged
model-parallel). Ten AdamW steps: each step's loss and ``engine.get_global_grad_norm()``
equal the tp=1 run's (one process, the same bridge.initialize with a dp=1 layout) within
atol 1e-5, and both TP ranks report the same values.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parallel.layout import ParallelLayout
from parallel.markers import mark_expert
from parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_region,
    gather_from_region,
    reduce_from_region,
    scatter_to_region,
)
from tests.dist import run_ranks

V, D, FF, E, B, S, STEPS, CLIP = 32, 16, 32, 2, 4, 8, 10, 0.05
CASES = [("ep", 0), ("ep", 1), ("rows", 0), ("rows", 1)]


class TinyTPModel(nn.Module):
    """tokens [B, S] -> logits [B, S, V] with the dense MLP split over ``tp_group``."""

    def __init__(self, groups, mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)  # the tp=1 weights, sliced on every TP rank
        self.embed = nn.Embedding(V, D)
        up, down = nn.Linear(D, FF), nn.Linear(FF, D)
        self.head = nn.Linear(D, V)
        full = torch.randn(E, D, D) * 0.3
        self.mode = mode
        self.tp_group = groups.tp_group if groups.tp_size > 1 else None
        self.ep_group = groups.ep_group if groups.ep_size > 1 else None
        self.tp, self.tp_rank = groups.tp_size, groups.tp_rank
        self.up = ColumnParallelLinear.from_linear(up, self.tp_group)
        self.down = RowParallelLinear.from_linear(down, self.tp_group)
        local = E // groups.ep_size
        self.first_expert = groups.ep_rank * local
        self.experts = mark_expert(
            nn.Parameter(full[self.first_expert : self.first_expert + local])
        )

    def _experts(self, h: torch.Tensor, first_row: int) -> torch.Tensor:
        """h [T, D] -> [T, D]: row t (global row first_row + t) through expert t % E, if local."""
        ids = torch.arange(first_row, first_row + h.shape[0]) % E - self.first_expert
        rows = ((ids >= 0) & (ids < self.experts.shape[0])).nonzero().squeeze(1)
        out = torch.bmm(h[rows].unsqueeze(1), self.experts[ids[rows]]).squeeze(1)
        return torch.zeros_like(h).index_add(0, rows, out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        h = (x + self.down(torch.relu(self.up(x)))).reshape(-1, D)
        if self.mode == "ep":  # replicated rows, experts split: each rank adds its experts' part
            y = reduce_from_region(
                self._experts(copy_to_region(h, self.ep_group), 0), self.ep_group
            )
        else:  # experts replicated, rows split over TP and gathered back
            mine = scatter_to_region(h.T, self.tp_group).T
            first = self.tp_rank * (h.shape[0] // self.tp)
            y = gather_from_region(self._experts(mine, first).T.contiguous(), self.tp_group).T
        return self.head((h + y).reshape(tokens.shape[0], -1, D))


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": B,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "steps_per_print": 10**9,
    }


def _train_body(rank: int, world_size: int, cases: list[tuple[str, int]]) -> dict:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    from parallel import deepspeed_bridge as bridge

    results = {}
    for mode, stage in cases:
        ep = world_size if mode == "ep" else 1
        groups = ParallelLayout(dp=1, tp=world_size, ep=ep).build(num_experts=E)
        model = TinyTPModel(groups, mode)
        engine = bridge.initialize(
            model, ds_config(stage), groups=groups, num_experts_per_layer=[E], zero_stage=stage
        )
        losses, norms = [], []
        for step in range(STEPS):
            tokens = torch.randint(0, V, (B, S + 1), generator=torch.Generator().manual_seed(step))
            logits = engine(tokens[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            norms.append(float(engine.get_global_grad_norm()))
        results[(mode, stage)] = {"losses": losses, "norms": norms}
    return results


@pytest.mark.slow
def test_tp2_equals_tp1_losses_and_clipped_grad_norms(tmp_path):
    # One FileStore directory per launch: a second launch must not read the first's keys.
    (tmp_path / "tp1").mkdir()
    (tmp_path / "tp2").mkdir()
    (reference,) = run_ranks(1, _train_body, tmp_path / "tp1", CASES, timeout=120)
    tp2 = run_ranks(2, _train_body, tmp_path / "tp2", CASES, timeout=120)
    for case in CASES:
        want = reference[case]
        assert min(want["norms"]) > 2 * CLIP, case  # clipping changes every step
        for rank, got in enumerate(tp2):
            assert got[case]["losses"] == pytest.approx(want["losses"], abs=1e-5), (case, rank)
            assert got[case]["norms"] == pytest.approx(want["norms"], abs=1e-5), (case, rank)
