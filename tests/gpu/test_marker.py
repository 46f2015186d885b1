"""Without CUDA the gpu tests are collected and skipped with a reason (not run, not failed).

A separate pytest in a subprocess with CUDA hidden (``CUDA_VISIBLE_DEVICES=""``), so that this
holds on a GPU machine too; collection only imports the modules (a few seconds).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_tests_are_skipped_with_a_reason_without_cuda() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MOEFORGE_TEST_DEVICE", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu",
         "tests/gpu/test_moe.py", "tests/gpu/test_attention.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert " skipped" in out and "passed" not in out and "failed" not in out, out[-3000:]
    assert "torch.cuda.is_available() is False" in out, out[-3000:]
