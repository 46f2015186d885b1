"""``moeforge train`` resumes a run at another EP size, through ``train()``.

One spawn of 4 gloo ranks (dp=4 throughout, so per-rank capacity, data order and RNG streams
do not depend on ep): an uninterrupted run of 5 steps at ep=4 checkpoints every 2 steps;
copies of its step-2 checkpoint continue at ep=2 and at ep=1, and a copy of the ep=1 run's
step-4 checkpoint continues back at ep=2. Every continued step's logged loss, CE, aux and z
loss equals the uninterrupted run's within rtol 1e-5 (fp32; the same routing, weights, Adam
moments and step, LR schedule, data position and RNG; only the reduction order of the
all-to-all and gradient averaging differs). A changed parallel.zero_stage or
moe.num_experts, and a checkpoint at ep=4 without portable.pt, are refused with one line.
The cheap tests below check the same refusals without processes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import yaml

from launch import checkpoint
from launch.config import RunConfig, config_from_dict, incompatible_fields
from launch.errors import UserError
from tests.dist import run_ranks

OVERRIDES = [
    "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64",
    "model.max_seq_len=16", "data.seq_len=16", "moe.num_experts=4", "moe.every=1",
    "moe.capacity_factor=1.0", "precision=fp32", "train.steps=5", "train.log_every=1",
    "train.micro_batch=2", "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep_last=5",
    "schedule.warmup_steps=2", "logging.progress=false",
]  # fmt: skip
KEYS = ("loss", "ce_loss", "aux_loss", "z_loss", "lr")
RTOL = 1e-5


def copy_at(source: Path, destination: Path, step: int) -> None:
    """A copy of run ``source`` whose latest checkpoint is the one after ``step``."""
    shutil.copytree(source, destination)
    root = checkpoint.checkpoint_dir(destination)
    for later in root.glob("step*"):
        if int(later.name.removeprefix("step")) > step:
            shutil.rmtree(later)
    (root / checkpoint.LATEST).write_text(checkpoint.tag_for(step))


def refusal(config_overrides: list[str], run_dir: Path) -> str:
    """The one-line message ``train`` refuses to resume ``run_dir`` with."""
    from launch.config import load_config
    from launch.trainer import train

    with pytest.raises(UserError) as err:
        train(load_config(None, config_overrides), run_dir)
    return str(err.value)


def body(rank: int, world_size: int, root_name: str) -> dict:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    import torch.distributed as dist

    from launch.checkpoint_info import describe
    from launch.checkpoint_verify import describe_files, list_files, write_manifest
    from launch.config import load_config
    from launch.log import get_logger
    from launch.trainer import train

    root = Path(root_name)
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    get_logger().addHandler(handler)

    def run(name: str, ep: int, stage: int) -> None:
        overrides = [*OVERRIDES, f"parallel.ep={ep}", f"parallel.zero_stage={stage}"]
        train(load_config(None, overrides), root / name)

    def copy(source: str, destination: str, step: int) -> None:
        if rank == 0:
            copy_at(root / source, root / destination, step)
        dist.barrier()

    for stage in (0, 2):
        run(f"z{stage}_ep4", 4, stage)
        for ep in (2, 1):
            copy(f"z{stage}_ep4", f"z{stage}_ep4_to_ep{ep}", 2)
            run(f"z{stage}_ep4_to_ep{ep}", ep, stage)
    copy("z0_ep4_to_ep1", "z0_ep1_to_ep2", 4)
    run("z0_ep1_to_ep2", 2, 0)

    copy("z0_ep4", "refused", 2)
    refused = {
        "zero_stage": refusal([*OVERRIDES, "parallel.ep=2", "parallel.zero_stage=1"],
                              root / "refused"),
        "num_experts": refusal([*OVERRIDES, "parallel.ep=2", "moe.num_experts=8"],
                               root / "refused"),
    }  # fmt: skip
    copy("z0_ep4", "no_portable", 2)
    if rank == 0:  # as if written without it (before portable.pt existed): a valid manifest
        saved = checkpoint.checkpoint_dir(root / "no_portable") / "step00000002"
        (saved / "portable.pt").unlink()
        write_manifest(saved, describe_files(saved, list_files(saved)))
    dist.barrier()
    refused["no_portable"] = refusal([*OVERRIDES, "parallel.ep=2"], root / "no_portable")
    if rank != 0:
        return {}
    runs = [p.name for p in sorted(root.glob("z*"))]
    return {
        "metrics": {
            name: [
                json.loads(line)
                for line in (root / name / "metrics.jsonl").read_text().splitlines()
            ]
            for name in runs
        },
        "refused": refused,
        "messages": messages,
        "info": describe(root / "z0_ep1_to_ep2"),
        "saved_ep": {name: checkpoint.saved_state(root / name)["ep"] for name in runs},
        "run_config_ep": {
            name: yaml.safe_load((root / name / "config.yaml").read_text())["parallel"]["ep"]
            for name in runs
        },
    }


@pytest.mark.slow
def test_resume_at_ep2_and_ep1_and_back_continues_with_the_same_losses(tmp_path):
    result = run_ranks(4, body, tmp_path, str(tmp_path), timeout=600)[0]
    metrics = {
        name: {r["step"]: r for r in records if "loss" in r}
        for name, records in result["metrics"].items()
    }
    continued = {"ep4_to_ep2": (3, 4, 5), "ep4_to_ep1": (3, 4, 5), "ep1_to_ep2": (5,)}
    for stage in (0, 2):
        straight = metrics[f"z{stage}_ep4"]
        assert sorted(straight) == [1, 2, 3, 4, 5]
        for name, steps in continued.items():
            if f"z{stage}_{name}" not in metrics:
                continue
            run = metrics[f"z{stage}_{name}"]
            assert sorted(run) == [1, 2, 3, 4, 5], name  # records up to the checkpoint kept
            for step in steps:
                for key in KEYS:
                    assert run[step][key] == pytest.approx(straight[step][key], rel=RTOL), (
                        stage, name, step, key,
                    )  # fmt: skip
    assert len(metrics) == 7
    # ZeRO 2 partitions moments and gradients differently, yet trains the same numbers.
    assert metrics["z2_ep4"][5]["loss"] == pytest.approx(metrics["z0_ep4"][5]["loss"], rel=RTOL)
    straight = metrics["z0_ep4"]
    assert straight[5]["loss"] < straight[1]["loss"]  # it trains, so the check is not vacuous
    messages = result["messages"]
    # An ep=1 checkpoint at ZeRO 0 has no portable.pt: the engine's files hold the same.
    for before, after, count, source in (
        (4, 2, 2, "portable.pt"), (4, 1, 2, "portable.pt"), (1, 2, 1, "the engine's files"),
    ):  # fmt: skip

        def layout(ep: int) -> str:
            return "dp=4" if ep == 1 else f"dp=4, ep={ep}"

        line = (
            f"resuming a run saved at {layout(before)} at {layout(after)} "
            f"(weights and Adam state from {source})"
        )
        assert messages.count(line) == count, messages
    refused = result["refused"]
    assert refused["zero_stage"].startswith("cannot resume")
    assert "parallel.zero_stage (0 -> 1)" in refused["zero_stage"]
    assert "moe.num_experts (4 -> 8)" in refused["num_experts"]
    assert refused["no_portable"].startswith("cannot resume")
    assert "saved at parallel.ep=4 without portable.pt" in refused["no_portable"]
    assert all("\n" not in message for message in refused.values())
    assert result["saved_ep"] == {
        "z0_ep4": 4, "z0_ep4_to_ep2": 2, "z0_ep4_to_ep1": 1, "z0_ep1_to_ep2": 2,
        "z2_ep4": 4, "z2_ep4_to_ep2": 2, "z2_ep4_to_ep1": 1,
    }  # fmt: skip
    assert result["run_config_ep"] == result["saved_ep"]  # the run's resolved config follows
    info = result["info"]
    assert "step 5" in info[0] and "(ep=2, each expert on 2 rank(s)) on 4 ranks" in info[1]
    assert info[2].startswith("experts: saved with dp=4 x tp=1 x pp=1 (ep=2) on 4 ranks")


# Without processes -------------------------------------------------------------------------


def test_incompatible_fields_accept_ep_but_not_zero_stage_or_experts():
    saved = config_from_dict({"moe": {"num_experts": 4}, "parallel": {"ep": 4}})
    saved = saved.model_dump(mode="json")
    assert incompatible_fields(saved, config_from_dict({"moe": {"num_experts": 4}})) == []
    changed = incompatible_fields(
        saved, config_from_dict({"moe": {"num_experts": 4}, "parallel": {"ep": 2, "zero_stage": 1}})
    )
    assert changed == ["parallel.zero_stage (0 -> 1)"]
    changed = incompatible_fields(saved, config_from_dict({"moe": {"num_experts": 8}}))
    assert changed == ["moe.num_experts (4 -> 8)"]
    assert incompatible_fields(RunConfig().model_dump(mode="json"), RunConfig()) == []


def write_checkpoint(run_dir: Path, ep: int, portable: bool, record_ep: bool = True) -> None:
    directory = checkpoint.checkpoint_dir(run_dir) / "step00000004"
    directory.mkdir(parents=True)
    state = {"step": 4, "world_size": 4, **({"ep": ep} if record_ep else {})}
    (directory / checkpoint.STATE_FILE).write_text(json.dumps(state))
    (directory / "config.yaml").write_text(f"parallel:\n  ep: {ep}\n  zero_stage: 0\n")
    if portable:
        (directory / checkpoint.PORTABLE_FILE).write_bytes(b"")
    (checkpoint.checkpoint_dir(run_dir) / checkpoint.LATEST).write_text("step00000004")


def test_another_ep_needs_the_portable_file(tmp_path):
    write_checkpoint(tmp_path / "with", ep=4, portable=True)
    for ep in (4, 2, 1):
        checkpoint.check_ep_change(tmp_path / "with", ep)  # accepted
    write_checkpoint(tmp_path / "without", ep=4, portable=False)
    checkpoint.check_ep_change(tmp_path / "without", 4)  # same ep: the engine's files suffice
    with pytest.raises(UserError) as err:
        checkpoint.check_ep_change(tmp_path / "without", 2)
    message = str(err.value)
    assert message.startswith("cannot resume") and "\n" not in message
    assert "saved at parallel.ep=4 without portable.pt" in message
    assert message.endswith("resume at parallel.ep=4")
    write_checkpoint(tmp_path / "old", ep=2, portable=False, record_ep=False)
    assert checkpoint.saved_ep(tmp_path / "old") == 2  # from the saved config
    assert checkpoint.saved_ep(tmp_path / "none") is None
