"""`moeforge bench tp`: counted TP traffic equals the Megatron figure, memory shrinks per rank."""

import json

import pytest

from launch import bench_tp
from launch.errors import UserError

# Blocks dominate the parameters (vocab 32, d=64): 2 blocks of 4 D^2 + 2 D * 4D weights.
TINY = ["--d-model", "64", "--layers", "2", "--heads", "2", "--seq", "8", "--batch", "2"]
TINY += ["--experts", "4", "--vocab", "32"]


def test_analytic_figure_is_four_activations_per_block():
    args = bench_tp.parse_args([*TINY, "--tp", "1"])
    activation = 2 * 8 * 64 * 4  # B * n * D * fp32
    assert bench_tp.analytic("dense", 1, args)["bytes"] == 0
    dense = bench_tp.analytic("dense", 2, args)
    assert (dense["fwd_all_reduce"], dense["bwd_all_reduce"], dense["bytes"]) == (
        2,
        2,
        4 * activation,
    )
    moe = bench_tp.analytic("moe", 4, args)
    assert (moe["fwd_all_reduce"], moe["fwd_all_gather"], moe["bwd_all_gather"]) == (1, 1, 1)
    assert moe["bytes"] == 4 * activation


@pytest.mark.parametrize(
    ("extra", "named"),
    [(["--tp", "3"], "--heads (2) must be divisible by --tp 3"), (["--heads", "3"], "--d-model")],
)
def test_sizes_tp_cannot_split_fail_in_one_line(extra, named):
    with pytest.raises(UserError, match=named.replace("(", r"\(").replace(")", r"\)")) as err:
        bench_tp.parse_args(TINY + extra)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_bench_tp_counts_megatron_traffic_and_halves_block_parameters(tmp_path, capsys):
    out = tmp_path / "rows.json"
    status = bench_tp.main(["--tp", "1", "2", *TINY, "--json", str(out)])
    printed = capsys.readouterr().out
    rows = {(r["blocks"], r["tp"]): r for r in json.loads(out.read_text())}
    activation = 2 * 8 * 64 * 4

    dense1, dense2 = rows["dense", 1], rows["dense", 2]
    assert dense1["measured_bytes"] == dense1["other_bytes"] == 0  # tp=1 communicates nothing
    counts = [dense2[k] for k in ("fwd_all_reduce", "fwd_all_gather", "bwd_all_reduce")]
    assert counts + [dense2["bwd_all_gather"]] == [2, 0, 2, 0]
    assert dense2["measured_bytes"] == dense2["analytic_bytes"] == 4 * activation
    assert dense2["other_bytes"] == 0
    # Each block's forward does its own two all-reduces; nothing outside the blocks.
    assert dense2["forward_bytes_by_block"] == [2 * activation, 2 * activation]
    assert dense2["forward_bytes_outside_blocks"] == 0
    share = dense2["non_expert_param_bytes"] / dense1["non_expert_param_bytes"]
    assert share <= bench_tp.NON_EXPERT_LIMIT, share
    assert dense2["activation_bytes"] < dense1["activation_bytes"]
    assert dense2["loss"] == pytest.approx(dense1["loss"], abs=1e-5)  # the same model, split

    assert rows["moe", 1]["expert_param_bytes"] > 0
    if ("moe", 2) in rows:  # once moe.tensor_parallel splits MoE blocks
        moe1, moe2 = rows["moe", 1], rows["moe", 2]
        assert moe2["measured_bytes"] == moe2["analytic_bytes"] == 4 * activation
        assert (moe2["fwd_all_gather"], moe2["bwd_all_gather"]) == (1, 1)
        assert moe2["non_expert_param_bytes"] / moe1["non_expert_param_bytes"] <= 0.55
        assert moe2["expert_param_bytes"] == moe1["expert_param_bytes"]  # expert TP = 1
        assert moe2["loss"] == pytest.approx(moe1["loss"], abs=1e-5)

    assert status == 0
    for kind, tp in rows:
        assert f"| {kind} | {tp} |" in printed
    assert "| blocks | tp | fwd AR | fwd AG | bwd AR | bwd AG |" in printed
    assert printed.strip().splitlines()[-1].startswith("verdict: traffic == analytic")
