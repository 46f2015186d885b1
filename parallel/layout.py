"""The parallel layout: one object holds the degrees, validates them, builds the groups once.

    layout = ParallelLayout.from_world(world_size, ep=2)       # dp = world / (tp * pp)
    layout.check(world_size, num_experts=8)                     # one-line ValueError if wrong
    groups = layout.build()                                     # DeviceMesh axes ("edp", "ep")
    log.info(groups.report())                                   # rank 0 prints the groups

Convention (DESIGN.md "Parallel layout"): world = dp x tp x pp. Expert parallelism splits the
data-parallel ranks: ``ep`` divides ``dp`` and ``num_experts``; each expert lives on one rank
of every EP group and is replicated over the dp / ep ranks of its expert-data-parallel (EDP)
group, over which its gradients are averaged. A layout written "dp=2 x ep=2" on 4 ranks is
``ParallelLayout(dp=4, ep=2)``: EP groups {0, 1} and {2, 3}, EDP groups {0, 2} and {1, 3}.
EP groups are blocks of consecutive ranks, as DeepSpeed's
``groups._create_expert_and_data_parallel`` builds them by default, so moeforge's groups and
the engine's agree. tp and pp are reserved: they must be 1 until tensor and pipeline parallelism are built.

Validation is arithmetic only, done before any collective, so a wrong layout fails on every
rank with the same message and nothing hangs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

MESH_AXES = ("edp", "ep")


def divisors(value: int) -> list[int]:
    """Positive divisors of ``value`` in increasing order."""
    return [d for d in range(1, value + 1) if value % d == 0]


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of parallelism. dp is the data-parallel degree (ep splits it), world = dp*tp*pp."""

    dp: int
    ep: int = 1
    tp: int = 1
    pp: int = 1

    @classmethod
    def from_world(
        cls, world_size: int, *, ep: int = 1, tp: int = 1, pp: int = 1
    ) -> ParallelLayout:
        """The layout whose dp fills ``world_size`` (dp = world / (tp * pp), checked later)."""
        return cls(dp=max(world_size // max(tp * pp, 1), 1), ep=ep, tp=tp, pp=pp)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def edp(self) -> int:
        """Replicas of each expert: the size of an expert-data-parallel group."""
        return self.dp // self.ep

    def describe(self) -> str:
        return f"dp={self.dp} x tp={self.tp} x pp={self.pp} (ep={self.ep}, edp={self.edp})"

    def check(self, world_size: int, num_experts: int | None = None) -> None:
        """Raise a one-line ValueError naming every degree and the fix when the layout is wrong."""
        for name in ("dp", "ep", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.tp != 1 or self.pp != 1:
            raise ValueError(
                f"parallel.tp ({self.tp}) and parallel.pp ({self.pp}) must be 1: tensor and "
                "pipeline parallelism are not implemented yet"
            )
        if self.world_size != world_size:
            raise ValueError(
                f"parallel layout dp={self.dp} x tp={self.tp} x pp={self.pp} = {self.world_size} "
                f"does not match the world size {world_size}; launch {self.world_size} processes "
                f"or set dp to {world_size // (self.tp * self.pp) or 1}"
            )
        if self.dp % self.ep != 0:
            raise ValueError(
                f"parallel.ep ({self.ep}) must divide the data-parallel degree dp ({self.dp} = "
                f"world {world_size} / (tp {self.tp} x pp {self.pp})); choose ep in "
                f"{divisors(self.dp)}"
            )
        if num_experts is not None and num_experts % self.ep != 0:
            valid = [d for d in divisors(self.dp) if num_experts % d == 0]
            raise ValueError(
                f"parallel.ep ({self.ep}) must divide moe.num_experts ({num_experts}) "
                f"(dp={self.dp}); choose ep in {valid}"
            )

    def ep_group_ranks(self) -> list[list[int]]:
        """Global ranks of every EP group: blocks of ``ep`` consecutive ranks."""
        return [list(range(start, start + self.ep)) for start in range(0, self.dp, self.ep)]

    def edp_group_ranks(self) -> list[list[int]]:
        """Global ranks of every expert-data-parallel group: stride ``ep``."""
        return [list(range(offset, self.dp, self.ep)) for offset in range(self.ep)]

    def local_experts(self, num_experts: int, ep_rank: int) -> range:
        """Global ids of the experts held by EP rank ``ep_rank`` (a contiguous block)."""
        per_rank = num_experts // self.ep
        return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)

    def build(
        self, num_experts: int | None = None, device_type: str | None = None
    ) -> ProcessGroups:
        """Validate against the running world, then build the mesh axes ("edp", "ep") once.

        Collective over the default group: every rank must call it.
        """
        if not dist.is_initialized():
            raise RuntimeError("ParallelLayout.build needs torch.distributed initialised first")
        self.check(dist.get_world_size(), num_experts)
        from torch.distributed.device_mesh import init_device_mesh

        if device_type is None:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (self.edp, self.ep), mesh_dim_names=MESH_AXES)
        return ProcessGroups(layout=self, mesh=mesh, rank=dist.get_rank())


@dataclass(frozen=True)
class ProcessGroups:
    """The built groups of one rank: mesh axis "ep" (experts split) and "edp" (replicas)."""

    layout: ParallelLayout
    mesh: Any
    rank: int

    @property
    def ep_group(self) -> Any:
        return self.mesh.get_group("ep")

    @property
    def edp_group(self) -> Any:
        return self.mesh.get_group("edp")

    @property
    def ep_rank(self) -> int:
        return self.rank % self.layout.ep

    @property
    def ep_size(self) -> int:
        return self.layout.ep

    @property
    def ep_ranks(self) -> list[int]:
        return self.layout.ep_group_ranks()[self.rank // self.layout.ep]

    @property
    def edp_ranks(self) -> list[int]:
        return self.layout.edp_group_ranks()[self.rank % self.layout.ep]

    def report(self, num_experts: int | None = None) -> str:
        """The start-up report of the resolved groups (print it on rank 0)."""
        lines = [f"parallel layout {self.layout.describe()} on {self.layout.world_size} ranks"]
        lines.append(f"  expert-parallel groups: {self.layout.ep_group_ranks()}")
        lines.append(f"  expert-data-parallel groups: {self.layout.edp_group_ranks()}")
        if num_experts is not None:
            blocks = [
                f"ep_rank {r}: experts {self.layout.local_experts(num_experts, r).start}-"
                f"{self.layout.local_experts(num_experts, r).stop - 1}"
                for r in range(self.layout.ep)
            ]
            lines.append(f"  experts per EP rank: {'; '.join(blocks)}")
        return "\n".join(lines)
