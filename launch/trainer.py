"""The training loop on the DeepSpeed engine: data -> engine steps -> metrics, eval, checkpoints.

Shape letters: B micro batch, L sequence length, V vocabulary.

    result = train(load_config("configs/tiny.yaml"), Path("runs/tiny"))

Per logged step, ``RUN_DIR/metrics.jsonl`` gets one JSON object with step, loss (the total
that is back-propagated), ce_loss, aux_loss, z_loss (sums over MoE layers), dropped_fraction
and router_entropy (means over MoE layers), lr, tokens_per_s (all ranks) and grad_norm (the
engine's global gradient norm of the window's last step, when it computes one), the
cumulative tokens and model FLOPs of the run (moe/accounting.py's FLOPs per token), for MoE
models padded_flops (cumulative: what fixed [E, C, d] capacity buffers multiply beyond the
model's FLOPs; an upper bound for layouts that trim or group their rows) and
saved_flops_per_token (the expert FLOPs per token the window's dropped assignments skipped,
from its dropped_fraction) and, on CUDA, mfu (model FLOPs utilisation: FLOPs per token x
tokens_per_s over the peak of all ranks' GPUs, from train.peak_tflops or the table of known
GPUs); evaluations add records with val_loss (nats per token) and val_bpb (bits per byte of
the targets' text), plus val_accuracy in classify mode (images: launch/images.py).
Values are averaged over the micro steps of the step and over data-parallel ranks.
Re-running a run directory that holds a checkpoint continues it exactly from its newest
valid checkpoint (a damaged newer one is named in one line and skipped): same data order
(the position is the step), same RNG states, same optimizer and schedule state. A run
directory with metrics or checkpoints but no valid checkpoint is refused unless ``fresh``
(``--fresh``) starts it over; ``no_resume`` (``--no-resume``) refuses any previous run. The
same number of ranks may continue it at another ``parallel.ep`` (weights and Adam state from
the checkpoint's layout-free source), and any number of ranks at another ``parallel.tp`` or
``parallel.ep`` when the global batch (micro batch x accumulation x dp) is unchanged; a
checkpoint without layout-free state resumes at its own layout only. A step whose loss or gradient is not finite is never applied; the run then stops
naming it (``launch/divergence.py``) before any checkpoint is written from that state.
``precision: auto`` is resolved for the device here (``launch/precision.py``).

``train`` runs named build steps, each adding to one ``Run`` record: ``start`` (static checks,
process group, run dir, the checkpoint to continue) -> ``build_layout`` (every group once)
-> ``build_model_data`` (same seed on every rank) -> ``parallelize`` (tensor parallelism, then
expert parallelism) -> ``build_engine`` (DeepSpeed over the layout's groups, checkpoint
state) -> ``train_loop``.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from launch import checkpoint
from launch.config import (
    RunConfig,
    deepspeed_config,
    incompatible_fields,
    save_resolved,
    tokens_per_micro_batch,
)
from launch.data import (
    BatchSampler,
    Data,
    Split,
    build_data,
    check_loaded_batches,
    eval_batches,
    mask_for_mlm,
)
from launch.divergence import DivergenceWatch, first_nonfinite_module, parameters_finite
from launch.errors import TrainingDiverged, UserError, first_line
from launch.images import build_image_data, shift_images
from launch.launcher import discover_environment
from launch.log import get_logger, quiet_deepspeed
from launch.metrics import MetricsWriter, eval_words, example_words, print_summary
from launch.precision import emulated_bf16_warning, resolve_precision
from launch.preflight import preflight
from moe.accounting import Accounting, account, mfu, peak_tflops, saved_flops
from moe.expert_parallel import apply_expert_parallel
from moe.pipeline import (
    PipelineLayers,
    collect_step,
    describe_stages,
    no_mask,
    pipeline_engine,
    plan_stages,
)
from moe.telemetry import RoutingTelemetry
from moe.tensor_parallel import apply_tensor_parallel
from moe.transformer import IGNORE_INDEX, Transformer, count_parameters, is_moe_block
from parallel import deepspeed_bridge as bridge
from parallel.collectives import CollectiveError
from parallel.layout import ParallelLayout
from parallel.markers import is_expert
from parallel.rendezvous import bound_group_timeouts


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or stopped) run reports."""

    run_dir: Path
    step: int
    loss: float | None
    val_loss: float | None
    val_bpb: float | None
    tokens_per_s: float | None
    seconds: float
    val_accuracy: float | None = None
    mfu: float | None = None  # model FLOPs utilisation of the last log window (CUDA only)


def make_inputs(
    batch: Split, mode: str, data: Data, probability: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs [B, L], targets [B, L] or [B], padding mask [B, L] or None) for one micro batch."""
    if mode == "causal_lm":
        return batch.tokens[:, :-1], batch.tokens[:, 1:], None
    if mode == "masked_lm":
        inputs, targets = mask_for_mlm(batch.tokens, data.tokenizer, probability, generator)
        return inputs, targets, None
    return batch.tokens, batch.labels, batch.padding_mask


def notify_step(model: torch.nn.Module, step: int) -> None:
    """Tell modules with a training schedule (Treeformer's bootstrapped tree growth) the step."""
    for module in model.modules():
        hook = getattr(module, "set_training_step", None)
        if callable(hook):
            hook(step)


def _device(engine: Any) -> torch.device:
    return next(engine.module.parameters()).device


def _collective(operation: str, purpose: str, run: Callable[[], Any]) -> Any:
    """Run a collective over the world group; a failure (a peer died, froze past
    parallel.timeout_s, or the group broke) is re-raised as one line naming what was being
    done, over which group and ranks, on which rank."""
    try:
        return run()
    except RuntimeError as err:  # DistBackendError and gloo's errors are RuntimeErrors
        world = dist.get_world_size()
        raise CollectiveError(
            f"{operation} of {purpose} over the world group (ranks 0-{world - 1}) failed on "
            f"rank {dist.get_rank()}: {first_line(err)}"
        ) from err


def _barrier(purpose: str) -> None:
    """``dist.barrier`` named for errors; ``purpose`` says what the ranks wait for."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        _collective("barrier", purpose, dist.barrier)


def _all_reduce_sum(
    values: list[float], device: torch.device, purpose: str = "the step's metrics"
) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        _collective("all_reduce", purpose, lambda: dist.all_reduce(tensor))
    return tensor.tolist()


def _first_nonfinite(
    engine: Any,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    device: torch.device,
) -> str | None:
    """Re-run one micro batch with a finiteness hook on every module; the first that broke."""
    return first_nonfinite_module(
        engine.module,
        lambda: engine(
            inputs.to(device),
            targets=targets.to(device),
            padding_mask=None if mask is None else mask.to(device),
        ),
    )


def _eval_sums(
    logits: torch.Tensor, targets: torch.Tensor, mode: str, token_bytes: torch.Tensor | None
) -> list[float]:
    """[nats, targets counted, their bytes, correct predictions] of one evaluated batch."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    flat = targets.reshape(-1).to(logits.device)
    nats = F.cross_entropy(logits, flat, ignore_index=IGNORE_INDEX, reduction="sum").item()
    valid = flat != IGNORE_INDEX
    num_bytes = correct = 0.0
    if mode != "classify":
        num_bytes = token_bytes[flat[valid].cpu()].sum().item()
    else:
        correct = (logits.argmax(dim=-1) == flat)[valid].sum().item()
    return [nats, valid.sum().item(), num_bytes, correct]


def evaluate(
    engine: Any,
    batches: list[Split],
    mode: str,
    data: Data,
    seed: int,
    telemetry: RoutingTelemetry | None = None,
    mlm_probability: float = 0.15,
    pipeline: tuple[PipelineLayers, Any] | None = None,
) -> tuple[float, float, float | None]:
    """(validation loss in nats per target, bits per byte, accuracy or None unless classify)
    over every rank's fixed batches; routing statistics go to ``telemetry`` as split eval.

    Masked-LM batches are masked with ``mlm_probability``, the rate the run trains with, so
    validation measures the task being trained. ``pipeline``: (the stages' layers, the pipe
    group) of a pipeline engine, which evaluates all batches as micro-batches of one
    ``eval_batch``; the last stage sums the logits' statistics.
    """
    token_bytes = None if data.tokenizer is None else torch.as_tensor(data.tokenizer.token_bytes)
    generator = torch.Generator().manual_seed(seed + 7919)
    device = _device(engine)
    inputs = [make_inputs(batch, mode, data, mlm_probability, generator) for batch in batches]
    sums = [0.0] * 4
    if pipeline is not None:
        pipe, group = pipeline

        def add(logits: torch.Tensor, targets: torch.Tensor) -> None:
            for i, value in enumerate(_eval_sums(logits, targets, mode, token_bytes)):
                sums[i] += value

        pipe.loss_fn.sink = add
        try:
            if inputs:
                engine.eval_batch(
                    iter([_pipe_batch(*batch, device) for batch in inputs]),
                    num_micro_batches=len(inputs),
                )
        finally:
            pipe.loss_fn.sink = None
        for out in collect_step(pipe, len(inputs), group, device):
            if telemetry is not None:
                telemetry.update(out.routing, split="eval")
    else:
        engine.eval()
        with torch.no_grad():
            for ids, targets, mask in inputs:
                out = engine(ids.to(device), padding_mask=None if mask is None else mask.to(device))
                if telemetry is not None:
                    telemetry.update(out.routing, split="eval")
                for i, value in enumerate(_eval_sums(out.logits, targets, mode, token_bytes)):
                    sums[i] += value
    engine.train()
    # Under a pipeline only the last stage has sums; the ratios are those of its ranks.
    sums = _all_reduce_sum(sums, device, "the evaluation's sums")
    nats, count, num_bytes, correct = sums
    loss = nats / max(count, 1.0)
    bpb = nats / math.log(2) / num_bytes if num_bytes else float("nan")
    accuracy = correct / max(count, 1.0) if mode == "classify" else None
    return loss, bpb, accuracy


def _check_resume(
    config: RunConfig,
    run_dir: Path,
    world_size: int,
    *,
    resume: bool = False,
    fresh: bool = False,
    no_resume: bool = False,
) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint to continue from (tag, moeforge's state), or None for a new run.

    A run dir holding a previous run (metrics or checkpoints) continues from its newest valid
    checkpoint, naming any damaged newer one; it is never silently started over: with no
    valid checkpoint it is refused unless ``fresh``, which removes the old state first.
    ``no_resume`` refuses a run dir that holds a previous run. A torchrun restart before the
    run's first checkpoint starts over (the failed attempt left nothing to continue from).
    """
    log = get_logger()
    found = checkpoint.survey(run_dir)
    point, held = found.point, ", ".join(found.contents)
    if fresh:
        if found.contents:
            log.warning("--fresh: starting %s over: removing %s", run_dir, held)
            checkpoint.remove_run_state(run_dir)
        return None
    if no_resume and found.contents:
        raise UserError(
            f"--no-resume: {run_dir} already holds a run ({held}); use a new --run-dir, or "
            "--fresh to start over"
        )
    if point.tag is None:
        if not found.contents:
            if resume:
                raise UserError(
                    f"--resume: {run_dir} has no complete checkpoint; drop --resume to start "
                    "a new run"
                )
            return None
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) > 0
        if restarted and found.num_checkpoints == 0:
            log.warning(
                "restarted before the first checkpoint: starting %s over (removing %s)",
                run_dir, held,
            )  # fmt: skip
            checkpoint.remove_run_state(run_dir)
            return None
        problems = point.problems()
        raise UserError(
            f"{'--resume: ' if resume else ''}{run_dir} holds a previous run ({held}) but no "
            f"valid checkpoint{f': {problems}' if problems else ''}; rerun with --fresh to "
            "start over, or use a new --run-dir"
        )
    if point.problems():
        log.warning(
            "%s: %s; resuming from the newest valid checkpoint, %s (step %d)",
            checkpoint.checkpoint_dir(run_dir), point.problems(), point.tag, point.step,
        )  # fmt: skip
    tag = point.tag
    saved = checkpoint.saved_state(run_dir, tag)
    saved_config = yaml.safe_load(checkpoint.saved_config_text(run_dir, tag))
    changed = incompatible_fields(saved_config, config)
    if changed:
        raise UserError(
            f"cannot resume {run_dir}: {changed[0]} differs from its checkpoint; "
            "restore the saved value or use a new --run-dir"
        )
    before = checkpoint.saved_layout(run_dir, tag)
    par = config.parallel
    dp = world_size // (par.tp * par.pp)
    train = config.train
    batch_now = train.micro_batch * train.grad_accum * dp
    saved_train = saved_config.get("train", {})
    batch_before = int(saved_train.get("micro_batch", 0)) * int(saved_train.get("grad_accum", 1))
    batch_before *= before["dp"]
    if batch_now != batch_before:
        raise UserError(
            f"cannot resume {run_dir}: its global batch was {batch_before} rows (train.micro_batch "
            f"x train.grad_accum x dp {before['dp']}), this run's is {batch_now} (dp {dp}); set "
            "train.micro_batch or train.grad_accum so the global batch is unchanged"
        )
    if before["world_size"] != world_size and not checkpoint.has_layout_free_state(run_dir, tag):
        raise UserError(
            f"cannot resume {run_dir}: it was written by {before['world_size']} ranks without "
            f"layout-free state, this run has {world_size}; relaunch with "
            f"{before['world_size']} processes or use a new --run-dir"
        )
    checkpoint.check_layout_change(run_dir, {"ep": par.ep, "tp": par.tp}, tag)
    steps_before = int(saved_train.get("steps", train.steps))
    if steps_before != train.steps:
        # The scheduler keeps only its step count: the cosine is recomputed over the new length.
        log.warning(
            "train.steps changed from %d to %d since step %d was saved: the warmup-cosine "
            "schedule now decays over %d steps, so the learning rate jumps at step %d and this "
            "run will not match a fresh %d-step run (for that, use a new --run-dir)",
            steps_before, train.steps, point.step, train.steps, point.step, train.steps,
        )  # fmt: skip
    return tag, saved


def _layout_free_name(saved: dict[str, Any]) -> str:
    """Where a checkpoint (its moeforge state ``saved``) keeps its layout-free weights."""
    in_engine = checkpoint.layout_free_in_engine_files(saved)
    return "the engine's files" if in_engine else checkpoint.PORTABLE_FILE


def _build_data(config: RunConfig, run_dir: Path, rank: int) -> Data:
    if config.model.input == "patches":  # images: nothing to cache, every rank loads its copy
        return build_image_data(config.data, config.model)
    # Rank 0 builds the corpus cache and any BPE first; the others then read them.
    data = build_data(config.data, config.model.mode, run_dir) if rank == 0 else None
    if rank == 0:
        data.tokenizer.save(run_dir)
    _barrier("rank 0's data preparation (corpus cache, tokenizer)")
    return data if data is not None else build_data(config.data, config.model.mode, run_dir)


@dataclass
class Run:
    """What the build steps made, filled in the order they run:
    start -> layout -> data -> model -> parallelize (TP, then EP) -> engine -> loop."""

    config: RunConfig
    run_dir: Path
    log: Any
    launcher: str
    backend: str
    dp: int
    world: int = 1
    rank: int = 0
    resumed: tuple[str, dict[str, Any]] | None = None
    groups: Any = None  # parallel.layout.ProcessGroups
    data: Data | None = None
    model: Transformer | None = None
    counts: dict[str, int] = field(default_factory=dict)  # of the whole (tp=1) model
    accounting: Accounting | None = None  # parameters and FLOPs per token, whole model
    experts: list[int] = field(default_factory=list)  # experts of each MoE layer
    engine: Any = None
    precision: Any = None
    start_step: int = 0
    pipe: PipelineLayers | None = None  # under pipeline parallelism: the stages' layers
    stage_counts: list[int] = field(default_factory=list)  # blocks per pipeline stage


def start(
    config: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    fresh: bool = False,
    no_resume: bool = False,
    deepspeed_json: str | Path | None = None,
) -> Run:
    """Static checks (before DeepSpeed is imported), the process group, the run directory
    every rank writes to, and the checkpoint to continue from."""
    log = get_logger()
    launcher = discover_environment()
    run_dir = Path(run_dir)
    # Everything knowable without a process group is checked before DeepSpeed is imported
    # and before any data loads: a bad value then costs seconds, not a traceback later.
    dp = preflight(
        config,
        run_dir,
        world_size=int(os.environ["WORLD_SIZE"]),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        deepspeed_json=deepspeed_json,
        log=log,
    )
    backend = config.parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    bridge.init_distributed(backend, timeout_s=config.parallel.timeout_s)
    quiet_deepspeed()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world > 1:
        # Launchers without a shared run id (mpirun, the deepspeed launcher) leave each rank
        # its own clock-based default name; every rank writes where rank 0 does.
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    _barrier("the run directory")
    run = Run(config, run_dir, log, launcher, backend, dp, world, rank)
    run.resumed = _check_resume(
        config, run_dir, world, resume=resume, fresh=fresh, no_resume=no_resume
    )
    return run


def build_layout(run: Run) -> None:
    """The one parallel layout: every group (tp, dp, ep, expert-data-parallel) built once
    here and handed to each consumer; rank 0 prints them."""
    par = run.config.parallel
    num_experts = run.config.moe.num_experts if run.config.moe else None
    layout = ParallelLayout.from_world(run.world, ep=par.ep, tp=par.tp, pp=par.pp)
    run.groups = layout.build(num_experts)
    if run.rank == 0:
        run.log.info(run.groups.report(num_experts))


def build_model_data(run: Run) -> None:
    """The data (rank 0 prepares caches first) and the whole model, built alike on every
    rank from the run's seed, so that every layout starts from the one-process weights."""
    config = run.config
    torch.manual_seed(config.train.seed)
    run.data = _build_data(config, run.run_dir, run.rank)
    clamped = check_loaded_batches(
        run.data, config.train.micro_batch, config.train.eval_batches, run.dp
    )
    if clamped is not None:
        run.log.warning(clamped)
    vocab = None if run.data.tokenizer is None else run.data.tokenizer.vocab_size
    if (
        vocab is not None
        and config.model.vocab_size is not None
        and config.model.vocab_size < vocab
    ):
        raise UserError(
            f"model.vocab_size ({config.model.vocab_size}) is smaller than the tokenizer's "
            f"({vocab}); raise it or leave it unset"
        )
    run.model = Transformer(config.model, config.moe, config.attention, vocab_size=vocab)
    run.experts = [
        config.moe.num_experts
        for i in range(config.model.num_layers)
        if is_moe_block(i, config.moe) and run.model.blocks[i].ffn is not None
    ]
    run.counts = count_parameters(run.model)
    routed = tokens_per_micro_batch(config)  # one routing call's tokens: the exact capacity
    run.accounting = account(run.model, routed // config.train.micro_batch, routed_tokens=routed)


def _dense_parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if not is_expert(p))


def parallelize(run: Run) -> None:
    """Split the model over the layout: attention heads and FFN width over the TP group,
    then experts over the EP group (all-to-all dispatch)."""
    timeout = timedelta(seconds=run.config.parallel.timeout_s)
    whole = _dense_parameter_bytes(run.model)
    if run.groups.tp_size > 1:
        apply_tensor_parallel(
            run.model, run.groups.tp_group, timeout=timeout, data_group=run.groups.dp_group
        )
        here = _dense_parameter_bytes(run.model)
        if run.rank == 0:
            run.log.info(
                "tensor parallel tp=%d: non-expert parameters per rank %.2f MB (%.2fx of tp=1, "
                "%.2f MB)",
                run.groups.tp_size, here / 1e6, here / max(whole, 1), whole / 1e6,
            )  # fmt: skip
    if run.groups.ep_size > 1:
        apply_expert_parallel(run.model, run.groups, timeout=timeout)


def build_engine(run: Run, deepspeed_json: str | Path | None) -> None:
    """The DeepSpeed engine over the layout's groups, then the checkpoint's state if any."""
    config = run.config
    run.precision = resolve_precision(config.precision)
    warning = emulated_bf16_warning(run.precision)
    if warning is not None:
        run.log.warning(warning)
    ds_config = deepspeed_config(config, run.run_dir, deepspeed_json, precision=run.precision.name)
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if run.groups.pp_size > 1:
        # The cut of the whole (tp=1, ep=1) model, as validation computed it, so that every
        # layout of one config cuts alike whatever its shards weigh.
        vocab = None if run.data.tokenizer is None else run.data.tokenizer.vocab_size
        counts = plan_stages(
            config.model, config.moe, config.attention, pp=run.groups.pp_size,
            partition=config.parallel.pp_partition, zero_stage=zero_stage, vocab_size=vocab,
        )  # fmt: skip
        run.engine, run.pipe, run.stage_counts = pipeline_engine(
            run.model, ds_config, pp=run.groups.pp_size, dp=run.groups.dp_size,
            tp=run.groups.tp_size, partition=counts, ep_size=config.parallel.ep,
            weight_decay=config.optimizer.weight_decay, groups=run.groups,
        )  # fmt: skip
    else:
        run.engine = bridge.initialize(
            run.model,
            ds_config,
            groups=run.groups,
            num_experts_per_layer=run.experts,
            ep_size=config.parallel.ep,
            weight_decay=config.optimizer.weight_decay,
            zero_stage=zero_stage,
        )
    # DeepSpeed's groups and the layout's mesh were made without a timeout (torch's default
    # is 30 minutes); the engine's gradient reduction runs over them.
    bound_group_timeouts(timedelta(seconds=config.parallel.timeout_s))
    if run.resumed is not None:
        tag, saved = run.resumed
        before = checkpoint.saved_layout(run.run_dir, tag)
        now = checkpoint.layout_of(run.groups)
        if before != now:
            run.log.info(
                "resuming a run saved at %s at %s (weights and Adam state from %s)",
                checkpoint.describe_layout(before), checkpoint.describe_layout(now),
                _layout_free_name(saved),
            )  # fmt: skip
        loaded = checkpoint.load(
            run.engine, run.run_dir, groups=run.groups, tag=tag, model=run.model
        )
        run.start_step = loaded["step"]


def train(
    config: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    fresh: bool = False,
    no_resume: bool = False,
    deepspeed_json: str | Path | None = None,
) -> TrainResult:
    """Train ``config`` in ``run_dir`` (continuing from its newest valid checkpoint if any).

    ``resume``: require a checkpoint to continue from; ``fresh``: remove a previous run's
    checkpoints and metrics and start over; ``no_resume``: refuse a run dir holding a run.
    """
    started = time.perf_counter()
    run = start(
        config, run_dir, resume=resume, fresh=fresh, no_resume=no_resume,
        deepspeed_json=deepspeed_json,
    )  # fmt: skip
    build_layout(run)
    build_model_data(run)
    parallelize(run)
    build_engine(run, deepspeed_json)
    return train_loop(run, started)


def _report_start(run: Run) -> None:
    config, data, counts = run.config, run.data, run.counts
    par = config.parallel
    run.log.info(
        "world size %d | backend %s | launcher %s | layout %s | precision %s | ZeRO %d",
        run.world, run.backend, run.launcher, run.groups.layout.describe(),
        run.precision.describe(), par.zero_stage,
    )  # fmt: skip
    run.log.info(
        "model %s: %d layers, d=%d, %d MoE layers x %d experts | params %.2fM total, %.2fM active "
        "| data %d train / %d val %s | run dir %s%s",
        config.model.mode, config.model.num_layers, config.model.d_model, len(run.experts),
        config.moe.num_experts if config.moe else 0, counts["total"] / 1e6,
        counts["active"] / 1e6, len(data.train), len(data.val), example_words(config),
        run.run_dir, f" | resuming at step {run.start_step}" if run.resumed is not None else "",
    )  # fmt: skip
    if run.accounting is not None:
        run.log.info("accounting: %s", run.accounting.describe())
    if run.pipe is not None:
        run.log.info(
            "pipeline pp=%d, %d micro-batches per step (1F1B; bubble %.0f%%): %s",
            len(run.stage_counts), config.train.grad_accum,
            100 * (len(run.stage_counts) - 1) / (config.train.grad_accum + len(run.stage_counts) - 1),
            " | ".join(describe_stages(run.pipe, run.stage_counts)),
        )  # fmt: skip


def peak_flops(run: Run, device: torch.device) -> float | None:
    """One device's peak FLOP/s for the MFU: ``train.peak_tflops``, else the table's figure
    for this GPU (moe/accounting.py). None on a CPU (no MFU there, said nowhere) and, with
    one warning on rank 0, for a GPU the table does not know."""
    if device.type != "cuda":
        return None
    if run.config.train.peak_tflops is not None:
        return run.config.train.peak_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    tflops = peak_tflops(name)
    if tflops is None:
        if run.rank == 0:
            run.log.warning(
                "no MFU: the peak bf16 throughput of %s is not in moe/accounting.py's table; "
                "set --set train.peak_tflops=<its dense bf16 TFLOP/s> to report it",
                name,
            )
        return None
    return tflops * 1e12


def _micro_batch(
    run: Run, sampler: BatchSampler, step: int, accum_index: int, generator_seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, targets, padding mask or None) of micro step ``accum_index`` of ``step``.

    MLM masking draws from its own generator so the global RNG stream (dropout, router
    jitter) is the same whatever the mode; a pure function of the position (the dp rank's,
    ``generator_seed``: the ranks of a TP group and of a pipeline mask alike).
    """
    train_cfg, config = run.config.train, run.config
    position = (train_cfg.seed * 1_000_003 + step) * 4099 + accum_index * run.dp + generator_seed
    generator = torch.Generator().manual_seed(position % (2**63))
    batch = sampler.rows(step, accum_index)
    inputs, targets, mask = make_inputs(
        batch, config.model.mode, run.data, train_cfg.mlm_probability, generator
    )
    if config.model.input == "patches" and config.data.augment_shift:
        inputs = shift_images(inputs, config.data.augment_shift, generator)
    return inputs, targets, mask


def _pipe_batch(
    inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None, device: torch.device
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One micro-batch as the pipeline engine reads it: ((inputs, int mask), targets)."""
    pipe_mask = no_mask(device) if mask is None else mask.to(device=device, dtype=torch.int64)
    return (inputs.to(device), pipe_mask), targets.to(device)


def _train_step(run: Run, batches: list[tuple], device: torch.device) -> list[Any]:
    """One optimizer step over the micro-batches; per micro-batch an output with loss,
    ce_loss, aux_loss, z_loss and routing (every MoE layer's statistics, in model order)."""
    engine = run.engine
    if run.pipe is not None:  # 1F1B over the stages, then each stage's logs to every rank
        engine.train_batch(iter([_pipe_batch(*batch, device) for batch in batches]))
        return collect_step(run.pipe, len(batches), run.groups.pp_group, device)
    outs = []
    for inputs, targets, mask in batches:
        out = engine(
            inputs.to(device),
            targets=targets.to(device),
            padding_mask=None if mask is None else mask.to(device),
        )
        engine.backward(out.loss)
        engine.step()
        outs.append(out)
    return outs


def train_loop(run: Run, started: float) -> TrainResult:
    """The steps, logging, evaluation and checkpoints of a built run."""
    config, engine, data, log = run.config, run.engine, run.data, run.log
    rank, dp, dp_rank = run.rank, run.dp, run.groups.dp_rank
    start_step, saved = run.start_step, None if run.resumed is None else run.resumed[1]
    if rank == 0:  # the run's config from here on: a resume may change values (steps, ep, ...)
        save_resolved(config, run.run_dir / "config.yaml")
    config_yaml = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

    train_cfg, mode = config.train, config.model.mode
    end_step = min(train_cfg.steps, train_cfg.stop_at or train_cfg.steps)
    _report_start(run)
    experts = run.experts
    telemetry = RoutingTelemetry(len(experts), config.moe.num_experts) if experts else None
    # The ranks of one TP group read the same rows: the data is split over dp only.
    sampler = BatchSampler(
        data.train, train_cfg.micro_batch, train_cfg.grad_accum, dp, dp_rank, train_cfg.seed
    )
    val_batches = eval_batches(data.val, train_cfg.micro_batch, train_cfg.eval_batches, dp, dp_rank)
    metrics = MetricsWriter(
        run.run_dir, engine, start_step if saved is not None else None, rank == 0
    )
    device = _device(engine)
    progress = None
    if rank == 0 and config.logging.progress:
        from tqdm import tqdm

        progress = tqdm(
            total=end_step,
            initial=start_step,
            desc="train",
            dynamic_ncols=True,
            leave=True,
            mininterval=0.1 if sys.stderr.isatty() else 30.0,  # keep redirected logs short
        )

    # Metric sums run over every rank: the ranks of a TP group hold the same values, which
    # weighs each data-parallel rank alike, as the counts in the last entry do.
    totals = [0.0] * 7  # loss, ce, aux, z, dropped, entropy, micro steps (summed since last log)
    tokens_since, window_start = 0, time.perf_counter()
    last_loss = last_val = last_bpb = last_rate = last_accuracy = last_grad_norm = None
    patch_tokens = config.model.image.num_patches() if config.model.image is not None else 0
    # Cumulative tokens and model FLOPs (metrics "tokens", "flops"), counted as tokens_per_s
    # counts them (patch tokens for images, whose class token the FLOPs per token carry);
    # a resumed run starts from its checkpoint's step, every step having the same batch.
    seq_len = run.accounting.seq_len
    counted_len = patch_tokens or seq_len
    per_counted = seq_len / counted_len
    flops_per_token = run.accounting.training.total * per_counted
    padded_per_token = run.accounting.training.padded * per_counted
    tokens_total = start_step * train_cfg.micro_batch * train_cfg.grad_accum * dp * counted_len
    peak = peak_flops(run, device)
    last_mfu = None
    watch = DivergenceWatch(train_cfg.skip_nonfinite)
    for step in range(start_step, end_step):
        notify_step(engine.module, step)
        step_values: list[list[float]] = []  # per micro step: the totals' seven entries
        step_tokens = 0
        batches = [
            _micro_batch(run, sampler, step, accum_index, generator_seed=dp_rank)
            for accum_index in range(train_cfg.grad_accum)
        ]
        for (inputs, _, _), out in zip(batches, _train_step(run, batches, device)):
            routing = out.routing
            if telemetry is not None:
                telemetry.update(routing, split="train")
            dropped = sum(r.dropped_fraction.item() for r in routing) / max(len(routing), 1)
            entropy = sum(r.router_entropy.item() for r in routing) / max(len(routing), 1)
            parts = (out.loss, out.ce_loss, out.aux_loss, out.z_loss)
            step_values.append([p.item() for p in parts] + [dropped, entropy, 1.0])
            # Images count their patch tokens (N per image), not pixels.
            step_tokens += (inputs.shape[0] * patch_tokens if patch_tokens else inputs.numel()) * dp
        inputs, targets, mask = batches[-1]
        done = step + 1
        tokens_total += step_tokens
        grad_norm = (
            engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        )
        if grad_norm is not None:
            last_grad_norm = float(grad_norm)
        applied = engine.was_step_applied() if hasattr(engine, "was_step_applied") else True
        diagnose = (
            functools.partial(_first_nonfinite, engine, inputs, targets, mask, device)
            if run.pipe is None
            else lambda: None  # a stage cannot run the whole forward on its own
        )
        if watch.after_step(done, applied, [v[0] for v in step_values], diagnose, log):
            for values in step_values:  # a skipped step's (non-finite) values are not logged
                for i, value in enumerate(values):
                    totals[i] += value
            tokens_since += step_tokens
        if done % train_cfg.log_every == 0 or done == end_step:
            sums = _all_reduce_sum(totals, device)
            if sums[-1] > 0:  # a window whose every step was skipped logs nothing
                loss, ce, aux, z, dropped, entropy = (v / sums[-1] for v in sums[:-1])
                watch.check_logged_loss(done, loss)
                elapsed = time.perf_counter() - window_start
                last_rate = tokens_since / max(elapsed, 1e-9)
                last_loss = loss
                lr = engine.get_lr()[0] if hasattr(engine, "get_lr") else float("nan")
                record = {
                    "step": done, "loss": loss, "ce_loss": ce, "aux_loss": aux, "z_loss": z,
                    "dropped_fraction": dropped, "router_entropy": entropy, "lr": lr,
                    "tokens_per_s": last_rate, "tokens": tokens_total,
                    "flops": tokens_total * flops_per_token,
                }  # fmt: skip
                if run.accounting.training.experts:  # what capacity limits cost and spared
                    record["padded_flops"] = tokens_total * padded_per_token
                    record["saved_flops_per_token"] = (
                        saved_flops(run.accounting, dropped) * per_counted
                    )
                if peak is not None:
                    last_mfu = record["mfu"] = mfu(flops_per_token, last_rate, peak, run.world)
                if last_grad_norm is not None:  # the engine's, over every layout's shards
                    record["grad_norm"] = last_grad_norm
                # Per layer and expert: load, imbalance, drops, capacity use.
                if telemetry is not None:
                    record.update(telemetry.summary(split="train"))
                    telemetry.reset("train")
                metrics.write(record)
                if progress is not None:
                    progress.set_postfix(
                        loss=f"{ce:.3f}",
                        aux=f"{aux:.3f}",
                        drop=f"{dropped:.1%}",
                        tok_s=f"{last_rate:,.0f}",
                        **({} if last_mfu is None else {"mfu": f"{last_mfu:.1%}"}),
                        refresh=sys.stderr.isatty(),  # redirected logs: tqdm's own interval only
                    )
            totals = [0.0] * 7
            tokens_since, window_start = 0, time.perf_counter()
        if progress is not None:
            progress.update(1)
        is_last = done == train_cfg.steps
        if is_last or (train_cfg.eval_every and done % train_cfg.eval_every == 0):
            last_val, last_bpb, last_accuracy = evaluate(
                engine, val_batches, mode, data, train_cfg.seed, telemetry,
                mlm_probability=train_cfg.mlm_probability,
                pipeline=None if run.pipe is None else (run.pipe, run.groups.pp_group),
            )  # fmt: skip
            record = {"step": done, "val_loss": last_val, "val_bpb": last_bpb}
            if telemetry is not None:
                record.update(telemetry.summary(split="eval"))
                telemetry.reset("eval")
            if last_accuracy is not None:
                record["val_accuracy"] = last_accuracy
            metrics.write(record)
            if progress is not None:
                progress.write(
                    f"[moeforge] step {done}: "
                    + eval_words(mode, last_val, last_bpb, last_accuracy)
                )
            window_start = time.perf_counter()  # evaluation time is not training throughput
        every = config.checkpoint.every
        if done == end_step or (every and done % every == 0):
            _save_checkpoint(run, done, config_yaml, device)
            window_start = time.perf_counter()
    if progress is not None:
        progress.close()
    result = TrainResult(
        run_dir=run.run_dir,
        step=max(end_step, start_step),
        loss=last_loss,
        val_loss=last_val,
        val_bpb=last_bpb,
        tokens_per_s=last_rate,
        seconds=time.perf_counter() - started,
        val_accuracy=last_accuracy,
        mfu=last_mfu,
    )
    if rank == 0:
        print_summary(result, run.counts, mode)
        if last_mfu is not None:
            log.info(
                "MFU %.1f%% (last log): %.3g FLOPs per token x %.0f tokens/s over %d x %g "
                "TFLOP/s peak",
                100 * last_mfu, flops_per_token, last_rate, run.world, peak / 1e12,
            )  # fmt: skip
    return result


def _save_checkpoint(run: Run, done: int, config_yaml: str, device: torch.device) -> None:
    # The guard keeps non-finite updates out of the weights; this is the last line of
    # defence for the newest checkpoint (experts and shards differ by rank: all must agree).
    broken = _all_reduce_sum(
        [0.0 if parameters_finite(run.engine.module) else 1.0], device, "the weights' finiteness"
    )
    if broken[0]:
        raise TrainingDiverged(
            f"training diverged at step {done}: a weight is not finite; the checkpoint "
            "of this step was not written; lower optimizer.lr"
        )
    checkpoint.save(
        run.engine, run.run_dir, done, world_size=run.world, config_yaml=config_yaml,
        keep_last=run.config.checkpoint.keep_last, groups=run.groups, model=run.model,
        extra=checkpoint.layout_of(run.groups),
    )  # fmt: skip
