"""MoELayer: router -> dispatcher -> experts -> combine. This file only composes.

Shape letters: B batch, S sequence, T = B * S tokens, d model width, E experts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from moe.dispatch import LocalDispatcher
from moe.ep_dispatch import AllToAllDispatcher, check_capacity_scope
from moe.experts import ACTIVATIONS, DenseFFN, GroupedExperts
from moe.losses import router_entropy
from moe.router import (
    PRIORITIES,
    ExpertChoiceRouter,
    TopKRouter,
    check_capacity_factor,
    is_dropless,
)
from moe.simulate import SimulatedDispatcher

ROUTERS = ("token_choice", "expert_choice")
EXPERT_LAYOUTS = ("auto", "grouped", "buffer")


class MoEOutput(NamedTuple):
    """What an MoELayer returns; aux losses are named, never positional extras."""

    output: torch.Tensor  # same shape and dtype as the input
    aux_loss: torch.Tensor  # 0-dim fp32, Switch load-balancing loss
    z_loss: torch.Tensor  # 0-dim fp32, router z-loss
    tokens_per_expert: torch.Tensor  # [E] int64, kept
    dropped_fraction: torch.Tensor  # 0-dim fp32
    router_entropy: torch.Tensor  # 0-dim fp32, mean router entropy (nats), no gradient
    # slots per expert this call used (per rank; simulated or tensor-parallel: summed over the
    # (virtual) ranks that routed the batch)
    capacity: int = 0


class MoELayer(nn.Module):
    """A Switch / GShard Mixture-of-Experts feed-forward layer.

    Args:
        d_model: model width d.
        d_ff: hidden width of each expert.
        num_experts: E.
        top_k: experts per token (token choice).
        capacity_factor: training capacity factor; None or 0 = dropless.
        eval_capacity_factor: the same in eval mode.
        min_capacity: lower bound on slots per expert.
        priority: "sequence" (earlier tokens win) or "probability" (higher gate wins).
        router: "token_choice" or "expert_choice".
        jitter_eps: multiplicative jitter U(1-eps, 1+eps) on the router input in training.
        activation: "relu", "gelu" or "swiglu".
        shared_expert: also apply a dense FFN to every token and add it.
        expert_layout: "grouped" (kept rows only, no padding), "buffer" (experts run on the
            padded [E, C, d] buffer with one bmm) or "auto" (default; see ``resolve_layout``).
        capacity_scope: "per_rank" (capacity from each rank's own tokens; default) or
            "global" (decided over all tokens of the EP group; drops independent of layout).
        simulate_ep: > 1 reproduces that many expert-parallel ranks in this one process
            (``moe/simulate.py``).
        ep_group: an EP process group: this rank then holds E / ep experts (global ids from
            ``ep_rank * E / ep``) and exchanges tokens with ``AllToAllDispatcher``.
        equal_tokens: with ``ep_group``, every rank routes the same number of tokens, so
            per-rank capacities need no exchange. Under EP the "buffer" layout exchanges fixed
            [E, C, d] capacity buffers, "grouped" exchanges kept rows after their counts.

    Tensor parallelism (``moe.tensor_parallel.apply_tensor_parallel`` sets ``token_split``):
    each TP rank routes its 1/tp of the token rows and the rows are gathered back; losses
    and counts are those of all the TP group's tokens (``TokenSplit.totals``).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        *,
        top_k: int = 1,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = 2.0,
        min_capacity: int = 4,
        priority: str = "sequence",
        router: str = "token_choice",
        jitter_eps: float = 0.0,
        activation: str = "relu",
        shared_expert: bool = False,
        expert_layout: str = "auto",
        capacity_scope: str = "per_rank",
        simulate_ep: int = 1,
        ep_group: Any = None,
        equal_tokens: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k ({top_k}) must be between 1 and num_experts ({num_experts})")
        check_capacity_factor("capacity_factor", capacity_factor)
        check_capacity_factor("eval_capacity_factor", eval_capacity_factor)
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if expert_layout not in EXPERT_LAYOUTS:
            raise ValueError(
                f"expert_layout must be one of {EXPERT_LAYOUTS}, got {expert_layout!r}"
            )
        self.d_model = d_model
        self.num_experts = num_experts
        self.expert_layout = expert_layout
        common = dict(
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity,
            jitter_eps=jitter_eps,
        )
        if router == "token_choice":
            self.router = TopKRouter(d_model, num_experts, top_k=top_k, priority=priority, **common)
        else:
            self.router = ExpertChoiceRouter(d_model, num_experts, **common)
        check_capacity_scope(capacity_scope)
        if ep_group is not None and simulate_ep != 1:
            raise ValueError(f"simulate_ep ({simulate_ep}) must be 1 when an ep_group is given")
        self.capacity_scope = capacity_scope
        self.dispatcher: LocalDispatcher
        if ep_group is not None:
            self.dispatcher = AllToAllDispatcher(
                ep_group,
                num_experts,
                capacity_scope=capacity_scope,
                fixed_buffers=expert_layout == "buffer",
                equal_tokens=equal_tokens,
            )
        elif simulate_ep != 1:
            self.dispatcher = SimulatedDispatcher(simulate_ep, capacity_scope=capacity_scope)
        else:
            self.dispatcher = LocalDispatcher()
        num_local = getattr(self.dispatcher, "num_local_experts", num_experts)
        self.experts = GroupedExperts(num_local, d_model, d_ff, activation)
        self.expert_offset = getattr(self.dispatcher, "expert_offset", 0)
        self.shared_expert = DenseFFN(d_model, d_ff, activation) if shared_expert else None
        # A moe.tensor_parallel.TokenSplit under tensor parallelism, else None.
        self.token_split: Any = None

    def resolve_layout(self, tokens: torch.Tensor) -> str:
        """The expert layout this call uses: ``expert_layout`` unless it is "auto".

        "auto" picks "buffer" for bf16/fp16 experts on CPU with a capacity factor: there one
        batched matmul over [E, C, d] beats E small matmuls despite the padding (oneDNN's
        bf16 kernel repacks each weight per call; docs/bench_moe.md). Otherwise "grouped":
        fp32 on CPU, accelerators (one grouped kernel, no padding), dropless routing (the
        buffer would pad to the largest expert), and expert-parallel or simulated dispatch
        (rows travel without padding).
        """
        if self.expert_layout != "auto":
            return self.expert_layout
        if type(self.dispatcher) is not LocalDispatcher or tokens.device.type != "cpu":
            return "grouped"
        if is_dropless(self.router.active_capacity_factor()):
            return "grouped"
        dtype = (
            torch.get_autocast_dtype("cpu")
            if torch.is_autocast_enabled("cpu")
            else self.experts.w1.dtype
        )
        return "buffer" if dtype in (torch.bfloat16, torch.float16) else "grouped"

    def forward(self, x: torch.Tensor) -> MoEOutput:
        """x [B, S, d] or [T, d] -> MoEOutput with output of the same shape."""
        if x.dim() < 2 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"input's last dim must be d_model ({self.d_model}), got shape {tuple(x.shape)}"
            )
        tokens = x.reshape(-1, self.d_model)
        split = self.token_split
        # Under TP this rank routes only its rows; the shared expert still sees every token.
        rows = tokens if split is None else split.scatter(tokens)
        dispatcher = self.dispatcher
        routing = dispatcher.route(self.router, rows)
        plan = dispatcher.plan(routing)
        # permute (local) -> exchange (communication, identity in one process) -> experts ->
        # exchange back -> unpermute (local), as named in moe/dispatch.py.
        if self.resolve_layout(rows) == "grouped":
            moved = dispatcher.exchange(dispatcher.permute(rows, plan), plan)
            moved = self.experts(moved, dispatcher.expert_group_sizes(plan))
            y = dispatcher.unpermute(dispatcher.exchange_back(moved, plan), plan)
        else:
            buffer = dispatcher.exchange_buffer(dispatcher.permute_to_buffer(rows, plan), plan)
            buffer = self.experts.forward_buffer(buffer)
            y = dispatcher.unpermute_from_buffer(
                dispatcher.exchange_buffer_back(buffer, plan), plan
            )
        if split is not None:
            y = split.gather(y)
        if self.shared_expert is not None:
            y = y + self.shared_expert(tokens)
        if split is not None:
            totals = split.totals(
                routing, dropless=is_dropless(self.router.active_capacity_factor())
            )
            aux_loss, z_loss = totals.aux_loss, totals.z_loss
            tokens_per_expert, dropped = totals.tokens_per_expert, totals.dropped_fraction
            entropy, capacity = totals.router_entropy, totals.capacity
        else:
            aux_loss, z_loss = routing.aux_loss, routing.z_loss
            tokens_per_expert, dropped = routing.tokens_per_expert, routing.drop_rate
            capacity = routing.capacity
            with torch.no_grad():
                entropy = router_entropy(routing.probs)
        return MoEOutput(
            output=y.view(x.shape),
            aux_loss=aux_loss,
            z_loss=z_loss,
            tokens_per_expert=tokens_per_expert,
            dropped_fraction=dropped,
            router_entropy=entropy,
            capacity=capacity,
        )
