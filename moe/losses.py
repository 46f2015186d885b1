"""Router auxiliary losses, each the published formula.

Shape letters: T tokens, E experts.
"""

from __future__ import annotations

import torch


def load_balancing_loss(probs: torch.Tensor, first_choice: torch.Tensor) -> torch.Tensor:
    """Switch Transformer eq. 4: E * sum_e f_e * P_e.

    Args:
        probs: [T, E] fp32 router probabilities (softmax over experts).
        first_choice: [T] int64 expert of each token's first choice, counted before dropping.
    Returns:
        0-dim fp32 tensor; 1.0 when routing is perfectly uniform.
    """
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0
    counts = torch.bincount(first_choice, minlength=num_experts).to(probs.dtype)
    fraction = counts / num_tokens  # f_e: no gradient (argmax), as in the paper
    mean_prob = probs.mean(dim=0)  # P_e: carries the gradient
    return num_experts * torch.sum(fraction * mean_prob)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2.

    Args:
        logits: [T, E] router logits (computed in fp32).
    Returns:
        0-dim tensor in the dtype of ``logits``.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy (nats) of the router distribution [T, E]."""
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    return -(probs * torch.log(probs.clamp_min(1e-20))).sum(dim=-1).mean()
