"""The small local corpus the end-to-end training tests share (no network, a few seconds)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path


def write_corpus(root: Path) -> Path:
    """``root/corpus.jsonl``: the first 12 standard-library modules, one JSON record each."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:12]
    corpus = Path(root) / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in files))
    return corpus
