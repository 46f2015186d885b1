"""The CUDA path decided and checked on CPU: the grouped-kernel probe's decision (mocked
devices), the autocast cast of the grouped path, 16-byte alignment, host syncs of the
dispatch plan, and CPU-only tuning never selected for CUDA."""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import launch.cpu_memory as cpu_memory
import moe.dispatch as dispatch
import moe.experts as experts
from moe import MoELayer
from moe.experts import GroupedExperts, default_impl, grouped_matmul, misalignment

D, FF, E = 16, 32, 4
SIZES = torch.tensor([3, 0, 5, 2])


def fake(device: str, dtype: torch.dtype, *shape: int) -> SimpleNamespace:
    """Stands in for a tensor on a device this machine lacks (default_impl reads only these)."""
    return SimpleNamespace(device=torch.device(device), dtype=dtype, shape=shape)


@pytest.fixture
def fresh(monkeypatch):
    """Empty probe cache and log memory; records what the probe is asked and what is logged."""
    monkeypatch.setattr(experts, "_GROUPED_MM", {})
    monkeypatch.setattr(experts, "_LOGGED", set())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    probed: list[tuple[torch.device, torch.dtype]] = []

    def probe(device, dtype):
        probed.append((device, dtype))
        return None

    monkeypatch.setattr(experts, "_probe", probe)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("moeforge")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield SimpleNamespace(probed=probed, records=records)
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_cpu_is_the_loop_and_never_probes(fresh):
    x, w = torch.randn(10, D, dtype=torch.bfloat16), torch.randn(E, D, FF, dtype=torch.bfloat16)
    assert default_impl(x, w) == "loop"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert default_impl(x.float(), w.float()) == "loop"
    assert fresh.probed == [] and fresh.records == []


def test_probe_runs_once_per_device_and_dtype(fresh):
    w = fake("cuda:0", torch.bfloat16, E, D, FF)
    for _ in range(3):
        assert default_impl(fake("cuda:0", torch.bfloat16, 10, D), w) == "grouped"
    assert fresh.probed == [(torch.device("cuda:0"), torch.bfloat16)]
    assert default_impl(fake("cuda:1", torch.bfloat16, 10, D), w) == "grouped"
    assert fresh.probed[-1] == (torch.device("cuda:1"), torch.bfloat16)
    assert len(fresh.probed) == 2 and fresh.records == []


def test_probe_failure_falls_back_to_the_loop_logged_once(fresh, monkeypatch):
    monkeypatch.setattr(experts, "_probe", lambda device, dtype: "kernel exploded")
    x, w = fake("cuda:0", torch.bfloat16, 10, D), fake("cuda:0", torch.bfloat16, E, D, FF)
    assert [default_impl(x, w) for _ in range(3)] == ["loop"] * 3
    assert len(fresh.records) == 1 and "kernel exploded" in fresh.records[0]
    assert "cuda:0" in fresh.records[0]


@pytest.mark.parametrize(
    ("dtype", "capability", "hip", "why"),
    [
        (torch.float32, (9, 0), None, "bfloat16 only"),
        (torch.float16, (9, 0), None, "bfloat16 only"),
        (torch.bfloat16, (8, 0), None, "is 8.0"),
        (torch.bfloat16, (12, 0), None, "is 12.0"),
        (torch.bfloat16, (9, 0), "6.2", "ROCm"),
    ],
)
def test_no_single_kernel_means_the_loop_without_probing(
    fresh, monkeypatch, dtype, capability, hip, why
):
    """torch's _grouped_mm runs one kernel only for bf16 on sm90/sm100 (elsewhere its own loop
    with a host sync per call): the loop is chosen without running the probe."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    x, w = fake("cuda:0", dtype, 10, D), fake("cuda:0", dtype, E, D, FF)
    assert default_impl(x, w) == "loop" and default_impl(x, w) == "loop"
    assert fresh.probed == []
    assert len(fresh.records) == 1 and why in fresh.records[0], fresh.records


def test_torch_without_grouped_mm_is_the_loop(fresh, monkeypatch):
    monkeypatch.delattr(torch, "_grouped_mm")
    x, w = fake("cuda:0", torch.bfloat16, 10, D), fake("cuda:0", torch.bfloat16, E, D, FF)
    assert default_impl(x, w) == "loop"
    assert fresh.probed == [] and "no torch._grouped_mm" in fresh.records[0]


def test_decision_uses_the_autocast_dtype(fresh, monkeypatch):
    """fp32 parameters under bf16 autocast: the kernel sees bf16, so bf16 decides."""
    monkeypatch.setattr(experts, "_autocast_dtype", lambda device_type: torch.bfloat16)
    x, w = fake("cuda:0", torch.float32, 10, D), fake("cuda:0", torch.float32, E, D, FF)
    assert default_impl(x, w) == "grouped"
    assert fresh.probed == [(torch.device("cuda:0"), torch.bfloat16)]


def test_misaligned_widths_fall_back_once(fresh):
    # bf16: rows of 12 bytes (6 elements) are not 16-byte multiples; 8 elements are.
    w = fake("cuda:0", torch.bfloat16, E, 6, FF)
    assert default_impl(fake("cuda:0", torch.bfloat16, 10, 6), w) == "loop"
    assert default_impl(fake("cuda:0", torch.bfloat16, 10, 6), w) == "loop"
    assert len(fresh.records) == 1 and "input width 6" in fresh.records[0]
    out = fake("cuda:0", torch.bfloat16, E, D, 12)
    assert default_impl(fake("cuda:0", torch.bfloat16, 10, D), out) == "loop"
    assert "output width 12" in fresh.records[-1]
    aligned = fake("cuda:0", torch.bfloat16, E, 8, 24)
    assert default_impl(fake("cuda:0", torch.bfloat16, 10, 8), aligned) == "grouped"


def test_misalignment_rule():
    x, w = torch.empty(5, 4), torch.empty(E, 4, 8)
    assert misalignment(x, w, torch.float32) is None  # 16 and 32 bytes
    assert "input width 4" in misalignment(x, w, torch.bfloat16)  # 8 bytes
    assert "output width 6" in misalignment(torch.empty(5, 8), torch.empty(E, 8, 6), torch.float32)


def test_forced_grouped_refuses_misaligned_widths():
    x, w = torch.randn(10, 6), torch.randn(E, 6, 8)
    with pytest.raises(ValueError, match="impl='grouped'.*input width 6"):
        grouped_matmul(x, w, SIZES, impl="grouped")
    with pytest.raises(ValueError, match="impl must be one of"):
        grouped_matmul(x, w, SIZES, impl="fast")


def test_kernel_layout_realigns_offset_views():
    base = torch.randn(4 * D + 1)
    view = base[1:].view(4, D)  # 4 bytes past an aligned allocation
    assert view.data_ptr() % 16 != 0
    fixed = experts._kernel_layout(view)
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, view)
    weight = torch.randn(E, FF, D).transpose(1, 2)
    assert experts._kernel_layout(weight).is_contiguous()
    aligned = torch.randn(4, D)
    assert experts._kernel_layout(aligned) is aligned


def reference(x, w, sizes):
    out, start = [], 0
    for e, n in enumerate(sizes.tolist()):
        out.append(x[start : start + n] @ w[e])
        start += n
    return torch.cat(out)


@pytest.fixture
def recorded_kernel(monkeypatch):
    """torch._grouped_mm replaced by per-expert matmuls that record what the kernel gets."""
    calls = []

    def kernel(x, w, *, offs):
        calls.append(
            dict(
                x=x.dtype,
                w=w.dtype,
                offs=offs.dtype,
                autocast=torch.is_autocast_enabled("cpu"),
                contiguous=x.is_contiguous() and w.is_contiguous(),
            )
        )
        sizes = torch.diff(offs, prepend=offs.new_zeros(1))
        return reference(x, w, sizes)

    monkeypatch.setattr(torch, "_grouped_mm", kernel)
    return calls


def test_grouped_path_casts_to_the_autocast_dtype(recorded_kernel):
    x = torch.randn(10, D, requires_grad=True)
    w = torch.randn(E, D, FF, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_matmul(x, w, SIZES, impl="grouped")
    assert recorded_kernel == [
        dict(x=torch.bfloat16, w=torch.bfloat16, offs=torch.int32, autocast=False, contiguous=True)
    ]
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32  # parameters stay fp32
    expected = reference(x.detach().bfloat16(), w.detach().bfloat16(), SIZES)
    torch.testing.assert_close(y.detach(), expected)


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_grouped_experts_cast_every_matmul(recorded_kernel, activation):
    layer = GroupedExperts(E, D, FF, activation)
    x = torch.randn(10, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, SIZES, impl="grouped")
    assert len(recorded_kernel) == (3 if activation == "swiglu" else 2)
    assert all(c["x"] == c["w"] == torch.bfloat16 and not c["autocast"] for c in recorded_kernel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loop = layer(x, SIZES, impl="loop")
    torch.testing.assert_close(y, loop)


def test_real_kernel_under_autocast_matches_the_loop():
    """torch's own CPU _grouped_mm, fed the cast tensors, equals the loop path in bf16."""
    torch.manual_seed(0)
    x, w = torch.randn(10, D), torch.randn(E, D, FF)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grouped = grouped_matmul(x, w, SIZES, impl="grouped")
        loop = grouped_matmul(x, w, SIZES, impl="loop")
    assert grouped.dtype == loop.dtype == torch.bfloat16
    torch.testing.assert_close(grouped, loop)


def test_probe_checks_forward_backward_in_the_real_layout(monkeypatch):
    """The probe passes on a working kernel, and runs it on the device and dtype it decides for,
    with 2-D x, 3-D weight and int32 offsets there; a wrong or failing kernel is reported."""
    real = torch._grouped_mm
    seen = []

    def spy(x, w, *, offs):
        seen.append((x.device, x.dtype, x.dim(), w.dim(), offs.dtype, offs.device))
        return real(x, w, offs=offs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    cpu = torch.device("cpu")
    assert experts._probe(cpu, torch.float32) is None
    assert seen == [(cpu, torch.float32, 2, 3, torch.int32, cpu)]
    monkeypatch.setattr(torch, "_grouped_mm", lambda x, w, *, offs: real(x, w, offs=offs) * 1.5)
    assert "disagrees" in experts._probe(cpu, torch.float32)

    def broken(x, w, *, offs):
        raise RuntimeError("no kernel image is available\nmore")

    monkeypatch.setattr(torch, "_grouped_mm", broken)
    assert experts._probe(cpu, torch.float32).endswith("no kernel image is available")


# --- host syncs ------------------------------------------------------------------------


class SyncCounter(TorchDispatchMode):
    """Counts ops that read a device tensor on the host (a sync on CUDA) or size an output by
    data (nonzero, boolean-mask indexing)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__)
        if name in ("_local_scalar_dense", "nonzero", "masked_select", "item"):
            self.ops.append(name)
        if name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if len(args) > 1 else [])
        ):
            self.ops.append(f"{name}(bool)")
        return func(*args, **kwargs)


@pytest.fixture
def host_reads(monkeypatch):
    """SyncCounter plus .tolist() calls (invisible to dispatch on CPU)."""
    counter = SyncCounter()
    tolist = torch.Tensor.tolist

    def counted(self):
        counter.ops.append("tolist")
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    return counter


def routing_for(layer, tokens):
    return layer.dispatcher.route(layer.router, tokens)


def test_make_plan_reads_the_device_once_and_never_with_num_kept(host_reads):
    torch.manual_seed(0)
    layer = MoELayer(D, FF, E, top_k=2, capacity_factor=0.5, min_capacity=1)
    routing = routing_for(layer, torch.randn(24, D))
    assert bool((routing.slot < 0).any()), "the case must drop some pairs"
    with host_reads:
        plan = dispatch.make_plan(routing)
    assert host_reads.ops == ["_local_scalar_dense"]  # N, the grouped layout's row count
    host_reads.ops.clear()
    num_kept = int(routing.tokens_per_expert.sum())
    with host_reads:
        again = dispatch.make_plan(routing, num_kept=num_kept)
    assert host_reads.ops == []
    for name in ("token_index", "buffer_index", "gate", "inverse", "dropped"):
        torch.testing.assert_close(getattr(again, name), getattr(plan, name))
    # The plan against the direct definition: kept pairs sorted by (expert, slot).
    slot, expert = routing.slot.reshape(-1), routing.expert_index.reshape(-1)
    kept = (slot >= 0).nonzero().squeeze(1)
    rows = expert[kept] * routing.capacity + slot[kept]
    order = torch.argsort(rows)
    assert torch.equal(plan.token_index, kept[order] // 2)
    assert torch.equal(plan.buffer_index, rows[order])
    assert torch.equal(plan.dropped, (slot < 0).nonzero().squeeze(1))
    flat_inverse = plan.inverse.reshape(-1)
    assert torch.equal(flat_inverse[kept[order]], torch.arange(kept.numel()))


def test_grouped_layer_forward_reads_the_device_once(host_reads, monkeypatch):
    """A capacity-factor MoE layer on the grouped layout with the grouped kernel: the plan's N
    is the forward's one host read (the router, permute, kernel and combine read none)."""
    monkeypatch.setattr(experts, "default_impl", lambda x, w: "grouped")
    torch.manual_seed(0)
    layer = MoELayer(D, FF, E, top_k=2, capacity_factor=1.0, expert_layout="grouped")
    layer.dispatcher.trims_buffer = False  # as off CPU (trimming reads a count: CPU only)
    x = torch.randn(2, 12, D, requires_grad=True)
    with host_reads:
        out = layer(x)
        out.output.sum().backward()
    assert host_reads.ops == ["_local_scalar_dense"], host_reads.ops


# --- CPU-only tuning -----------------------------------------------------------------


def test_buffer_layout_is_cpu_only():
    layer = MoELayer(D, FF, E).to(torch.bfloat16)
    assert layer.resolve_layout(torch.empty(4, D, dtype=torch.bfloat16)) == "buffer"  # CPU
    assert layer.resolve_layout(torch.empty(4, D, dtype=torch.bfloat16, device="meta")) == "grouped"
    assert layer.resolve_layout(fake("cuda:0", torch.bfloat16, 4, D)) == "grouped"


def test_buffer_trimming_is_cpu_only(monkeypatch):
    asked = []
    monkeypatch.setattr(dispatch, "make_plan", lambda routing, **kw: asked.append(kw))
    for device in ("cpu", "cuda:0"):
        routing = SimpleNamespace(slot=SimpleNamespace(device=torch.device(device)))
        dispatch.LocalDispatcher().plan(routing)
    assert asked == [{"trim_buffer": True}, {"trim_buffer": False}]


def test_fused_relu_loop_is_cpu_only(monkeypatch):
    """Off CPU (meta here) relu experts run the unfused matmuls around F.relu."""
    layer = GroupedExperts(E, D, FF, "relu")
    used = []
    monkeypatch.setattr(experts._LoopReluMLP, "apply", lambda *a: used.append("fused") or a[0])
    out = layer(torch.randn(10, D), SIZES, impl="loop")
    assert used == ["fused"] and out.shape == (10, D)
    used.clear()
    layer = layer.to("meta")
    out = layer(torch.empty(10, D, device="meta"), SIZES, impl="loop")
    assert used == [] and out.shape == (10, D) and out.device.type == "meta"


@pytest.fixture
def fake_libc(monkeypatch):
    calls = []
    libc = SimpleNamespace(mallopt=lambda *args: calls.append(args) or 1)
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(cpu_memory.sys, "platform", "linux")
    monkeypatch.delenv("MOEFORGE_RETAIN_FREED_MEMORY", raising=False)
    monkeypatch.setattr(cpu_memory, "_applied", None)
    return calls


def test_malloc_tuning_is_cpu_only(fake_libc, monkeypatch):
    assert cpu_memory.retain_freed_memory("cuda") is False
    assert cpu_memory.retain_freed_memory("cpu") is False  # decided once per process
    monkeypatch.setattr(cpu_memory, "_applied", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_memory.retain_freed_memory() is False
    assert fake_libc == []
    monkeypatch.setattr(cpu_memory, "_applied", None)
    assert cpu_memory.retain_freed_memory(torch.device("cpu")) is True
    assert len(fake_libc) == 2


def test_malloc_tuning_on_a_cpu_machine(fake_libc, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cpu_memory.retain_freed_memory() is True
    assert len(fake_libc) == 2


def test_make_plan_with_num_kept_needs_no_tensor_data():
    """Meta tensors hold no data, so any host read raises: given N, the plan is built from
    device-side work alone (shapes and dtypes as on CPU); without N it must read N."""
    torch.manual_seed(0)
    layer = MoELayer(D, FF, E, top_k=2, capacity_factor=0.5, min_capacity=1)
    routing = routing_for(layer, torch.randn(24, D))
    num_kept = int(routing.tokens_per_expert.sum())
    on_cpu = dispatch.make_plan(routing, num_kept=num_kept)
    meta = dataclasses.replace(
        routing,
        **{
            name: getattr(routing, name).to("meta")
            for name in ("expert_index", "gate", "slot", "tokens_per_expert")
        },
    )
    plan = dispatch.make_plan(meta, num_kept=num_kept)
    for name in ("token_index", "buffer_index", "gate", "inverse", "dropped"):
        got, want = getattr(plan, name), getattr(on_cpu, name)
        assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype
    with pytest.raises((RuntimeError, NotImplementedError)):
        dispatch.make_plan(meta)


def test_probe_is_unaffected_by_the_callers_grad_and_autocast_state():
    """The first forward decides; it may run under no_grad or autocast."""
    cpu = torch.device("cpu")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert experts._probe(cpu, torch.float32) is None
    with torch.inference_mode():
        assert experts._probe(cpu, torch.float32) is None
