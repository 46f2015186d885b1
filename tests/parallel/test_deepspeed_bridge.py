"""DeepSpeed contracts (parallel/deepspeed_bridge.py): fail loudly when an upgrade breaks one.

Cheap tests read DeepSpeed's code paths; the slow ones build real engines in gloo processes.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from parallel import deepspeed_bridge as bridge
from tests.dist import run_ranks

deepspeed = bridge.import_deepspeed()


def test_installed_version_is_in_the_checked_range():
    bridge.check_version(deepspeed.__version__)
    bridge.check_version("0.19.8+cpu")
    for bad in ("0.18.9", "0.20.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=f"deepspeed {bad} is outside the supported range"):
            bridge.check_version(bad)


def test_engine_recognises_moe_only_through_the_native_class():
    """Contract 1: has_moe_layers comes from isinstance(module, MoE) + set_deepspeed_parallelism."""
    from deepspeed.moe.layer import MoE
    from deepspeed.runtime.engine import DeepSpeedEngine

    source = inspect.getsource(DeepSpeedEngine)
    assert "isinstance(module, MoE)" in source and "self.has_moe_layers = True" in source
    assert "set_deepspeed_parallelism" in source
    assert hasattr(MoE, "set_deepspeed_parallelism")
    for name in ("_save_moe_checkpoint", "load_moe_state_dict", "_get_non_moe_state_dict"):
        assert (
            "num_local_experts" in inspect.getsource(getattr(DeepSpeedEngine, name))
            or name == "_get_non_moe_state_dict"
        )
    marker = bridge._marker_class()(num_experts=8, ep_size=2)
    assert isinstance(marker, MoE) and list(marker.parameters()) == [] and marker.state_dict() == {}
    assert marker.expert_group_name == "ep_size_2" and marker.num_local_experts == 0


def test_expert_parameters_are_tagged_the_way_deepspeed_reads_them():
    """Contracts 2 and 3: is_moe_param and the MoE optimizer group split."""
    from deepspeed.moe.utils import is_moe_param, is_moe_param_group
    from deepspeed.runtime.utils import is_model_parallel_parameter

    from parallel.markers import mark_expert

    model = torch.nn.ModuleDict(
        {
            "stacked": torch.nn.Linear(4, 4, bias=False),
            "experts": torch.nn.Linear(4, 4),  # the name alone does not make an expert
            "norm": torch.nn.LayerNorm(4),
        }
    )
    mark_expert(model["stacked"].weight)
    names = bridge.tag_expert_parameters(model, ep_size=2)
    assert names == ["stacked.weight"]
    assert (
        is_moe_param(model["stacked"].weight) and model["stacked"].weight.group_name == "ep_size_2"
    )
    assert not is_moe_param(model["experts"].weight)
    # Contract 13: under TP, experts count on every model-parallel rank in the norm.
    assert not is_model_parallel_parameter(model["stacked"].weight)
    bridge.tag_expert_parameters(model, ep_size=2, tp_size=2)
    assert is_model_parallel_parameter(model["stacked"].weight)
    assert not is_model_parallel_parameter(model["experts"].weight)
    groups = bridge.optimizer_param_groups(model, weight_decay=0.1)
    moe_groups = [g for g in groups if is_moe_param_group(g)]
    assert len(moe_groups) == 1 and moe_groups[0]["name"] == "ep_size_2"
    assert (
        moe_groups[0]["params"] == [model["stacked"].weight]
        and moe_groups[0]["weight_decay"] == 0.1
    )
    no_decay = [g for g in groups if g["name"] == "no_decay"][0]
    assert {id(p) for p in no_decay["params"]} == {
        id(model["experts"].bias),
        id(model["norm"].weight),
        id(model["norm"].bias),
    }


def test_zero3_with_experts_is_refused_with_a_fix():
    with pytest.raises(ValueError, match=r"^parallel\.zero_stage \(3\) is refused for MoE models"):
        bridge.check_zero_stage(3, has_experts=True)
    bridge.check_zero_stage(3, has_experts=False)
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert "Native DeepSpeed MoE is not supported with ZeRO Stage 3" in inspect.getsource(
        DeepSpeedEngine._validate_zero3_moe_compatibility
    )


def test_base_optimizer_and_partitioned_master_without_zero():
    """Contract 11 outside ZeRO: no partitioned master; the base optimizer is the engine's
    own or the one inside a wrapper."""
    param = torch.nn.Parameter(torch.zeros(2))
    assert not bridge.has_partitioned_master(param)
    adamw = torch.optim.AdamW([param])

    class Engine:
        optimizer = adamw

    class Wrapper:
        optimizer = adamw

    assert bridge.base_optimizer(Engine()) is adamw
    Engine.optimizer = Wrapper()
    assert bridge.base_optimizer(Engine()) is adamw


def test_engine_reads_the_mpu_expert_dicts_and_fp32_clip_the_bridge_relies_on():
    """Contracts 2, 12 and 13, read in the source: the expert dicts ``register_expert_groups``
    fills, the ZeRO 0 fp32 clip hook the bridge replaces, and no sequence-parallel method on
    our mpu (the engine would divide its data-parallel size)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import groups as ds_groups

    from parallel.layout import ModelParallelUnit

    for name in (
        "_EXPERT_PARALLEL_GROUP",
        "_EXPERT_PARALLEL_GROUP_RANKS",
        "_EXPERT_DATA_PARALLEL_GROUP",
        "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
    ):
        assert isinstance(getattr(ds_groups, name), dict), name
    step = inspect.getsource(DeepSpeedEngine._take_model_step)
    assert "self.clip_fp32_gradients()" in step
    assert "not (self.fp16_enabled() or self.bfloat16_enabled() or self.zero_optimization())" in (
        step
    )
    assert "hasattr(mpu, 'initialize_sequence_parallel')" in inspect.getsource(
        ds_groups._get_data_parallel_world_size
    )
    assert not [n for n in dir(ModelParallelUnit) if "sequence" in n]
    for name in (
        "get_data_parallel_group_ranks",
        "get_model_parallel_group",
        "get_tensor_model_parallel_rank",
        "get_pipeline_model_parallel_world_size",
    ):
        assert hasattr(ModelParallelUnit, name), name


def test_ep_size_must_agree_with_the_layout():
    from parallel.layout import ParallelLayout, ProcessGroups

    groups = ProcessGroups(layout=ParallelLayout(dp=4, ep=2), mesh=None, rank=0)
    with pytest.raises(ValueError, match=r"^ep_size \(4\) differs from the layout's parallel.ep"):
        bridge.initialize(
            torch.nn.Linear(2, 2), {}, groups=groups, num_experts_per_layer=[4], ep_size=4
        )


def test_global_grad_norm_counts_every_gradient_once_over_the_layout():
    """Contract 13 arithmetic, no processes: on dp=2 x tp=2 with ep=2, summing what each of
    the 4 ranks counts gives every value once (dense on rank 0, each TP shard on dp rank 0,
    each expert block at EDP rank 0)."""
    from parallel.layout import ParallelLayout, ProcessGroups
    from parallel.markers import mark_expert
    from parallel.tensor_parallel import mark_tensor_parallel

    layout = ParallelLayout(dp=2, tp=2, ep=2)
    dense, shards, experts = [3.0], [1.0, 2.0], [4.0, 5.0]  # by tp / ep rank
    total = 0.0
    for rank in range(4):
        groups = ProcessGroups(layout=layout, mesh=None, rank=rank)
        params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
        mark_tensor_parallel(params[1], partition_dim=0)
        mark_expert(params[2])
        params[2].model_parallel = True  # as tagged under TP: still counted by EDP rank
        for param, value in zip(
            params, (dense, [shards[groups.tp_rank]], [experts[groups.ep_rank]])
        ):
            param.grad = torch.tensor(value)
        total += float(bridge.global_grad_norm(params, groups)) ** 2
    assert total == pytest.approx(3.0**2 + 1 + 4 + 16 + 25)


def test_clip_leaves_nonfinite_gradients_for_the_guard():
    from parallel.layout import ParallelLayout, ProcessGroups

    groups = ProcessGroups(layout=ParallelLayout(dp=1), mesh=None, rank=0)
    module = torch.nn.Linear(2, 1, bias=False)

    class Engine:
        def gradient_clipping(self):
            return 0.5

    engine = Engine()
    engine.module = module
    module.weight.grad = torch.tensor([[3.0, 4.0]])
    assert float(bridge.clip_by_global_norm(engine, groups)) == pytest.approx(5.0)
    assert module.weight.grad[0].tolist() == pytest.approx([0.3, 0.4], abs=1e-6)
    assert float(engine._global_grad_norm) == pytest.approx(5.0)
    module.weight.grad = torch.tensor([[float("nan"), 4.0]])
    bridge.clip_by_global_norm(engine, groups)
    assert module.weight.grad[0, 1] == 4.0  # not scaled by a NaN coefficient


# Real engines ------------------------------------------------------------------------------


def _tiny_model():
    from moe.config import MoEConfig
    from moe.transformer import AttentionConfig, ModelConfig, Transformer

    torch.manual_seed(0)
    config = ModelConfig(d_model=16, num_layers=2, num_heads=2, d_ff=32, max_seq_len=16)
    return Transformer(
        config, MoEConfig(num_experts=4, capacity_factor=None), AttentionConfig(), vocab_size=40
    )


def _ds_config(stage: int, precision: str) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    if precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "bf16-params":
        config["bf16"] = {"enabled": True}
    return config


def _engine_body(rank: int, world_size: int, stage: int, precision: str) -> dict:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    from moe.layer import MoELayer

    model = _tiny_model()
    engine = bridge.initialize(
        model, _ds_config(stage, precision), num_experts_per_layer=[4], zero_stage=stage
    )
    moe_layer = next(m for m in model.modules() if isinstance(m, MoELayer))
    seen: dict[str, torch.dtype] = {}
    router, experts = moe_layer.router, moe_layer.experts
    original_logits = router.logits

    def logits(x):
        out = original_logits(x)
        seen["router_input"], seen["logits"] = x.dtype, out.dtype
        return out

    router.logits = logits
    experts.register_forward_hook(lambda m, i, o: seen.__setitem__("experts_out", o.dtype))
    attention = model.blocks[0].attention
    attention.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv_out", o.dtype))
    torch.manual_seed(1 + rank)
    tokens = torch.randint(0, 40, (2, 9))
    before = router.weight.detach().float().clone()
    expert_before = experts.w1.detach().float().clone()
    losses = []
    for _ in range(2):
        out = engine(tokens[:, :-1], targets=tokens[:, 1:])
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    edp = bridge.expert_data_parallel_group(1)
    slots = bridge.fp32_master_slots(engine)  # contract 8
    masters = [
        slots[p][0].detach()[slots[p][1] : slots[p][1] + p.numel()].view(p.shape)
        for p in model.parameters()
        if p in slots
    ]
    return {
        "master_slots": len(slots),
        "masters_round_to_params": all(
            master.dtype == torch.float32 and torch.equal(master.to(p.dtype), p.detach())
            for master, p in zip(masters, model.parameters())
        ),
        "num_params": len(list(model.parameters())),
        "has_moe_layers": engine.has_moe_layers,
        "expert_groups": sorted(engine.expert_data_parallel_group),
        "edp_size": torch.distributed.get_world_size(edp),
        "moe_group_names": sorted(g["name"] for g in engine.optimizer.param_groups if g.get("moe")),
        "router_weight": router.weight.dtype,
        "expert_weight": experts.w1.dtype,
        "attention_weight": attention.qkv.weight.dtype,
        "router_moved": not torch.equal(before, router.weight.detach().float()),
        "experts_moved": not torch.equal(expert_before, experts.w1.detach().float()),
        "expert_w1": experts.w1.detach().float().flatten().tolist(),  # no tensors across processes
        "losses": losses,
        **{f"dtype_{k}": v for k, v in seen.items()},
    }


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_engine_has_moe_layers_expert_groups_and_syncs_experts_over_two_ranks(tmp_path, stage):
    results = run_ranks(2, _engine_body, tmp_path, stage, "fp32")
    for r in results:
        assert r["has_moe_layers"] and r["expert_groups"] == ["ep_size_1"] and r["edp_size"] == 2
        assert r["router_moved"] and r["experts_moved"]
        if stage:
            assert r["moe_group_names"] == ["ep_size_1"]
    # Different data per rank, yet expert weights agree: their gradients were all-reduced.
    assert results[0]["expert_w1"] == results[1]["expert_w1"]
    assert results[0]["losses"] != results[1]["losses"]


@pytest.mark.slow
def test_bf16_autocast_keeps_router_fp32_while_matmuls_run_in_bf16(tmp_path):
    """Default precision: router weight and logits fp32; attention and expert matmuls bf16."""
    (r,) = run_ranks(1, _engine_body, tmp_path, 1, "bf16")
    assert r["router_weight"] == torch.float32 and r["dtype_logits"] == torch.float32
    assert r["dtype_router_input"] == torch.float32
    assert r["dtype_qkv_out"] == torch.bfloat16 and r["dtype_experts_out"] == torch.bfloat16
    assert (
        r["expert_weight"] == torch.float32 and r["attention_weight"] == torch.float32
    )  # fp32 masters
    assert r["router_moved"] and all(torch.isfinite(torch.tensor(r["losses"])))
    assert r["master_slots"] == 0  # fp32 parameters are their own masters


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_bf16_params_stores_bf16_weights_with_fp32_routing_math(tmp_path, stage):
    (r,) = run_ranks(1, _engine_body, tmp_path, stage, "bf16-params")
    assert r["router_weight"] == torch.bfloat16 and r["expert_weight"] == torch.bfloat16
    assert r["attention_weight"] == torch.bfloat16
    # Activations reach the router in bf16; it computes logits (and softmax, top-k) in fp32.
    assert r["dtype_router_input"] == torch.bfloat16 and r["dtype_logits"] == torch.float32
    assert r["dtype_experts_out"] == torch.bfloat16 and r["router_moved"]
    # Contract 8: at ZeRO 0 every bf16 parameter has an fp32 master slot that rounds to it;
    # under ZeRO 1 the masters are reached through _hp_mapping instead.
    if stage == 0:
        assert r["master_slots"] == r["num_params"] and r["masters_round_to_params"]
    else:
        assert r["master_slots"] == 0


def _relink_body(rank: int, world_size: int) -> dict:
    """One AdamW step under ZeRO 1 and 2 with two parameter groups; read the second's moments."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    betas = (0.9, 0.999)
    results = {}
    for stage in (1, 2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 2, bias=False)
        )
        first, second = model[0].weight, model[1].weight
        x = torch.randn(5, 4)
        # float64 oracle of the gradient; after one step Adam holds (1-b1) g and (1-b2) g^2.
        w0 = first.detach().double().requires_grad_()
        w1 = second.detach().double().requires_grad_()
        ((x.double() @ w0.T @ w1.T) ** 2).sum().backward()
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "betas": list(betas),
                                                      "weight_decay": 0.0, "torch_adam": True}},
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9,
        }  # fmt: skip
        groups = [{"name": "a", "params": [first]}, {"name": "b", "params": [second]}]
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
        loss = (engine(x) ** 2).sum()
        engine.backward(loss)
        engine.step()
        first_ok = first.get_full_hp_param("exp_avg") is not None  # group 0 is linked
        try:
            second.get_full_hp_param("exp_avg")
            unlinked_error = None
        except ValueError as err:
            unlinked_error = str(err)
        bridge.link_optimizer_state(engine)
        base = bridge.base_optimizer(engine)  # contract 11
        assert base is engine.optimizer.optimizer and isinstance(base, torch.optim.AdamW)
        assert bridge.has_partitioned_master(second)
        # A write of the master lands in the base optimizer's fp32 partition and reads back.
        target = torch.arange(second.numel(), dtype=torch.float32).view(second.shape)
        bridge.write_partitioned_master(second, target, None)
        written = bridge.read_partitioned_master(second, None)
        flat = base.param_groups[1]["params"][0]  # group 1's fp32 partition (one rank: all of it)
        results[stage] = {
            "first_ok": first_ok,
            "unlinked_error": unlinked_error,
            "master_written": torch.equal(written, target),
            "master_in_base": torch.equal(
                base.param_groups[1]["params"][0][: second.numel()], target.flatten()
            ),
            **{
                key: bridge.read_partitioned_master(second, key).flatten().tolist()
                for key in ("exp_avg", "exp_avg_sq")
            },
            **{
                f"base_{key}": base.state[flat][key][: second.numel()].tolist()
                for key in ("exp_avg", "exp_avg_sq")
            },
            "oracle_exp_avg": ((1 - betas[0]) * w1.grad).flatten().tolist(),
            "oracle_exp_avg_sq": ((1 - betas[1]) * w1.grad**2).flatten().tolist(),
        }
    return results


@pytest.mark.slow
def test_zero_relink_reads_moments_of_every_parameter_group(tmp_path):
    """Contract 6: after one ZeRO 1/2 step, the second group's moments are reachable through
    ``get_full_hp_param`` only after ``link_optimizer_state``; they equal the base optimizer's
    state and the float64 oracle (atol 1e-7)."""
    (results,) = run_ranks(1, _relink_body, tmp_path)
    for stage, r in results.items():
        assert r["first_ok"], stage
        assert r["master_written"] and r["master_in_base"], stage
        for key in ("exp_avg", "exp_avg_sq"):
            assert r[key] == r[f"base_{key}"], (stage, key)
            assert r[key] == pytest.approx(r[f"oracle_{key}"], abs=1e-7, rel=1e-5), (stage, key)
        assert max(abs(v) for v in r["exp_avg"]) > 1e-3  # a real gradient, not zeros
        # The workaround's reason: if this fails, DeepSpeed links later groups itself now.
        assert r["unlinked_error"] is not None, (
            f"deepspeed {deepspeed.__version__} (ZeRO {stage}) links every parameter group's "
            "optimizer state after the step: the relink in bridge.link_optimizer_state "
            "(contract 6) is no longer needed and can go"
        )
        assert "exp_avg not found in optimizer state fragment" in r["unlinked_error"]


def test_weight_free_load_skips_the_module_and_reapplies_the_learning_rate():
    """Contract 7: a no-op ``custom_load_fn`` replaces the module load, and the scheduler's
    state is its position only (the learning rate must be re-applied to the param groups)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    assert "custom_load_fn" in inspect.signature(DeepSpeedEngine.load_checkpoint).parameters
    source = inspect.getsource(DeepSpeedEngine.load_module_state_dict)
    assert "custom_load_fn(src=module_state_dict, dst=self.module)" in source
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=1.0)
    saved = WarmupCosineLR(optimizer, total_num_steps=10, warmup_num_steps=4)
    for _ in range(3):
        saved.step()
    assert saved.state_dict() == {"last_batch_iteration": 2}
    expected = optimizer.param_groups[0]["lr"]
    fresh_optimizer = torch.optim.AdamW([weight], lr=1.0)
    fresh = WarmupCosineLR(fresh_optimizer, total_num_steps=10, warmup_num_steps=4)
    fresh.load_state_dict(saved.state_dict())
    assert fresh_optimizer.param_groups[0]["lr"] != expected  # loading alone leaves it stale
    fresh.step(fresh.last_batch_iteration)
    assert fresh_optimizer.param_groups[0]["lr"] == expected > 0


def _single_optimizer_copy_body(rank: int, world_size: int, directory: str) -> dict:
    """Train one step at ZeRO 0 with MoE layers, save through the bridge, load into a fresh
    engine; report where the optimizer state is and whether the moments came back."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))

    def build():
        return bridge.initialize(
            _tiny_model(), _ds_config(0, "fp32"), num_experts_per_layer=[4], zero_stage=0
        )

    engine = build()
    tokens = torch.randint(0, 40, (2, 9))
    out = engine(tokens[:, :-1], targets=tokens[:, 1:])
    engine.backward(out.loss)
    engine.step()
    bridge.save_checkpoint(engine, directory, "t", {"note": 1})
    model_states = torch.load(
        os.path.join(directory, "t", "mp_rank_00_model_states.pt"), weights_only=False
    )
    expp = torch.load(
        os.path.join(directory, "t", "expp_rank_0_mp_rank_00_optim_states.pt"), weights_only=False
    )
    fresh = build()
    _, client_state = fresh.load_checkpoint(directory, tag="t")

    def moments(e):
        return [s["exp_avg"] for s in e.optimizer.state.values()]

    return {
        "model_states_optimizer": model_states["optimizer"],
        "expp_has_state": bool(expp["optimizer"]["state"]),
        "client_state": client_state["note"],
        "moments_restored": all(torch.equal(a, b) for a, b in zip(moments(engine), moments(fresh)))
        and len(moments(fresh)) == len(moments(engine)) > 0,
    }


@pytest.mark.slow
def test_moe_checkpoint_at_zero0_holds_the_optimizer_state_once(tmp_path):
    """Contract 10: the model-states copy of the optimizer state is dropped; the expp file's
    copy is the one that loads, with every Adam moment."""
    (r,) = run_ranks(1, _single_optimizer_copy_body, tmp_path, str(tmp_path / "ckpt"))
    assert r["model_states_optimizer"] is None
    assert r["expp_has_state"] and r["client_state"] == 1
    assert r["moments_restored"], (
        f"deepspeed {deepspeed.__version__} no longer restores the optimizer from the expp file "
        "at ZeRO 0 with MoE layers: bridge.save_checkpoint (contract 10) must keep its copy"
    )


# The layout's groups inside the engine (4 ranks) ------------------------------------------


def _groups_body(rank: int, world_size: int, cases: list) -> dict:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    import torch.distributed as dist
    from deepspeed.utils import groups as ds_groups

    from parallel.layout import ParallelLayout, ProcessGroups
    from tests.parallel.test_tp_engine import TinyTPModel, ds_config

    out = {}
    for (dp, tp, ep), stage in cases:
        groups = ParallelLayout(dp=dp, tp=tp, ep=ep).build(num_experts=4)
        model = TinyTPModel(groups, "ep")
        engine = bridge.initialize(
            model, ds_config(stage), groups=groups, num_experts_per_layer=[4], zero_stage=stage
        )
        name = bridge.expert_group_name(ep)
        seen = {
            "dp": dist.get_process_group_ranks(engine.data_parallel_group),
            "ep": dist.get_process_group_ranks(engine.expert_parallel_group[name]),
            "edp": dist.get_process_group_ranks(engine.expert_data_parallel_group[name]),
            "dp_world_size": engine.dp_world_size,
            "mp_world_size": engine.mp_world_size,
        }
        # What DeepSpeed's own builder makes with our mpu in place (pp read from it).
        dicts = (
            ds_groups._EXPERT_PARALLEL_GROUP,
            ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
            ds_groups._EXPERT_DATA_PARALLEL_GROUP,
            ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
        )
        ours = [d.pop(name) for d in dicts]
        ds_groups._create_expert_and_data_parallel(ep)
        seen["ds_ep"] = list(ds_groups._get_expert_parallel_group_ranks(name))
        seen["ds_edp"] = list(ds_groups._get_expert_data_parallel_group_ranks(name))
        for d, value in zip(dicts, ours):
            d[name] = value
        wrong = ProcessGroups(layout=ParallelLayout(dp=4, ep=ep), mesh=None, rank=rank)
        try:
            bridge.check_engine_groups(engine, wrong)
            seen["mismatch"] = None
        except RuntimeError as err:
            seen["mismatch"] = str(err)
        out[(dp, tp, ep)] = seen
    return out


@pytest.mark.slow
def test_engine_groups_are_the_layouts_on_four_ranks(tmp_path):
    """dp=2 x tp=2 with ep=2 (EP = the TP pair) and with ep=4 (EP across the DP replicas),
    tp=4 with ep=2: the engine's data-parallel, expert-parallel and expert-data-parallel
    groups are the layout's, and equal what DeepSpeed's own builder makes with our mpu."""
    from parallel.layout import ParallelLayout

    cases = [((2, 2, 2), 1), ((2, 2, 4), 0), ((1, 4, 2), 1)]
    results = run_ranks(4, _groups_body, tmp_path, cases, timeout=120)
    for rank, per_case in enumerate(results):
        for (dp, tp, ep), _ in cases:
            layout = ParallelLayout(dp=dp, tp=tp, ep=ep)
            seen = per_case[(dp, tp, ep)]
            assert seen["dp"] == layout.ranks_of("dp", rank)
            assert seen["ep"] == seen["ds_ep"] == layout.ranks_of("ep", rank)
            assert seen["edp"] == seen["ds_edp"] == layout.ranks_of("edp", rank)
            assert (seen["dp_world_size"], seen["mp_world_size"]) == (dp, tp)
            message = seen["mismatch"]
            assert message.startswith(f"DeepSpeed's data-parallel group of rank {rank} holds ")
            assert f"holds ranks {layout.ranks_of('dp', rank)}, the layout dp=4" in message
            assert "has [0, 1, 2, 3]" in message and "\n" not in message
