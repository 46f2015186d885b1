"""Pipeline parallelism: stage cuts, refusals, and DeepSpeed's pipe engine equal to one process
(gloo): pp=2 (with and without a padding mask crossing the stages) at ZeRO 1 with clipping,
pp=2 at ZeRO 0 with clipping and experts on one stage only, and pp=2 x dp=2 on 4 ranks.

The model: causal LM, d_model 16, 2 heads, 4 blocks, MoE every other block (blocks 1 and 3,
dropless), tied embedding / head. Cut uniformly: stage 0 = embedding, blocks 0-1; stage 1 =
blocks 2-3, head. Both stages hold an MoE block. Reference: the same seeded model in one
process, torch AdamW, the global batch as the same micro-batches with gradient accumulation
(loss / m) and ``clip_grad_norm_`` -- what the engine does at ZeRO 1 with clipping on.
"""

from __future__ import annotations

import io
import os

import pytest
import torch
from torch import nn

from moe.config import MoEConfig
from moe.pipeline import PipeBlock, no_mask, pack, pipeline_layers, unpack
from moe.transformer import AttentionConfig, ModelConfig, Transformer
from parallel.pipeline import (
    TiedLayer,
    balanced_counts,
    block_counts,
    check_pipeline_engine,
    check_same_groups,
    check_stage_experts,
    stage_bounds,
)
from tests.dist import run_ranks

VOCAB, SEQ, MICRO, MICRO_BATCH, STEPS, LR, CLIP = 32, 8, 2, 2, 6, 1e-2, 0.5
DP_STEPS = 4  # pp=2 x dp=2 on 4 ranks


def build_model() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=VOCAB, d_model=16, num_layers=4, num_heads=2, d_ff=32, max_seq_len=SEQ
    )
    moe = MoEConfig(num_experts=4, top_k=2, capacity_factor=None, every=2, aux_loss_coef=0.1)
    model = Transformer(config, moe, AttentionConfig())
    with torch.no_grad():  # a sharper router, so aux and routing matter to the result
        for block in model.blocks:
            if block.is_moe:
                block.ffn.router.weight.mul_(10.0)
    return model


def batches(
    step: int, masked: bool = False
) -> list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """MICRO micro-batches ((input_ids, int mask), targets); ``masked``: positions 2 and 3 of
    the first row are padding (mask 0, target -100; later positions then attend to fewer
    keys, so the mask changes the loss), else no mask (0-size)."""
    generator = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(MICRO):
        ids = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=generator)
        targets = ids[:, 1:].clone()
        mask = no_mask()
        if masked:
            mask = torch.ones(MICRO_BATCH, SEQ, dtype=torch.int64)
            mask[0, 2:4] = 0
            targets[0, 2:4] = -100
        out.append(((ids[:, :-1], mask), targets))
    return out


def ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": MICRO,
        "train_batch_size": MICRO_BATCH * MICRO,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}},
        "steps_per_print": 10**9,
    }  # fmt: skip


def reference(masked: bool = False, clip: float = CLIP) -> dict:
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses, norms = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        total = 0.0
        for (ids, mask), targets in batches(step, masked):
            padding = mask.bool() if mask.numel() else None
            loss = model(ids, targets, padding).loss / MICRO
            loss.backward()
            total += loss.item()
        norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), clip)))
        optimizer.step()
        losses.append(total)
    layers = {
        i: {k: v.detach().clone() for k, v in m.state_dict().items()}
        for i, m in enumerate(model.layers)
    }
    return {"losses": losses, "norms": norms, "layers": layers}  # fmt: skip


def pp2_body(rank: int, world_size: int) -> bytes:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    from parallel import deepspeed_bridge as bridge

    bridge.init_distributed("gloo")
    # Both engines in one spawn: the same (pp, dp) layout, so the expert groups DeepSpeed
    # keeps per process stay right for the second.
    results = {masked: train_pp2(rank, masked) for masked in (False, True)}
    results["zero0_one_moe_stage"] = train_pp2(rank, False, zero=0, partition=[1, 3])
    for precision in ("autocast", "bf16"):
        results[precision] = train_pp2(rank, False, precision=precision)
    buffer = io.BytesIO()  # bytes: tensors through the queue would live in the child's shm
    torch.save(results, buffer)
    return buffer.getvalue()


def train_pp2(
    rank: int, masked: bool, zero: int = 1, partition: object = "uniform", precision: str = "fp32"
) -> dict:
    from moe.pipeline import pipeline_engine

    model = build_model()
    config = ds_config()
    if zero == 0:  # clipping stays on: the bridge clips by the norm over both stages
        config.update(zero_optimization={"stage": 0})
    if precision == "autocast":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "bf16":
        config["bf16"] = {"enabled": True}
    engine, _, counts = pipeline_engine(model, config, pp=2, dp=1, partition=partition)
    # Backward passes reaching the embedding (stage 0): one per micro-batch, though the
    # stage sends three float tensors (hidden, aux, z) that all depend on it.
    passes = [0]
    embedding = model.layers[0].embed.token.weight
    embedding.register_hook(lambda grad: passes.__setitem__(0, passes[0] + 1))
    losses, norms = [], []
    for step in range(STEPS):
        loss = engine.train_batch(iter(batches(step, masked)))
        losses.append(float(loss))
        norm = engine.get_global_grad_norm()
        norms.append(None if norm is None else float(norm))
    # Layer 0 is the embedding, 1..4 the blocks, 5 the head: stage 0 ends before parts[1].
    end = 1 + counts[0]
    held = range(0, end) if rank == 0 else range(end, len(model.layers))
    layers = {
        i: {k: v.detach().clone() for k, v in model.layers[i].state_dict().items()} for i in held
    }
    stage = engine.module.named_parameters()  # this stage only: the engine casts those
    routers = {str(p.dtype) for n, p in stage if n.endswith("router.weight")}
    return {
        "losses": losses,
        "norms": norms,
        "layers": layers,
        "counts": counts,
        "routers": routers,
        "embedding_backward_passes": passes[0],
    }


@pytest.fixture(scope="module")
def pp2_runs(tmp_path_factory):
    raw = run_ranks(2, pp2_body, tmp_path_factory.mktemp("pp2"), timeout=150)
    return [torch.load(io.BytesIO(r), weights_only=False) for r in raw]


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "padding_mask"])
def test_pp2_equals_one_process(pp2_runs, masked):
    results = [runs[masked] for runs in pp2_runs]
    expected = reference(masked)
    assert results[0]["counts"] == [2, 2]
    assert results[0]["embedding_backward_passes"] == STEPS * MICRO
    if masked:  # the mask reached the blocks of both stages and mattered
        assert abs(expected["losses"][0] - reference(False)["losses"][0]) > 1e-3
    for rank in range(2):
        torch.testing.assert_close(
            torch.tensor(results[rank]["losses"]),
            torch.tensor(expected["losses"]),
            atol=1e-5,
            rtol=0,
        )
        norms = results[rank]["norms"]
        assert None not in norms
        torch.testing.assert_close(
            torch.tensor(norms), torch.tensor(expected["norms"]), atol=1e-5, rtol=0
        )
    assert max(expected["norms"]) > CLIP  # clipping was active
    # Every parameter after the updates, on the stage that holds it; the router of block 3
    # (layer 4, stage 1) gets its gradient from the aux loss carried from stage 0's tuple too.
    # Except the key bias (the middle third of qkv.bias): softmax ignores a shift shared by
    # all keys, so its gradient is 0 up to ~1e-10 rounding, which Adam's normalised step
    # turns into lr-sized updates that differ between any two summation orders (measured:
    # up to 3e-4 after 6 steps, q and v biases within 1e-7) and never change an output.
    for rank in range(2):
        for index, state in results[rank]["layers"].items():
            for key, value in state.items():
                want = expected["layers"][index][key]
                if key.endswith("attention.qkv.bias"):
                    third = value.numel() // 3
                    value = torch.cat([value[:third], value[2 * third :]])
                    want = torch.cat([want[:third], want[2 * third :]])
                torch.testing.assert_close(value, want, atol=1e-5, rtol=0, msg=f"{index}.{key}")
    router = "ffn.router.weight"
    start = build_model().layers[4].state_dict()[router]
    assert not torch.allclose(results[1]["layers"][4][router], start)


@pytest.mark.slow
def test_pp2_zero0_with_experts_on_one_stage(pp2_runs):
    """Cut [1, 3]: stage 0 (block 0) has no expert; ZeRO 0 with clipping equals one process,
    gradient norm included (DeepSpeed's own ZeRO 0 clip would count stage 0's parameters
    only; ZeRO 1 is refused for this cut, ``check_stage_experts``)."""
    results = [runs["zero0_one_moe_stage"] for runs in pp2_runs]
    expected = reference()
    assert max(expected["norms"]) > CLIP  # clipping was active
    assert results[0]["counts"] == [1, 3]
    for rank in range(2):
        for key in ("losses", "norms"):
            torch.testing.assert_close(
                torch.tensor(results[rank][key]),
                torch.tensor(expected[key]),
                atol=1e-5,
                rtol=0,
                msg=key,
            )
    router = results[1]["layers"][4]["ffn.router.weight"]
    torch.testing.assert_close(
        router, expected["layers"][4]["ffn.router.weight"], atol=1e-5, rtol=0
    )


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["autocast", "bf16"])
def test_pp2_bf16_trains(pp2_runs, precision):
    """Smoke: bf16 autocast (router weights stay fp32) and classic bf16 (all bf16) at pp=2
    train: finite losses, the first step within 1e-2 of fp32 (measured: 6e-4; later steps
    drift apart as rounding compounds through Adam, up to 3% by step 5)."""
    expected = reference()["losses"]
    for runs in pp2_runs:
        losses = torch.tensor(runs[precision]["losses"])
        assert torch.isfinite(losses).all()
        assert abs(float(losses[0]) - expected[0]) < 1e-2
        want = {"torch.float32"} if precision == "autocast" else {"torch.bfloat16"}
        assert runs[precision]["routers"] == want


def pp2_dp2_body(rank: int, world_size: int) -> list[tuple[float, float]]:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    from moe.pipeline import pipeline_engine
    from parallel import deepspeed_bridge as bridge

    bridge.init_distributed("gloo")
    config = {**ds_config(), "train_batch_size": MICRO_BATCH * MICRO * 2}
    engine, _, _ = pipeline_engine(build_model(), config, pp=2, dp=2)
    dp_rank = engine.grid.get_data_parallel_id()
    out = []
    for step in range(DP_STEPS):
        loss = engine.train_batch(iter(batches(2 * step + dp_rank)))
        out.append((float(loss), float(engine.get_global_grad_norm())))
    return out


@pytest.mark.slow
def test_pp2_dp2_equals_one_process(tmp_path):
    """4 ranks (stages {0, 1} | {2, 3}, dp groups {0, 1} and {2, 3}): each dp rank reads its
    own micro-batches; one process accumulates both ranks' micro-batches (aux is per
    micro-batch, so the reference keeps them apart) with loss / (2 m)."""
    results = run_ranks(4, pp2_dp2_body, tmp_path, timeout=150)
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    expected = []
    for step in range(DP_STEPS):
        optimizer.zero_grad()
        total = 0.0
        for dp_rank in range(2):
            for (ids, _), targets in batches(2 * step + dp_rank):
                loss = model(ids, targets).loss / (2 * MICRO)
                loss.backward()
                total += loss.item()
        norm = float(nn.utils.clip_grad_norm_(model.parameters(), CLIP))
        optimizer.step()
        expected.append((total, norm))
    for rank in range(4):
        torch.testing.assert_close(
            torch.tensor(results[rank]), torch.tensor(expected), atol=1e-5, rtol=0
        )


# Plain units (no processes) ----------------------------------------------------------------


def test_layers_on_tuples_equal_the_model_forward():
    model = build_model()
    pipe = pipeline_layers(model)
    (ids, mask), targets = batches(0)[0]
    out = (ids, mask)
    for layer in pipe.layers:
        if isinstance(layer, TiedLayer):
            wrapper = nn.Module()
            wrapper.module = layer.module
            out = layer.forward_fn(wrapper, out) if layer.forward_fn else layer.module(out)
        else:
            out = layer(out)
    expected = model(ids, targets)
    torch.testing.assert_close(out[0], expected.logits)
    torch.testing.assert_close(pipe.loss_fn(out, targets), expected.loss)
    assert out[1].requires_grad and out[2].requires_grad
    assert pipe.moe_blocks == [1, 3] and pipe.num_experts_per_layer == [4, 4]
    assert sum(pipe.block_parameters) == sum(p.numel() for p in model.parameters())


def test_pack_round_trip_keeps_mask_and_none():
    hidden = torch.randn(2, 3, 4)
    zero = torch.zeros(())
    acts = unpack((hidden, zero, zero, no_mask()))
    assert acts.padding_mask is None
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    back = pack(unpack((hidden, zero, zero, mask)))
    assert back[3].dtype == torch.int64 and torch.equal(back[3], mask)


def test_block_keeps_routing_stats():
    model = build_model()
    block = PipeBlock(model.blocks[1])
    hidden = torch.randn(2, SEQ, 16)
    zero = hidden.sum() * 0
    block((hidden, zero, zero, no_mask()))
    block((hidden, zero, zero, no_mask()))
    assert len(block.routing_log) == 2  # one per micro-batch until collected
    assert int(block.last_routing.tokens_per_expert.sum()) == 2 * SEQ * 2  # top_k 2


def test_cuts():
    assert block_counts("uniform", 5, 2) == [3, 2]
    assert balanced_counts([1, 1, 1, 9], 2) == [3, 1]
    assert block_counts([1, 3], 4, 2) == [1, 3]
    assert stage_bounds([2, 2], 7) == [0, 3, 7]
    with pytest.raises(ValueError, match="pp_partition"):
        block_counts([1, 2], 4, 2)
    with pytest.raises(ValueError, match="lower parallel.pp"):
        block_counts("uniform", 2, 3)


def test_refusals():
    with pytest.raises(ValueError, match="ZeRO 0 and 1 only"):
        check_pipeline_engine(2, 2)
    check_pipeline_engine(2, 0)
    check_pipeline_engine(2, 1)
    check_pipeline_engine(1, 2)
    with pytest.raises(ValueError, match=r"stages \[1\]"):
        check_stage_experts([2, 0], 1)
    check_stage_experts([1, 1], 1)
    check_stage_experts([0, 2], 0)
    with pytest.raises(ValueError, match="rank 1"):
        check_same_groups([["decay", "moe"], ["decay"]])


def test_cross_layer_attention_is_refused():
    config = ModelConfig(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2, d_ff=32)
    attn = AttentionConfig(name="evolving")
    try:
        model = Transformer(config, None, attn)
    except ValueError:
        pytest.skip("no 'evolving' attention method registered")
    with pytest.raises(ValueError, match="cannot cross pipeline stages|shares a module"):
        pipeline_layers(model)


def test_engine_refuses_before_building():
    from moe.pipeline import pipeline_engine

    model = build_model()  # MoE blocks 1 and 3: the cut [1, 3] leaves stage 0 only block 0
    with pytest.raises(ValueError, match=r"stages \[0\] would hold no MoE block"):
        pipeline_engine(model, ds_config(), pp=2, dp=1, partition=[1, 3])
    config = {**ds_config(), "zero_optimization": {"stage": 2}}
    with pytest.raises(ValueError, match="ZeRO 0 and 1 only"):
        pipeline_engine(model, config, pp=2, dp=1)
