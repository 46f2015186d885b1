"""Attention under tensor parallelism: ``parallelize(group)`` equals the unparallelized module.

Which methods support tensor parallelism (``supports_tensor_parallel``) and why:

* full, bigbird, local, hypercube, performer, treeformer, linformer, deberta, mgk, long_short,
  spade: heads are independent, so each rank runs num_heads / tp of them. Per-head state is
  cut with the heads (bigbird's random plan is drawn per global head index; local/spade's T5
  bias table and treeformer's hyperplanes and mgk's priors are sliced); what all heads share
  stays replicated (performer's feature matrix, linformer's E and F, deberta's relative table,
  spade's S4D branch). long_short's DualLN normalises across all D features, so the sharded
  LayerNorm sums its statistics over the group.
* gau, flash: single-head gated units; tensor parallelism cuts the expanded width e instead
  (U and V column-wise, W_o row-wise) and computes Z and the relu² weights on every rank.
* evolving: not supported; its 3x3 convolution mixes the attention maps of all heads.

The slow test runs every supported method in one spawn of two gloo processes (about 10 s):
fp32, forward and backward with a padding mask (and causal where supported); outputs and
input gradients to atol 1e-5, each sharded parameter's gradient against the matching slice of
the reference gradient (by ``partition_dim``), replicated ones against the whole. mgk's
soft-EM priors are also checked in training mode (E-step of the local heads).
"""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

import attention
from attention.base import HeadLinear, make_linear
from tests.dist import run_ranks

D, H, B, N = 16, 4, 2, 12
ATOL = 1e-5

# (label, method, causal, options): small settings that exercise every code path at n = 12.
CASES: list[tuple[str, str, bool, dict]] = [
    ("full", "full", True, {}),
    ("bigbird", "bigbird", False, {"block_size": 2, "num_random_blocks": 1}),
    ("local", "local", True, {"radius": 3}),
    ("hypercube", "hypercube", False, {"block_size": 2}),
    ("performer", "performer", True, {"nb_features": 8, "chunk_size": 4}),
    ("performer/bidirectional", "performer", False, {"nb_features": 8}),
    ("treeformer/tf", "treeformer", False, {"leaf_size": 4, "max_height": 2, "query_block": 4}),
    ("treeformer/tc", "treeformer", False, {"mode": "tc", "leaf_size": 4, "max_height": 2}),
    ("linformer", "linformer", False, {"k": 4, "n_max": N}),
    ("linformer/share_kv", "linformer", False, {"k": 4, "n_max": N, "share_kv": True}),
    ("deberta", "deberta", True, {"position_buckets": 4, "max_relative_positions": 8}),
    (
        "deberta/own_position_projections",
        "deberta",
        False,
        {"position_buckets": 4, "max_relative_positions": 8, "share_att_key": False},
    ),
    ("mgk", "mgk", True, {"num_components": 2}),
    ("mgk/per_position", "mgk", False, {"prior_per_position": True, "max_len": N}),
    ("long_short", "long_short", False, {"window_size": 4, "num_landmarks": 3}),
    ("long_short/causal", "long_short", True, {"window_size": 4, "chunk_size": 4}),
    ("spade", "spade", True, {"radius": 3, "d_state": 4}),
    ("spade/stack", "spade", False, {"radius": 3, "d_state": 4, "combine": "stack"}),
    ("gau", "gau", True, {"qk_dim": 8, "max_relative_distance": 4}),
    ("flash", "flash", True, {"qk_dim": 8, "chunk_size": 4, "max_relative_distance": 4}),
    ("flash/bidirectional", "flash", False, {"qk_dim": 8, "chunk_size": 4}),
]


# Cheap ---------------------------------------------------------------------------------


def builtin(names: list[str]) -> list[str]:
    """Without the methods other test modules register (``test_...``) in the same session."""
    return [name for name in names if not name.startswith("test_")]


def test_every_method_declares_the_flag_and_only_evolving_lacks_support() -> None:
    for name in builtin(attention.available()):
        cls = attention.get(name)
        owners = [k for k in cls.__mro__ if "supports_tensor_parallel" in vars(k)]
        assert owners[0] is not attention.Attention, f"{name} does not set the flag itself"
        assert isinstance(cls.supports_tensor_parallel, bool)
    expected = sorted(set(builtin(attention.available())) - {"evolving"})
    assert builtin(attention.tensor_parallel_methods()) == expected


def test_the_slow_test_covers_every_supported_method() -> None:
    assert {method for _, method, _, _ in CASES} == set(
        builtin(attention.tensor_parallel_methods())
    )


def test_check_tensor_parallel_messages() -> None:
    with pytest.raises(ValueError) as err:
        attention.check_tensor_parallel("evolving", 4, 2)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("attention 'evolving' does not support tensor parallelism (")
    assert "heads" in message and message.endswith("; use parallel.tp=1 or another method")
    with pytest.raises(
        ValueError, match=r"^model\.num_heads \(6\) must be divisible by parallel\.tp \(4\)$"
    ):
        attention.check_tensor_parallel("full", 6, 4)
    with pytest.raises(ValueError, match=r"parallel\.tp \(0\) must be >= 1"):
        attention.check_tensor_parallel("full", 4, 0)
    with pytest.raises(ValueError, match="unknown attention"):
        attention.check_tensor_parallel("nope", 4, 2)
    attention.check_tensor_parallel("evolving", 6, 1)  # tp = 1 is always fine
    attention.check_tensor_parallel("full", 6, 3)
    attention.check_tensor_parallel("gau", 3, 2)  # single-head unit: heads are not split


@pytest.mark.parametrize("name", ["gau", "flash"])
def test_gated_units_name_the_expanded_width_that_tp_must_divide(name: str) -> None:
    module = attention.build(name, d_model=6, num_heads=1, expansion=2)
    with pytest.raises(ValueError) as err:
        module.core.check_tensor_parallel(name, 5)
    assert str(err.value) == (
        f"attention '{name}' expanded width (expansion * model.d_model = 12) must be "
        "divisible by parallel.tp (5)"
    )
    module.core.check_tensor_parallel(name, 4)


@pytest.mark.parametrize("name", ["full", "deberta", "evolving", "gau"])
def test_parallelize_without_a_group_is_a_no_op(name: str) -> None:
    torch.manual_seed(0)
    module = attention.build(name, d_model=D, num_heads=H).eval()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    kinds = [type(m) for m in module.modules()]
    x = torch.randn(B, N, D)
    y_before, _ = module(x)
    module.parallelize(None)
    assert module.tp == 1 and module.num_local_heads == H
    assert [type(m) for m in module.modules()] == kinds
    after = module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(module(x)[0], y_before)


def test_factory_linear_draws_like_nn_linear() -> None:
    torch.manual_seed(3)
    made = make_linear(8, 12, split="column", parts=3)
    torch.manual_seed(3)
    plain = nn.Linear(8, 12)
    assert isinstance(made, nn.Linear)
    assert torch.equal(made.weight, plain.weight) and torch.equal(made.bias, plain.bias)
    x = torch.randn(5, 8)
    assert torch.allclose(made.forward_part(1, x), plain(x).chunk(3, dim=-1)[1], atol=1e-6)


def test_a_fused_linear_cut_without_a_group_is_the_same_layer() -> None:
    made = make_linear(8, 12, split="column", parts=3)
    x = torch.randn(5, 8)
    assert torch.allclose(made.shard(None, timedelta(seconds=5))(x), made(x), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by parts"):
        make_linear(8, 10, parts=3)


# Two processes ---------------------------------------------------------------------------


def _reference_grad(
    reference: nn.Module, name: str, param: nn.Parameter, rank: int
) -> torch.Tensor:
    """The slice of the reference module's gradient that ``param`` (named ``name``) holds:
    contiguous along ``partition_dim``, or with ``partition_stride`` s the blocks rank,
    tp + rank, ... of the full gradient cut into s * tp blocks (a fused q|k|v shard)."""
    full = reference.get_parameter(name).grad
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    tp = full.shape[dim] // param.shape[dim]
    blocks = full.chunk(stride * tp, dim=dim)
    return torch.cat([blocks[j * tp + rank] for j in range(stride)], dim=dim)


def _compare(label: str, method: str, causal: bool, options: dict, rank: int) -> list[str]:
    torch.manual_seed(0)
    reference = attention.build(method, d_model=D, num_heads=H, causal=causal, **options)
    with torch.no_grad():  # zero-initialised tables and offsets would hide a wrong slice
        for param in reference.parameters():
            param.add_(0.1 * torch.randn_like(param))
    reference.eval()  # no dropout, no performer redraw: deterministic on both sides
    model = copy.deepcopy(reference)
    model.parallelize(dist.group.WORLD, timeout=timedelta(seconds=60))
    names = [n for n, _ in model.named_parameters()]
    if names != [n for n, _ in reference.named_parameters()]:  # checkpoints key by name
        return [f"{label}: parameter names differ from tp=1: {names}"]
    x = torch.randn(B, N, D)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, N - 3 :] = False
    grad_y = torch.randn(B, N, D)
    outputs = []
    for module in (reference, model):
        xg = x.clone().requires_grad_(True)
        y, _ = module(xg, key_padding_mask=mask)
        (y * grad_y).sum().backward()
        outputs.append((y.detach(), xg.grad))
    failures = []
    (y_ref, gx_ref), (y_tp, gx_tp) = outputs
    if not torch.allclose(y_tp, y_ref, atol=ATOL, rtol=0):
        failures.append(f"{label}: output differs by {(y_tp - y_ref).abs().max():.2e}")
    if not torch.allclose(gx_tp, gx_ref, atol=ATOL, rtol=0):
        failures.append(f"{label}: input grad differs by {(gx_tp - gx_ref).abs().max():.2e}")
    sharded = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        expected = _reference_grad(reference, name, param, rank)
        sharded += bool(getattr(param, "tensor_model_parallel", False))
        if param.grad is None or param.grad.shape != expected.shape:
            failures.append(
                f"{label}: {name} grad missing or shaped {param.grad and param.grad.shape}"
            )
        elif not torch.allclose(param.grad, expected, atol=ATOL, rtol=1e-5):
            diff = (param.grad - expected).abs().max()
            failures.append(f"{label}: {name} grad differs by {diff:.2e}")
    if sharded == 0:
        failures.append(f"{label}: no parameter was sharded")
    if not any(isinstance(m, HeadLinear) for m in reference.modules()):
        failures.append(f"{label}: no projection made by make_linear")
    return failures


def _mgk_soft_em(rank: int) -> list[str]:
    """Training-mode soft-EM priors: the E-step of the local heads, over a one-rank em_group
    (here the data-parallel group is each rank alone), then the updated prior in use."""
    singletons = [dist.new_group([r]) for r in range(dist.get_world_size())]
    torch.manual_seed(0)
    reference = attention.build("mgk", d_model=D, num_heads=H, causal=True, prior="soft_em")
    model = copy.deepcopy(reference)
    try:
        model.parallelize(dist.group.WORLD)
        return ["mgk/soft_em: parallelize without em_group did not raise"]
    except ValueError as err:
        if "em_group" not in str(err):
            return [f"mgk/soft_em: unexpected message {err}"]
    reference.em_group = singletons[rank]
    model.em_group = singletons[rank]
    model.parallelize(dist.group.WORLD)
    failures = []
    for step in range(2):  # the second forward uses the prior the first E-step computed
        x = torch.randn(B, N, D)
        y_ref, _ = reference(x)
        y_tp, _ = model(x)
        if not torch.allclose(y_tp, y_ref, atol=ATOL, rtol=0):
            failures.append(f"mgk/soft_em step {step}: output differs")
    heads = slice(rank * H // 2, (rank + 1) * H // 2)
    if not torch.allclose(model.prior_pending, reference.prior_pending[:, heads], atol=1e-6):
        failures.append("mgk/soft_em: the E-step of the local heads differs")
    return failures


def _all_methods(rank: int, world_size: int) -> list[str]:
    torch.set_num_threads(1)
    failures = []
    for case in CASES:
        try:
            failures += _compare(*case, rank)
        except Exception as err:  # noqa: BLE001 - report every method, not just the first
            failures.append(f"{case[0]}: {type(err).__name__}: {err}")
    evolving = attention.build("evolving", d_model=D, num_heads=H)
    try:
        evolving.parallelize(dist.group.WORLD)
        failures.append("evolving: parallelize did not raise")
    except ValueError as err:
        if "attention 'evolving' does not support tensor parallelism" not in str(err):
            failures.append(f"evolving: unexpected message {err}")
    failures += _mgk_soft_em(rank)
    six_heads = attention.build("full", d_model=24, num_heads=6)
    six_heads.parallelize(dist.group.WORLD)
    if six_heads.num_local_heads != 3:
        failures.append(f"full: 6 heads over 2 ranks gave {six_heads.num_local_heads} local heads")
    return failures


@pytest.mark.slow
def test_every_supported_method_at_tp2_equals_tp1(tmp_path) -> None:
    results = run_ranks(2, _all_methods, tmp_path, timeout=240.0)
    failures = [f"rank {rank}: {line}" for rank, lines in enumerate(results) for line in lines]
    assert not failures, "\n".join(failures)
