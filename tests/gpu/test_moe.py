"""The MoE layer on DEVICE (CUDA) equals the same layer on the CPU.

fp32, forward (output, aux and z losses, kept counts) and backward (input and every parameter
gradient) to atol 1e-5 / rtol 1e-4: the grouped layout with the kernel ``auto`` picks on the
device (torch._grouped_mm where it runs, else the loop) and with the loop forced
(``impl="loop"``), the buffer layout, and ``simulate_ep=4`` against the CPU simulation. The
kernel's own choice is also checked where it runs (bf16, against the loop on the device). Under
bf16 autocast the router weight, logits and probabilities and both losses stay fp32. Routing
is sharp (router weights x 20) so that a last-bit difference between devices cannot flip an
expert choice; expert 3 receives no token, the case a grouped kernel gets wrong most easily.

    .venv/bin/python -m pytest -q -m gpu tests/gpu                  # on a CUDA machine
    MOEFORGE_TEST_DEVICE=cpu .venv/bin/python -m pytest -q -m gpu tests/gpu   # the code, on CPU
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch

from moe.experts import GroupedExperts, grouped_kernel_reason, grouped_matmul
from moe.layer import MoELayer, MoEOutput
from tests.gpu.device import DEVICE, assert_close, assert_same_grads, grads, on_device

pytestmark = pytest.mark.gpu

D, FF, E, TOKENS = 32, 64, 8, 48
EMPTY = 3  # the expert no token reaches
TOL = dict(atol=1e-5, rtol=1e-4)
AUX, Z = 0.3, 0.05

CASES: dict[str, dict[str, Any]] = {
    "top1_drop": dict(top_k=1, capacity_factor=1.0),
    "top2_drop_swiglu": dict(top_k=2, capacity_factor=1.0, activation="swiglu"),
    "top2_dropless_gelu": dict(top_k=2, capacity_factor=None, activation="gelu"),
    "top1_shared_expert": dict(top_k=1, capacity_factor=1.25, shared_expert=True),
}


def make_layer(**kwargs: Any) -> MoELayer:
    """A CPU layer with sharp routing in which expert EMPTY never receives a token."""
    torch.manual_seed(0)
    layer = MoELayer(D, FF, E, min_capacity=1, **kwargs)
    with torch.no_grad():
        layer.router.weight.mul_(20.0)
        layer.router.weight[EMPTY] = 0.0
        layer.router.weight[EMPTY, 0] = -100.0
    return layer


def make_batch(tokens: int = TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU input [2, tokens / 2, D] (x[..., 0] > 0 keeps expert EMPTY empty) and upstream grad."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, tokens // 2, D, generator=generator)
    x[..., 0] = x[..., 0].abs() + 1.0
    return x, torch.randn(2, tokens // 2, D, generator=generator)


def force_impl(layer: MoELayer, impl: str) -> MoELayer:
    """The layer with its experts' grouped matmul forced to ``impl`` ("auto" leaves it)."""
    if impl != "auto":
        experts = layer.experts
        experts.forward = functools.partial(GroupedExperts.forward, experts, impl=impl)
    return layer


def step(
    layer: MoELayer, x: torch.Tensor, upstream: torch.Tensor
) -> tuple[MoEOutput, torch.Tensor]:
    """Forward on the layer's device and backward of sum(out * upstream) + AUX aux + Z z."""
    device = layer.router.weight.device
    x = x.to(device).requires_grad_(True)
    out = layer(x)
    loss = (out.output * upstream.to(device)).sum() + AUX * out.aux_loss + Z * out.z_loss
    loss.backward()
    return out, x.grad


def assert_same_step(layer_cpu: MoELayer, layer_dev: MoELayer, what: str) -> None:
    x, upstream = make_batch()
    want, want_dx = step(layer_cpu, x, upstream)
    got, got_dx = step(layer_dev, x, upstream)
    assert got.output.device.type == DEVICE.type, f"{what}: output on {got.output.device}"
    assert want.tokens_per_expert[EMPTY] == 0, f"{what}: expert {EMPTY} must stay empty"
    assert_close(got.tokens_per_expert, want.tokens_per_expert, f"{what}: tokens_per_expert")
    assert got.capacity == want.capacity, f"{what}: capacity {got.capacity} != {want.capacity}"
    assert_close(got.dropped_fraction, want.dropped_fraction, f"{what}: dropped_fraction")
    assert_close(got.output, want.output, f"{what}: output", **TOL)
    assert_close(got.aux_loss, want.aux_loss, f"{what}: aux_loss", **TOL)
    assert_close(got.z_loss, want.z_loss, f"{what}: z_loss", **TOL)
    assert_close(got_dx, want_dx, f"{what}: input grad", **TOL)
    assert_same_grads(layer_dev, layer_cpu, what, **TOL)


@pytest.mark.parametrize("impl", ["auto", "loop"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_grouped_layout_equals_cpu(case: str, impl: str) -> None:
    cpu = make_layer(expert_layout="grouped", **CASES[case])
    dev = force_impl(on_device(cpu), impl)
    assert_same_step(force_impl(cpu, impl), dev, f"{case}/grouped/{impl}")


@pytest.mark.parametrize("case", ["top1_drop", "top2_drop_swiglu"])
def test_buffer_layout_equals_cpu(case: str) -> None:
    cpu = make_layer(expert_layout="buffer", **CASES[case])
    assert_same_step(cpu, on_device(cpu), f"{case}/buffer")


@pytest.mark.parametrize("scope", ["per_rank", "global"])
@pytest.mark.parametrize("case", ["top1_drop", "top2_drop_swiglu", "top2_dropless_gelu"])
def test_simulated_ep4_equals_cpu_simulation(case: str, scope: str) -> None:
    cpu = make_layer(expert_layout="grouped", simulate_ep=4, capacity_scope=scope, **CASES[case])
    assert_same_step(cpu, on_device(cpu), f"{case}/simulate_ep=4/{scope}")


@pytest.mark.parametrize("impl", ["auto", "loop"])
@pytest.mark.parametrize("width", [32, 12], ids=["aligned", "unaligned"])
def test_grouped_matmul_equals_cpu(impl: str, width: int) -> None:
    """Uneven groups with an empty one; width 12 (48-byte fp32 rows, 24-byte bf16 rows) is
    not the 16-byte multiple torch._grouped_mm needs, so ``auto`` must pad or fall back."""
    generator = torch.Generator().manual_seed(2)
    sizes = torch.tensor([5, 0, 9, 1, 7])
    x = torch.randn(int(sizes.sum()), width, generator=generator)
    weight = torch.randn(len(sizes), width, 16, generator=generator)
    upstream = torch.randn(int(sizes.sum()), 16, generator=generator)
    results = []
    for device in (torch.device("cpu"), DEVICE):
        xd = x.to(device).requires_grad_(True)
        wd = weight.to(device).requires_grad_(True)
        y = grouped_matmul(xd, wd, sizes.to(device), impl=impl)
        (y * upstream.to(device)).sum().backward()
        results.append((y, xd.grad, wd.grad))
    for label, got, want in zip(("output", "x grad", "weight grad"), results[1], results[0]):
        assert_close(got, want, f"grouped_matmul {impl} width {width}: {label}", **TOL)
    assert results[1][2][1].abs().max() == 0, "the empty group's weight grad must be zero"


def test_kernel_auto_picks_equals_loop_in_bf16() -> None:
    """bf16 on the device (where torch._grouped_mm is meant to run): whatever ``auto`` picks
    equals the loop on the same device to bf16 rounding (both accumulate in fp32)."""
    if DEVICE.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(DEVICE)} has no bf16")
    generator = torch.Generator().manual_seed(3)
    sizes = torch.tensor([40, 0, 72, 8, 24, 16, 0, 96])
    x = torch.randn(int(sizes.sum()), 64, generator=generator).to(DEVICE, torch.bfloat16)
    weight = torch.randn(len(sizes), 64, 128, generator=generator).to(DEVICE, torch.bfloat16)
    upstream = torch.randn(int(sizes.sum()), 128, generator=generator).to(DEVICE, torch.bfloat16)
    results = {}
    for impl in ("auto", "loop"):
        xd, wd = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        y = grouped_matmul(xd, wd, sizes.to(DEVICE), impl=impl)
        (y.float() * upstream.float()).sum().backward()
        results[impl] = (y, xd.grad, wd.grad)
    for i, label in enumerate(("output", "x grad", "weight grad")):
        got, want = results["auto"][i].float(), results["loop"][i].float()
        scale = want.abs().max().item()
        assert_close(got, want, f"bf16 auto vs loop: {label}", atol=2e-2 * scale, rtol=2e-2)


@pytest.mark.parametrize("layout", ["grouped", "buffer"])
def test_bf16_autocast_keeps_router_and_losses_fp32(layout: str) -> None:
    if DEVICE.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(DEVICE)} has no bf16")
    reference = on_device(make_layer(expert_layout=layout, top_k=2, capacity_factor=1.0))
    layer = on_device(reference)
    x, upstream = make_batch()
    x, upstream = x.to(DEVICE), upstream.to(DEVICE)
    want = reference(x)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = layer(x)
        rows = x.reshape(-1, D)
        logits = layer.router.logits(rows.to(torch.bfloat16))
        routing = layer.router(rows)
        loss = (out.output.float() * upstream).sum() + AUX * out.aux_loss + Z * out.z_loss
    loss.backward()
    assert layer.router.weight.dtype == torch.float32
    assert layer.router.weight.grad.dtype == torch.float32
    for name, tensor in (
        ("logits of a bf16 input", logits),
        ("routing probs", routing.probs),
        ("routing gate", routing.gate),
        ("aux_loss", out.aux_loss),
        ("z_loss", out.z_loss),
    ):
        assert tensor.dtype == torch.float32, f"{name} is {tensor.dtype} under bf16 autocast"
    # The router is exact, so routing equals fp32's; only the experts run in bf16.
    assert_close(out.tokens_per_expert, want.tokens_per_expert, "bf16 tokens_per_expert")
    assert_close(out.aux_loss, want.aux_loss, "bf16 aux_loss", **TOL)
    assert_close(out.z_loss, want.z_loss, "bf16 z_loss", **TOL)
    scale = want.output.abs().max().item()
    assert_close(out.output.float(), want.output, "bf16 output", atol=3e-2 * scale, rtol=3e-2)
    for name, p in layer.named_parameters():
        assert p.grad is not None and bool(p.grad.isfinite().all()), f"{name}: grad not finite"


def test_grouped_kernel_serves_bf16_on_hopper_and_blackwell() -> None:
    """On compute capability 9.x/10.x the probe must accept bf16: a silent fallback to the
    loop there would pass every comparison above while losing the one-kernel path."""
    if DEVICE.type != "cuda":
        pytest.skip(f"{DEVICE.type} never runs the grouped kernel")
    major, minor = torch.cuda.get_device_capability(DEVICE)
    if major not in (9, 10):
        pytest.skip(f"compute capability {major}.{minor}: torch._grouped_mm is a loop there")
    reason = grouped_kernel_reason(DEVICE, torch.bfloat16)
    assert reason is None, f"the grouped kernel refused bf16 on {major}.{minor}: {reason}"


def test_layer_grouped_kernel_equals_loop_under_bf16_autocast() -> None:
    """The whole layer (swiglu, top-2, drops) under bf16 autocast: torch._grouped_mm forced and
    the loop forced agree in output and every gradient to bf16 rounding. (On the CPU, forced,
    torch._grouped_mm is torch's own per-expert fallback: the test's code runs, not a kernel.)"""
    reason = grouped_kernel_reason(DEVICE, torch.bfloat16)
    if DEVICE.type == "cuda" and reason is not None:
        pytest.skip(reason)
    base = on_device(make_layer(expert_layout="grouped", **CASES["top2_drop_swiglu"]))
    x, upstream = make_batch()
    x, upstream = x.to(DEVICE), upstream.to(DEVICE)
    results = {}
    for impl in ("grouped", "loop"):
        layer = force_impl(copy.deepcopy(base), impl)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            out = layer(x)
            loss = (out.output.float() * upstream).sum() + AUX * out.aux_loss + Z * out.z_loss
        loss.backward()
        results[impl] = {"output": out.output.float(), **grads(layer)}
    for name, want in results["loop"].items():
        scale = max(want.abs().max().item(), 1e-6)
        got = results["grouped"][name]
        assert_close(got, want, f"bf16 grouped vs loop: {name}", atol=2e-2 * scale, rtol=2e-2)
