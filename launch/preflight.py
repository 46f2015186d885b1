"""Checks that run before any data is loaded and before DeepSpeed starts.

    dp = preflight(config, run_dir, world_size=2, local_world_size=2, deepspeed_json=None)

Everything a config can get wrong that is knowable without a process group is found here,
so that a bad value costs seconds and prints one line (a ``UserError``) instead of a
traceback after the data load: a model too large for this host (first from a constant-time
lower bound, later counted on the model), the cross-section checks
(``launch.config.validate``), the run directory (a file, under a file, not writable), the
process-group backend, the DeepSpeed JSON a user passes, the data source
(``launch.data.check_source``: a missing path, binary or non-UTF-8 text, a hub name that is
neither cached nor reachable; a micro batch larger than the data could ever fill) and the
model itself (built on the meta device, so every constructor check runs without allocating
a byte). Options that would silently do nothing get one warning line each.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from launch.config import RunConfig, deepspeed_config, validate
from launch.data import ByteTokenizer, check_batch_fits, check_source
from launch.errors import UserError
from launch.images import check_image_source
from moe.transformer import Transformer, count_parameters, is_moe_block

# Bytes of training state per parameter: fp32 weight (4), its gradient (4) and Adam's two
# moments (8). Classic bf16 stores a 2-byte weight and gradient plus a 4-byte fp32 master.
STATE_BYTES = {"weight": 4, "grad": 4, "adam": 8}
BF16_PARAMS_STATE_BYTES = {"weight": 2 + 4, "grad": 2, "adam": 8}


def preflight(
    config: RunConfig,
    run_dir: Path,
    *,
    world_size: int,
    local_world_size: int = 1,
    deepspeed_json: str | Path | None = None,
    log: logging.Logger | None = None,
) -> int:
    """Run every static check in the order a user would fix them; returns the dp degree."""
    # An absurd size first: the checks below walk every layer, and would take that long.
    check_memory(config, None, dp=1, local_world_size=local_world_size)
    dp = validate(config, world_size)
    check_run_dir(Path(run_dir))
    check_backend(config.parallel.backend)
    deepspeed_config(config, Path(run_dir), deepspeed_json)  # a bad --deepspeed-config JSON
    if config.model.input == "patches":
        check_image_source(config.data.path)
    else:
        check_source(config.data)
        check_batch_fits(config.data, config.model.mode, config.train.micro_batch, dp)
    model = build_on_meta(config)
    check_memory(config, model, dp=dp, local_world_size=local_world_size)
    if log is not None:
        for line in inert_option_warnings(config, model):
            log.warning(line)
    return dp


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory that is a file, sits under a file, or cannot be written."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file, not a directory; pass a directory path")
    existing = run_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != run_dir and not existing.is_dir():
        raise UserError(
            f"--run-dir {run_dir}: {existing} is a file, so no directory can be made under it; "
            "pass a path under a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is" if existing == run_dir else f"would be created in {existing}, which is"
        raise UserError(
            f"--run-dir {run_dir} {what} not writable; pass a directory you can write to"
        )


def check_backend(backend: str) -> None:
    """NCCL needs CUDA devices; say so before the process group is created."""
    if backend == "nccl" and not torch.cuda.is_available():
        raise UserError(
            "parallel.backend nccl needs CUDA GPUs and this machine has none; set "
            "parallel.backend auto or gloo"
        )


def build_on_meta(config: RunConfig) -> nn.Module | None:
    """The model built on the meta device (no memory), so that every check its layers make
    runs now. Returns None when a layer cannot be built on meta (its checks then run at the
    real build); raises UserError for a value a layer refuses."""
    vocab = None
    if config.model.input == "tokens" and config.model.vocab_size is None:
        # Upper bound before the data is read: a BPE has at most its configured size.
        tokenizer = config.data.tokenizer
        vocab = ByteTokenizer().vocab_size if tokenizer == "byte" else config.data.bpe_vocab_size
    try:
        with torch.device("meta"):
            return Transformer(config.model, config.moe, config.attention, vocab_size=vocab)
    except ValueError as err:
        raise UserError(f"the model cannot be built from this config: {err}") from None
    except (RuntimeError, NotImplementedError):  # an operation meta tensors do not support
        return None


def parameter_lower_bound(config: RunConfig) -> int:
    """At least this many parameters, found in constant time before anything is built: each
    block maps d_model to d_model at least once (attention's projections, or the unit that
    replaces attention and FFN), and token inputs have an embedding of at least bytes."""
    width = config.model.d_model
    count = config.model.num_layers * width * width
    if config.model.input == "tokens":
        count += (config.model.vocab_size or ByteTokenizer().vocab_size) * width
    return count


def training_bytes(config: RunConfig, dense: float, expert: float, *, dp: int) -> int:
    """Bytes one rank holds for weights, gradients and Adam state (activations excluded).

    Expert parameters are split over ``parallel.ep`` ranks, the others (about: embedding,
    norms and head stay whole) over ``parallel.tp``; ZeRO 1 partitions Adam's state and
    ZeRO 2 also the gradients over the data-parallel ranks.
    """
    count = dense / config.parallel.tp + expert / config.parallel.ep
    per = BF16_PARAMS_STATE_BYTES if config.precision == "bf16-params" else STATE_BYTES
    zero = config.parallel.zero_stage
    adam = per["adam"] / (dp if zero >= 1 else 1)
    grad = per["grad"] / (dp if zero >= 2 else 1)
    return int(count * (per["weight"] + grad + adam))


def available_memory() -> int | None:
    """Bytes of host memory available now (psutil), or None when it cannot be read."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def check_memory(
    config: RunConfig, model: nn.Module | None, *, dp: int, local_world_size: int
) -> None:
    """Refuse a model whose training state alone exceeds this host's available memory:
    counted on ``model`` (built on meta), or without it from ``parameter_lower_bound``.

    Only on CPU, where parameters live in host memory; on GPUs the engine reports its own
    out-of-memory error with the device's numbers.
    """
    if torch.cuda.is_available():
        return
    available = available_memory()
    if available is None:
        return
    if model is None:
        dense, expert, about = parameter_lower_bound(config), 0, "at least"
    else:
        counts, about = count_parameters(model), "about"
        dense, expert = counts["total"] - counts["expert"], counts["expert"]
    per_rank = training_bytes(config, dense, expert, dp=dp)
    needed = per_rank * local_world_size
    if needed > available:
        params = dense + expert
        count = f"{params / 1e9:,.1f}B" if params >= 1e9 else f"{params / 1e6:,.1f}M"
        ranks = f" x {local_world_size} processes" if local_world_size > 1 else ""
        raise UserError(
            f"the model ({about} {count} parameters: model.d_model {config.model.d_model}, "
            f"model.num_layers {config.model.num_layers}, model.d_ff {config.model.d_ff}) needs "
            f"{about} {per_rank / 2**30:,.1f} GiB{ranks} for weights, gradients and Adam "
            f"state; this host has {available / 2**30:,.1f} GiB available; make the model "
            "smaller or spread it over more hosts (parallel.tp, parallel.ep, parallel.zero_stage)"
        )


def inert_option_warnings(config: RunConfig, model: nn.Module | None) -> list[str]:
    """One line per option that has no effect with the rest of the config."""
    lines = []
    moe, layers = config.moe, config.model.num_layers
    if moe is not None and not any(is_moe_block(i, moe) for i in range(layers)):
        lines.append(
            f"moe.every ({moe.every}) is larger than model.num_layers ({layers}): no block gets "
            f"an MoE FFN and the model trains dense; set moe.every <= {layers} or moe: null"
        )
    elif moe is not None and model is not None:
        blocks = list(model.layers[1:-1])
        if all(blocks[i].ffn is None for i in range(layers) if is_moe_block(i, moe)):
            lines.append(
                "every block that moe.every gives an MoE FFN uses an attention method that "
                "replaces the FFN: the model has no experts; change moe.every or attention"
            )
    train = config.train
    if train.stop_at is not None and train.stop_at >= train.steps:
        lines.append(
            f"train.stop_at ({train.stop_at}) is not before train.steps ({train.steps}): the "
            f"run ends at step {train.steps} anyway; lower train.stop_at or remove it"
        )
    return lines
