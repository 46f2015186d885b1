"""``moeforge train`` under tensor parallelism equals one process (gloo, fp32, clipping on).

Every layout trains the same global batch from the same seed, so each logged step's loss,
CE, aux and z losses and the engine's global gradient norm must agree with the one-process
reference (atol 1e-5 over ten AdamW steps; clipping at 1.0 is on by default):

* tp=2 (2 ranks) == tp=1 (1 process), at ZeRO 0 and ZeRO 1;
* on 4 ranks, dp=2 x tp=2, dp=2 x tp=2 with ep=2 folded over the TP ranks, and tp=4, each
  == one process with the same global batch (dp=2 layouts: ``moe.simulate_ep=2``, which
  routes each data-parallel rank's rows as its own shard, as the real run does);
* a checkpoint saved at dp=2 x tp=2, ep=2 resumes at tp=1 ep=1 in one process and at
  dp=2 x tp=2, ep=4: the next steps' losses equal the uninterrupted run's (aux and z
  coefficients 0: one process routes the global batch as one shard);
* bf16 autocast at tp=2 trains (a smoke test: rounding differs from tp=1) with an fp32 router.

The model has a dense block and an MoE block (moe.every=2) with full attention (heads split
over TP). Routing is dropless: under TP each rank routes 1/tp of the rows with its own
capacity, so with a capacity limit the drops of a tp=2 run are those of twice the routing
shards; the load-balancing statistics are those of all rows (equal to tp=1 either way).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.dist import run_ranks

BASE = [
    "model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.d_ff=64",
    "model.max_seq_len=16", "data.seq_len=16", "moe.num_experts=4", "moe.every=2",
    "moe.capacity_factor=0", "moe.eval_capacity_factor=0", "precision=fp32",
    "train.log_every=1", "train.eval_every=0", "checkpoint.every=0", "schedule.warmup_steps=1",
    "train.steps=10",
]  # fmt: skip
KEYS = ("loss", "ce_loss", "aux_loss", "z_loss", "grad_norm")
ATOL = 1e-5


def train_runs(rank: int, world_size: int, runs: list[tuple[str, list[str]]]) -> dict:
    """Train each (run dir, overrides) in turn on these ranks; rank 0 returns the metrics."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    from launch.config import load_config
    from launch.trainer import train

    out = {}
    for run_dir, overrides in runs:
        train(load_config(None, overrides), Path(run_dir))
        if rank == 0:
            lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            out[run_dir] = [r for r in map(json.loads, lines) if "loss" in r]
    return out


def assert_same(actual: list[dict], expected: list[dict], what: str, keys=KEYS) -> None:
    assert [r["step"] for r in actual] == [r["step"] for r in expected], what
    for key in keys:
        got, want = [r[key] for r in actual], [r[key] for r in expected]
        assert got == pytest.approx(want, abs=ATOL), f"{what}: {key}"


def one_process(tmp_path: Path, runs: list[tuple[str, list[str]]]) -> dict:
    return run_ranks(1, train_runs, tmp_path, runs, timeout=600)[0]


@pytest.mark.slow
def test_tp2_equals_tp1_at_zero_0_and_1(tmp_path):
    runs = {z: [*BASE, "train.micro_batch=2", f"parallel.zero_stage={z}"] for z in (0, 1)}
    reference = one_process(tmp_path, [(str(tmp_path / f"ref{z}"), o) for z, o in runs.items()])
    tp2 = run_ranks(
        2, train_runs, tmp_path,
        [(str(tmp_path / f"tp2_z{z}"), [*o, "parallel.tp=2"]) for z, o in runs.items()],
        timeout=600,
    )[0]  # fmt: skip
    for z in (0, 1):
        assert_same(tp2[str(tmp_path / f"tp2_z{z}")], reference[str(tmp_path / f"ref{z}")],
                    f"tp=2 vs tp=1 at ZeRO {z}")  # fmt: skip
        losses = [r["loss"] for r in reference[str(tmp_path / f"ref{z}")]]
        assert losses[-1] < losses[0]
    # clipping bites: the first steps' norms are above the 1.0 clip
    assert max(r["grad_norm"] for r in reference[str(tmp_path / "ref0")]) > 1.0


@pytest.mark.slow
def test_four_rank_layouts_equal_one_process(tmp_path):
    """dp=2 x tp=2, dp=2 x tp=2 with ep=2, and tp=4 against one process, same global batch."""
    micro = "train.micro_batch=2"
    layouts = {
        "dp2_tp2": [*BASE, micro, "parallel.tp=2"],
        "dp2_tp2_ep2": [*BASE, micro, "parallel.tp=2", "parallel.ep=2"],
        "tp4": [*BASE, "train.micro_batch=4", "parallel.tp=4"],
    }
    got = run_ranks(
        4, train_runs, tmp_path, [(str(tmp_path / k), o) for k, o in layouts.items()], timeout=900
    )[0]
    reference = one_process(
        tmp_path,
        [
            (str(tmp_path / "ref_dp2"), [*BASE, "train.micro_batch=4", "moe.simulate_ep=2"]),
            (str(tmp_path / "ref"), [*BASE, "train.micro_batch=4"]),
        ],
    )
    for name in ("dp2_tp2", "dp2_tp2_ep2"):
        assert_same(got[str(tmp_path / name)], reference[str(tmp_path / "ref_dp2")], name,
                    keys=KEYS[:4])  # fmt: skip
    assert_same(got[str(tmp_path / "tp4")], reference[str(tmp_path / "ref")], "tp4")


def resume_runs(rank: int, world_size: int, root: str, plan: list) -> dict:
    return train_runs(rank, world_size, [(str(Path(root) / d), o) for d, o in plan])


@pytest.mark.slow
def test_checkpoint_at_dp2_tp2_ep2_resumes_at_other_layouts(tmp_path):
    # One process routes its whole batch as one shard, the dp=2 runs as two: the aux and z
    # losses (averaged per shard) differ by layout, so their coefficients are 0 here and the
    # losses compare the weights and Adam state that crossed the layouts.
    steps = [o for o in BASE if not o.startswith("train.steps")]
    steps += ["train.steps=6", "moe.aux_loss_coef=0", "moe.z_loss_coef=0"]
    saved = [*steps, "train.micro_batch=2", "parallel.tp=2", "parallel.ep=2",
             "checkpoint.every=3"]  # fmt: skip
    four = run_ranks(
        4, resume_runs, tmp_path, str(tmp_path),
        [("straight", saved), ("a", [*saved, "train.stop_at=3"]),
         ("b", [*saved, "train.stop_at=3"])],
        timeout=900,
    )[0]  # fmt: skip
    # a: one process, tp=1 ep=1, the same global batch in one micro batch
    one = [o for o in saved if not o.startswith(("parallel.", "train.micro_batch"))]
    resumed_one = one_process(tmp_path, [(str(tmp_path / "a"), [*one, "train.micro_batch=4"])])
    # b: 4 ranks, dp=2 x tp=2 with ep=4
    resumed_b = run_ranks(
        4, resume_runs, tmp_path, str(tmp_path),
        [("b", [*[o for o in saved if o != "parallel.ep=2"], "parallel.ep=4"])], timeout=900,
    )[0]  # fmt: skip
    straight = {r["step"]: r for r in four[str(tmp_path / "straight")]}
    for name, resumed in (("tp=1 ep=1", resumed_one), ("dp=2 x tp=2, ep=4", resumed_b)):
        records = {r["step"]: r for r in next(iter(resumed.values()))}
        assert sorted(records) == [1, 2, 3, 4, 5, 6], name
        for key in ("loss", "ce_loss"):
            assert [records[s][key] for s in (4, 5, 6)] == pytest.approx(
                [straight[s][key] for s in (4, 5, 6)], abs=ATOL
            ), f"{name}: {key}"
    assert (tmp_path / "a" / "checkpoints" / "step00000003" / "portable.pt").is_file()


def bf16_body(rank: int, world_size: int, run_dir: str) -> dict:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    import torch

    from launch.config import load_config
    from launch.trainer import build_engine, build_layout, build_model_data, parallelize, start

    overrides = [o for o in BASE if o != "precision=fp32" and not o.startswith("train.steps")]
    config = load_config(None, [*overrides, "precision=bf16", "parallel.tp=2", "train.steps=2"])
    run = start(config, Path(run_dir))
    build_layout(run)
    build_model_data(run)
    parallelize(run)
    build_engine(run, None)
    engine = run.engine
    router = next(m for m in engine.module.modules() if hasattr(m, "keep_fp32"))
    tokens = torch.randint(0, 200, (2, 15))
    losses = []
    for _ in range(3):
        out = engine(tokens, targets=tokens)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    return {
        "router_dtype": str(next(router.parameters()).dtype),
        "losses": losses,
    }


@pytest.mark.slow
def test_bf16_autocast_at_tp2_trains_with_an_fp32_router(tmp_path):
    results = run_ranks(2, bf16_body, tmp_path, str(tmp_path / "bf16"), timeout=600)
    for result in results:
        assert result["router_dtype"] == "torch.float32"
        assert all(v == v for v in result["losses"])  # finite
    assert results[0]["losses"] == pytest.approx(results[1]["losses"], abs=1e-6)  # TP ranks agree
