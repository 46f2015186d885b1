"""The run config: typed sections composed into one root model, loaded strictly from YAML.

    config = load_config("configs/tiny.yaml", overrides=["moe.num_experts=16"])
    validate(config, world_size=2)
    ds_json = deepspeed_config(config, run_dir)

Each section is defined next to what it configures (model and attention in
moe/transformer.py, moe in moe/config.py, data in launch/data.py, checkpoint in
launch/checkpoint.py); the training-loop sections live here. An unknown key fails with its
dotted path and the closest valid name; a wrong type names what was expected and what was
given; cross-cutting checks are in ``validate``. Every user-caused problem is a UserError
(one line naming the field and the fix; the CLI prints it and exits with status 2).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

import attention
from launch.checkpoint import CheckpointConfig
from launch.data import DataConfig
from launch.errors import UserError
from moe.config import MoEConfig
from moe.pipeline import plan_stages
from moe.tensor_parallel import check_tensor_parallel
from moe.transformer import AttentionConfig, ModelConfig, check_attention
from parallel.deepspeed_bridge import check_zero_stage
from parallel.rendezvous import DEFAULT_TIMEOUT_SECONDS

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


class ParallelConfig(BaseModel):
    """Parallel layout: world = dp x tp x pp; experts split ``ep`` ways over the dp x tp
    ranks of a stage (parallel/layout.py)."""

    model_config = ConfigDict(extra="forbid")

    ep: int = Field(default=1, ge=1)
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    pp_partition: Literal["uniform", "parameters"] | list[int] = Field(
        default="uniform",
        description="how blocks are cut into pipeline stages: uniform (equal block counts), "
        "parameters (balanced parameter counts) or a list of block counts per stage",
    )
    micro_batches: int | None = Field(
        default=None,
        ge=1,
        description="pipeline micro-batches per optimizer step (1F1B); the same number as "
        "train.grad_accum, which it sets when given",
    )
    zero_stage: int = Field(default=0, ge=0, le=3)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = Field(
        default=DEFAULT_TIMEOUT_SECONDS,
        gt=0.0,
        le=1e9,  # about 30 years: beyond it the process group's timedelta overflows
        allow_inf_nan=False,
        description="seconds any rank waits for a peer (rendezvous, every collective, the "
        "engine's gradient reduction) before the run ends naming the unresponsive rank",
    )


class OptimizerConfig(BaseModel):
    """AdamW: on CUDA fused (apex FusedAdam when importable, else torch's fused AdamW);
    torch's AdamW on a CPU (parallel/deepspeed_bridge.py ``fused_adam``)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(default=1e-3, gt=0.0, allow_inf_nan=False)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0.0, allow_inf_nan=False)
    weight_decay: float = Field(default=0.1, ge=0.0, allow_inf_nan=False)
    grad_clip: float = Field(
        default=1.0, ge=0.0, allow_inf_nan=False, description="0 disables clipping"
    )

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        # Adam's moment decays: 1 would never forget, >= 1 or < 0 diverges.
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError("both betas must be in [0, 1), e.g. [0.9, 0.95]")
        return betas


class ScheduleConfig(BaseModel):
    """Linear warmup then cosine decay to ``min_lr_ratio`` at train.steps (WarmupCosineLR)."""

    model_config = ConfigDict(extra="forbid")

    warmup_steps: int = Field(default=100, ge=1)
    warmup_start_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)


class TrainConfig(BaseModel):
    """Length, batch and evaluation cadence of a run."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=1000, ge=1)
    seed: int = Field(default=0, ge=0, description="numpy's generators take no negative seed")
    micro_batch: int = Field(default=16, ge=1, description="sequences per rank per micro step")
    grad_accum: int = Field(default=1, ge=1)
    eval_every: int = Field(default=200, ge=0, description="0: only at the end")
    eval_batches: int = Field(default=8, ge=1, description="micro batches per rank per eval")
    log_every: int = Field(default=10, ge=1)
    mlm_probability: float = Field(default=0.15, gt=0.0, lt=1.0)
    stop_at: int | None = Field(
        default=None, ge=1, description="stop (with a checkpoint) after this step; resume later"
    )
    skip_nonfinite: int = Field(
        default=0,
        ge=0,
        description="steps with a non-finite loss or gradient to skip before stopping the run",
    )
    peak_tflops: float | None = Field(
        default=None,
        gt=0.0,
        allow_inf_nan=False,
        description="one GPU's peak dense bf16 TFLOP/s for the MFU the trainer prints; None: "
        "from moe/accounting.py's table of known GPUs",
    )


class LoggingConfig(BaseModel):
    """Where metrics go besides metrics.jsonl in the run directory."""

    model_config = ConfigDict(extra="forbid")

    progress: bool = True
    tensorboard: bool = True
    csv: bool = True


class RunConfig(BaseModel):
    """The root config: one field per section."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    moe: MoEConfig | None = Field(default_factory=lambda: MoEConfig(num_experts=8))
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    precision: Literal["auto", "bf16", "bf16-params", "fp32"] = Field(
        default="auto",
        description="auto: bf16 autocast where the device has native bf16, else fp32 "
        "(launch/precision.py)",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _micro_batches_are_grad_accum(self) -> RunConfig:
        # One number, two names: pipeline users think in micro-batches per step, the loop
        # and DeepSpeed in gradient-accumulation steps.
        wanted = self.parallel.micro_batches
        if wanted is not None and wanted != self.train.grad_accum:
            if self.train.grad_accum != 1:
                raise ValueError(
                    f"parallel.micro_batches ({wanted}) and train.grad_accum "
                    f"({self.train.grad_accum}) name the same number; set only one of them"
                )
            self.train.grad_accum = wanted
        return self


# Loading -----------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML ``path`` (default configs/tiny.yaml), apply ``a.b=c`` overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass an existing YAML file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(
            f"config file {path} is not valid YAML ({problem}{where}); fix its syntax"
        ) from None
    if not isinstance(raw, dict):
        raise UserError(
            f"config file {path} must hold a mapping of sections, got {type(raw).__name__}"
        )
    for item in overrides or []:
        apply_override(raw, item)
    return config_from_dict(raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set dotted key ``a.b=c`` in ``raw``; the value is parsed as YAML (1e-3, true, [1, 2])."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set '{item}' must look like section.key=value, e.g. train.steps=100")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise UserError(
                f"--set {key}: {where} is a value, not a section; set {where}=... instead"
            )
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Validate a plain dict into a RunConfig, turning the first pydantic error into a UserError."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        # A misspelt key also makes its intended field "missing": report the typo first.
        errors = sorted(err.errors(), key=lambda e: e.get("type") != "extra_forbidden")
        raise UserError(describe_error(errors[0])) from None


def describe_error(error: dict[str, Any]) -> str:
    """One line for one pydantic error: dotted path, what was wrong, the fix."""
    loc = [str(p) for p in error.get("loc", ()) if not _is_union_tag(p)]
    path = ".".join(loc)
    kind = error.get("type", "")
    given = error.get("input")
    if kind == "extra_forbidden":
        valid = _valid_names(loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = (
            f"did you mean '{'.'.join(loc[:-1] + close)}'?"
            if close
            else f"valid keys: {', '.join(valid)}"
        )
        return f"unknown config key '{path}'; {hint}"
    if kind == "missing":
        return f"config key '{path}' is required; add it to the config or --set {path}=..."
    msg = error.get("msg", "invalid value")
    if kind == "value_error":  # our own validators' messages already say what is valid
        msg = msg.removeprefix("Value error, ")
    if not path:  # a check across sections: its message names the keys
        return msg
    if isinstance(given, dict):  # a section-level check: the section's contents add nothing
        return f"config key '{path}': {msg}"
    return f"config key '{path}': {msg} (got {type(given).__name__} {given!r}); fix the value"


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (part.endswith("Config") or part.startswith("function-"))


def _valid_names(loc: list[str]) -> list[str]:
    model: Any = RunConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            if part.isdigit() or model is None:
                continue
            return []
        model = _model_of(field.annotation)
    return sorted(getattr(model, "model_fields", {}))


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


# Cross-cutting checks --------------------------------------------------------------------


def validate(config: RunConfig, world_size: int) -> int:
    """Check what spans sections against the world size; returns the data-parallel degree."""
    par = config.parallel
    if world_size % (par.tp * par.pp) != 0:
        raise UserError(
            f"world size {world_size} must be divisible by parallel.tp ({par.tp}) x parallel.pp "
            f"({par.pp}); launch a multiple of {par.tp * par.pp} processes or change the degrees"
        )
    dp = world_size // (par.tp * par.pp)
    if config.moe is not None:
        _check_moe(config.moe, tokens_per_micro_batch(config))
        if config.moe.num_experts % par.ep != 0:
            raise UserError(
                f"moe.num_experts ({config.moe.num_experts}) must be divisible by parallel.ep "
                f"({par.ep}); change one of them"
            )
        if (dp * par.tp) % par.ep != 0:
            raise UserError(
                f"parallel.ep ({par.ep}) must divide dp x tp ({dp} x {par.tp} = {dp * par.tp}, the "
                f"ranks experts fold over with world {world_size}); change parallel.ep or the "
                "process count"
            )
        if config.moe.simulate_ep != 1 and par.ep != 1:
            raise UserError(
                f"moe.simulate_ep ({config.moe.simulate_ep}) simulates expert parallelism in one "
                f"process and cannot be combined with parallel.ep ({par.ep}); set one of them to 1"
            )
        if config.moe.capacity_scope == "global" and config.moe.router == "expert_choice":
            raise UserError(
                "moe.capacity_scope global applies to token-choice routing; with moe.router "
                "expert_choice set moe.capacity_scope per_rank"
            )
    elif par.ep != 1:
        raise UserError(
            f"parallel.ep ({par.ep}) needs experts; set moe.num_experts or parallel.ep=1"
        )
    if par.tp > 1:
        try:
            check_tensor_parallel(config.model, config.moe, config.attention, par.tp)
        except ValueError as err:
            raise UserError(str(err)) from None
        tokens = tokens_per_micro_batch(config)
        if config.moe is not None and tokens % par.tp != 0:
            raise UserError(
                f"train.micro_batch x data.seq_len ({tokens} tokens) must be divisible by "
                f"parallel.tp ({par.tp}): each TP rank routes 1/tp of them; change one of them"
            )
    if par.pp > 1:
        try:  # the cut, and every refusal of the pipeline engine, before any process starts
            plan_stages(
                config.model, config.moe, config.attention, pp=par.pp,
                partition=par.pp_partition, zero_stage=par.zero_stage,
                vocab_size=config.model.vocab_size or 256,  # the byte tokenizer's, until known
            )  # fmt: skip
        except ValueError as err:
            raise UserError(str(err)) from None
    try:
        check_zero_stage(par.zero_stage, config.moe is not None)
        check_attention(config.model, config.attention)
    except ValueError as err:
        raise UserError(str(err)) from None
    images = config.model.input == "patches"  # launch/images.py: no text, labels from folders
    if images and config.model.mode != "classify":
        raise UserError(
            f"model.input patches trains image classification; set model.mode classify "
            f"(got {config.model.mode})"
        )
    if not images and config.data.seq_len > config.model.max_seq_len:
        raise UserError(
            f"data.seq_len ({config.data.seq_len}) exceeds model.max_seq_len "
            f"({config.model.max_seq_len}); raise model.max_seq_len or lower data.seq_len"
        )
    if config.model.mode == "classify" and config.data.label_field is None and not images:
        raise UserError("model.mode classify needs data.label_field (the integer label column)")
    if images and config.data.label_field is not None:
        raise UserError(
            "data.label_field is not used with model.input patches (labels are the class "
            "folders, or the digits' own); remove it"
        )
    if config.model.mode != "classify" and config.data.label_field is not None:
        raise UserError(
            f"data.label_field is only used with model.mode classify (got {config.model.mode})"
        )
    _check_lengths(config)
    return dp


def tokens_per_micro_batch(config: RunConfig) -> int:
    """Tokens one rank routes per micro step: sequences x their length (patches for images)."""
    image = config.model.image
    if config.model.input == "patches" and image is not None:
        length = image.num_patches() + (config.model.pooling == "cls")
    else:
        length = config.data.seq_len
    return config.train.micro_batch * length


def _check_moe(moe: MoEConfig, tokens: int) -> None:
    """What the MoE layer would refuse when the model is built, or could only pad, said with
    its config keys. ``tokens``: what one rank routes per micro step."""
    if moe.top_k > moe.num_experts:
        raise UserError(
            f"moe.top_k ({moe.top_k}) must be at most moe.num_experts ({moe.num_experts}); "
            "lower moe.top_k or add experts"
        )
    # At a factor of num_experts every expert can take every token; more only pads buffers.
    for name in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(moe, name)
        if value is not None and value > moe.num_experts:
            raise UserError(
                f"moe.{name} ({value}) is above moe.num_experts ({moe.num_experts}), where "
                f"every expert already fits every token; use at most {moe.num_experts} (0 or "
                "null: dropless)"
            )
    if moe.min_capacity > tokens * moe.top_k:
        raise UserError(
            f"moe.min_capacity ({moe.min_capacity}) is more than the {tokens * moe.top_k} token "
            f"choices of a micro batch (train.micro_batch x sequence length x moe.top_k); use "
            f"at most {tokens * moe.top_k}"
        )
    if moe.simulate_ep > tokens:
        raise UserError(
            f"moe.simulate_ep ({moe.simulate_ep}) is more than the {tokens} tokens of a micro "
            f"batch (train.micro_batch x sequence length), so virtual ranks would route "
            f"nothing; use at most {tokens}"
        )
    if moe.router == "expert_choice":
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(moe, name)
            if value is None or value == 0:
                raise UserError(
                    f"moe.{name} ({value}) must be > 0 with moe.router expert_choice (experts "
                    f"pick a fixed number of tokens; there is no dropless mode); set e.g. "
                    f"moe.{name}=1.25"
                )


def _check_lengths(config: RunConfig) -> None:
    """Tokenizer and attention limits that only show once data flows through the model."""
    model, data = config.model, config.data
    if model.input != "tokens":
        return
    if data.tokenizer == "byte" and model.vocab_size is not None and model.vocab_size < 260:
        raise UserError(
            f"model.vocab_size ({model.vocab_size}) is smaller than the byte tokenizer's (260: "
            "bytes and 4 special tokens); raise it or leave it unset"
        )
    for index in range(model.num_layers):
        choice = config.attention.for_layer(index)
        length = attention.get(choice.name).length_option
        value = choice.options.get(length) if length is not None else None
        if value is not None and isinstance(value, int) and value < data.seq_len:
            overridden = str(index) in config.attention.layers
            where = f"attention.layers.{index}" if overridden else "attention"
            raise UserError(
                f"{where}.options.{length} ({value}) is shorter than data.seq_len "
                f"({data.seq_len}); raise it or leave it unset (then it is model.max_seq_len)"
            )


# Outputs -----------------------------------------------------------------------------------


def save_resolved(config: RunConfig, path: Path) -> None:
    """Write the fully resolved config (every default filled in) as YAML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def deepspeed_config(
    config: RunConfig,
    run_dir: Path,
    user_json: str | Path | None = None,
    *,
    precision: str | None = None,
) -> dict[str, Any]:
    """The DeepSpeed JSON derived from ``config``; keys of ``user_json`` override (deep merge).

    ``precision``: the resolved precision (``launch.precision.resolve_precision``); by
    default ``config.precision``, with ``auto`` resolved for this process's device.
    """
    if precision is None:
        from launch.precision import resolve_precision

        precision = resolve_precision(config.precision).name
    train, opt, sched = config.train, config.optimizer, config.schedule
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": opt.grad_clip,
        "steps_per_print": 10**9,  # the trainer prints; keep the engine quiet
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": config.parallel.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": list(opt.betas),
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                "torch_adam": True,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": train.steps,
                "warmup_num_steps": sched.warmup_steps,
                "warmup_min_ratio": sched.warmup_start_ratio,
                "cos_min_ratio": sched.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
    }
    if precision == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "bf16-params":
        ds["bf16"] = {"enabled": True}
    monitor_dir = str(run_dir / "monitor")
    if config.logging.tensorboard:
        ds["tensorboard"] = {"enabled": True, "output_path": monitor_dir, "job_name": "tensorboard"}
    if config.logging.csv:
        ds["csv_monitor"] = {"enabled": True, "output_path": monitor_dir, "job_name": "csv"}
    if user_json is not None:
        path = Path(user_json)
        if not path.is_file():
            raise UserError(f"--deepspeed-config {path} does not exist; pass an existing JSON file")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"--deepspeed-config {path} is not valid JSON: {err}") from None
        ds = _deep_merge(ds, user)
    return ds


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# Fields a resume may change: a run saved at one layout (ep, tp, and so the world size)
# continues at another from the layout-free weights and Adam state (launch/checkpoint.py,
# parallel/expert_checkpoint.py). parallel.timeout_s only bounds waits: a restart may change it
# freely. train.micro_batch and train.grad_accum may change with the layout as long as the
# global batch stays the same (the trainer checks that product, which needs the world size).
RESUMABLE_CHANGES = (
    "parallel.ep",
    "parallel.tp",
    "parallel.pp",
    "parallel.pp_partition",
    "parallel.micro_batches",
    "parallel.timeout_s",
)


def incompatible_fields(saved: dict[str, Any], current: RunConfig) -> list[str]:
    """Dotted fields whose change breaks resuming (shapes, data order, layout, precision).

    ``RESUMABLE_CHANGES`` (the layout's degrees, the pipeline cut and micro-batches, the
    timeout) are not reported; parallel.zero_stage still is. The micro batch and accumulation are the trainer's to
    compare, as one global batch.
    """
    now = current.model_dump(mode="json")
    fixed = ("model", "moe", "attention", "data", "parallel", "precision")
    changed: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if prefix in RESUMABLE_CHANGES:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            changed.append(f"{prefix} ({a!r} -> {b!r})")

    for section in fixed:
        walk(saved.get(section), now.get(section), section)
    for key in ("seed",):
        walk(saved.get("train", {}).get(key), now["train"][key], f"train.{key}")
    return changed
