"""`moeforge bench moe`: MoELayer vs a dense FFN vs DeepSpeed's MoE layer, side by side.

    moeforge bench moe                        # the full table (a few minutes on 2 cores)
    moeforge bench moe --experts 8 --dtypes fp32 --repeats 3
    moeforge bench moe --device cuda --tokens 16384 --d-model 1024 --d-ff 4096
    python -m launch.bench_moe --markdown docs/bench_moe.md

Forward + backward of one layer at 4096 tokens, d=512, ff=2048, capacity factor 1.25,
top-1, relu, interleaved (each repetition runs every contender once, in turn) and reported
as medians with the ratio to the dense FFN of the same per-token FLOPs (d -> ff -> d).
Memory: activation bytes saved for backward (saved-tensor hooks, distinct storages), at
4096 and 16384 tokens; on CUDA (``--device cuda``) also the allocator's peak over one
forward + backward, above what was allocated before it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from launch.arguments import ArgumentParser
from launch.cpu_memory import retain_freed_memory
from launch.precision import native_bf16
from moe.experts import DenseFFN
from moe.layer import MoELayer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


CUDA_MISSING = (
    "--device cuda needs a CUDA GPU and torch.cuda.is_available() is False; use --device cpu"
)


def bench_device(name: str) -> torch.device:
    """The device the benchmark runs on; ValueError (one line) for CUDA on a machine without it."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(CUDA_MISSING)
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a host clock reads their time too."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_deepspeed_moe(
    d_model: int,
    d_ff: int,
    num_experts: int,
    capacity_factor: float,
    device: str | torch.device = "cpu",
) -> nn.Module | None:
    """DeepSpeed's MoE layer (k=1, no random token selection), or None if unavailable.

    Built on the CPU; the caller moves it. DeepSpeed's accelerator and process group follow
    ``device`` (cpu + gloo, or cuda + nccl), chosen on first use in the process.
    """
    on_cuda = torch.device(device).type == "cuda"
    if not on_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        import torch.distributed as dist
        from deepspeed.moe.layer import MoE
    except ImportError as err:
        print(f"deepspeed not importable ({err}); skipping its layer", file=sys.stderr)
        return None
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", verbose=False)
    expert = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))
    layer = MoE(
        hidden_size=d_model,
        expert=expert,
        num_experts=num_experts,
        ep_size=1,
        k=1,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
        min_capacity=4,
        noisy_gate_policy=None,
        drop_tokens=True,
        use_rts=False,
    )
    layer.set_deepspeed_parallelism()
    return layer


class _DeepSpeedCall(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[0]


class _OursCall(nn.Module):
    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).output


class _ExpertsAlone(nn.Module):
    """The layer's experts on rows already grouped by expert: no router, no permute, no gate.

    ``inputs`` gives rows of the shape one routing of the benchmark's input hands the experts
    ([N, d] kept rows for the grouped layout, [E, R, d] for the buffer layout); the same
    kernels at the same sizes, so the ratio to the dense FFN is the floor that the whole
    layer cannot go below with these matmul libraries.
    """

    def __init__(self, layer: MoELayer, x: torch.Tensor) -> None:
        super().__init__()
        self.experts = layer.experts
        self.layout = layer.resolve_layout(x)
        self.grouped = self.layout == "grouped"
        with torch.no_grad():
            plan = layer.dispatcher.plan(layer.dispatcher.route(layer.router, x))
        self.sizes = plan.tokens_per_expert
        self.device = x.device
        self.shape = (
            (int(self.sizes.sum()), x.shape[-1])
            if self.grouped
            else (plan.num_experts, plan.buffer_rows, x.shape[-1])
        )

    def inputs(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Random rows and upstream gradient of the experts' input shape, on the input's device."""
        return (
            torch.randn(self.shape, dtype=dtype, device=self.device),
            torch.randn(self.shape, dtype=dtype, device=self.device),
        )

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if self.grouped:
            return self.experts(rows, self.sizes)
        return self.experts.forward_buffer(rows)


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], float]:
    """A closure timing one forward + backward, in milliseconds."""

    def run() -> float:
        module.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        synchronize(x.device)  # the previous contender's kernels are not this one's time
        start = time.perf_counter()
        out = module(xi)
        out.backward(grad)
        synchronize(x.device)
        return (time.perf_counter() - start) * 1e3

    return run


def weight_traffic_ms(layer: MoELayer, repeats: int) -> tuple[float, float]:
    """(MiB of expert weights, ms to read them twice and write their gradients once).

    The memory traffic every forward+backward of the layer must do whatever its kernels: the
    forward and the input-gradient pass read every expert weight, the weight-gradient pass
    writes as many values. Timed alone (``sum`` and ``fill_``), as a floor to compare with.
    """
    weights = [w for w in (layer.experts.w1, layer.experts.w2, layer.experts.w3) if w is not None]
    grads = [torch.empty_like(w) for w in weights]
    device = weights[0].device

    def traffic() -> float:
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(2):
                for w in weights:
                    w.sum()
            for g in grads:
                g.fill_(1.0)
        synchronize(device)
        return (time.perf_counter() - start) * 1e3

    traffic()
    ms = statistics.median(traffic() for _ in range(max(repeats, 3)))
    return sum(w.numel() * w.element_size() for w in weights) / 2**20, ms


def saved_activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct activation tensors (not parameters) saved for backward in one forward."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.detach().requires_grad_(True))
    return sum(seen.values())


def contenders(
    num_experts: int, dtype: torch.dtype, args: argparse.Namespace
) -> dict[str, nn.Module]:
    """The dense FFN, moeforge's layer and (unless --no-deepspeed) DeepSpeed's, on args.device.

    Ours are made on the device itself (a 64-expert layer's init on the host would take
    seconds of the check's time); DeepSpeed's is made on the CPU and moved.
    """
    device = torch.device(args.device)
    with device:
        mods: dict[str, nn.Module] = {
            "dense FFN": DenseFFN(args.d_model, args.d_ff),
            "moeforge": _OursCall(
                MoELayer(
                    args.d_model,
                    args.d_ff,
                    num_experts,
                    capacity_factor=args.capacity_factor,
                    expert_layout=args.expert_layout,
                )
            ),
        }
    if not args.no_deepspeed:
        ds = make_deepspeed_moe(args.d_model, args.d_ff, num_experts, args.capacity_factor, device)
        if ds is not None:
            mods["deepspeed MoE"] = _DeepSpeedCall(ds)
    return {name: m.to(device=device, dtype=dtype) for name, m in mods.items()}


def bench_inputs(args: argparse.Namespace, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer input [tokens, d_model] and its upstream gradient, on args.device."""
    x = torch.randn(args.tokens, args.d_model, dtype=dtype, device=args.device)
    return x, torch.randn_like(x)


def bench_point(num_experts: int, dtype_name: str, args: argparse.Namespace) -> dict[str, float]:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    mods = contenders(num_experts, dtype, args)
    x, grad = bench_inputs(args, dtype)
    runners = {name: fwd_bwd(m, x, grad) for name, m in mods.items()}
    alone = _ExpertsAlone(mods["moeforge"].layer, x)
    runners["experts alone"] = fwd_bwd(alone, *alone.inputs(dtype))
    times: dict[str, list[float]] = {name: [] for name in runners}
    for rep in range(args.repeats + 1):  # the first round is warm-up
        for name, run in runners.items():
            ms = run()
            if rep > 0:
                times[name].append(ms)
    mib, floor = weight_traffic_ms(mods["moeforge"].layer, args.repeats)
    print(
        f"  E={num_experts} {dtype_name}: moeforge expert layout {alone.layout}; expert weights "
        f"{mib:.0f} MiB, read twice + gradients written once alone: {floor:.1f} ms",
        flush=True,
    )
    return {name: statistics.median(v) for name, v in times.items()}


def format_table(rows: list[tuple[int, str, dict[str, float]]]) -> str:
    names = ["dense FFN", "moeforge", "deepspeed MoE"]
    lines = [
        "| experts | dtype | dense FFN ms | moeforge ms | deepspeed MoE ms | moeforge / dense | deepspeed / dense | moeforge / deepspeed | experts alone / dense |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for experts, dtype, med in rows:
        cells = [f"{med[n]:.1f}" if n in med else "n/a" for n in names]
        dense = med["dense FFN"]
        ours = med["moeforge"]
        ds = med.get("deepspeed MoE")
        alone = med.get("experts alone")
        ratios = [
            f"{ours / dense:.2f}x",
            f"{ds / dense:.2f}x" if ds else "n/a",
            f"{ours / ds:.2f}x" if ds else "n/a",
            f"{alone / dense:.2f}x" if alone else "n/a",
        ]
        lines.append(f"| {experts} | {dtype} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def cuda_peak_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """CUDA allocator's peak over one forward + backward, above what was allocated before it.

    Counts activations, saved tensors, gradients and the kernels' workspaces; the parameters
    and the input are allocated already and so left out.
    """
    module.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_(True)
    torch.cuda.synchronize(x.device)
    before = torch.cuda.memory_allocated(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    module(xi).sum().backward()
    torch.cuda.synchronize(x.device)
    peak = torch.cuda.max_memory_allocated(x.device) - before
    module.zero_grad(set_to_none=True)
    return peak


def memory_table(args: argparse.Namespace) -> str:
    """Saved activations of moeforge's layer (fp32, largest E) at 4096 and 16384 tokens."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    lines = [
        "| tokens | saved activations (MiB) | per token (KiB) |"
        + (" CUDA peak fwd+bwd (MiB) |" if cuda else ""),
        "|---:|---:|---:|" + ("---:|" if cuda else ""),
    ]
    with device:
        layer = _OursCall(
            MoELayer(
                args.d_model, args.d_ff, max(args.experts), capacity_factor=args.capacity_factor
            )
        )
    for tokens in (4096, 16384):
        x = torch.randn(tokens, args.d_model, device=device)
        nbytes = saved_activation_bytes(layer, x)
        row = f"| {tokens} | {nbytes / 2**20:.1f} | {nbytes / tokens / 1024:.2f} |"
        if cuda:
            row += f" {cuda_peak_bytes(layer, x) / 2**20:.1f} |"
        lines.append(row)
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="moeforge bench moe", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument(
        "--dtypes", nargs="+", default=None, choices=sorted(DTYPES),
        help="default: fp32, and bf16 where this device has native bf16 (else it is emulated, "
        "far slower than fp32, and left out)",
    )  # fmt: skip
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument(
        "--expert-layout", default="auto", choices=["auto", "grouped", "buffer"],
        help="moeforge's expert layout (auto: buffer for bf16 on CPU, grouped otherwise)",
    )  # fmt: skip
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed's layer")
    p.add_argument(
        "--no-retain-memory",
        action="store_true",
        help="leave glibc's malloc at its defaults (large tensors page-faulted on every call; "
        "see launch/cpu_memory.py)",
    )
    p.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"],
        help="where every contender, input and gradient lives (cuda: the current GPU)",
    )  # fmt: skip
    p.add_argument("--markdown", help="also write the tables to this file")
    args = p.parse_args(argv)
    try:
        bench_device(args.device)
    except ValueError as err:
        p.error(str(err))
    return args


def describe_device(device: torch.device, retained: bool) -> str:
    """The header's account of where it ran: CPU threads and malloc, or the GPU's name."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return (
        f"CPU, {torch.get_num_threads()} threads, freed host memory "
        f"{'retained' if retained else 'returned to the OS'}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    native = native_bf16(device)
    if args.dtypes is None:
        args.dtypes = ["fp32", "bf16"] if native else ["fp32"]
        if not native:
            kind = "GPU" if device.type == "cuda" else "CPU"
            print(
                f"bf16 rows skipped: this {kind} has no native bf16 (--dtypes fp32 bf16 to force)"
            )
    # glibc's malloc settings matter to host tensors only; a CUDA run leaves them alone.
    retained = (
        device.type == "cpu"
        and not args.no_retain_memory
        and retain_freed_memory(device, force=True)
    )
    print(
        f"MoE layer fwd+bwd, {args.tokens} tokens, d={args.d_model}, ff={args.d_ff}, "
        f"top-1, capacity factor {args.capacity_factor}, median of {args.repeats} "
        f"(torch {torch.__version__}, {describe_device(device, retained)})",
        flush=True,
    )
    rows = []
    for experts in args.experts:
        for dtype in args.dtypes:
            med = bench_point(experts, dtype, args)
            label = dtype if dtype != "bf16" or native else "bf16 (emulated)"
            rows.append((experts, label, med))
            print(
                f"  E={experts} {dtype}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items()),
                flush=True,
            )
    table = format_table(rows)
    mem = memory_table(args)
    print(table)
    print()
    print(mem)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{table}\n\n{mem}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
