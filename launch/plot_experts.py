"""``moeforge plot-experts RUN``: per-layer expert load over training steps, from metrics.jsonl.

    moeforge plot-experts runs/tiny-20260101-120000              # -> RUN/expert_load.png
    moeforge plot-experts RUN --split eval --out load.png

Reads the ``{split}/moe{l}/load_e{j}`` fractions that ``moe.telemetry.RoutingTelemetry``
adds to each logged record and draws one panel per MoE layer: the share of kept tokens of
every expert against the step (stacked, so each panel fills [0, 1]; a balanced layer shows
even bands), with the layer's imbalance (max / mean) on a second axis.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from launch.arguments import ArgumentParser
from launch.errors import UserError

LOAD_KEY = re.compile(r"^(?P<split>train|eval)/moe(?P<layer>\d+)/load_e(?P<expert>\d+)$")


def read_loads(
    metrics_file: Path, split: str
) -> tuple[list[int], dict[int, dict[int, list[float]]], dict[int, list[float]]]:
    """Steps, load[layer][expert] per step and imbalance[layer] per step, for ``split``."""
    steps: list[int] = []
    loads: dict[int, dict[int, list[float]]] = {}
    imbalance: dict[int, list[float]] = {}
    for line in metrics_file.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        found = [(LOAD_KEY.match(k), v) for k, v in record.items()]
        found = [(m, v) for m, v in found if m and m["split"] == split]
        if not found:
            continue
        index = len(steps)
        steps.append(int(record["step"]))
        for match, value in found:
            layer, expert = int(match["layer"]), int(match["expert"])
            series = loads.setdefault(layer, {}).setdefault(expert, [])
            series.extend([float("nan")] * (index - len(series)))
            series.append(float(value))
            key = f"{split}/moe{layer}/imbalance"
            values = imbalance.setdefault(layer, [])
            if len(values) == index and key in record:
                values.append(float(record[key]))
    return steps, loads, imbalance


def main(argv: list[str]) -> int:
    """Draw the plot; returns the exit status."""
    parser = ArgumentParser(
        prog="moeforge plot-experts", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument("run", type=Path, help="run directory (holds metrics.jsonl)")
    parser.add_argument("--split", choices=("train", "eval"), default="train")
    parser.add_argument("--out", type=Path, help="image path (default RUN/expert_load.png)")
    args = parser.parse_args(argv)
    metrics_file = args.run / "metrics.jsonl"
    if not metrics_file.is_file():
        raise UserError(f"no metrics.jsonl in {args.run}; pass a run directory of moeforge train")
    steps, loads, imbalance = read_loads(metrics_file, args.split)
    if not loads:
        raise UserError(
            f"{metrics_file} has no {args.split}/moe<l>/load_e<j> values; the run logged no "
            "routing telemetry"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(loads)
    figure, axes = plt.subplots(len(layers), 1, figsize=(8, 2.6 * len(layers)), squeeze=False)
    for axis, layer in zip(axes[:, 0], layers):
        experts = sorted(loads[layer])
        series = [loads[layer][e] + [float("nan")] * (len(steps) - len(loads[layer][e])) for e in experts]  # fmt: skip
        axis.stackplot(steps, series, labels=[f"expert {e}" for e in experts])
        axis.set_ylim(0, 1)
        axis.set_ylabel(f"layer {layer} load")
        if len(imbalance.get(layer, [])) == len(steps):
            twin = axis.twinx()
            twin.plot(steps, imbalance[layer], color="black", linewidth=1.0, label="max/mean")
            twin.set_ylabel("imbalance")
    axes[0, 0].legend(loc="upper left", fontsize="x-small", ncol=min(len(loads[layers[0]]), 8))
    axes[-1, 0].set_xlabel("step")
    figure.suptitle(f"expert load ({args.split}) - {args.run.name}")
    figure.tight_layout()
    out = args.out or args.run / "expert_load.png"
    figure.savefig(out, dpi=120)
    plt.close(figure)
    print(f"wrote {out} ({len(layers)} layers, {len(steps)} steps)")
    return 0
