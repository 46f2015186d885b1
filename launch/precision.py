"""Which training precision fits the hardware: ``precision: auto`` and its explanation.

    chosen = resolve_precision("auto", torch.device("cpu"))
    chosen.name     # "bf16" or "fp32"
    chosen.reason   # "this CPU has no native bf16" (said once in the start-up line)

bf16 autocast halves activation memory and, on hardware with bf16 units, doubles matmul
throughput. On a CPU without them (AVX2 only: oneDNN then has no bf16 kernel and falls back
to a reference loop) a bf16 matmul is one to two orders of magnitude slower than the same
fp32 one, so a run that asks for bf16 there trains for hours instead of minutes. ``auto``
takes bf16 (autocast, fp32 router) where the device runs it natively and fp32 elsewhere;
the explicit names keep their meaning, and an explicit bf16 on a CPU that would emulate it
gets one warning with the slow-down a small matmul measured at start-up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# The names a config may give; "auto" resolves to one of the others.
PRECISIONS = ("auto", "bf16", "bf16-params", "fp32")
BF16_NAMES = ("bf16", "bf16-params")


@dataclass(frozen=True)
class Precision:
    """The precision a run uses and why (``reason`` is empty when the user named it)."""

    requested: str
    name: str
    reason: str = ""

    def describe(self) -> str:
        """``fp32``, or ``auto -> fp32: this CPU has no native bf16`` for a resolved auto."""
        if self.requested == self.name:
            return self.name
        return f"{self.requested} -> {self.name}" + (f": {self.reason}" if self.reason else "")

    @property
    def bf16(self) -> bool:
        """Whether matmuls run in bf16 (autocast or bf16 parameters)."""
        return self.name in BF16_NAMES


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively (not emulated through fp32 loops).

    CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and newer). CPU: oneDNN's own answer,
    true with AVX512-BF16, AMX or the AVX512 core kernels, false on AVX2-only CPUs.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def default_device() -> torch.device:
    """The device a run on this process trains on: the local CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_precision(requested: str, device: torch.device | None = None) -> Precision:
    """The precision for ``requested`` on ``device`` (default: this process's device)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision ({requested!r}) must be one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return Precision(requested, requested)
    device = default_device() if device is None else device
    if native_bf16(device):
        return Precision("auto", "bf16", f"native bf16 on {_device_words(device)}")
    return Precision("auto", "fp32", f"{_device_words(device)} has no native bf16")


def emulated_bf16_warning(precision: Precision, device: torch.device | None = None) -> str | None:
    """One line warning that ``precision`` asks for bf16 on a device that emulates it, or None.

    The slow-down is measured, not assumed: one small matmul in bf16 and in fp32.
    """
    device = default_device() if device is None else device
    if not precision.bf16 or native_bf16(device):
        return None
    ratio = bf16_slowdown(device)
    return (
        f"precision {precision.name}: {_device_words(device)} has no native bf16, so bf16 "
        f"matmuls are emulated ({ratio:.0f}x slower than fp32 in a start-up probe); "
        "use precision auto or fp32 for speed"
    )


def bf16_slowdown(device: torch.device, size: int = 128) -> float:
    """Time of a [size, size] bf16 matmul over the fp32 one on ``device`` (best of 3 each)."""

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times)

    best(torch.float32)  # first call pays for library set-up
    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)


def _device_words(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    return "this CPU"
