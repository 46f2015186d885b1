"""Property checks every attention method reuses (attention_spec.md §0.3).

Each probe takes a built attention module and asserts; call them from a method's test file.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def dense_softmax_oracle(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    allowed: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """float64 softmax(q k^T * scale + bias) v over the keys an [.., n, m] bool mask allows.

    q [B, H, n, d], k and v [B, H, m, d]. Rows with no allowed key give 0.
    """
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.double()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)
    return probs @ v


def causality_probe(module: nn.Module, x: torch.Tensor, t: int) -> None:
    """Changing inputs after t leaves outputs at <= t bit-identical, with zero gradient.

    Run in float64 (module.double(), x.double()) in eval mode.
    """
    module.eval()
    y1, _ = module(x)
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 3.0
    y2, _ = module(x2)
    assert torch.equal(y1[:, : t + 1], y2[:, : t + 1]), (
        f"future inputs changed outputs at <= {t}: max diff "
        f"{(y1[:, : t + 1] - y2[:, : t + 1]).abs().max().item()}"
    )
    xg = x.clone().requires_grad_(True)
    yg, _ = module(xg)
    yg[:, t].sum().backward()
    leak = xg.grad[:, t + 1 :].abs().max().item() if t + 1 < x.shape[1] else 0.0
    assert leak == 0.0, f"gradient of y[:, {t}] w.r.t. future inputs is {leak}, expected 0"


def padding_probe(module: nn.Module, x: torch.Tensor, length: int, atol: float = 1e-10) -> None:
    """(a) pad contents do not matter; (b) a length-L sequence equals its right-padded form.

    x [B, n, D] with n > length; positions >= length are padding. Run in float64, eval mode.
    """
    module.eval()
    b, n, _ = x.shape
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[:, :length] = True
    y1, _ = module(x, key_padding_mask=mask)
    x2 = x.clone()
    x2[:, length:] = torch.randn_like(x2[:, length:]) * 5.0
    y2, _ = module(x2, key_padding_mask=mask)
    diff = (y1[:, :length] - y2[:, :length]).abs().max().item()
    assert diff <= atol, f"padding contents changed valid outputs by {diff} (atol {atol})"
    y_short, _ = module(x[:, :length])
    diff = (y1[:, :length] - y_short).abs().max().item()
    assert diff <= atol, (
        f"right-padded output differs from the unpadded one by {diff} (atol {atol})"
    )


def train_tiny_model(name: str, model_mode: str, steps: int = 60, **options) -> list[float]:
    """Train a 2-layer MoE transformer on periodic token sequences; the CE loss per step."""
    from moe.config import MoEConfig
    from moe.transformer import IGNORE_INDEX, AttentionConfig, ModelConfig, Transformer

    torch.manual_seed(0)
    config = ModelConfig(
        mode=model_mode,
        vocab_size=16,
        d_model=32,
        num_layers=2,
        num_heads=2,
        d_ff=64,
        max_seq_len=32,
    )
    model = Transformer(
        config, MoEConfig(num_experts=4, every=2), AttentionConfig(name=name, options=options)
    )
    tokens = torch.randint(1, 15, (8, 4)).repeat(1, 8)  # period 4
    if model_mode == "causal_lm":
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
    else:
        masked = torch.rand(tokens.shape) < 0.25
        inputs, targets = tokens.masked_fill(masked, 15), tokens.masked_fill(~masked, IGNORE_INDEX)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        output = model(inputs, targets)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.ce_loss.item())
    return losses
