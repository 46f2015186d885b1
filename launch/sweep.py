"""``moeforge sweep SWEEP.yaml``: many ordinary training runs from one file, and their table.

    moeforge sweep configs/sweeps/switch_experts.yaml --dry-run        # the plan, no training
    moeforge sweep configs/sweeps/switch_experts.yaml --parallel 2     # runs/sweeps/switch_experts
    moeforge sweep SWEEP.yaml --executor slurm --parallel 32           # pip install moeforge[slurm]
    moeforge fit runs/sweeps/sizes/results.csv                         # then the laws and plots

A sweep file names a base config and what varies (docs/scaling.md has the whole format):

    extends: other.yaml                # optional: start from another sweep file's keys
    base: ../tiny.yaml                 # a moeforge config, relative to this file
    set: {train.eval_every: 100}       # overrides every run gets
    axes:                              # one entry per grid dimension; keys inside one
      - moe.num_experts: [0, 8]        #   entry move together (zipped); 0 experts = dense
      - {model.d_model: [64, 128], model.num_heads: [2, 4]}
    seeds: [0, 1]                      # train.seed, one more grid dimension
    budget:
      flops_per_run: 2.0e13            # train.steps so each run sees this many training FLOPs
      keep_active_flops: true          # scale model.d_ff so FLOPs per token match the dense run
    launcher: python                   # or torchrun, with nproc processes per run
    nproc: 1

Every run is a ``moeforge train`` run directory under the sweep directory, started as a
subprocess with ``--set`` overrides (FLOPs and parameters from moe/accounting.py, planned
before anything trains). Re-running the same command continues the sweep: a run whose
newest checkpoint is its last step is skipped, one with an earlier checkpoint resumes from
it (the trainer's own resume), one that left metrics but no checkpoint starts over. The
table, ``results.csv``, is rewritten from the run directories at the end of every
invocation (also with ``--collect``, which trains nothing).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from launch.arguments import ArgumentParser
from launch.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
RECORD = "sweep.json"  # per run dir: the sweep's own bookkeeping (attempts, wall time, status)
# Test hook: "RUN:STEP" stops the RUN-th run (1-based, sweep order) after its checkpoint at
# STEP and starts no further run, as a sweep killed after that checkpoint would leave it.
FAULT_ENV = "MOEFORGE_SWEEP_FAULT"
EXIT_INTERRUPTED = 3


class BudgetSpec(BaseModel):
    """Rules that derive config values from the accounting of each run."""

    model_config = ConfigDict(extra="forbid")

    flops_per_run: float | None = Field(
        default=None, gt=0, description="training FLOPs per run; sets train.steps"
    )
    keep_active_flops: bool = Field(
        default=False,
        description="scale `scale_key` so an MoE run's FLOPs per token equal its dense twin's",
    )
    scale_key: str = "model.d_ff"
    multiple_of: int = Field(default=8, ge=1, description="round the scaled value to this")
    evals_per_run: int | None = Field(default=None, ge=1, description="sets train.eval_every")
    checkpoints_per_run: int | None = Field(default=None, ge=1, description="sets checkpoint.every")


class SweepSpec(BaseModel):
    """A sweep file, validated."""

    model_config = ConfigDict(extra="forbid")

    base: str
    name: str | None = None
    set: dict[str, Any] = Field(default_factory=dict)
    axes: list[dict[str, list[Any]]] | dict[str, list[Any]] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0])
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    launcher: Literal["python", "torchrun"] = "python"
    nproc: int = Field(default=1, ge=1)
    submitit: dict[str, Any] = Field(
        default_factory=dict, description="AutoExecutor.update_parameters (slurm_partition, ...)"
    )


@dataclass
class PlannedRun:
    """One run of the sweep: its overrides and what the accounting says about it."""

    index: int
    name: str
    run_dir: str
    base: str
    overrides: list[str]  # "key=json value", applied in order after the base config
    swept: dict[str, Any]  # axis key -> value, plus "seed"
    num_experts: int  # per MoE layer; 0: dense
    steps: int
    params_total: int
    params_active: int
    flops_per_token: float  # training (fwd + bwd) FLOPs per token
    tokens_per_step: int
    launcher: str = "python"
    nproc: int = 1
    extra_args: list[str] = field(default_factory=list)


# Loading and planning ----------------------------------------------------------------------


def _read_raw(path: Path, children: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A sweep file's mapping with its ``extends`` chain merged in: the file's own keys win,
    and ``set``, ``budget`` and ``submitit`` merge key by key. The parent's ``base`` stays
    relative to the parent; its ``name`` is not inherited (two sweeps, two directories)."""
    if not path.is_file():
        where = f" (extended by {children[-1]})" if children else ""
        raise UserError(f"sweep file {path}{where} does not exist; pass an existing YAML file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"sweep file {path} is not valid YAML ({err}); fix its syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"sweep file {path} is not a mapping of keys; see docs/scaling.md")
    parent_name = raw.pop("extends", None)
    if parent_name is None:
        return raw
    parent_path = (path.parent / str(parent_name)).resolve()
    chain = (*children, path.resolve())
    if parent_path in chain:
        raise UserError(
            f"sweep file {path}: 'extends' makes a cycle through {parent_path}; "
            "remove one of the extends"
        )
    parent = _read_raw(parent_path, chain)
    parent.pop("name", None)
    beside_parent = parent_path.parent / str(parent.get("base", ""))
    if "base" in parent and beside_parent.is_file():
        parent["base"] = str(beside_parent.resolve())
    merged = {**parent, **raw}
    for key in ("set", "budget", "submitit"):
        if isinstance(parent.get(key), dict) and isinstance(raw.get(key), dict):
            merged[key] = {**parent[key], **raw[key]}
    return merged


def load_spec(path: Path) -> SweepSpec:
    """Read and validate a sweep file (and any it extends); every problem is one UserError
    line."""
    raw = _read_raw(path)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"sweep file {path}: '{where}': {first['msg']}; fix that key") from None
    for group in axis_groups(spec):
        lengths = {key: len(values) for key, values in group.items()}
        if len(set(lengths.values())) > 1:
            raise UserError(
                f"sweep file {path}: zipped axes {lengths} must have equal lengths; "
                "give each key as many values, or put them in separate axes entries"
            )
        if not all(lengths.values()):
            raise UserError(f"sweep file {path}: axis {list(group)} has no values; add some")
    return spec


def axis_groups(spec: SweepSpec) -> list[dict[str, list[Any]]]:
    """The grid dimensions: a mapping gives one per key, a list one per entry (zipped keys)."""
    if isinstance(spec.axes, dict):
        return [{key: values} for key, values in spec.axes.items()]
    return list(spec.axes)


def resolve_base(spec: SweepSpec, sweep_file: Path) -> Path:
    """The base config: relative to the sweep file, else to the working directory."""
    for candidate in (sweep_file.parent / spec.base, Path(spec.base)):
        if candidate.is_file():
            return candidate.resolve()
    raise UserError(
        f"base config '{spec.base}' of {sweep_file} not found next to the sweep file or in "
        f"{Path.cwd()}; fix 'base'"
    )


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: --set parses it back to the same value


def _dense(overrides: list[str]) -> list[str]:
    """Overrides for the dense model: the moe section is dropped, with every moe.* key."""
    kept = [o for o in overrides if not o.startswith(("moe.", "moe="))]
    return kept + ["moe=null"]


def _is_dense(overrides: list[str]) -> bool:
    """The last moe.num_experts given (an axis or ``set``) is 0: the dense model."""
    values = [o.partition("=")[2] for o in overrides if o.startswith("moe.num_experts=")]
    return bool(values) and json.loads(values[-1]) == 0


def _config_value(config: Any, key: str) -> Any:
    node: Any = config.model_dump(mode="json")
    for part in key.split("."):
        node = node[part]
    return node


def _run_name(swept: dict[str, Any], keys: list[str]) -> str:
    short = [k.split(".")[-1] for k in keys]
    names = short if len(set(short)) == len(short) else keys
    parts = [f"{n}={swept[k]}" for n, k in zip(names, keys)] + [f"seed={swept['seed']}"]
    return re.sub(r"[^A-Za-z0-9_.=-]", "-", "_".join(parts))


def plan(spec: SweepSpec, sweep_file: Path, out_dir: Path) -> list[PlannedRun]:
    """Every run of the sweep, in order, with its steps and accounting (builds on meta only)."""
    from launch.config import load_config, tokens_per_micro_batch, validate

    base = resolve_base(spec, sweep_file)
    groups = axis_groups(spec)
    keys = [key for group in groups for key in group]
    fixed = [_override(k, v) for k, v in spec.set.items()]
    runs: list[PlannedRun] = []
    dimensions = [[dict(zip(group, values)) for values in zip(*group.values())] for group in groups]
    for combo in itertools.product(*dimensions, [{"seed": s} for s in spec.seeds]):
        swept: dict[str, Any] = {}
        for part in combo:
            swept.update(part)
        overrides = fixed + [_override(k, swept[k]) for k in keys]
        overrides.append(_override("train.seed", swept["seed"]))
        if _is_dense(overrides):
            overrides = _dense(overrides)
        config = load_config(base, overrides)
        if spec.budget.keep_active_flops and config.moe is not None:
            value = _matched_value(base, overrides, spec.budget)
            overrides.append(_override(spec.budget.scale_key, value))
            config = load_config(base, overrides)
        acc = _accounting(config)
        dp = validate(config, spec.nproc)  # the run's own checks, before anything trains
        tokens_per_step = tokens_per_micro_batch(config) * config.train.grad_accum * dp
        fpt = acc.training.total
        steps = config.train.steps
        if spec.budget.flops_per_run is not None:
            steps = max(1, round(spec.budget.flops_per_run / (fpt * tokens_per_step)))
            overrides.append(_override("train.steps", steps))
        if spec.budget.evals_per_run is not None:
            every = max(1, steps // spec.budget.evals_per_run)
            overrides.append(_override("train.eval_every", every))
        if spec.budget.checkpoints_per_run is not None:
            every = max(1, steps // spec.budget.checkpoints_per_run)
            overrides.append(_override("checkpoint.every", every))
        load_config(base, overrides)  # every derived value validates before anything runs
        name = _run_name(swept, keys)
        runs.append(
            PlannedRun(
                index=len(runs), name=name, run_dir=str(out_dir / name), base=str(base),
                overrides=overrides, swept=swept,
                num_experts=0 if config.moe is None else config.moe.num_experts, steps=steps,
                params_total=acc.total_params, params_active=acc.active_params,
                flops_per_token=fpt, tokens_per_step=tokens_per_step,
                launcher=spec.launcher, nproc=spec.nproc,
            )
        )  # fmt: skip
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"sweep {sweep_file} plans two runs with one name; make its axes distinct")
    return runs


def _accounting(config: Any) -> Any:
    from launch.config import tokens_per_micro_batch
    from moe.accounting import account_config

    seq_len = tokens_per_micro_batch(config) // config.train.micro_batch
    vocab = None
    if config.model.vocab_size is None:  # the tokenizer's: bytes + 4 specials, or the BPE size
        vocab = 260 if config.data.tokenizer == "byte" else config.data.bpe_vocab_size
    return account_config(
        config.model, config.moe, config.attention, seq_len=seq_len, vocab_size=vocab
    )


def _matched_value(base: Path, overrides: list[str], budget: BudgetSpec) -> int:
    """The value of ``budget.scale_key`` that gives this MoE run its dense twin's training
    FLOPs per token. FLOPs are affine in a width such as d_ff, so two evaluations solve it;
    the result is rounded to ``budget.multiple_of``."""
    from launch.config import load_config

    target = _accounting(load_config(base, _dense(overrides))).training.total
    config = load_config(base, overrides)
    x0 = _config_value(config, budget.scale_key)
    if not isinstance(x0, int) or x0 < 1:
        raise UserError(
            f"budget.scale_key {budget.scale_key} ({x0!r}) must be a positive integer width, "
            "e.g. model.d_ff"
        )
    f0 = _accounting(config).training.total
    f1 = _accounting(load_config(base, overrides + [_override(budget.scale_key, 2 * x0)]))
    slope = (f1.training.total - f0) / x0
    if slope <= 0:
        raise UserError(f"budget.scale_key {budget.scale_key} does not change the FLOPs per token")
    exact = x0 + (target - f0) / slope
    step = budget.multiple_of
    return max(step, int(round(exact / step)) * step)


# Running -----------------------------------------------------------------------------------


def run_state(run: PlannedRun) -> str:
    """done (its last step's checkpoint exists), partial (an earlier one), dirty (metrics but
    no checkpoint: starts over) or new."""
    from launch.checkpoint import checkpoint_dir, latest_tag
    from launch.checkpoint_verify import step_of

    run_dir = Path(run.run_dir)
    tag = latest_tag(run_dir)
    if tag is not None:
        return "done" if step_of(tag) >= run.steps else "partial"
    metrics = run_dir / "metrics.jsonl"
    if (metrics.is_file() and metrics.stat().st_size) or checkpoint_dir(run_dir).exists():
        return "dirty"
    return "new"


def check_budget_unchanged(runs: list[PlannedRun], out_dir: Path) -> None:
    """Refuse a plan whose steps differ from the directory's previous plan for a run that has
    started: resuming it would recompute its cosine schedule over the new length mid-run,
    so it would equal neither the old run nor a fresh one of the new length."""
    previous = out_dir / "plan.json"
    if not previous.is_file():
        return
    try:
        before = {r["name"]: r["steps"] for r in json.loads(previous.read_text())}
    except (ValueError, KeyError, TypeError):
        return  # an unreadable old plan says nothing about the runs; the trainer still checks
    for run in runs:
        steps = before.get(run.name)
        if steps is not None and steps != run.steps and run_state(run) != "new":
            raise UserError(
                f"{run.name} was planned for {steps} steps in {out_dir} and has started; this "
                f"plan gives it {run.steps}: a changed budget is a new sweep, so use a new "
                "--out (or restore the budget)"
            )


def command(run: PlannedRun, fresh: bool = False, stop_at: int | None = None) -> list[str]:
    """The ``moeforge train`` command line of ``run`` (torchrun when its launcher says so)."""
    if run.launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        head += [f"--nproc_per_node={run.nproc}", "-m", "launch.cli", "train"]
    else:
        head = [sys.executable, "-m", "launch.cli", "train"]
    args = head + [run.base]
    for item in run.overrides + ([_override("train.stop_at", stop_at)] if stop_at else []):
        args += ["--set", item]
    args += ["--run-dir", run.run_dir]
    return args + (["--fresh"] if fresh else [])


def read_record(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def execute(run: PlannedRun, stop_at: int | None = None) -> dict[str, Any]:
    """Train ``run`` to its end (or to ``stop_at``) in a subprocess; returns its record.

    Module-level and argument-only so that a submitit job can run it on another machine.
    """
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = run_state(run)
    record = read_record(run_dir)
    if state == "done":
        return record | {"status": "done"}
    args = command(run, fresh=state == "dirty", stop_at=stop_at)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    with (run_dir / "sweep.log").open("a") as log:
        log.write(f"\n$ {' '.join(args)}\n")
        log.flush()
        code = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - started
    status = run_state(run)
    status = "failed" if code != 0 else ("done" if status == "done" else "partial")
    record = {
        "name": run.name, "status": status, "returncode": code,
        "attempts": int(record.get("attempts", 0)) + 1,
        "wall_s": float(record.get("wall_s", 0.0)) + wall, "command": args,
        "resumed_from": state,
    }  # fmt: skip
    (run_dir / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return record


def _fault() -> tuple[int, int] | None:
    text = os.environ.get(FAULT_ENV)
    if not text:
        return None
    run, _, step = text.partition(":")
    return int(run), int(step)


def _submitter(executor: str, out_dir: Path, spec: SweepSpec):
    """A function (run, stop_at) -> record running one run through ``executor``."""
    if executor == "local":
        return execute
    try:
        import submitit
    except ImportError:
        raise UserError(
            f"--executor {executor} needs submitit; pip install 'moeforge[slurm]'"
        ) from None
    cluster = "local" if executor == "submitit-local" else "slurm"
    try:
        pool = submitit.AutoExecutor(folder=out_dir / "submitit", cluster=cluster)
    except RuntimeError as err:  # submitit found no srun/sbatch on this machine
        raise UserError(
            f"--executor {executor}: {err}; run on a Slurm login node, or use --executor "
            "local or submitit-local"
        ) from None
    params = {"timeout_min": 24 * 60, **spec.submitit}
    if cluster == "local":  # the slurm_* keys mean nothing to the local executor
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    pool.update_parameters(**params)

    def submit(run: PlannedRun, stop_at: int | None) -> dict[str, Any]:
        job = pool.submit(execute, run, stop_at)
        return job.result()

    return submit


def run_sweep(
    runs: list[PlannedRun], out_dir: Path, spec: SweepSpec, parallel: int = 1,
    executor: str = "local",
) -> bool:  # fmt: skip
    """Run every unfinished run, ``parallel`` at a time; False when the sweep was cut short."""
    from tqdm import tqdm

    submit = _submitter(executor, out_dir, spec)
    fault = _fault()
    stop = threading.Event()
    pending = [r for r in runs if run_state(r) != "done"]
    progress = tqdm(total=len(runs), initial=len(runs) - len(pending), desc="sweep", unit="run")

    def one(run: PlannedRun) -> dict[str, Any] | None:
        if stop.is_set():
            return None
        stop_at = fault[1] if fault and fault[0] == run.index + 1 else None
        record = submit(run, stop_at)
        if stop_at is not None:
            stop.set()
        return record

    failed = []
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {pool.submit(one, run): run for run in pending}
        for future in as_completed(futures):
            run, record = futures[future], future.result()
            if record is None:
                continue
            progress.update(1 if record["status"] == "done" else 0)
            progress.set_postfix_str(f"{run.name}: {record['status']}")
            if record["status"] == "failed":
                failed.append(run.name)
    progress.close()
    if failed:
        print(
            f"[moeforge] sweep: {len(failed)} run(s) failed: {', '.join(failed)}; see each "
            "run's sweep.log, fix, and rerun the same command to continue",
            file=sys.stderr,
        )
    return not stop.is_set() and not failed


# Results -----------------------------------------------------------------------------------

COLUMNS = (
    "run", "run_dir", "status", "seed", "num_experts", "params_total", "params_active",
    "flops_per_token", "tokens", "total_flops", "steps", "planned_steps", "final_train_loss",
    "final_val_loss", "final_val_bpb", "best_val_loss", "best_val_bpb", "wall_s",
)  # fmt: skip


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def result_row(run: PlannedRun) -> dict[str, Any]:
    """One results.csv row from the run's plan, metrics.jsonl and sweep record."""
    records = read_metrics(Path(run.run_dir))
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"]) if evals else {}
    last_eval = max(evals, key=lambda r: r["step"]) if evals else {}
    last = train[-1] if train else {}
    record = read_record(Path(run.run_dir))
    status = run_state(run)
    if status != "done":
        status = "failed" if record.get("status") == "failed" else status
    row = {
        "run": run.name, "run_dir": run.run_dir, "status": status, "seed": run.swept["seed"],
        "num_experts": run.num_experts, "params_total": run.params_total,
        "params_active": run.params_active, "flops_per_token": run.flops_per_token,
        "tokens": last.get("tokens"), "total_flops": last.get("flops"),
        "steps": max((r["step"] for r in records), default=0), "planned_steps": run.steps,
        "final_train_loss": last.get("ce_loss", last.get("loss")),
        "final_val_loss": last_eval.get("val_loss"), "final_val_bpb": last_eval.get("val_bpb"),
        "best_val_loss": best.get("val_loss"), "best_val_bpb": best.get("val_bpb"),
        "wall_s": record.get("wall_s"),
    }  # fmt: skip
    row.update({k: v for k, v in run.swept.items() if k != "seed"})
    return row


def write_results(runs: list[PlannedRun], path: Path) -> list[dict[str, Any]]:
    rows = [result_row(run) for run in runs]
    swept = [k for k in rows[0] if k not in COLUMNS] if rows else []
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(COLUMNS) + swept)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def describe_plan(runs: list[PlannedRun]) -> str:
    width = max([len(r.name) for r in runs] + [3])
    lines = [
        f"{'run':<{width}} {'steps':>6} {'params':>9} {'active':>9} {'FLOPs/tok':>10} {'FLOPs':>9}"
    ]
    for r in runs:
        lines.append(
            f"{r.name:<{width}} {r.steps:>6} {r.params_total / 1e6:>8.2f}M {r.params_active / 1e6:>8.2f}M "
            f"{r.flops_per_token / 1e6:>9.2f}M {r.flops_per_token * r.tokens_per_step * r.steps:>9.2e}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="moeforge sweep", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path, help="sweep YAML (configs/sweeps/*.yaml)")
    parser.add_argument("--out", type=Path, help="sweep directory (default runs/sweeps/NAME)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--executor", choices=("local", "submitit-local", "slurm"), default="local")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; train nothing")
    parser.add_argument("--collect", action="store_true", help="only rewrite results.csv")
    args = parser.parse_args(argv)
    if args.parallel < 1:
        raise UserError(f"--parallel ({args.parallel}) must be >= 1")
    spec = load_spec(args.sweep)
    out_dir = args.out or Path("runs") / "sweeps" / (spec.name or args.sweep.stem)
    runs = plan(spec, args.sweep, out_dir.resolve())
    total = sum(r.flops_per_token * r.tokens_per_step * r.steps for r in runs)
    print(f"[moeforge] sweep {args.sweep}: {len(runs)} runs, {total:.3e} training FLOPs in all")
    if args.dry_run:
        print(describe_plan(runs))
        for run in runs:
            print(" ".join(command(run)))
        return 0
    check_budget_unchanged(runs, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plan.json").write_text(json.dumps([asdict(r) for r in runs], indent=1))
    complete = True
    if not args.collect:
        complete = run_sweep(runs, out_dir, spec, args.parallel, args.executor)
    rows = write_results(runs, out_dir / "results.csv")
    done = sum(r["status"] == "done" for r in rows)
    print(f"[moeforge] sweep: {done}/{len(rows)} runs done; table {out_dir / 'results.csv'}")
    return 0 if complete else EXIT_INTERRUPTED
