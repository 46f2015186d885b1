"""Heartbeats through the run's store, to name the rank that died or froze when a
collective fails.

    beat = Heartbeat(place, rank, world_size).start()   # place: rendezvous.join's StorePlace
    ...                                                 # a collective raises
    beat.unresponsive()                                 # -> [1]: rank 1 stopped beating

A killed peer makes gloo fail the survivors' next collective at once ("Connection closed by
peer", naming an address, not a rank); a frozen one makes it time out after
``parallel.timeout_s``. Either way the survivor then asks which peers stopped beating: every
rank bumps a counter in the store each ``interval`` seconds from a daemon thread, and a peer
whose counter has not moved for ``stale_after`` seconds, as this process measures it (no
clocks are compared across hosts), is named. Naming takes at most ``stale_after`` seconds
(5 s by default); a live peer clears itself within about one interval. Under torchrun the
store is the agent's and outlives every worker; under other launchers rank 0 hosts it, so an
unreachable store means rank 0 is gone.

The beating thread is stopped and joined at interpreter exit. Left running, a beat that is
inside the store's C++ call when Python finalizes is unwound by CPython's thread exit
through a noexcept frame, and the process aborts ("terminate called without an active
exception") after the run has finished.
"""

from __future__ import annotations

import atexit
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from parallel.rendezvous import StorePlace, under_torchelastic_agent_store

INTERVAL_SECONDS = 1.0
STALE_AFTER_SECONDS = 5.0
STORE_TIMEOUT = timedelta(seconds=5)

_running: Heartbeat | None = None


class Heartbeat:
    """This rank's heartbeat and the check of everyone else's."""

    def __init__(
        self,
        place: StorePlace,
        rank: int,
        world_size: int,
        *,
        interval: float = INTERVAL_SECONDS,
        stale_after: float = STALE_AFTER_SECONDS,
    ) -> None:
        self.place, self.rank, self.world_size = place, rank, world_size
        self.interval, self.stale_after = interval, stale_after
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _key(self, rank: int) -> str:
        return f"heartbeat/{rank}"

    def start(self) -> Heartbeat:
        """Start beating from a daemon thread (its own store connection); returns self."""
        store = self.place.open(STORE_TIMEOUT)
        store.add(self._key(self.rank), 1)

        def beat() -> None:
            while not self._stop.wait(self.interval):
                try:
                    store.add(self._key(self.rank), 1)
                except RuntimeError:  # the store went away: the run is ending
                    return

        self._thread = threading.Thread(target=beat, name="moeforge-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.join)
        return self

    def stop(self) -> None:
        """Stop beating (peers would name this rank if a collective failed afterwards)."""
        self._stop.set()

    def join(self) -> None:
        """Stop beating and wait for a beat in flight (it gives up within the store's
        timeout); runs at interpreter exit."""
        self.stop()
        if self._thread is not None:
            self._thread.join(STORE_TIMEOUT.total_seconds() + self.interval)

    def leave(self) -> None:
        """Stop beating and tell peers this rank ends on purpose (having reported a failure),
        so that they do not name it as the one that stopped responding."""
        self.stop()
        try:
            self.place.open(STORE_TIMEOUT).set(f"left/{self.rank}", "1")
        except (RuntimeError, dist.DistError):
            pass  # the store is gone: peers learn nothing either way

    def unresponsive(self) -> list[int]:
        """Peers whose heartbeat has not moved for ``stale_after`` seconds (those that left on
        purpose excepted); ``[0]`` when the store rank 0 hosts cannot be reached. Returns as
        soon as every peer has moved."""
        peers = [r for r in range(self.world_size) if r != self.rank]
        try:
            store = self.place.open(STORE_TIMEOUT)
            peers = [r for r in peers if not store.check([f"left/{r}"])]
            first = {r: store.add(self._key(r), 0) for r in peers}
            deadline = time.monotonic() + self.stale_after
            silent = set(peers)
            while silent and time.monotonic() < deadline:
                time.sleep(min(0.25, self.interval / 2))
                silent = {r for r in silent if store.add(self._key(r), 0) == first[r]}
        except (RuntimeError, dist.DistError):
            hosted_by_rank0 = not under_torchelastic_agent_store()
            return [0] if hosted_by_rank0 and self.rank != 0 else []
        return sorted(silent)


def start(place: StorePlace, rank: int, world_size: int) -> Heartbeat:
    """Start this process's heartbeat (once); ``running()`` returns it afterwards."""
    global _running
    if _running is None:
        _running = Heartbeat(place, rank, world_size).start()
    return _running


def running() -> Heartbeat | None:
    """This process's heartbeat, if ``start`` was called."""
    return _running


def describe(ranks: list[int]) -> str:
    """'rank 1' / 'ranks 1, 3' for messages."""
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))
