"""moeforge fit and plot-sweep: each law recovers known parameters from synthetic noisy data
within its bootstrap interval; the saturating transform has the published limits; the
command writes its JSON and the plots are written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from launch import plot_sweep, scaling_fit
from launch.scaling_fit import (
    bootstrap,
    fit_power_law,
    fit_routed_law,
    power_law,
    routed_log_loss,
    saturated_experts,
)

SAMPLES = 60  # bootstrap resamples: enough for 95% intervals here, seconds on a shared CPU


def test_saturated_experts_limits():
    e_start, e_max = 1.85, 300.0
    # A dense model (E = 1) maps to E_start; Ê grows one for one at first; saturates at E_max.
    assert saturated_experts(np.array([1.0]), e_start, e_max)[0] == pytest.approx(e_start)
    small = saturated_experts(np.array([2.0, 3.0]), e_start, 1e12)
    assert small == pytest.approx([e_start + 1, e_start + 2], rel=1e-9)
    assert saturated_experts(np.array([1e12]), e_start, e_max)[0] == pytest.approx(e_max, rel=1e-6)
    values = saturated_experts(np.array([1, 2, 8, 64, 512, 4096]), e_start, e_max)
    assert np.all(np.diff(values) > 0) and values[-1] < e_max


def test_power_law_recovers_known_parameters_within_its_interval():
    rng = np.random.default_rng(7)
    true = {"E": 1.6, "A": 2.0e3, "alpha": 0.28}
    compute = np.repeat(np.geomspace(1e12, 1e16, 8), 2)  # 8 budgets x 2 seeds
    loss = power_law(compute, *true.values()) * np.exp(rng.normal(0.0, 0.01, compute.size))
    best = fit_power_law(compute, loss)
    intervals = bootstrap(
        lambda i: fit_power_law(compute[i], loss[i], warm=best), np.repeat(np.arange(8), 2),
        SAMPLES,
    )  # fmt: skip
    for name, value in true.items():
        low, high = intervals[name]
        assert low <= value <= high, (name, value, low, high, best.params[name])
        assert low <= best.params[name] <= high
    # Informative intervals, not everything: the rate known to +-0.075, E to +-5%.
    assert intervals["alpha"][1] - intervals["alpha"][0] < 0.15
    assert intervals["E"][1] - intervals["E"][0] < 0.1 * true["E"]
    # A fit of a pure power law without noise is exact.
    exact = fit_power_law(compute, power_law(compute, *true.values())).params
    assert exact["alpha"] == pytest.approx(true["alpha"], rel=1e-3)
    assert exact["E"] == pytest.approx(true["E"], rel=1e-3)


def test_routed_law_recovers_known_parameters_within_its_interval():
    rng = np.random.default_rng(3)
    # Clark et al. 2022 report coefficients of this order for S-BASE.
    true = {"a": -0.08, "b": -0.1, "c": 0.008, "d": 1.1, "E_start": 1.85, "E_max": 300.0}
    sizes, counts = np.geomspace(1e6, 1e9, 5), np.array([1, 2, 8, 32, 128, 512])
    n = np.repeat(sizes, counts.size)
    experts = np.tile(counts, sizes.size).astype(float)
    log_loss = routed_log_loss(list(true.values()), n, experts)
    loss = np.exp(log_loss + rng.normal(0.0, 0.005, n.size))
    best = fit_routed_law(n, experts, loss)
    # From the whole grid each time, as moeforge fit does (warm starts give too narrow
    # intervals for E_start and E_max).
    intervals = bootstrap(
        lambda i: fit_routed_law(n[i], experts[i], loss[i]), np.arange(n.size), 40
    )
    for name, value in true.items():
        low, high = intervals[name]
        assert low <= value <= high, (name, value, low, high, best.params[name])
    assert intervals["a"][1] - intervals["a"][0] < 0.02
    assert intervals["b"][1] - intervals["b"][0] < 0.05


def _synthetic_results(tmp_path: Path) -> Path:
    """A results.csv with run dirs: dense and 4/16 experts at 3 sizes, 2 seeds, with curves."""
    rng = np.random.default_rng(0)
    rows = []
    for size, active in enumerate((2e5, 8e5, 3.2e6)):
        for experts in (0, 4, 16):
            for seed in (0, 1):
                compute = 6 * active * 2e7
                loss = float(
                    np.exp(routed_log_loss([-0.08, -0.1, 0.008, 1.8, 1.85, 300.0], active,
                                           max(experts, 1)) + rng.normal(0, 0.003))
                )  # fmt: skip
                run_dir = tmp_path / f"s{size}_e{experts}_seed{seed}"
                run_dir.mkdir()
                curve = [
                    {"step": s, "val_loss": loss * (1 + 2.0 / s), "val_bpb": 1.0}
                    for s in (10, 20, 40, 80)
                ]
                (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
                rows.append({
                    "run": run_dir.name, "run_dir": str(run_dir), "status": "done", "seed": seed,
                    "num_experts": experts, "params_total": active * max(experts, 1),
                    "params_active": active, "flops_per_token": 6 * active, "tokens": 2e7,
                    "total_flops": compute, "final_val_loss": loss, "moe.num_experts": experts,
                    "model.d_model": 64 * (size + 1),
                })  # fmt: skip
    path = tmp_path / "results.csv"
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_fit_command_writes_json_with_intervals(tmp_path, capsys):
    results = _synthetic_results(tmp_path)
    assert scaling_fit.main([str(results), "--bootstrap", "20"]) == 0
    fit = json.loads((tmp_path / "fit.json").read_text())
    for label in ("all", "dense", "experts=4", "experts=16"):
        params = fit["power_law"][label]["params"]
        assert set(params) == {"E", "A", "alpha"}
        assert all(p["low"] <= p["high"] for p in params.values())
    routed = fit["routed_law"]["params"]
    assert routed["b"]["value"] < 0  # more experts, lower loss: as generated
    assert "95% interval" in capsys.readouterr().out


def test_plot_sweep_writes_every_plot(tmp_path):
    results = _synthetic_results(tmp_path)
    assert plot_sweep.main([str(results), "--out", str(tmp_path / "plots")]) == 0
    for stem in ("loss_vs_compute", "loss_vs_experts", "val_loss_vs_steps"):
        for fmt in ("png", "svg"):
            path = tmp_path / "plots" / f"{stem}.{fmt}"
            assert path.is_file() and path.stat().st_size > 1000, path
    # One line per active size at fixed active parameters.
    rows = scaling_fit.read_results(results, "final_val_loss")
    assert [len(g) for g in plot_sweep.active_groups(rows)] == [6, 6, 6]


def test_fit_without_resamples_has_no_intervals(tmp_path):
    results = _synthetic_results(tmp_path)
    assert (
        scaling_fit.main([str(results), "--bootstrap", "0", "--out", str(tmp_path / "f.json")]) == 0
    )
    fit = json.loads((tmp_path / "f.json").read_text())  # strict JSON: no NaN
    assert fit["power_law"]["all"]["params"]["alpha"]["low"] is None


def test_summary_counts_steps_to_reach_the_dense_loss(tmp_path):
    results = _synthetic_results(tmp_path)
    rows = scaling_fit.read_results(results, "final_val_loss")
    table = plot_sweep.summary_table(rows, "final_val_loss").splitlines()
    assert len(table) == 2 + 9  # header + 3 sizes x (dense, 4, 16)
    # By hand for the smallest size: curves are loss x (1 + 2 / step) at steps 10..80.
    small = [r for r in rows if float(r["params_active"]) == 2e5]
    dense = np.mean([float(r["final_val_loss"]) for r in small if r["num_experts"] == "0"])
    for row in small:
        loss = float(row["final_val_loss"])
        expected = next((s for s in (10, 20, 40, 80) if loss * (1 + 2.0 / s) <= dense), None)
        assert plot_sweep.steps_to_reach(Path(row["run_dir"]), dense) == expected
    sixteen = next(line for line in table if "| 0.20M | 16 experts |" in line)
    values = [float(r["final_val_loss"]) for r in small if r["num_experts"] == "16"]
    assert (
        f"{np.mean(values):.4f}" in sixteen and f"{(max(values) - min(values)) / 2:.4f}" in sixteen
    )


def _rows(compute, experts, active, loss):
    return [
        {"run": f"r{i}", "seed": 0, "num_experts": e, "params_active": n, "total_flops": c,
         "final_val_loss": value, "d": i}
        for i, (c, e, n, value) in enumerate(zip(compute, experts, active, loss))
    ]  # fmt: skip


def test_fit_says_when_the_data_do_not_identify_a_parameter():
    rng = np.random.default_rng(5)
    compute = np.geomspace(1e12, 1e15, 6)
    noise = np.exp(rng.normal(0.0, 0.003, compute.size))
    # No floor in the data: E drifts toward 0 and the table says it is not identified.
    pure = _rows(compute, [0] * 6, [1e6] * 6, power_law(compute, 0.0, 400.0, 0.2) * noise)
    fit = scaling_fit.fit_table(pure, "final_val_loss", samples=10)
    assert fit["power_law"]["dense"]["params"]["E"]["value"] < 1e-3
    assert "pure power law" in fit["power_law"]["dense"]["note"]
    assert "note: E -> 0" in scaling_fit.format_fits(fit)
    # With a floor well inside the curve's range, no note.
    floor = _rows(compute, [0] * 6, [1e6] * 6, power_law(compute, 1.6, 400.0, 0.2) * noise)
    fit = scaling_fit.fit_table(floor, "final_val_loss", samples=10)
    assert "note" not in fit["power_law"]["dense"]

    # The routed law: a loss that ignores the expert count has no resolved effect ...
    sizes, counts = np.geomspace(1e5, 1e7, 4), np.array([0, 2, 8, 32])
    n, experts = np.repeat(sizes, counts.size), np.tile(counts, sizes.size)
    flat = np.exp(-0.08 * np.log(n) + 1.5 + rng.normal(0.0, 0.01, n.size))
    fit = scaling_fit.fit_table(_rows(6 * n * 1e7, experts, n, flat), "final_val_loss", 20)
    ratio = fit["routed_law"]["params"]["ratio"]
    assert ratio["low"] <= 1.0 <= ratio["high"]
    assert "do not resolve an effect of the expert count" in fit["routed_law"]["note"]
    # ... and one generated with a clear expert effect has it resolved, at the value the
    # law gives at the sizes' geometric mean (32 experts against dense).
    params = [-0.08, -0.2, 0.008, 1.5, 1.85, 300.0]  # slope -0.09 at N = 1e6
    routed = np.exp(routed_log_loss(params, n, np.maximum(experts, 1)))
    routed = routed * np.exp(rng.normal(0.0, 0.002, n.size))
    fit = scaling_fit.fit_table(_rows(6 * n * 1e7, experts, n, routed), "final_val_loss", 20)
    assert "note" not in fit["routed_law"]
    center = np.exp(np.mean(np.log(sizes)))
    true = np.exp(
        routed_log_loss(params, np.array([center]), np.array([32.0]))
        - routed_log_loss(params, np.array([center]), np.array([1.0]))
    )[0]
    ratio = fit["routed_law"]["params"]["ratio"]
    assert ratio["low"] <= true <= ratio["high"] < 1.0, (true, ratio)
    assert "at N = 1e+06 active parameters" in fit["routed_law"]["at"]
