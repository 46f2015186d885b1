"""Join this process to the run's default process group, bounded by one timeout.

    place = join("gloo", timedelta(seconds=300))   # RANK, WORLD_SIZE, MASTER_ADDR/PORT from env
    bound_group_timeouts(timedelta(seconds=300))   # after every group exists (engine built)

Two things ``init_process_group(init_method="env://")`` gets wrong for us:

- **Restarts under torchrun.** torchrun's agent hosts the TCP store at MASTER_PORT and keeps
  that same store for every restart of the worker group (torch 2.13 shares the rendezvous
  store with the workers and reuses its server across rounds, for static and c10d
  rendezvous). The keys gloo writes while connecting (each rank's address) are still there
  when the restarted workers connect, so a rank reads a dead peer's address and
  ``connectFullMesh`` fails with "Connection refused" (or, by luck of timing, works).
  ``TORCHELASTIC_RESTART_COUNT`` cannot name the attempt: each node's agent counts only the
  restarts it caused, so nodes disagree. Here rank 0 takes a fresh generation number from a
  counter in the store and hands it to every other rank through a key named by a nonce that
  rank made up, a name no earlier attempt can have written; the default group then lives
  under that generation's prefix. Without torchrun's agent store (mpirun, the deepspeed
  launcher, one process), rank 0 hosts a new store per run and none of this is needed.
- **Timeouts of derived groups.** ``new_group`` without a timeout takes torch's global
  default (30 minutes for gloo), not the default group's: DeepSpeed's data- and
  expert-parallel groups and DeviceMesh sub-groups would wait half an hour on a frozen
  peer. ``bound_group_timeouts`` sets the run's timeout on every group once they exist.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from parallel.collectives import CollectiveError

PREFIX = "moeforge/rendezvous"
# How long any rank waits for a peer (rendezvous, every collective) before the run ends with an
# error: parallel.timeout_s. Long enough for the longest legitimate wait at a collective (rank 0
# tokenising a corpus or writing a large checkpoint while the others wait at a barrier; NCCL's
# first-call setup), short enough that a frozen rank costs minutes, not torch's 30 minutes.
DEFAULT_TIMEOUT_SECONDS = 300.0
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class StorePlace:
    """Where this run's keys live: the TCP store's address and the key prefix of this start
    of the worker group (another client can open the same keys, e.g. with a short timeout)."""

    host: str
    port: int
    prefix: str

    def open(self, timeout: timedelta) -> dist.Store:
        """A new client connection to these keys whose operations give up after ``timeout``."""
        client = dist.TCPStore(self.host, self.port, is_master=False, timeout=timeout)
        return dist.PrefixStore(self.prefix, client)


def under_torchelastic_agent_store() -> bool:
    """Whether torchrun's agent hosts the store at MASTER_ADDR:MASTER_PORT for the workers."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"


def _generation(store: dist.Store, rank: int, world_size: int, timeout: timedelta) -> int:
    """A number every rank of this worker-group start agrees on and no earlier start used.

    Rank 0 draws it from a counter (``add`` is atomic and never repeats a value). Every other
    rank publishes a fresh nonce under its rank and waits for the answer under that nonce;
    rank 0 answers whatever nonce it finds under each rank until that rank confirms under the
    new generation, so a nonce left by a dead process of an earlier start is answered too
    (nobody reads that answer) and then replaced by the live process's own.
    """
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"{PREFIX}/hello/{rank}", nonce)
        store.wait([f"{PREFIX}/answer/{nonce}"], timeout)
        generation = int(store.get(f"{PREFIX}/answer/{nonce}"))
        store.set(f"{PREFIX}/{generation}/joined/{rank}", "1")
        return generation
    generation = store.add(f"{PREFIX}/generation", 1)
    waiting = set(range(1, world_size))
    answered: dict[int, str] = {}  # the nonce last answered per rank: each is answered once
    deadline = time.monotonic() + timeout.total_seconds()
    while waiting:
        for peer in sorted(waiting):
            if store.check([f"{PREFIX}/{generation}/joined/{peer}"]):
                waiting.discard(peer)
            elif store.check([f"{PREFIX}/hello/{peer}"]):
                nonce = store.get(f"{PREFIX}/hello/{peer}").decode()
                if answered.get(peer) != nonce:
                    store.set(f"{PREFIX}/answer/{nonce}", str(generation))
                    answered[peer] = nonce
        if waiting and time.monotonic() > deadline:
            raise CollectiveError(
                f"rendezvous: ranks {sorted(waiting)} did not join within "
                f"{timeout.total_seconds():.0f}s (parallel.timeout_s)"
            )
        if waiting:
            time.sleep(POLL_SECONDS)
    return generation


def select_device(backend: str) -> torch.device | None:
    """Bind this process to its GPU before the process group exists: ``cuda:LOCAL_RANK``
    (launch/launcher.py fills LOCAL_RANK under torchrun, the deepspeed launcher and mpirun).

    NCCL creates each communicator on the current device, so a rank left on device 0 would
    put every local rank's communicator (and DeepSpeed, which reads LOCAL_RANK too, would
    put its tensors) on different GPUs. None without CUDA or with gloo on CPU tensors.
    """
    if not torch.cuda.is_available():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if not 0 <= local_rank < count:
        raise ValueError(
            f"LOCAL_RANK ({local_rank}) has no GPU: this process sees {count} "
            "(CUDA_VISIBLE_DEVICES); start at most that many processes per node"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank) if backend == "nccl" else None


def join(backend: str, timeout: timedelta) -> StorePlace:
    """Initialise the default process group from the environment with ``timeout``; returns
    where its store is, with a key prefix private to this start of the run's processes.

    Reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (launch/launcher.py fills them for
    every launcher). ``timeout`` bounds the rendezvous and every collective of the group.
    On CUDA the process is bound to ``cuda:LOCAL_RANK`` first (``select_device``), and NCCL
    is told that device (``device_id``) rather than guessing it from the global rank.
    """
    device = select_device(backend)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = under_torchelastic_agent_store()
    tcp_store = dist.TCPStore(
        host,
        port,
        world_size,
        is_master=rank == 0 and not agent_store,
        timeout=timeout,
        wait_for_workers=False,
        multi_tenant=not agent_store,
    )
    prefix = PREFIX
    if agent_store:
        prefix = f"{PREFIX}/{_generation(tcp_store, rank, world_size, timeout)}"
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(prefix, tcp_store),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        **({} if device is None else {"device_id": device}),
    )
    return StorePlace(host, port, f"{prefix}/run")


def bound_group_timeouts(timeout: timedelta) -> int:
    """Give every process group of this process ``timeout``; returns how many there are.

    Groups made with ``new_group`` and no timeout (DeepSpeed's, DeviceMesh's) otherwise wait
    torch's global default (30 minutes on gloo) instead of the default group's timeout.
    """
    groups = [
        group
        for group in list(distributed_c10d._world.pg_map)
        if not distributed_c10d._rank_not_in_group(group)
    ]
    for group in groups:
        distributed_c10d._set_pg_timeout(timeout, group)
    return len(groups)


def group_timeout(group: dist.ProcessGroup | None = None) -> timedelta:
    """The timeout ``group``'s CPU backend applies to its collectives (for checks and tests)."""
    group = distributed_c10d._get_default_group() if group is None else group
    return group._get_backend(distributed_c10d.torch.device("cpu")).options._timeout
