"""The default run directory when ``--run-dir`` is not given: one per run, the same on every
rank and after every restart.

    run_dir = default_run_dir("tiny")      # runs/tiny-20261204-213000

A name from the clock alone differs between processes that start a second apart (two ranks,
or a worker torchrun restarts an hour later, which must find the run's own checkpoints to
resume). Under torchrun every worker of one launch, restarted or not, sees the same
``TORCHELASTIC_RUN_ID`` (``--rdzv-id``; a fresh one per ``--standalone`` launch), so the
first process to get here picks the timestamped name and leaves it in a pointer file,
``runs/.torchelastic-<run id>``, created exclusively; every other process, and every
restarted one, reads it back. Across nodes this needs ``runs/`` on a shared file system, as
the checkpoints themselves do. Other launchers (mpirun, the deepspeed launcher) have no
run id: each rank takes the timestamp, and the trainer then uses rank 0's name on every
rank (it broadcasts it once the process group exists); they have no restarts of their own,
so re-running such a run needs its ``--run-dir``.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

RUNS = Path("runs")
POINTER_WAIT_SECONDS = 30.0


def _pointer(run_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)
    return RUNS / f".torchelastic-{safe}"


def _read_pointer(pointer: Path) -> Path:
    """The name another process wrote; it may still be writing it, so wait a little."""
    deadline = time.monotonic() + POINTER_WAIT_SECONDS
    while True:
        name = pointer.read_text().strip()
        if name or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not name:
        raise RuntimeError(f"{pointer} is empty; delete it or pass --run-dir")
    return RUNS / name


def default_run_dir(stem: str, now: float | None = None) -> Path:
    """``runs/<stem>-<YYYYmmdd-HHMMSS>``, shared through the pointer file under torchrun."""
    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return RUNS / name
    pointer = _pointer(run_id)
    RUNS.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(pointer, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return _read_pointer(pointer)
    with os.fdopen(fd, "w") as out:
        out.write(name + "\n")
    return RUNS / name
