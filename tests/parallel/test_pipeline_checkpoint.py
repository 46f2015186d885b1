"""Pipeline-parallel checkpoints (gloo): every EP rank's experts kept, resumable at any layout.

The model, batches and DeepSpeed config of tests/parallel/test_pipeline.py (4 blocks, MoE in
blocks 1 and 3, one on each stage; ZeRO 1 with clipping; dropless routing). A 4-rank run at
pp=2 x dp=2, ep=2 (stages {0, 1} | {2, 3}, EP groups {0, 1} and {2, 3}: each rank of a
stage holds 2 of the 4 experts of its MoE block) trains 2 steps, saves through
launch/checkpoint.py, and trains 2 more: the uninterrupted run. Then fresh engines load the
checkpoint and train the same 2 steps:
  - pp=2 x dp=2, ep=2 (the same layout: DeepSpeed's module files hold dp rank 0's experts
    only, so the portable file must restore rank 1's and 3's);
  - pp=2 x dp=2, ep=1 (an EP change at pp=2);
  - pp=1, ep=1 in one process, the same global batch as 4 micro-batches of the same size;
    it saves what it loaded again at pp=1, and a 2-rank pp=2 x dp=1 run resumes that.
Their losses equal the uninterrupted run's (atol 1e-5), which also equals one process
accumulating the same micro-batches (the reference of test_pipeline.py). The first resumed
step checks the weights; the second the Adam moments and step too (measured: without the
moments the pp=1 resume's second loss is off by 1.3e-2).

aux_loss_coef stays 0.1: every layout routes the same shards (one micro-batch of
MICRO_BATCH rows per routing call, dropless, so no capacity couples ranks), so the
load-balancing loss is the same per micro-batch everywhere.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.dist import run_ranks
from tests.parallel.test_pipeline import (
    CLIP,
    LR,
    MICRO,
    MICRO_BATCH,
    batches,
    build_model,
    ds_config,
)

E = 4  # experts per MoE block
SAVE_AT, STEPS = 2, 4
EXPERT = "experts.w1"  # a stacked expert weight: [E_l, d, f] on a rank


def _groups(dp: int, ep: int, pp: int):
    from parallel.layout import ParallelLayout

    return ParallelLayout(dp=dp, ep=ep, pp=pp).build(num_experts=E)


def _pipe(dp: int, ep: int):
    """A Transformer (experts sharded at ep > 1) and its pp=2 engine over (dp, ep)."""
    from moe.expert_parallel import shard_experts
    from moe.pipeline import pipeline_engine

    groups = _groups(dp, ep, 2)
    model = build_model()
    if ep > 1:
        shard_experts(model, groups.ep_group)
    config = {**ds_config(), "train_batch_size": MICRO_BATCH * MICRO * dp}
    engine, _, _ = pipeline_engine(model, config, pp=2, dp=dp, ep_size=ep, groups=groups)
    return groups, model, engine


def _train_pipe(engine, groups, steps: range) -> list[float]:
    """Each dp rank reads its own micro-batches; the loss averaged over dp (the engine's)."""
    return [float(engine.train_batch(iter(batches(2 * step + groups.dp_rank)))) for step in steps]


def _experts(engine, model: nn.Module) -> dict[str, torch.Tensor]:
    """The expert weights this rank's stage trains (the model's others are stale copies)."""
    from parallel.expert_checkpoint import held_parameters

    held = held_parameters(engine, model)
    return {n: p.detach().clone() for n, p in held if n.endswith(EXPERT)}


def _save(engine, groups, model, run_dir: Path) -> None:
    from launch import checkpoint

    checkpoint.save(
        engine, run_dir, SAVE_AT, world_size=groups.layout.world_size, config_yaml="{}\n",
        keep_last=2, groups=groups, model=model, extra=checkpoint.layout_of(groups),
    )  # fmt: skip


def pp2_body(rank: int, world_size: int, run_dir: str) -> bytes:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    from launch import checkpoint
    from parallel import deepspeed_bridge as bridge

    bridge.init_distributed("gloo")
    out: dict = {}
    groups, model, engine = _pipe(dp=2, ep=2)
    out["first"] = _train_pipe(engine, groups, range(SAVE_AT))
    out["held_experts"] = _experts(engine, model)
    _save(engine, groups, model, Path(run_dir))
    out["uninterrupted"] = _train_pipe(engine, groups, range(SAVE_AT, STEPS))
    out["stage"] = groups.pp_rank

    groups, model, engine = _pipe(dp=2, ep=2)  # fresh weights: a real resume
    out["fresh_experts"] = _experts(engine, model)
    state = checkpoint.load(engine, Path(run_dir), groups=groups, model=model)
    out["state"] = state
    out["global_steps"] = [engine.global_steps]
    out["loaded_experts"] = _experts(engine, model)
    out["same_layout"] = _train_pipe(engine, groups, range(SAVE_AT, STEPS))

    groups, model, engine = _pipe(dp=2, ep=1)
    checkpoint.load(engine, Path(run_dir), groups=groups, model=model)
    out["global_steps"].append(engine.global_steps)  # from the engine files, another layout
    out["ep1"] = _train_pipe(engine, groups, range(SAVE_AT, STEPS))
    buffer = io.BytesIO()
    torch.save(out, buffer)
    return buffer.getvalue()


def pp1_body(rank: int, world_size: int, run_dir: str, pp1_dir: str) -> list[float]:
    """pp=1, ep=1, one process: a step accumulates dp rank 0's then dp rank 1's micro-batches
    (4 of MICRO_BATCH rows: the same routing shards and global batch). Saves what it loaded
    again, at pp=1, in ``pp1_dir``, for a pipeline engine to resume from."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    from launch import checkpoint
    from parallel import deepspeed_bridge as bridge

    bridge.init_distributed("gloo")
    groups = _groups(dp=1, ep=1, pp=1)
    model = build_model()
    config = {
        **ds_config(),
        "gradient_accumulation_steps": 2 * MICRO,
        "train_batch_size": 2 * MICRO * MICRO_BATCH,
    }
    engine = bridge.initialize(
        model, config, groups=groups, num_experts_per_layer=[E, E], zero_stage=1
    )
    checkpoint.load(engine, Path(run_dir), groups=groups, model=model)
    assert engine.global_steps == SAVE_AT, engine.global_steps
    losses = []
    for step in range(SAVE_AT, STEPS):
        if step == SAVE_AT:
            checkpoint.save(
                engine, Path(pp1_dir), step, world_size=1, config_yaml="{}\n", keep_last=2,
                groups=groups, model=model, extra=checkpoint.layout_of(groups),
            )  # fmt: skip
        total = 0.0
        for dp_rank in range(2):
            for (ids, _), targets in batches(2 * step + dp_rank):
                loss = engine(ids, targets).loss
                engine.backward(loss)
                engine.step()
                total += float(loss) / (2 * MICRO)
        losses.append(total)
    return losses


def from_pp1_body(rank: int, world_size: int, pp1_dir: str, bf16_dir: str) -> dict:
    """pp=2 x dp=1 resumes the pp=1 checkpoint: the same 4 micro-batches a step. Then a
    classic-bf16 ZeRO 0 run at pp=2 (DeepSpeed's BF16_Optimizer, fp32 masters) saves after
    2 steps and resumes at the same layout."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    from launch import checkpoint
    from moe.pipeline import pipeline_engine
    from parallel import deepspeed_bridge as bridge

    bridge.init_distributed("gloo")
    groups = _groups(dp=1, ep=1, pp=2)
    model = build_model()
    config = {
        **ds_config(),
        "gradient_accumulation_steps": 2 * MICRO,
        "train_batch_size": 2 * MICRO * MICRO_BATCH,
    }
    engine, _, _ = pipeline_engine(model, config, pp=2, dp=1, groups=groups)
    state = checkpoint.load(engine, Path(pp1_dir), groups=groups, model=model)
    assert state["step"] == SAVE_AT and state["pp"] == 1, state
    assert engine.global_steps == SAVE_AT, engine.global_steps
    out = {
        "losses": [
            float(engine.train_batch(iter(batches(2 * step) + batches(2 * step + 1))))
            for step in range(SAVE_AT, STEPS)
        ]
    }
    out.update(_bf16_round_trip(groups, Path(bf16_dir)))
    return out


def _bf16_round_trip(groups, run_dir: Path) -> dict:
    """Classic bf16 at ZeRO 0, pp=2: the uninterrupted steps 2-3 and those after a resume.
    (DeepSpeed cannot read back its own optimizer file here; the resume must not need it.)"""
    from launch import checkpoint
    from moe.pipeline import pipeline_engine

    config = {
        **ds_config(),
        "zero_optimization": {"stage": 0},
        "gradient_clipping": 0.0,  # refused with ZeRO 0 at pp > 1
        "bf16": {"enabled": True},
    }

    def fresh():
        model = build_model()
        return model, pipeline_engine(model, config, pp=2, dp=1, groups=groups)[0]

    def train(engine, steps: range) -> list[float]:
        return [float(engine.train_batch(iter(batches(step)))) for step in steps]

    model, engine = fresh()
    train(engine, range(SAVE_AT))
    _save(engine, groups, model, run_dir)
    out = {"bf16_uninterrupted": train(engine, range(SAVE_AT, STEPS))}
    model, engine = fresh()
    checkpoint.load(engine, run_dir, groups=groups, model=model)
    out["bf16_resumed"] = train(engine, range(SAVE_AT, STEPS))
    out["bf16_optimizer"] = type(engine.optimizer).__name__
    return out


def reference() -> list[float]:
    """One process, torch AdamW: the global batch as 4 micro-batches, loss / 4, clipping."""
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        total = 0.0
        for dp_rank in range(2):
            for (ids, _), targets in batches(2 * step + dp_rank):
                loss = model(ids, targets).loss / (2 * MICRO)
                loss.backward()
                total += loss.item()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        losses.append(total)
    return losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pp_ckpt")
    raw = run_ranks(4, pp2_body, run_dir, str(run_dir), timeout=200)
    pp2 = [torch.load(io.BytesIO(r), weights_only=False) for r in raw]
    pp1_dir = tmp_path_factory.mktemp("pp1_ckpt")
    pp1 = run_ranks(1, pp1_body, run_dir, str(run_dir), str(pp1_dir), timeout=120)[0]
    bf16_dir = tmp_path_factory.mktemp("bf16_ckpt")
    from_pp1 = run_ranks(2, from_pp1_body, pp1_dir, str(pp1_dir), str(bf16_dir), timeout=150)
    return {"pp2": pp2, "pp1": pp1, "from_pp1": from_pp1, "run_dir": run_dir}


def _close(actual: list[float], expected: list[float], what: str) -> None:
    torch.testing.assert_close(
        torch.tensor(actual), torch.tensor(expected), atol=1e-5, rtol=0, msg=what
    )


@pytest.mark.slow
def test_uninterrupted_pp2_ep2_equals_one_process(runs):
    expected = reference()
    for rank, out in enumerate(runs["pp2"]):
        _close(out["first"] + out["uninterrupted"], expected, f"rank {rank}")


@pytest.mark.slow
@pytest.mark.parametrize("resumed", ["same_layout", "ep1"])
def test_resume_at_pp2(runs, resumed):
    """pp=2 x dp=2 at ep=2 (same layout) and at ep=1: the 2 steps after the save."""
    for rank, out in enumerate(runs["pp2"]):
        _close(out[resumed], out["uninterrupted"], f"{resumed}, rank {rank}")
        assert out["state"]["step"] == SAVE_AT and out["state"]["pp"] == 2
        assert out["global_steps"] == [SAVE_AT, SAVE_AT]


@pytest.mark.slow
def test_resume_at_pp1_one_process(runs):
    _close(runs["pp1"], runs["pp2"][0]["uninterrupted"], "pp=1 one process")


@pytest.mark.slow
def test_pipeline_resumes_a_pp1_checkpoint(runs):
    """pp=2 x dp=1 from the pp=1 checkpoint (of the state loaded from pp=2)."""
    expected = runs["pp2"][0]["uninterrupted"]
    for rank, out in enumerate(runs["from_pp1"]):
        _close(out["losses"], expected, f"pp=2 from pp=1, rank {rank}")


@pytest.mark.slow
def test_classic_bf16_zero0_resumes_at_pp2(runs):
    for rank, out in enumerate(runs["from_pp1"]):
        assert out["bf16_optimizer"] == "BF16_Optimizer"
        _close(out["bf16_resumed"], out["bf16_uninterrupted"], f"bf16, rank {rank}")


@pytest.mark.slow
def test_round_trip_keeps_every_ep_ranks_experts(runs):
    """The file holds each EP rank's block at its global ids, and a same-layout load gives
    every rank back exactly its own block (not dp rank 0's, which DeepSpeed's module files
    hold), though the fresh model started elsewhere."""
    from launch import checkpoint

    directory = checkpoint.checkpoint_dir(runs["run_dir"]) / checkpoint.tag_for(SAVE_AT)
    saved = torch.load(directory / checkpoint.PORTABLE_FILE, weights_only=False)["tensors"]
    checked = set()
    for stage in (0, 1):
        ranks = [out for out in runs["pp2"] if out["stage"] == stage]  # ep ranks 0, 1
        names = list(ranks[0]["held_experts"])
        assert len(names) == 1  # one MoE block per stage
        for name in names:
            full = saved[name]["weight"]
            assert full.shape[0] == E
            blocks = [out["held_experts"][name] for out in ranks]
            assert not torch.equal(blocks[0], blocks[1])
            torch.testing.assert_close(full, torch.cat(blocks), atol=0, rtol=0)
            for out in ranks:
                assert not torch.equal(out["fresh_experts"][name], out["held_experts"][name])
                torch.testing.assert_close(
                    out["loaded_experts"][name], out["held_experts"][name], atol=0, rtol=0
                )
            checked.add(name)
    assert len(checked) == 2
    # One file with every parameter of the Transformer under its own names, the tied
    # embedding once, the stage-1 block's experts too.
    assert set(saved) == {n for n, _ in build_model().named_parameters()}
    meta = torch.load(directory / checkpoint.PORTABLE_FILE, weights_only=False)["meta"]
    assert meta["layout"] == {"dp": 2, "ep": 2, "tp": 1, "pp": 2}


def test_info_shows_the_pipeline_layout(tmp_path):
    """``moeforge checkpoint info``: pp from moeforge.json (the config may say otherwise)."""
    import json

    from launch.checkpoint_info import describe
    from launch.checkpoint_verify import describe_files, list_files, write_manifest

    directory = tmp_path / "checkpoints" / "step00000002"
    directory.mkdir(parents=True)
    state = {"step": 2, "world_size": 4, "dp": 2, "tp": 1, "ep": 2, "pp": 2}
    (directory / "moeforge.json").write_text(json.dumps(state))
    (directory / "config.yaml").write_text("parallel:\n  zero_stage: 1\nprecision: fp32\n")
    meta = {"layout": {"dp": 2, "ep": 2, "tp": 1, "pp": 2}, "world_size": 4,
            "zero_stage": 1, "adam_step": 2.0}  # fmt: skip
    (directory / "portable.json").write_text(json.dumps(meta))
    write_manifest(directory, describe_files(directory, list_files(directory)))
    (tmp_path / "checkpoints" / "latest").write_text("step00000002")
    lines = describe(tmp_path)
    assert lines[1] == (
        "layout: dp=2 x tp=1 x pp=2 (ep=2, each expert on 1 rank(s) of its stage) on 4 ranks, "
        "ZeRO 1, precision fp32"
    )
    assert lines[2].startswith("experts: saved with dp=2 x tp=1 x pp=2 (ep=2) on 4 ranks")


def test_layout_records_and_changes(tmp_path):
    """pp is part of the layout record; a checkpoint that does not record it was pp=1."""
    import json

    from launch import checkpoint
    from launch.errors import UserError

    directory = checkpoint.checkpoint_dir(tmp_path) / "step00000002"
    directory.mkdir(parents=True)
    (directory / "moeforge.json").write_text(json.dumps({"step": 2, "world_size": 2, "ep": 2}))
    (directory / "config.yaml").write_text("parallel:\n  ep: 2\n")
    before = checkpoint.saved_layout(tmp_path, "step00000002")
    assert before == {"world_size": 2, "dp": 2, "tp": 1, "ep": 2, "pp": 1}
    assert checkpoint.describe_layout({**before, "dp": 1, "pp": 2}) == "dp=1 x pp=2, ep=2"
    pp2 = {**before, "dp": 1, "pp": 2}
    with pytest.raises(UserError, match=r"at parallel.pp=2: a pipeline stage loads only from"):
        checkpoint.check_layout_change(tmp_path, pp2, "step00000002")
    # pp=1, ep=1, ZeRO 0: the engine's files are layout-free for another ep, not for stages.
    state = {"step": 2, "world_size": 2, "ep": 1, "layout_free": "engine"}
    (directory / "moeforge.json").write_text(json.dumps(state))
    checkpoint.check_layout_change(tmp_path, {**before, "ep": 2}, "step00000002")
    with pytest.raises(UserError, match=r"parallel.pp=1\) lacks; resume at parallel"):
        checkpoint.check_layout_change(tmp_path, pp2, "step00000002")
    (directory / "portable.pt").write_bytes(b"")
    checkpoint.check_layout_change(tmp_path, pp2, "step00000002")


def tp_body(rank: int, world_size: int, run_dir: str) -> tuple[list[float], list[float]]:
    """pp=2 x tp=2, ep=2 folded over TP (4 ranks, dp=1): save after 2 steps, train 2 more;
    a fresh engine loads, writes the file again, trains the same 2 steps."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    from launch import checkpoint
    from moe.expert_parallel import apply_expert_parallel
    from moe.pipeline import pipeline_engine
    from moe.tensor_parallel import apply_tensor_parallel
    from parallel import deepspeed_bridge as bridge
    from parallel.expert_checkpoint import save_portable
    from parallel.layout import ParallelLayout

    bridge.init_distributed("gloo")

    def fresh():
        groups = ParallelLayout(dp=1, ep=2, tp=2, pp=2).build(num_experts=E)
        model = build_model()
        apply_tensor_parallel(model, groups.tp_group, data_group=groups.dp_group)
        apply_expert_parallel(model, groups)
        engine = pipeline_engine(model, ds_config(), pp=2, dp=1, tp=2, ep_size=2, groups=groups)
        return groups, model, engine[0]

    def train(engine, steps: range) -> list[float]:
        return [float(engine.train_batch(iter(batches(step)))) for step in steps]

    groups, model, engine = fresh()
    train(engine, range(SAVE_AT))
    _save(engine, groups, model, Path(run_dir))
    uninterrupted = train(engine, range(SAVE_AT, STEPS))
    groups, model, engine = fresh()
    checkpoint.load(engine, Path(run_dir), groups=groups, model=model)
    save_portable(engine, model, groups, Path(run_dir) / "again.pt")
    return uninterrupted, train(engine, range(SAVE_AT, STEPS))


@pytest.mark.slow
def test_pp2_tp2_round_trip(tmp_path):
    """Each stage gathers its TP shards and EP blocks: the file holds full tensors (q/k/v
    48 rows, not 24), loading and saving again gives the same file bit for bit, and the
    resumed steps equal the uninterrupted ones."""
    from launch import checkpoint

    results = run_ranks(4, tp_body, tmp_path, str(tmp_path), timeout=200)
    for rank, (uninterrupted, resumed) in enumerate(results):
        _close(resumed, uninterrupted, f"pp=2 x tp=2, rank {rank}")
    directory = checkpoint.checkpoint_dir(tmp_path) / checkpoint.tag_for(SAVE_AT)
    saved = torch.load(directory / checkpoint.PORTABLE_FILE, weights_only=False)["tensors"]
    again = torch.load(tmp_path / "again.pt", weights_only=False)["tensors"]
    whole = dict(build_model().named_parameters())
    assert set(saved) == set(whole) == set(again)
    for name, entry in saved.items():
        assert entry["weight"].shape == whole[name].shape, name
        for key, value in entry.items():
            torch.testing.assert_close(again[name][key], value, atol=0, rtol=0, msg=name)
