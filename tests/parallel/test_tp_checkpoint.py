"""Portable checkpoints across tensor-parallel layouts (parallel/expert_checkpoint.py), gloo.

A small model, embedding -> column-parallel up -> relu -> row-parallel down (+ residual) ->
stacked expert weights [E, D, H], [E, H, D] (every expert on every row, no capacity, so
every layout computes the same function) -> head, built full from one seed and then cut for
the layout.

One 4-rank spawn (the layouts the issue names, "dp=2 x tp=2, ep=2" etc.):
1. dp=2 x tp=2, ep=2, ZeRO 1: train 3 steps, save, train 2 more (the uninterrupted run);
   each rank also returns its shards of every weight and Adam moment.
2. dp=4, ep=2 (tp=1, plain nn.Linear), ZeRO 0: load that file, train the same 2 steps; then
   save this tp=1 state and train 2 more (a second uninterrupted run).
3. dp=2 x tp=2, ep=4, ZeRO 1 (moments scattered into partitions of the shards): load the
   first file, train the 2 steps; load the tp=1 file, train its 2 steps (tp=1 -> tp=2).
One 1-process spawn: tp=1, ep=1, ZeRO 0 loads the first file and trains the 2 steps.
Every resumed run's losses equal its uninterrupted run's (atol 1e-5), which needs weights,
both Adam moments and the Adam step restored shard by shard. The file holds the full
tensors under the tp=1 names: they equal the shards concatenated along each parameter's
partition dim in TP-rank order (experts in EP-rank order), and the one process holds
exactly those after loading.
"""

from __future__ import annotations

import io
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parallel.markers import mark_expert
from parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_region,
    gather_from_region,
    group_size_and_rank,
    reduce_from_region,
    scatter_to_region,
)
from tests.dist import run_ranks
from tests.parallel.test_ep_engine import ds_config  # AdamW lr 1e-2, no clipping

VOCAB, D, FF, H, E, ROWS = 16, 16, 32, 8, 4, 16
SAVE_AT, RESUMED = 3, 2  # steps before saving, steps compared after it


def _by_rows(function, x: torch.Tensor, group) -> torch.Tensor:
    """Apply a last-dim region function of parallel.tensor_parallel to the rows (dim 0)."""
    return function(x.t(), group).t()


class ExpertMix(nn.Module):
    """x [T, D] -> x + sum_e tanh(x w1_e) w2_e / E over all E experts; w1 [E_l, D, H],
    w2 [E_l, H, D].

    Under TP each TP rank takes 1/tp of the rows (they are gathered back after), so the EP
    group, which may hold several TP ranks of one data shard, sees every row once. Each EP
    rank applies its E_l experts to the rows of the whole EP group and the partial sums are
    added over the group (forward and backward all-reduce), each rank keeping its rows.
    """

    def __init__(self) -> None:
        super().__init__()
        self.w1 = mark_expert(nn.Parameter(torch.randn(E, D, H) / D**0.5))
        self.w2 = mark_expert(nn.Parameter(torch.randn(E, H, D) / H**0.5))
        self.tp_group = self.ep_group = None

    def parallelize(self, tp_group, ep_group) -> None:
        ep, ep_rank = group_size_and_rank(ep_group)
        block = slice(ep_rank * E // ep, (ep_rank + 1) * E // ep)
        for name in ("w1", "w2"):
            weight = getattr(self, name).detach()[block].clone()
            setattr(self, name, mark_expert(nn.Parameter(weight)))
        self.tp_group, self.ep_group = tp_group, ep_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tp, ep = self.tp_group, self.ep_group
        own = _by_rows(scatter_to_region, x, tp)  # [T / tp, D]
        # every EP rank's rows; backward: the gradients of all EP ranks' experts summed
        seen = _by_rows(copy_to_region, _by_rows(gather_from_region, own, ep), ep)
        hidden = torch.tanh(torch.einsum("td,edh->eth", seen, self.w1))
        partial = torch.einsum("eth,ehd->td", hidden, self.w2) / E
        total = _by_rows(reduce_from_region, _by_rows(copy_to_region, partial, ep), ep)
        rank = group_size_and_rank(ep)[1]
        mine = total[rank * own.shape[0] : (rank + 1) * own.shape[0]]
        return x + _by_rows(gather_from_region, mine, tp)


class TinyTPModel(nn.Module):
    """ids [T] -> embed -> up (column) -> relu -> down (row) + residual -> experts -> head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.up = nn.Linear(D, FF)
        self.down = nn.Linear(FF, D)
        self.experts = ExpertMix()  # its weights carry mark_expert
        self.head = nn.Linear(D, VOCAB)

    def parallelize(self, groups) -> None:
        """Cut the full layers for this rank (tp=1 keeps the nn.Linear layers)."""
        if groups.tp_size > 1:
            self.up = ColumnParallelLinear.from_linear(self.up, groups.tp_group)
            self.down = RowParallelLinear.from_linear(self.down, groups.tp_group)
        tp_group = groups.tp_group if groups.tp_size > 1 else None
        ep_group = groups.ep_group if groups.ep_size > 1 else None
        self.experts.parallelize(tp_group, ep_group)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        hidden = hidden + self.down(torch.relu(self.up(hidden)))
        return F.cross_entropy(self.head(self.experts(hidden)), targets)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(VOCAB, (ROWS,), generator=generator)
    return ids, torch.randint(VOCAB, (ROWS,), generator=generator)


def build(world_size: int, dp: int, tp: int, ep: int, stage: int):
    from parallel import deepspeed_bridge as bridge
    from parallel.layout import ParallelLayout

    groups = ParallelLayout(dp=dp, tp=tp, ep=ep).build(num_experts=E)
    model = TinyTPModel()
    model.parallelize(groups)
    engine = bridge.initialize(
        model,
        ds_config(stage),
        num_experts_per_layer=[E],
        ep_size=ep,
        zero_stage=stage,
        groups=groups,
    )
    return groups, model, engine


def train(engine, groups, steps: range) -> list[float]:
    """Engine steps on this data shard's rows of each global batch (the TP ranks of a shard
    share them); the losses averaged over the data shards."""
    dp, dp_rank = groups.layout.dp, groups.dp_rank
    rows = slice(dp_rank * ROWS // dp, (dp_rank + 1) * ROWS // dp)
    losses = []
    for step in steps:
        ids, targets = (t[rows] for t in global_batch(step))
        loss = engine(ids, targets)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)  # TP ranks repeat their shard's loss
        losses.append(mean.item() / torch.distributed.get_world_size())
    return losses


def shards(engine, model) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's weight and Adam moments of every parameter, as the engine holds them."""
    from parallel import deepspeed_bridge as bridge

    bridge.link_optimizer_state(engine)
    optimizer = bridge.base_optimizer(engine)
    out = {}
    for name, param in model.named_parameters():
        entry = {"weight": param.detach().clone()}
        for key in ("exp_avg", "exp_avg_sq"):
            if bridge.has_partitioned_master(param):
                entry[key] = bridge.read_partitioned_master(param, key).clone()
            else:
                entry[key] = optimizer.state[param][key].clone()
        out[name] = entry
    return out


def four_ranks(rank: int, world_size: int, directory: str) -> bytes:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    from parallel import deepspeed_bridge as bridge
    from parallel.expert_checkpoint import load_portable, portable_info, save_portable

    bridge.init_distributed("gloo")
    saved_tp2 = os.path.join(directory, "tp2.pt")
    saved_tp1 = os.path.join(directory, "tp1.pt")
    after = range(SAVE_AT, SAVE_AT + RESUMED)
    later = range(SAVE_AT + RESUMED, SAVE_AT + 2 * RESUMED)
    results = {}

    groups, model, engine = build(world_size, dp=2, tp=2, ep=2, stage=1)
    train(engine, groups, range(SAVE_AT))
    save_portable(engine, model, groups, saved_tp2)
    results["shards"] = shards(engine, model)
    results["coordinates"] = (groups.tp_rank, groups.ep_rank)
    results["uninterrupted"] = train(engine, groups, after)
    results["info"] = portable_info(saved_tp2)

    groups, model, engine = build(world_size, dp=4, tp=1, ep=2, stage=0)
    load_portable(engine, model, groups, saved_tp2)
    results["dp4_ep2"] = train(engine, groups, after)
    save_portable(engine, model, groups, saved_tp1)
    results["uninterrupted_tp1"] = train(engine, groups, later)

    groups, model, engine = build(world_size, dp=2, tp=2, ep=4, stage=1)
    load_portable(engine, model, groups, saved_tp2)
    results["tp2_ep4"] = train(engine, groups, after)
    load_portable(engine, model, groups, saved_tp1)
    results["tp1_to_tp2"] = train(engine, groups, later)
    buffer = io.BytesIO()
    torch.save(results, buffer)
    return buffer.getvalue()


def one_process(rank: int, world_size: int, directory: str) -> bytes:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    from parallel import deepspeed_bridge as bridge
    from parallel.expert_checkpoint import load_portable

    bridge.init_distributed("gloo")
    groups, model, engine = build(world_size, dp=1, tp=1, ep=1, stage=0)
    load_portable(engine, model, groups, os.path.join(directory, "tp2.pt"))
    results = {"loaded": shards(engine, model)}
    results["losses"] = train(engine, groups, range(SAVE_AT, SAVE_AT + RESUMED))
    buffer = io.BytesIO()
    torch.save(results, buffer)
    return buffer.getvalue()


def assemble(per_rank: list[dict], name: str, key: str, dim: int | None) -> torch.Tensor:
    """The full tensor from every rank's piece: experts by EP rank, TP shards by TP rank."""
    pieces = {}
    for results in per_rank:
        tp_rank, ep_rank = results["coordinates"]
        index = ep_rank if dim is None else tp_rank
        pieces.setdefault(index, results["shards"][name][key])
    ordered = [pieces[i] for i in sorted(pieces)]
    return torch.cat(ordered, dim=0 if dim is None else dim)


@pytest.mark.slow
def test_save_at_dp2_tp2_ep2_resume_at_other_tp_and_ep(tmp_path):
    raw = run_ranks(4, four_ranks, tmp_path, str(tmp_path), timeout=300)
    ranks = [torch.load(io.BytesIO(r), weights_only=False) for r in raw]
    single = torch.load(
        io.BytesIO(run_ranks(1, one_process, tmp_path, str(tmp_path), timeout=120)[0]),
        weights_only=False,
    )
    uninterrupted = ranks[0]["uninterrupted"]
    for results in ranks:
        for run in ("dp4_ep2", "tp2_ep4"):
            assert results[run] == pytest.approx(uninterrupted, abs=1e-5), run
        assert results["tp1_to_tp2"] == pytest.approx(ranks[0]["uninterrupted_tp1"], abs=1e-5)
    assert single["losses"] == pytest.approx(uninterrupted, abs=1e-5)
    assert ranks[0]["info"].startswith("saved with dp=2 x tp=2 x pp=1 (ep=2) on 4 ranks")

    saved = torch.load(tmp_path / "tp2.pt", weights_only=False)["tensors"]
    split = {"up.weight": 0, "up.bias": 0, "down.weight": 1}  # ColumnParallel 0, RowParallel 1
    assert set(saved) == set(single["loaded"]) == {
        "embed.weight", "up.weight", "up.bias", "down.weight", "down.bias",
        "experts.w1", "experts.w2", "head.weight", "head.bias",
    }  # fmt: skip
    for name, entry in saved.items():
        for key, value in entry.items():
            if name.startswith("experts."):
                full = assemble(ranks, name, key, None)
            elif name in split:
                full = assemble(ranks, name, key, split[name])
            else:
                full = ranks[0]["shards"][name][key]
            assert value.shape == single["loaded"][name][key].shape == full.shape, (name, key)
            assert torch.equal(value, full), (name, key)
            assert torch.equal(single["loaded"][name][key], value), (name, key)
            if key != "weight":
                assert value.abs().max() > 0, (name, key)  # moments were saved, not zeros


def test_tensor_parallel_dim_and_layout_free_engine_files():
    from parallel.expert_checkpoint import (
        _cut_shard,
        _join_shards,
        engine_files_are_layout_free,
        partition_stride,
        tensor_parallel_dim,
    )
    from parallel.layout import ParallelLayout, ProcessGroups
    from parallel.tensor_parallel import mark_tensor_parallel

    column = ColumnParallelLinear(D, FF)
    row = RowParallelLinear(FF, D)
    assert [tensor_parallel_dim(p) for p in (column.weight, column.bias)] == [0, 0]
    assert [tensor_parallel_dim(p) for p in (row.weight, row.bias)] == [1, None]
    expert = mark_expert(nn.Parameter(torch.zeros(E, D, D)))
    mark_tensor_parallel(expert, partition_dim=0)  # e.g. tagged for the gradient norm
    assert tensor_parallel_dim(expert) is None  # experts are EP-split, never TP-split
    row.weight.partition_stride = 3  # FF / tp columns do not split into 3 blocks
    with pytest.raises(ValueError, match="partition_stride 3"):
        partition_stride(row.weight)
    # strided shards (fused q/k/v, swiglu gate/up): rank r holds blocks r, tp + r, ... of the
    # full tensor; joining every rank's shard and cutting it again are inverses
    full = torch.arange(24.0).reshape(12, 2)
    shards = [_cut_shard(full, 0, 3, 2, r) for r in range(2)]
    assert shards[0][:, 0].tolist() == [0, 2, 8, 10, 16, 18]  # q, k, v rows of rank 0
    assert torch.equal(_join_shards(shards, 0, 3), full)

    model = nn.Linear(D, D)
    engine = SimpleNamespace(
        optimizer=torch.optim.AdamW(model.parameters()),
        module=model,
        zero_optimization_stage=lambda: 0,
    )

    def groups(tp: int) -> ProcessGroups:
        return ProcessGroups(layout=ParallelLayout(dp=1, tp=tp), mesh=None, rank=0)

    assert engine_files_are_layout_free(engine, groups(1))
    assert not engine_files_are_layout_free(engine, groups(2))  # the files hold TP shards
