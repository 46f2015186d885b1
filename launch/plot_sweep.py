"""``moeforge plot-sweep RESULTS.csv``: a sweep's three plots, as PNG and SVG.

    moeforge plot-sweep runs/sweeps/switch_experts/results.csv      # -> RESULTS_DIR/plots/
    moeforge plot-sweep results.csv --metric best_val_loss --out figures/

- ``loss_vs_compute``: loss against training FLOPs, one colour per expert count, with the
  fitted L(C) = E + A / C^alpha of each count that has 3+ compute budgets (launch/scaling_fit.py).
- ``loss_vs_experts``: loss against the number of experts at fixed active parameters (runs
  within 5% of each other's active count form one line; dense is drawn at 1), the mean over
  seeds with their range as error bars: the shape of the Switch Transformer's Figure 4.
- ``val_loss_vs_steps``: validation loss against steps from each run's metrics.jsonl, one
  colour per expert count (time to quality: how soon each reaches the dense model's loss).
- ``summary.md`` (also printed): per expert count the metric's mean and half-range over
  seeds, and the first evaluated step at which each run reaches the dense runs' mean final
  validation loss.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from launch.arguments import ArgumentParser
from launch.errors import UserError
from launch.scaling_fit import fit_power_law, power_law, read_results

FORMATS = ("png", "svg")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _experts(row: dict[str, Any]) -> int:
    return int(float(row.get("num_experts") or 0))


def _label(experts: int) -> str:
    return "dense" if experts == 0 else f"{experts} experts"


def _colours(counts: list[int]) -> dict[int, Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("viridis")
    spread = max(len(counts) - 1, 1)
    return {c: ("black" if c == 0 else cmap(0.9 * i / spread)) for i, c in enumerate(counts)}


def _save(fig: Any, out_dir: Path, stem: str) -> list[Path]:
    paths = []
    for fmt in FORMATS:
        path = out_dir / f"{stem}.{fmt}"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        paths.append(path)
    _pyplot().close(fig)
    return paths


def plot_loss_vs_compute(rows: list[dict[str, Any]], metric: str, out_dir: Path) -> list[Path]:
    plt = _pyplot()
    by_count: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_count[_experts(row)].append(row)
    colours = _colours(sorted(by_count))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for count in sorted(by_count):
        group = by_count[count]
        compute = np.array([float(r["total_flops"]) for r in group])
        loss = np.array([float(r[metric]) for r in group])
        ax.scatter(compute, loss, color=colours[count], label=_label(count), s=18)
        if len(np.unique(compute)) >= 3:
            fit = fit_power_law(compute, loss).params
            grid = np.geomspace(compute.min(), compute.max(), 100)
            ax.plot(grid, power_law(grid, fit["E"], fit["A"], fit["alpha"]), color=colours[count],
                    lw=1, label=f"  fit: {fit['E']:.3f} + A/C^{fit['alpha']:.3f}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(metric)
    ax.set_title("loss against compute")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, out_dir, "loss_vs_compute")


def active_groups(rows: list[dict[str, Any]], tolerance: float = 0.05) -> list[list[int]]:
    """Row indices grouped by active parameters: within ``tolerance`` of the group's first."""
    order = sorted(range(len(rows)), key=lambda i: float(rows[i]["params_active"]))
    groups: list[list[int]] = []
    for i in order:
        active = float(rows[i]["params_active"])
        if groups and active <= float(rows[groups[-1][0]]["params_active"]) * (1 + tolerance):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def plot_loss_vs_experts(rows: list[dict[str, Any]], metric: str, out_dir: Path) -> list[Path]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for group in active_groups(rows):
        per_count: dict[int, list[float]] = defaultdict(list)
        for i in group:
            per_count[_experts(rows[i])].append(float(rows[i][metric]))
        counts = sorted(per_count)
        x = [max(c, 1) for c in counts]
        mean = np.array([np.mean(per_count[c]) for c in counts])
        low = mean - np.array([min(per_count[c]) for c in counts])
        high = np.array([max(per_count[c]) for c in counts]) - mean
        active = float(rows[group[0]]["params_active"])
        ax.errorbar(x, mean, yerr=[low, high], marker="o", capsize=3,
                    label=f"{active / 1e6:.2f}M active")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts per MoE layer (dense at 1)")
    ax.set_ylabel(metric)
    ax.set_title("loss against experts at fixed active parameters")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, out_dir, "loss_vs_experts")


def read_eval_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    """(steps, val_loss) of a run's evaluations, from its metrics.jsonl."""
    import json

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return [], []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = sorted((r["step"], r["val_loss"]) for r in records if "val_loss" in r)
    return [s for s, _ in evals], [v for _, v in evals]


def plot_val_vs_steps(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    counts = sorted({_experts(r) for r in rows})
    colours = _colours(counts)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    labelled: set[int] = set()
    for row in rows:
        steps, values = read_eval_curve(Path(row["run_dir"]))
        if not steps:
            continue
        count = _experts(row)
        ax.plot(steps, values, color=colours[count], lw=1, alpha=0.8,
                ls="--" if count == 0 else "-",
                label=None if count in labelled else _label(count))  # fmt: skip
        labelled.add(count)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("validation loss against steps")
    if labelled:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, out_dir, "val_loss_vs_steps")


def steps_to_reach(run_dir: Path, target: float) -> int | None:
    """The first evaluated step at which the run's validation loss is <= ``target``."""
    for step, value in zip(*read_eval_curve(run_dir)):
        if value <= target:
            return step
    return None


def summary_table(rows: list[dict[str, Any]], metric: str) -> str:
    """Per active-parameter group and expert count: the metric's mean and half-range over
    seeds, and the steps each run needs to reach the dense runs' mean final validation loss
    (time to quality), as a markdown table."""
    lines = [
        f"| active params | experts | runs | {metric} mean | ± half-range | steps to dense's "
        "final val loss (per run) |",
        "|---|---|---|---|---|---|",
    ]
    for group in active_groups(rows):
        per_count: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for i in group:
            per_count[_experts(rows[i])].append(rows[i])
        dense = per_count.get(0, [])
        target = np.mean([float(r["final_val_loss"]) for r in dense]) if dense else None
        for count in sorted(per_count):
            values = [float(r[metric]) for r in per_count[count]]
            reach = "-"
            if target is not None:
                found = [steps_to_reach(Path(r["run_dir"]), target) for r in per_count[count]]
                reach = ", ".join("not reached" if s is None else str(s) for s in found)
            active = float(rows[group[0]]["params_active"])
            lines.append(
                f"| {active / 1e6:.2f}M | {_label(count)} | {len(values)} | {np.mean(values):.4f} "
                f"| {(max(values) - min(values)) / 2:.4f} | {reach} |"
            )
    return "\n".join(lines)


def plot_all(rows: list[dict[str, Any]], metric: str, out_dir: Path) -> list[Path]:
    """Every plot of the sweep's rows into ``out_dir``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in rows if r.get("total_flops") and not math.isnan(float(r[metric]))]
    return (
        plot_loss_vs_compute(rows, metric, out_dir)
        + plot_loss_vs_experts(rows, metric, out_dir)
        + plot_val_vs_steps(rows, out_dir)
    )


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="moeforge plot-sweep", description=__doc__.split("\n")[0])
    parser.add_argument(
        "results", type=Path, nargs="+", help="results.csv of one or more sweeps, drawn together"
    )
    parser.add_argument("--out", type=Path, help="directory (default: plots/ beside the first)")
    parser.add_argument("--metric", default="final_val_loss", help="the loss column to plot")
    args = parser.parse_args(argv)
    rows = [row for path in args.results for row in read_results(path, args.metric)]
    if not rows:
        names = " ".join(str(p) for p in args.results)
        raise UserError(f"{names}: no finished run with {args.metric}; nothing to plot")
    out_dir = args.out or args.results[0].parent / "plots"
    paths = plot_all(rows, args.metric, out_dir)
    table = summary_table(rows, args.metric)
    (out_dir / "summary.md").write_text(table + "\n")
    print(table)
    print(
        f"[moeforge] plot-sweep: wrote {', '.join(str(p) for p in paths)}, {out_dir / 'summary.md'}"
    )
    return 0
