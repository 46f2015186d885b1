"""Keep freed host memory in the process, so large CPU tensors are not page-faulted every step.

glibc's malloc serves every allocation above 32 MiB with a fresh ``mmap`` and returns it to
the OS on ``free``. A training step on CPU allocates and frees the same large tensors every
step (activations, and gradients: an MoE layer's expert gradients are E times a dense
layer's, 512 MiB per step at E=64, d=512, ff=2048 in fp32), so each step page-faults and
zeroes them again. Measured on the 2-core CI machine, that was 250 ms of kernel time per
forward+backward of one E=64 layer, against 75 ms for the dense FFN. Intel's CPU launcher
preloads jemalloc or tcmalloc for the same reason; neither is on the package registry, so
this sets glibc's own knobs through ``mallopt``: no ``mmap`` for large blocks (they come
from the heap and are reused) and no trimming of the heap's top. Peak resident memory is
unchanged; freed memory is kept for reuse instead of going back to the OS.

``MOEFORGE_RETAIN_FREED_MEMORY=0`` turns it off. It does nothing off Linux/glibc, and
nothing for a run on CUDA: ``device`` of type "cuda", or no device given while CUDA is
available (device tensors do not use malloc, and a GPU process keeps glibc's defaults).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

# From glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_ENV = "MOEFORGE_RETAIN_FREED_MEMORY"
_applied: bool | None = None


def _runs_on_cpu(device: str | torch.device | None) -> bool:
    if device is None:
        return not torch.cuda.is_available()
    return torch.device(device).type == "cpu"


def retain_freed_memory(device: str | torch.device | None = None, *, force: bool = False) -> bool:
    """Apply the malloc settings once; returns whether they are in effect.

    ``device``: where the run computes; only "cpu" applies them. None: CPU unless CUDA is
    available. ``force`` applies them whatever the device (benchmarks of CPU code).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if not force and not _runs_on_cpu(device):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; the trim threshold is an int, so its largest value.
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
