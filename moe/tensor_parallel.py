"""Tensor parallelism for the MoE transformer's feed-forward layers, applied after the build.

Shape letters: B batch, S sequence, T = B * S tokens, d model width, F FFN hidden width,
E experts, tp the TP group size, r this rank's place in it.

    model = Transformer(...)                        # every rank builds the full model, same seed
    check_tensor_parallel(model_cfg, moe_cfg, attention_cfg, tp)      # before any collective
    apply_tensor_parallel(model, groups.tp_group, timeout=timeout)    # then shard_experts (EP)

What is split (Megatron-LM): attention heads (``parallelize`` of each attention module) and
the dense FFN width: fc1 column-parallel, fc2 row-parallel, so a block's FFN costs one
all-reduce forward and one backward. For swiglu, fc1 holds gate and up stacked [2F, d]; the
two are cut separately so rank r holds gate columns r and the matching up columns r: the
full weight is reordered to [gate_0, up_0, gate_1, up_1, ...] before slicing, and the shards
carry ``partition_stride`` 2 (Megatron's convention for such strided shards: the rank's rows
are blocks r and r + tp of the full [2F, d] cut into 2 * tp blocks).

MoE layers are not split by width (expert TP = 1; the layout folds experts into EP over the
dp x tp ranks). Instead each TP rank routes 1/tp of the token rows:

    x [B, S, d] replicated -> tokens [T, d] -> rows [r T/tp, (r+1) T/tp)   (backward: all-gather)
      -> route -> dispatch (local or EP all-to-all) -> experts -> combine
      -> all-gather rows -> [B, S, d] replicated                            (backward: own rows)

The router weight stays replicated and fp32; it enters the logits through ``copy_to_region``
so its gradient is summed over TP. The load-balancing statistics (first-choice counts f_e
and mean probabilities P_e), the z-loss and the reported counts are summed over the TP
group, so aux and z losses are those of all T tokens: identical on every TP rank and equal
to tp=1. Capacity stays per TP shard, as in Megatron: each rank routes T/tp tokens with
capacity ceil(cf * (T/tp) * k / E), so with a capacity factor that drops tokens the drops can
differ from tp=1 (dropless routing, or a factor that drops nothing, gives tp=1's numbers).
Router jitter draws on each TP rank for its own rows.

Embedding, norms, head and router stay replicated.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, NamedTuple

import torch
from torch import nn

from moe.blocks import TransformerBlock
from moe.experts import DenseFFN
from moe.layer import MoELayer
from moe.losses import balance_from_fractions, router_entropy
from moe.router import ExpertChoiceRouter, Routing
from moe.simulate import SimulatedDispatcher
from parallel.collectives import COLLECTIVE_TIMEOUT, all_reduce_sum
from parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    gather_from_region,
    group_size_and_rank,
    reduce_from_region,
    scatter_to_region,
)


def check_tensor_parallel(model: Any, moe: Any, attention_config: Any, tp: int) -> None:
    """One-line ValueError for a model the TP degree ``tp`` cannot split (arithmetic only).

    ``model``: ``moe.transformer.ModelConfig``; ``moe``: ``MoEConfig`` or None;
    ``attention_config``: ``AttentionConfig`` (its methods' own TP support is checked by
    ``attention.check_tensor_parallel`` when that exists).
    """
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"parallel.tp must be a positive integer, got {tp!r}")
    if tp == 1:
        return
    import attention

    check_heads = getattr(attention, "check_tensor_parallel", None)
    names = {attention_config.for_layer(i).name for i in range(model.num_layers)}
    if check_heads is not None:
        for name in sorted(names):
            check_heads(name, model.num_heads, tp)
    elif model.num_heads % tp != 0:
        raise ValueError(
            f"model.num_heads ({model.num_heads}) must be divisible by parallel.tp ({tp})"
        )
    splits_ffn = moe is None or moe.every > 1 or moe.shared_expert
    if splits_ffn and model.d_ff % tp != 0:
        raise ValueError(f"model.d_ff ({model.d_ff}) must be divisible by parallel.tp ({tp})")
    if moe is None:
        return
    if moe.router == "expert_choice":
        raise ValueError(
            f"moe.router 'expert_choice' cannot run under parallel.tp ({tp}): each expert "
            "chooses its tokens over the whole batch, but each TP rank routes 1/tp of the "
            "rows; use router token_choice or parallel.tp 1"
        )
    if moe.simulate_ep != 1:
        raise ValueError(
            f"moe.simulate_ep ({moe.simulate_ep}) must be 1 under parallel.tp ({tp}); "
            "simulate on one process only"
        )


# ---- token rows over the TP group -------------------------------------------------------


def check_token_rows(num_rows: int, tp: int) -> None:
    """One-line ValueError unless the ``num_rows`` tokens split evenly over ``tp`` ranks."""
    if num_rows % tp != 0:
        raise ValueError(
            f"an MoE layer under tensor parallelism splits its {num_rows} tokens (batch x "
            f"sequence) over parallel.tp ({tp}) ranks; make batch x sequence divisible by {tp}"
        )


class RoutingTotals(NamedTuple):
    """An MoE layer's losses and statistics over all tokens of its TP group."""

    aux_loss: torch.Tensor  # 0-dim fp32, Switch eq. 4 over the T tokens
    z_loss: torch.Tensor  # 0-dim fp32, mean of logsumexp^2 over the T tokens
    tokens_per_expert: torch.Tensor  # [E] int64 kept assignments
    dropped_fraction: torch.Tensor  # 0-dim fp32, of the T * k assignments
    router_entropy: torch.Tensor  # 0-dim fp32, mean over the T tokens, no gradient
    capacity: int  # slots per expert summed over the TP ranks (each routed T / tp rows)


class TokenSplit:
    """What an MoELayer does differently under TP: split rows, gather rows, total statistics.

    Set on ``MoELayer.token_split`` by ``apply_tensor_parallel``; holds no per-call state.
    """

    def __init__(self, group: Any, timeout: timedelta = COLLECTIVE_TIMEOUT) -> None:
        self.group, self.timeout = group, timeout
        self.tp, self.rank = group_size_and_rank(group)

    def scatter(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T, d] replicated -> this rank's [T / tp, d] (backward: all-gather)."""
        check_token_rows(tokens.shape[0], self.tp)
        return scatter_to_region(tokens, self.group, self.timeout, dim=0)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """[T / tp, d] -> [T, d] replicated (backward: keep own rows)."""
        return gather_from_region(rows, self.group, self.timeout, dim=0)

    def totals(self, routing: Routing, *, dropless: bool) -> RoutingTotals:
        """Losses and counts of the whole TP group from this rank's ``routing`` of T / tp rows.

        Two all-reduces: the gradient-carrying sums (P_e numerators and the z-loss sum; backward
        identity, so each rank's own rows get their share of the gradient) and the counts.
        The capacity is summed over the TP ranks, as the simulated dispatcher sums it over its
        virtual ranks, so kept / (capacity * E) is the TP group's use of its slots. With a
        capacity factor every TP rank has the same T / tp rows and so the same capacity (no
        host read); ``dropless`` capacities are each rank's fullest expert and are summed.
        """
        num_local, top_k = routing.slot.shape
        num_experts = routing.num_experts
        num_tokens = num_local * self.tp
        probs = routing.probs.float()
        # route() returns z = mean over own rows, so z * rows is the exact local sum.
        sums = torch.cat([probs.sum(dim=0), (routing.z_loss.float() * num_local).view(1)])
        sums = reduce_from_region(sums, self.group, self.timeout)
        with torch.no_grad():
            counts = torch.cat(
                [
                    torch.bincount(routing.expert_index[:, 0], minlength=num_experts),
                    routing.tokens_per_expert.to(torch.long),
                    (routing.slot < 0).sum().view(1),
                    torch.tensor([routing.capacity], device=routing.slot.device),
                ]
            ).to(torch.float64)
            entropy = (router_entropy(probs) * num_local).to(torch.float64).view(1)
            counts = all_reduce_sum(torch.cat([counts, entropy]), self.group, self.timeout)
        fraction = (counts[:num_experts] / num_tokens).to(probs.dtype)
        aux = balance_from_fractions(fraction, sums[:num_experts] / num_tokens)
        kept = counts[num_experts : 2 * num_experts].round().to(torch.long)
        dropped = counts[2 * num_experts] / max(num_tokens * top_k, 1)
        return RoutingTotals(
            aux_loss=aux,
            z_loss=sums[num_experts] / num_tokens,
            tokens_per_expert=kept,
            dropped_fraction=dropped.float(),
            router_entropy=(counts[-1] / num_tokens).float(),
            capacity=int(counts[-2]) if dropless else routing.capacity * self.tp,
        )


# ---- parallelize a built model ----------------------------------------------------------


def _interleave_gate_up(fc1: nn.Linear, tp: int) -> nn.Linear:
    """A copy of swiglu's fc1 [2F, d] with rows reordered to [gate_0, up_0, gate_1, up_1, ...]
    (blocks of F / tp), so that slicing 2F / tp contiguous rows per rank keeps pairs."""
    width = fc1.out_features // 2
    block = width // tp
    order = torch.cat(
        [
            torch.cat([torch.arange(r * block, (r + 1) * block)] * 2)
            + torch.repeat_interleave(torch.tensor([0, width]), block)
            for r in range(tp)
        ]
    )
    reordered = nn.Linear(
        fc1.in_features,
        fc1.out_features,
        bias=fc1.bias is not None,
        device=fc1.weight.device,
        dtype=fc1.weight.dtype,
    )
    with torch.no_grad():
        reordered.weight.copy_(fc1.weight[order])
        if fc1.bias is not None:
            reordered.bias.copy_(fc1.bias[order])
    return reordered


def parallelize_dense_ffn(ffn: DenseFFN, group: Any, *, timeout: timedelta) -> None:
    """Swap ``ffn``'s fc1 / fc2 for column / row shards in place (same forward code)."""
    tp, _ = group_size_and_rank(group)
    if not isinstance(ffn.fc1, nn.Linear) or not isinstance(ffn.fc2, nn.Linear):
        raise ValueError("this DenseFFN is already tensor-parallel")
    d_ff = ffn.fc2.in_features
    if d_ff % tp != 0:
        raise ValueError(f"model.d_ff ({d_ff}) must be divisible by parallel.tp ({tp})")
    swiglu = ffn.activation == "swiglu"
    full = _interleave_gate_up(ffn.fc1, tp) if swiglu else ffn.fc1
    fc1 = ColumnParallelLinear.from_linear(full, group, timeout=timeout)
    if swiglu:
        for param in (fc1.weight, fc1.bias):
            if param is not None:
                param.partition_stride = 2
    ffn.fc1 = fc1
    ffn.fc2 = RowParallelLinear.from_linear(ffn.fc2, group, input_is_parallel=True, timeout=timeout)


def parallelize_moe_layer(layer: MoELayer, group: Any, *, timeout: timedelta) -> None:
    """Put ``layer`` in token-split mode over ``group`` (its shared expert is split by width)."""
    tp, _ = group_size_and_rank(group)
    if isinstance(layer.router, ExpertChoiceRouter):
        raise ValueError(
            f"moe.router 'expert_choice' cannot run under parallel.tp ({tp}): each expert "
            "chooses its tokens over the whole batch; use router token_choice"
        )
    if isinstance(layer.dispatcher, SimulatedDispatcher):
        raise ValueError(
            f"moe.simulate_ep ({layer.dispatcher.num_ranks}) must be 1 under parallel.tp ({tp})"
        )
    if layer.token_split is not None:
        raise ValueError("this MoELayer is already tensor-parallel")
    layer.token_split = TokenSplit(group, timeout)
    layer.router.tensor_parallel_group = group
    layer.router.tensor_parallel_timeout = timeout
    if layer.shared_expert is not None:
        parallelize_dense_ffn(layer.shared_expert, group, timeout=timeout)


def apply_tensor_parallel(
    model: nn.Module,
    group: Any,
    *,
    timeout: timedelta = COLLECTIVE_TIMEOUT,
    data_group: Any = None,
) -> int:
    """Split ``model`` (a Transformer, or any module holding MoELayers / DenseFFNs) over the
    TP ``group`` in place; returns the number of modules changed (0 without TP).

    ``data_group``: the ranks that hold the same heads (the layout's data-parallel group),
    for attention that reduces statistics of its heads across ranks (MGK's soft-EM prior,
    ``em_group``); the default group would mix different heads under TP.

    Every TP rank must call it on the same full model (same seed). Attention modules are
    split by their own ``parallelize`` (heads); DenseFFN by width; MoELayer routes 1/tp of the
    rows (with its shared expert split by width). Call before expert parallelism and before
    the optimizer or engine is built: the swapped layers are new Parameters.
    """
    if group_size_and_rank(group)[0] == 1:
        return 0
    changed = 0
    # The list is taken first: the loop swaps submodules of the modules it visits.
    for module in list(model.modules()):
        if isinstance(module, TransformerBlock):
            if data_group is not None and hasattr(module.attention, "em_group"):
                module.attention.em_group = data_group
            parallelize = getattr(module.attention, "parallelize", None)
            if parallelize is not None:
                parallelize(group, timeout=timeout)
                changed += 1
        elif isinstance(module, MoELayer):
            parallelize_moe_layer(module, group, timeout=timeout)
            changed += 1
        elif isinstance(module, DenseFFN) and isinstance(module.fc1, nn.Linear):
            # A shared expert was already split with its MoELayer (fc1 no longer an nn.Linear).
            parallelize_dense_ffn(module, group, timeout=timeout)
            changed += 1
    return changed
