"""Atomic checkpoints through the DeepSpeed engine, plus RNG states and the resolved config.

Layout under ``RUN_DIR/checkpoints``:

    step00000500/            engine state (model, optimizer, scheduler) + moeforge.json
                             + rng_rank<r>.pt per rank + config.yaml
    latest                   the tag of the last complete checkpoint (written last)

Saving writes everything into ``.tmp-step...`` first; rank 0 renames it to its final name
after every rank has finished and only then replaces ``latest`` (write-then-rename), so a
crash mid-save leaves the previous checkpoint and its pointer intact. The last
``checkpoint.keep_last`` checkpoints are kept. The data position is the step number
(launch/data.py), stored with the world size that produced it.

Expert weights: the engine sees moeforge's MoE layers through parameter-free markers
(parallel/deepspeed_bridge.py, contract 1), so it writes no per-expert files and the stacked
expert weights stay in its module state with everything else (complete at ep=1). Every
checkpoint of a model with experts also holds ``portable.pt`` (parallel/expert_checkpoint.py):
full weights, Adam moments and step, independent of the EP size. moeforge.json records the
``ep`` a checkpoint was saved with; ``load(..., ep=N)`` at another ep takes the scheduler,
step counters and client state from the engine's files and weights plus Adam state from
``portable.pt`` only (issue 4).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from pydantic import BaseModel, ConfigDict, Field

from launch.errors import UserError
from parallel import deepspeed_bridge as bridge

STATE_FILE = "moeforge.json"
LATEST = "latest"


class CheckpointConfig(BaseModel):
    """When checkpoints are written and how many are kept (``checkpoint:`` section)."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(default=500, ge=0, description="0: only at the end")
    keep_last: int = Field(default=2, ge=1)


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run's checkpoints live."""
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    """The directory name of the checkpoint after global step ``step``."""
    return f"step{step:08d}"


def latest_tag(run_dir: Path) -> str | None:
    """The tag ``latest`` points to, or None when the run has no complete checkpoint."""
    pointer = checkpoint_dir(run_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (checkpoint_dir(run_dir) / tag / STATE_FILE).is_file() else None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states of this process."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    engine: Any,
    run_dir: Path,
    step: int,
    *,
    world_size: int,
    config_yaml: str,
    keep_last: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save the state after global step ``step`` atomically; every rank must call it."""
    root = checkpoint_dir(run_dir)
    tag = tag_for(step)
    final = root / tag
    if latest_tag(run_dir) == tag:  # already saved (e.g. stop_at followed by the end)
        return final
    tmp_tag = f".tmp-{tag}"
    if _rank() == 0 and (root / tmp_tag).exists():
        shutil.rmtree(root / tmp_tag)  # leftovers of a crashed save
    _barrier()
    state = {"step": step, "world_size": world_size, **(extra or {})}
    engine.save_checkpoint(
        str(root), tag=tmp_tag, client_state={"moeforge": state}, save_latest=False
    )
    torch.save(rng_state(), root / tmp_tag / f"rng_rank{_rank()}.pt")
    _save_experts(engine, root / tmp_tag)
    _barrier()
    if _rank() == 0:
        (root / tmp_tag / "config.yaml").write_text(config_yaml)
        (root / tmp_tag / STATE_FILE).write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        (root / tmp_tag).rename(final)
        pointer_tmp = root / f"{LATEST}.tmp"
        pointer_tmp.write_text(tag)
        pointer_tmp.replace(root / LATEST)
        prune(root, keep_last, keep=tag)
    _barrier()
    return final


def prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never ``keep``)."""
    tags = sorted(p.name for p in root.glob("step*") if p.is_dir())
    for name in tags[:-keep_last]:
        if name != keep:
            shutil.rmtree(root / name, ignore_errors=True)


def saved_state(run_dir: Path) -> dict[str, Any] | None:
    """moeforge's own state of the latest checkpoint (step, world size), or None."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    return json.loads((checkpoint_dir(run_dir) / tag / STATE_FILE).read_text())


def saved_config_text(run_dir: Path) -> str | None:
    """The resolved config stored with the latest checkpoint."""
    tag = latest_tag(run_dir)
    return None if tag is None else (checkpoint_dir(run_dir) / tag / "config.yaml").read_text()


def saved_ep(run_dir: Path) -> int | None:
    """The EP size the latest checkpoint was saved with (moeforge.json, else its config)."""
    state = saved_state(run_dir)
    if state is None:
        return None
    if "ep" in state:
        return int(state["ep"])
    config = yaml.safe_load(saved_config_text(run_dir) or "") or {}
    return int((config.get("parallel") or {}).get("ep", 1))


def check_ep_change(run_dir: Path, ep: int) -> None:
    """Raise a one-line UserError unless the latest checkpoint can be resumed at ``ep``."""
    before = saved_ep(run_dir)
    if before is None or before == ep:
        return
    directory = checkpoint_dir(run_dir) / str(latest_tag(run_dir))
    if not (directory / PORTABLE_FILE).is_file():
        raise UserError(
            f"cannot resume {directory} at parallel.ep={ep}: it was saved at ep={before} without "
            f"{PORTABLE_FILE} (layout-free weights and Adam state); resume at parallel.ep={before}"
        )


def load(engine: Any, run_dir: Path, *, ep: int | None = None) -> dict[str, Any]:
    """Load the latest checkpoint into ``engine`` and this rank's RNG; returns moeforge's state.

    ``ep``: this run's EP size. When it differs from the saved one, module and optimizer
    states (shaped by the layout) are not loaded from the engine's files: weights, Adam
    moments and step come from ``portable.pt``, the rest (LR scheduler, step counters,
    client state) from the engine's files.
    """
    tag = latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint_dir(run_dir)}")
    directory = checkpoint_dir(run_dir) / tag
    before = saved_ep(run_dir)
    if ep is not None and before != ep:
        check_ep_change(run_dir, ep)
        client_state = bridge.load_training_state(engine, str(checkpoint_dir(run_dir)), tag)
        groups = _portable_groups(engine)
        if groups is None:
            raise UserError(
                f"cannot resume {directory} at parallel.ep={ep}: the model has no experts"
            )
        from parallel.expert_checkpoint import load_portable

        load_portable(engine, engine.module, groups, directory / PORTABLE_FILE)
    else:
        path, client_state = engine.load_checkpoint(
            str(checkpoint_dir(run_dir)),
            tag=tag,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise RuntimeError(
                f"DeepSpeed could not load checkpoint {tag} from {checkpoint_dir(run_dir)}"
            )
        _load_experts(engine, directory)
    rng_file = directory / f"rng_rank{_rank()}.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state["moeforge"]


# --- Expert parallelism (issue 4): the engine's module state comes from rank 0 only, which at
# ep > 1 holds just its own block of experts. The full, layout-independent weights and Adam
# moments of every parameter go to PORTABLE_FILE (parallel/expert_checkpoint.py): at ep > 1
# they overwrite what the engine loaded; at any ep they let a run continue at another ep.
PORTABLE_FILE = "portable.pt"


def _portable_groups(engine: Any) -> Any:
    """The EP groups of a model with experts (a mesh-free ep=1 stand-in at ep=1), else None."""
    module = getattr(engine, "module", None)
    groups = getattr(module, "expert_parallel_groups", None)
    if groups is not None or getattr(module, bridge.MARKERS_ATTRIBUTE, None) is None:
        return groups
    from parallel.layout import ParallelLayout, ProcessGroups

    # At ep=1 nothing is exchanged: save/load_portable read only the layout and ep rank 0.
    layout = ParallelLayout.from_world(dist.get_world_size(), ep=1)
    return ProcessGroups(layout=layout, mesh=None, rank=dist.get_rank())


def _save_experts(engine: Any, directory: Path) -> None:
    groups = _portable_groups(engine)
    if groups is not None:
        from parallel.expert_checkpoint import save_portable

        save_portable(engine, engine.module, groups, directory / PORTABLE_FILE)


def _load_experts(engine: Any, directory: Path) -> None:
    """Same-ep resume: at ep > 1 every rank's experts come from the portable file."""
    groups = getattr(getattr(engine, "module", None), "expert_parallel_groups", None)
    if groups is not None and (directory / PORTABLE_FILE).is_file():
        from parallel.expert_checkpoint import load_portable

        load_portable(engine, engine.module, groups, directory / PORTABLE_FILE)
