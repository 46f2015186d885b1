"""Stop a run that diverged before it can overwrite good checkpoints with a broken state.

    watch = DivergenceWatch(skip_nonfinite=config.train.skip_nonfinite)
    watch.after_step(step, engine, losses, diagnose=lambda: first_nonfinite_module(...))

A non-finite loss or gradient never reaches the weights: every optimizer the engine runs
skips an update whose gradients are not all finite (DeepSpeed's ZeRO and low-precision
wrappers by themselves, a plain torch optimizer through
``parallel.deepspeed_bridge.guard_nonfinite_steps``), and all ranks agree on the skip. This
module decides what the trainer does about a skipped step: stop at once with one line that
names the step and the first module whose output went non-finite, or, with
``train.skip_nonfinite=N``, go on for up to N such steps. Checkpoints are written only after
a step passed this check, so the newest checkpoint on disk holds finite weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from launch.errors import TrainingDiverged


class DivergenceWatch:
    """Counts non-finite steps and raises ``TrainingDiverged`` past the allowed number."""

    def __init__(self, skip_nonfinite: int = 0) -> None:
        self.allowed = skip_nonfinite
        self.skipped = 0

    def after_step(
        self,
        step: int,
        applied: bool,
        losses: Iterable[float],
        diagnose: Callable[[], str | None],
        log: Any = None,
    ) -> bool:
        """Check global step ``step`` (1-based); returns whether its update was applied.

        ``applied``: the engine's ``was_step_applied()`` (the same on every rank);
        ``losses``: this rank's micro-step losses, used for the message only (ranks see
        different losses, so the decision must not depend on them).
        """
        if applied:
            return True
        self.skipped += 1
        what = describe_nonfinite(losses)
        if self.skipped <= self.allowed:
            if log is not None:
                log.warning(
                    "step %d: %s; update skipped (%d of train.skip_nonfinite=%d)",
                    step, what, self.skipped, self.allowed,
                )  # fmt: skip
            return False
        where = diagnose()
        place = f" (first non-finite output: {where})" if where else ""
        raise TrainingDiverged(
            f"training diverged at step {step}: {what}{place}; stopped before writing a "
            "checkpoint from this state; lower optimizer.lr, or set train.skip_nonfinite=N "
            "to skip up to N such steps"
        )

    def check_logged_loss(self, step: int, loss: float) -> None:
        """The all-reduced loss of a logging window (the same on every rank) must be finite."""
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"training diverged at step {step}: the mean loss since the last log is {loss}; "
                "stopped before writing a checkpoint from this state; lower optimizer.lr"
            )


def describe_nonfinite(losses: Iterable[float]) -> str:
    """``the loss is nan`` when a micro-step loss was, else ``the gradient is not finite``."""
    bad = [v for v in losses if not math.isfinite(v)]
    if bad:
        return f"the loss is {bad[0]}"
    return "the gradient is not finite (the loss was finite)"


def first_nonfinite_module(model: nn.Module, forward: Callable[[], Any]) -> str | None:
    """The name of the first module, in execution order, whose output holds a non-finite value.

    Runs ``forward()`` once more without gradients, with a hook on every named module; the
    innermost module finishes first, so the name points at the layer where the values broke
    (``blocks.1.ffn.experts``), not at the whole model. None when the re-run stays finite.
    """
    found: list[str] = []
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def check(_module: nn.Module, _args: Any, output: Any) -> None:
            if not found and not _all_finite(output):
                found.append(name)

        return check

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _all_finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, (tuple, list)):
        return all(_all_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    output = getattr(value, "output", None)  # MoE layer outputs: the tensor is .output
    return _all_finite(output) if output is not None else True


def parameters_finite(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite (checked before each checkpoint)."""
    params = [p.detach() for p in model.parameters() if p.is_floating_point()]
    if not params:
        return True
    norms = torch._foreach_norm(params)
    return bool(torch.isfinite(torch.stack(norms)).all())
