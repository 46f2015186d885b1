"""`moeforge bench pp`: the 1F1B bubble formula, the table, and one tiny pp=2 run whose
per-stage timings obey what the schedule forces (m=1: the stages strictly take turns)."""

import contextlib
import io
import json

import pytest

from launch import bench_pp
from launch.errors import UserError

TINY = ["--d-model", "32", "--heads", "2", "--seq", "8", "--micro-batch-size", "2"]
TINY += ["--experts", "2", "--vocab", "16", "--steps", "2", "--warmup", "1"]


def test_bubble_is_the_1f1b_formula():
    assert bench_pp.bubble(1, 8) == 0.0
    assert bench_pp.bubble(2, 1) == 0.5
    assert bench_pp.bubble(2, 4) == pytest.approx(1 / 5)
    assert bench_pp.bubble(4, 8) == pytest.approx(3 / 11)


def test_uneven_bubble_reduces_to_the_formula_for_equal_stages():
    for pp, m in ((2, 1), (2, 4), (4, 8)):
        assert bench_pp.uneven_bubble([0.3] * pp, m) == pytest.approx(bench_pp.bubble(pp, m))
    # Stage 0 twice as slow: a step is (m-1)*2 + 3 = 9 units at m=4, busy 8 and 4 of them.
    assert bench_pp.uneven_bubble([2.0, 1.0], 4) == pytest.approx(1 - (8 + 4) / 2 / 9)


def test_instruction_names():
    from deepspeed.runtime.pipe import schedule

    names = {bench_pp.InstructionTimer.name(k) for k in (schedule.ForwardPass,
             schedule.BackwardPass, schedule.OptimizerStep, schedule.RecvActivation)}  # fmt: skip
    assert names == {"forward", "backward", "optimizer", "recv_activation"}
    assert set(bench_pp.BUSY) <= names


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--pp", "3"], "--pp 3: --layers (4) must be a multiple of pp"),
        (["--pp", "4"], "at least 2 blocks per stage"),
        (["--micro-batches", "0"], "--micro-batches 0"),
        (["--heads", "3"], "--d-model (32) must be divisible by --heads (3)"),
    ],
)
def test_bad_sizes_fail_in_one_line(extra, named):
    with pytest.raises(UserError) as err:
        bench_pp.parse_args(TINY + extra)
    assert named in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One run at pp=2, m 1 and 4: (exit status, printed text, rows by m)."""
    out = tmp_path_factory.mktemp("bench_pp") / "rows.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        argv = ["--pp", "2", "--micro-batches", "1", "4", *TINY, "--json", str(out)]
        status = bench_pp.main(argv)
    rows = {r["m"]: r for r in json.loads(out.read_text())}
    return status, printed.getvalue(), rows


@pytest.mark.slow
def test_table_rows_and_columns(bench):
    status, printed, rows = bench
    assert status == 0
    assert "| pp | m | step ms (median) | idle per stage |" in printed
    assert sorted(rows) == [1, 4]
    for m, row in rows.items():
        assert f"| 2 | {m} |" in printed
        assert row["bubble"] == 1 / (m + 1)  # the analytic column, exactly
        assert row["blocks_per_stage"] == [2, 2]
        assert len(row["idle"]) == 2 and all(0.0 <= x < 1.0 for x in row["idle"])
        assert row["ratio"] == pytest.approx(row["mean_idle"] / row["bubble"])
        assert row["step_ms"] > 0


@pytest.mark.slow
def test_stages_take_turns_at_one_micro_batch(bench):
    """At m=1 stage 1's forward needs stage 0's, and stage 0's backward needs stage 1's:
    no compute overlaps, so the stages' forward + backward times add up to at most a step
    of rank 0, whose wall time spans the whole chain; stage 0 is idle at least while stage 1
    computes, and stage 1 (which may leave the barrier a little after stage 0 started) at
    least during stage 0's backward, which its tied-gradient reduction waits for."""
    _, _, rows = bench
    row = rows[1]
    first, last = row["instruction_ms_per_step"]
    walls = row["wall_ms_per_step"]
    compute = [i["forward"] + i["backward"] for i in (first, last)]
    assert sum(compute) <= 1.02 * walls[0], (compute, walls)
    assert row["idle"][0] >= 0.98 * compute[1] / walls[0] - 0.01, (row["idle"], compute, walls)
    assert row["idle"][1] >= 0.98 * first["backward"] / walls[1] - 0.01, (row["idle"], walls)
    # Every instruction was timed: forward and backward on both stages, sends and receives
    # between them, the optimizer step on each.
    assert {"forward", "backward", "optimizer", "send_activation", "recv_grad"} <= set(first)
    assert {"forward", "backward", "optimizer", "recv_activation", "send_grad"} <= set(last)
