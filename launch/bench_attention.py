"""Attention benchmark: forward+backward time and peak memory of every method, CPU or CUDA.

    moeforge bench attention                                  # all methods, n = 1024..8192
    moeforge bench attention --device cuda --lengths 1024,2048,4096
    python -m launch.bench_attention --lengths 256,512 --repeats 2
    python -m launch.bench_attention --methods full,bigbird,linformer --markdown docs/attention_bench.md
    python -m launch.bench_attention --causal                 # causal-capable methods only

Setting: d_model 256, 4 heads, batch 1, one x [1, n, 256] with requires_grad, loss
y.sum(). Each registered method (``attention.available()``) and, where installed, the same
method from the packages people use (Hugging Face BigBird, performer-pytorch, linformer,
FLASH-pytorch, long-short-transformer) run in the same process; the methods are interleaved
inside each repetition, so that a load change on a shared machine hits all of them, and the
median over repetitions is reported (after one warm-up call each). The exponent is the
log-log slope of time between the smallest and largest n; "vs full" is the time ratio to
``full`` at the largest n.

Peak memory: a separate, untimed fwd+bwd under ``torch.profiler`` with
``profile_memory=True``; the peak of the running sum of every op's allocations minus frees,
in start-time order. It counts tensors made during the step (activations, saved tensors,
gradients), not parameters or the input, and is exact only to op granularity. On CUDA
(``--device cuda``; the profiler counts host allocations only) it is the CUDA allocator's
peak during the step above what was allocated before it (so again neither parameters nor
the input), exact up to the allocator's block rounding.

``--device cuda`` puts x and every module on the current GPU, and the clock starts and stops
after ``torch.cuda.synchronize()`` (kernels run asynchronously: without it the host would
time the launches, not the work).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import attention
from launch.arguments import ArgumentParser
from launch.bench_moe import bench_device, synchronize

D_MODEL, NUM_HEADS = 256, 4
# How the markdown says peak memory was measured, per --device.
PEAK_METHOD = {
    "cpu": "running sum of allocations minus frees under torch.profiler(profile_memory=True)",
    "cuda": "the CUDA allocator's peak during the step above what was allocated before it",
}
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
# Option names that bound the sequence length (a fixed table, e.g. Linformer's E): the
# benchmark sets them to the largest n measured.
LENGTH_OPTIONS = ("n_max", "max_len", "max_seq_len", "max_length", "max_position_embeddings")


class Forward:
    """A module and how to call it on x [1, n, D] to get y [1, n, D]."""

    def __init__(self, module: nn.Module, call: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.module = module.train()  # fwd+bwd is a training step; dropout is 0 everywhere
        self.call = call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(x)


@dataclass
class Result:
    """Timings (ms, per n) and peak memory (MiB, per n) of one method; note says why not."""

    name: str
    times_ms: dict[int, float] = field(default_factory=dict)
    peak_mib: dict[int, float] = field(default_factory=dict)
    note: str = ""


class Skip(Exception):
    """A method that cannot run in this setting (package missing, mode unsupported).

    ``only_this_length`` marks a skip for one n (too short for the method); the method is
    still tried at the other lengths.
    """

    def __init__(self, reason: str, only_this_length: bool = False) -> None:
        super().__init__(reason)
        self.only_this_length = only_this_length


# -- pure helpers (tested without timing) ----------------------------------------------------


def fit_exponent(times_ms: dict[int, float]) -> float | None:
    """Log-log slope of time in n between the smallest and largest n measured."""
    if len(times_ms) < 2:
        return None
    low, high = min(times_ms), max(times_ms)
    if times_ms[low] <= 0 or times_ms[high] <= 0:
        return None
    return math.log(times_ms[high] / times_ms[low]) / math.log(high / low)


def ratio_to_reference(result: Result, reference: Result | None, n: int) -> float | None:
    """result's time over the reference's at n, or None when either is missing."""
    if reference is None or n not in result.times_ms or n not in reference.times_ms:
        return None
    return result.times_ms[n] / reference.times_ms[n]


def format_table(results: list[Result], lengths: list[int], markdown: bool = False) -> str:
    """One row per method: ms per n, exponent, ratio to full at the largest n, peak MiB."""
    reference = next((r for r in results if r.name == "full"), None)
    largest = max(lengths)
    header = (
        ["method"]
        + [f"ms n={n}" for n in lengths]
        + ["exponent", f"vs full n={largest}", f"peak MiB n={largest}", "note"]
    )
    rows = []
    for result in results:
        exponent = fit_exponent(result.times_ms)
        ratio = ratio_to_reference(result, reference, largest)
        rows.append(
            [result.name]
            + [_number(result.times_ms.get(n), "{:.1f}") for n in lengths]
            + [
                _number(exponent, "{:.2f}"),
                _number(ratio, "{:.3f}"),
                _number(result.peak_mib.get(largest), "{:.1f}"),
                result.note,
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    render = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
    return "\n".join(
        [render(header), render(["-" * w for w in widths])] + [render(r) for r in rows]
    )


def _number(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def parse_option(text: str) -> tuple[str, str, Any]:
    """'bigbird.block_size=128' -> ('bigbird', 'block_size', 128); values are JSON or text."""
    target, sep, raw = text.partition("=")
    method, dot, key = target.partition(".")
    if not sep or not dot or not method or not key:
        raise argparse.ArgumentTypeError(f"--option must look like METHOD.KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return method, key, value


def parse_lengths(text: str) -> list[int]:
    """'1024,2048' -> [1024, 2048] (sorted, unique, each >= 1)."""
    try:
        lengths = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--lengths must be integers, got {text!r}") from err
    if not lengths or lengths[0] < 1:
        raise argparse.ArgumentTypeError(f"--lengths must be positive integers, got {text!r}")
    return lengths


# -- building the methods -------------------------------------------------------------------


def build_registered(
    name: str, max_length: int, causal: bool, overrides: dict[str, Any] | None = None
) -> Forward:
    """A moeforge method with its defaults (length-bound ones set to max_length), overridden."""
    cls = attention.get(name)
    if causal and not cls.supports_causal:
        raise Skip("no causal mode")
    options = {key: max_length for key in LENGTH_OPTIONS if key in cls.Options.model_fields}
    options.update(overrides or {})
    module = attention.build(name, d_model=D_MODEL, num_heads=NUM_HEADS, causal=causal, **options)
    return Forward(module, lambda x: module(x)[0])


def _import(package: str, pip_name: str):
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise Skip(f"not installed (pip install {pip_name})") from err


def build_hf_bigbird(n: int, causal: bool) -> Forward:
    """transformers' BigBirdBlockSparseAttention (b=64, r=3) plus an output projection."""
    if causal:
        raise Skip("no causal mode")
    big_bird = _import("transformers.models.big_bird.modeling_big_bird", "transformers")
    config = big_bird.BigBirdConfig(
        hidden_size=D_MODEL,
        num_attention_heads=NUM_HEADS,
        block_size=64,
        num_random_blocks=3,
        attention_type="block_sparse",
        max_position_embeddings=n,
    )
    shortest = (5 + 2 * config.num_random_blocks) * config.block_size
    if n % config.block_size or n <= shortest:
        # HF's model switches to full attention for such n; the layer alone cannot run them.
        raise Skip(f"n={n}: block-sparse needs n > {shortest}, a multiple of 64", True)
    attn = big_bird.BigBirdBlockSparseAttention(config, seed=0)
    out = nn.Linear(D_MODEL, D_MODEL)
    masks = big_bird.BigBirdModel.create_masks_for_block_sparse_attn(
        torch.ones(1, n), config.block_size
    )
    on_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def forward(x: torch.Tensor) -> torch.Tensor:
        # The masks follow x to its device once, in the warm-up call, not in the timed ones.
        if x.device not in on_device:
            on_device[x.device] = tuple(m.to(x.device) for m in masks)
        blocked, band, from_mask, to_mask = on_device[x.device]
        context = attn(x, band, from_mask, to_mask, blocked, blocked)[0]
        return out(context)

    return Forward(nn.ModuleList([attn, out]), forward)


def build_performer_pytorch(n: int, causal: bool) -> Forward:
    """performer_pytorch.SelfAttention with its defaults (nb_features = d ln d)."""
    performer = _import("performer_pytorch", "performer-pytorch")
    module = performer.SelfAttention(
        dim=D_MODEL, heads=NUM_HEADS, dim_head=D_MODEL // NUM_HEADS, causal=causal
    )
    return Forward(module, module)


def build_linformer_package(n: int, causal: bool) -> Forward:
    """linformer.LinformerSelfAttention with k = 256 and seq_len = n."""
    if causal:
        raise Skip("no causal mode")
    linformer = _import("linformer", "linformer")
    module = linformer.LinformerSelfAttention(
        dim=D_MODEL, seq_len=n, k=256, heads=NUM_HEADS, dim_head=D_MODEL // NUM_HEADS
    )
    return Forward(module, module)


def build_flash_pytorch(n: int, causal: bool) -> Forward:
    """flash_pytorch.FLASH (group 256, query_key_dim 128, expansion 2): attention + FFN."""
    flash = _import("flash_pytorch", "FLASH-pytorch")
    module = flash.FLASH(
        dim=D_MODEL, group_size=256, query_key_dim=128, expansion_factor=2.0, causal=causal
    )
    return Forward(module, module)


def build_long_short_package(n: int, causal: bool) -> Forward:
    """long_short_transformer.LongShortAttention (window 128, segment 16, r = 1)."""
    long_short = _import("long_short_transformer", "long-short-transformer")
    rotary = _import("rotary_embedding_torch", "rotary-embedding-torch")

    class RotaryShim(nn.Module):
        """long-short-transformer 0.0.5 passes ``cache_key``, removed from newer rotary."""

        def __init__(self, dim: int) -> None:
            super().__init__()
            self.rotary = rotary.RotaryEmbedding(dim)

        def forward(self, positions: torch.Tensor, cache_key: object = None) -> torch.Tensor:
            return self.rotary(positions)

    module = long_short.LongShortAttention(
        pos_emb=RotaryShim(D_MODEL // NUM_HEADS),
        dim=D_MODEL,
        heads=NUM_HEADS,
        dim_head=D_MODEL // NUM_HEADS,
        causal=causal,
        window_size=128,
        segment_size=16,
        r=1,
    )
    return Forward(module, module)


PACKAGES: dict[str, Callable[[int, bool], Forward]] = {
    "hf_bigbird": build_hf_bigbird,
    "performer_pytorch": build_performer_pytorch,
    "linformer_pkg": build_linformer_package,
    "flash_pytorch": build_flash_pytorch,
    "long_short_pkg": build_long_short_package,
}


# -- measuring ------------------------------------------------------------------------------


def step(forward: Forward, x: torch.Tensor) -> float:
    """One forward+backward on x's device; returns seconds (queued CUDA work included)."""
    x.grad = None
    synchronize(x.device)
    start = time.perf_counter()
    y = forward(x)
    y = y[0] if isinstance(y, tuple) else y
    y.sum().backward()
    synchronize(x.device)
    return time.perf_counter() - start


def peak_memory_mib(forward: Forward, x: torch.Tensor) -> float:
    """Peak bytes allocated during one fwd+bwd, in MiB: the CUDA allocator's on CUDA, else
    the profiler's (op granularity)."""
    if x.device.type == "cuda":
        synchronize(x.device)
        before = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        step(forward, x)
        return (torch.cuda.max_memory_allocated(x.device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step(forward, x)
    current = peak = 0
    for event in sorted(profiler.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def run(
    methods: list[str],
    lengths: list[int],
    repeats: int,
    causal: bool,
    measure_memory: bool = True,
    log: Callable[[str], None] = print,
    options: dict[str, dict[str, Any]] | None = None,
    device: str | torch.device = "cpu",
) -> list[Result]:
    """Time every method at every n (interleaved per repetition); returns one Result each.

    x and every module live on ``device``. Modules are built on the CPU, as a model would be
    (some draw fixed random tables from a CPU generator at construction), then moved.
    """
    device = torch.device(device)
    results = {name: Result(name) for name in methods}
    skipped_lengths: dict[str, list[int]] = {}
    for n in lengths:
        torch.manual_seed(0)
        x = torch.randn(1, n, D_MODEL, device=device, requires_grad=True)
        forwards: dict[str, Forward] = {}
        for name in methods:
            if results[name].note:
                continue  # skipped or failed at a smaller n
            try:
                builder = PACKAGES.get(name)
                forward = (
                    builder(n, causal)
                    if builder
                    else build_registered(name, max(lengths), causal, (options or {}).get(name))
                )
                forward.module.to(device)
                step(forward, x)  # warm-up (and a first error check)
                forwards[name] = forward
            except Skip as skip:
                if skip.only_this_length:
                    skipped_lengths.setdefault(name, []).append(n)
                else:
                    results[name].note = f"skipped: {skip}"
                log(f"n={n:<6} {name:<20} skipped: {skip}")
            except Exception as err:  # a method's failure is reported, not fatal
                results[name].note = f"error at n={n}: {type(err).__name__}: {err}"[:160]
                log(f"n={n:<6} {name:<20} {results[name].note}")
        samples: dict[str, list[float]] = {name: [] for name in forwards}
        for _ in range(repeats):
            for name, forward in forwards.items():
                samples[name].append(step(forward, x))
        for name, forward in forwards.items():
            results[name].times_ms[n] = 1000 * statistics.median(samples[name])
            if measure_memory:
                results[name].peak_mib[n] = peak_memory_mib(forward, x)
            log(f"n={n:<6} {name:<20} {results[name].times_ms[n]:10.1f} ms")
        del forwards
    for name, skipped in skipped_lengths.items():
        if not results[name].note:
            results[name].note = f"skipped n={','.join(map(str, skipped))} (too short)"
    return list(results.values())


def default_methods(causal: bool) -> list[str]:
    """Every registered method, then every package baseline."""
    return attention.available() + list(PACKAGES)


def header(args: argparse.Namespace) -> str:
    """The run's setting in one line; it names the device (the GPU, or the CPU and threads)."""
    if getattr(args, "device", "cpu") == "cuda":
        where = f"CUDA ({torch.cuda.get_device_name()})"
        machine = f"CUDA {torch.version.cuda}"
    else:
        where = "CPU"
        machine = f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    return (
        f"fwd+bwd on {where}, d_model {D_MODEL}, {NUM_HEADS} heads, batch 1, "
        f"{'causal' if args.causal else 'bidirectional'}, median of {args.repeats} "
        f"(interleaved), torch {torch.__version__}, {machine}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="moeforge bench attention",
        description=__doc__.split("\n")[0],
        allow_abbrev=False,
    )
    parser.add_argument(
        "--methods",
        default="",
        help=f"comma list of registered methods and packages ({', '.join(PACKAGES)}); default: all",
    )
    parser.add_argument(
        "--lengths",
        type=parse_lengths,
        default=list(DEFAULT_LENGTHS),
        help="comma list of n (default 1024,2048,4096,8192)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method and n")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        type=parse_option,
        metavar="METHOD.KEY=VALUE",
        help="an option for a registered method, e.g. bigbird.block_size=128 (repeatable)",
    )
    parser.add_argument("--causal", action="store_true", help="causal mode (capable methods)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where x and every method live (cuda: the current GPU); default cpu",
    )
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    try:
        bench_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    known = set(attention.available()) | set(PACKAGES)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or default_methods(
        args.causal
    )
    unknown = [m for m in methods if m not in known]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(sorted(known))}")
    print(header(args), flush=True)
    log = lambda line: print(line, file=sys.stderr, flush=True)
    options: dict[str, dict[str, Any]] = {}
    for method, key, value in args.option:
        if method not in attention.available():
            parser.error(f"--option {method}.{key}: '{method}' is not a registered method")
        options.setdefault(method, {})[key] = value
    results = run(
        methods,
        args.lengths,
        args.repeats,
        args.causal,
        not args.no_memory,
        log,
        options,
        device=args.device,
    )
    print(format_table(results, args.lengths))
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(
                "# Attention benchmark\n\n"
                f"{header(args)}. Command: `moeforge bench attention"
                f"{' ' + ' '.join(argv if argv is not None else sys.argv[1:])}`.\n\n"
                "Exponent: log-log slope of time between the smallest and largest n. Peak MiB: "
                f"{PEAK_METHOD[args.device]}, excluding parameters and the input.\n\n"
                f"{format_table(results, args.lengths, markdown=True)}\n"
            )
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
