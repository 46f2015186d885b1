"""The one module that imports DeepSpeed, and every contract moeforge relies on in it.

Contracts (DESIGN.md "DeepSpeed contracts", read in deepspeed 0.19.8's source; pinned by
tests/parallel/test_deepspeed_bridge.py so an upgrade that breaks one fails loudly):

1. ``runtime/engine.py`` turns on its MoE handling (``has_moe_layers``: expert gradient
   reduction over the expert-data-parallel group, MoE optimizer groups under ZeRO) only for
   modules that are instances of ``deepspeed.moe.layer.MoE``, scanned before the optimizer
   is built. moeforge's MoELayer is not one (it stores stacked expert weights and must not
   depend on deepspeed), so ``initialize`` attaches one parameter-free ``ExpertGroupMarker``
   (a documented MoE subclass that skips MoE's constructor) per MoE layer under
   ``model.deepspeed_moe_markers``. The engine then sees MoE layers, calls the marker's
   ``set_deepspeed_parallelism`` (which creates the expert groups) and keeps MoE handling on.
   The markers report ``num_local_experts = 0`` so the engine's per-expert checkpoint files,
   which expect ``deepspeed_moe.experts.deepspeed_experts.<i>`` names, are never written;
   the stacked expert weights stay in the engine's module state (see launch/checkpoint.py).
2. Expert parameters (``parallel.markers.is_expert``) carry ``allreduce = False`` and
   ``group_name = "ep_size_<ep>"`` (``moe/utils.py: is_moe_param``); their gradients reduce
   over ``groups._get_expert_data_parallel_group(group_name)``, divided by the dense
   data-parallel size (``engine._reduce_expert_gradients``, ZeRO 1/2 ``average_tensor``).
   With a layout, ``initialize`` registers the layout's own EP and EDP groups under that
   name in ``utils/groups.py``'s expert dicts (``_EXPERT_PARALLEL_GROUP[_RANKS]``,
   ``_EXPERT_DATA_PARALLEL_GROUP[_RANKS]``), so the marker's hook finds them and creates
   none; without one the hook has ``groups._create_expert_and_data_parallel(ep)`` create them.
   ``check_engine_groups`` asserts after start-up that the engine's groups are ours.
3. ZeRO 1/2 need expert parameters in optimizer groups marked ``moe: True`` with that
   ``name`` (``moe/utils.py: split_params_into_different_moe_groups_for_optimizer``).
4. ZeRO-3 with MoE layers is refused inside the engine; ``check_zero_stage`` refuses it
   earlier with a message that says what to do.
5. Precision: ``torch_autocast`` keeps parameters fp32 (a truly fp32 router); classic
   ``bf16`` casts every parameter to bf16 at engine build.
6. ZeRO 1/2 (``runtime/zero/stage_1_and_2.py``): ``_optimizer_step`` links each parameter's
   optimizer-state fragments (what ``get_full_hp_param("exp_avg")`` reads) once, right after
   the first parameter group's step, when later groups (the expert ``moe`` groups among
   them) have no state yet, and never again. ``link_optimizer_state`` relinks them.
7. ``load_checkpoint(..., load_optimizer_states=False, custom_load_fn=...)`` restores the
   LR scheduler, step counters and client state while a no-op ``custom_load_fn`` keeps the
   module state (shaped by the EP layout) out: ``load_training_state``. The scheduler's
   state is only ``last_batch_iteration``; the learning rate is in the optimizer's param
   groups, so ``step(last_batch_iteration)`` re-applies it.
8. Classic bf16 or fp16 without ZeRO: the engine wraps the optimizer in
   ``runtime/fp16/unfused_optimizer.py`` FP16_UnfusedOptimizer (a torch optimizer, as
   here), whose fp32 masters are one tensor per parameter, ``fp32_groups[i][j]`` for
   ``fp16_groups[i][j]``, or with DeepSpeed's FusedAdam in ``fused_optimizer.py``
   FP16_Optimizer, whose masters are one flat tensor per group, ``fp32_groups_flat[i]``,
   the concatenation in order of ``fp16_groups[i]``. The torch optimizer's parameters, and
   so its Adam state, are those masters; the model's parameters carry no ``_hp_mapping``.
   ``fp32_master_slots`` maps each parameter to its master and offset.
9. Non-finite gradients (``runtime/engine.py _take_model_step``): after ``optimizer.step()``
   the engine reads ``optimizer.overflow``; when true it counts the step in
   ``skipped_steps``, does not step the LR scheduler and ``was_step_applied()`` is false.
   ZeRO 1/2 and the fp16/bf16 wrappers set it themselves (their overflow check skips the
   update); a plain torch optimizer at ZeRO 0 has none and would write NaN into the
   weights. ``guard_nonfinite_steps`` gives it one.
10. Checkpoints with MoE layers and no ZeRO (``_save_moe_checkpoint``): the engine writes
   the optimizer's state dict into ``expp_rank_<r>_mp_rank_00_optim_states.pt`` and again into
   the model-states file (``_common_checkpoint_state``), while ``_load_checkpoint`` reads it
   from the expp file only. ``save_checkpoint`` sets the model-states copy to None.
11. Partitioned masters (ZeRO 1/2, ``runtime/zero/stage_1_and_2.py`` with
   ``utils/mixed_precision_linkage.py``): each model parameter gets ``_hp_mapping`` and the
   methods ``get_full_hp_param(key)`` / ``set_full_hp_param(value, key)``, which assemble /
   scatter the full fp32 master (key None) or optimizer state ``key`` (``"exp_avg"``...)
   over the parameter's data-parallel group, collectively. The engine's torch optimizer is
   ``engine.optimizer`` itself (ZeRO 0, fp32) or the ``.optimizer`` of DeepSpeed's wrapper.
   Callers outside this module use ``has_partitioned_master``, ``read_partitioned_master``,
   ``write_partitioned_master`` and ``base_optimizer`` instead of these names.
12. ``mpu=`` (an engine without PipelineModule; ``runtime/engine.py``, ``utils/groups.py``,
   ``utils/bwc.py``): the engine averages dense gradients over
   ``mpu.get_data_parallel_group()`` (its ``dp_world_size``, also what ``train_batch_size``
   is checked against), and sums gradient norms over ``mpu.get_model_parallel_group()``:
   a parameter counts on every model-parallel rank when ``is_model_parallel_parameter``
   (``model_parallel`` or ``tensor_model_parallel`` true), else on model-parallel rank 0
   only. Any ``get_sequence_parallel_*`` / ``initialize_sequence_parallel`` method would
   make the engine divide its data-parallel size; ``layout.ModelParallelUnit`` has none.
13. Gradient norm under TP. ZeRO 1/2 (``get_grad_norm_direct``) sum each rank's partition
   over the data-parallel then the model-parallel group; every expert element lives on one
   rank of a stage (partitioned over its EDP group), so tagging experts ``model_parallel``
   when tp > 1 makes the sum exact (untagged, only TP rank 0's experts would count). ZeRO 0
   in fp32 clips in ``engine.clip_fp32_gradients`` (``runtime/utils.clip_grad_norm_``),
   which averages the norm's square root over the data-parallel group (exact only when
   every data-parallel rank holds the same gradients, not so with experts split across
   them) and records no norm (``get_global_grad_norm()`` stays None); with a layout,
   ``initialize`` replaces it by ``clip_by_global_norm``: each gradient counted once over
   the world, recorded as the engine's global norm.
14. Model-parallel checkpoint files (``runtime/state_dict_factory.py``): the engine writes one
   ``mp_rank_<r>_model_states.pt`` per model-parallel rank and, when loading, merges or
   splits them with Megatron's key names whenever their number differs from its own
   ``mp_world_size`` (an AssertionError for any other model). At another TP size only the
   scheduler, step counters and client state are taken from them (the same in every file),
   so ``load_training_state`` reads the first file as if the layouts matched.
15. Pipeline (``runtime/pipe/module.py``, ``pipe/engine.py``; ``initialize_pipeline``): a
   ``PipelineModule`` over ``PipeModelDataParallelTopology(num_pp, num_mp=tp, num_dp)``
   (axes pipe, data, model: rank = (pp_i * dp + dp_i) * tp + tp_i, the layout's order) is
   its own mpu (``PipelineParallelGrid``), so no ``mpu=`` is passed. Its ``parts`` (layer
   index each stage starts at) come from ``_partition_layers``, overridden to take moeforge's
   cut. A ``TiedLayerSpec`` module is built once per stage holding the key, broadcast from
   the lowest stage at start, and only its ``tied_weight_attr`` gradients are summed over the
   tied stages; non-first copies are flagged ``ds_pipe_replicated`` (counted once in the
   norm). Activations are tuples; every float a stage outputs must require grad and receives
   a gradient; only the last tuple element gets a bool cast (send masks as int). The last
   stage's loss is scaled 1/GA and ``train_batch`` returns the mean over micro-batches.
   ZeRO 1 sums the gradient norm over the pipe x tp group once per optimizer group, so every
   stage needs the same groups (else it hangs in ``get_grad_norm_direct``) and the expert
   marker on a stage without expert parameters asserts: MoE markers go on every stage and
   the group names are compared across ranks before the engine is built. The pipe engine
   asserts ZeRO < 2. Its ZeRO 0 clip norm counts only model-parallel rank 0 of the pipe x
   tp group (the first stage): with a layout, ``clip_by_global_norm`` replaces it as in
   contract 13, skipping ``ds_pipe_replicated`` copies. At ZeRO 0 a stage without experts
   trains, given one non-finite-step decision for all ranks (``guard_pipeline_steps``). The
   layout's EP and EDP groups are registered before the markers look them up (else the
   marker's groups read pp from ``groups.mpu``, the grid set by the engine first);
   ``utils/groups.py`` keeps them per process.
16. Pipeline backward (``pipe/engine.py`` ``_exec_backward_pass``): a non-last stage calls
   ``out.backward(grad, retain_graph=True)`` once per float output, walking the graph again
   for each; the engine dispatches instructions through ``_INSTRUCTION_MAP`` (a class dict
   of plain functions bound per call), so ``backward_in_one_pass`` gives the engine its own
   copy whose backward first folds the outputs into one scalar. Under TP the engine
   partitions the first sent tensor over the TP ranks by default (``pipeline.
   pipe_partitioned`` / ``grad_partitioned``) and then asserts the rest of the tuple needs
   no gradient: both are turned off. ``load_module_state_dict`` (the layer files) refuses a
   ``custom_load_fn``: ``load_training_state`` masks that method on a pipe engine instead.

Without CUDA, ``DS_ACCELERATOR=cpu`` is set before deepspeed is imported (gloo backend).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from parallel.layout import ProcessGroups
from parallel.markers import is_expert

SUPPORTED_VERSIONS = ((0, 19, 0), (0, 20, 0))  # [low, high)
MARKERS_ATTRIBUTE = "deepspeed_moe_markers"

_deepspeed: Any = None


def import_deepspeed() -> Any:
    """Import deepspeed once (CPU accelerator when no CUDA) and check its version range."""
    global _deepspeed
    if _deepspeed is not None:
        return _deepspeed
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("DS_BUILD_OPS", "0")
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError(
            "deepspeed is required for training: pip install 'deepspeed>=0.19,<0.20'"
        ) from err
    check_version(deepspeed.__version__)
    _deepspeed = deepspeed
    return deepspeed


def check_version(version: str) -> None:
    """Raise if ``version`` is outside the range whose contracts this module was checked on."""
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:3] if p.isdigit())
    low, high = SUPPORTED_VERSIONS
    if not (low <= parts < high):
        raise RuntimeError(
            f"deepspeed {version} is outside the supported range "
            f"[{'.'.join(map(str, low))}, {'.'.join(map(str, high))}); the MoE contracts in "
            "parallel/deepspeed_bridge.py were checked only there: pip install 'deepspeed>=0.19,<0.20'"
        )


def expert_group_name(ep_size: int) -> str:
    """The group name DeepSpeed uses for experts split ``ep_size`` ways."""
    return f"ep_size_{ep_size}"


def check_zero_stage(zero_stage: int, has_experts: bool) -> None:
    """Refuse ZeRO-3 for a model with experts (the engine asserts on it deep inside)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage ({zero_stage}) must be 0, 1, 2 or 3")
    if zero_stage == 3 and has_experts:
        raise ValueError(
            "parallel.zero_stage (3) is refused for MoE models: DeepSpeed does not partition "
            "native MoE layers under ZeRO-3; use parallel.zero_stage 0, 1 or 2"
        )


def tag_expert_parameters(model: nn.Module, ep_size: int, tp_size: int = 1) -> list[str]:
    """Give expert parameters (``is_expert``) ``allreduce=False`` and ``group_name`` (contract
    2), and under TP ``model_parallel`` (contract 13); returns their names."""
    names = []
    for name, param in model.named_parameters():
        if is_expert(param):
            param.allreduce = False
            param.group_name = expert_group_name(ep_size)
            if tp_size > 1:
                param.model_parallel = True
            names.append(name)
    return names


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups (no decay on biases, norms, embeddings), experts split into moe groups.

    A parameter carrying ``_optim = {"lr": ..., "weight_decay": ...}`` (SPADE's state-space
    A and delta, as the S4 papers train them) gets a group of its own with those settings;
    the schedule scales each group's own learning rate.
    """
    decay, no_decay = [], []
    special: dict[tuple, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        overrides = getattr(param, "_optim", None)
        if overrides:
            special.setdefault(tuple(sorted(overrides.items())), []).append(param)
        elif param.dim() < 2 or "embed" in name or "norm" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    for i, (overrides, params) in enumerate(special.items()):
        groups.append({"name": f"custom_{i}", "params": params, **dict(overrides)})
    groups = [g for g in groups if g["params"]]
    if not any(getattr(p, "allreduce", True) is False for p in model.parameters()):
        return groups
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    import_deepspeed()
    return split_params_into_different_moe_groups_for_optimizer(groups)


def _marker_class() -> type[nn.Module]:
    deepspeed = import_deepspeed()
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    class ExpertGroupMarker(MoE):
        """Tells the engine an MoE layer with ``num_experts`` experts exists; holds nothing.

        MoE.__init__ (gate, per-expert modules) is skipped on purpose: moeforge's MoELayer
        does the work. ``set_deepspeed_parallelism`` is the engine's documented hook for
        creating the expert and expert-data-parallel groups before the optimizer is built.
        """

        def __init__(self, num_experts: int, ep_size: int) -> None:
            nn.Module.__init__(self)
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.expert_group_name = expert_group_name(ep_size)
            self.num_local_experts = 0  # no engine-written per-expert files (contract 1)
            self.use_residual = False
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(
                    self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_
                )

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(
                "ExpertGroupMarker only flags MoE layers to the engine; never call it"
            )

    del deepspeed
    return ExpertGroupMarker


def attach_moe_markers(model: nn.Module, num_experts_per_layer: list[int], ep_size: int) -> None:
    """Attach one ExpertGroupMarker per MoE layer under ``model.deepspeed_moe_markers``."""
    if not num_experts_per_layer:
        return
    marker = _marker_class()
    model.add_module(
        MARKERS_ATTRIBUTE, nn.ModuleList(marker(n, ep_size) for n in num_experts_per_layer)
    )


def fused_adam() -> Callable[..., torch.optim.Optimizer] | None:
    """A fused AdamW on CUDA: apex's FusedAdam (AdamW mode) when importable, else torch's
    ``AdamW(fused=True)`` (one kernel over all parameters instead of the per-tensor loop
    DeepSpeed's ``torch_adam`` builds); None on CPU, where the engine builds the AdamW that
    ``ds_config`` names. Both are optimizers DeepSpeed's ZeRO accepts.

    torch's fused AdamW checks its parameters' device at the first step, not when built, so
    it may be built over the model before the engine moves it to the GPU.
    """
    if not torch.cuda.is_available():
        return None
    try:
        from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
    except ImportError:
        return lambda groups, **kw: torch.optim.AdamW(groups, fused=True, **kw)
    return lambda groups, **kw: FusedAdam(groups, adam_w_mode=True, **kw)


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> None:
    """Join the default process group from the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT), bounded by ``timeout_s`` (default ``rendezvous.DEFAULT_TIMEOUT_SECONDS``),
    then hand it to DeepSpeed; start the heartbeat.

    The group is made here, not by ``deepspeed.init_distributed``, because torchrun restarts
    need a fresh key prefix in the agent's store (parallel/rendezvous.py); DeepSpeed adopts a
    group that exists. Groups made later (DeepSpeed's, the expert-parallel mesh) get the same
    timeout from ``rendezvous.bound_group_timeouts`` once the engine is built.
    """
    import torch.distributed as dist

    from parallel import heartbeat, rendezvous

    deepspeed = import_deepspeed()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=timeout_s or rendezvous.DEFAULT_TIMEOUT_SECONDS)
    if not dist.is_initialized():
        place = rendezvous.join(backend, timeout)
        if dist.get_world_size() > 1:
            heartbeat.start(place, dist.get_rank(), dist.get_world_size())
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)


def initialize(
    model: nn.Module,
    ds_config: dict[str, Any],
    *,
    groups: ProcessGroups | None = None,
    num_experts_per_layer: list[int],
    ep_size: int | None = None,
    weight_decay: float = 0.0,
    zero_stage: int = 0,
) -> Any:
    """Tag experts, attach the MoE markers, split optimizer groups, build the DeepSpeed engine.

    ``groups``: the layout's built groups (``ParallelLayout.build``); the engine then gets
    ``groups.mpu`` and the layout's expert groups, checked after start-up
    (``check_engine_groups``), and ZeRO 0 clips by the exact global norm (contract 13).
    Without it the engine makes its own groups over the whole world, as with dp only.
    ``num_experts_per_layer``: experts of each MoE layer, in order (empty for a dense model).
    ``ep_size``: the EP degree (``groups.ep_size`` when groups are given; it must agree).
    The optimizer is AdamW: fused on CUDA (``fused_adam``), else the one ``ds_config`` names.
    """
    deepspeed = import_deepspeed()
    if groups is not None:
        if ep_size is not None and ep_size != groups.ep_size:
            raise ValueError(
                f"ep_size ({ep_size}) differs from the layout's parallel.ep "
                f"({groups.ep_size}); pass the layout's groups only"
            )
        ep_size = groups.ep_size
    else:
        # The engine hands its mpu to utils/groups.py only when it has one; an earlier
        # engine's would otherwise still answer for the data-parallel group.
        from deepspeed.utils import groups as ds_groups

        ds_groups.mpu = None
    ep_size = 1 if ep_size is None else ep_size
    tp_size = 1 if groups is None else groups.tp_size
    has_experts = bool(num_experts_per_layer)
    check_zero_stage(zero_stage, has_experts)
    if has_experts:
        tag_expert_parameters(model, ep_size, tp_size)
        if groups is not None:
            register_expert_groups(groups)
        attach_moe_markers(model, num_experts_per_layer, ep_size)
    if ds_config.get("bf16", {}).get("enabled", False):
        # Classic bf16 casts every parameter; modules that pin an fp32 weight (the router's
        # ``keep_fp32``) must let it go, their math still runs in fp32 (contract 5).
        for module in model.modules():
            if hasattr(module, "keep_fp32"):
                module.keep_fp32 = False
    param_groups = optimizer_param_groups(model, weight_decay)
    optimizer = None
    fused = fused_adam()
    if fused is not None and "optimizer" in ds_config:
        params = dict(ds_config["optimizer"].get("params", {}))
        params.pop("torch_adam", None)
        params.pop("adam_w_mode", None)
        optimizer = fused(param_groups, **params)
        ds_config = {k: v for k, v in ds_config.items() if k != "optimizer"}
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups,
        optimizer=optimizer,
        config=ds_config,
        mpu=None if groups is None else groups.mpu,
    )
    if groups is not None:
        check_engine_groups(engine, groups)
        if _clips_fp32_itself(engine):
            engine.clip_fp32_gradients = lambda: clip_by_global_norm(engine, groups)
    if not hasattr(engine.optimizer, "overflow"):
        guard_nonfinite_steps(engine.optimizer)
    return engine


def register_expert_groups(groups: ProcessGroups) -> None:
    """Put the layout's EP and EDP groups in DeepSpeed's expert dicts (contract 2).

    The marker's ``set_deepspeed_parallelism`` then finds the group name and creates none,
    so the engine reduces expert gradients over the very groups the all-to-all runs on.
    """
    import_deepspeed()
    from deepspeed.utils import groups as ds_groups

    name = expert_group_name(groups.ep_size)
    ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(groups.ep_ranks)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.edp_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(groups.edp_ranks)


def check_engine_groups(engine: Any, groups: ProcessGroups) -> None:
    """Raise a RuntimeError unless the engine's data-parallel group, and with MoE layers its
    expert-parallel and expert-data-parallel groups, hold exactly the layout's ranks."""
    pairs = [
        ("data-parallel", engine.data_parallel_group, groups.dp_ranks),
        ("gradient-averaging data-parallel", engine.seq_data_parallel_group, groups.dp_ranks),
    ]
    if getattr(engine, "has_moe_layers", False):
        name = expert_group_name(groups.ep_size)
        pairs += [
            ("expert-parallel", engine.expert_parallel_group.get(name), groups.ep_ranks),
            ("expert-data-parallel", engine.expert_data_parallel_group.get(name), groups.edp_ranks),
        ]
    for what, group, ours in pairs:
        theirs = None if group is None else dist.get_process_group_ranks(group)
        if theirs != list(ours):
            raise RuntimeError(
                f"DeepSpeed's {what} group of rank {groups.rank} holds ranks {theirs}, the "
                f"layout {groups.layout.describe()} has {list(ours)}: the engine would reduce "
                "gradients over other ranks than moeforge's groups"
            )
    # The pipeline engine's "model parallel" group is pipe x tp.
    model_parallel = groups.tp_size * (groups.pp_size if hasattr(engine, "grid") else 1)
    if engine.dp_world_size != groups.dp_size or engine.mp_world_size != model_parallel:
        raise RuntimeError(
            f"DeepSpeed sees dp={engine.dp_world_size}, model parallel "
            f"{engine.mp_world_size}; the layout {groups.layout.describe()} has "
            f"dp={groups.dp_size}, tp={groups.tp_size}, pp={groups.pp_size}"
        )


def _clips_fp32_itself(engine: Any) -> bool:
    """Whether the engine clips through ``clip_fp32_gradients`` (``_take_model_step``):
    no ZeRO, no fp16/bf16 wrapper (which clip with their own norm)."""
    return not (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization())


def global_grad_norm(parameters: list[nn.Parameter], groups: ProcessGroups) -> torch.Tensor:
    """The L2 norm of every gradient of the model over the world, each value counted once.

    After the engine's reduction a gradient is the same on all of its replicas: an expert's
    on its EDP group (counted at EDP rank 0), a TP shard's on its data-parallel group
    (counted at dp rank 0), any other one on the data-parallel x TP ranks of its stage
    (counted at dp rank 0, TP rank 0). A pipeline stage counts its own parameters; a tied
    weight's copies on later stages (``ds_pipe_replicated``) are not counted again.
    Collective over the default group.
    """
    here = groups.coordinates
    squares = []
    for param in parameters:
        if param.grad is None or getattr(param, "ds_pipe_replicated", False):
            continue
        if is_expert(param) or getattr(param, "allreduce", True) is False:
            owner = here.edp == 0
        elif getattr(param, "tensor_model_parallel", False):
            owner = here.dp == 0
        else:
            owner = here.dp == 0 and here.tp == 0
        if owner:
            squares.append(param.grad.detach().float().pow(2).sum())
    device = parameters[0].device if parameters else torch.device("cpu")
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=device)
    total = total.reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.sqrt()[0]


def clip_by_global_norm(engine: Any, groups: ProcessGroups) -> torch.Tensor:
    """Scale every gradient by min(1, clip / (norm + 1e-6)) as DeepSpeed's clip does, with the
    exact global norm (contract 13); records it as ``engine.get_global_grad_norm()``."""
    parameters = [p for p in engine.module.parameters() if p.grad is not None]
    norm = global_grad_norm(parameters, groups)
    engine._global_grad_norm = norm
    if not torch.isfinite(norm):
        # Scaling by a NaN coefficient would make every gradient NaN and hide which one was
        # not finite; the step is skipped anyway (contract 9) and names it.
        return norm
    coefficient = torch.clamp(engine.gradient_clipping() / (norm + 1e-6), max=1.0)
    for param in parameters:
        param.grad.detach().mul_(coefficient.to(param.grad.device))
    return norm


def guard_nonfinite_steps(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.step()`` skip an update whose gradients are not all finite (contract 9).

    Sets ``optimizer.overflow`` as DeepSpeed's own wrappers do, so the engine counts the step
    as skipped and leaves the schedule where it was. Gradients averaged over the whole world
    are the same on every rank, so each rank decides alike on its own; when some are reduced
    over a smaller group only (experts under expert parallelism: ``allreduce = False``;
    tensor-parallel shards), the ranks agree through one all-reduce of the flag per step, so
    replicas never drift apart by one rank skipping alone. ``optimizer.nonfinite_parameter``
    is the first parameter whose gradient was not finite, for the trainer's message.
    """
    step = optimizer.step
    every = [p for group in optimizer.param_groups for p in group["params"]]
    agree = any(
        getattr(p, "allreduce", True) is False
        or getattr(p, "tensor_model_parallel", False)
        or getattr(p, "model_parallel", False)
        for p in every
    )

    def guarded_step(*args: Any, **kwargs: Any) -> Any:
        params = [p for p in every if p.grad is not None]
        flags = torch.ones(1, dtype=torch.bool)
        if params:
            flags = torch.isfinite(torch.stack(torch._foreach_norm([p.grad for p in params])))
        here = flags.all()
        finite = here.float()
        if agree and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        optimizer.overflow = not bool(finite)
        optimizer.nonfinite_parameter = None
        if not bool(here):
            optimizer.nonfinite_parameter = params[int((~flags).nonzero()[0])]
        if optimizer.overflow:
            for param in every:
                param.grad = None
            return None
        return step(*args, **kwargs)

    optimizer.overflow = False
    optimizer.nonfinite_parameter = None
    optimizer.step = guarded_step


def link_optimizer_state(engine: Any) -> None:
    """(Re)link every ZeRO 1/2 parameter's optimizer-state fragments to the current state.

    Contract 6: deepspeed 0.19 links them once, after the step of the first parameter group,
    and marks them linked, so ``get_full_hp_param("exp_avg")`` fails ("exp_avg not found in
    optimizer state fragment") for parameters of later groups. Relinking once every group
    has state fixes that; it is also how moments get written into a fresh engine (after
    creating zero state). A no-op for engines without ZeRO 1/2.
    """
    optimizer = engine.optimizer
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def fp32_master_slots(engine: Any) -> dict[nn.Parameter, tuple[torch.Tensor, int]]:
    """Each low-precision parameter's fp32 master: (master tensor, offset of the parameter in
    it; 0 for a per-parameter master, the running offset in a per-group flat master).

    Contract 8: only engines that keep separate fp32 masters outside ZeRO (classic bf16/fp16
    without ZeRO) have them; a slot's Adam moment is ``state[master][key]`` at the same
    offset. Empty for every other engine (fp32 parameters are their own masters; ZeRO 1/2
    parameters reach theirs through ``_hp_mapping``).
    """
    optimizer = engine.optimizer
    groups = getattr(optimizer, "fp16_groups", None)
    if groups is None:
        return {}
    slots: dict[nn.Parameter, tuple[torch.Tensor, int]] = {}
    if hasattr(optimizer, "fp32_groups_flat"):  # fused: one flat master per group
        for params, flat in zip(groups, optimizer.fp32_groups_flat):
            offset = 0
            for param in params:
                slots[param] = (flat, offset)
                offset += param.numel()
            _check_master(flat.numel(), offset)
        return slots
    for params, masters in zip(groups, optimizer.fp32_groups):  # unfused: one per parameter
        for param, master in zip(params, masters):
            _check_master(master.numel(), param.numel())
            slots[param] = (master, 0)
    return slots


def _check_master(master_size: int, expected: int) -> None:
    if master_size != expected:
        raise RuntimeError(
            f"deepspeed's fp32 master holds {master_size} values for parameters of {expected}: "
            "contract 8 (parallel/deepspeed_bridge.py) no longer holds"
        )


def has_partitioned_master(param: nn.Parameter) -> bool:
    """Whether ZeRO keeps ``param``'s fp32 master (and moments) partitioned (contract 11)."""
    return hasattr(param, "_hp_mapping")


def read_partitioned_master(param: nn.Parameter, key: str | None) -> torch.Tensor:
    """The full fp32 master of ``param`` (key None) or its optimizer state ``key``.

    Collective over the parameter's data-parallel group (contract 11): every rank holding a
    partition of it must call this, in the same parameter order.
    """
    return param.get_full_hp_param(key)


def write_partitioned_master(param: nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """Scatter ``value`` (the full tensor) into ``param``'s fp32 master partition (key None)
    or into its optimizer state ``key`` (contract 11). Leaves ``param`` itself untouched."""
    param.set_full_hp_param(value, key)


def base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer doing the update (inside DeepSpeed's ZeRO or fp16 wrapper, if any)."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def _skip_module_state(src: dict[str, Any], dst: nn.Module) -> None:
    """``custom_load_fn`` that leaves the module as it is (its weights come from elsewhere)."""


def load_training_state(engine: Any, load_dir: str, tag: str) -> dict[str, Any]:
    """Load a checkpoint's LR scheduler, step counters and client state, not its weights.

    For a checkpoint written at another EP or TP size (contracts 7, 14): module and optimizer states are
    shaped by the layout and must come from a layout-free file instead. Under ZeRO 1/2 the
    engine then copies the (unchanged) module weights into its fp32 partitions. Returns the
    client state.
    """
    saved_mp = len(engine._get_all_ckpt_names(load_dir, tag))
    own = (engine.mp_world_size, engine.checkpoint_mp_rank)
    if saved_mp and saved_mp != engine.mp_world_size:  # contract 14: no Megatron merge
        engine.mp_world_size, engine.checkpoint_mp_rank = saved_mp, 0
    # The pipeline engine reads its layer files in load_module_state_dict and refuses a
    # custom_load_fn; skipping that method skips the module for it.
    pipeline = hasattr(engine, "grid")
    if pipeline:
        engine.load_module_state_dict = lambda *args, **kwargs: None
    try:
        path, client_state = engine.load_checkpoint(
            load_dir,
            tag=tag,
            load_module_strict=False,
            load_optimizer_states=False,
            load_lr_scheduler_states=True,
            load_module_only=False,
            custom_load_fn=None if pipeline else _skip_module_state,
        )
    finally:
        engine.mp_world_size, engine.checkpoint_mp_rank = own
        if pipeline:
            del engine.load_module_state_dict
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {load_dir}")
    # The scheduler's state is its position only; the learning rate it set lives in the
    # optimizer's param groups, which were not loaded. Re-apply it without advancing
    # (DeepSpeed's schedulers take ``step(last_batch_iteration)``).
    scheduler = engine.lr_scheduler
    if scheduler is not None:
        if not hasattr(scheduler, "last_batch_iteration"):
            raise TypeError(
                f"{type(scheduler).__name__} is not a DeepSpeed LR scheduler; resuming at "
                "another parallel.ep needs one (the ds_config 'scheduler' section)"
            )
        scheduler.step(scheduler.last_batch_iteration)
    return client_state


def save_checkpoint(engine: Any, save_dir: str, tag: str, client_state: dict[str, Any]) -> None:
    """``engine.save_checkpoint`` (moeforge moves ``latest`` itself), writing the optimizer
    state once (contract 10): with MoE layers and no ZeRO the engine would write it twice."""
    duplicate = getattr(engine, "has_moe_layers", False) and not engine.zero_optimization()
    common = getattr(engine, "_common_checkpoint_state", None)
    if not duplicate or common is None:
        engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
        return

    def without_optimizer(*args: Any, **kwargs: Any) -> dict[str, Any]:
        state = common(*args, **kwargs)
        state["optimizer"] = None  # the expp_rank_<r> file holds it and is what loads
        return state

    engine._common_checkpoint_state = without_optimizer
    try:
        engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    finally:
        del engine._common_checkpoint_state


def expert_data_parallel_group(ep_size: int) -> Any:
    """The process group over which expert gradients with ``ep_size`` are averaged."""
    import_deepspeed()
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_group(expert_group_name(ep_size))


def initialize_pipeline(
    layers: list[Any],
    ds_config: dict[str, Any],
    *,
    parts: list[int],
    pp: int,
    dp: int,
    tp: int = 1,
    loss_fn: Callable[[Any, Any], Any],
    num_experts_per_layer: list[int],
    ep_size: int = 1,
    weight_decay: float = 0.0,
    groups: ProcessGroups | None = None,
) -> Any:
    """Build a ``PipelineModule`` cut at ``parts`` over (pp, dp, tp) and its engine (contract 15).

    ``layers``: nn.Modules and ``parallel.pipeline.TiedLayer``s mapping a tuple of tensors to
    the next. Experts of this stage are tagged (contract 2); markers for every MoE layer of
    the model go on every stage; under ZeRO 1 the optimizer groups of all ranks must agree
    (checked collectively, before the engine is built). ZeRO 0 skips non-finite steps on
    every rank alike (``guard_pipeline_steps``). ``groups``: the run's layout; its EP and EDP
    groups become the engine's (checked after start-up), and ZeRO 0 clips by the exact
    global norm over every stage (DeepSpeed's own counts only the first stage's parameters:
    its model-parallel group is pipe x tp). Use ``parallel.pipeline.build_pipeline_engine``,
    which checks the cut and the options first.
    """
    from parallel.pipeline import TiedLayer, check_same_groups

    deepspeed = import_deepspeed()
    from deepspeed.pipe import PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    check_zero_stage(zero_stage, bool(num_experts_per_layer))
    # Under TP the engine would cut the first tensor of each sent tuple over the TP ranks
    # and insist that the rest need no gradient; the running aux and z losses do. Each TP
    # rank sends its whole (identical) activation instead.
    ds_config = {
        **ds_config,
        "pipeline": {
            **ds_config.get("pipeline", {}),
            "pipe_partitioned": False,
            "grad_partitioned": False,
        },
    }
    if len(parts) != pp + 1 or parts[0] != 0 or parts[-1] != len(layers):
        raise ValueError(f"parts {parts} must start at 0 and end at {len(layers)} with {pp} stages")

    specs: list[Any] = []
    for layer in layers:
        if isinstance(layer, TiedLayer):
            specs.append(
                TiedLayerSpec(
                    layer.key,
                    _Reuse,
                    layer.module,
                    forward_fn=layer.forward_fn,
                    tied_weight_attr=[f"module.{attr}" for attr in layer.weight_attrs],
                )
            )
        else:
            specs.append(layer)

    class CutPipelineModule(PipelineModule):
        """PipelineModule whose stage bounds are given (moeforge cuts between blocks)."""

        def _partition_layers(self, method: str = "given") -> None:
            self.parts = list(parts)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    # Shapes may change between calls (evaluation's last batch, a padding mask that comes and
    # goes); a fixed-shape pipe would reuse the first call's receive buffers. No grad: the
    # module broadcasts tied weights in place, which autograd would otherwise record.
    with torch.no_grad():
        module = CutPipelineModule(
            layers=specs,
            topology=topology,
            loss_fn=loss_fn,
            partition_method="given",
            dynamic_shape=True,
        )
    if num_experts_per_layer:
        tag_expert_parameters(module, ep_size, tp)
        if groups is not None:
            register_expert_groups(groups)
        attach_moe_markers(module, num_experts_per_layer, ep_size)
    if ds_config.get("bf16", {}).get("enabled", False):
        for sub in module.modules():  # contract 5, as in ``initialize``
            if hasattr(sub, "keep_fp32"):
                sub.keep_fp32 = False
    param_groups = optimizer_param_groups(module, weight_decay)
    if zero_stage == 1:  # its norm all-reduces once per group over the pipe x tp group
        names = [str(group.get("name")) for group in param_groups]
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, names)
        check_same_groups(gathered)
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=param_groups, config=ds_config
    )
    if groups is not None:
        check_engine_groups(engine, groups)
        if _clips_fp32_itself(engine):
            engine.clip_fp32_gradients = lambda: clip_by_global_norm(engine, groups)
    if not hasattr(engine.optimizer, "overflow"):
        guard_pipeline_steps(engine.optimizer)
    backward_in_one_pass(engine)
    return engine


def backward_in_one_pass(engine: Any) -> None:
    """Make a non-last stage back-propagate its output tuple in one pass over its graph.

    DeepSpeed 0.19's pipe engine calls ``out.backward(grad, retain_graph=True)`` once per
    float tensor of a stage's output. The running aux and z losses depend on every router
    of the stage, and through them on nearly all of its graph, so a stage walked its graph
    three times (measured by ``moeforge bench pp``: stage 0's backward cost 2.5x stage 1's).
    Before the engine's own backward, the outputs become one scalar, sum(out_i * grad_i),
    whose backward hands each out_i exactly grad_i: the same gradients in one pass.
    """
    from deepspeed.runtime.pipe import schedule

    # The engine runs each instruction of its schedule through this class-level table of
    # plain functions (bound per call); the engine gets its own copy with the new backward.
    table = dict(engine._INSTRUCTION_MAP)
    backward = table[schedule.BackwardPass]

    def one_pass(self: Any, buffer_id: int) -> Any:
        outputs = self.pipe_buffers["outputs"][buffer_id]
        grads = self.grad_layer
        if (
            not self.is_last_stage()
            and not self.is_pipe_partitioned
            and isinstance(outputs, tuple)
            and isinstance(grads, (tuple, list))
        ):
            floats = [t for t in outputs if t.is_floating_point()]
            if len(floats) > 1 and len(floats) == len(grads):
                total = sum((t * g.to(t.dtype)).sum() for t, g in zip(floats, grads))
                self.pipe_buffers["outputs"][buffer_id] = (total,)
                self.grad_layer = (torch.ones_like(total),)
        return backward(self, buffer_id)

    table[schedule.BackwardPass] = one_pass
    engine._INSTRUCTION_MAP = table


def guard_pipeline_steps(optimizer: torch.optim.Optimizer) -> None:
    """``guard_nonfinite_steps`` for a pipeline stage: every rank of the world agrees on
    skipping (one all-reduce per step), because stages hold different parameters and a
    stage without experts would otherwise skip the all-reduce the others wait in."""
    step = optimizer.step
    every = [p for group in optimizer.param_groups for p in group["params"]]

    def guarded_step(*args: Any, **kwargs: Any) -> Any:
        params = [p for p in every if p.grad is not None]
        flags = torch.ones(1, dtype=torch.bool)
        if params:
            flags = torch.isfinite(torch.stack(torch._foreach_norm([p.grad for p in params])))
        here = flags.all()
        finite = here.float().reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        optimizer.overflow = not bool(finite)
        optimizer.nonfinite_parameter = None
        if not bool(here):
            optimizer.nonfinite_parameter = params[int((~flags).nonzero()[0])]
        if optimizer.overflow:
            for param in every:
                param.grad = None
            return None
        return step(*args, **kwargs)

    optimizer.overflow = False
    optimizer.nonfinite_parameter = None
    optimizer.step = guarded_step


class _Reuse(nn.Module):
    """A TiedLayerSpec's module that wraps an already built module (every stage holding the
    tie gets the same weights it would have in the whole model)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, inputs: Any) -> Any:
        return self.module(inputs)
