"""Parameter and FLOP accounting of a Transformer, and model FLOPs utilisation (MFU).

Shape letters: n sequence length, d model width, f FFN width, E experts, k experts per token,
V vocabulary.

    acc = account(model, seq_len=128)               # a built Transformer (whole model, tp=1)
    acc = account_config(config.model, config.moe, config.attention, seq_len=128, vocab_size=260)
    acc.total_params, acc.active_params, acc.training.total   # FLOPs per token, fwd + bwd
    acc.training.padded                             # what fixed [E, C, d] buffers add on top
    saved_flops(acc, dropped_fraction=0.03)         # what dropped assignments did not run
    mfu(acc.training.total, tokens_per_s, peak_flops(name), world_size)

Conventions (the usual ones of scaling-law and MFU papers, so numbers compare):
- A multiply-add is 2 FLOPs; only matmuls count (norms, softmax, activations, the loss and
  the optimizer are left out: they are a few percent at any useful width).
- Training = 3 x forward: the backward computes the gradients of inputs and of weights, each
  a matmul of the forward's size.
- Attention scores are counted over all n keys of each query, causal or not (Q K^T and the
  weighted sum of V: 2 n d multiply-adds per token per layer). A causal kernel can skip
  half of them; counting them whole is what torch's FlopCounterMode and PaLM's MFU formula
  (6 N + 12 L d n per token) do, so a causal run's MFU is comparable with theirs.
- Experts: each token runs ``top_k`` experts (``capacity_factor`` expert rows per token with
  expert-choice routing), the model's work whether or not a capacity limit drops some.
  Two figures sit beside it, outside ``total``: ``Flops.padded``, the empty capacity slots an
  expert layout with fixed [E, C, d] buffers also multiplies (E C - T k rows per T tokens),
  and ``saved_flops``, the expert work of the assignments a capacity limit dropped.
- Attention: a method's module states its own cost in ``flops_per_token(seq_len)`` (full
  attention: 4 d^2 projections and 2 n d scores; the efficient methods' formulas are written
  beside their code). A method without it gets full attention's formula and is named in
  ``Accounting.approximate``.
- The input embedding is a lookup (no FLOPs); a patch embedding is a matmul per patch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from moe.experts import DenseFFN
from moe.layer import MoELayer
from moe.router import compute_capacity, is_dropless
from parallel.markers import is_expert


@dataclass(frozen=True)
class Flops:
    """FLOPs per token, split by where they are spent."""

    dense: float = 0.0  # attention projections, dense FFNs, shared experts, heads, patches
    attention: float = 0.0  # mixing across positions: scores, weighted sums (Linformer's E, F)
    router: float = 0.0  # router logits x W_r (fp32)
    experts: float = 0.0  # the experts each token runs
    # Empty capacity slots that fixed [E, C, d] expert buffers multiply as well: not in
    # ``total``, which is the model's work (what MFU and the sweeps' budgets count).
    padded: float = 0.0

    @property
    def total(self) -> float:
        return self.dense + self.attention + self.router + self.experts

    def scaled(self, factor: float) -> Flops:
        return Flops(**{f.name: getattr(self, f.name) * factor for f in fields(self)})

    def as_dict(self) -> dict[str, float]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "total": self.total}


@dataclass(frozen=True)
class Accounting:
    """Parameters and FLOPs per token of one model at one sequence length."""

    seq_len: int
    total_params: int
    active_params: int  # what one token uses: dense parameters + its experts' share
    embedding_params: int  # the input layer (token and position tables, or patch embedding)
    forward: Flops
    approximate: tuple[str, ...] = field(default=())  # attention methods given full's formula

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params

    @property
    def non_embedding_active_params(self) -> int:
        return self.active_params - self.embedding_params

    @property
    def training(self) -> Flops:
        """FLOPs per token of one training step: forward + backward = 3 x forward."""
        return self.forward.scaled(3.0)

    def describe(self) -> str:
        """One line: parameters and training FLOPs per token, with the split."""
        train = self.training
        parts = ", ".join(
            f"{name} {value / train.total:.0%}"
            for name, value in train.as_dict().items()
            if name not in ("total", "padded") and value
        )
        if train.padded:
            parts += f"; padding +{train.padded / train.total:.0%}"
        approx = (
            f" (approximate: {', '.join(self.approximate)} counted as full attention)"
            if self.approximate
            else ""
        )
        return (
            f"params {self.total_params / 1e6:.2f}M total, {self.active_params / 1e6:.2f}M "
            f"active ({self.non_embedding_params / 1e6:.2f}M / "
            f"{self.non_embedding_active_params / 1e6:.2f}M non-embedding) | training "
            f"{_si(train.total)}FLOPs per token at length {self.seq_len} ({parts}){approx}"
        )


def _si(value: float) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.2f} {prefix}"
    return f"{value:.0f} "


def _weight_macs(*linears: nn.Module | None) -> int:
    """Multiply-adds per row of the linear layers' weights ([out, in] each)."""
    return sum(m.weight.numel() for m in linears if m is not None)


def expert_rows_per_token(layer: MoELayer) -> float:
    """Expert rows one token makes: top_k with token choice; with expert choice each of E
    experts takes capacity_factor x T / E tokens, capacity_factor rows per token."""
    router = layer.router
    if hasattr(router, "top_k"):
        return float(router.top_k)
    factor = router.capacity_factor
    return float(factor) if factor else 1.0


def padded_rows_per_token(layer: MoELayer, routed_tokens: int | None = None) -> float:
    """Empty expert rows per token that a fixed [E, C, d] capacity buffer also multiplies.

    Token choice with capacity factor c over T routed tokens: the buffer holds
    E C = E max(ceil(c T k / E), min_capacity) rows for T k assignments, so (E C - T k) / T
    rows per token are padding (some of them stand for dropped assignments: padding is what
    the buffer adds over the model's top_k rows, however many are kept). ``routed_tokens``:
    T, the tokens of one routing call (one rank's batch x sequence); None gives c k - k,
    the large-T limit. The training capacity factor is used. Zero when nothing is padded:
    dropless routing, expert choice (each expert takes exactly C tokens), c <= 1 in the
    large-T limit, and ``expert_layout`` "grouped" (kept rows only). "auto" counts as a
    buffer layout: it picks one for bf16 on CPU (and grouped elsewhere, where this figure is
    what a fixed buffer would add); the local CPU dispatcher trims its buffer to the fullest
    expert, so the padding it runs is at most this.
    """
    router = layer.router
    factor = router.capacity_factor
    if layer.expert_layout == "grouped" or not hasattr(router, "top_k") or is_dropless(factor):
        return 0.0
    top_k, num_experts = router.top_k, router.num_experts
    if routed_tokens is None:
        return max(factor * top_k - top_k, 0.0)
    if routed_tokens < 1:
        raise ValueError(f"routed_tokens ({routed_tokens}) must be >= 1: tokens per routing call")
    capacity = compute_capacity(routed_tokens, num_experts, top_k, factor, router.min_capacity)
    return max(num_experts * capacity / routed_tokens - top_k, 0.0)


def _moe_flops(layer: MoELayer, routed_tokens: int | None) -> Flops:
    experts = layer.experts
    per_expert = sum(w.numel() for w in (experts.w1, experts.w2, experts.w3) if w is not None)
    per_expert //= experts.num_experts
    shared = (
        _weight_macs(layer.shared_expert.fc1, layer.shared_expert.fc2)
        if (layer.shared_expert is not None)
        else 0
    )
    return Flops(
        dense=2.0 * shared,
        router=2.0 * layer.router.weight.numel(),
        experts=2.0 * expert_rows_per_token(layer) * per_expert,
        padded=2.0 * padded_rows_per_token(layer, routed_tokens) * per_expert,
    )


def attention_is_modelled(module: nn.Module) -> bool:
    """Whether an attention module states its own cost (``flops_per_token``).

    Only a method defined by the module's own class counts: a subclass that adds work to a
    registered method (SPADE's S4D branch on top of local attention) inherits the parent's
    formula, which would undercount it.
    """
    return "flops_per_token" in vars(type(module))


def _attention_flops(module: nn.Module, d_model: int, seq_len: int) -> Flops:
    if attention_is_modelled(module):
        projections, scores = module.flops_per_token(seq_len)
    else:  # full attention's formula: q, k, v and output projections, n keys per query
        projections, scores = 4 * d_model * d_model, 2 * seq_len * d_model
    return Flops(dense=2.0 * projections, attention=2.0 * scores)


def account(model: nn.Module, seq_len: int, *, routed_tokens: int | None = None) -> Accounting:
    """Parameters and FLOPs per token of a built Transformer (moe/transformer.py), whole:
    count before tensor or expert parallelism splits it. ``seq_len``: tokens per sequence
    the model sees (patches, plus the class token, for images). ``routed_tokens``: tokens
    per routing call (one rank's batch x seq_len), for the exact capacity behind
    ``Flops.padded``; None uses capacity_factor x top_k rows per token."""
    if seq_len < 1:
        raise ValueError(f"seq_len ({seq_len}) must be >= 1: the tokens of one sequence")
    d_model = model.config.d_model
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for p in model.layers[0].parameters())
    active = total
    flops = Flops()
    approximate: list[str] = []
    embed = model.layers[0].embed
    projection = getattr(embed, "projection", None)
    if isinstance(projection, nn.Conv2d):  # one [C P P] x [d] matmul per patch
        patches = embed.grid[0] * embed.grid[1]
        flops = _add(flops, Flops(dense=2.0 * projection.weight.numel() * patches / seq_len))
    for block in model.blocks:
        name = block.attention_name
        if not attention_is_modelled(block.attention) and name not in approximate:
            approximate.append(name)
        flops = _add(flops, _attention_flops(block.attention, d_model, seq_len))
        if isinstance(block.ffn, MoELayer):
            flops = _add(flops, _moe_flops(block.ffn, routed_tokens))
            expert = sum(p.numel() for p in block.ffn.parameters() if is_expert(p))
            share = expert_rows_per_token(block.ffn) / block.ffn.experts.num_experts
            active -= expert - round(expert * min(share, 1.0))
        elif isinstance(block.ffn, DenseFFN):
            flops = _add(flops, Flops(dense=2.0 * _weight_macs(block.ffn.fc1, block.ffn.fc2)))
    head = model.layers[-1]
    if hasattr(head, "decoder"):  # language-model head, per token
        transform = head.transform[0] if head.transform is not None else None
        flops = _add(flops, Flops(dense=2.0 * _weight_macs(head.decoder, transform)))
    elif hasattr(head, "classifier"):  # one prediction per sequence
        flops = _add(flops, Flops(dense=2.0 * _weight_macs(head.classifier) / seq_len))
    return Accounting(
        seq_len=seq_len,
        total_params=total,
        active_params=active,
        embedding_params=embedding,
        forward=flops,
        approximate=tuple(approximate),
    )


def _add(a: Flops, b: Flops) -> Flops:
    return Flops(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in fields(a)})


def saved_flops(acc: Accounting, dropped_fraction: float) -> float:
    """Training FLOPs per token that dropped assignments did not run: ``dropped_fraction`` of
    the experts' share (``acc.training.experts``), since a dropped (token, expert) pair skips
    its expert and rides the residual connection.

    ``dropped_fraction``: the fraction of assignments a capacity limit dropped, averaged over
    the MoE layers (``RoutingStats.dropped_fraction``, the trainer's logged drop rate). What
    the grouped layout ran is ``acc.training.total - saved_flops(acc, f)``; a fixed-buffer
    layout runs ``acc.training.total + acc.training.padded`` whatever is dropped.
    """
    if not 0.0 <= dropped_fraction <= 1.0:
        raise ValueError(
            f"dropped_fraction ({dropped_fraction}) must be in [0, 1]: the fraction of "
            "expert assignments dropped"
        )
    return dropped_fraction * acc.training.experts


def account_config(
    model: Any,
    moe: Any,
    attention: Any,
    *,
    seq_len: int,
    vocab_size: int | None = None,
    routed_tokens: int | None = None,
) -> Accounting:
    """``account`` from the config sections (ModelConfig, MoEConfig or None, AttentionConfig):
    the model is built on the meta device, which allocates nothing, so any size is cheap.
    ``vocab_size``: the tokenizer's, when ``model.vocab_size`` is unset; ``routed_tokens``
    as in ``account``."""
    from moe.transformer import Transformer

    with torch.device("meta"):
        built = Transformer(model, moe, attention, vocab_size=vocab_size)
    return account(built, seq_len, routed_tokens=routed_tokens)


# Utilisation --------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks in TFLOP/s (without 2:4 sparsity), from NVIDIA's datasheets:
# A100 datasheet (SXM and PCIe: 312); A30 datasheet (165); H100 datasheet (SXM 989, PCIe 756,
# NVL 835; H800 as H100 SXM); H200 datasheet (SXM 989, NVL 835); B200 (HGX B200 datasheet,
# 2250 per GPU); L4 datasheet (121); L40 datasheet (181); L40S datasheet (362); A10
# datasheet (125); RTX A6000 datasheet (155); Ada architecture whitepaper, RTX 4090 with
# fp32 accumulation as torch uses (165); Ampere GA102 whitepaper, RTX 3090 (71). V100 and T4
# have no bf16: their fp16 tensor peak (V100 datasheet: SXM2 125, PCIe 112, V100S 130; T4
# datasheet 65), the precision a run there would use. Patterns match
# torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB",
# "Tesla V100-SXM2-16GB"; the first match wins, so variants come before their family.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bB200\b", 2250.0),
    (r"\bH200 NVL\b", 835.0),
    (r"\bH200\b", 989.0),
    (r"\bH100 PCIe\b", 756.0),
    (r"\bH100 NVL\b", 835.0),
    (r"\bH100\b", 989.0),
    (r"\bH800\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bA800\b", 312.0),
    (r"\bA30\b", 165.0),
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
    (r"\bRTX A6000\b", 155.0),
    (r"\bRTX 4090\b", 165.0),
    (r"\bRTX 3090\b", 71.0),
    (r"\bV100S\b", 130.0),
    (r"\bV100\b.*\bPCIE\b", 112.0),
    (r"\bV100\b", 125.0),
    (r"\bT4\b", 65.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 (fp16 without bf16) peak of a GPU named ``device_name``, or None."""
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float, world_size: int) -> float:
    """Model FLOPs utilisation: the model's FLOP/s over the peak of all ``world_size`` devices.

    ``tokens_per_s``: the whole run's (every data-parallel rank's tokens); ``peak_flops``:
    one device's, in FLOP/s.
    """
    if peak_flops <= 0 or world_size < 1:
        raise ValueError(
            f"peak_flops ({peak_flops}) must be > 0 and world_size ({world_size}) >= 1"
        )
    return flops_per_token * tokens_per_s / (peak_flops * world_size)
