"""The parallel layout: one object holds the degrees, validates them, builds the groups once.

    layout = ParallelLayout.from_world(world_size, tp=2, ep=2)  # dp = world / (tp * pp)
    layout.check(world_size, num_experts=8)                     # one-line ValueError if wrong
    groups = layout.build()                                     # meshes (pp, dp, tp), (pp, edp, ep)
    log.info(groups.report())                                   # rank 0 prints the groups
    engine = bridge.initialize(model, ds_config, groups=groups, ...)  # groups.mpu for DeepSpeed

Convention (DESIGN.md "Parallel layout"): world = pp x dp x tp and
``rank = (pp_i * dp + dp_i) * tp + tp_i``: TP innermost, PP outermost, the order of
DeepSpeed's ``PipeModelDataParallelTopology``. ``dp`` is the pure data-parallel degree.
Expert parallelism folds over the dp * tp ranks of one pipeline stage: EP groups are blocks of
``ep`` consecutive ranks inside a stage, expert-data-parallel (EDP) groups stride by ``ep``
inside a stage; so ``ep`` divides ``dp * tp`` and ``num_experts``, and each expert is
replicated over ``edp = dp * tp / ep`` ranks, over which its gradients are reduced. On 4
ranks "dp=2 x tp=2, ep=2" is ``ParallelLayout(dp=2, tp=2, ep=2)``: TP groups {0, 1} {2, 3},
DP groups {0, 2} {1, 3}, EP groups {0, 1} {2, 3}, EDP groups {0, 2} {1, 3}. With tp = pp = 1
the EP blocks are those of DeepSpeed's ``groups._create_expert_and_data_parallel``, so the
engine's expert groups and ours agree (the bridge asserts it). Under pipeline parallelism
each stage is its own dp x tp block with its own EP and EDP groups; the pipeline engine's
grid (``PipeModelDataParallelTopology``) numbers ranks the same way.

Validation is arithmetic only, done before any collective, so a wrong layout fails on every
rank with the same message and nothing hangs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch.distributed as dist

MESH_AXES = ("pp", "dp", "tp")
EXPERT_MESH_AXES = ("pp", "edp", "ep")
AXES = ("tp", "dp", "pp", "ep", "edp")
REPORT_ALL_GROUPS_UP_TO = 32  # ranks; larger worlds report the group count and rank 0's


def divisors(value: int) -> list[int]:
    """Positive divisors of ``value`` in increasing order."""
    return [d for d in range(1, value + 1) if value % d == 0]


class Coordinates(NamedTuple):
    """A rank's index along every axis (its rank inside each of its groups)."""

    pp: int
    dp: int
    tp: int
    edp: int
    ep: int


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of parallelism: world = pp * dp * tp; ep folds over the dp * tp ranks of a stage."""

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
        return self.pp * self.dp * self.tp

    @property
    def stage_size(self) -> int:
        """Ranks of one pipeline stage: dp * tp."""
        return self.dp * self.tp

    @property
    def edp(self) -> int:
        """Replicas of each expert: the size of an expert-data-parallel group."""
        return self.stage_size // self.ep

    def describe(self) -> str:
        """The layout in the issues' notation: "dp=2 x tp=2, ep=2" (degrees of 1 left out)."""
        parts = [f"dp={self.dp}"]
        parts += [
            f"{name}={getattr(self, name)}" for name in ("tp", "pp") if getattr(self, name) > 1
        ]
        text = " x ".join(parts)
        return f"{text}, ep={self.ep}" if self.ep > 1 else text

    def check(self, world_size: int, num_experts: int | None = None) -> None:
        """Raise a one-line ValueError naming the degrees and the fix when the layout is wrong."""
        for name in ("dp", "ep", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.world_size != world_size:
            model_parallel = self.tp * self.pp
            fix = (
                f"set dp to {world_size // model_parallel}"
                if world_size % model_parallel == 0
                else f"choose tp x pp dividing {world_size}"
            )
            raise ValueError(
                f"parallel layout dp={self.dp} x tp={self.tp} x pp={self.pp} = {self.world_size} "
                f"does not match the world size {world_size}; launch {self.world_size} "
                f"processes or {fix}"
            )
        if self.stage_size % self.ep != 0:
            raise ValueError(
                f"parallel.ep ({self.ep}) must divide the data-parallel degree times the "
                f"tensor-parallel degree, dp x tp = {self.dp} x {self.tp} = {self.stage_size} "
                f"(world {world_size} / pp {self.pp}); choose ep in {divisors(self.stage_size)}"
            )
        if num_experts is not None and num_experts % self.ep != 0:
            valid = [d for d in divisors(self.stage_size) if num_experts % d == 0]
            raise ValueError(
                f"parallel.ep ({self.ep}) must divide moe.num_experts ({num_experts}) "
                f"(dp x tp = {self.stage_size}); choose ep in {valid}"
            )

    # Group arithmetic --------------------------------------------------------------------

    def rank(self, pp: int, dp: int, tp: int) -> int:
        """Global rank at pipeline stage ``pp``, data-parallel index ``dp``, TP index ``tp``."""
        return (pp * self.dp + dp) * self.tp + tp

    def coordinates(self, rank: int) -> Coordinates:
        """``rank``'s index along pp, dp, tp, edp and ep."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the layout's world of {self.world_size}")
        stage, in_stage = divmod(rank, self.stage_size)
        dp, tp = divmod(in_stage, self.tp)
        edp, ep = divmod(in_stage, self.ep)
        return Coordinates(pp=stage, dp=dp, tp=tp, edp=edp, ep=ep)

    def tp_group_ranks(self) -> list[list[int]]:
        """Every TP group: ``tp`` consecutive ranks."""
        return [
            [self.rank(p, d, t) for t in range(self.tp)]
            for p in range(self.pp)
            for d in range(self.dp)
        ]

    def dp_group_ranks(self) -> list[list[int]]:
        """Every data-parallel group: one stage's ranks with the same TP index (stride tp)."""
        return [
            [self.rank(p, d, t) for d in range(self.dp)]
            for p in range(self.pp)
            for t in range(self.tp)
        ]

    def pp_group_ranks(self) -> list[list[int]]:
        """Every pipeline group: the ranks with the same (dp, tp) index, one per stage."""
        return [
            [self.rank(p, d, t) for p in range(self.pp)]
            for d in range(self.dp)
            for t in range(self.tp)
        ]

    def ep_group_ranks(self) -> list[list[int]]:
        """Every EP group: blocks of ``ep`` consecutive ranks inside a stage."""
        return [
            list(range(start, start + self.ep))
            for stage in range(self.pp)
            for start in range(stage * self.stage_size, (stage + 1) * self.stage_size, self.ep)
        ]

    def edp_group_ranks(self) -> list[list[int]]:
        """Every expert-data-parallel group: stride ``ep`` inside a stage."""
        return [
            list(range(stage * self.stage_size + offset, (stage + 1) * self.stage_size, self.ep))
            for stage in range(self.pp)
            for offset in range(self.ep)
        ]

    def group_ranks(self, axis: str) -> list[list[int]]:
        """Every group along ``axis`` (one of tp, dp, pp, ep, edp)."""
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        return getattr(self, f"{axis}_group_ranks")()

    def ranks_of(self, axis: str, rank: int) -> list[int]:
        """The members of ``rank``'s group along ``axis``."""
        return next(group for group in self.group_ranks(axis) if rank in group)

    def local_experts(self, num_experts: int, ep_rank: int) -> range:
        """Global ids of the experts held by EP rank ``ep_rank`` (a contiguous block)."""
        per_rank = num_experts // self.ep
        return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)

    def build(
        self, num_experts: int | None = None, device_type: str | None = None
    ) -> ProcessGroups:
        """Validate against the running world, then build every group once.

        Two DeviceMeshes over the same ranks in the same order: (pp, dp, tp) for the dense
        axes and (pp, edp, ep) for the expert axes. Collective over the default group: every
        rank must call it, and every rank creates every group in the same order.
        """
        if not dist.is_initialized():
            raise RuntimeError("ParallelLayout.build needs torch.distributed initialised first")
        self.check(dist.get_world_size(), num_experts)
        from torch.distributed.device_mesh import init_device_mesh

        if device_type is None:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=MESH_AXES)
        expert_mesh = init_device_mesh(
            device_type, (self.pp, self.edp, self.ep), mesh_dim_names=EXPERT_MESH_AXES
        )
        return ProcessGroups(layout=self, mesh=mesh, rank=dist.get_rank(), expert_mesh=expert_mesh)


@dataclass(frozen=True)
class ProcessGroups:
    """The built groups of one rank.

    For each axis x of tp, dp, pp, ep, edp: ``x_group`` (the process group; None in a
    mesh-free stand-in), ``x_rank`` and ``x_size`` (this rank's place in it), ``x_ranks``
    (its members, global ranks). ``mpu`` adapts them to DeepSpeed's model-parallel unit.
    """

    layout: ParallelLayout
    mesh: Any  # axes MESH_AXES; None for a stand-in that exchanges nothing
    rank: int
    expert_mesh: Any = None  # axes EXPERT_MESH_AXES

    def _group(self, axis: str) -> Any:
        mesh = self.expert_mesh if axis in ("ep", "edp") else self.mesh
        return None if mesh is None else mesh.get_group(axis)

    @property
    def coordinates(self) -> Coordinates:
        return self.layout.coordinates(self.rank)

    # tp
    @property
    def tp_group(self) -> Any:
        return self._group("tp")

    @property
    def tp_rank(self) -> int:
        return self.coordinates.tp

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def tp_ranks(self) -> list[int]:
        return self.layout.ranks_of("tp", self.rank)

    # dp
    @property
    def dp_group(self) -> Any:
        return self._group("dp")

    @property
    def dp_rank(self) -> int:
        return self.coordinates.dp

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def dp_ranks(self) -> list[int]:
        return self.layout.ranks_of("dp", self.rank)

    # pp
    @property
    def pp_group(self) -> Any:
        return self._group("pp")

    @property
    def pp_rank(self) -> int:
        return self.coordinates.pp

    @property
    def pp_size(self) -> int:
        return self.layout.pp

    @property
    def pp_ranks(self) -> list[int]:
        return self.layout.ranks_of("pp", self.rank)

    # ep
    @property
    def ep_group(self) -> Any:
        return self._group("ep")

    @property
    def ep_rank(self) -> int:
        return self.coordinates.ep

    @property
    def ep_size(self) -> int:
        return self.layout.ep

    @property
    def ep_ranks(self) -> list[int]:
        return self.layout.ranks_of("ep", self.rank)

    # edp
    @property
    def edp_group(self) -> Any:
        return self._group("edp")

    @property
    def edp_rank(self) -> int:
        return self.coordinates.edp

    @property
    def edp_size(self) -> int:
        return self.layout.edp

    @property
    def edp_ranks(self) -> list[int]:
        return self.layout.ranks_of("edp", self.rank)

    @property
    def mpu(self) -> ModelParallelUnit:
        """The model-parallel unit DeepSpeed takes as ``deepspeed.initialize(mpu=...)``."""
        return ModelParallelUnit(self)

    def report(self, num_experts: int | None = None) -> str:
        """The start-up report of the resolved groups (print it on rank 0)."""
        layout = self.layout
        lines = [f"parallel layout {layout.describe()} on {layout.world_size} ranks"]
        names = {
            "tp": "tensor-parallel",
            "dp": "data-parallel",
            "ep": "expert-parallel",
            "edp": "expert-data-parallel",
            "pp": "pipeline-parallel",
        }
        for axis, name in names.items():
            every = layout.group_ranks(axis)
            # Every group while the list stays readable; beyond that their number only.
            shown = every if layout.world_size <= REPORT_ALL_GROUPS_UP_TO else f"{len(every)}"
            lines.append(
                f"  {name} groups: {shown} (rank {self.rank}: {layout.ranks_of(axis, self.rank)})"
            )
        if num_experts is not None:
            blocks = []
            for r in range(layout.ep):
                experts = layout.local_experts(num_experts, r)
                blocks.append(f"ep_rank {r}: experts {experts.start}-{experts.stop - 1}")
            lines.append(f"  experts per EP rank: {'; '.join(blocks)}")
        return "\n".join(lines)


class ModelParallelUnit:
    """DeepSpeed's ``mpu`` from our groups, for an engine without a PipelineModule.

    What deepspeed 0.19 reads (``runtime/engine.py``, ``utils/groups.py``, ``utils/bwc.py``,
    ``runtime/utils.py``, ZeRO 1/2): the data-parallel group (dense gradient averaging, ZeRO
    partitions, the data sampler), the model-parallel group (where gradient norms are
    summed; here the TP group, pp being 1), the tensor-parallel group and the pipeline size
    (which DeepSpeed's own expert-group builder reads). No sequence-parallel methods: the
    engine would then divide its data-parallel size by theirs.
    """

    def __init__(self, groups: ProcessGroups) -> None:
        self.groups = groups

    def get_data_parallel_rank(self) -> int:
        return self.groups.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.groups.dp_size

    def get_data_parallel_group(self) -> Any:
        return self.groups.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.groups.dp_ranks

    def get_model_parallel_rank(self) -> int:
        return self.groups.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.groups.tp_size

    def get_model_parallel_group(self) -> Any:
        return self.groups.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.groups.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.groups.tp_size

    def get_tensor_model_parallel_group(self) -> Any:
        return self.groups.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.groups.tp_ranks[0]

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.groups.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.groups.pp_size

    def get_pipeline_model_parallel_group(self) -> Any:
        return self.groups.pp_group
