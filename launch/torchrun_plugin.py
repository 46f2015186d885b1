"""torchrun integration: a moeforge user error ends a torchrun launch in its one line, status 2.

    torchrun --nproc_per_node=2 -m launch.cli train --set moe.top_k=9; echo $?
    moeforge: error: moe.top_k (9) must be at most moe.num_experts (8); lower moe.top_k ...
    2

Stock torchrun answers any worker that exits non-zero with a ChildFailedError traceback of
about 35 lines and exit status 1, and retries it under ``--max-restarts``. torchrun's agent
loads the entry points of the group ``torchrun.handlers`` when it starts (torch's
``elastic/rendezvous/registry.py``), before it parses its arguments; moeforge registers
``handler_generator`` there (pyproject.toml). In the agent of a moeforge launch, and nowhere
else, it:

* makes a directory for the launch and names it to the workers in ``MOEFORGE_USER_ERROR_DIR``;
  a worker that meets a user error claims ``user-error`` in it (an exclusive create), and the
  first one to claim it prints the line (``report_user_error``), so the line appears once,
  whichever rank fails first and whichever ranks torchrun then stops;
* when that file exists, does not restart the workers (the same config fails the same way),
  drops the agent's log lines about the failure and the teardown signals, and, when every
  failed worker exited with status 2 (or was stopped by torchrun's teardown), ends the agent
  with that status (2, or 3 for a diverged run) and nothing more;
* when a survivor has named a dead or frozen peer in its own line (status 4), and torchrun
  has no restart left, ends the agent with status 4 and without its failure report;
* drops torchrun's OMP_NUM_THREADS banner (torchrun still sets one thread per worker).

Everything else, a worker that crashes among them, falls through to torchrun untouched, and
any problem installing these hooks leaves torchrun exactly as it was. The registered
rendezvous backend "moeforge" is a placeholder that only explains itself if asked for.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

USER_ERROR_DIR_ENV = "MOEFORGE_USER_ERROR_DIR"
CLAIM_FILE = "user-error"
# Left by a survivor that named a dead or frozen peer in its own line (launch/peer_failure.py).
PEER_LOST_FILE = "peer-lost"
PEER_LOST_STATUS = 4
USER_ERROR_STATUS = 2
# Statuses that restarting cannot change: a user error (2) and a diverged run (3) meet the
# same config and the same checkpoint again (launch/errors.py).
FINAL_STATUSES = (USER_ERROR_STATUS, 3)
# Exit codes of workers torchrun itself stops once another worker has failed.
TEARDOWN_CODES = {-signal.SIGTERM, -signal.SIGKILL, -signal.SIGINT}
_ELASTIC_PROCESS_LOGGER = "torch.distributed.elastic.multiprocessing.api"
_RUN_LOGGER = "torch.distributed.run"


def handler_generator() -> Callable[[Any], Any]:
    """Entry point of the ``torchrun.handlers`` group: installs the hooks in the agent of a
    moeforge launch and returns the creator torchrun registers as rendezvous "moeforge"."""
    try:
        if is_moeforge_agent(sys.argv):
            install()
    except Exception:  # noqa: BLE001 - the launcher must keep working whatever happens here
        pass
    return no_rendezvous


def no_rendezvous(params: Any) -> Any:
    """The rendezvous creator registered as "moeforge": there is no such backend."""
    raise ValueError(
        "'moeforge' is not a rendezvous backend (the name only registers moeforge's torchrun "
        "hooks); use --rdzv-backend c10d or --standalone"
    )


def is_moeforge_agent(argv: list[str]) -> bool:
    """Whether this process is torchrun's agent launching moeforge (``-m launch.cli``, the
    ``moeforge`` script or launch/cli.py)."""
    if not argv:
        return False
    program = argv[0].replace("\\", "/")
    if Path(program).name != "torchrun" and not program.endswith("torch/distributed/run.py"):
        return False
    return any(
        arg == "launch.cli" or Path(arg).name == "moeforge" or arg.endswith("launch/cli.py")
        for arg in argv[1:]
    )


def report_user_error() -> bool | None:
    """In a worker: whether this process prints the user error (the first worker to claim
    it under this launch), or None when no moeforge agent is watching (decide by rank)."""
    folder = os.environ.get(USER_ERROR_DIR_ENV)
    if not folder:
        return None
    try:
        os.close(os.open(Path(folder) / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:
        return None
    return True


def note_peer_lost() -> None:
    """In a worker: tell the agent that this worker's line already names the lost peer, so
    torchrun's own failure report after the last restart would only repeat it."""
    folder = os.environ.get(USER_ERROR_DIR_ENV)
    if folder:
        try:
            (Path(folder) / PEER_LOST_FILE).touch()
        except OSError:
            pass


def install() -> None:
    """Set up the directory, the log filters, the restart guard and the exit hook."""
    folder = Path(tempfile.mkdtemp(prefix="moeforge-torchrun-"))
    os.environ[USER_ERROR_DIR_ENV] = str(folder)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    claimed = lambda: (folder / CLAIM_FILE).exists()
    peer_lost = lambda: (folder / PEER_LOST_FILE).exists()
    logging.getLogger(_RUN_LOGGER).addFilter(_DropRecords(lambda r: "OMP_NUM_THREADS" in r.msg))
    logging.getLogger(_ELASTIC_PROCESS_LOGGER).addFilter(
        _DropRecords(lambda r: (claimed() or peer_lost()) and _is_failure_chatter(r))
    )
    _guard_restarts(claimed)
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        try:
            if claimed():
                status = _final_status(error, FINAL_STATUSES)
            elif peer_lost():  # restarts (if any) are spent; the survivor's line said it all
                status = _final_status(error, (PEER_LOST_STATUS,))
            else:
                status = None
            if status is not None:
                shutil.rmtree(folder, ignore_errors=True)
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        except Exception:  # noqa: BLE001 - fall back to the default report
            pass
        previous(kind, error, tb)

    sys.excepthook = hook


class _DropRecords(logging.Filter):
    """A logging filter that drops the records ``drop`` selects (and never raises)."""

    def __init__(self, drop: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__()
        self.drop = drop

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.drop(record)
        except Exception:  # noqa: BLE001 - a filter that fails must not hide the record
            return True


def _is_failure_chatter(record: logging.LogRecord) -> bool:
    text = str(record.msg)
    return text.startswith("failed (exitcode") or "closing signal" in text


def _final_status(error: BaseException, statuses: tuple[int, ...]) -> int | None:
    """The status the agent exits with when ``error`` is torchrun's ChildFailedError for
    workers that each exited with one of ``statuses`` (a user error, a diverged run, a lost
    peer) or died of a signal (stopped by torchrun after another had, or the killed peer
    itself); None for anything else."""
    failures = getattr(error, "failures", None)
    if type(error).__name__ != "ChildFailedError" or not failures:
        return None
    codes = [failure.exitcode for failure in failures.values()]
    final = {code for code in codes if code in statuses}
    if len(final) == 1 and all(code in final or code in TEARDOWN_CODES for code in codes):
        return final.pop()
    return None


def _guard_restarts(claimed: Callable[[], bool]) -> None:
    """Make the agent give up instead of restarting workers that stopped on a user error."""
    try:
        from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    except Exception:  # noqa: BLE001 - without the guard a user error is merely retried
        return
    monitor = LocalElasticAgent._monitor_workers

    def monitor_workers(self: Any, worker_group: Any) -> Any:
        result = monitor(self, worker_group)
        try:
            if result.is_failed() and claimed():
                self._remaining_restarts = 0
        except Exception:  # noqa: BLE001 - keep torchrun's own decision
            pass
        return result

    LocalElasticAgent._monitor_workers = monitor_workers
