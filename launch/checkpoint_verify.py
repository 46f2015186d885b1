"""Checkpoint manifests and verification: which checkpoint of a run can be resumed.

    entries = describe_files(directory, names)       # size and checksum of each file
    write_manifest(directory, entries)               # before the checkpoint is published
    reason = verify(directory, checksums=True)       # None, or what is wrong, in a few words
    point = find_resume_point(checkpoints_root)      # the newest valid checkpoint and the rest

Every checkpoint directory holds ``manifest.json``: the relative path, size and blake2b
checksum of each file in it (every rank's files, the engine's and moeforge's), computed after
all ranks finished writing and written before ``latest`` moves to it. A checkpoint without a
manifest, or whose files do not match it, is damaged.

Verification policy: checkpoints of real models are large, so reading them all on every
resume would cost minutes. Sizes are checked for every checkpoint considered (one ``stat``
per file); checksums only for the checkpoint about to be loaded, newest first, so a resume
reads in full only the checkpoint it uses (plus a damaged newer one whose sizes still match).
``moeforge checkpoint info`` checks every checkpoint's checksums.

``latest`` names the newest published checkpoint and bounds the search: checkpoints newer
than it were never published. When ``latest`` is missing, unreadable or names no checkpoint
directory, every checkpoint is a candidate and that is reported with the damage.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "moeforge.json"
LATEST = "latest"
MANIFEST = "manifest.json"
HASH = "blake2b"
_CHUNK = 1 << 20
_TAG = re.compile(r"step(\d+)")


def file_digest(path: Path) -> str:
    """blake2b checksum of a file, read in 1 MiB chunks (fast on CPUs without SHA units)."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(directory: Path) -> list[str]:
    """Relative paths of every file under ``directory`` (the manifest excluded), sorted."""
    directory = Path(directory)
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST
    )


def describe_files(directory: Path, names: list[str]) -> dict[str, dict[str, int | str]]:
    """Size and checksum of each of ``names`` (paths relative to ``directory``)."""
    return {
        name: {"size": (Path(directory) / name).stat().st_size, HASH: file_digest(directory / name)}
        for name in names
    }


def write_manifest(directory: Path, entries: dict[str, dict[str, int | str]]) -> None:
    """Write ``manifest.json`` (through a temporary file, so it is complete or absent)."""
    tmp = Path(directory) / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": 1, "hash": HASH, "files": entries}, indent=1))
    tmp.replace(Path(directory) / MANIFEST)


def _read_manifest(directory: Path) -> dict[str, dict] | str:
    """The manifest's file entries, or why they cannot be read."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return f"{MANIFEST} missing"
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{MANIFEST} unreadable"
    return files if isinstance(files, dict) else f"{MANIFEST} unreadable"


def read_manifest(directory: Path) -> dict[str, dict] | str:
    """The manifest's file entries of ``directory``, or why they cannot be read."""
    return _read_manifest(directory)


def checksum_mismatch(directory: Path, entries: dict[str, dict]) -> str | None:
    """The first of ``entries`` (name order) whose file's checksum differs, as a reason."""
    for name, entry in sorted(entries.items()):
        if file_digest(Path(directory) / name) != entry.get(HASH):
            return f"{name} checksum mismatch (its contents changed after saving)"
    return None


def verify(directory: Path, *, checksums: bool) -> str | None:
    """None if ``directory`` matches its manifest, else the first problem found (one phrase).

    ``checksums``: also read every file and compare its checksum (sizes are always checked).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return "directory missing"
    files = _read_manifest(directory)
    if isinstance(files, str):
        return files
    if STATE_FILE not in files or not (directory / STATE_FILE).is_file():
        return f"{STATE_FILE} missing"
    for name, entry in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{name} has {size} bytes, its manifest says {entry.get('size')}"
    return checksum_mismatch(directory, files) if checksums else None


def step_of(tag: str) -> int | None:
    """The step of a checkpoint tag ``stepNNNNNNNN``, None for any other name."""
    match = _TAG.fullmatch(tag)
    return int(match.group(1)) if match else None


def checkpoint_tags(root: Path) -> list[str]:
    """Tags of the checkpoint directories under ``root``, oldest first (leftovers excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return sorted(tags, key=step_of)


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from, and what was wrong with the newer ones.

    ``tag``/``step``: the newest valid checkpoint (None when there is none). ``damaged``:
    (tag, reason) of each newer checkpoint that failed verification, newest first.
    ``latest_problem``: what is wrong with the ``latest`` pointer, if anything.
    """

    tag: str | None
    step: int | None
    damaged: tuple[tuple[str, str], ...] = ()
    latest_problem: str | None = None

    def problems(self) -> str:
        """The damage in one phrase ("" when there is none)."""
        parts = [self.latest_problem] if self.latest_problem else []
        parts += [f"{tag} is damaged ({reason})" for tag, reason in self.damaged]
        return "; ".join(parts)


def _latest_bound(root: Path, tags: list[str]) -> tuple[int | None, str | None]:
    """(step ``latest`` names, or None to consider every checkpoint; the problem with it)."""
    pointer = root / LATEST
    if not pointer.exists():
        return None, f"{LATEST} is missing" if tags else None
    try:
        text = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None, f"{LATEST} is unreadable"
    if text in tags:
        return step_of(text), None
    shown = text if len(text) <= 40 and text.isprintable() else f"{text[:40]!r}"
    return None, f"{LATEST} names '{shown}', which is not a checkpoint directory"


def resume_candidates(root: Path) -> tuple[list[str], str | None]:
    """(checkpoint tags a resume may use, newest first; what is wrong with ``latest``)."""
    root = Path(root)
    tags = checkpoint_tags(root)
    bound, latest_problem = _latest_bound(root, tags)
    # Newer than ``latest``: written but never published (a crash between rename and pointer).
    candidates = [t for t in reversed(tags) if bound is None or step_of(t) <= bound]
    return candidates, latest_problem


def find_resume_point(
    root: Path,
    *,
    listing: Callable[[Path], tuple[list[str], str | None]] = resume_candidates,
    sizes: Callable[[Path], str | None] | None = None,
    checksums: Callable[[Path], str | None] | None = None,
) -> ResumePoint:
    """The newest valid checkpoint under ``root`` (a run's ``checkpoints/``), newest first.

    Sizes are checked for each candidate, checksums for the one that passes: that is the one
    a resume loads (see the module docstring for the policy). ``listing``, ``sizes`` and
    ``checksums`` replace the candidate list and the two checks (launch/checkpoint.py makes
    them collective: rank 0 lists and stats, every rank checksums a share of the files).
    """
    root = Path(root)
    sizes = sizes or (lambda d: verify(d, checksums=False))
    checksums = checksums or (lambda d: checksum_mismatch(d, read_manifest(d)))
    candidates, latest_problem = listing(root)
    damaged: list[tuple[str, str]] = []
    for tag in candidates:
        reason = sizes(root / tag) or checksums(root / tag)
        if reason is None:
            return ResumePoint(tag, step_of(tag), tuple(damaged), latest_problem)
        damaged.append((tag, reason))
    return ResumePoint(None, None, tuple(damaged), latest_problem)
