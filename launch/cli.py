"""The ``moeforge`` command.

    moeforge train [CONFIG] [--set key=value ...] [--run-dir PATH]
                   [--resume | --fresh | --no-resume]
                   [--deepspeed-config FILE]        # no CONFIG: configs/tiny.yaml
    moeforge bench NAME [ARGS ...]                  # runs launch/bench_NAME.py:main(ARGS)
    moeforge checkpoint info RUN                    # verify RUN's checkpoints; layout of the newest
    moeforge plot-experts RUN [--out PNG]           # per-layer expert load over steps
    moeforge sweep SWEEP.yaml [--parallel N] [--executor local|submitit-local|slurm]
    moeforge fit RESULTS.csv [--out JSON]           # scaling laws, bootstrap intervals
    moeforge plot-sweep RESULTS.csv [--out DIR]     # loss vs compute / experts / steps

One process:   moeforge train
Two DP ranks:  torchrun --nproc_per_node=2 -m launch.cli train
DeepSpeed:     deepspeed --num_gpus 2 launch/cli.py train      (--num_gpus counts processes)
MPI:           mpirun -n 2 moeforge train

A user error (unknown config key, bad value, missing data, incompatible resume) prints one
line naming the field and the fix and exits with status 2, without a traceback; under
torchrun that line is all the user sees and torchrun exits 2 (launch/torchrun_plugin.py).
docs/bad_inputs.md lists the bad inputs and their lines.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from launch.arguments import ArgumentParser
from launch.errors import EXIT_DIVERGED, EXIT_USER_ERROR, TrainingDiverged, UserError


def _train_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="moeforge train", description="Train an MoE transformer.")
    parser.add_argument("config", nargs="?", help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value by dotted key, e.g. --set moe.num_experts=16",
    )  # fmt: skip
    parser.add_argument("--run-dir", type=Path, help="where metrics and checkpoints go")
    # A run dir holding a previous run continues from its newest valid checkpoint by default
    # (what a restarted torchrun worker relies on); these make the intent explicit.
    restart = parser.add_mutually_exclusive_group()
    restart.add_argument(
        "--resume", action="store_true", help="require a checkpoint in the run dir to continue from"
    )
    restart.add_argument(
        "--fresh", action="store_true",
        help="remove the run dir's previous checkpoints and metrics and start over",
    )  # fmt: skip
    restart.add_argument(
        "--no-resume", action="store_true", help="refuse a run dir that already holds a run"
    )
    parser.add_argument(
        "--deepspeed-config", help="DeepSpeed JSON whose keys override the generated ones"
    )
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS
    )  # deepspeed launcher
    return parser


def train_main(argv: list[str]) -> int:
    """``moeforge train``: returns the exit status."""
    args = _train_parser().parse_args(argv)
    from launch.config import load_config
    from launch.cpu_memory import retain_freed_memory
    from launch.peer_failure import report as report_peer_failure
    from launch.peer_failure import restore_sigterm, stop_on_sigterm
    from launch.run_dir import default_run_dir
    from launch.trainer import train

    retain_freed_memory()  # CPU runs: no page faults for tensors freed and reallocated each step

    config = load_config(args.config, args.overrides)
    run_dir = args.run_dir
    if run_dir is None:  # the same on every rank and after a torchrun restart
        run_dir = default_run_dir(Path(args.config).stem if args.config else "tiny")
    previous_sigterm = stop_on_sigterm()
    try:
        train(
            config, run_dir, resume=args.resume, fresh=args.fresh, no_resume=args.no_resume,
            deepspeed_json=args.deepspeed_config,
        )  # fmt: skip
    except UserError:
        raise
    except BaseException as err:  # a peer died or froze (or SIGTERM): one line naming it
        status = report_peer_failure(err)
        if status is None:
            raise
        return status
    finally:
        restore_sigterm(previous_sigterm)
    return 0


def bench_main(argv: list[str]) -> int:
    """``moeforge bench NAME``: dispatch to launch/bench_NAME.py:main(argv)."""
    if not argv or argv[0].startswith("-"):
        raise UserError("moeforge bench needs a benchmark name, e.g. moeforge bench train")
    name, rest = argv[0], argv[1:]
    try:
        module = importlib.import_module(f"launch.bench_{name}")
    except ModuleNotFoundError as err:
        if err.name != f"launch.bench_{name}":
            raise
        found = sorted(p.stem[len("bench_") :] for p in Path(__file__).parent.glob("bench_*.py"))
        raise UserError(f"unknown benchmark '{name}'; available: {', '.join(found)}") from None
    return int(module.main(rest) or 0)


def checkpoint_main(argv: list[str]) -> int:
    """``moeforge checkpoint info RUN``: the step and layout of a run's latest checkpoint."""
    if not argv or argv[0] != "info":
        raise UserError("moeforge checkpoint needs a subcommand: moeforge checkpoint info RUN")
    from launch.checkpoint_info import main as info_main

    return info_main(argv[1:])


def plot_experts_main(argv: list[str]) -> int:
    """``moeforge plot-experts RUN``: per-layer expert load over steps, as a PNG."""
    from launch.plot_experts import main as plot_main

    return plot_main(argv)


def sweep_main(argv: list[str]) -> int:
    """``moeforge sweep SWEEP.yaml``: train every run of a sweep; collect results.csv."""
    from launch.sweep import main as sweep

    return sweep(argv)


def fit_main(argv: list[str]) -> int:
    """``moeforge fit RESULTS.csv``: power-law and routed-law fits with bootstrap intervals."""
    from launch.scaling_fit import main as fit

    return fit(argv)


def plot_sweep_main(argv: list[str]) -> int:
    """``moeforge plot-sweep RESULTS.csv``: the sweep's plots as PNG and SVG."""
    from launch.plot_sweep import main as plot

    return plot(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moeforge`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher puts --local_rank=N first; the rank also comes from LOCAL_RANK.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    commands = {
        "train": train_main,
        "bench": bench_main,
        "checkpoint": checkpoint_main,
        "plot-experts": plot_experts_main,
        "sweep": sweep_main,
        "fit": fit_main,
        "plot-sweep": plot_sweep_main,
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        if argv and argv[0] not in ("-h", "--help"):
            print(
                f"moeforge: error: unknown command '{argv[0]}'; use one of: {', '.join(commands)}",
                file=sys.stderr,
            )
            return EXIT_USER_ERROR
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 0 if argv else EXIT_USER_ERROR
    try:
        return commands[argv[0]](argv[1:])
    except UserError as err:
        from launch.log import print_user_error

        print_user_error(str(err))  # once across ranks
        return EXIT_USER_ERROR
    except TrainingDiverged as err:
        from launch.log import print_user_error

        print_user_error(str(err))  # every rank stops at the same step; said once
        return EXIT_DIVERGED


if __name__ == "__main__":
    sys.exit(main())
