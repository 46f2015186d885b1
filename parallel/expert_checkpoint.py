"""Checkpoints independent of the layout: full weights and Adam moments, experts by global id.

Shape letters: E experts, E_l = E / ep experts held by one EP rank; n the full size of a
tensor-parallel parameter along its ``partition_dim``, n / tp the size one TP rank holds.

    save_portable(engine, model, groups, path)      # every rank calls; rank 0 writes one file
    load_portable(engine, model, groups, path)      # any tp, ep, pp (and ZeRO 0, 1 or 2) that fit
    portable_info(path)                             # the layout and step it was saved with
    engine_files_are_layout_free(engine, groups)    # True: portable.pt would duplicate them
    load_engine_files(engine, model, groups, dir)   # the same, from such a checkpoint's files

A DeepSpeed checkpoint stores each rank's module and optimizer partitions, shaped by the
layout: a run saved at ep=4 holds [E/4, ...] expert blocks and cannot be loaded strictly at
ep=2, nor one saved at tp=2 (weights [n / 2, ...]) at tp=1. This file stores what does not
depend on the layout: every parameter in full under the name the tp=1 model gives it, its
Adam moments ``exp_avg`` and ``exp_avg_sq`` likewise, and the Adam step. Expert tensors are
gathered over the EP group into [E, ...], rows in global expert order; a tensor-parallel
shard (tagged ``tensor_model_parallel`` by parallel/tensor_parallel.py, split along its
``partition_dim``) is gathered over the TP group and concatenated along that dim in TP-rank
order. Experts are never split over TP (expert TP is 1), so an expert weight is only
EP-gathered even if tagged model-parallel for the gradient norm. Every other parameter is
replicated over TP and is written as global rank 0 (TP rank 0) holds it. Loading slices
each rank's expert block and TP shard back out. (DeepSpeed's own expert files need one
module per expert, ``deepspeed_moe.experts.deepspeed_experts.<i>``, which stacked
[E, d, f] weights do not have: DESIGN.md, "DeepSpeed contracts".)

How the values are read (deepspeed 0.19, through parallel/deepspeed_bridge.py): under
ZeRO 1/2 a parameter has a partitioned master (``has_partitioned_master``, contract 11) that
``read_partitioned_master`` / ``write_partitioned_master`` assemble / scatter, fp32 weight
(key None) or an optimizer state, over the parameter's data-parallel group (for experts:
the expert-data-parallel group), collectively; ``link_optimizer_state`` (contract 6) makes
the moments of every parameter group reachable that way first.
Under ZeRO 0 the engine's optimizer is torch's AdamW itself and its ``state[param]`` holds
the moments. With classic bf16/fp16 at ZeRO 0, DeepSpeed's wrapper keeps separate fp32
masters, and the Adam state is keyed by them (``fp32_master_slots``, contract 8): masters
and moments are read and written there, never from the rounded bf16 parameters.
Parameters are visited in the same order on every rank, so the collectives match: per
parameter, the data-parallel assembly first, then the EP or TP gather.

Pipeline parallelism: DeepSpeed's pipeline engine writes each stage's module state from its
data-parallel rank 0 only (layer files; with MoE layers one ``mp_rank_<stage>`` file), so
the experts of every other EP rank would be lost. Here ``model`` is the
whole Transformer, whose modules the stages reuse; a rank reads and writes only the
parameters its engine holds (``held_parameters``), gathers them within its stage as above,
and the first rank of each stage sends them to rank 0 (``_merge_stages``), so the file has
every parameter under the Transformer's names whatever the cut, and loads at any pp.

At ep=1, tp=1, pp=1 and ZeRO 0 with fp32 parameters the engine's own files already hold all
of this (the module's and the torch optimizer's state dicts, complete, by rank 0), so the
checkpoint writes no portable file and an ep change reads the engine's files
(``load_engine_files``): the checkpoint is then the engine's files alone, not twice that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from parallel.collectives import all_gather_tensor
from parallel.deepspeed_bridge import (
    base_optimizer,
    fp32_master_slots,
    has_partitioned_master,
    link_optimizer_state,
    read_partitioned_master,
    write_partitioned_master,
)
from parallel.layout import ProcessGroups
from parallel.markers import is_expert

MOMENTS = ("exp_avg", "exp_avg_sq")
FORMAT_VERSION = 1


def tensor_parallel_dim(param: nn.Parameter) -> int | None:
    """The dim along which ``param`` is split over the TP group; None when it is replicated
    over TP (untagged) or an expert weight (expert TP is 1: experts are split over EP only)."""
    if is_expert(param) or not getattr(param, "tensor_model_parallel", False):
        return None
    return int(getattr(param, "partition_dim", 0))


def partition_stride(param: nn.Parameter) -> int:
    """How many strided blocks a TP shard holds (Megatron's ``partition_stride``): with stride
    s the full tensor, cut into s * tp equal blocks along the partition dim, gives TP rank r
    the blocks r, tp + r, ..., (s - 1) * tp + r, in that order (fused q/k/v, swiglu's gate and
    up: each rank holds the matching rows of every part)."""
    stride = int(getattr(param, "partition_stride", 1))
    if stride < 1 or param.shape[tensor_parallel_dim(param) or 0] % stride != 0:
        raise ValueError(
            f"a tensor-parallel parameter of shape {tuple(param.shape)} has partition_stride "
            f"{stride}, which does not divide its partition dim"
        )
    return stride


def _join_shards(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Every TP rank's shard (in rank order) -> the full tensor along ``dim``."""
    parts = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([part[j] for j in range(stride) for part in parts], dim=dim)


def _cut_shard(full: torch.Tensor, dim: int, stride: int, tp: int, rank: int) -> torch.Tensor:
    """TP rank ``rank``'s shard of the full tensor (the inverse of ``_join_shards``)."""
    blocks = full.chunk(stride * tp, dim=dim)
    return torch.cat([blocks[j * tp + rank] for j in range(stride)], dim=dim)


def held_parameters(engine: Any, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of ``model`` that this rank's engine trains, in ``model``'s order.

    Under pipeline parallelism ``model`` is the whole Transformer, but a stage's engine holds
    only its own blocks (and the tied embedding on the first and last stage): the other
    stages' parameters exist here untrained and must be neither written nor overwritten.
    Every rank of a stage holds the same set, so their collectives match.
    """
    module = getattr(engine, "module", None)
    if module is None or module is model:
        return list(model.named_parameters())
    held = {id(p) for p in module.parameters()}
    return [(name, p) for name, p in model.named_parameters() if id(p) in held]


def _check_model(engine: Any, model: nn.Module, groups: ProcessGroups) -> None:
    """At pp > 1 the file's names are ``model``'s: it must be the Transformer, not the stage."""
    if groups.pp_size > 1 and model is getattr(engine, "module", None):
        raise ValueError(
            f"portable checkpoints at parallel.pp ({groups.pp_size}) > 1 name parameters as the "
            "whole model does: pass the Transformer (model=...), not the pipeline stage"
        )


def _first_rank_of_stage(groups: ProcessGroups) -> bool:
    """Whether this rank (dp 0, tp 0 of its stage) sends its stage's tensors to rank 0."""
    return groups.dp_rank == 0 and groups.tp_rank == 0


def _merge_stages(
    tensors: dict[str, dict[str, torch.Tensor]], groups: ProcessGroups
) -> dict[str, dict[str, torch.Tensor]]:
    """Every stage's full tensors on global rank 0 (collective over the first ranks of the
    stages; a parameter on several stages, the tied embedding, is kept once: DeepSpeed sums
    its gradient over those stages, so every copy holds the same values)."""
    if groups.pp_size == 1:
        return tensors
    if not _first_rank_of_stage(groups):
        return {}
    writer = dist.get_rank() == 0
    stages: list[Any] | None = [None] * groups.pp_size if writer else None
    dist.gather_object(tensors, stages, dst=groups.pp_ranks[0], group=groups.pp_group)
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for stage in stages or []:
        for name, entry in stage.items():
            merged.setdefault(name, entry)
    return merged


def _ensure_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create zero Adam state where torch has not yet (it initialises lazily at step 1)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if not state:
                state["step"] = torch.tensor(0.0)
                for key in MOMENTS:
                    state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)


def adam_step(engine: Any) -> float:
    """The Adam step count (every parameter shares it)."""
    for state in base_optimizer(engine).state.values():
        if "step" in state:
            return float(state["step"])
    return 0.0


Slots = dict[nn.Parameter, tuple[torch.Tensor, int]]


def _master_slice(
    param: nn.Parameter, key: str | None, optimizer: torch.optim.Optimizer, slots: Slots
) -> torch.Tensor | None:
    """``param``'s view into its fp32 master (key None) or that master's Adam moment, where
    the engine keeps separate masters (classic bf16/fp16 without ZeRO, bridge contract 8)."""
    flat, offset = slots[param]
    source = flat if key is None else optimizer.state.get(flat, {}).get(key)
    if source is None:
        return None
    return source.detach().view(-1)[offset : offset + param.numel()].view(param.shape)


def _read(
    param: nn.Parameter, key: str | None, optimizer: torch.optim.Optimizer, slots: Slots
) -> torch.Tensor:
    """Full fp32 weight (key None) or Adam moment of ``param`` on this rank (collective under
    ZeRO 1/2, over the parameter's data-parallel group)."""
    if has_partitioned_master(param):
        return read_partitioned_master(param, key).detach().float().clone()
    if param in slots:
        value = _master_slice(param, key, optimizer, slots)
        return torch.zeros_like(param, dtype=torch.float32) if value is None else value.clone()
    if key is None:
        return param.detach().float().clone()
    state = optimizer.state.get(param, {})
    if key not in state:
        return torch.zeros_like(param, dtype=torch.float32)
    return state[key].detach().float().clone()


def _write(
    param: nn.Parameter,
    key: str | None,
    value: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    slots: Slots,
) -> None:
    value = value.to(param.device)
    if param in slots:
        with torch.no_grad():
            _master_slice(param, key, optimizer, slots).copy_(value)
            if key is None:
                param.copy_(value.to(param.dtype))
        return
    if has_partitioned_master(param):
        write_partitioned_master(param, value, key)
        if key is None:
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
        return
    if key is None:
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        return
    optimizer.state[param][key] = value.to(param.dtype).clone()


def _gather_full(
    param: nn.Parameter, entry: dict[str, torch.Tensor], groups: ProcessGroups
) -> dict[str, torch.Tensor]:
    """This rank's pieces of one parameter -> the full tensors: experts [E_l, ...] gathered
    over EP into [E, ...]; a TP shard [.., n / tp, ..] gathered over TP and concatenated
    along its partition dim into [.., n, ..]; anything else as it is. Collective."""
    if is_expert(param):
        if groups.ep_size == 1:
            return entry
        return {k: all_gather_tensor(v, groups.ep_group).flatten(0, 1) for k, v in entry.items()}
    dim = tensor_parallel_dim(param)
    if dim is None or groups.tp_size == 1:
        return entry
    stride = partition_stride(param)
    return {
        k: _join_shards(list(all_gather_tensor(v, groups.tp_group).unbind(0)), dim, stride)
        for k, v in entry.items()
    }


def _local_piece(
    name: str, param: nn.Parameter, value: torch.Tensor, groups: ProcessGroups
) -> torch.Tensor:
    """The part of a full saved tensor this rank holds: its expert block or its TP shard."""
    if is_expert(param):
        local = param.shape[0]
        if value.shape[0] % local != 0 or value.shape[0] // local != groups.ep_size:
            raise ValueError(
                f"{name}: checkpoint holds {value.shape[0]} experts, this rank {local} "
                f"at ep={groups.ep_size}; moe.num_experts must match the saved run"
            )
        return value[groups.ep_rank * local : (groups.ep_rank + 1) * local]
    dim = tensor_parallel_dim(param)
    if dim is None or value.dim() != param.dim():
        return value
    width = param.shape[dim]
    if value.shape[dim] != width * groups.tp_size:
        raise ValueError(
            f"{name}: saved size {value.shape[dim]} along dim {dim} is not tp "
            f"({groups.tp_size}) x this rank's shard {width}; the model's sizes must match "
            "the saved run's"
        )
    return _cut_shard(value, dim, partition_stride(param), groups.tp_size, groups.tp_rank)


def save_portable(engine: Any, model: nn.Module, groups: ProcessGroups, path: Path) -> None:
    """Write weights, Adam moments and step, layout-free, to ``path`` (rank 0 writes).

    Collective: every rank calls it. ``model`` names the parameters (at pp > 1 the whole
    Transformer: each stage reads the parameters its engine holds, gathers them over TP and
    EP, and the first rank of each stage sends them to rank 0, which writes one file with
    all of them). The file records the layout it was saved at (dp, tp, ep, pp and the world
    size), for ``portable_info``; loading does not need it.
    """
    _check_model(engine, model, groups)
    optimizer = base_optimizer(engine)
    link_optimizer_state(engine)
    slots = fp32_master_slots(engine)
    writer = dist.get_rank() == 0
    keeps = _first_rank_of_stage(groups)  # the others only take part in the gathers
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in held_parameters(engine, model):
        entry = {key or "weight": _read(param, key, optimizer, slots) for key in (None, *MOMENTS)}
        entry = _gather_full(param, entry, groups)
        if keeps:
            tensors[name] = entry
    tensors = _merge_stages(tensors, groups)
    names = [name for name, _ in model.named_parameters()]
    missing = [name for name in names if name not in tensors] if writer else []
    tensors = {name: tensors[name] for name in names if name in tensors}  # the model's order
    layout = groups.layout
    meta = {
        "format": FORMAT_VERSION,
        "layout": {"dp": layout.dp, "ep": layout.ep, "tp": layout.tp, "pp": layout.pp},
        "world_size": layout.world_size,
        "adam_step": adam_step(engine),
        "zero_stage": int(getattr(engine, "zero_optimization_stage", lambda: 0)()),
    }
    if writer and not missing:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"meta": meta, "tensors": tensors}, tmp)
        tmp.replace(path)  # atomic
        path.with_suffix(".json").write_text(json.dumps(meta))
    dist.barrier()
    if missing:  # after the barrier, so the other ranks are not left waiting in it
        raise RuntimeError(
            f"no pipeline stage holds parameters {missing[:5]} of the model: the engine was "
            "not built from this model"
        )


def load_portable(engine: Any, model: nn.Module, groups: ProcessGroups, path: Path) -> dict:
    """Load what ``save_portable`` wrote into this layout; returns the saved metadata."""
    saved = torch.load(Path(path), map_location="cpu", weights_only=False)
    _load_tensors(engine, model, groups, saved, Path(path))
    return saved["meta"]


def engine_files_are_layout_free(engine: Any, groups: ProcessGroups) -> bool:
    """Whether the engine's own checkpoint files hold every full weight and Adam moment by
    name, so that ``portable.pt`` would only duplicate them.

    True at ep=1 (no expert blocks), tp=1 (no TP shards), pp=1 and ZeRO 0 with the torch
    optimizer itself (no DeepSpeed wrapper keeping separate fp32 masters, bridge contract 8):
    the engine then saves the module's state dict and the optimizer's, both complete on rank 0.
    """
    layout = groups.layout
    if (layout.ep, layout.tp, layout.pp) != (1, 1, 1):
        return False
    stage = int(getattr(engine, "zero_optimization_stage", lambda: 0)())
    optimizer = getattr(engine, "optimizer", None)
    if stage != 0 or optimizer is None or base_optimizer(engine) is not optimizer:
        return False
    if fp32_master_slots(engine):
        return False
    return all(p.dtype == torch.float32 for p in engine.module.parameters())


ENGINE_MODEL_FILE = "mp_rank_00_model_states.pt"
ENGINE_OPTIMIZER_FILE = "expp_rank_0_mp_rank_00_optim_states.pt"  # ep=1: one expert rank


def load_engine_files(
    engine: Any, model: nn.Module, groups: ProcessGroups, directory: Path
) -> dict:
    """Load weights, Adam moments and step from the engine's files of a checkpoint for which
    ``engine_files_are_layout_free`` held, into this layout (any tp and ep); returns the
    metadata.

    The saved optimizer state is keyed by position in its parameter groups; this engine's
    groups list the same parameters in the same order (the bridge builds them by name), so
    positions map to names. Every moment's shape is checked against its name's full shape.
    """
    path = Path(directory) / ENGINE_MODEL_FILE
    saved = torch.load(path, map_location="cpu", weights_only=False)
    module, optim = saved["module"], saved.get("optimizer")
    if optim is None:  # with MoE layers the engine's optimizer file holds it (bridge contract 10)
        path = Path(directory) / ENGINE_OPTIMIZER_FILE
        optim = torch.load(path, map_location="cpu", weights_only=False).get("optimizer")
    if not isinstance(optim, dict) or "param_groups" not in optim:
        raise ValueError(f"checkpoint {path} holds no optimizer state dict")
    names = {id(p): n for n, p in model.named_parameters()}
    current = base_optimizer(engine).param_groups
    sizes = [len(g["params"]) for g in optim["param_groups"]]
    if sizes != [len(g["params"]) for g in current]:
        raise ValueError(
            f"checkpoint {path}: optimizer groups of {sizes} parameters do not fit this model's "
            f"{[len(g['params']) for g in current]}"
        )
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    step = 0.0
    for saved_group, group in zip(optim["param_groups"], current):
        for index, param in zip(saved_group["params"], group["params"]):
            name = names[id(param)]
            state = optim["state"].get(index, {})
            weight = module[name].float()
            entry = {"weight": weight}
            for key in MOMENTS:
                moment = state.get(key)
                if moment is not None and moment.shape != weight.shape:
                    raise ValueError(
                        f"checkpoint {path}: {key} of {name} has shape {tuple(moment.shape)}, "
                        f"the weight {tuple(weight.shape)}"
                    )
                entry[key] = torch.zeros_like(weight) if moment is None else moment.float()
            if "step" in state:
                step = float(state["step"])
            tensors[name] = entry
    meta = {"adam_step": step, "source": ENGINE_MODEL_FILE}
    _load_tensors(engine, model, groups, {"meta": meta, "tensors": tensors}, path)
    return meta


def _load_tensors(
    engine: Any, model: nn.Module, groups: ProcessGroups, saved: dict, path: Path
) -> None:
    """Write full weights and moments (experts sliced to this EP rank's block, TP-split
    parameters to this TP rank's shard) and the step, into the parameters this rank's
    engine holds (at pp > 1: its stage's). The file must name every parameter of ``model``."""
    _check_model(engine, model, groups)
    optimizer = base_optimizer(engine)
    _ensure_adam_state(optimizer)
    link_optimizer_state(engine)
    slots = fp32_master_slots(engine)
    step = torch.tensor(float(saved["meta"]["adam_step"]))
    named = dict(model.named_parameters())
    missing = sorted(set(named) - set(saved["tensors"]))
    unexpected = sorted(set(saved["tensors"]) - set(named))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit the model: missing {missing}, unexpected {unexpected}"
        )
    for name, param in held_parameters(engine, model):
        entry = saved["tensors"][name]
        for key in (None, *MOMENTS):
            value = _local_piece(name, param, entry[key or "weight"], groups)
            if value.shape != param.shape:
                raise ValueError(
                    f"{name}: saved shape {tuple(value.shape)} != {tuple(param.shape)}"
                )
            _write(param, key, value, optimizer, slots)
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = step.clone()


def portable_info(path: Path) -> str:
    """One line: the layout, world size, ZeRO stage and Adam step a checkpoint was saved with."""
    meta = json.loads(Path(path).with_suffix(".json").read_text())
    layout = meta["layout"]
    return (
        f"saved with dp={layout['dp']} x tp={layout['tp']} x pp={layout['pp']} (ep={layout['ep']}) "
        f"on {meta['world_size']} ranks, ZeRO {meta['zero_stage']}, Adam step "
        f"{int(meta['adam_step'])}; loads at any ep dividing the experts and tp dividing the "
        "split dimensions"
    )
