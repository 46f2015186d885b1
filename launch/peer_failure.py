"""Turn the failure of a multi-rank run into one line that names the rank that is gone.

    stop_on_sigterm()                      # the launcher's SIGTERM becomes an exception
    try:
        train(...)
    except BaseException as err:           # Terminated is one
        line = explain(err)                # "rank 1 stopped responding ...; rank 0 stopped: ..."

Bounds, for a run of several processes:
- a killed or crashed peer: gloo (and NCCL) fail the survivors' next collective as soon as
  the connection closes, which is at once for a survivor waiting in one and within one step
  otherwise; naming the peer from its heartbeat then takes at most
  ``parallel.heartbeat.STALE_AFTER_SECONDS`` (5 s). Under torchrun the agent also stops the
  survivors within about a second, with SIGTERM, which ``stop_on_sigterm`` turns into this
  same report.
- a frozen peer (SIGSTOP, a hung device): the survivors' collective gives up after
  ``parallel.timeout_s``, then the same 5 s. torchrun stops a frozen worker only after its
  own 30 s grace (SIGTERM waits until the process runs again, SIGKILL follows).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from types import FrameType
from typing import Any

import torch.distributed as dist

from launch.errors import first_line
from parallel import heartbeat
from parallel.collectives import CollectiveError

EXIT_PEER_LOST = 4


class Terminated(BaseException):
    """The launcher asked this process to stop (SIGTERM). A BaseException, like
    KeyboardInterrupt, so that code catching Exception does not swallow it."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated("stopped by SIGTERM from the launcher")


def stop_on_sigterm() -> Any:
    """Make SIGTERM raise ``Terminated`` in the main thread, so the report can be written;
    returns the handler it replaces, for ``restore_sigterm`` (None off the main thread,
    where handlers cannot be set: nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    return signal.SIG_DFL if previous is None else previous


def restore_sigterm(previous: Any) -> None:
    """Put back the handler ``stop_on_sigterm`` replaced."""
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


# What gloo, NCCL and c10d say when a peer is gone or a wait ran out; other errors (a bug, a
# diverged loss, a bad value) fail every rank alike, and a peer that exits with the same
# error must not be blamed for it.
COMMUNICATION_FAILURE = re.compile(
    r"gloo|nccl|c10d|ProcessGroup|Connection (reset|closed|refused)|Broken pipe|[Tt]imed out"
)


def is_communication_failure(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) is a collective or store failure."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (CollectiveError, Terminated, dist.DistError)):
            return True
        if isinstance(seen, RuntimeError) and COMMUNICATION_FAILURE.search(str(seen)):
            return True
        seen = seen.__cause__
    return False


def explain(err: BaseException) -> str | None:
    """One line naming the peers that stopped beating and what this rank was doing, or None
    when ``err`` is not a communication failure or no better than its traceback."""
    if not is_communication_failure(err):
        return None
    beat = heartbeat.running()
    dead: list[int] = []
    if beat is not None:
        # The launcher's SIGTERM (it stops the survivors of a dead worker) must not cut the
        # check short; its SIGKILL, seconds later, still can. Python runs handlers in the
        # main thread whichever thread the signal reaches, so the handler is swapped, not
        # the signal mask.
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            dead = beat.unresponsive()
        finally:
            signal.signal(signal.SIGTERM, previous)
    if dead:
        return (
            f"{heartbeat.describe(dead)} stopped responding (no heartbeat for "
            f"{beat.stale_after:.0f} s: killed, crashed or frozen); rank {beat.rank} "
            f"stopped: {first_line(err)}"
        )
    if isinstance(err, CollectiveError):
        return first_line(err)
    return None


def report(err: BaseException) -> int | None:
    """Print ``explain(err)`` as ``moeforge: error: ...`` and return the exit status, or None
    when there is nothing better to say than the traceback.

    A SIGTERM with every peer alive is the launcher ending the run for a reason it reports
    itself (another rank's failure, already named by that rank): this rank then dies of the
    signal as it would have without the handler, the status launchers expect of the workers
    they stop.
    """
    line = explain(err)
    beat = heartbeat.running()
    if beat is not None and (line is not None or isinstance(err, Terminated)):
        beat.leave()
    if line is None:
        if isinstance(err, Terminated):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        return None
    from launch.torchrun_plugin import note_peer_lost

    note_peer_lost()
    print(f"moeforge: error: {line}", file=sys.stderr, flush=True)
    return EXIT_PEER_LOST
