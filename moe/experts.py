"""Experts as stacked weights run by one grouped (or batched) matmul.

Shape letters: N routed rows (kept assignments, grouped by expert), E experts, C capacity,
d model width, f expert hidden width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from parallel.markers import mark_expert

ACTIVATIONS = ("relu", "gelu", "swiglu")


def _grouped_mm_works() -> bool:
    """torch._grouped_mm exists and runs forward and backward here (checked once)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.randn(3, 2, requires_grad=True)
        w = torch.randn(2, 2, 2, requires_grad=True)
        y = torch._grouped_mm(x, w, offs=torch.tensor([1, 3], dtype=torch.int32))
        y.backward(torch.ones_like(y))
        ref = torch.cat([x[:1] @ w[0], x[1:] @ w[1]])
        return bool(torch.allclose(y, ref))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


_GROUPED_MM: bool | None = None


def _aligned(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch._grouped_mm needs row strides that are multiples of 16 bytes."""
    size = x.element_size()
    return (x.shape[-1] * size) % 16 == 0 and (weight.shape[-1] * size) % 16 == 0


class _LoopGroupedMatmul(torch.autograd.Function):
    """Per-expert matmuls written into preallocated outputs (no cat, no per-expert zero grads)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty(x.shape[0], weight.shape[-1])
        start = 0
        for e, n in enumerate(sizes):
            if n:
                torch.mm(x[start : start + n], weight[e], out=out[start : start + n])
            start += n
        ctx.save_for_backward(x, weight)
        ctx.sizes = sizes
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = x.new_empty(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = weight.new_empty(weight.shape)
        start = 0
        for e, n in enumerate(ctx.sizes):
            rows = slice(start, start + n)
            if grad_x is not None and n:
                torch.mm(grad[rows], weight[e].t(), out=grad_x[rows])
            if grad_w is not None:
                if n:
                    torch.mm(x[rows].t(), grad[rows], out=grad_w[e])
                else:
                    grad_w[e].zero_()
            start += n
        return grad_x, grad_w, None


class _LoopReluMLP(torch.autograd.Function):
    """relu experts x -> relu(x w1) w2, one expert at a time (CPU).

    The same matmuls as two ``_LoopGroupedMatmul`` calls around ``F.relu``, but the relu and
    its backward mask run on each expert's hidden block right after the matmul that wrote it,
    while the block is still in cache, and in place: the separate relu passes over the whole
    [N, f] hidden tensor (about 5% of a step at the expert-parallel bench's shapes) go away.
    The backward's hidden gradient lives in one scratch sized for the largest expert, reused
    by every expert: it stays in cache, and no [N, f] tensor is allocated (1-2% faster
    fwd+bwd at the bench's shapes). Saves x and the relu output h, as the unfused
    path does.
    """

    @staticmethod
    def forward(ctx, x, w1, w2, sizes):  # noqa: ANN001, ANN205
        x = x.contiguous()
        hidden = x.new_empty(x.shape[0], w1.shape[-1])
        out = x.new_empty(x.shape[0], w2.shape[-1])
        start = 0
        for e, n in enumerate(sizes):
            rows = slice(start, start + n)
            if n:
                torch.mm(x[rows], w1[e], out=hidden[rows])
                hidden[rows].clamp_(min=0)
                torch.mm(hidden[rows], w2[e], out=out[rows])
            start += n
        ctx.save_for_backward(x, hidden, w1, w2)
        ctx.sizes = sizes
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, hidden, w1, w2 = ctx.saved_tensors
        needs_x, needs_w1, needs_w2 = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        grad_x = torch.empty_like(x) if needs_x else None
        grad_w1 = torch.empty_like(w1) if needs_w1 else None
        grad_w2 = torch.empty_like(w2) if needs_w2 else None
        longest = max(ctx.sizes, default=0)
        scratch = hidden.new_empty(longest, hidden.shape[1]) if needs_x or needs_w1 else None
        start = 0
        for e, n in enumerate(ctx.sizes):
            rows = slice(start, start + n)
            start += n
            if not n:
                for grad_w in (grad_w1, grad_w2):
                    if grad_w is not None:
                        grad_w[e].zero_()
                continue
            if grad_w2 is not None:
                torch.mm(hidden[rows].t(), grad[rows], out=grad_w2[e])
            if scratch is None:
                continue
            g = scratch[:n]
            torch.mm(grad[rows], w2[e].t(), out=g)
            # relu's backward in place (aten.threshold_backward; a masked_fill is ~60x slower)
            torch.ops.aten.threshold_backward.grad_input(g, hidden[rows], 0.0, grad_input=g)
            if grad_x is not None:
                torch.mm(g, w1[e].t(), out=grad_x[rows])
            if grad_w1 is not None:
                torch.mm(x[rows].t(), g, out=grad_w1[e])
        return grad_x, grad_w1, grad_w2, None


def _autocast(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast to the autocast dtype when autocast is on: a custom Function is not autocast by torch."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return (x, *weights)
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in (x, *weights))


def default_impl(x: torch.Tensor, weight: torch.Tensor) -> str:
    """One grouped kernel on accelerators (torch._grouped_mm, no host sync); the loop on CPU,
    where torch's grouped kernel is itself a loop followed by a copy of every result."""
    global _GROUPED_MM
    if x.device.type == "cpu":
        return "loop"
    if _GROUPED_MM is None:
        _GROUPED_MM = _grouped_mm_works()
    return "grouped" if _GROUPED_MM and _aligned(x, weight) else "loop"


def grouped_matmul(
    x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor, *, impl: str = "auto"
) -> torch.Tensor:
    """Rows of x [N, d_in], grouped by expert, times that expert's weight [E, d_in, d_out].

    group_sizes [E] int64 sum to N. ``impl``: "grouped" (torch._grouped_mm, one kernel, no
    host synchronisation), "loop" (one matmul per expert into preallocated outputs; needs
    the sizes on the host) or "auto" (see ``default_impl``).
    """
    if impl == "auto":
        impl = default_impl(x, weight)
    if impl == "grouped":
        offsets = torch.cumsum(group_sizes, 0).to(torch.int32)
        return torch._grouped_mm(x.contiguous(), weight, offs=offsets)
    if impl != "loop":
        raise ValueError(f"impl must be 'auto', 'grouped' or 'loop', got {impl!r}")
    x, weight = _autocast(x, weight)
    with torch.autocast(x.device.type, enabled=False):
        return _LoopGroupedMatmul.apply(x, weight, group_sizes.tolist())


class GroupedExperts(nn.Module):
    """E feed-forward experts d -> f -> d with stacked weights and no biases.

    Parameters: ``w1`` [E, d, f], ``w2`` [E, f, d], and ``w3`` [E, d, f] for swiglu
    (y = (silu(x w1) * (x w3)) w2), each marked ``parallel.markers.mark_expert`` (how
    DeepSpeed tagging, checkpoints and parameter counts find experts). Initialised with
    Switch Transformer's reduced scale: truncated normal with std sqrt(0.1 / fan_in).
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.num_experts = num_experts
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.w3 = (
            nn.Parameter(torch.empty(num_experts, d_model, d_ff))
            if activation == "swiglu"
            else None
        )
        for w in (self.w1, self.w2, self.w3):
            if w is not None:
                mark_expert(w)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w1, self.w2, self.w3):
            if w is not None:
                nn.init.trunc_normal_(w, std=math.sqrt(0.1 / w.shape[1]))

    def _hidden(self, h1: torch.Tensor, h3: torch.Tensor | None) -> torch.Tensor:
        if self.activation == "relu":
            return F.relu(h1)
        if self.activation == "gelu":
            return F.gelu(h1)
        return F.silu(h1) * h3

    def forward(
        self, x: torch.Tensor, group_sizes: torch.Tensor, *, impl: str = "auto"
    ) -> torch.Tensor:
        """x [N, d] grouped by expert (group_sizes [E] rows each) -> [N, d], no padding.

        relu experts on the loop path run as one fused function (``_LoopReluMLP``).
        """
        resolved = default_impl(x, self.w1) if impl == "auto" else impl
        if self.activation == "relu" and resolved == "loop":
            x, w1, w2 = _autocast(x, self.w1, self.w2)
            with torch.autocast(x.device.type, enabled=False):
                return _LoopReluMLP.apply(x, w1, w2, group_sizes.tolist())
        h3 = grouped_matmul(x, self.w3, group_sizes, impl=impl) if self.w3 is not None else None
        h = self._hidden(grouped_matmul(x, self.w1, group_sizes, impl=impl), h3)
        return grouped_matmul(h, self.w2, group_sizes, impl=impl)

    def forward_buffer(self, buffer: torch.Tensor) -> torch.Tensor:
        """buffer [E, C, d] (one row block per expert, padded to capacity) -> [E, C, d]."""
        h3 = torch.bmm(buffer, self.w3) if self.w3 is not None else None
        h = self._hidden(torch.bmm(buffer, self.w1), h3)
        return torch.bmm(h, self.w2)


class DenseFFN(nn.Module):
    """A dense feed-forward block d -> f -> d (with biases), the same activations as experts."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.fc1 = nn.Linear(d_model, width)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "gelu":
            h = F.gelu(h)
        else:
            h = F.relu(h)
        return self.fc2(h)
