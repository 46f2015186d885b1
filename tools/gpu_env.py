"""Print the device check's environment as Markdown bullets; exit 1 without a CUDA device.

python tools/gpu_env.py               # used by tools/gpu_check.sh
python tools/gpu_env.py --allow-cpu   # report a CPU-only torch without failing
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import shutil
import subprocess


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _driver() -> str:
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    done = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 else "nvidia-smi failed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allow-cpu", action="store_true", help="no CUDA is not an error")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    lines = [
        f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}, cuDNN "
        f"{torch.backends.cudnn.version() if cuda else 'n/a'}), deepspeed "
        f"{_version('deepspeed')}, Python {platform.python_version()}",
        f"torch._grouped_mm present: {hasattr(torch, '_grouped_mm')}",
    ]
    if cuda:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(
                f"GPU {index}: {props.name}, compute capability {props.major}.{props.minor}, "
                f"{props.total_memory / 2**30:.0f} GiB"
            )
        lines.append(f"bf16 supported: {torch.cuda.is_bf16_supported()}; driver {_driver()}")
    else:
        lines.append(
            "no CUDA device: torch.cuda.is_available() is False"
            + (
                " (a CPU-only torch build: remove the venv and rerun, or pip install a CUDA torch)"
                if torch.version.cuda is None
                else ""
            )
        )
    print("\n".join(f"- {line}" for line in lines))
    return 0 if cuda or args.allow_cpu else 1


if __name__ == "__main__":
    raise SystemExit(main())
