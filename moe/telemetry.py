"""Routing telemetry cheap enough to stay on: per layer and expert, accumulated on device.

Shape letters: L MoE layers, E experts.

    telemetry = RoutingTelemetry(num_layers=L, num_experts=E)
    telemetry.update(output.routing)                  # each micro step: tensor adds, no sync
    metrics.update(telemetry.summary(group=None))     # at log time: one sync (+ all-reduce)
    telemetry.reset()

Per layer l (keys ``{split}/moe{l}/...``, split "train" or "eval"):
* ``load_e{j}``: fraction of kept assignments that went to expert j (sums to 1);
* ``imbalance``: max over experts of the kept count divided by its mean (1 = balanced);
* ``drop_rate``: mean fraction of assignments dropped;
* ``capacity_use``: kept assignments / (E x capacity) (per_rank capacity scope; dropless
  layers use their largest expert count as capacity);
* ``entropy``: mean router entropy in nats (log E = uniform).
Counts are summed over the given process group (data-parallel ranks) in ``summary``; the
per-step inputs are the detached ``RoutingStats`` / ``MoEOutput`` fields the model returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

SPLITS = ("train", "eval")


class RoutingTelemetry:
    """Accumulates routing statistics over micro steps; ``summary`` turns them into floats."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        if num_layers < 0 or num_experts < 1:
            raise ValueError(
                f"num_layers ({num_layers}) must be >= 0 and num_experts ({num_experts}) >= 1"
            )
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.reset()

    def reset(self, split: str | None = None) -> None:
        """Forget what was accumulated, for one split or (None) for both."""
        if split is None:
            self._counts: dict[str, torch.Tensor | None] = dict.fromkeys(SPLITS)
            self._scalars: dict[str, torch.Tensor | None] = dict.fromkeys(SPLITS)
        else:
            self._counts[split] = self._scalars[split] = None

    def update(self, routing: Sequence[Any], *, split: str = "train") -> None:
        """Add one forward's per-layer stats (objects with tokens_per_expert [E],
        dropped_fraction, router_entropy and optionally capacity). No host sync."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if len(routing) != self.num_layers:
            raise ValueError(f"got stats of {len(routing)} layers, expected {self.num_layers}")
        if not routing:
            return
        counts = torch.stack([r.tokens_per_expert.detach().to(torch.float64) for r in routing])
        device = counts.device
        capacity = torch.tensor(
            [float(getattr(r, "capacity", 0) or 0) for r in routing], dtype=torch.float64
        ).to(device)
        scalars = torch.stack(
            [
                torch.stack([r.dropped_fraction.detach(), r.router_entropy.detach()])
                .to(torch.float64)
                .to(device)
                for r in routing
            ]
        )
        # columns: drop sum, entropy sum, slots offered, forward count
        scalars = torch.cat(
            [scalars, (capacity * self.num_experts)[:, None], torch.ones_like(capacity)[:, None]],
            dim=1,
        )
        previous_counts, previous_scalars = self._counts[split], self._scalars[split]
        self._counts[split] = counts if previous_counts is None else previous_counts + counts
        self._scalars[split] = scalars if previous_scalars is None else previous_scalars + scalars

    def summary(self, group: Any = None, *, split: str = "train") -> dict[str, float]:
        """Metrics since the last reset, summed over ``group`` when distributed is running.

        Collective when torch.distributed is initialised: every rank of ``group`` calls it.
        """
        counts, scalars = self._counts[split], self._scalars[split]
        if counts is None:
            return {}
        packed = torch.cat([counts, scalars], dim=1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed, group=group)
        counts = packed[:, : self.num_experts]
        drop, entropy, slots, forwards = packed[:, self.num_experts :].unbind(1)
        kept = counts.sum(1)
        load = counts / kept.clamp_min(1)[:, None]
        imbalance = counts.max(1).values / (kept / self.num_experts).clamp_min(1e-12)
        values = {
            "imbalance": imbalance,
            "drop_rate": drop / forwards,
            # NaN when the stats carried no capacity (nothing to compare against)
            "capacity_use": torch.where(slots > 0, kept / slots.clamp_min(1), float("nan")),
            "entropy": entropy / forwards,
        }
        metrics: dict[str, float] = {}
        load_list = load.tolist()
        for layer in range(self.num_layers):
            prefix = f"{split}/moe{layer}"
            for expert, fraction in enumerate(load_list[layer]):
                metrics[f"{prefix}/load_e{expert}"] = fraction
            for name, value in values.items():
                metrics[f"{prefix}/{name}"] = float(value[layer])
        return metrics
