"""A built Transformer as pipeline layers that pass tuples of tensors (DeepSpeed's pipe engine).

    pipe = pipeline_layers(model)                  # PipelineLayers: layers, loss_fn, moe_blocks
    engine = pipeline_engine(model, ds_config, pp=2, dp=1, partition="uniform")
    loss = engine.train_batch(iter(batches))       # batch: ((input_ids, mask), targets)

What travels between stages is ``(hidden, aux_loss, z_loss, mask)``: hidden [B, n, D], the
running fp32 aux and z sums, and the padding mask as an int tensor (1 = real token), or a
0-size int tensor for no mask. The pipe engine gives every received float tensor
``requires_grad`` and expects a gradient for each, so aux and z start on the autograd graph
(``hidden.sum() * 0``) and a stage without MoE still sends tensors that need a gradient. A
mask travels as int because the engine casts only a bool in the last tuple position.

The first stage reads ``(input_ids, mask)``; the last stage ends in ``(logits, aux, z)``,
which ``PipelineLoss`` turns into Transformer.forward's loss. The causal/masked LM output
projection is the embedding matrix: the embedding is a tied layer on the first and last
stages (DeepSpeed sums its gradient over both). Routing statistics stay on the stage that
made them (``PipeBlock.last_routing``).

Refused: attention methods with cross-layer state (evolving attention) or a module shared
across layers, whose state cannot travel in the tuple.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe.blocks import Activations, EmbeddingLayer, RoutingStats, TransformerBlock
from moe.config import MoEConfig
from moe.transformer import IGNORE_INDEX, LanguageModelHead, Transformer
from parallel.pipeline import (
    Partition,
    TiedLayer,
    block_counts,
    build_pipeline_engine,
    check_pipeline_engine,
    check_stage_experts,
    stage_bounds,
)

Pipe = tuple[torch.Tensor, ...]


def no_mask(device: torch.device | None = None) -> torch.Tensor:
    """The 0-size int tensor that stands for "no padding mask"."""
    return torch.zeros(0, dtype=torch.int64, device=device)


def pack(acts: Activations) -> Pipe:
    """Activations -> (hidden, aux, z, int mask)."""
    mask = acts.padding_mask
    mask = no_mask(acts.hidden.device) if mask is None else mask.to(torch.int64)
    return acts.hidden, acts.aux_loss, acts.z_loss, mask


def unpack(inputs: Pipe) -> Activations:
    """(hidden, aux, z, int mask) -> Activations (mask back to bool, or None when 0-size)."""
    hidden, aux, z, mask = inputs
    padding = None if mask.numel() == 0 else mask.bool()
    return Activations(hidden=hidden, padding_mask=padding, aux_loss=aux, z_loss=z)


class PipeEmbedding(nn.Module):
    """(input_ids, int mask) -> (hidden, aux, z, mask), aux and z on the graph of hidden."""

    def __init__(self, layer: EmbeddingLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, inputs: Pipe) -> Pipe:
        ids, mask = inputs
        acts = self.layer(ids, None if mask.numel() == 0 else mask.bool())
        # Zero with a grad_fn: the next stage sends a gradient back for aux and z, and the
        # engine's backward needs every float output of a stage to require one.
        zero = acts.hidden.float().sum() * 0.0
        return acts.hidden, zero, zero.clone(), mask.to(torch.int64)


class PipeBlock(nn.Module):
    """One TransformerBlock on tuples; an MoE block keeps the routing statistics of each
    forward in ``routing_log`` (one per micro-batch, cleared by ``collect_step``)."""

    def __init__(self, block: TransformerBlock) -> None:
        super().__init__()
        self.block = block
        self.routing_log: list[RoutingStats] = []

    @property
    def last_routing(self) -> RoutingStats | None:
        return self.routing_log[-1] if self.routing_log else None

    def forward(self, inputs: Pipe) -> Pipe:
        acts = self.block(unpack(inputs))
        if self.block.is_moe and acts.routing:
            self.routing_log.append(acts.routing[-1])
        return pack(acts)


class PipeHeadNorm(nn.Module):
    """The LM head before its tied projection: final norm (and the masked-LM transform)."""

    def __init__(self, head: LanguageModelHead) -> None:
        super().__init__()
        self.norm = head.norm
        self.transform = head.transform

    def forward(self, inputs: Pipe) -> Pipe:
        hidden, aux, z, mask = inputs
        hidden = self.norm(hidden)
        if self.transform is not None:
            hidden = self.transform(hidden)
        return hidden, aux, z, mask


def tied_projection(module: nn.Module, inputs: Pipe) -> Pipe:
    """The LM head's decoder through the tied embedding matrix: -> (logits, aux, z)."""
    hidden, aux, z, _ = inputs
    weight = module.module.layer.embed.tied_weight
    return F.linear(hidden, weight), aux, z


class PipeHead(nn.Module):
    """A whole head on tuples (classification, untied heads): -> (logits, aux, z)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, inputs: Pipe) -> Pipe:
        acts = unpack(inputs)
        return self.head(acts), acts.aux_loss, acts.z_loss


class PipelineLoss:
    """loss_fn(outputs, targets) = CE + aux_loss_coef * aux + z_loss_coef * z, as
    Transformer.forward computes it.

    On the last stage every call appends (loss, ce, aux, z), detached, to ``log`` (one row
    per micro-batch; ``collect_step`` takes and clears it). ``sink``, when set, also gets
    ``(logits, targets)`` of each call: evaluation sums what it needs from the logits there,
    the only stage that has them.
    """

    def __init__(self, moe: MoEConfig | None) -> None:
        self.moe = moe
        self.log: list[torch.Tensor] = []
        self.sink: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    def __call__(self, outputs: Pipe, targets: torch.Tensor) -> torch.Tensor:
        logits, aux, z = outputs
        ce = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
        )
        loss = ce
        if self.moe is not None:
            loss = loss + self.moe.aux_loss_coef * aux + self.moe.z_loss_coef * z
        parts = [t.detach().float().reshape(()) for t in (loss, ce, aux, z)]
        self.log.append(torch.stack(parts))
        if self.sink is not None:
            self.sink(logits.detach(), targets)
        return loss


@dataclass
class PipelineLayers:
    """The pipeline layer list of a Transformer and what a cut needs to know about it.

    ``layers``: [embedding, blocks..., head layers...]; ``num_blocks``; ``moe_blocks``: the
    block indices with an MoE FFN; ``block_parameters``: parameters per block (the
    embedding's added to the first, the head's to the last) for balanced cuts.
    """

    layers: list[nn.Module | TiedLayer]
    loss_fn: PipelineLoss
    num_blocks: int
    moe_blocks: list[int]
    block_parameters: list[int]
    num_experts_per_layer: list[int]


def check_pipelinable(model: Transformer) -> None:
    """Refuse attention whose state crosses layers (it cannot ride in the tuple), in one line."""
    for index, block in enumerate(model.blocks):
        if block.carries_state:
            raise ValueError(
                f"attention.layers.{index}: '{block.attention_name}' passes state between "
                "layers, which cannot cross pipeline stages; set parallel.pp 1 or pick "
                "another attention method"
            )
    if len(model.shared_attention):
        names = ", ".join(model.shared_attention)
        raise ValueError(
            f"attention '{names}' shares a module across layers, which pipeline stages do "
            "not tie yet; set parallel.pp 1 or pick another attention method"
        )


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def pipeline_layers(model: Transformer) -> PipelineLayers:
    """The layers of ``model`` (modules reused, weights unchanged) as pipeline layers."""
    check_pipelinable(model)
    embedding, blocks, head = model.layers[0], model.blocks, model.layers[-1]
    first: nn.Module | TiedLayer = PipeEmbedding(embedding)
    tail: list[nn.Module | TiedLayer]
    tied = getattr(embedding.embed, "tied_weight", None)
    if isinstance(head, LanguageModelHead) and tied is not None and head.decoder.weight is tied:
        first = TiedLayer("embedding", first, weight_attrs=("layer.embed.token.weight",))
        projection = TiedLayer(
            "embedding", first.module, first.weight_attrs, forward_fn=tied_projection
        )
        tail = [PipeHeadNorm(head), projection]
    else:
        tail = [PipeHead(head)]
    counts = [_count(block) for block in blocks]
    counts[0] += _count(embedding)
    # The tied head's decoder weight is the embedding matrix, already counted on stage 0.
    counts[-1] += _count(head) - (tied.numel() if isinstance(first, TiedLayer) else 0)
    num_experts = [b.ffn.num_experts for b in blocks if b.is_moe]
    return PipelineLayers(
        layers=[first, *(PipeBlock(b) for b in blocks), *tail],
        loss_fn=PipelineLoss(model.moe_config),
        num_blocks=len(blocks),
        moe_blocks=[i for i, b in enumerate(blocks) if b.is_moe],
        block_parameters=counts,
        num_experts_per_layer=num_experts,
    )


def moe_blocks_per_stage(moe_blocks: list[int], counts: list[int]) -> list[int]:
    """How many of the MoE block indices ``moe_blocks`` each stage of the cut ``counts`` holds."""
    starts = [sum(counts[:s]) for s in range(len(counts))]
    return [
        sum(1 for b in moe_blocks if start <= b < start + n) for start, n in zip(starts, counts)
    ]


def describe_stages(pipe: PipelineLayers, counts: list[int]) -> list[str]:
    """One line per stage for the start-up report: its blocks (MoE ones counted) and
    parameters (the embedding on the first stage, the head on the last)."""
    lines, start = [], 0
    for stage, count in enumerate(counts):
        blocks = range(start, start + count)
        moe = sum(1 for b in blocks if b in pipe.moe_blocks)
        params = sum(pipe.block_parameters[b] for b in blocks)
        parts = ["embedding"] if stage == 0 else []
        parts.append(f"blocks {blocks[0]}-{blocks[-1]}" if count > 1 else f"block {blocks[0]}")
        if stage == len(counts) - 1:
            parts.append("head")
        lines.append(f"stage {stage}: {', '.join(parts)} ({moe} MoE) | {params / 1e6:.2f}M params")
        start += count
    return lines


def plan_stages(
    model_config: Any,
    moe: MoEConfig | None,
    attention_config: Any,
    *,
    pp: int,
    partition: Partition,
    zero_stage: int,
    vocab_size: int | None = None,
) -> list[int]:
    """The cut (blocks per stage) of the configured model, with every refusal the engine
    would raise, from a model built on the meta device (no memory, no weights): a config
    the pipeline cannot train fails here, before any process group exists."""
    with torch.device("meta"):
        model = Transformer(model_config, moe, attention_config, vocab_size=vocab_size)
    pipe = pipeline_layers(model)
    counts = block_counts(partition, pipe.num_blocks, pp, pipe.block_parameters)
    check_pipeline_engine(pp, zero_stage)
    if pipe.num_experts_per_layer:
        check_stage_experts(moe_blocks_per_stage(pipe.moe_blocks, counts), zero_stage)
    return counts


@dataclass
class MicroStep:
    """One micro-batch's results from every stage, as Transformer.forward reports them."""

    loss: torch.Tensor
    ce_loss: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    routing: tuple[RoutingStats, ...]


def collect_step(
    pipe: PipelineLayers, num_micro: int, group: Any = None, device: torch.device | None = None
) -> list[MicroStep]:
    """Take this stage's per-micro-batch losses (last stage) and routing statistics (its MoE
    blocks) and sum them over the pipeline ``group``: every rank then holds every MoE
    layer's statistics in model order and the last stage's losses. Collective over
    ``group``; clears the logs."""
    moe = [pipe.layers[1 + b] for b in pipe.moe_blocks]
    width = max(pipe.num_experts_per_layer, default=0)
    stats = torch.zeros(num_micro, len(moe), width + 3, dtype=torch.float64)
    for j, block in enumerate(moe):
        log = block.routing_log
        if log and len(log) != num_micro:
            raise RuntimeError(
                f"MoE block {pipe.moe_blocks[j]} ran {len(log)} of {num_micro} micro-batches"
            )
        for m, routing in enumerate(log):
            count = routing.tokens_per_expert.numel()
            stats[m, j, :count] = routing.tokens_per_expert.detach().double().cpu()
            stats[m, j, width] = float(routing.dropped_fraction)
            stats[m, j, width + 1] = float(routing.router_entropy)
            stats[m, j, width + 2] = float(routing.capacity)
        log.clear()
    losses = torch.zeros(num_micro, 4, dtype=torch.float64)
    if pipe.loss_fn.log:
        if len(pipe.loss_fn.log) != num_micro:
            raise RuntimeError(f"the loss ran {len(pipe.loss_fn.log)} of {num_micro} micro-batches")
        losses = torch.stack(pipe.loss_fn.log).double().cpu()
    pipe.loss_fn.log.clear()
    flat = torch.cat([stats.flatten(), losses.flatten()])
    if group is not None and torch.distributed.get_world_size(group) > 1:
        flat = flat.to(device or "cpu")
        torch.distributed.all_reduce(flat, group=group)
        flat = flat.cpu()
    stats = flat[: stats.numel()].reshape(stats.shape)
    losses = flat[stats.numel() :].reshape(losses.shape)
    out = []
    for m in range(num_micro):
        routing = tuple(
            RoutingStats(
                tokens_per_expert=stats[m, j, :experts].round().long(),
                dropped_fraction=stats[m, j, width].float(),
                router_entropy=stats[m, j, width + 1].float(),
                capacity=int(stats[m, j, width + 2]),
            )
            for j, experts in enumerate(pipe.num_experts_per_layer)
        )
        loss, ce, aux, z = losses[m].float().unbind()
        out.append(MicroStep(loss=loss, ce_loss=ce, aux_loss=aux, z_loss=z, routing=routing))
    return out


def pipeline_engine(
    model: Transformer,
    ds_config: dict[str, Any],
    *,
    pp: int,
    dp: int,
    tp: int = 1,
    partition: Partition = "uniform",
    ep_size: int = 1,
    weight_decay: float = 0.0,
    groups: Any = None,
) -> tuple[Any, PipelineLayers, list[int]]:
    """Cut ``model`` into ``pp`` stages and build the pipe engine; returns (engine, the
    pipeline layers, blocks per stage). Every rank passes the same, identically seeded model
    (tensor- and expert-parallel already applied, over ``groups``: the run's
    ``parallel.layout.ProcessGroups``; None builds them for (pp, dp, tp, ep))."""
    pipe = pipeline_layers(model)
    counts = block_counts(partition, pipe.num_blocks, pp, pipe.block_parameters)
    parts = stage_bounds(counts, len(pipe.layers))
    moe_per_stage = moe_blocks_per_stage(pipe.moe_blocks, counts)
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    check_pipeline_engine(pp, zero_stage)  # before any group: a refusal needs no peers
    if pipe.num_experts_per_layer:
        check_stage_experts(moe_per_stage, zero_stage)
    if groups is None:
        from parallel.layout import ParallelLayout

        layout = ParallelLayout(dp=dp, ep=ep_size, tp=tp, pp=pp)
        groups = layout.build(max(pipe.num_experts_per_layer, default=None))
    engine = build_pipeline_engine(
        pipe.layers,
        ds_config,
        parts=parts,
        pp=pp,
        dp=dp,
        tp=tp,
        loss_fn=pipe.loss_fn,
        num_experts_per_layer=pipe.num_experts_per_layer,
        moe_blocks_per_stage=moe_per_stage,
        ep_size=ep_size,
        weight_decay=weight_decay,
        groups=groups,
    )
    return engine, pipe, counts
