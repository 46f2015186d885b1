"""One rank-aware logger: rank 0 prints, other ranks stay quiet unless asked.

from launch.log import get_logger, rank
log = get_logger()
log.info("world size %d", world)            # printed once, by rank 0
log.info("rank %d ready", r, extra=ALL)     # printed by every rank
"""

from __future__ import annotations

import logging
import os
import sys

ALL = {"all_ranks": True}
_NAME = "moeforge"


def rank() -> int:
    """This process's global rank (from torch.distributed, else RANK / OMPI / PMI env)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def print_user_error(message: str) -> None:
    """Print ``moeforge: error: MESSAGE`` once across ranks: every rank meets the same bad
    input. Under torchrun the first rank to fail prints it (torchrun may stop rank 0 before
    it could; launch/torchrun_plugin.py); elsewhere rank 0 does."""
    from launch.torchrun_plugin import report_user_error

    first = report_user_error()
    if first or (first is None and rank() == 0):
        print(f"moeforge: error: {message}", file=sys.stderr)


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return rank() == 0 or bool(getattr(record, "all_ranks", False))


def get_logger() -> logging.Logger:
    """The moeforge logger (stderr, short format, rank 0 only by default)."""
    logger = logging.getLogger(_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[moeforge] %(message)s"))
        handler.addFilter(_RankFilter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def quiet_deepspeed() -> None:
    """Keep DeepSpeed's own INFO chatter out of the console (warnings still show)."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass
