"""`moeforge bench tp`: counted TP traffic equals the Megatron figure, memory shrinks per rank."""

import contextlib
import io
import json

import pytest
import torch

from launch import bench_tp
from launch.errors import UserError

# Blocks dominate the parameters (vocab 16, d=64): 2 blocks of 4 D^2 + 2 D * 4D weights.
TINY = ["--d-model", "64", "--layers", "2", "--heads", "2", "--seq", "8", "--batch", "2"]
TINY += ["--experts", "4", "--vocab", "16"]
ACTIVATION = 2 * 8 * 64 * 4  # one activation B * n * D in fp32 bytes
KEYS = ("fwd_all_reduce", "fwd_all_gather", "bwd_all_reduce", "bwd_all_gather")


def test_analytic_figure_is_four_activations_per_block():
    args = bench_tp.parse_args([*TINY, "--tp", "1"])
    assert bench_tp.analytic("dense", 1, args)["bytes"] == 0
    dense = bench_tp.analytic("dense", 2, args)
    assert [dense[k] for k in KEYS] == [2, 0, 2, 0]
    assert dense["bytes"] == 4 * ACTIVATION
    moe = bench_tp.analytic("moe", 4, args)
    assert [moe[k] for k in KEYS] == [1, 1, 1, 1]
    assert moe["bytes"] == 4 * ACTIVATION


def test_payload_is_what_every_rank_ends_up_holding():
    piece = torch.zeros(3, 4)  # 48 bytes
    assert bench_tp.payload_bytes("all_reduce", (piece,), {}) == 48
    assert bench_tp.payload_bytes("all_reduce", (), {"tensor": piece}) == 48
    gathered = [torch.zeros(3, 4), torch.zeros(3, 4)]
    assert bench_tp.payload_bytes("all_gather", (gathered, piece), {}) == 96
    whole = torch.zeros(6, 4, dtype=torch.float64)
    assert bench_tp.payload_bytes("all_gather_into_tensor", (whole, piece), {}) == 192
    assert bench_tp.payload_bytes("all_to_all_single", (whole, piece), {}) == 48  # sent rows


@pytest.mark.parametrize(
    ("extra", "named"),
    [(["--tp", "3"], "--heads (2) must be divisible by --tp 3"), (["--heads", "3"], "--d-model")],
)
def test_sizes_tp_cannot_split_fail_in_one_line(extra, named):
    with pytest.raises(UserError, match=named.replace("(", r"\(").replace(")", r"\)")) as err:
        bench_tp.parse_args(TINY + extra)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One run of the bench at tp 1 and 2: (exit status, printed text, rows by (kind, tp))."""
    out = tmp_path_factory.mktemp("bench_tp") / "rows.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = bench_tp.main(["--tp", "1", "2", *TINY, "--json", str(out)])
    rows = {(r["blocks"], r["tp"]): r for r in json.loads(out.read_text())}
    return status, printed.getvalue(), rows


@pytest.mark.slow
def test_dense_blocks_communicate_the_megatron_figure(bench):
    _, _, rows = bench
    dense1, dense2 = rows["dense", 1], rows["dense", 2]
    assert dense1["measured_bytes"] == dense1["other_bytes"] == 0  # tp=1 communicates nothing
    # Megatron's backward has one all-reduce at the fused q/k/v input and one at fc1's input;
    # more means a column projection's parts each enter the TP region on their own.
    assert [dense2[k] for k in KEYS] == [2, 0, 2, 0]
    assert dense2["measured_bytes"] == dense2["analytic_bytes"] == 4 * ACTIVATION
    assert dense2["other_bytes"] == 0
    # Each block's forward does its own two all-reduces; nothing outside the blocks.
    assert dense2["forward_bytes_by_block"] == [2 * ACTIVATION, 2 * ACTIVATION]
    assert dense2["forward_bytes_outside_blocks"] == 0


@pytest.mark.slow
def test_moe_blocks_all_reduce_attention_and_all_gather_rows(bench):
    _, _, rows = bench
    moe2 = rows["moe", 2]
    assert [moe2[k] for k in KEYS] == [1, 1, 1, 1]
    assert moe2["measured_bytes"] == moe2["analytic_bytes"] == 4 * ACTIVATION
    assert 0 < moe2["other_bytes"] < ACTIVATION  # routing statistics, the router's gradient
    assert moe2["forward_bytes_outside_blocks"] == 0


@pytest.mark.slow
def test_tp2_halves_block_parameters_and_computes_the_same_loss(bench):
    _, _, rows = bench
    for kind in bench_tp.KINDS:
        one, two = rows[kind, 1], rows[kind, 2]
        share = two["non_expert_param_bytes"] / one["non_expert_param_bytes"]
        assert share <= bench_tp.NON_EXPERT_LIMIT, (kind, share)
        assert two["expert_param_bytes"] == one["expert_param_bytes"]  # expert TP = 1
        assert two["activation_bytes"] < one["activation_bytes"], kind
        assert two["loss"] == pytest.approx(one["loss"], abs=1e-5), kind  # dropless MoE
    assert rows["moe", 1]["expert_param_bytes"] > 0 == rows["dense", 1]["expert_param_bytes"]


@pytest.mark.slow
def test_table_has_every_row_and_the_verdict(bench):
    status, printed, rows = bench
    assert "| blocks | tp | fwd AR | fwd AG | bwd AR | bwd AG |" in printed
    for kind, tp in rows:
        assert f"| {kind} | {tp} |" in printed
    assert len(rows) == 4
    last = printed.strip().splitlines()[-1]
    assert last.startswith("verdict") and "non-expert params at tp=2" in last
    assert status == (0 if last.startswith("verdict: ") else 1)
