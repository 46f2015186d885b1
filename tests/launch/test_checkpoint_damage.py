"""Damaged checkpoints, full disks and run directories that must not start over, through ``train()``.

One process, a tiny fp32 model. An uninterrupted run of 6 steps checkpoints at steps 2, 4
and 6. Copies of it cut back to step 4 get their step-4 checkpoint damaged (every file
truncated, the model-states file deleted, random bytes written inside the model-states file
at its own size, ``latest`` naming a missing directory); each re-run, plain (no
``--resume``), names the damage in one line, continues from step 2 and logs the same losses
as the uninterrupted run for steps 3 to 6 (atol 1e-6; same weights, Adam state, data position
and RNG). A run dir with metrics and only damaged checkpoints is refused in one line and
left as it was; ``fresh`` starts it over. A mocked ENOSPC while writing step 4 is one line
naming steps 4 and 2, leaves step 2 valid and no ``.tmp-step*``. A file damaged before its
manifest was written fails to load in one line naming it. ``checkpoint info`` lists the
damage. Two ranks (slow): a deleted ``rng_rank1.pt`` falls back to step 2 with equal losses.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from launch import checkpoint
from launch.checkpoint_info import verify_run
from launch.checkpoint_verify import (
    describe_files,
    find_resume_point,
    list_files,
    verify,
    write_manifest,
)
from launch.errors import UserError

OVERRIDES = [
    "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64",
    "model.max_seq_len=16", "data.seq_len=16", "moe.num_experts=4", "moe.every=1",
    "precision=fp32", "train.steps=6", "train.log_every=1", "train.micro_batch=2",
    "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep_last=3",
    "logging.progress=false", "logging.tensorboard=false", "logging.csv=true",
]  # fmt: skip
MODEL_FILE = "mp_rank_00_model_states.pt"
ATOL = 1e-6


def run(run_dir: Path, *extra: str, **flags: bool) -> None:
    from launch.config import load_config
    from launch.trainer import train

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    train(load_config(None, [*OVERRIDES, *extra]), run_dir, **flags)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture
def messages():
    """Lines the moeforge logger prints during a test."""
    from launch.log import get_logger

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    get_logger().addHandler(handler)
    yield lines
    get_logger().removeHandler(handler)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run: 6 steps, checkpoints at 2, 4 and 6."""
    run_dir = tmp_path_factory.mktemp("straight")
    run(run_dir)
    return run_dir


def cut_at_step4(straight: Path, destination: Path) -> Path:
    """A copy of the run as if it had stopped right after its step-4 checkpoint."""
    shutil.copytree(straight, destination)
    root = checkpoint.checkpoint_dir(destination)
    shutil.rmtree(root / "step00000006")
    (root / checkpoint.LATEST).write_text("step00000004")
    metrics = destination / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= 4]
    metrics.write_text("".join(f"{line}\n" for line in kept))
    return destination


def truncate_all(directory: Path) -> None:
    for path in directory.iterdir():
        with path.open("r+b") as stream:
            stream.truncate(path.stat().st_size // 2)


def delete_model_file(directory: Path) -> None:
    (directory / MODEL_FILE).unlink()


def random_bytes_inside(directory: Path) -> None:
    path = directory / MODEL_FILE
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    data[start : start + 4096] = os.urandom(4096)  # same size: only the checksum sees it
    path.write_bytes(bytes(data))


def dangling_latest(directory: Path) -> None:
    shutil.rmtree(directory)  # latest still names step00000004


DAMAGE = {
    "truncated": (truncate_all, "step00000004 is damaged (manifest.json unreadable)"),
    "deleted": (delete_model_file, f"step00000004 is damaged ({MODEL_FILE} missing)"),
    "random_bytes": (random_bytes_inside, f"step00000004 is damaged ({MODEL_FILE} checksum"),
    "dangling_latest": (dangling_latest, "latest names 'step00000004', which is not a checkpoint"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_with_the_same_losses(
    straight, tmp_path, messages, case
):
    damage, said = DAMAGE[case]
    run_dir = cut_at_step4(straight, tmp_path / case)
    damage(checkpoint.checkpoint_dir(run_dir) / "step00000004")
    run(run_dir, "checkpoint.keep_last=4")  # a plain re-run, as after a crash; one value changed
    warnings = [m for m in messages if "resuming from the newest valid" in m]
    assert len(warnings) == 1 and "\n" not in warnings[0], messages
    assert said in warnings[0] and warnings[0].endswith("step00000002 (step 2)"), warnings
    got, want = losses(run_dir), losses(straight)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert got[step] == pytest.approx(want[step], abs=ATOL), (case, step)
    # The run's config follows the resume; the step-4 checkpoint was rewritten and is valid.
    assert "keep_last: 4" in (run_dir / "config.yaml").read_text()
    assert find_resume_point(checkpoint.checkpoint_dir(run_dir)).tag == "step00000006"
    assert verify(checkpoint.checkpoint_dir(run_dir) / "step00000004", checksums=True) is None
    if case == "truncated":  # the CSV monitor: one header, each step once, as uninterrupted
        for name in ("moeforge_loss.csv", "Train_Samples_lr.csv"):
            rows = list(csv.reader((run_dir / "monitor" / "csv" / name).open()))
            expected = list(csv.reader((straight / "monitor" / "csv" / name).open()))
            assert [r[0] for r in rows] == [r[0] for r in expected], name
            assert rows[0][0] == "step" and sum(r[0] == "step" for r in rows) == 1


def test_checkpoint_info_reports_damage(straight, tmp_path):
    run_dir = cut_at_step4(straight, tmp_path / "info")
    random_bytes_inside(checkpoint.checkpoint_dir(run_dir) / "step00000004")
    lines, valid = verify_run(run_dir)
    assert valid and lines[0].endswith("step00000002: step 2")
    assert f"step00000004: damaged: {MODEL_FILE} checksum mismatch" in lines[-2]
    assert lines[-1] == "step00000002: ok"
    (checkpoint.checkpoint_dir(run_dir) / "step00000002" / "manifest.json").unlink()
    lines, valid = verify_run(run_dir)
    assert not valid and "no valid checkpoint" in lines[0]
    assert lines[-1] == "step00000002: damaged: manifest.json missing"


def test_a_run_dir_without_a_valid_checkpoint_is_refused_until_fresh(straight, tmp_path, messages):
    run_dir = cut_at_step4(straight, tmp_path / "broken")
    root = checkpoint.checkpoint_dir(run_dir)
    for tag in ("step00000002", "step00000004"):
        (root / tag / checkpoint.STATE_FILE).unlink()
    before = (run_dir / "metrics.jsonl").read_text()
    for flags, start in (({}, str(run_dir)), ({"resume": True}, f"--resume: {run_dir}")):
        with pytest.raises(UserError) as err:
            run(run_dir, **flags)
        message = str(err.value)
        assert "\n" not in message and message.startswith(start), message
        assert "holds a previous run (metrics.jsonl, 2 checkpoints) but no valid checkpoint" in (
            message
        )
        assert "step00000004 is damaged (moeforge.json missing)" in message
        assert message.endswith("rerun with --fresh to start over, or use a new --run-dir")
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing was touched
    assert sorted(p.name for p in root.glob("step*")) == ["step00000002", "step00000004"]
    with pytest.raises(UserError, match=r"^--no-resume: .* already holds a run"):
        run(tmp_path / "broken", no_resume=True)
    run(run_dir, fresh=True)
    assert any(
        m.startswith(f"--fresh: starting {run_dir} over: removing metrics.jsonl") for m in messages
    )
    got, want = losses(run_dir), losses(straight)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert all(got[s] == pytest.approx(want[s], abs=ATOL) for s in got)


def test_a_load_error_the_manifest_cannot_see_names_the_file(straight, tmp_path):
    run_dir = cut_at_step4(straight, tmp_path / "written_damaged")
    directory = checkpoint.checkpoint_dir(run_dir) / "step00000004"
    (directory / MODEL_FILE).write_bytes(os.urandom(2048))  # damaged before the manifest
    write_manifest(directory, describe_files(directory, list_files(directory)))
    with pytest.raises(UserError) as err:
        run(run_dir)
    message = str(err.value)
    assert message.startswith(f"cannot load checkpoint {directory / MODEL_FILE}: ")
    assert "\n" not in message and message.endswith(f"delete {directory} to resume from the "
                                                    "checkpoint before it")  # fmt: skip


def test_full_disk_while_saving_is_one_line_and_leaves_the_previous_checkpoint(
    tmp_path, monkeypatch
):
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "step00000004" in str(path) and Path(path).name.startswith("rng_rank"):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(checkpoint.NoSpaceLeft) as err:
        run(tmp_path, "train.steps=4")
    message = str(err.value)
    assert message.startswith("no space left writing step 4; step 2 intact") and "\n" not in message
    assert isinstance(err.value, UserError)  # the CLI prints it in one line, exit status 2
    root = checkpoint.checkpoint_dir(tmp_path)
    assert not list(root.glob(".tmp-step*"))
    assert [p.name for p in root.glob("step*")] == ["step00000002"]
    assert verify(root / "step00000002", checksums=True) is None
    assert checkpoint.latest_tag(tmp_path) == "step00000002"


def test_cli_restart_flags_are_exclusive():
    from launch.cli import _train_parser

    parser = _train_parser()
    args = parser.parse_args(["--fresh"])
    assert (args.fresh, args.resume, args.no_resume) == (True, False, False)
    with pytest.raises(SystemExit) as err:
        parser.parse_args(["--resume", "--fresh"])
    assert err.value.code == 2


def two_rank_body(rank: int, world_size: int, root_name: str) -> dict:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    import torch.distributed as dist

    from launch.log import get_logger

    root = Path(root_name)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    get_logger().addHandler(handler)
    run(root / "straight")
    if rank == 0:
        cut_at_step4(root / "straight", root / "resumed")
        (checkpoint.checkpoint_dir(root / "resumed") / "step00000004" / "rng_rank1.pt").unlink()
    dist.barrier()
    run(root / "resumed")
    if rank != 0:
        return {}
    manifest = checkpoint.checkpoint_dir(root / "straight") / "step00000006" / "manifest.json"
    return {
        "straight": losses(root / "straight"),
        "resumed": losses(root / "resumed"),
        "messages": lines,
        "files": sorted(json.loads(manifest.read_text())["files"]),
    }


@pytest.mark.slow
def test_two_ranks_fall_back_from_a_deleted_rank_file(tmp_path):
    from tests.dist import run_ranks

    result = run_ranks(2, two_rank_body, tmp_path, str(tmp_path), timeout=300)[0]
    assert {"rng_rank0.pt", "rng_rank1.pt", MODEL_FILE, "moeforge.json"} <= set(result["files"])
    warnings = [m for m in result["messages"] if "resuming from the newest valid" in m]
    assert len(warnings) == 1 and "step00000004 is damaged (rng_rank1.pt missing)" in warnings[0]
    got, want = result["resumed"], result["straight"]
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert all(got[s] == pytest.approx(want[s], abs=ATOL) for s in got), (got, want)


def test_resume_with_more_steps_warns_that_the_schedule_jumps(straight, tmp_path, messages):
    run_dir = tmp_path / "longer"
    shutil.copytree(straight, run_dir)
    run(run_dir, "train.steps=8")
    warned = [m for m in messages if m.startswith("train.steps changed from 6 to 8")]
    assert len(warned) == 1 and "learning rate jumps at step 6" in warned[0], messages
    lr = {
        r["step"]: r["lr"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "lr" in r
    }
    assert lr[7] > lr[6]  # what the warning says: the decayed run's rate goes back up
    # Resuming at the saved length says nothing.
    messages.clear()
    again = tmp_path / "same"
    shutil.copytree(straight, again)
    run(again)
    assert not [m for m in messages if m.startswith("train.steps changed")]
