"""Experts as stacked weights run by one grouped (or batched) matmul.

Shape letters: N routed rows (kept assignments, grouped by expert), E experts, C capacity,
d model width, f expert hidden width.

Which kernel runs the grouped matmuls (``default_impl``), by device, compute dtype (the
autocast dtype under autocast, else the input's) and layout (x [N, k] row-major, weight
[E, k, n] row-major, int32 offsets on the device: the layout the real call uses):

* CPU (and any device that is not CUDA): "loop", never probed. torch's CPU grouped kernel
  is itself a loop followed by a copy of every result.
* CUDA, bfloat16, compute capability 9.x or 10.x (torch's single CUTLASS kernel): "grouped",
  when the one-time probe on that device and dtype passes (forward and backward equal
  per-expert matmuls, an empty expert's weight gradient exactly 0) and both widths k and n
  make rows of a multiple of 16 bytes; otherwise "loop".
* CUDA, any other dtype or architecture, or a ROCm build: "loop". torch's ``_grouped_mm``
  there falls back to a per-expert loop that copies the offsets to the host on every call
  (three calls per matmul with its backward); the loop here reads the sizes once per layer.

Every fallback to the loop on CUDA logs its reason once (logger "moeforge").
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from parallel.markers import mark_expert

ACTIVATIONS = ("relu", "gelu", "swiglu")
IMPLS = ("auto", "grouped", "loop")

logger = logging.getLogger("moeforge")

# torch._grouped_mm reads rows through TMA: every row stride and base pointer is a multiple
# of 16 bytes (aten/src/ATen/native/GroupedMMUtils.h, check_valid_strides_and_return_transposed).
_ALIGN_BYTES = 16

# (device, compute dtype) -> None when the grouped kernel is used there, else why not.
_GROUPED_MM: dict[tuple[torch.device, torch.dtype], str | None] = {}
_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.info(message)


def _single_kernel_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why torch._grouped_mm would not run as one kernel on device and dtype, or None.

    torch runs one grouped GEMM (no host sync) only for bfloat16 inputs and output on compute
    capability 9.x and 10.x (``_grouped_mm_cuda``'s fast path); everything else goes through
    ``_grouped_mm_fallback``, a per-expert loop that copies the offsets to the host first.
    """
    if device.type != "cuda":
        return f"{device.type} has no single-kernel torch._grouped_mm"
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if torch.version.hip:
        return "ROCm's torch._grouped_mm is a per-expert loop with a host sync"
    if dtype != torch.bfloat16:
        return (
            f"torch._grouped_mm is one kernel for bfloat16 only; {dtype} would run its "
            "per-expert loop with a host sync on every call"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return (
            f"torch._grouped_mm is one kernel on compute capability 9.x/10.x only; {device} "
            f"is {major}.{minor}"
        )
    return None


def _probe(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run torch._grouped_mm forward and backward on device and dtype in the real call's layout
    (x [N, k] and weight [E, k, n] row-major, int32 offsets on the device, an empty expert);
    None when it equals per-expert fp32 matmuls, else why not."""
    sizes = [3, 0, 5]
    try:
        # Callers may be in no_grad, inference mode or autocast (the first forward decides);
        # the probe needs gradients and exact dtypes for the kernel and its fp32 reference.
        with torch.inference_mode(False), torch.enable_grad(), _no_autocast(device.type):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(8, 16, generator=gen).to(device, dtype).requires_grad_()
            w = torch.randn(3, 16, 32, generator=gen).to(device, dtype).requires_grad_()
            grad = torch.randn(8, 32, generator=gen).to(device, dtype)
            offs = torch.tensor([3, 3, 8], dtype=torch.int32, device=device)
            y = torch._grouped_mm(x, w, offs=offs)
            y.backward(grad)
            xf, wf, gf = x.detach().float(), w.detach().float(), grad.float()
            ref_y, ref_gx, ref_gw = torch.empty_like(gf), torch.empty_like(xf), torch.zeros_like(wf)
            start = 0
            for e, n in enumerate(sizes):
                rows = slice(start, start + n)
                ref_y[rows] = xf[rows] @ wf[e]
                ref_gx[rows] = gf[rows] @ wf[e].t()
                ref_gw[e] = xf[rows].t() @ gf[rows]
                start += n
            # bf16/fp16 round the result; fp32 may run as TF32 on tensor cores.
            tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 5e-3
            pairs = ((y, ref_y), (x.grad, ref_gx), (w.grad, ref_gw))
            agree = all(
                got is not None and torch.allclose(got.float(), ref, rtol=tol, atol=tol)
                for got, ref in pairs
            )
            if not agree or bool(w.grad[1].abs().max() != 0):
                return f"torch._grouped_mm on {device} {dtype} disagrees with per-expert matmuls"
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"torch._grouped_mm fails on {device} {dtype}: {first}"
    return None


def grouped_kernel_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the grouped kernel serves (device, dtype), else why the loop runs instead.

    Decided once per key: the dtype and architecture rules first, then a probe on that device
    (never a CPU tensor answering for a GPU)."""
    key = (device, dtype)
    if key not in _GROUPED_MM:
        _GROUPED_MM[key] = _single_kernel_reason(device, dtype) or _probe(device, dtype)
    return _GROUPED_MM[key]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: the autocast dtype when autocast is on, else x's."""
    return _autocast_dtype(x.device.type) or x.dtype


def misalignment(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why x [N, k] times weight [E, k, n] in dtype breaks torch._grouped_mm's 16-byte row
    alignment, or None. Both widths matter: the backward multiplies by weight's transpose
    (rows of k) and by x's transpose (rows of N, strided by k)."""
    size = dtype.itemsize
    for name, width in (("input width", x.shape[-1]), ("output width", weight.shape[-1])):
        if (width * size) % _ALIGN_BYTES:
            return (
                f"{name} {width} x {size} bytes ({dtype}) is not a multiple of {_ALIGN_BYTES} bytes"
            )
    return None


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """t contiguous with a 16-byte aligned base (a view at an odd offset is copied)."""
    t = t.contiguous()
    return t.clone() if t.data_ptr() % _ALIGN_BYTES else t


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


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype on device_type when autocast is on there; None when it is off or
    the device type has no autocast (meta)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off on device_type for a kernel fed already-cast tensors."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _autocast(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast to the autocast dtype when autocast is on: a custom Function is not autocast by torch."""
    dtype = _autocast_dtype(x.device.type)
    if dtype is None:
        return (x, *weights)
    return tuple(t.to(dtype) for t in (x, *weights))


def default_impl(x: torch.Tensor, weight: torch.Tensor) -> str:
    """The kernel for x [N, k] times weight [E, k, n] under the current autocast state:
    "grouped" (one torch._grouped_mm kernel, no host sync) or "loop"; the table is in the
    module docstring.

    CPU never probes. A CUDA fallback logs its reason once."""
    if x.device.type != "cuda":
        return "loop"
    dtype = compute_dtype(x)
    reason = grouped_kernel_reason(x.device, dtype) or misalignment(x, weight, dtype)
    if reason is None:
        return "grouped"
    _log_once(f"grouped experts use the per-expert loop on {x.device}: {reason}")
    return "loop"


def _offsets(group_sizes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int32 end row of each expert's group, computed on the device (no host sync)."""
    return torch.cumsum(group_sizes.to(device, non_blocking=True), 0, dtype=torch.int32)


def _grouped_kernel(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm with the loop path's autocast cast, autocast off for the call."""
    x, weight = _autocast(x, weight)
    reason = misalignment(x, weight, x.dtype)
    if reason is not None:
        raise ValueError(
            f"impl='grouped' needs torch._grouped_mm's 16-byte rows: {reason}; "
            "use impl='auto' or 'loop', or widths that are multiples of 8 (bf16) / 4 (fp32)"
        )
    with _no_autocast(x.device.type):
        return torch._grouped_mm(_kernel_layout(x), _kernel_layout(weight), offs=offsets)


def _loop_matmul(x: torch.Tensor, weight: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    x, weight = _autocast(x, weight)
    with _no_autocast(x.device.type):
        return _LoopGroupedMatmul.apply(x, weight, sizes)


def grouped_matmul(
    x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor, *, impl: str = "auto"
) -> torch.Tensor:
    """Rows of x [N, d_in], grouped by expert, times that expert's weight [E, d_in, d_out].

    group_sizes [E] int64 sum to N. ``impl``: "grouped" (torch._grouped_mm, one kernel, no
    host synchronisation on CUDA bf16 sm90/sm100), "loop" (one matmul per expert into
    preallocated outputs; reads the sizes on the host: one sync) or "auto" (see
    ``default_impl``). Both cast x and weight to the autocast dtype under autocast.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = default_impl(x, weight)
    if impl == "grouped":
        return _grouped_kernel(x, weight, _offsets(group_sizes, x.device))
    return _loop_matmul(x, weight, group_sizes.tolist())


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

        On the loop path the sizes are read on the host once for all matmuls of the call
        (one sync); relu experts on CPU run as one fused function (``_LoopReluMLP``, tuned
        for CPU caches; on CUDA the unfused matmuls around ``F.relu`` run instead).
        """
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        resolved = default_impl(x, self.w1) if impl == "auto" else impl
        if resolved == "grouped":
            offsets = _offsets(group_sizes, x.device)  # shared by the two or three matmuls

            def matmul(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return _grouped_kernel(t, w, offsets)

        else:
            sizes = group_sizes.tolist()
            if self.activation == "relu" and x.device.type == "cpu":
                x, w1, w2 = _autocast(x, self.w1, self.w2)
                with _no_autocast(x.device.type):
                    return _LoopReluMLP.apply(x, w1, w2, sizes)

            def matmul(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return _loop_matmul(t, w, sizes)

        h3 = matmul(x, self.w3) if self.w3 is not None else None
        return matmul(self._hidden(matmul(x, self.w1), h3), self.w2)

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
