"""Atomic, verified checkpoints through the DeepSpeed engine, plus RNG states and the config.

Layout under ``RUN_DIR/checkpoints``:

    step00000500/            engine state (model, optimizer, scheduler) + moeforge.json
                             + rng_rank<r>.pt per rank + config.yaml + manifest.json
    latest                   the tag of the last complete checkpoint (written last)

Saving writes everything into ``.tmp-step...`` first. After every rank has finished, the
ranks hash the files (each a share of them) and rank 0 writes ``manifest.json`` (sizes and
checksums, launch/checkpoint_verify.py), renames the directory to its final name and only
then replaces ``latest`` (write-then-rename), so a crash mid-save leaves the previous
checkpoint and its pointer intact. A full disk during a save removes the partial directory
and raises ``NoSpaceLeft``: one line naming the step that failed and the one still intact.

Pruning keeps the newest ``checkpoint.keep_last`` checkpoints that pass the size check, and
runs only after the new checkpoint is renamed into place and verified against its manifest,
so it never leaves fewer than one verified checkpoint and never removes the one a run
resumed from before a newer one exists.

Resuming (``resume_point``): the newest checkpoint that matches its manifest (sizes of every
candidate, checksums of the one to load; launch/checkpoint_verify.py). Rank 0 lists the
candidates and checks sizes, every rank checksums a share of the files, and each step's
answer is broadcast or gathered, so every rank loads the same checkpoint. A load error that verification did
not catch names the file in one line.

The data position is the step number (launch/data.py), stored with the world size that
produced it.

Expert weights: the engine sees moeforge's MoE layers through parameter-free markers
(parallel/deepspeed_bridge.py, contract 1), so it writes no per-expert files and the stacked
expert weights stay in its module state with everything else (complete at ep=1). With MoE
layers at ZeRO 0 the optimizer state is written once, in the engine's expp_rank file
(parallel/deepspeed_bridge.py, contract 10). A run at
ep > 1, under ZeRO 1/2 or with DeepSpeed's fp32 master copies also writes ``portable.pt``
(parallel/expert_checkpoint.py): full weights, Adam moments and step, independent of the EP
size. At ep=1 with ZeRO 0 and plain parameters the engine's own files already hold exactly
that, by name, so ``portable.pt`` is not written and a later ep change reads the engine's
files instead (moeforge.json says which: ``layout_free``). Under tensor parallelism the
engine's files hold each rank's shards, so ``portable.pt`` (TP shards gathered) is written.
Under pipeline parallelism each stage's engine files hold its own layers (DeepSpeed writes them
from data-parallel rank 0 only, losing the other EP ranks' experts), so ``portable.pt`` is
always written, every stage's parameters under the Transformer's names (``model=``), and a
resume at pp > 1 takes weights and Adam state from it even at the same layout.
moeforge.json records the layout a checkpoint was saved with (world size, dp, tp, ep, pp);
``load(..., groups=...)`` at another layout takes the scheduler, step counters and client
state from the engine's files (rank 0's when the world size changed) and weights plus Adam
state from the layout-free source only.
"""

from __future__ import annotations

import errno
import json
import pickle
import random
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from pydantic import BaseModel, ConfigDict, Field

from launch.checkpoint_verify import (
    LATEST,
    MANIFEST,
    STATE_FILE,
    ResumePoint,
    checkpoint_tags,
    checksum_mismatch,
    describe_files,
    find_resume_point,
    list_files,
    read_manifest,
    resume_candidates,
    step_of,
    verify,
    write_manifest,
)
from launch.errors import UserError, first_line
from parallel import deepspeed_bridge as bridge

__all__ = [
    "LATEST", "MANIFEST", "PORTABLE_FILE", "STATE_FILE", "CheckpointConfig", "NoSpaceLeft",
    "ResumePoint", "RunSurvey", "check_ep_change", "check_layout_change", "checkpoint_dir",
    "describe_layout", "has_layout_free_state", "latest_tag", "layout_free_in_engine_files",
    "layout_of", "load", "prune", "remove_run_state", "resume_point", "save",
    "saved_config_text", "saved_ep", "saved_layout", "saved_state", "survey", "tag_for",
]  # fmt: skip

PORTABLE_FILE = "portable.pt"
# What a resume compares with the saved layout; a change in any needs layout-free state.
LAYOUT_AXES = ("world_size", "tp", "ep", "pp")
# A write failure with this little space left is a full disk even when the writer (torch's
# zip writer) reports it without an errno.
_FULL_DISK_BYTES = 64 << 20


class CheckpointConfig(BaseModel):
    """When checkpoints are written and how many are kept (``checkpoint:`` section)."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(default=500, ge=0, description="0: only at the end")
    keep_last: int = Field(default=2, ge=1)


class NoSpaceLeft(UserError):
    """The disk filled up while a checkpoint was written; the previous one is intact.

    A user error (exit status 2): the fix is to free space and rerun, which resumes.
    """


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run's checkpoints live."""
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    """The directory name of the checkpoint after global step ``step``."""
    return f"step{step:08d}"


def latest_tag(run_dir: Path) -> str | None:
    """The tag ``latest`` points to, or None when it names no checkpoint with a state file.

    Not verified: ``resume_point`` is what a resume uses.
    """
    pointer = checkpoint_dir(run_dir) / LATEST
    if not pointer.is_file():
        return None
    try:
        tag = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if step_of(tag) is None:
        return None
    return tag if (checkpoint_dir(run_dir) / tag / STATE_FILE).is_file() else None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if _world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order."""
    if _world() == 1:
        return [value]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, value)
    return out


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


# --- Saving --------------------------------------------------------------------------------


def _is_disk_full(err: BaseException, root: Path) -> bool:
    """Whether ``err`` (or what caused it) means the disk is full."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(err, (RuntimeError, OSError)):  # torch's zip writer: "file write failed"
        try:
            return shutil.disk_usage(root).free < _FULL_DISK_BYTES
        except OSError:
            return False
    return False


def _agree_on_failure(err: BaseException | None, root: Path) -> tuple[int, str, bool] | None:
    """(rank, message, disk full) of the first rank whose writes failed, on every rank."""
    mine = (
        None if err is None else (_rank(), f"{type(err).__name__}: {err}", _is_disk_full(err, root))
    )
    failures = [f for f in _gather(mine) if f is not None]
    return failures[0] if failures else None


def _fail_save(
    err: BaseException | None, failure: tuple[int, str, bool], root: Path, tmp: Path, step: int
) -> None:
    """Raise the agreed save failure on every rank; a full disk removes the partial directory."""
    rank, message, disk_full = failure
    if not disk_full:
        if err is not None:
            raise err
        raise RuntimeError(f"rank {rank} failed writing checkpoint step {step}: {message}")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    previous = latest_tag(root.parent)  # untouched by this save; verified when resumed
    intact = f"step {step_of(previous)} intact" if previous else "no earlier checkpoint"
    raise NoSpaceLeft(
        f"no space left writing step {step}; {intact} (free space under {root} and rerun to "
        "continue)"
    ) from err


def save(
    engine: Any,
    run_dir: Path,
    step: int,
    *,
    world_size: int,
    config_yaml: str,
    keep_last: int,
    extra: dict[str, Any] | None = None,
    groups: Any = None,
    model: Any = None,
) -> Path:
    """Save the state after global step ``step`` atomically; every rank must call it.

    ``groups``: the run's ``parallel.layout.ProcessGroups`` (None: one data-parallel group
    over the world), for the layout-free file that gathers experts and TP shards.
    ``model``: the model whose parameter names the layout-free file uses (default
    ``engine.module``); at pp > 1 the whole Transformer the stages were cut from.
    """
    root = checkpoint_dir(run_dir)
    tag = tag_for(step)
    final = root / tag
    tmp = root / f".tmp-{tag}"
    if _rank() == 0:
        for leftover in root.glob(".tmp-step*"):  # of crashed saves
            shutil.rmtree(leftover, ignore_errors=True)
    _barrier()
    layout_free = _layout_free_source(engine, groups)
    layout = layout_of(groups) if groups is not None else {}
    state = {"step": step, "world_size": world_size, **layout, **(extra or {})}
    if layout_free is not None:
        state["layout_free"] = layout_free
    error: BaseException | None = None
    try:
        bridge.save_checkpoint(engine, str(root), tmp.name, {"moeforge": state})
        torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
        if layout_free == PORTABLE_FILE:
            _save_portable(engine, groups, tmp, model)
        if _rank() == 0:
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / STATE_FILE).write_text(json.dumps(state))
    except (OSError, RuntimeError) as err:
        error = err
    failure = _agree_on_failure(error, root)
    if failure is not None:
        _fail_save(error, failure, root, tmp, step)
    error = None
    try:
        _write_manifest(tmp)
        if _rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            pointer_tmp = root / f"{LATEST}.tmp"
            pointer_tmp.write_text(tag)
            pointer_tmp.replace(root / LATEST)
    except (OSError, RuntimeError) as err:
        error = err
    failure = _agree_on_failure(error, root)
    if failure is not None:
        _fail_save(error, failure, root, tmp, step)
    if _rank() == 0:
        problem = verify(final, checksums=False)
        if problem is None:
            prune(root, keep_last, keep=tag)
        else:  # keep everything older: the new one cannot count as the verified copy
            from launch.log import get_logger

            get_logger().warning(
                "checkpoint %s fails its size check (%s); not pruning", tag, problem
            )
    _barrier()
    return final


def _write_manifest(directory: Path) -> None:
    """Every rank checksums a share of the files; rank 0 writes the manifest.

    Rank 0 lists the directory once for all ranks, so the shares never overlap or miss a
    file whatever each rank's view of a shared filesystem's directory cache.
    """
    names = _from_rank0(list_files(directory) if _rank() == 0 else None)
    mine = describe_files(directory, names[_rank() :: _world()])
    entries: dict[str, dict[str, int | str]] = {}
    for share in _gather(mine):
        entries.update(share)
    if _rank() == 0:
        write_manifest(directory, dict(sorted(entries.items())))


def prune(root: Path, keep_last: int, keep: str) -> None:
    """Keep ``keep`` and the newest older checkpoints that pass the size check, ``keep_last``
    in all; delete older and damaged ones. Call only once ``keep`` is verified.

    Checkpoints newer than ``keep`` are left alone: a resume from an older one overwrites
    them as it reaches their steps, and ``latest`` (which names ``keep``) hides them.
    """
    kept = 1
    newest_first = reversed(checkpoint_tags(root))
    for name in [t for t in newest_first if step_of(t) < step_of(keep)]:
        if kept < keep_last and verify(root / name, checksums=False) is None:
            kept += 1
            continue
        shutil.rmtree(root / name, ignore_errors=True)


# --- Choosing and reading a checkpoint -----------------------------------------------------


@dataclass(frozen=True)
class RunSurvey:
    """What a run directory holds of a previous run, and the checkpoint it would resume from.

    ``contents``: phrases such as "metrics.jsonl", "2 checkpoints" (empty: a new run dir).
    ``num_checkpoints``: checkpoint directories, valid or not (partial ones excluded).
    """

    point: ResumePoint
    contents: tuple[str, ...]
    num_checkpoints: int


def _contents(run_dir: Path) -> tuple[tuple[str, ...], int]:
    """(what of a previous run ``run_dir`` holds, its number of checkpoint directories)."""
    run_dir = Path(run_dir)
    found = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    root = checkpoint_dir(run_dir)
    tags = checkpoint_tags(root)
    partial = list(root.glob(".tmp-step*")) if root.is_dir() else []
    if tags:
        found.append(f"{len(tags)} checkpoint{'s' if len(tags) != 1 else ''}")
    if partial:
        found.append(f"{len(partial)} partial checkpoint{'s' if len(partial) != 1 else ''}")
    if not tags and not partial and (root / LATEST).exists():
        found.append(f"checkpoints/{LATEST}")
    return tuple(found), len(tags)


def survey(run_dir: Path) -> RunSurvey:
    """``run_dir``'s previous run and newest valid checkpoint, the same on every rank
    (collective: rank 0 looks, every rank checksums a share of the checkpoint to load)."""
    contents, num_checkpoints = _from_rank0(_contents(run_dir) if _rank() == 0 else None)
    return RunSurvey(resume_point(run_dir), contents, num_checkpoints)


def _shared_checksums(directory: Path) -> str | None:
    """Collective: every rank checksums a share of the manifest's files; the first mismatch."""
    entries = _from_rank0(read_manifest(directory) if _rank() == 0 else None)
    if isinstance(entries, str):
        return entries
    names = sorted(entries)[_rank() :: _world()]
    reasons = [
        r for r in _gather(checksum_mismatch(directory, {n: entries[n] for n in names})) if r
    ]
    return min(reasons) if reasons else None


def resume_point(run_dir: Path) -> ResumePoint:
    """The newest valid checkpoint of ``run_dir``, the same on every rank (collective).

    Rank 0 lists the candidates and checks their sizes; the checksums of the one to load are
    shared out over the ranks, so verifying a large checkpoint takes 1/world of the time
    one rank would need (and stays within the collectives' timeout).
    """
    if _world() == 1:
        return find_resume_point(checkpoint_dir(run_dir))

    def on_rank0(check: Any) -> Any:
        return lambda path: _from_rank0(check(path) if _rank() == 0 else None)

    return find_resume_point(
        checkpoint_dir(run_dir),
        listing=on_rank0(resume_candidates),
        sizes=on_rank0(lambda d: verify(d, checksums=False)),
        checksums=_shared_checksums,
    )


def remove_run_state(run_dir: Path) -> None:
    """Delete a previous run's checkpoints, metrics and monitor logs (rank 0; all ranks call)."""
    if _rank() == 0:
        shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)
        shutil.rmtree(Path(run_dir) / "monitor", ignore_errors=True)
        (Path(run_dir) / "metrics.jsonl").unlink(missing_ok=True)
    _barrier()


def _tag_or_latest(run_dir: Path, tag: str | None) -> str | None:
    return latest_tag(run_dir) if tag is None else tag


def saved_state(run_dir: Path, tag: str | None = None) -> dict[str, Any] | None:
    """moeforge's own state (step, world size, ep) of checkpoint ``tag`` (default: latest)."""
    tag = _tag_or_latest(run_dir, tag)
    if tag is None:
        return None
    return json.loads((checkpoint_dir(run_dir) / tag / STATE_FILE).read_text())


def saved_config_text(run_dir: Path, tag: str | None = None) -> str | None:
    """The resolved config stored with checkpoint ``tag`` (default: latest)."""
    tag = _tag_or_latest(run_dir, tag)
    return None if tag is None else (checkpoint_dir(run_dir) / tag / "config.yaml").read_text()


def saved_ep(run_dir: Path, tag: str | None = None) -> int | None:
    """The EP size checkpoint ``tag`` was saved with (moeforge.json, else its config)."""
    layout = saved_layout(run_dir, tag)
    return None if layout is None else layout["ep"]


def saved_layout(run_dir: Path, tag: str | None = None) -> dict[str, int] | None:
    """{"world_size", "dp", "tp", "ep", "pp"} checkpoint ``tag`` was saved with
    (moeforge.json, its config for what older checkpoints did not record; pp 1 when neither
    does)."""
    state = saved_state(run_dir, tag)
    if state is None:
        return None
    config = yaml.safe_load(saved_config_text(run_dir, tag) or "") or {}
    parallel = config.get("parallel") or {}
    world = int(state["world_size"])
    tp = int(state.get("tp", parallel.get("tp", 1)))
    pp = int(state.get("pp", parallel.get("pp", 1)))
    return {
        "world_size": world,
        "dp": int(state.get("dp", world // max(tp * pp, 1))),
        "tp": tp,
        "ep": int(state.get("ep", parallel.get("ep", 1))),
        "pp": pp,
    }


def layout_of(groups: Any) -> dict[str, int]:
    """The layout record of a run's ``ProcessGroups`` (what ``saved_layout`` reads back)."""
    layout = groups.layout
    return {
        "world_size": layout.world_size,
        "dp": layout.dp,
        "tp": layout.tp,
        "ep": layout.ep,
        "pp": layout.pp,
    }


def describe_layout(layout: dict[str, int]) -> str:
    """A layout record in the notation of the start-up report: "dp=2 x tp=2 x pp=2, ep=2"."""
    text = f"dp={layout['dp']}"
    for axis in ("tp", "pp"):
        if layout.get(axis, 1) > 1:
            text += f" x {axis}={layout[axis]}"
    if layout["ep"] > 1:
        text += f", ep={layout['ep']}"
    return text


def layout_free_in_engine_files(state: dict[str, Any]) -> bool:
    """Whether a checkpoint's moeforge state (moeforge.json) says its engine files, rather
    than ``portable.pt``, hold the layout-free weights and Adam state."""
    return state.get("layout_free") == "engine"


def has_layout_free_state(run_dir: Path, tag: str | None = None) -> bool:
    """Whether checkpoint ``tag`` can be loaded at another layout (portable.pt, or engine
    files that are layout-free)."""
    tag = _tag_or_latest(run_dir, tag)
    if tag is None:
        return False
    directory = checkpoint_dir(run_dir) / str(tag)
    state = saved_state(run_dir, tag) or {}
    return layout_free_in_engine_files(state) or (directory / PORTABLE_FILE).is_file()


def check_layout_change(run_dir: Path, now: dict[str, int], tag: str | None = None) -> None:
    """Raise a one-line UserError unless checkpoint ``tag`` can be resumed at the layout
    ``now`` (its "ep", "tp" and "pp", and "world_size" when given)."""
    tag = _tag_or_latest(run_dir, tag)
    before = saved_layout(run_dir, tag)
    if before is None:
        return
    changed = [k for k in LAYOUT_AXES if k in now and now[k] != before[k]]
    if not changed:
        return
    directory = checkpoint_dir(run_dir) / str(tag)
    names = {"world_size": "world size", "tp": "parallel.tp", "ep": "parallel.ep"}
    names["pp"] = "parallel.pp"
    what = ", ".join(f"{names[k]}={now[k]}" for k in changed)
    was = ", ".join(f"{names[k]}={before[k]}" for k in changed)
    portable = (directory / PORTABLE_FILE).is_file()
    # Engine files that are layout-free (pp=1, ZeRO 0) key the Adam state by position in the
    # whole model's optimizer groups, which no pipeline stage's groups reproduce.
    if now.get("pp", 1) > 1 and not portable:
        raise UserError(
            f"cannot resume {directory} at {what}: a pipeline stage loads only from "
            f"{PORTABLE_FILE}, which this checkpoint (saved at {was}) lacks; resume at {was}"
        )
    if portable or has_layout_free_state(run_dir, tag):
        return
    raise UserError(
        f"cannot resume {directory} at {what}: it was saved at {was} without {PORTABLE_FILE} "
        f"(layout-free weights and Adam state); resume at {was}"
    )


def check_ep_change(run_dir: Path, ep: int, tag: str | None = None) -> None:
    """Raise a one-line UserError unless checkpoint ``tag`` can be resumed at ``ep``."""
    check_layout_change(run_dir, {"ep": ep}, tag)


# What torch.load and the engine raise on a damaged file: a broken zip archive, a truncated or
# garbled pickle, missing keys or shapes that do not fit.
_LOAD_ERRORS = (RuntimeError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError)


def _damaged_file(directory: Path) -> str | None:
    """The first ``.pt`` file in ``directory`` whose zip directory cannot be read (cheap: the
    central directory at the end of the file, not the data)."""
    for path in sorted(directory.glob("*.pt")):
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError):
            return path.name
    return None


def _load_error(directory: Path, err: BaseException, name: str | None = None) -> UserError:
    """A one-line error naming the file that failed to load and how to continue."""
    name = name or _damaged_file(directory)
    where = directory / name if name else directory
    first = first_line(err)[:200]
    return UserError(
        f"cannot load checkpoint {where}: {first}; it matches its manifest, so it was written "
        f"damaged: delete {directory} to resume from the checkpoint before it"
    )


def load(
    engine: Any,
    run_dir: Path,
    *,
    groups: Any = None,
    ep: int | None = None,
    tag: str | None = None,
    model: Any = None,
) -> dict[str, Any]:
    """Load checkpoint ``tag`` into ``engine`` and this rank's RNG; returns moeforge's state.

    ``tag``: default the newest valid checkpoint (``resume_point``). ``groups``: this run's
    ``ProcessGroups`` (or only ``ep``, this run's EP size, over one data-parallel group). When
    the layout differs from the saved one, module and optimizer states (shaped by the layout)
    are not loaded from the engine's files: weights, Adam moments and step come from the
    layout-free source, the rest (LR scheduler, step counters, client state) from the
    engine's files. So does every resume at pp > 1, at any layout (the pipeline engine's
    files are incomplete, see ``pipeline`` below). After a world-size change every rank
    takes rank 0's RNG state (the ranks of a run start from one seed, so rank 0's stands for
    all of them). ``model``: as for ``save`` (at pp > 1 the Transformer; each stage loads its
    own parameters).
    """
    if tag is None:
        tag = resume_point(run_dir).tag
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint_dir(run_dir)}")
    directory = checkpoint_dir(run_dir) / tag
    before = saved_layout(run_dir, tag)
    if groups is not None:
        now = layout_of(groups)
    else:
        now = {**before, "ep": before["ep"] if ep is None else ep, "world_size": _world()}
    changed = any(now.get(k, 1) != before[k] for k in LAYOUT_AXES)
    # A pipeline engine's own files never suffice: its module files hold each stage's dp rank
    # 0's experts only, and with classic bf16 DeepSpeed cannot read back the optimizer file
    # it wrote for MoE layers (its bf16 optimizer expects one state per dp rank).
    pipeline = now.get("pp", 1) > 1 and (directory / PORTABLE_FILE).is_file()
    try:
        if changed or pipeline:
            check_layout_change(run_dir, now, tag)
            client_state = bridge.load_training_state(engine, str(checkpoint_dir(run_dir)), tag)
            _load_layout_free(engine, groups, directory, model)
        else:
            path, client_state = engine.load_checkpoint(
                str(checkpoint_dir(run_dir)),
                tag=tag,
                load_module_strict=True,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            if path is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint {tag}")
            _load_portable_over_engine(engine, groups, directory, model)
    except UserError:
        raise
    except _LOAD_ERRORS as err:
        raise _load_error(directory, err) from err
    rank = _rank() if now["world_size"] == before["world_size"] else 0
    rng_file = directory / f"rng_rank{rank}.pt"
    try:
        set_rng_state(torch.load(rng_file, weights_only=False))
    except _LOAD_ERRORS as err:
        raise _load_error(directory, err, rng_file.name) from err
    return client_state["moeforge"]


# --- Layout-free weights and Adam state ---------------------------------------------------
# At ep > 1 the engine's module state comes from rank 0 only, which holds just its own block of
# experts. The full, layout-independent weights and Adam moments of every parameter go to
# PORTABLE_FILE (parallel/expert_checkpoint.py): at ep > 1 they overwrite what the engine
# loaded; at any ep they let a run continue at another ep.


def _portable_groups(engine: Any, groups: Any) -> Any:
    """The groups the layout-free file is written and read over: the run's when it has
    experts or tensor-parallel shards, None when the engine's files are all there is."""
    module = getattr(engine, "module", None)
    has_experts = getattr(module, bridge.MARKERS_ATTRIBUTE, None) is not None
    # A pipeline stage's engine files hold its own layers under names set by the cut.
    sharded = groups is not None and (groups.layout.tp > 1 or groups.layout.pp > 1)
    if not has_experts and not sharded:
        return None
    if groups is None:
        raise ValueError(
            "checkpoints of a model with experts need the run's ProcessGroups (groups=...)"
        )
    return groups


def _layout_free_source(engine: Any, groups: Any) -> str | None:
    """Where a checkpoint of ``engine`` keeps layout-free weights and Adam state: "engine"
    when its own files already hold them, PORTABLE_FILE otherwise, None without experts or
    tensor-parallel shards."""
    groups = _portable_groups(engine, groups)
    if groups is None:
        return None
    from parallel.expert_checkpoint import engine_files_are_layout_free

    return "engine" if engine_files_are_layout_free(engine, groups) else PORTABLE_FILE


def _save_portable(engine: Any, groups: Any, directory: Path, model: Any = None) -> None:
    from parallel.expert_checkpoint import save_portable

    groups = _portable_groups(engine, groups)
    save_portable(engine, _named_model(engine, model), groups, directory / PORTABLE_FILE)


def _named_model(engine: Any, model: Any) -> Any:
    """The model whose parameter names the layout-free file uses."""
    return engine.module if model is None else model


def _load_layout_free(engine: Any, groups: Any, directory: Path, model: Any = None) -> None:
    """Weights and Adam state at another layout: from portable.pt, else the engine's files."""
    from parallel.expert_checkpoint import load_engine_files, load_portable

    model = _named_model(engine, model)
    if (directory / PORTABLE_FILE).is_file():
        # Also a model without experts or TP shards here: it may have been saved at pp > 1.
        if groups is None:
            raise ValueError(
                f"loading {directory / PORTABLE_FILE} needs the run's ProcessGroups (groups=...)"
            )
        load_portable(engine, model, groups, directory / PORTABLE_FILE)
        return
    groups = _portable_groups(engine, groups)
    if groups is None:
        raise UserError(
            f"cannot resume {directory} at another layout: the model has no experts or "
            "tensor-parallel shards to re-split"
        )
    load_engine_files(engine, model, groups, directory)


def _load_portable_over_engine(
    engine: Any, groups: Any, directory: Path, model: Any = None
) -> None:
    """Same-layout resume at pp=1: rank 0's module state holds only its own experts and
    shards; every rank's come from the portable file when there is one. (At pp > 1 ``load``
    never reads weights from the engine's files.)"""
    if (directory / PORTABLE_FILE).is_file() and groups is not None:
        if groups.layout.ep > 1 or groups.layout.tp > 1:
            from parallel.expert_checkpoint import load_portable

            load_portable(engine, _named_model(engine, model), groups, directory / PORTABLE_FILE)
