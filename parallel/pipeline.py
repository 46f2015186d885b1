"""Pipeline parallelism: stage cuts, the refusals DeepSpeed's pipeline engine needs, the engine.

    layers = [...]                                    # nn.Modules or TiedLayer, tuple in -> tuple out
    parts = stage_bounds(block_counts, num_layers)    # layer index where each stage starts (+ end)
    engine = build_pipeline_engine(layers, ds_config, parts=parts, pp=2, dp=1, loss_fn=...)
    loss = engine.train_batch(data_iter)              # 1F1B over gradient_accumulation_steps

A pipeline layer list is ``[first, blocks..., head layers...]``: the first layer (embedding)
always sits on stage 0, the layers after the last block (head) always on the last stage; a cut
only moves blocks. Everything DeepSpeed-specific (``deepspeed.pipe``) lives in
``parallel.deepspeed_bridge.initialize_pipeline``; this module is plain Python and torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

Partition = str | Sequence[int]


@dataclass
class TiedLayer:
    """A layer whose module is shared with other TiedLayers of the same ``key`` (across stages:
    DeepSpeed keeps one copy per stage, broadcasts it at start and sums the gradients of
    ``weight_attrs`` over the stages holding it).

    ``module`` is the one instance every occurrence uses; ``forward_fn(module, inputs)``
    replaces ``module(inputs)`` when given (the output head projecting with the embedding).
    """

    key: str
    module: nn.Module
    weight_attrs: tuple[str, ...]
    forward_fn: Callable[[nn.Module, Any], Any] | None = None


def uniform_counts(num_blocks: int, pp: int) -> list[int]:
    """Blocks per stage, as equal as possible (earlier stages take the remainder)."""
    base, extra = divmod(num_blocks, pp)
    return [base + (1 if stage < extra else 0) for stage in range(pp)]


def balanced_counts(weights: Sequence[int], pp: int) -> list[int]:
    """Blocks per stage for contiguous stages whose largest total weight is the smallest
    possible (exact, by dynamic programming over cut points; every stage gets >= 1 block)."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[s][i]: smallest max-stage weight putting the first i blocks on s stages
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0
    for s in range(1, pp + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    counts, end = [], n
    for s in range(pp, 0, -1):
        start = cut[s][end]
        counts.append(end - start)
        end = start
    return counts[::-1]


def block_counts(
    partition: Partition, num_blocks: int, pp: int, weights: Sequence[int] | None = None
) -> list[int]:
    """Blocks per stage for ``parallel.pp_partition``: ``uniform``, ``parameters`` (balanced
    ``weights``, one per block, the embedding's and head's added to the first and last) or
    an explicit list of block counts."""
    if pp > num_blocks:
        raise ValueError(
            f"parallel.pp ({pp}) exceeds model.num_layers ({num_blocks}); every stage needs a "
            "block: lower parallel.pp"
        )
    if isinstance(partition, str):
        if partition == "uniform":
            return uniform_counts(num_blocks, pp)
        if partition == "parameters":
            if weights is None or len(weights) != num_blocks:
                raise ValueError("partition 'parameters' needs one parameter count per block")
            return balanced_counts(weights, pp)
        raise ValueError(
            f"parallel.pp_partition '{partition}' is unknown; use uniform, parameters or a "
            "list of block counts per stage"
        )
    counts = [int(c) for c in partition]
    if len(counts) != pp or any(c < 1 for c in counts) or sum(counts) != num_blocks:
        raise ValueError(
            f"parallel.pp_partition {counts} must list {pp} block counts >= 1 summing to "
            f"model.num_layers ({num_blocks})"
        )
    return counts


def stage_bounds(counts: Sequence[int], num_layers: int) -> list[int]:
    """DeepSpeed's ``parts``: the layer index each stage starts at, then ``num_layers``. Layer
    0 (the embedding) joins stage 0; the layers after the blocks join the last stage."""
    bounds = [0]
    start = 1
    for count in counts[:-1]:
        start += count
        bounds.append(start)
    bounds.append(num_layers)
    return bounds


def check_pipeline_engine(pp: int, zero_stage: int) -> None:
    """Refuse what DeepSpeed 0.19's pipeline engine cannot train, in one line.

    ZeRO 0 with clipping is not refused: DeepSpeed's own ZeRO 0 clip norm counts only the
    first stage's parameters (its model-parallel group is pipe x tp), so the bridge clips
    with the exact global norm instead (``deepspeed_bridge.initialize_pipeline``).
    """
    if pp > 1 and zero_stage >= 2:
        raise ValueError(
            f"parallel.zero_stage ({zero_stage}) is refused with pipeline parallelism: "
            "DeepSpeed's pipeline engine supports ZeRO 0 and 1 only; set parallel.zero_stage 1"
        )


def check_stage_experts(moe_blocks_per_stage: Sequence[int], zero_stage: int) -> None:
    """Refuse, under ZeRO 1, a cut that leaves an MoE model's stage without MoE blocks.

    Measured on DeepSpeed 0.19.8 (gloo, 2 stages, blocks [1, 3] with MoE in block 1 and 3
    only): ZeRO 1 stops at engine build on the stage without experts ("The model has moe
    layers, but None of the param groups are marked as MoE", also with an empty ``moe``
    group added), and without the marker there it hangs in ``get_grad_norm_direct`` (the
    stages hold different numbers of optimizer groups). ZeRO 0 trains such a cut and equals
    one process, clipping included (the bridge clips by the exact global norm).
    """
    if zero_stage == 0 or not any(moe_blocks_per_stage) or all(moe_blocks_per_stage):
        return
    empty = [s for s, n in enumerate(moe_blocks_per_stage) if n == 0]
    raise ValueError(
        f"pipeline stages {empty} would hold no MoE block (MoE blocks per stage "
        f"{list(moe_blocks_per_stage)}); DeepSpeed's ZeRO {zero_stage} cannot train stages "
        "without experts next to stages with them (measured: it stops at engine build, or "
        "hangs in its gradient norm): change parallel.pp_partition or "
        "moe.every so every stage gets one, or use parallel.zero_stage 0"
    )


def check_same_groups(names_per_rank: Sequence[Sequence[str]]) -> None:
    """Refuse stages whose optimizer parameter-group sets differ (ZeRO 1 then hangs in its
    gradient norm: each rank all-reduces once per group over the model-parallel group)."""
    first = list(names_per_rank[0])
    for rank, names in enumerate(names_per_rank):
        if list(names) != first:
            raise ValueError(
                f"pipeline rank {rank} has optimizer groups {list(names)}, rank 0 has {first}; "
                "ZeRO 1 hangs unless every stage has the same groups: change "
                "parallel.pp_partition so each stage holds the same kinds of parameters"
            )


def build_pipeline_engine(
    layers: Sequence[nn.Module | TiedLayer],
    ds_config: dict[str, Any],
    *,
    parts: Sequence[int],
    pp: int,
    dp: int,
    tp: int = 1,
    loss_fn: Callable[[Any, Any], Any],
    num_experts_per_layer: Sequence[int] = (),
    moe_blocks_per_stage: Sequence[int] = (),
    ep_size: int = 1,
    weight_decay: float = 0.0,
    groups: Any = None,
) -> Any:
    """Check the cut and the engine options, then build DeepSpeed's pipeline engine over
    ``groups`` (the run's ``parallel.layout.ProcessGroups``).

    ``parts`` from ``stage_bounds``; ``num_experts_per_layer``: every MoE layer of the whole
    model (each stage gets the same MoE markers, so all stages create the same expert groups);
    ``moe_blocks_per_stage``: MoE blocks each stage holds (for the refusal above).
    """
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    check_pipeline_engine(pp, zero_stage)
    if num_experts_per_layer and moe_blocks_per_stage:
        check_stage_experts(moe_blocks_per_stage, zero_stage)
    from parallel import deepspeed_bridge as bridge

    return bridge.initialize_pipeline(
        list(layers),
        ds_config,
        parts=list(parts),
        pp=pp,
        dp=dp,
        tp=tp,
        loss_fn=loss_fn,
        num_experts_per_layer=list(num_experts_per_layer),
        ep_size=ep_size,
        weight_decay=weight_decay,
        groups=groups,
    )
