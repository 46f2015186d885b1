"""`moeforge bench pp`: the pipeline bubble of DeepSpeed's 1F1B engine, measured per stage.

    moeforge bench pp                                   # pp 1 2, m 1 2 4 8, d=192 (~1 min, 2 cores)
    moeforge bench pp --pp 2 --micro-batches 1 4 --steps 3 --d-model 64
    moeforge bench pp --device cuda --d-model 1024 --seq 512   # one GPU per stage
    moeforge bench pp --json pp.json                    # the rows as JSON too

For each ``--pp`` value the command spawns pp processes itself (gloo on CPU, nccl on CUDA;
do not start it under torchrun) that train a small MoE Transformer (MoE every other block,
cut uniformly, so each stage holds the same number of blocks and MoE blocks) through
``moe.pipeline.pipeline_engine``; pp=1 goes through the same engine as one stage. For each
``--micro-batches`` value m a fresh engine runs ``--warmup`` steps and then ``--steps``
measured steps of m micro-batches each (``engine.train_batch``, ZeRO 1, fp32).

Busy time of a stage: the wall time of its compute instructions -- forward pass, backward
pass, optimizer step -- timed by wrapping the engine's instruction table (on CUDA with a
synchronize on both sides). Everything else a stage does inside ``train_batch`` (waiting
for a peer's activation or gradient, sending, loading micro-batches, reducing tied
gradients, aggregating the loss) is idle: idle = 1 - busy / step wall time, summed over the
measured steps. The ranks meet at a barrier before each step.

Analytic figure: with 1F1B, p stages of equal cost and m micro-batches, each stage computes
for m (t_f + t_b) inside a step of (m + p - 1)(t_f + t_b), so its idle share is the bubble
(p - 1) / (m + p - 1); it is 0 at pp=1. The table shows both and their ratio (the mean
idle over stages over the bubble). Stages are rarely equal, so the last column is the same
schedule with each stage's measured forward + backward time per micro-batch t_s: a step of
(m - 1) max(t) + sum(t), stage s busy m t_s of it (``uneven_bubble``). Reading and measured
numbers: docs/bench_pp.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from types import MethodType
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch.arguments import ArgumentParser
from launch.data import SPECIAL_TOKENS
from launch.errors import UserError
from launch.launcher import free_port
from launch.rank_processes import wait_for_ranks

BYTE_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte tokenizer's vocabulary
# The pipe engine's instruction names that count as a stage's compute (busy time).
BUSY = ("forward", "backward", "optimizer")
CUDA_MISSING = (
    "--device cuda needs a CUDA GPU and torch.cuda.is_available() is False; use --device cpu"
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="moeforge bench pp", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument("--pp", type=int, nargs="+", default=[1, 2], help="pipeline sizes")
    parser.add_argument(
        "--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8],
        help="micro-batches per step (m), the engine's gradient_accumulation_steps",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=8, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    parser.add_argument("--d-model", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4, help="blocks (MoE every other one)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=None, help="default: 4 * d-model")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--vocab", type=int, default=BYTE_VOCAB, help="default: byte vocabulary")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"],
        help="cpu: gloo, DS_ACCELERATOR=cpu; cuda: nccl, one GPU per stage",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per --pp value")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.d_ff is None:
        args.d_ff = 4 * args.d_model
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """One-line UserErrors for sizes the bench cannot run, before any process starts."""
    for name in ("d_model", "layers", "heads", "d_ff", "experts", "seq", "micro_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps < 1 or args.warmup < 0:
        raise UserError(f"--steps ({args.steps}) must be >= 1 and --warmup ({args.warmup}) >= 0")
    if args.d_model % args.heads:
        raise UserError(f"--d-model ({args.d_model}) must be divisible by --heads ({args.heads})")
    for m in args.micro_batches:
        if m < 1:
            raise UserError(f"--micro-batches {m}: every micro-batch count must be at least 1")
    for pp in args.pp:
        # ZeRO 1 needs an MoE block on every stage (parallel.pipeline.check_stage_experts):
        # a uniform cut of `layers` blocks with MoE in the odd ones gives each stage
        # layers/pp consecutive blocks, which hold an odd one when there are at least 2.
        if pp < 1 or args.layers % pp or (pp > 1 and args.layers // pp < 2):
            raise UserError(
                f"--pp {pp}: --layers ({args.layers}) must be a multiple of pp with at least "
                "2 blocks per stage (each stage then holds an MoE block); change one"
            )
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise UserError(CUDA_MISSING)
        if max(args.pp) > torch.cuda.device_count():
            raise UserError(
                f"--pp {max(args.pp)} needs one GPU per stage; "
                f"{torch.cuda.device_count()} visible; lower --pp"
            )


def bubble(pp: int, m: int) -> float:
    """The 1F1B idle share of each of ``pp`` equal stages over ``m`` micro-batches."""
    return (pp - 1) / (m + pp - 1)


def uneven_bubble(per_micro: list[float], m: int) -> float:
    """The mean 1F1B idle share when stage s takes ``per_micro[s]`` seconds (forward +
    backward) per micro-batch: the slowest stage paces the m - 1 steady-state slots and every
    stage's cost adds once to fill and drain the pipe, so a step lasts
    (m - 1) max(t) + sum(t) and stage s is busy m t_s of it. Equals ``bubble`` when the
    stages are equal."""
    if not any(per_micro):
        return 0.0
    step = (m - 1) * max(per_micro) + sum(per_micro)
    return 1.0 - m * sum(per_micro) / len(per_micro) / step


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The bench Transformer, seeded: every stage cuts the same weights."""
    from moe.config import MoEConfig
    from moe.transformer import AttentionConfig, ModelConfig, Transformer

    config = ModelConfig(
        d_model=args.d_model,
        num_layers=args.layers,
        num_heads=args.heads,
        d_ff=args.d_ff,
        max_seq_len=args.seq,
        vocab_size=args.vocab,
    )
    moe = MoEConfig(num_experts=args.experts, every=2)
    torch.manual_seed(0)
    return Transformer(config, moe, AttentionConfig(name="full"))


def ds_config(args: argparse.Namespace, m: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": m,
        "train_batch_size": args.micro_batch_size * m,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0, "torch_adam": True}},
        "steps_per_print": 10**9,
    }  # fmt: skip


def micro_batches(args: argparse.Namespace, m: int, step: int) -> list:
    """m micro-batches ((input_ids, no mask), targets), the same on every stage."""
    from moe.pipeline import no_mask

    generator = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(m):
        shape = (args.micro_batch_size, args.seq + 1)
        ids = torch.randint(0, args.vocab, shape, generator=generator)
        out.append(((ids[:, :-1], no_mask()), ids[:, 1:]))
    return out


class InstructionTimer:
    """Times every instruction the pipe engine executes, by name, on one engine instance.

    The engine looks each instruction up in ``self._INSTRUCTION_MAP`` (a class attribute);
    an instance attribute of the same name with timed wrappers takes its place for this
    engine only. ``sync`` runs before and after each instruction (CUDA: the device's queue,
    so a kernel counts where it runs, not where it was launched).
    """

    def __init__(self, engine: Any, sync: Any = None) -> None:
        self.seconds: dict[str, float] = {}
        self.sync = sync or (lambda: None)
        table = engine._INSTRUCTION_MAP  # the engine's own (the bridge may replace entries)
        engine._INSTRUCTION_MAP = {kind: self._wrap(kind, fn) for kind, fn in table.items()}

    @staticmethod
    def name(kind: type) -> str:
        """ForwardPass -> forward, OptimizerStep -> optimizer, RecvActivation -> recv_activation."""
        words, word = [], ""
        for char in kind.__name__:
            if char.isupper() and word:
                words.append(word)
                word = ""
            word += char.lower()
        words.append(word)
        if words[-1] in ("pass", "step"):
            words.pop()
        return "_".join(words)

    def _wrap(self, kind: type, fn: Any) -> Any:
        name = self.name(kind)
        timer = self

        def timed(engine: Any, **kwargs: Any) -> Any:
            timer.sync()
            start = time.perf_counter()
            try:
                return MethodType(fn, engine)(**kwargs)
            finally:
                timer.sync()
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - start

        return timed

    def reset(self) -> None:
        self.seconds.clear()


def measure(args: argparse.Namespace, pp: int, m: int, rank: int) -> dict[str, Any]:
    """Warm-up and measured steps of one (pp, m) on this stage: wall and instruction seconds."""
    from moe.pipeline import pipeline_engine

    model = build_model(args)
    engine, _, counts = pipeline_engine(model, ds_config(args, m), pp=pp, dp=1)
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    timer = InstructionTimer(engine, sync)
    walls, losses = [], []
    instructions: dict[str, float] = {}
    for step in range(args.warmup + args.steps):
        batch = micro_batches(args, m, step)
        dist.barrier()
        timer.reset()
        if sync:
            sync()
        start = time.perf_counter()
        loss = engine.train_batch(iter(batch))
        if sync:
            sync()
        wall = time.perf_counter() - start
        if step >= args.warmup:
            walls.append(wall)
            losses.append(float(loss))
            for name, seconds in timer.seconds.items():
                instructions[name] = instructions.get(name, 0.0) + seconds
    busy = sum(instructions.get(name, 0.0) for name in BUSY)
    return {
        "stage": rank,
        "blocks": counts[rank],
        "walls": walls,
        "busy_s": busy,
        "wall_s": sum(walls),
        "instruction_s": instructions,
        "loss": losses[-1],
    }


def summarize(pp: int, m: int, stages: list[dict]) -> dict[str, Any]:
    """One table row from every stage's numbers of one (pp, m)."""
    idle = [max(0.0, 1.0 - s["busy_s"] / s["wall_s"]) for s in stages]
    # A step ends when its slowest stage does: the step time is the max over stages.
    steps = [max(walls) for walls in zip(*(s["walls"] for s in stages), strict=True)]
    analytic = bubble(pp, m)
    mean_idle = sum(idle) / len(idle)
    per_micro = [
        sum(s["instruction_s"].get(k, 0.0) for k in ("forward", "backward")) / len(s["walls"]) / m
        for s in stages
    ]
    return {
        "pp": pp,
        "m": m,
        "step_ms": 1000 * statistics.median(steps),
        "idle": idle,
        "mean_idle": mean_idle,
        "bubble": analytic,
        "ratio": mean_idle / analytic if analytic else None,
        "uneven_bubble": uneven_bubble(per_micro, m),
        "blocks_per_stage": [s["blocks"] for s in stages],
        "wall_ms_per_step": [1000 * s["wall_s"] / len(s["walls"]) for s in stages],
        "instruction_ms_per_step": [
            {k: 1000 * v / len(s["walls"]) for k, v in sorted(s["instruction_s"].items())}
            for s in stages
        ],
        "loss": stages[-1]["loss"],
    }


def _progress(row: dict[str, Any]) -> None:
    idle = " / ".join(f"{x:.3f}" for x in row["idle"])
    print(
        f"bench pp: pp={row['pp']} m={row['m']}: step {row['step_ms']:.0f} ms, "
        f"idle per stage {idle}, 1F1B bubble {row['bubble']:.3f}",
        file=sys.stderr,
        flush=True,
    )


def _rank_main(
    rank: int, world: int, port: int, args: argparse.Namespace, queue: Any
) -> None:  # fmt: skip
    """One stage: every ``--micro-batches`` value in turn; rank 0 gathers the stages' numbers,
    prints a progress line per configuration and hands the rows to the parent."""
    try:
        # DeepSpeed prints its topology with print(): stdout of the parent stays the table's.
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        # The pipe engine's loss broadcast goes through autograd without a kernel for it.
        warnings.filterwarnings("ignore", message="c10d::broadcast_")
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )  # fmt: skip
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        torch.set_num_threads(args.threads)
        backend = "gloo"
        if args.device == "cuda":
            os.environ["DS_ACCELERATOR"] = "cuda"
            torch.cuda.set_device(rank)
            backend = "nccl"
        else:
            os.environ["DS_ACCELERATOR"] = "cpu"
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=max(args.timeout - 30, 30)),
        )
        try:
            from launch.log import quiet_deepspeed
            from parallel import deepspeed_bridge as bridge

            bridge.init_distributed(backend)  # adopts the group made above
            quiet_deepspeed()
            rows = []
            # One process set for every m: the same (pp, dp) layout, so the expert groups
            # DeepSpeed keeps per process stay right from one engine to the next.
            for m in args.micro_batches:
                mine = measure(args, world, m, rank)
                stages: list[Any] = [None] * world
                dist.all_gather_object(stages, mine)
                if rank == 0:
                    rows.append(summarize(world, m, stages))
                    _progress(rows[-1])
        finally:
            dist.destroy_process_group()
        queue.put((rank, "ok", rows))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the rank
        queue.put((rank, "error", traceback.format_exc()))


def run_stages(pp: int, args: argparse.Namespace) -> list[dict]:
    """Spawn ``pp`` stage processes, run every ``--micro-batches`` value, return rank 0's rows."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, pp, port, args, queue)) for r in range(pp)]
    for proc in procs:
        proc.start()
    return wait_for_ranks(procs, queue, timeout=args.timeout, name=f"bench pp: pp={pp}")[0]


def format_table(rows: list[dict]) -> str:
    """The markdown table: one row per (pp, m)."""
    lines = [
        "| pp | m | step ms (median) | idle per stage | mean idle | 1F1B bubble (p-1)/(m+p-1) | "
        "measured / analytic | 1F1B with measured stage costs |",
        "|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        idle = " / ".join(f"{x:.3f}" for x in r["idle"])
        lines.append(
            f"| {r['pp']} | {r['m']} | {r['step_ms']:.0f} | {idle} | {r['mean_idle']:.3f} | "
            f"{r['bubble']:.3f} | {ratio} | {r['uneven_bubble']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Run every ``--pp`` value, print the table. Returns the exit status (0)."""
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("moeforge bench pp starts its own processes; run it without torchrun")
    rows = []
    for pp in dict.fromkeys(args.pp):
        rows.extend(run_stages(pp, args))
    print(
        f"1F1B pipeline bubble, DeepSpeed pipe engine, ZeRO 1 fp32, {args.device} "
        f"({args.threads} thread(s)/stage): d={args.d_model} heads={args.heads} ff={args.d_ff} "
        f"blocks={args.layers} (MoE every 2nd, {args.experts} experts) seq={args.seq} "
        f"micro-batch={args.micro_batch_size}; {args.warmup} warm-up + {args.steps} measured "
        "steps; idle = 1 - (forward + backward + optimizer) / step wall time"
    )
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0
