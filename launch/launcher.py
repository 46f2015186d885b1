"""Find rank, world size and the rendezvous address, whoever started the process.

The same entry point runs under:

    torchrun --nproc_per_node=2 -m launch.cli train            # sets RANK, WORLD_SIZE, ...
    deepspeed --num_gpus=2 launch/cli.py train                  # same variables (+ --local_rank)
    mpirun -n 2 moeforge train                                  # OMPI_/PMI_ variables; mpi4py
    moeforge train                                              # one process

Many nodes (docs/multinode.md has the full command lines and what restarts do):

    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d \
        --rdzv-endpoint=NODE1:29400 --rdzv-id=JOB --max-restarts=3 -m launch.cli train ...
    deepspeed --hostfile=hostfile --master_addr=NODE1 launch/cli.py train ...
    mpirun -n 16 -ppn 8 -hosts node1,node2 -genv MOEFORGE_HOST_ADDR NODE1 moeforge train ...

Under mpirun, mpi4py gives rank and world size, and rank 0's address and a free port are
broadcast to every rank as the rendezvous (MASTER_ADDR / MASTER_PORT), so torch.distributed
then initialises from the environment like under torchrun.
"""

from __future__ import annotations

import os
import socket

MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")
# Where job starters other than torchrun and the deepspeed launcher put the rank on this node.
LOCAL_RANK_VARIABLES = (
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "MV2_COMM_WORLD_LOCAL_RANK",
    "SLURM_LOCALID",
)


def free_port() -> int:
    """A TCP port that was free a moment ago on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def host_address() -> str:
    """An address other hosts can reach this one at: MOEFORGE_HOST_ADDR if set, else the
    address this host's name resolves to (falls back to loopback for one-node runs)."""
    explicit = os.environ.get("MOEFORGE_HOST_ADDR")
    if explicit:
        return explicit
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def discover_environment() -> str:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; returns the launcher name.

    LOCAL_RANK picks this process's GPU (parallel/rendezvous.py ``select_device``): torchrun
    and the deepspeed launcher set it, under mpirun it is this rank's index among the ranks
    on its host; a starter that sets RANK and WORLD_SIZE only gets its own local-rank
    variable (``LOCAL_RANK_VARIABLES``), else 0.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if "LOCAL_RANK" not in os.environ:
            found = (os.environ[key] for key in LOCAL_RANK_VARIABLES if key in os.environ)
            os.environ["LOCAL_RANK"] = next(found, "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        return (
            "deepspeed"
            if "DEEPSPEED_LAUNCHER" in os.environ or "CROSS_RANK" in os.environ
            else "torchrun"
        )
    if any(key in os.environ for key in MPI_SIZE_VARIABLES):
        try:
            from mpi4py import MPI
        except ImportError as err:
            raise ImportError(
                "running under mpirun needs mpi4py: pip install 'moeforge[mpi]'"
            ) from err
        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        address = (host_address(), free_port()) if rank == 0 else None
        master_addr, master_port = comm.bcast(address, root=0)
        host = MPI.Get_processor_name()
        local_rank = sum(name == host for name in comm.allgather(host)[:rank])
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(size),
            LOCAL_RANK=str(local_rank),
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        return "mpirun"
    os.environ.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    return "single process"
