"""`moeforge bench attention_train`: train the tiny MoE model once per attention method.

    moeforge bench attention_train                          # every method, 300 steps each
    moeforge bench attention_train --methods full,performer --steps 200
    moeforge bench attention_train --set train.eval_batches=4 --table-only

Each method trains configs/tiny.yaml through the real trainer (launch.trainer.train) in its
own run directory ``OUT/<method>-<mode>`` with ``attention.name=<method>``, the same seed,
data and step count: ``causal_lm`` when the method supports causal attention, ``masked_lm``
(encoder mode) otherwise; ``full`` also runs in ``masked_lm`` so that the encoder-only
methods have a baseline in their own mode. Methods whose defaults assume long sequences get
options that fit seq_len 128 (``METHOD_OPTIONS``). The table (method, mode, first and final
train loss, final val loss and bits per byte, val loss / full's in the same mode, wall time)
is printed and written as markdown; a method that fails gets its one-line error in the table.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import attention
from launch.arguments import ArgumentParser

DEFAULT_OUT = Path("runs/attention_train")
DEFAULT_MARKDOWN = Path("docs/attention_results.md")
RESULT_FILE = "bench_result.json"

# Options for seq_len 128 (the defaults target n of 512 to 4096, where several methods
# would cover the whole sequence at n = 128 and so reduce to full attention).
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "bigbird": {"block_size": 8},  # 16 blocks; 3 window + 3 random + 2 global = half of them
    "linformer": {"n_max": 128, "k": 32},  # project 128 keys to 32
    "long_short": {"window_size": 32},  # causal window 32 (default 512 covers everything)
    "local": {"radius": 32},  # default 127 covers every key at n = 128
    "spade": {"radius": 32},
    "flash": {"chunk_size": 32},  # 4 chunks: local quadratic + global linear part
    "hypercube": {"block_size": 8},  # 16 units on a 4-cube
    "treeformer": {"leaf_size": 16},  # about 8 leaves
}


@dataclass(frozen=True)
class Job:
    """One training run: an attention method in one model mode."""

    method: str
    mode: str

    @property
    def key(self) -> str:
        return f"{self.method}-{self.mode}"


@dataclass(frozen=True)
class Row:
    """One line of the result table (None where a run did not produce the number)."""

    method: str
    mode: str
    first_loss: float | None
    final_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    ratio: float | None
    seconds: float | None
    steps: int | None
    note: str


def plan(methods: list[str]) -> list[Job]:
    """Causal methods in causal_lm, the rest in masked_lm; full in both."""
    jobs = []
    for method in methods:
        cls = attention.get(method)
        mode = "causal_lm" if cls.supports_causal else "masked_lm"
        jobs.append(Job(method, mode))
    if "full" in methods:
        jobs.insert(1 + [j.method for j in jobs].index("full"), Job("full", "masked_lm"))
    return jobs


def overrides_for(job: Job, steps: int, extra: list[str]) -> list[str]:
    """The --set list that turns configs/tiny.yaml into this job's run."""
    items = [
        f"attention.name={job.method}",
        f"model.mode={job.mode}",
        f"train.steps={steps}",
        "logging.progress=false",
        "logging.tensorboard=false",
        "logging.csv=false",
        f"checkpoint.every={steps}",
        "checkpoint.keep_last=1",
    ]
    for key, value in METHOD_OPTIONS.get(job.method, {}).items():
        items.append(f"attention.options.{key}={value}")
    return items + list(extra)


def run_job(job: Job, steps: int, extra: list[str], config_path: str | None, out: Path) -> None:
    """Train one job in OUT/<key>; write bench_result.json with wall time or the error."""
    from launch.config import load_config

    run_dir = out / job.key
    if run_dir.exists():  # a fresh run: an old checkpoint would make the trainer resume it
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    record: dict[str, Any] = {"method": job.method, "mode": job.mode, "error": None}
    try:
        config = load_config(config_path, overrides_for(job, steps, extra))
        from launch.trainer import train  # deepspeed: imported only when there is a run

        train(config, run_dir)
    except Exception as err:  # reported in the table, never a crash of the whole bench
        record["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        (run_dir / "traceback.txt").write_text(traceback.format_exc())
    record["seconds"] = time.perf_counter() - started
    (run_dir / RESULT_FILE).write_text(json.dumps(record))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (empty when missing); bad lines are skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def summarize(job: Job, run_dir: Path) -> Row:
    """A table row (ratio unset) from a run directory's metrics.jsonl and bench_result.json."""
    records = read_metrics(run_dir / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    val_records = [r for r in records if "val_loss" in r]
    result_path = run_dir / RESULT_FILE
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    notes = []
    if result.get("error"):
        notes.append(f"failed: {result['error']}")
    elif not result:
        notes.append("not run")
    cls = attention.get(job.method)
    if cls.replaces_ffn:
        notes.append("replaces the FFN (no MoE in its blocks)")
    return Row(
        method=job.method,
        mode=job.mode,
        first_loss=train_records[0]["ce_loss"] if train_records else None,
        final_loss=train_records[-1]["ce_loss"] if train_records else None,
        val_loss=val_records[-1]["val_loss"] if val_records else None,
        val_bpb=val_records[-1]["val_bpb"] if val_records else None,
        ratio=None,
        seconds=result.get("seconds"),
        steps=train_records[-1]["step"] if train_records else None,
        note="; ".join(notes),
    )


def with_ratios(rows: list[Row]) -> list[Row]:
    """Fill ``ratio``: val loss over full's val loss in the same mode (None without both)."""
    baseline = {r.mode: r.val_loss for r in rows if r.method == "full" and r.val_loss}
    out = []
    for row in rows:
        base = baseline.get(row.mode)
        ratio = row.val_loss / base if (base and row.val_loss is not None) else None
        out.append(Row(**{**row.__dict__, "ratio": ratio}))
    return out


def ordered(rows: list[Row]) -> list[Row]:
    """Rows grouped by mode (causal first), ``full`` first in each group, then by name."""
    return sorted(rows, key=lambda r: (r.mode != "causal_lm", r.mode, r.method != "full", r.method))


def _fmt(value: float | int | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


HEADER = (
    "method",
    "mode",
    "steps",
    "first loss",
    "final train loss",
    "final val loss",
    "val bits/byte",
    "val loss / full",
    "wall time (s)",
    "note",
)


def table_lines(rows: list[Row]) -> list[str]:
    """The rows as a markdown table (losses are cross-entropy in nats per token)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        cells = [
            f"`{r.method}`",
            r.mode,
            _fmt(r.steps, "d"),
            _fmt(r.first_loss, ".3f"),
            _fmt(r.final_loss, ".3f"),
            _fmt(r.val_loss, ".3f"),
            _fmt(r.val_bpb, ".3f"),
            _fmt(r.ratio, ".3f"),
            _fmt(r.seconds, ".0f"),
            r.note.replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[Row], command: str, settings: str, notes: list[str] | None = None) -> str:
    """The whole docs page: what was run, the exact command, the table."""
    options = ", ".join(
        f"`{m}`: " + ", ".join(f"{k}={v}" for k, v in o.items()) for m, o in METHOD_OPTIONS.items()
    )
    return "\n".join(
        [
            "# Attention methods trained in the tiny MoE model",
            "",
            "Each registered attention method trains configs/tiny.yaml (4 layers, d=128, 4 heads,",
            "8 experts in every other block, byte-level, seq_len 128, embedded stdlib corpus)",
            "through `launch.trainer.train`, same seed and data for every run: causal methods",
            "as a causal LM, encoder-only methods as a masked LM (15% masking); `full` runs in",
            "both modes so every method has a baseline in its own mode. Losses are",
            'cross-entropy in nats per token (masked positions only for masked_lm); "first',
            'loss" is the first logged mean (steps 1-10). Masked-LM and causal-LM losses are',
            "not comparable to each other; compare a method with `full` in its mode.",
            "",
            f"Options for seq_len 128: {options}; the rest use their defaults.",
            "",
            f"Settings: {settings}",
            "",
            "Command:",
            "",
            "```",
            command,
            "```",
            "",
            *[line for note in notes or [] for line in (note, "")],
            *table_lines(rows),
            "",
            "See docs/attention.md for what each method computes and its options.",
            "",
        ]
    )


def _without_notes(argv: list[str]) -> list[str]:
    """argv without its --note arguments (they are printed as text, not as the command)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--note":
            skip = True
        elif not item.startswith("--note="):
            out.append(item)
    return out


def main(argv: list[str] | None = None) -> int:
    """Train every requested method, print and write the table; returns 0."""
    parser = ArgumentParser(
        prog="moeforge bench attention_train",
        description=__doc__.splitlines()[0],
        allow_abbrev=False,
    )
    parser.add_argument("config", nargs="?", help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("--methods", help="comma-separated names (default: every registered)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="extra config override for every run, e.g. --set train.eval_batches=4",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="parent of the run dirs")
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN, help="table file")
    parser.add_argument(
        "--table-only", action="store_true", help="train nothing; tabulate the runs in --out"
    )
    parser.add_argument(
        "--note", action="append", default=[], help="a paragraph for the markdown (how it was run)"
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    methods = attention.available()
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        for method in methods:
            attention.get(method)  # unknown names fail here with the list of valid ones
    jobs = plan(methods)
    if not args.table_only:
        for index, job in enumerate(jobs):
            print(f"[{index + 1}/{len(jobs)}] {job.key}: training {args.steps} steps", flush=True)
            run_job(job, args.steps, args.overrides, args.config, args.out)
            row = summarize(job, args.out / job.key)
            print(
                f"[{index + 1}/{len(jobs)}] {job.key}: loss {_fmt(row.first_loss, '.3f')} -> "
                f"{_fmt(row.final_loss, '.3f')}, val {_fmt(row.val_loss, '.3f')}, "
                f"{_fmt(row.seconds, '.0f')} s {row.note}",
                flush=True,
            )
    rows = ordered(with_ratios([summarize(job, args.out / job.key) for job in jobs]))
    print("\n".join(table_lines(rows)))
    command = "moeforge bench attention_train " + shlex.join(_without_notes(argv or []))
    settings = f"{args.steps} steps" + (
        "; overrides " + ", ".join(args.overrides) if args.overrides else ""
    )
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(markdown(rows, command.strip(), settings, args.note))
    print(f"wrote {args.markdown}")
    return 0
