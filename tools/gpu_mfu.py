"""Print the MFU a training run recorded in RUN_DIR/metrics.jsonl (its last three log lines).

    python tools/gpu_mfu.py gpu-check/train_run     # used by tools/gpu_check.sh

Prints nothing when no record has an ``mfu`` (the trainer reports it on CUDA only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    path = Path(sys.argv[1]) / "metrics.jsonl"
    if not path.is_file():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in [r for r in rows if r.get("mfu") is not None][-3:]:
        rate = row.get("tokens_per_s") or float("nan")
        print(
            f"metrics.jsonl step {row['step']}: MFU {row['mfu']:.1%}, {rate:,.0f} tokens/s, "
            f"loss {row.get('loss', float('nan')):.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
