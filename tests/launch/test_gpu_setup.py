"""The GPU set-up, checked on a CPU with the device mocked: the fused optimizer per device,
one GPU per local rank (set before the process group, named to NCCL) under every launcher,
bf16 where the GPU has it, and the MFU the trainer reports (peak table, arithmetic, the
warning for a GPU the table lacks, the metrics records)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml

from launch import launcher, trainer
from launch.config import config_from_dict
from launch.precision import resolve_precision
from moe.accounting import account_config, mfu, peak_tflops
from parallel import deepspeed_bridge as bridge
from parallel import rendezvous
from tests.launch.corpus import write_corpus

REPO = Path(__file__).resolve().parents[2]
LAUNCH_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
    "DEEPSPEED_LAUNCHER", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_SIZE",
    "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
    "SLURM_LOCALID", "TORCHELASTIC_USE_AGENT_STORE",
)  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch):
    for key in LAUNCH_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


@pytest.fixture
def gpus(monkeypatch):
    """Two mocked GPUs; records set_device calls in order."""
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    return calls


# Optimizer ---------------------------------------------------------------------------------


def _groups() -> list[dict]:
    return [{"params": [torch.nn.Parameter(torch.ones(4))], "weight_decay": 0.1}]


def test_cpu_keeps_the_optimizer_deepspeed_builds(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bridge.fused_adam() is None


def test_cuda_without_apex_gets_torch_fused_adamw(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "apex", None)  # import apex -> ImportError
    monkeypatch.setitem(sys.modules, "apex.optimizers", None)
    optimizer = bridge.fused_adam()(_groups(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["fused"] is True and optimizer.defaults["lr"] == 1e-3


def test_cuda_with_apex_gets_apex_fused_adam_in_adamw_mode(monkeypatch):
    class FusedAdam:
        def __init__(self, groups, **kwargs):
            self.groups, self.kwargs = groups, kwargs

    apex = types.ModuleType("apex")
    optimizers = types.ModuleType("apex.optimizers")
    optimizers.FusedAdam = FusedAdam
    apex.optimizers = optimizers
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", optimizers)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    optimizer = bridge.fused_adam()(_groups(), lr=1e-3)
    assert isinstance(optimizer, FusedAdam)
    assert optimizer.kwargs == {"adam_w_mode": True, "lr": 1e-3}


def test_initialize_hands_the_fused_optimizer_to_the_engine(monkeypatch):
    """The client optimizer replaces the config's AdamW, with DeepSpeed-only keys removed."""
    built: dict = {}

    def factory(groups, **kwargs):
        built["kwargs"] = kwargs
        return torch.optim.AdamW(groups, **kwargs)

    def fake_initialize(**kwargs):
        built["initialize"] = kwargs
        engine = types.SimpleNamespace(optimizer=kwargs["optimizer"])
        return engine, None, None, None

    monkeypatch.setattr(bridge, "fused_adam", lambda: factory)
    monkeypatch.setattr(
        bridge, "import_deepspeed", lambda: types.SimpleNamespace(initialize=fake_initialize)
    )
    config = {
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
        "train_micro_batch_size_per_gpu": 1,
    }
    model = torch.nn.Linear(4, 4)
    engine = bridge.initialize(model, config, num_experts_per_layer=[], weight_decay=0.1)
    assert built["kwargs"] == {"lr": 0.01}
    assert "optimizer" not in built["initialize"]["config"]
    assert engine.optimizer is built["initialize"]["optimizer"]
    assert isinstance(engine.optimizer, torch.optim.AdamW)


# One GPU per local rank --------------------------------------------------------------------


def test_torchrun_environment_selects_local_rank(clean_env, gpus):
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("LOCAL_RANK", "1")
    assert launcher.discover_environment() == "torchrun"
    assert rendezvous.select_device("nccl") == torch.device("cuda", 1)
    assert gpus == [("set_device", 1)]


def test_deepspeed_launcher_environment_selects_local_rank(clean_env, gpus):
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("CROSS_RANK", "0")
    assert launcher.discover_environment() == "deepspeed"
    assert rendezvous.select_device("nccl") == torch.device("cuda", 1)
    assert gpus == [("set_device", 1)]


def test_mpirun_environment_selects_the_rank_on_this_host(clean_env, gpus):
    """Rank 3 of 4 on hosts [a, a, b, b] is the second rank on b: LOCAL_RANK 1."""
    comm = types.SimpleNamespace(
        Get_rank=lambda: 3,
        Get_size=lambda: 4,
        bcast=lambda value, root: ("10.0.0.1", 29999),
        allgather=lambda value: ["a", "a", "b", "b"],
    )
    mpi = types.SimpleNamespace(COMM_WORLD=comm, Get_processor_name=lambda: "b")
    clean_env.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=mpi))
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launcher.discover_environment() == "mpirun"
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("3", "1")
    assert rendezvous.select_device("nccl") == torch.device("cuda", 1)
    assert gpus == [("set_device", 1)]


def test_a_starter_without_local_rank_gets_its_own_variable(clean_env):
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("SLURM_LOCALID", "1")
    launcher.discover_environment()
    assert os.environ["LOCAL_RANK"] == "1"


def test_join_sets_the_device_before_the_group_and_names_it_to_nccl(clean_env, gpus):
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    clean_env.setenv("MASTER_PORT", "29500")
    clean_env.setattr(rendezvous.dist, "TCPStore", lambda *a, **k: object())
    clean_env.setattr(rendezvous.dist, "PrefixStore", lambda prefix, store: store)

    def init_process_group(backend, **kwargs):
        gpus.append(("init_process_group", (backend, kwargs.get("device_id"))))

    clean_env.setattr(rendezvous.dist, "init_process_group", init_process_group)
    rendezvous.join("nccl", timedelta(seconds=5))
    assert gpus == [("set_device", 1), ("init_process_group", ("nccl", torch.device("cuda", 1)))]
    gpus.clear()
    rendezvous.join("gloo", timedelta(seconds=5))  # gloo on a GPU machine: no device_id
    assert gpus == [("set_device", 1), ("init_process_group", ("gloo", None))]


def test_a_local_rank_beyond_the_visible_gpus_is_one_line(clean_env, gpus):
    clean_env.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"LOCAL_RANK \(2\) has no GPU: this process sees 2"):
        rendezvous.select_device("nccl")
    assert gpus == []


def test_cpu_selects_no_device(clean_env, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    clean_env.setenv("LOCAL_RANK", "1")
    assert rendezvous.select_device("gloo") is None


# Precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cuda_follows_is_bf16_supported(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    assert resolve_precision("auto", torch.device("cuda", 0)).name == expected


# MFU ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA A10G", None),  # not A10's figure: unknown
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("Tesla V100-SXM2-16GB", 125.0),
        ("Tesla V100-PCIE-32GB", 112.0),
        ("NVIDIA GeForce RTX 4090", 165.0),
        ("NVIDIA Mystery Accelerator", None),
    ],
)
def test_peak_table_lookup(name, tflops):
    assert peak_tflops(name) == tflops


def test_mfu_arithmetic():
    # 6e9 FLOPs per token at 100k tokens/s on 2 GPUs of 1000 TFLOP/s: 6e14 / 2e15.
    assert mfu(6e9, 1e5, 1000e12, 2) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="peak_flops"):
        mfu(6e9, 1e5, 0.0, 1)


def _run(**train) -> trainer.Run:
    config = config_from_dict({"train": train})
    return trainer.Run(config, Path("."), logging.getLogger("test_gpu_setup"), "x", "nccl", 1)


def test_peak_comes_from_the_config_then_the_table(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    gpu = torch.device("cuda", 0)
    assert trainer.peak_flops(_run(), gpu) == 756e12
    assert trainer.peak_flops(_run(peak_tflops=500), gpu) == 500e12
    assert trainer.peak_flops(_run(peak_tflops=500), torch.device("cpu")) is None
    assert caplog.records == []


def test_unknown_gpu_without_the_field_warns_once_and_reports_no_mfu(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Mystery")
    with caplog.at_level(logging.WARNING):
        assert trainer.peak_flops(_run(), torch.device("cuda", 0)) is None
    assert len(caplog.records) == 1
    assert "train.peak_tflops" in caplog.text and "NVIDIA Mystery" in caplog.text


def test_peak_tflops_must_be_positive():
    from launch.errors import UserError

    with pytest.raises(UserError, match="train.peak_tflops"):
        config_from_dict({"train": {"peak_tflops": 0}})


TINY = """
model: {d_model: 32, num_layers: 2, num_heads: 2, d_ff: 64, max_seq_len: 16}
moe: {num_experts: 4, capacity_factor: 1.25, expert_layout: buffer}
data: {seq_len: 16, path: CORPUS}
precision: fp32
train: {steps: 3, micro_batch: 2, grad_accum: 2, log_every: 1, eval_every: 0, eval_batches: 1}
checkpoint: {every: 0}
logging: {progress: false, tensorboard: false, csv: false}
"""
# The trainer in its own process, with a GPU's peak pretended (a CPU has none).
DRIVER = """
import sys
from launch import cli, trainer
trainer.peak_flops = lambda run, device: 1e12
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_metrics_carry_cumulative_tokens_flops_padding_and_mfu(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.replace("CORPUS", str(write_corpus(tmp_path))))
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["train", str(config), "--run-dir", str(run_dir)]
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, *args], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accounting: params" in done.stderr + done.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    per_step = 2 * 2 * 16  # micro batch x accumulation x sequence length, one rank
    assert [r["tokens"] for r in steps] == [per_step, 2 * per_step, 3 * per_step]
    flops_per_token = steps[0]["flops"] / steps[0]["tokens"]
    assert all(r["flops"] == pytest.approx(r["tokens"] * flops_per_token) for r in steps)
    for r in steps:  # one rank, 1 TFLOP/s
        assert r["mfu"] == pytest.approx(flops_per_token * r["tokens_per_s"] / 1e12)
    assert "MFU" in done.stderr + done.stdout
    # Capacity 1.25 over 2 x 16 routed tokens: 4 experts x 10 rows hold 32 assignments, so 8
    # empty rows per 32 tokens ride along; drops skip their share of the experts' FLOPs.
    cfg = config_from_dict(yaml.safe_load(config.read_text()))
    acc = account_config(cfg.model, cfg.moe, cfg.attention, seq_len=16, vocab_size=260,
                         routed_tokens=32)  # fmt: skip
    assert acc.training.total == pytest.approx(flops_per_token)
    # 6 training FLOPs per weight (2 forward, 4 backward) x 0.25 rows x one expert's w1, w2
    padded_per_token = 6 * 0.25 * 2 * 32 * 64
    assert acc.training.padded == pytest.approx(padded_per_token)
    assert any(r["saved_flops_per_token"] > 0 for r in steps)  # these steps drop
    for r in steps:
        assert r["padded_flops"] == pytest.approx(r["tokens"] * padded_per_token)
        assert r["saved_flops_per_token"] == pytest.approx(
            r["dropped_fraction"] * acc.training.experts
        )
