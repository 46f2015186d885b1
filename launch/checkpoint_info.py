"""``moeforge checkpoint info RUN``: verify a run's checkpoints and show the layout of the newest.

    moeforge checkpoint info runs/tiny-20260101-120000

Checks every checkpoint of RUN against its manifest, sizes and checksums
(launch/checkpoint_verify.py), and lists each as ``ok`` or ``damaged: <reason>``, with what is
wrong with the ``latest`` pointer if anything. For the newest valid checkpoint (the one a
resume would use) it shows its step and layout (dp, tp, pp, ep and world size from
moeforge.json, else from the parallel section of the resolved config saved beside it), and
where its layout-free weights are (for a layout change: parallel/expert_checkpoint.py). Exit status 0 when a valid checkpoint exists, 1 when none is.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from launch import checkpoint
from launch.arguments import ArgumentParser
from launch.checkpoint_verify import checkpoint_tags, find_resume_point, verify
from launch.errors import UserError


def _layout_lines(directory: Path) -> list[str]:
    """Step, layout and layout-free weights of one valid checkpoint."""
    state = json.loads((directory / checkpoint.STATE_FILE).read_text())
    config = yaml.safe_load((directory / "config.yaml").read_text()) or {}
    parallel = config.get("parallel") or {}
    # moeforge.json records the layout; older checkpoints only in their config (pp 1).
    pp = int(state.get("pp", parallel.get("pp", 1)))
    tp = int(state.get("tp", parallel.get("tp", 1)))
    ep = int(state.get("ep", parallel.get("ep", 1)))
    world = int(state["world_size"])
    dp = int(state.get("dp", world // max(tp * pp, 1)))
    stage = " of its stage" if pp > 1 else ""
    lines = [
        f"{directory}: step {state['step']}",
        f"layout: dp={dp} x tp={tp} x pp={pp} (ep={ep}, each expert on "
        f"{dp * tp // max(ep, 1)} rank(s){stage}) on {world} ranks, ZeRO "
        f"{parallel.get('zero_stage', 0)}, precision {config.get('precision', '?')}",
    ]
    portable = directory / checkpoint.PORTABLE_FILE
    if portable.with_suffix(".json").is_file():
        from parallel.expert_checkpoint import portable_info

        lines.append(f"experts: {portable_info(portable)}")
    elif checkpoint.layout_free_in_engine_files(state):
        lines.append(
            "experts: full weights and Adam state in the engine's files (ep=1, ZeRO 0); loads "
            "at any ep dividing the experts"
        )
    elif ep > 1:
        where = "each stage's data-parallel rank 0" if pp > 1 else "rank 0"
        lines.append(f"experts: no portable file; only {where}'s experts were saved")
    return lines


def describe(run_dir: Path) -> list[str]:
    """Lines describing ``run_dir``'s checkpoints (see ``verify_run``)."""
    return verify_run(run_dir)[0]


def verify_run(run_dir: Path) -> tuple[list[str], bool]:
    """(lines describing ``run_dir``'s checkpoints, whether one of them is valid)."""
    root = checkpoint.checkpoint_dir(run_dir)
    tags = checkpoint_tags(root)
    if not tags:
        raise UserError(f"no complete checkpoint under {root}")
    point = find_resume_point(root)
    lines = [] if point.tag is None else _layout_lines(root / point.tag)
    if point.tag is None:
        lines.append(f"{root}: no valid checkpoint; a resume would refuse to continue")
    if point.latest_problem:
        lines.append(point.latest_problem)
    for tag in reversed(tags):
        reason = verify(root / tag, checksums=True)
        lines.append(f"{tag}: {'ok' if reason is None else f'damaged: {reason}'}")
    return lines, point.tag is not None


def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="moeforge checkpoint info", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument("run", type=Path, help="run directory (holds checkpoints/)")
    args = parser.parse_args(argv)
    lines, valid = verify_run(args.run)
    print("\n".join(lines))
    return 0 if valid else 1
