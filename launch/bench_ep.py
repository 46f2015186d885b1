"""Benchmark: forward + backward of one MoE layer at ep=1 and ep=2 against DeepSpeed's at ep=2.

    torchrun --nproc_per_node=2 -m launch.cli bench ep                 # the reference setting
    torchrun --nproc_per_node=2 -m launch.cli bench ep --tokens 512 --repeats 5
    moeforge bench ep --help

Every rank routes ``--tokens`` tokens (default 2048) of width d=256 through 8 experts with
hidden width 1024 (relu, top-1, capacity factor 1.25, fp32, gloo on CPU or NCCL on GPU):
* ``ours ep=1``: moeforge's MoELayer, all experts on every rank (no communication);
* ``ours ep=2``: the same layer with 4 experts per rank and the all-to-all dispatcher;
* ``deepspeed ep=2``: ``deepspeed.moe.layer.MoE`` (its TopKGate and one-hot einsum dispatch,
  one module per expert, no random token selection, as in ``bench moe``) with ep_size=2,
  its expert groups created as the engine would.
Each timed step is a barrier, then forward and backward; the layers take turns so that load
from other processes hits them alike. The table shows the median over ``--repeats`` steps
(after ``--warmup``), the slowest rank's, and the ratio to DeepSpeed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from launch.arguments import ArgumentParser
from launch.errors import UserError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="moeforge bench ep", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed's layer")
    return parser.parse_args(argv)


def time_interleaved(
    steps: dict[str, Callable[[], None]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds of every timed step per layer, the steps taking turns (round robin) so that a slow period of
    a shared machine slows every layer alike; each timed step starts after a barrier."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            dist.barrier()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def forward_backward(
    module: nn.Module, x: torch.Tensor, upstream: torch.Tensor, output_of: Callable
) -> Callable[[], None]:
    """A closure that runs one forward and backward of ``module`` and clears the gradients."""

    def step() -> None:
        for param in module.parameters():
            param.grad = None
        x.grad = None
        out = output_of(module(x))
        (out * upstream).sum().backward()

    return step


def deepspeed_layer(args: argparse.Namespace, ep_size: int) -> nn.Module:
    """deepspeed.moe.layer.MoE with ``ep_size`` and its process groups created."""
    from deepspeed.moe.layer import MoE

    expert = nn.Sequential(
        nn.Linear(args.d_model, args.d_ff), nn.ReLU(), nn.Linear(args.d_ff, args.d_model)
    )
    layer = MoE(
        hidden_size=args.d_model,
        expert=expert,
        num_experts=args.experts,
        ep_size=ep_size,
        k=args.top_k,
        capacity_factor=args.capacity_factor,
        eval_capacity_factor=args.capacity_factor,
        min_capacity=4,
        drop_tokens=True,
        use_rts=False,  # as `bench moe`: no random token selection, the same routing as ours
    )
    layer.set_deepspeed_parallelism()
    return layer


def main(argv: list[str]) -> int:
    """Run the benchmark on every rank; rank 0 prints the table. Returns the exit status."""
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) != 2:
        raise UserError(
            "moeforge bench ep needs 2 processes: torchrun --nproc_per_node=2 -m launch.cli bench ep"
        )
    from launch.cpu_memory import retain_freed_memory
    from moe import MoELayer
    from parallel import deepspeed_bridge as bridge
    from parallel.layout import ParallelLayout

    retain_freed_memory()  # both contenders run in these processes, under the same malloc
    torch.set_num_threads(args.threads)
    bridge.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")  # fmt: skip
    groups = ParallelLayout.from_world(world, ep=2).build(num_experts=args.experts)
    common = dict(top_k=args.top_k, capacity_factor=args.capacity_factor, min_capacity=4)
    generator = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(args.tokens, args.d_model, generator=generator).to(device).requires_grad_()
    upstream = torch.randn(args.tokens, args.d_model, generator=generator).to(device)

    torch.manual_seed(0)
    layers: dict[str, tuple[nn.Module, Callable]] = {
        "ours ep=1": (MoELayer(args.d_model, args.d_ff, args.experts, **common), lambda o: o.output),
        "ours ep=2": (
            MoELayer(
                args.d_model, args.d_ff, args.experts, ep_group=groups.ep_group, equal_tokens=True,
                **common,
            ),
            lambda o: o.output,
        ),
    }  # fmt: skip
    if not args.no_deepspeed:
        layers["deepspeed ep=2"] = (deepspeed_layer(args, 2), lambda o: o[0])
    steps = {}
    for name, (module, output_of) in layers.items():
        steps[name] = forward_backward(module.to(device), x, upstream, output_of)
    times = time_interleaved(steps, args.warmup, args.repeats)
    medians, round_ratios = {}, {}
    for name, values in times.items():
        slowest = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # the slowest rank, per round
        medians[name] = statistics.median(slowest.tolist())
        times[name] = slowest.tolist()
    if "deepspeed ep=2" in times:
        for name, values in times.items():
            # Ratio within each round (adjacent in time), then the median: robust to load
            # that comes and goes on a shared machine.
            ratios = [a / b for a, b in zip(values, times["deepspeed ep=2"])]
            round_ratios[name] = statistics.median(ratios)
    if rank == 0:
        print(
            f"MoE layer forward+backward, {world} ranks, {args.tokens} tokens/rank, "
            f"d={args.d_model}, ff={args.d_ff}, {args.experts} experts, top-{args.top_k}, "
            f"cf={args.capacity_factor}, {device.type}, {args.threads} thread(s)/rank, "
            f"median of {args.repeats} (slowest rank)"
        )
        header = f"| {'layer':<16} | {'median ms':>9} | {'vs deepspeed ep=2':>17} |"
        print(header)
        print(f"|{'-' * 18}|{'-' * 11}|{'-' * 19}|")
        for name, seconds in medians.items():
            ratio = f"{round_ratios[name]:.2f}x" if round_ratios else "-"
            print(f"| {name:<16} | {seconds * 1e3:>9.1f} | {ratio:>17} |")
        print(
            "(ratio: median over rounds of the per-round time ratio; rounds run the layers in turn)"
        )
    dist.barrier()
    dist.destroy_process_group()
    return 0
