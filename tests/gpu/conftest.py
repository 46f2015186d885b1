"""Every gpu test compares true fp32 results: TF32 matmuls and convolutions (cuDNN's default
for convolutions; a trainer may switch them on for matmuls) differ from the CPU by about
1e-3, far above the tests' tolerances. torch's newer per-backend settings are used, since
mixing them with ``set_float32_matmul_precision`` raises once either has been used."""

from __future__ import annotations

import pytest
import torch

_SETTINGS = (torch.backends.cuda.matmul, torch.backends.cudnn, torch.backends.cudnn.conv)


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    before = [backend.fp32_precision for backend in _SETTINGS]
    for backend in _SETTINGS:
        backend.fp32_precision = "ieee"
    yield
    for backend, value in zip(_SETTINGS, before, strict=True):
        backend.fp32_precision = value
