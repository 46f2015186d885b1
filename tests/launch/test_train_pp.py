"""``moeforge train`` under pipeline parallelism equals one process (gloo, fp32, clipping on).

Every layout trains the same global batch (micro-batch x micro-batches x dp) from the same
seed, so each logged step's loss, CE, aux and z losses and the global gradient norm must
agree with the one-process reference (atol 1e-5 over ten AdamW steps, clipping at 1.0):

* pp=2 (2 ranks) == pp=1 at ZeRO 0 and ZeRO 1 with MoE blocks on both stages (cut [2, 2]),
  and at ZeRO 0 with the cut [1, 3], whose first stage holds no MoE block (ZeRO 1 refuses
  that cut at validation: DeepSpeed's ZeRO 1 stops at engine build or hangs there);
* on 4 ranks, pp=2 x dp=2 (ZeRO 1), pp=2 x tp=2, and pp=2 x dp=2 with ep=2, each == one
  process (dp=2 layouts: ``moe.simulate_ep=2``, which routes each data-parallel rank's rows
  as its own shard, as the real run does);
* a checkpoint saved at pp=2 x dp=2, ep=2 resumes in one process at pp=1 ep=1 and on 4
  ranks at pp=2 x dp=2 (ep=1): the next steps' losses equal the uninterrupted run's (aux
  and z coefficients 0: one process routes the global batch as one shard).

The model: 4 blocks, MoE in blocks 1 and 3 (moe.every=2), dropless routing, 2 micro-batches
per step (1F1B).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.dist import run_ranks
from tests.launch.test_train_tp import assert_same

BASE = [
    "model.d_model=32", "model.num_layers=4", "model.num_heads=4", "model.d_ff=64",
    "model.max_seq_len=16", "data.seq_len=16", "moe.num_experts=4", "moe.every=2",
    "moe.capacity_factor=0", "moe.eval_capacity_factor=0", "precision=fp32",
    "train.log_every=1", "train.eval_every=5", "checkpoint.every=0", "schedule.warmup_steps=1",
    "train.steps=10", "parallel.micro_batches=2",
]  # fmt: skip
KEYS = ("loss", "ce_loss", "aux_loss", "z_loss", "grad_norm")


def train_runs(rank: int, world_size: int, runs: list[tuple[str, list[str]]]) -> dict:
    """Train each (run dir, overrides) in turn on these ranks; rank 0 returns
    {run dir: (step records, evaluation records)} from metrics.jsonl."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    from launch.config import load_config
    from launch.trainer import train

    out = {}
    for run_dir, overrides in runs:
        train(load_config(None, overrides), Path(run_dir))
        if rank == 0:
            lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            records = [json.loads(line) for line in lines]
            out[run_dir] = (
                [r for r in records if "loss" in r],
                [r["val_loss"] for r in records if "val_loss" in r],
            )
    return out


def one_process(tmp_path: Path, runs: list[tuple[str, list[str]]]) -> dict:
    return run_ranks(1, train_runs, tmp_path, runs, timeout=600)[0]


@pytest.mark.slow
def test_pp2_equals_pp1(tmp_path):
    runs = {
        "z0": [*BASE, "train.micro_batch=2"],
        "z1": [*BASE, "train.micro_batch=2", "parallel.zero_stage=1"],
        "z0_cut13": [*BASE, "train.micro_batch=2", "parallel.pp_partition=[1,3]"],
    }
    reference = one_process(
        tmp_path, [(str(tmp_path / f"ref_{k}"), o) for k, o in runs.items() if k != "z0_cut13"]
    )
    pp2 = run_ranks(
        2, train_runs, tmp_path,
        [(str(tmp_path / k), [*o, "parallel.pp=2"]) for k, o in runs.items()], timeout=600,
    )[0]  # fmt: skip
    for name, ref in (("z0", "z0"), ("z1", "z1"), ("z0_cut13", "z0")):
        (got, got_val), (want, want_val) = (
            pp2[str(tmp_path / name)],
            reference[str(tmp_path / f"ref_{ref}")],
        )
        assert_same(got, want, f"pp=2 {name} vs pp=1", keys=KEYS)
        # the validation loss, summed on the last stage, too
        assert len(got_val) == 2 and got_val == pytest.approx(want_val, abs=1e-5), name
    want = reference[str(tmp_path / "ref_z0")][0]
    assert max(r["grad_norm"] for r in want) > 1.0  # clipping bites
    assert [r["loss"] for r in want][-1] < [r["loss"] for r in want][0]


@pytest.mark.slow
def test_four_rank_pipeline_layouts_equal_one_process(tmp_path):
    """pp=2 x dp=2 (ZeRO 1), pp=2 x tp=2 and pp=2 x dp=2 with ep=2 against one process."""
    micro = "train.micro_batch=2"
    layouts = {
        "pp2_dp2": [*BASE, micro, "parallel.pp=2", "parallel.zero_stage=1"],
        "pp2_tp2": [*BASE, micro, "parallel.pp=2", "parallel.tp=2"],
        "pp2_dp2_ep2": [*BASE, micro, "parallel.pp=2", "parallel.ep=2"],
    }
    got = run_ranks(
        4, train_runs, tmp_path, [(str(tmp_path / k), o) for k, o in layouts.items()], timeout=900
    )[0]
    reference = one_process(
        tmp_path,
        [
            (str(tmp_path / "ref_dp2"), [*BASE, "train.micro_batch=4", "moe.simulate_ep=2"]),
            (str(tmp_path / "ref"), [*BASE, micro]),
        ],
    )
    for name, ref in (("pp2_dp2", "ref_dp2"), ("pp2_dp2_ep2", "ref_dp2"), ("pp2_tp2", "ref")):
        (got_steps, got_val), (want_steps, want_val) = (
            got[str(tmp_path / name)],
            reference[str(tmp_path / ref)],
        )
        assert_same(got_steps, want_steps, name, KEYS)
        assert got_val == pytest.approx(want_val, abs=1e-5), name


def resume_runs(rank: int, world_size: int, root: str, plan: list) -> dict:
    return train_runs(rank, world_size, [(str(Path(root) / d), o) for d, o in plan])


@pytest.mark.slow
def test_checkpoint_at_pp2_ep2_resumes_at_other_layouts(tmp_path):
    steps = [o for o in BASE if not o.startswith(("train.steps", "train.eval_every"))]
    steps += ["train.steps=6", "train.eval_every=0", "moe.aux_loss_coef=0", "moe.z_loss_coef=0"]
    saved = [*steps, "train.micro_batch=2", "parallel.pp=2", "parallel.ep=2",
             "checkpoint.every=3"]  # fmt: skip
    four = run_ranks(
        4, resume_runs, tmp_path, str(tmp_path),
        [("straight", saved), ("a", [*saved, "train.stop_at=3"]),
         ("b", [*saved, "train.stop_at=3"])],
        timeout=900,
    )[0]  # fmt: skip
    # a: one process, pp=1 ep=1, the same global batch
    one = [
        o for o in saved if not o.startswith(("parallel.pp", "parallel.ep", "train.micro_batch"))
    ]
    resumed_one = one_process(tmp_path, [(str(tmp_path / "a"), [*one, "train.micro_batch=4"])])
    # b: 4 ranks, pp=2 x dp=2 without expert parallelism
    resumed_b = run_ranks(
        4, resume_runs, tmp_path, str(tmp_path),
        [("b", [o for o in saved if o != "parallel.ep=2"])], timeout=900,
    )[0]  # fmt: skip
    straight = {r["step"]: r for r in four[str(tmp_path / "straight")][0]}
    for name, resumed in (("pp=1 ep=1", resumed_one), ("pp=2 x dp=2", resumed_b)):
        records = {r["step"]: r for r in next(iter(resumed.values()))[0]}
        assert sorted(records) == [1, 2, 3, 4, 5, 6], name
        for key in ("loss", "ce_loss"):
            assert [records[s][key] for s in (4, 5, 6)] == pytest.approx(
                [straight[s][key] for s in (4, 5, 6)], abs=1e-5
            ), f"{name}: {key}"
    assert (tmp_path / "a" / "checkpoints" / "step00000003" / "portable.pt").is_file()
