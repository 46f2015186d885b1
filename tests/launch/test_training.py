"""End to end: `moeforge train` subprocesses (one process and torchrun with two ranks).

Resume exactness: N steps, stop, resume, N more == 2N uninterrupted, step by step (exact,
same process count). Data parallel: two ranks with micro batch 2 == one rank with micro batch
4 (same global batch; dropless routing, no aux loss, no dropout, so only float rounding
differs) within rtol 2e-3 on the cross-entropy. User errors that need the engine or data:
one line, exit status 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import checkpoint
from launch.launcher import free_port
from tests.launch.corpus import write_corpus

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
STEPS = 6

TINY = """
model: {d_model: 32, num_layers: 2, num_heads: 2, d_ff: 64, max_seq_len: 32, dropout: 0.1}
moe: {num_experts: 4, capacity_factor: 1.0, jitter_eps: 0.1}
data: {seq_len: 32, path: CORPUS}
optimizer: {lr: 0.003}
schedule: {warmup_steps: 2}
train: {steps: 6, micro_batch: 4, log_every: 1, eval_every: 3, eval_batches: 2}
checkpoint: {every: 2, keep_last: 2}
logging: {progress: false, tensorboard: false, csv: true}
"""
EXACT_DP = [
    "model.dropout=0.0", "moe.jitter_eps=0.0", "moe.capacity_factor=null", "moe.aux_loss_coef=0.0",
    "precision=fp32",
]  # fmt: skip


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    corpus = write_corpus(root)
    path = root / "tiny.yaml"
    path.write_text(TINY.replace("CORPUS", str(corpus)))
    return path


def moeforge(args: list[str], ranks: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if ranks == 1:
        command = [sys.executable, "-m", "launch.cli", *args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            f"--master_port={free_port()}", "-m", "launch.cli", *args,
        ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(
            f"moeforge {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}"
        )
    return done


def records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def train(config: Path, run_dir: Path, *sets: str, ranks: int = 1, resume: bool = False) -> None:
    args = ["train", str(config), "--run-dir", str(run_dir), *[f"--set={s}" for s in sets]]
    moeforge(args + (["--resume"] if resume else []), ranks=ranks)


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("full")
    train(config, run_dir)
    return run_dir


def test_one_process_trains_logs_evaluates_and_checkpoints(uninterrupted):
    steps, evals = records(uninterrupted)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    keys = {"loss", "ce_loss", "aux_loss", "z_loss", "dropped_fraction", "tokens_per_s"}
    assert all(keys <= set(r) for r in steps) and steps[-1]["ce_loss"] < steps[0]["ce_loss"]
    assert [r["step"] for r in evals] == [3, 6] and all(r["val_bpb"] > 0 for r in evals)
    assert (uninterrupted / "config.yaml").is_file()
    tags = sorted(p.name for p in checkpoint.checkpoint_dir(uninterrupted).glob("step*"))
    assert tags == ["step00000004", "step00000006"]  # every 2, keep_last 2
    assert checkpoint.latest_tag(uninterrupted) == "step00000006"
    assert any((uninterrupted / "monitor").rglob("*.csv"))


def test_routing_telemetry_is_logged_and_plotted_and_checkpoint_info_reads_layout(uninterrupted):
    steps, evals = records(uninterrupted)
    layer = "moe0"  # tiny: 2 blocks, MoE every 2nd -> one MoE layer
    loads = [steps[-1][f"train/{layer}/load_e{j}"] for j in range(4)]
    assert abs(sum(loads) - 1.0) < 1e-6
    for key in ("imbalance", "drop_rate", "capacity_use", "entropy"):
        assert f"train/{layer}/{key}" in steps[-1] and f"eval/{layer}/{key}" in evals[-1]
    assert steps[-1][f"train/{layer}/imbalance"] >= 1.0
    assert 0.0 < steps[-1][f"train/{layer}/capacity_use"] <= 1.0
    png = uninterrupted / "load.png"
    moeforge(["plot-experts", str(uninterrupted), "--out", str(png)])
    assert png.stat().st_size > 1000
    info = moeforge(["checkpoint", "info", str(uninterrupted)]).stdout
    assert "step 6" in info or "step: 6" in info, info
    assert "ep=1" in info or "ep: 1" in info, info


def test_resume_continues_exactly_in_one_process(config, uninterrupted, tmp_path):
    train(config, tmp_path, "train.stop_at=3")
    assert checkpoint.saved_state(tmp_path)["step"] == 3
    train(config, tmp_path, resume=True)
    resumed, full = records(tmp_path)[0], records(uninterrupted)[0]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, full):
        assert (a["loss"], a["aux_loss"], a["z_loss"]) == (b["loss"], b["aux_loss"], b["z_loss"]), (
            a["step"]
        )
    assert records(tmp_path)[1] == records(uninterrupted)[1]


@pytest.fixture(scope="module")
def two_ranks(config, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("dp2")
    train(config, run_dir, *EXACT_DP, "train.micro_batch=2", ranks=2)
    return run_dir


def test_two_ranks_resume_exactly(config, two_ranks, tmp_path):
    train(config, tmp_path, *EXACT_DP, "train.micro_batch=2", "train.stop_at=3", ranks=2)
    train(config, tmp_path, *EXACT_DP, "train.micro_batch=2", ranks=2)  # same run dir: continues
    resumed, full = records(tmp_path)[0], records(two_ranks)[0]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]


def test_two_ranks_match_one_rank_with_the_same_global_batch(config, two_ranks, tmp_path):
    train(config, tmp_path, *EXACT_DP, "train.micro_batch=4")
    one, two = records(tmp_path)[0], records(two_ranks)[0]
    assert len(one) == len(two) == STEPS
    one_ce = torch.tensor([r["ce_loss"] for r in one])
    two_ce = torch.tensor([r["ce_loss"] for r in two])
    assert torch.allclose(one_ce, two_ce, rtol=2e-3, atol=0), (one_ce, two_ce)
    assert torch.allclose(
        torch.tensor([r["val_loss"] for r in records(tmp_path)[1]]),
        torch.tensor([r["val_loss"] for r in records(two_ranks)[1]]),
        rtol=2e-3,
    )


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("moeforge: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


def test_user_errors_in_data_and_resume_exit_2_with_one_line(config, uninterrupted, tmp_path):
    missing = moeforge(
        ["train", str(config), "--set", "data.path=/no/such/dir", "--run-dir", str(tmp_path / "a")],
        check=False,
    )
    assert _one_line_error(missing) == (
        "moeforge: error: data.path /no/such/dir does not exist; point it at a file or directory, "
        "or unset it for the embedded corpus"
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    done = moeforge(
        ["train", str(config), "--set", f"data.path={empty}", "--run-dir", str(tmp_path / "b")],
        check=False,
    )
    assert (
        _one_line_error(done)
        == f"moeforge: error: data.path {empty} is empty: no non-blank 'text' values"
    )
    changed = moeforge(
        ["train", str(config), "--set", "model.d_model=64", "--run-dir", str(uninterrupted)],
        check=False,
    )
    assert _one_line_error(changed) == (
        f"moeforge: error: cannot resume {uninterrupted}: model.d_model (32 -> 64) differs from its "
        "checkpoint; restore the saved value or use a new --run-dir"
    )
    fresh = moeforge(
        ["train", str(config), "--resume", "--run-dir", str(tmp_path / "c")], check=False
    )
    assert _one_line_error(fresh).endswith(
        "has no complete checkpoint; drop --resume to start a new run"
    )


@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun"])
def test_deepspeed_launcher_and_mpirun_start_the_same_entry_point(config, tmp_path, launcher):
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / launcher).exists():
        pytest.skip(f"{launcher} is not installed in this environment")
    if launcher == "mpirun":
        pytest.importorskip("mpi4py")
        command = [str(bin_dir / "mpirun"), "-n", "2", str(bin_dir / "moeforge")]
    else:
        command = [
            str(bin_dir / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "launch/cli.py",
        ]
    command += [
        "train",
        str(config),
        "--run-dir",
        str(tmp_path),
        "--set=train.steps=2",
        "--set=train.micro_batch=2",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    startup = [line for line in (done.stdout + done.stderr).splitlines() if "world size" in line]
    assert (
        len(startup) == 1
        and f"world size 2 | backend gloo | launcher {launcher} | layout dp=2" in startup[0]
    )
    assert [r["step"] for r in records(tmp_path)[0]] == [1, 2]
