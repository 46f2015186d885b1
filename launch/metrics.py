"""What a run reports: metrics.jsonl and DeepSpeed's monitors, and the words it prints.

    metrics = MetricsWriter(run_dir, engine, resume_step=None, enabled=rank == 0)
    metrics.write({"step": 10, "loss": 2.3})
    print_summary(result, counts, mode="causal_lm")

Each mode speaks of what it trains: text runs report loss per token and bits per byte,
classification runs loss per example and accuracy; images are counted as images of patches.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launch.config import RunConfig
    from launch.trainer import TrainResult


class MetricsWriter:
    """Appends JSON records to RUN_DIR/metrics.jsonl (rank 0) and to DeepSpeed's monitors.

    On a resume, metrics.jsonl and the CSV monitor's files are cut back to the checkpoint's
    step (the run that stopped may have logged past it), and each CSV file keeps its one
    header; a new run starts them empty.
    """

    def __init__(self, run_dir: Path, engine: Any, resume_step: int | None, enabled: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.engine, self.enabled = engine, enabled
        if enabled and resume_step is not None and self.path.is_file():
            # Drop records written after the checkpoint by the run that stopped.
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        elif enabled:
            self.path.write_text("")
        if enabled:
            cut_csv_monitor(engine, resume_step)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as out:
            out.write(json.dumps(record) + "\n")
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and getattr(monitor, "enabled", False):
            step = record["step"]
            events = [(f"moeforge/{k}", float(v), step) for k, v in record.items() if k != "step"]
            monitor.write_events(events)


def cut_csv_monitor(engine: Any, resume_step: int | None) -> None:
    """Cut DeepSpeed's CSV monitor files back to ``resume_step`` (None: delete them).

    The monitor writes a header into a file the first time *this process* writes to it, so a
    resumed run would put a second header mid-file: files it keeps are marked as started.
    moeforge's series count steps; DeepSpeed's own (``Train_Samples_*``) count samples, which
    the loaded checkpoint restored as ``global_samples``.
    """
    monitor = getattr(getattr(engine, "monitor", None), "csv_monitor", None)
    log_dir = getattr(monitor, "log_dir", None)
    if monitor is None or not log_dir:
        return
    for path in sorted(Path(log_dir).glob("*.csv")):
        if resume_step is None:
            path.unlink()
            continue
        own = path.stem.startswith("Train_Samples")
        limit = getattr(engine, "global_samples", None) if own else resume_step
        if limit is None:
            continue
        with path.open(newline="") as stream:
            rows = list(csv.reader(stream))
        kept = rows[:1] + [r for r in rows[1:] if r and r[0] != "step" and float(r[0]) <= limit]
        with path.open("w", newline="") as stream:
            csv.writer(stream).writerows(kept)
        if path.stem not in monitor.filenames:
            monitor.filenames.append(path.stem)


def example_words(config: RunConfig) -> str:
    """What one training example is, in the mode's own words."""
    image = config.model.image
    if config.model.input == "patches" and image is not None:
        return f"images ({image.num_patches()} patches each)"
    return f"sequences of {config.data.seq_len} tokens"


def eval_words(mode: str, loss: float, bpb: float, accuracy: float | None) -> str:
    """An evaluation in words: loss and bits per byte for text, loss and accuracy to classify."""
    if mode == "classify":
        return f"val_loss {loss:.4f}" + (
            "" if accuracy is None else f", val_accuracy {accuracy:.2%}"
        )
    return f"val_loss {loss:.4f}, val_bpb {bpb:.4f}"


def print_summary(result: TrainResult, counts: dict[str, int], mode: str = "causal_lm") -> None:
    """A rich table of the run's final numbers (rank 0)."""
    from rich.console import Console
    from rich.table import Table

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    table = Table(title="moeforge train: summary", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("steps", str(result.step))
    table.add_row("train loss (last log)", fmt(result.loss, ".4f"))
    if mode == "classify":
        table.add_row("val loss (nats/example)", fmt(result.val_loss, ".4f"))
    else:
        table.add_row("val loss (nats/token)", fmt(result.val_loss, ".4f"))
        table.add_row("val bits per byte", fmt(result.val_bpb, ".4f"))
    if result.val_accuracy is not None:
        table.add_row("val accuracy", fmt(result.val_accuracy, ".2%"))
    words = "patch tokens/s" if mode == "classify" else "tokens/s"  # images count patches
    table.add_row(f"{words} (last log)", fmt(result.tokens_per_s, ",.0f"))
    if getattr(result, "mfu", None) is not None:  # CUDA runs: model FLOPs utilisation
        table.add_row("MFU (last log)", fmt(result.mfu, ".1%"))
    table.add_row(
        "params total / active", f"{counts['total'] / 1e6:.2f}M / {counts['active'] / 1e6:.2f}M"
    )
    table.add_row("wall time", f"{result.seconds:.1f} s")
    table.add_row("run dir", str(result.run_dir))
    Console(stderr=False).print(table)
