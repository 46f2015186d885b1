"""tp=2 through the DeepSpeed engine equals tp=1 in one process (gloo, fp32, clipping on).

A small hand-built model: embedding -> column-parallel linear -> relu -> row-parallel
linear (+ residual) -> stacked "expert" weights (+ residual) -> head, cross-entropy on the
next token. Global row t goes to expert t % E (fixed routing, so the test is about the
engine, not the router). Two expert arrangements:

* ``ep``: EP = the TP group; the rows are replicated over it, each rank computes its experts
  for them (copy to / reduce from the EP group), so an expert's gradient lives on one rank
  of its TP group;
* ``fold``: the issue's MoE under TP in miniature: each TP rank takes 1/tp of its rows, the
  rows of the EP group are gathered, each rank runs its experts on them, the outputs are
  summed over the EP group and every rank keeps its own rows, which TP gathers back. With
  ep=1 every rank holds every expert and the engine adds the partial expert gradients over
  the EDP group (spanning TP); with EP across the data-parallel replicas each expert lives
  on one rank of the world.

``gradient_clipping`` is 0.05, below every step's gradient norm, so clipping bites: at ZeRO 0
through the bridge's exact-norm clip, at ZeRO 1/2 through DeepSpeed's norm with experts
tagged model-parallel. Ten AdamW steps: each step's loss (averaged over the data-parallel
ranks) and ``engine.get_global_grad_norm()`` on every rank equal one process running the
whole global batch (the same bridge.initialize with a dp=1 layout) within atol 1e-5.
2 ranks: tp=2 (dp=1); 4 ranks: dp=2 x tp=2 with ep=2 and ep=4.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
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

V, D, FF, E, B, S, STEPS, CLIP = 32, 16, 32, 4, 4, 8, 10, 0.05


class _GatherRows(torch.autograd.Function):
    """x [T, D] -> [ep * T, D] in group-rank order; backward: the gradient summed over the
    group (every rank's outputs used every row), this rank's rows kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        rows = grad.shape[0] // dist.get_world_size(ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad[rank * rows : (rank + 1) * rows], None


class _SumOverGroup(torch.autograd.Function):
    """Forward and backward both sum over the group (each rank keeps its own rows after)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


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
        self.ep, self.ep_rank, self.ep_block = groups.ep_size, groups.ep_rank, groups.edp_rank
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
        else:  # rows split over TP, exchanged over EP, gathered back over TP
            mine = scatter_to_region(h.T, self.tp_group).T  # [T / tp, D]
            rows = mine.shape[0]
            if self.ep_group is not None:
                mine = _GatherRows.apply(mine, self.ep_group)  # the EP group's rows
            # Global row ids: the stage's ranks hold consecutive row blocks, EP groups too.
            out = self._experts(mine, self.ep_block * self.ep * rows)
            if self.ep_group is not None:
                out = _SumOverGroup.apply(out, self.ep_group)
                out = out[self.ep_rank * rows : (self.ep_rank + 1) * rows]
            y = gather_from_region(out.T.contiguous(), self.tp_group).T
        return self.head((h + y).reshape(tokens.shape[0], -1, D))


def ds_config(stage: int, micro_batch: int = B) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "steps_per_print": 10**9,
    }


def _train_body(rank: int, world_size: int, shards: int, cases: list) -> dict:
    """Each (mode, ep, stage) of ``cases`` for STEPS steps on dp = ``shards`` data-parallel
    replicas x tp = world / dp; one process (world 1) runs them at dp = tp = ep = 1 on the
    whole global batch of ``shards`` x B sequences."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    from parallel import deepspeed_bridge as bridge

    dp = shards if world_size > 1 else 1
    micro = B * shards // dp
    results = {}
    for mode, ep, stage in cases:
        layout = ParallelLayout(dp=dp, tp=world_size // dp, ep=ep if world_size > 1 else 1)
        groups = layout.build(num_experts=E)
        model = TinyTPModel(groups, mode)
        engine = bridge.initialize(
            model,
            ds_config(stage, micro),
            groups=groups,
            num_experts_per_layer=[E],
            zero_stage=stage,
        )
        losses, norms = [], []
        for step in range(STEPS):
            generator = torch.Generator().manual_seed(step)
            batch = torch.randint(0, V, (B * shards, S + 1), generator=generator)
            tokens = batch[groups.dp_rank * micro : (groups.dp_rank + 1) * micro]
            logits = engine(tokens[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            norms.append(float(engine.get_global_grad_norm()))
        results[(mode, ep, stage)] = {"losses": losses, "norms": norms}
    return results


def _check(reference: dict, ranks: list[dict], cases: list) -> None:
    for case in cases:
        want = reference[case]
        assert min(want["norms"]) > 2 * CLIP, case  # clipping changes every step
        # Rows of every data-parallel shard are equal in number: the global loss is the mean.
        mean = [sum(r[case]["losses"][i] for r in ranks) / len(ranks) for i in range(STEPS)]
        assert mean == pytest.approx(want["losses"], abs=1e-5), case
        for rank, got in enumerate(ranks):
            assert got[case]["norms"] == pytest.approx(want["norms"], abs=1e-5), (case, rank)


@pytest.mark.slow
def test_tp2_equals_tp1_losses_and_clipped_grad_norms(tmp_path):
    cases = [("ep", 2, 0), ("ep", 2, 1), ("fold", 1, 0), ("fold", 1, 1), ("fold", 1, 2)]
    # One FileStore directory per launch: a second launch must not read the first's keys.
    (tmp_path / "tp1").mkdir()
    (tmp_path / "tp2").mkdir()
    (reference,) = run_ranks(1, _train_body, tmp_path / "tp1", 1, cases, timeout=120)
    tp2 = run_ranks(2, _train_body, tmp_path / "tp2", 1, cases, timeout=120)
    _check(reference, tp2, cases)


@pytest.mark.slow
def test_dp2_x_tp2_with_folded_ep_equals_one_process(tmp_path):
    """dp=2 x tp=2 with ep=2 (EP = the TP pair) and ep=4 (each expert on one rank of the
    world, EP across the data-parallel replicas: DeepSpeed's own ZeRO 0 clip would average
    the norm's square root over dp there)."""
    cases = [("ep", 2, 1), ("fold", 4, 0), ("fold", 4, 1)]
    (tmp_path / "one").mkdir()
    (tmp_path / "four").mkdir()
    (reference,) = run_ranks(1, _train_body, tmp_path / "one", 2, cases, timeout=120)
    four = run_ranks(4, _train_body, tmp_path / "four", 2, cases, timeout=180)
    _check(reference, four, cases)
