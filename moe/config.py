"""Typed configuration of the MoE layer (the `moe:` section of a run config)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class MoEConfig(BaseModel):
    """Everything an MoELayer and the model's MoE placement need; validated on load."""

    model_config = ConfigDict(extra="forbid")

    num_experts: int = Field(ge=1)
    top_k: int = Field(default=1, ge=1)
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = 2.0
    min_capacity: int = Field(default=4, ge=0)
    priority: Literal["sequence", "probability"] = "sequence"
    router: Literal["token_choice", "expert_choice"] = "token_choice"
    jitter_eps: float = Field(default=0.0, ge=0.0, lt=1.0)
    activation: Literal["relu", "gelu", "swiglu"] = "relu"
    expert_layout: Literal["auto", "grouped", "buffer"] = Field(
        default="auto",
        description="grouped: experts run on kept rows only; buffer: one bmm on [E, C, d]; "
        "auto: buffer for bf16/fp16 on CPU, else grouped (MoELayer.resolve_layout)",
    )
    shared_expert: bool = False
    every: int = Field(default=2, ge=1, description="an MoE FFN every `every` blocks")
    aux_loss_coef: float = Field(default=1e-2, ge=0.0, allow_inf_nan=False)
    z_loss_coef: float = Field(default=1e-3, ge=0.0, allow_inf_nan=False)
    capacity_scope: Literal["per_rank", "global"] = Field(
        default="per_rank",
        description="capacity from each rank's tokens, or over the EP group (layout-independent drops)",
    )
    simulate_ep: int = Field(
        default=1, ge=1, description="reproduce this many expert-parallel ranks in one process"
    )

    @field_validator("capacity_factor", "eval_capacity_factor")
    @classmethod
    def _check_capacity_factor(cls, value: float | None) -> float | None:
        # The router takes 0 or None as dropless; a negative or infinite factor has no meaning.
        if value is not None and (not math.isfinite(value) or value < 0):
            raise ValueError("must be a finite number >= 0 (0 or null = dropless), e.g. 1.25")
        return value

    def layer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``MoELayer(d_model, d_ff, **kwargs)``."""
        return self.model_dump(exclude={"every", "aux_loss_coef", "z_loss_coef"})
