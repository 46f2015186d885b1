"""Float64 naive references for routing and experts: plain Python loops, no vectorisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def naive_route(
    logits: torch.Tensor, top_k: int, capacity_factor, min_capacity: int, priority: str
):
    """Returns (choices [T][k] experts, gates [T][k], slots [T][k] (-1 dropped), capacity)."""
    logits = logits.double()
    num_tokens, num_experts = logits.shape
    probs = torch.softmax(logits, dim=-1)
    choices, gates = [], []
    for t in range(num_tokens):
        row = probs[t]
        order = sorted(range(num_experts), key=lambda e: (-row[e].item(), e))[:top_k]
        total = sum(row[e] for e in order)
        choices.append(order)
        gates.append([row[e] / total if top_k > 1 else row[e] for e in order])
    counts = [0] * num_experts
    for t in range(num_tokens):
        for e in choices[t]:
            counts[e] += 1
    if capacity_factor is None or capacity_factor == 0:
        capacity = max(counts) if num_tokens else 0
    else:
        capacity = max(math.ceil(capacity_factor * num_tokens * top_k / num_experts), min_capacity)
    token_order = list(range(num_tokens))
    if priority == "probability":
        token_order.sort(key=lambda t: -probs[t].max().item())
    filled = [0] * num_experts
    slots = [[-1] * top_k for _ in range(num_tokens)]
    for j in range(top_k):
        for t in token_order:
            e = choices[t][j]
            if filled[e] < capacity:
                slots[t][j] = filled[e]
                filled[e] += 1
    return choices, gates, slots, capacity


def naive_expert(x: torch.Tensor, w1, w2, w3, activation: str) -> torch.Tensor:
    h = x @ w1
    if activation == "relu":
        h = F.relu(h)
    elif activation == "gelu":
        h = F.gelu(h)
    else:
        h = F.silu(h) * (x @ w3)
    return h @ w2


def naive_moe(
    x, router_weight, w1, w2, w3, *, top_k, capacity_factor, min_capacity, priority, activation
):
    """y[t] = sum over kept choices of gate * expert_e(x[t]); dropped choices give 0."""
    logits = x @ router_weight.t()
    choices, gates, slots, _ = naive_route(logits, top_k, capacity_factor, min_capacity, priority)
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(top_k):
            if slots[t][j] >= 0:
                e = choices[t][j]
                acc = acc + gates[t][j] * naive_expert(
                    x[t], w1[e], w2[e], None if w3 is None else w3[e], activation
                )
        rows.append(acc)
    return torch.stack(rows), slots
