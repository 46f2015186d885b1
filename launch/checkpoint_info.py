"""``moeforge checkpoint info RUN``: the step and parallel layout a run's checkpoint was saved with.

    moeforge checkpoint info runs/tiny-20260101-120000

Reads the latest complete checkpoint of RUN (launch/checkpoint.py): its step and world size
(moeforge.json), the parallel section of the resolved config saved beside it, and, for
expert-parallel runs, the layout-free weights file (parallel/expert_checkpoint.py) that lets
it load at another EP size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from launch import checkpoint
from launch.errors import UserError


def describe(run_dir: Path) -> list[str]:
    """Lines describing the latest checkpoint of ``run_dir``."""
    tag = checkpoint.latest_tag(run_dir)
    if tag is None:
        raise UserError(f"no complete checkpoint under {checkpoint.checkpoint_dir(run_dir)}")
    directory = checkpoint.checkpoint_dir(run_dir) / tag
    state = json.loads((directory / checkpoint.STATE_FILE).read_text())
    config = yaml.safe_load((directory / "config.yaml").read_text()) or {}
    parallel = config.get("parallel") or {}
    tp, pp, ep = (int(parallel.get(k, 1)) for k in ("tp", "pp", "ep"))
    world = int(state["world_size"])
    dp = world // max(tp * pp, 1)
    lines = [
        f"{directory}: step {state['step']}",
        f"layout: dp={dp} x tp={tp} x pp={pp} (ep={ep}, each expert on {dp // max(ep, 1)} "
        f"rank(s)) on {world} ranks, ZeRO {parallel.get('zero_stage', 0)}, "
        f"precision {config.get('precision', '?')}",
    ]
    portable = directory / checkpoint.PORTABLE_FILE
    if portable.with_suffix(".json").is_file():
        from parallel.expert_checkpoint import portable_info

        lines.append(f"experts: {portable_info(portable)}")
    elif ep > 1:
        lines.append("experts: no portable file; only rank 0's experts were saved")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="moeforge checkpoint info", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run", type=Path, help="run directory (holds checkpoints/)")
    args = parser.parse_args(argv)
    print("\n".join(describe(args.run)))
    return 0
