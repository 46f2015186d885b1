"""The MoE benchmark's memory probe and table, its device plumbing (no timing asserts)."""

import argparse

import pytest
import torch

from launch.bench_moe import (
    _OursCall,
    bench_inputs,
    contenders,
    format_table,
    main,
    saved_activation_bytes,
)
from moe.layer import MoELayer


def test_moe_activation_memory_grows_linearly_in_tokens():
    layer = _OursCall(MoELayer(32, 64, 16, top_k=2, capacity_factor=1.25))
    small = saved_activation_bytes(layer, torch.randn(512, 32))
    large = saved_activation_bytes(layer, torch.randn(2048, 32))
    assert 3.8 < large / small < 4.2, (small, large)  # a [T, E, C] one-hot would give ~16x


def test_format_table_ratios():
    table = format_table(
        [(8, "fp32", {"dense FFN": 100.0, "moeforge": 105.0, "deepspeed MoE": 120.0})]
    )
    assert "| 8 | fp32 | 100.0 | 105.0 | 120.0 | 1.05x | 1.20x | 0.88x |" in table


def test_weight_traffic_counts_every_expert_weight():
    from launch.bench_moe import weight_traffic_ms

    mib, ms = weight_traffic_ms(MoELayer(32, 64, 4, activation="swiglu"), repeats=1)
    assert mib == 3 * 4 * 32 * 64 * 4 / 2**20  # w1, w2, w3 of 4 experts, fp32
    assert ms > 0


def test_experts_alone_runs_the_layers_experts_at_the_routed_sizes():
    from launch.bench_moe import _ExpertsAlone

    torch.manual_seed(0)
    x = torch.randn(64, 16)
    layer = MoELayer(16, 32, 4, capacity_factor=1.0)
    routed = layer(x)
    alone = _ExpertsAlone(layer, x)
    assert alone.grouped and alone.shape == (int(routed.tokens_per_expert.sum()), 16)
    rows, grad = alone.inputs(torch.float32)
    assert alone(rows).shape == rows.shape and grad.shape == rows.shape
    buffered = MoELayer(16, 32, 4, capacity_factor=1.0).to(torch.bfloat16)  # auto -> buffer
    alone = _ExpertsAlone(buffered, x.bfloat16())
    fullest = int(buffered(x.bfloat16()).tokens_per_expert.max())
    assert not alone.grouped and alone.shape == (4, fullest, 16)
    assert alone(alone.inputs(torch.bfloat16)[0]).dtype == torch.bfloat16


def test_format_table_prints_the_experts_alone_ratio():
    times = {"dense FFN": 100.0, "moeforge": 130.0, "deepspeed MoE": 150.0, "experts alone": 110.0}
    assert "| 1.30x | 1.50x | 0.87x | 1.10x |" in format_table([(8, "bf16", times)])


def _tiny_args(device: str) -> argparse.Namespace:
    return argparse.Namespace(
        tokens=32,
        d_model=16,
        d_ff=32,
        capacity_factor=1.25,
        expert_layout="auto",
        no_deepspeed=True,
        device=device,
    )


def test_contenders_and_inputs_are_made_on_the_chosen_device():
    # meta stands in for a GPU: anything made on the host by mistake would show as cpu.
    args = _tiny_args("meta")
    mods = contenders(4, torch.bfloat16, args)
    assert set(mods) == {"dense FFN", "moeforge"}
    for name, module in mods.items():
        tensors = [*module.parameters(), *module.buffers()]
        assert {t.device.type for t in tensors} == {"meta"}, name
        assert torch.bfloat16 in {p.dtype for p in module.parameters()}, name  # router: fp32
    x, grad = bench_inputs(args, torch.bfloat16)
    assert x.device.type == grad.device.type == "meta" and x.shape == (32, 16)
    assert x.dtype == torch.bfloat16


def test_experts_alone_inputs_follow_the_input_device():
    from launch.bench_moe import _ExpertsAlone

    alone = _ExpertsAlone(MoELayer(16, 32, 4), torch.randn(64, 16))
    assert alone.inputs(torch.float32)[0].device.type == "cpu"
    alone.device = torch.device("meta")  # as if routed on a GPU
    rows, grad = alone.inputs(torch.float32)
    assert rows.device.type == grad.device.type == "meta" and rows.shape == alone.shape


def test_main_on_cpu_prints_both_tables_and_names_the_device(tmp_path, capsys):
    path = tmp_path / "moe.md"
    argv = ["--tokens", "64", "--d-model", "16", "--d-ff", "32", "--experts", "4"]
    argv += ["--dtypes", "fp32", "--repeats", "1", "--no-deepspeed", "--device", "cpu"]
    assert main([*argv, "--markdown", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("MoE layer fwd+bwd, 64 tokens") and ", CPU, " in out.splitlines()[0]
    assert "| 4 | fp32 |" in out and "| 16384 |" in out
    assert "CUDA peak" not in out  # the allocator column is CUDA's only
    assert "| 4 | fp32 |" in path.read_text()


def test_device_cuda_without_cuda_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--device cuda needs a CUDA GPU and torch.cuda.is_available() is False" in err
    assert "use --device cpu" in err


@pytest.mark.gpu
def test_main_runs_on_the_test_device(capsys):
    from tests.gpu.device import DEVICE

    argv = ["--tokens", "256", "--d-model", "32", "--d-ff", "64", "--experts", "4", "8"]
    argv += ["--dtypes", "fp32", "bf16", "--repeats", "2", "--no-deepspeed"]
    assert main([*argv, "--device", DEVICE.type]) == 0
    out = capsys.readouterr().out
    assert "| 8 | bf16" in out and "| 16384 |" in out
    if DEVICE.type == "cuda":
        assert "CUDA peak fwd+bwd (MiB)" in out and torch.cuda.get_device_name() in out
