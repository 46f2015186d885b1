"""`moeforge bench train`: training throughput of the tiny MoE model vs its dense twin.

    moeforge bench train                       # configs/tiny.yaml, its precision (auto), 20 steps each
    moeforge bench train --steps 40 --precision fp32 --set model.d_model=256

The dense twin is the same model with every FFN dense and of the same active size (top-1
routing: one expert of width d_ff per token == a dense FFN of width d_ff). Steps of the two
models are interleaved in one process (MoE, dense, MoE, ...) so load changes on a shared
machine hit both alike; each step is forward + backward + AdamW on random byte tokens.
Reported: median wall and CPU time per step, tokens/s and the MoE/dense step-time ratio
(target <= 1.2). On a shared CPU machine run it with OMP_NUM_THREADS=1 and read the CPU
column: it does not move with other users' load.
"""

from __future__ import annotations

import statistics
import time

import torch

from launch.arguments import ArgumentParser
from launch.config import load_config
from launch.precision import native_bf16, resolve_precision
from moe.transformer import Transformer, count_parameters


def _step(
    model: Transformer, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, bf16: bool
) -> tuple[float, float]:
    """One training step; returns (wall seconds, CPU seconds of this process)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.autocast(device_type=tokens.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(tokens[:, :-1], targets=tokens[:, 1:])
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if tokens.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; returns 0."""
    parser = ArgumentParser(
        prog="moeforge bench train", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("config", nargs="?", help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument(
        "--precision", choices=["bf16", "fp32"], default=None, help="default: the config's"
    )
    args = parser.parse_args(argv)
    from launch.cpu_memory import retain_freed_memory

    retain_freed_memory()  # as `moeforge train` does; every model here runs under it
    config = load_config(args.config, args.overrides)
    if config.moe is None:
        raise SystemExit("moeforge bench train needs an MoE config (moe.num_experts)")
    chosen = resolve_precision(args.precision or config.precision)
    bf16 = chosen.bf16
    if bf16 and not native_bf16(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        print("precision bf16 on a device without native bf16: the bf16 row is emulated")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.train.seed)
    vocab = config.model.vocab_size or 260
    models = {
        "moe": Transformer(config.model, config.moe, config.attention, vocab_size=vocab).to(device),
        "dense": Transformer(config.model, None, config.attention, vocab_size=vocab).to(device),
    }
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    batch, seq_len = config.train.micro_batch, config.data.seq_len
    tokens = torch.randint(0, 256, (batch, seq_len + 1), device=device)
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu_times: dict[str, list[float]] = {name: [] for name in models}
    for index in range(args.warmup + args.steps):
        for name, model in models.items():
            elapsed, cpu = _step(model, optimizers[name], tokens, bf16)
            if index >= args.warmup:
                times[name].append(elapsed)
                cpu_times[name].append(cpu)
    print_table(
        models, times, cpu_times, batch * seq_len, config.moe.num_experts, bf16, str(device)
    )
    return 0


def print_table(
    models, times, cpu_times, tokens_per_step: int, num_experts: int, bf16: bool, device: str
) -> None:
    """The result table (rich). CPU time per step is robust to other load on a shared machine."""
    from rich.console import Console
    from rich.table import Table

    median = {name: statistics.median(t) for name, t in times.items()}
    cpu = {name: statistics.median(t) for name, t in cpu_times.items()}
    title = (
        f"moeforge bench train: {tokens_per_step} tokens/step, {'bf16 autocast' if bf16 else 'fp32'}, "
        f"{device}, {len(times['moe'])} interleaved steps each"
    )
    table = Table(title=title)
    columns = (
        "model",
        "params total",
        "params active",
        "step ms",
        "CPU ms",
        "tokens/s",
        "vs dense",
    )
    for column in columns:
        table.add_column(column, justify="right" if column != "model" else "left")
    for name, model in models.items():
        counts = count_parameters(model)
        label = (
            f"MoE ({num_experts} experts, top-1)" if name == "moe" else "dense (same active size)"
        )
        table.add_row(
            label,
            f"{counts['total'] / 1e6:.2f}M",
            f"{counts['active'] / 1e6:.2f}M",
            f"{median[name] * 1e3:.1f}",
            f"{cpu[name] * 1e3:.1f}",
            f"{tokens_per_step / median[name]:,.0f}",
            f"{median[name] / median['dense']:.2f}x",
        )
    Console(width=140).print(table)
    ratio = median["moe"] / median["dense"]
    verdict = "meets" if ratio <= 1.2 else "misses"
    Console(width=140).print(
        f"MoE step time / dense step time = {ratio:.2f} ({verdict} the <= 1.2 target); "
        f"CPU time ratio {cpu['moe'] / cpu['dense']:.2f} (medians)"
    )
