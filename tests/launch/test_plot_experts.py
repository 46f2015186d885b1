"""``moeforge plot-experts`` on a synthetic run's metrics.jsonl."""

import json

import pytest

from launch.plot_experts import main as plot_main
from launch.plot_experts import read_loads
from moe.telemetry import RoutingTelemetry
from tests.moe.test_telemetry import stats


def test_plot_experts_reads_loads_and_writes_a_png(tmp_path, capsys):
    records = []
    for step in (10, 20, 30):
        record = {"step": step, "loss": 1.0}
        telemetry = RoutingTelemetry(2, 2)
        telemetry.update([stats([step, 10], 0.0, 0.5, 40), stats([5, 5], 0.0, 0.6, 5)])
        record.update(telemetry.summary())
        records.append(record)
    records.insert(1, {"step": 15, "val_loss": 2.0})  # records without telemetry are skipped
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    steps, loads, imbalance = read_loads(tmp_path / "metrics.jsonl", "train")
    assert steps == [10, 20, 30] and loads[0][0] == pytest.approx([0.5, 20 / 30, 0.75])
    assert imbalance[1] == pytest.approx([1.0, 1.0, 1.0])
    assert plot_main([str(tmp_path)]) == 0
    assert (tmp_path / "expert_load.png").stat().st_size > 1000
    assert "2 layers, 3 steps" in capsys.readouterr().out
