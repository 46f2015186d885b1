"""`moeforge bench tp`: what tensor parallelism communicates and stores, per block and rank.

    moeforge bench tp                                  # tp 1 2 4, d=256, 4 layers (< 1 min)
    moeforge bench tp --tp 1 2 --d-model 64 --layers 2 --seq 16
    moeforge bench tp --json tp.json                   # the rows as JSON too

On 2 CPU cores tensor parallelism cannot be faster than tp=1, so this counts instead of
timing. The command spawns max(--tp) processes itself (gloo on CPU; do not start it under
torchrun); for each ``--tp`` value the first tp of them form the TP group and run one
training step (forward + backward of the loss, fp32) of two models that differ only in
their FFNs: every block dense, and every block MoE. During the step every tensor collective of ``torch.distributed`` is wrapped and its
payload recorded: an all-reduce's tensor, an all-gather's gathered output (what every rank
ends up holding), an all-to-all's sent rows. Payloads of exactly one activation
(B * n * D elements) are the TP traffic; anything else (routing statistics, row counts) is
listed as "other". Per block = the step's total over the number of blocks (the blocks of
one model are all of one kind).

Analytic figure (docs/bench_tp.md): per block and step, the Megatron pattern moves four
activation payloads of B * n * D * element_size bytes -- a dense block all-reduces after
the attention output and after the FFN's row-parallel linear in the forward, and before
the q/k/v and FFN column-parallel linears in the backward. An MoE block keeps the
attention's two all-reduces; its FFN instead all-gathers the tokens' output rows in the
forward, and the input rows' gradients in the backward (each TP rank routes 1/tp of them).

Memory per rank: parameter bytes (expert / non-expert, by ``parallel.markers.is_expert``)
and the activations of one forward (distinct tensors saved for backward, not parameters).
The model is split by ``moe.tensor_parallel.apply_tensor_parallel``.

Exit status 0 when every TP row matches its analytic figure and the non-expert parameters
at tp=2 are at most 0.55x tp=1; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch.arguments import ArgumentParser
from launch.data import SPECIAL_TOKENS
from launch.errors import UserError
from launch.rank_processes import wait_for_ranks
from moe.tensor_parallel import apply_tensor_parallel

BYTE_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte tokenizer's vocabulary
NON_EXPERT_LIMIT = 0.55  # per-rank non-expert parameters at tp=2 over tp=1
KINDS = ("dense", "moe")
# The torch.distributed collectives a TP step may call, wrapped while a step is measured.
COUNTED = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "broadcast",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="moeforge bench tp", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4], help="TP sizes to run")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=None, help="default: 4 * d-model")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence (n)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (B)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument(
        "--capacity-factor", type=float, default=0.0,
        help="MoE capacity factor; 0 = dropless (default), so that tp>1 routes as tp=1",
    )  # fmt: skip
    parser.add_argument("--vocab", type=int, default=BYTE_VOCAB, help="default: byte vocabulary")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.d_ff is None:
        args.d_ff = 4 * args.d_model
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """One-line UserErrors for sizes TP cannot split, before any process starts."""
    for name in ("d_model", "layers", "heads", "d_ff", "seq", "batch", "experts", "vocab"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.capacity_factor < 0:
        raise UserError(f"--capacity-factor ({args.capacity_factor}) must be >= 0 (0 = dropless)")
    if args.d_model % args.heads:
        raise UserError(f"--d-model ({args.d_model}) must be divisible by --heads ({args.heads})")
    for tp in args.tp:
        if tp < 1:
            raise UserError(f"--tp {tp}: every TP size must be at least 1")
        for flag, value in (
            ("--heads", args.heads),
            ("--d-ff", args.d_ff),
            ("--batch * --seq (the MoE token rows)", args.batch * args.seq),
        ):
            if value % tp:
                raise UserError(f"{flag} ({value}) must be divisible by --tp {tp}; change one")


class CollectiveCounter:
    """Wraps torch.distributed's collectives while active; records (phase, block, op, bytes).

    ``phase`` ("forward" / "backward") and ``block`` (the index of the block whose forward
    runs, or None) are set by the caller. Modules that call
    ``dist.all_reduce`` etc. through the module attribute (parallel.collectives does) go
    through the wrappers; the collectives themselves run unchanged.
    """

    def __init__(self) -> None:
        self.phase = "forward"
        self.block: int | None = None
        self.records: list[tuple[str, int | None, str, int]] = []
        self._originals: dict[str, Any] = {}

    def __enter__(self) -> CollectiveCounter:
        for name in COUNTED:
            original = getattr(dist, name, None)
            if original is not None:
                self._originals[name] = original
                setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()

    def _wrap(self, name: str, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            size = payload_bytes(name, args, kwargs)
            self.records.append((self.phase, self.block, name, size))
            return original(*args, **kwargs)

        return counted


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def payload_bytes(name: str, args: tuple, kwargs: dict) -> int:
    """What one call moves, counted once per rank: the result every rank ends up holding
    (all-reduce: the tensor; all-gather: the gathered whole; reduce-scatter and all-to-all:
    the input it hands over; broadcast: the tensor)."""
    first = args[0] if args else kwargs.get("tensor", kwargs.get("output_tensor_list"))
    if name == "all_gather":
        return sum(_nbytes(t) for t in first)
    if name in ("reduce_scatter_tensor", "all_to_all_single"):
        return _nbytes(args[1] if len(args) > 1 else kwargs["input"])
    return _nbytes(first)


def parameter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(non-expert, expert) bytes of this rank's parameters (shared ones counted once)."""
    from parallel.markers import is_expert

    expert = dense = 0
    for param in model.parameters():
        if is_expert(param):
            expert += _nbytes(param)
        else:
            dense += _nbytes(param)
    return dense, expert


def build_model(kind: str, args: argparse.Namespace) -> torch.nn.Module:
    """The bench Transformer (seeded: every TP rank starts from the tp=1 weights)."""
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
    moe = None
    if kind == "moe":
        moe = MoEConfig(num_experts=args.experts, every=1, capacity_factor=args.capacity_factor)
    torch.manual_seed(0)
    return Transformer(config, moe, AttentionConfig(name="full"))


def _enter(counter: CollectiveCounter, block: int | None) -> Any:
    def hook(*_: Any) -> None:
        counter.block = block

    return hook


def measure(kind: str, args: argparse.Namespace, group: Any, tp: int) -> dict[str, Any]:
    """One training step of the ``kind`` model on this rank: traffic, memory, loss."""
    model = build_model(kind, args)
    if tp > 1:
        apply_tensor_parallel(model, group, timeout=timedelta(seconds=120))
    dense_bytes, expert_bytes = parameter_bytes(model)
    generator = torch.Generator().manual_seed(1)  # the same batch on every TP rank
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with CollectiveCounter() as counter:
        # Forward collectives are attributed to their block; the backward's only to the step
        # (autograd may interleave the blocks' branches, e.g. the routers' through aux loss).
        hooks = []
        for index, block in enumerate(model.blocks):
            hooks.append(block.register_forward_pre_hook(_enter(counter, index)))
            hooks.append(block.register_forward_hook(_enter(counter, None)))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(inputs, targets=targets).loss
        for hook in hooks:
            hook.remove()
        counter.phase = "backward"
        loss.backward()
    return {
        "records": counter.records,
        "non_expert_param_bytes": dense_bytes,
        "expert_param_bytes": expert_bytes,
        "activation_bytes": sum(saved.values()),
        "loss": float(loss.detach()),
    }


def _rank_main(
    rank: int, world: int, store_path: str, args: argparse.Namespace, queue: Any
) -> None:
    """One process: for each ``--tp`` value, the first tp ranks form the TP group and measure
    every model kind (the others wait); the results go to the parent, keyed by tp."""
    try:
        torch.set_num_threads(args.threads)
        store = dist.FileStore(store_path, world)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=120)
        )
        try:
            results = {}
            for tp in args.tp:
                # Every rank of the world takes part in creating each group (torch requires it).
                group = dist.new_group(list(range(tp))) if tp > 1 else None
                if rank < tp:
                    results[tp] = {kind: measure(kind, args, group, tp) for kind in KINDS}
        finally:
            dist.destroy_process_group()
        queue.put((rank, "ok", results))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the rank
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(world: int, args: argparse.Namespace, timeout: float = 300.0) -> list[dict]:
    """Spawn ``world`` ranks (gloo, a FileStore in a temporary folder) that run every ``--tp``
    value in turn; returns each rank's results by tp, in rank order. One set of processes for
    all tp values: most of a small run's time is each process importing torch."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="bench_tp_") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_rank_main, args=(r, world, store_path, args, queue))
            for r in range(world)
        ]
        for proc in procs:
            proc.start()
        return wait_for_ranks(procs, queue, timeout=timeout, name="bench tp")


def analytic(kind: str, tp: int, args: argparse.Namespace, element_size: int = 4) -> dict:
    """Per block and step: activation collectives (count by phase and op) and their bytes."""
    counts = {"fwd_all_reduce": 0, "fwd_all_gather": 0, "bwd_all_reduce": 0, "bwd_all_gather": 0}
    if tp > 1:
        # Attention: row-parallel output (forward), the column q/k/v input (backward).
        counts["fwd_all_reduce"] = counts["bwd_all_reduce"] = 1
        ffn_op = "all_reduce" if kind == "dense" else "all_gather"
        counts[f"fwd_{ffn_op}"] += 1
        counts[f"bwd_{ffn_op}"] += 1
    activation = args.batch * args.seq * args.d_model * element_size
    return {**counts, "bytes": sum(counts.values()) * activation}


def summarize(kind: str, tp: int, ranks: list[dict], args: argparse.Namespace) -> dict:
    """One table row: rank 0's traffic per block, the largest per-rank memory."""
    mine = [r[kind] for r in ranks]
    records = mine[0]["records"]
    activation = args.batch * args.seq * args.d_model * 4
    row: dict[str, Any] = {"blocks": kind, "tp": tp}
    for phase, short in (("forward", "fwd"), ("backward", "bwd")):
        for op in ("all_reduce", "all_gather"):
            ops = ("all_gather", "all_gather_into_tensor") if op == "all_gather" else (op,)
            n = sum(
                1
                for p, _, name, size in records
                if p == phase and name in ops and size == activation
            )
            row[f"{short}_{op}"] = n / args.layers
    measured = sum(size for *_, size in records if size == activation)
    other = sum(size for *_, size in records if size != activation)
    # Forward bytes of each block, and of the step outside any block (embedding, head, loss).
    forward = [0] * args.layers
    outside = 0
    for phase, block, _, size in records:
        if phase == "forward" and block is None:
            outside += size
        elif phase == "forward":
            forward[block] += size
    row["forward_bytes_by_block"], row["forward_bytes_outside_blocks"] = forward, outside
    row["measured_bytes"] = measured / args.layers
    row["other_bytes"] = other / args.layers
    row["analytic_bytes"] = analytic(kind, tp, args)["bytes"]
    for key in ("non_expert_param_bytes", "expert_param_bytes", "activation_bytes"):
        row[key] = max(r[key] for r in mine)
    row["loss"] = mine[0]["loss"]
    return row


def _count(value: float) -> str:
    return f"{value:g}"


def format_table(rows: list[dict]) -> str:
    """The markdown table, traffic in KiB per block and step, memory in MiB per rank."""
    base = {(r["blocks"]): r for r in rows if r["tp"] == 1}
    header = (
        "| blocks | tp | fwd AR | fwd AG | bwd AR | bwd AG | measured KiB/block | "
        "analytic KiB/block | ratio | other KiB/block | non-expert MiB/rank | vs tp=1 | "
        "expert MiB/rank | activations MiB/rank | loss |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = base.get(r["blocks"])
        ratio = f"{r['measured_bytes'] / r['analytic_bytes']:.3f}" if r["analytic_bytes"] else "-"
        vs = f"{r['non_expert_param_bytes'] / ref['non_expert_param_bytes']:.3f}x" if ref else "-"
        lines.append(
            f"| {r['blocks']} | {r['tp']} | {_count(r['fwd_all_reduce'])} | "
            f"{_count(r['fwd_all_gather'])} | {_count(r['bwd_all_reduce'])} | "
            f"{_count(r['bwd_all_gather'])} | {r['measured_bytes'] / 1024:.1f} | "
            f"{r['analytic_bytes'] / 1024:.1f} | {ratio} | {r['other_bytes'] / 1024:.2f} | "
            f"{r['non_expert_param_bytes'] / 2**20:.3f} | {vs} | "
            f"{r['expert_param_bytes'] / 2**20:.3f} | {r['activation_bytes'] / 2**20:.3f} | "
            f"{r['loss']:.6f} |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict]) -> tuple[str, bool]:
    """One line: traffic vs analytic, the tp=2 non-expert ratio, losses vs tp=1."""
    base = {r["blocks"]: r for r in rows if r["tp"] == 1}
    off = [
        f"{r['blocks']} tp={r['tp']}"
        for r in rows
        if r["measured_bytes"] != r["analytic_bytes"]
        or len(set(r["forward_bytes_by_block"])) > 1
        or r["forward_bytes_outside_blocks"]
    ]
    parts = [
        "traffic == analytic in every row"
        if not off
        else f"traffic != analytic, or uneven over blocks: {', '.join(off)}"
    ]
    ok = not off
    for r in rows:
        ref = base.get(r["blocks"])
        if r["tp"] == 2 and ref:
            share = r["non_expert_param_bytes"] / ref["non_expert_param_bytes"]
            good = share <= NON_EXPERT_LIMIT
            ok &= good
            parts.append(
                f"{r['blocks']} non-expert params at tp=2 {share:.3f}x tp=1 "
                f"({'<=' if good else '>'} {NON_EXPERT_LIMIT})"
            )
    drift = max(
        (abs(r["loss"] - base[r["blocks"]]["loss"]) for r in rows if r["blocks"] in base),
        default=0.0,
    )
    parts.append(f"largest loss difference to tp=1 {drift:.1e}")
    return ("verdict: " if ok else "verdict (FAIL): ") + "; ".join(parts), ok


def main(argv: list[str]) -> int:
    """Run every ``--tp`` group, print the table and the verdict. Returns the exit status."""
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("moeforge bench tp starts its own processes; run it without torchrun")
    per_rank = run_ranks(max(args.tp), args)
    rows = []
    for tp in dict.fromkeys(args.tp):
        ranks = [results[tp] for results in per_rank[:tp]]
        rows.extend(summarize(kind, tp, ranks, args) for kind in KINDS)
    rows.sort(key=lambda r: (KINDS.index(r["blocks"]), r["tp"]))
    print(
        f"TP traffic per block and training step (forward + backward), fp32, gloo on CPU: "
        f"B={args.batch} n={args.seq} D={args.d_model} heads={args.heads} ff={args.d_ff} "
        f"layers={args.layers} experts={args.experts} (moe: every block) vocab={args.vocab}; "
        f"one activation = B*n*D*4 = {args.batch * args.seq * args.d_model * 4 / 1024:.1f} KiB"
    )
    print(format_table(rows))
    line, ok = verdict(rows)
    print(line)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if ok else 1
