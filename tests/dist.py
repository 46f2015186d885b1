"""A small owned harness for multi-process tests on CPU (gloo).

    results = run_ranks(world_size, body, tmp_path, *args)

spawns ``world_size`` processes, initialises a gloo group through a FileStore under
``tmp_path``, runs ``body(rank, world_size, *args)`` in each, always destroys the group,
returns each rank's (picklable) return value, re-raises a child's exception in the parent,
and fails after ``timeout`` seconds instead of hanging.

Watchdog: every rank arms ``faulthandler`` to dump the stacks of all its threads to stderr
shortly before the parent's bound (a hung collective then shows where each rank waits), and
the group's own timeout is below that bound too, so a collective that waits on a missing
peer raises in the child first. The parent kills whatever is still running at the bound and
names the ranks that never reported.
"""

from __future__ import annotations

import faulthandler
import itertools
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(
    rank: int,
    world_size: int,
    store_path: str,
    body: Callable,
    args: tuple,
    queue,
    timeout: float,
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    # Stacks before the parent kills us; the group gives up on a missing peer before that.
    faulthandler.dump_traceback_later(max(timeout - 10.0, 1.0), exit=False, file=sys.stderr)
    group_timeout = timedelta(seconds=max(min(120.0, timeout - 20.0), 5.0))
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=group_timeout
        )
        try:
            out = body(rank, world_size, *args)
            queue.put((rank, "ok", out))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - forwarded to the parent verbatim
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        faulthandler.cancel_dump_traceback_later()


_LAUNCHES = itertools.count()


def run_ranks(
    world_size: int, body: Callable, tmp_path: Path, *args: Any, timeout: float = 300.0
) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    # A fresh store per launch: a later launch in the same tmp_path must not read the keys
    # (and stale addresses) an earlier one left in its file.
    store_path = str(Path(tmp_path) / f"store_{os.getpid()}_{next(_LAUNCHES)}")
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, store_path, body, args, queue, timeout))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=max(deadline - time.monotonic(), 0.1))
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    except Exception as err:  # queue.Empty
        missing = sorted(set(range(world_size)) - set(results))
        errors.append(
            f"timed out after {timeout}s: ranks {missing} never reported ({err!r}); their "
            "stacks were dumped to stderr just before"
        )
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
