"""Collect the results of benchmark rank processes spawned by the parent (not a launcher).

    procs = [ctx.Process(target=rank_main, args=(r, ..., queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    results = wait_for_ranks(procs, queue, timeout=600, name="bench tp")  # [rank 0's, ...]

Each rank puts ``(rank, "ok", payload)`` or ``(rank, "error", traceback text)`` on the queue.
"""

from __future__ import annotations

import queue as queue_module
import time
from typing import Any


def wait_for_ranks(procs: list[Any], queue: Any, *, timeout: float, name: str) -> list[Any]:
    """Every rank's payload in rank order; a RuntimeError naming the rank when one fails,
    dies without a word, or the whole wait exceeds ``timeout`` seconds. The processes are
    joined (killed when they outlive a failure) before it returns or raises."""
    world = len(procs)
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    gone_since: float | None = None
    try:
        while len(results) < world:
            try:
                rank, status, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                # A rank that died without a word (killed, out of memory) must not leave the
                # parent waiting for the whole timeout; its last message may still be in the
                # pipe, so it gets a few seconds.
                gone = [r for r, p in enumerate(procs) if r not in results and not p.is_alive()]
                if not gone:
                    gone_since = None
                elif gone_since is None:
                    gone_since = time.monotonic()
                late = gone_since is not None and time.monotonic() - gone_since > 5
                if late or time.monotonic() > deadline:
                    what = f"ranks {gone} exited" if gone else f"timed out after {timeout:.0f}s"
                    raise RuntimeError(f"{name}: {what} without reporting") from None
                continue
            if status != "ok":
                raise RuntimeError(f"{name}: rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for proc in procs:
            proc.join(timeout=30 if len(results) == world else 2)
            if proc.is_alive():
                proc.kill()
    return [results[r] for r in range(world)]
