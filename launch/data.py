"""Data: load text (HF datasets or the embedded corpus), tokenize, pack, split, shard.

Shape letters: N sequences, L = data.seq_len, B micro batch.

    data = build_data(config.data, mode, run_dir)        # tokenized, packed, split
    sampler = BatchSampler(data.train, micro_batch, grad_accum, dp_size, dp_rank, seed)
    batch = sampler.rows(step, accum_index)      # this rank's rows of the global batch

Sources: ``data.path`` unset -> the embedded corpus, built on first use from the Python
standard library's own source files (sysconfig "stdlib" path, ``*.py``, sorted relative
paths, capped at ``data.corpus_max_bytes``) and cached under ~/.cache/moeforge: no network.
A local file (.txt: one document per file, .jsonl/.json, .parquet) or a directory of them is
read through Hugging Face ``datasets``; any other value is a hub dataset name
(``data.name`` config, ``data.split``, ``data.text_field``). Images (``model.input:
patches``; ``data.path: digits`` or a class-per-subdirectory folder) load in launch/images.py.

Order: documents are tokenized (bytes by default, or a BPE trained locally with
``tokenizers`` and saved in the run directory), joined with an end-of-document token, cut
into windows of L + 1 tokens (inputs and shifted targets), split into train/validation by a
fixed permutation (``data.split_seed``), and the train windows are visited in a per-epoch
permutation seeded by ``train.seed``. Global step s takes the next
micro_batch x grad_accum x dp windows; rank r takes rows (a * dp + r) * B ... + B of micro
step a, so a run with 2 ranks sees exactly the global batches of a run with 1 rank and
twice the micro batch. The data position is therefore the step number alone.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from launch.errors import UserError, first_line

CACHE_DIR = Path(os.environ.get("MOEFORGE_CACHE", Path.home() / ".cache" / "moeforge"))
LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPECIAL_TOKENS = ("<pad>", "<eos>", "<mask>", "<cls>")


class DataError(UserError):
    """A data problem the user can fix (missing path, empty dataset); one line."""


class DataConfig(BaseModel):
    """Where text comes from and how it becomes training sequences (``data:`` section)."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(default=None, description="None: embedded stdlib corpus")
    name: str | None = Field(default=None, description="HF dataset config name")
    split: str = "train"
    text_field: str = "text"
    label_field: str | None = None
    tokenizer: Literal["byte", "bpe"] = "byte"
    bpe_vocab_size: int = Field(default=4096, ge=300)
    seq_len: int = Field(default=128, ge=2)
    val_fraction: float = Field(default=0.05, gt=0.0, lt=0.5)
    split_seed: int = Field(default=1234, ge=0, description="numpy takes no negative seed")
    corpus_max_bytes: int = Field(default=12_000_000, ge=10_000)
    augment_shift: int = Field(
        default=0, ge=0, le=8, description="images: random shift of up to this many pixels"
    )


# Tokenizers --------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes 0..255, then <pad>=256, <eos>=257, <mask>=258, <cls>=259."""

    def __init__(self) -> None:
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.pad_id, self.eos_id, self.mask_id, self.cls_id = range(256, 260)
        self.token_bytes = np.ones(self.vocab_size, dtype=np.int64)  # specials count as 1

    def encode(self, text: str) -> np.ndarray:
        """Text -> int32 ids [len(utf-8 bytes)]."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def save(self, run_dir: Path) -> None:
        """Nothing to save: the byte tokenizer has no state."""


class BPETokenizer:
    """Byte-level BPE trained locally with ``tokenizers``, saved as run_dir/tokenizer.json."""

    FILE = "tokenizer.json"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.pad_id, self.eos_id, self.mask_id, self.cls_id = (
            tokenizer.token_to_id(t) for t in SPECIAL_TOKENS
        )
        lengths = [len(tokenizer.id_to_token(i) or "x") for i in range(self.vocab_size)]
        self.token_bytes = np.asarray(lengths, dtype=np.int64)  # byte-level: 1 char = 1 byte
        for special in (self.pad_id, self.eos_id, self.mask_id, self.cls_id):
            self.token_bytes[special] = 1

    @classmethod
    def train_or_load(cls, texts: list[str], vocab_size: int, run_dir: Path | None) -> BPETokenizer:
        """Load run_dir/tokenizer.json if present, else train on ``texts``."""
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError as err:
            raise DataError(
                "data.tokenizer bpe needs the tokenizers package: pip install tokenizers"
            ) from err
        if run_dir is not None and (run_dir / cls.FILE).is_file():
            return cls(Tokenizer.from_file(str(run_dir / cls.FILE)))
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    def encode(self, text: str) -> np.ndarray:
        """Text -> int32 ids."""
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int32)

    def save(self, run_dir: Path) -> None:
        """Write tokenizer.json into the run directory (atomically)."""
        tmp = run_dir / (self.FILE + ".tmp")
        self.tokenizer.save(str(tmp))
        tmp.replace(run_dir / self.FILE)


# Sources -----------------------------------------------------------------------------------


def default_corpus(max_bytes: int) -> Path:
    """The embedded corpus as JSONL (one stdlib file per line), built once and cached."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    version = f"{sys.version_info.major}{sys.version_info.minor}"
    path = CACHE_DIR / f"stdlib-py{version}-{max_bytes}.jsonl"
    if path.is_file():
        return path
    files = sorted(
        p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    total = 0
    with tmp.open("w", encoding="utf-8") as out:
        for file in files:
            text = file.read_text(encoding="utf-8", errors="replace")
            if not text.strip():
                continue
            total += len(text.encode("utf-8"))
            out.write(json.dumps({"text": text, "path": str(file.relative_to(stdlib))}) + "\n")
            if total >= max_bytes:
                break
    if total == 0:
        raise DataError(f"no Python sources found under {stdlib}; set data.path to a corpus")
    tmp.replace(path)  # atomic: concurrent ranks may race, each writes a whole file
    return path


def _looks_local(path: str) -> bool:
    """Whether ``path`` names a local file (hub names look like ``owner/name``)."""
    return path.startswith(("/", "./", "../", "~")) or Path(path).suffix in LOCAL_SUFFIXES


# Checks before loading ----------------------------------------------------------------------

SNIFF_BYTES = 1 << 16  # what is read of each local file to tell text from binary
SNIFF_FILES = 64  # files of a directory that are sniffed (sorted order, the first ones)
HUB_PROBE_TIMEOUT_S = 3.0


def local_files(local: Path) -> list[Path]:
    """The data files ``data.path`` names: itself, or the data files under a directory."""
    if local.is_dir():
        return sorted(p for p in local.rglob("*") if p.suffix in LOCAL_SUFFIXES)
    return [local]


def files_of_one_kind(local: Path) -> tuple[list[Path], str]:
    """``data.path``'s files and their one loader (text, json or parquet), else a DataError:
    one dataset is built by one loader, so mixed kinds cannot load together."""
    files = local_files(local)
    if not files:
        raise DataError(
            f"data.path {local} holds no .txt/.jsonl/.json/.parquet files; add some or fix the path"
        )
    kinds = {LOCAL_SUFFIXES.get(p.suffix) for p in files}
    if len(kinds) != 1 or None in kinds:
        raise DataError(
            f"data.path {local}: files must all be one kind, .txt, .jsonl/.json or .parquet "
            f"(found {', '.join(sorted({p.suffix or p.name for p in files}))}); keep one kind"
        )
    return files, kinds.pop()


def check_source(config: DataConfig) -> None:
    """Refuse in one line, before anything is loaded, a text source that cannot work: a
    missing path, a file that is not UTF-8 text (or not Parquet), a text field that the
    first record lacks, or a hub name that is neither cached nor reachable."""
    if config.tokenizer == "bpe" and importlib.util.find_spec("tokenizers") is None:
        raise DataError("data.tokenizer bpe needs the tokenizers package: pip install tokenizers")
    if config.path is None:
        return  # the embedded corpus, built from the standard library's sources
    local = Path(config.path).expanduser()
    if not local.exists():
        if _looks_local(config.path):
            raise DataError(
                f"data.path {config.path} does not exist; point it at a file or directory, or "
                "unset it for the embedded corpus"
            )
        check_hub_name(config.path)
        return
    files, _ = files_of_one_kind(local)
    blank = True
    for file in files[:SNIFF_FILES]:
        if file.suffix == ".parquet":
            _check_parquet(file, config)
            blank = False
        else:
            blank = _check_text(file, config) and blank
    if blank and len(files) <= SNIFF_FILES:
        raise DataError(
            f"data.path {config.path} is empty: no non-blank '{config.text_field}' values"
        )


def _check_text(file: Path, config: DataConfig) -> bool:
    """Refuse a text or JSON file that is binary, not UTF-8, or (JSON lines) whose first
    record is not an object with the text field; returns whether the file is blank."""
    with file.open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
        complete = len(head) < SNIFF_BYTES or not handle.read(1)
    if complete and not head.strip():
        return True
    if b"\x00" in head:
        raise DataError(
            f"data.path {file} is binary, not text (a NUL byte at offset {head.index(0)}; "
            "UTF-16 text looks the same); point data.path at UTF-8 text"
        )
    try:
        # A multi-byte character cut by the sniff window is not an error: final only at EOF.
        import codecs

        codecs.getincrementaldecoder("utf-8")().decode(head, final=complete)
    except UnicodeDecodeError as err:
        raise DataError(
            f"data.path {file} is not UTF-8 text (byte 0x{head[err.start]:02x} at offset "
            f"{err.start}); convert it, e.g. iconv -f latin1 -t utf-8 {file.name} > utf8/{file.name}"
        ) from None
    if file.suffix == ".jsonl":
        first = head.split(b"\n", 1)[0].strip()
        if first and (complete or b"\n" in head):
            try:
                record = json.loads(first)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"data.path {file}: line 1 is not JSON ({err.msg} at column {err.colno}); "
                    "write one JSON object per line"
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"data.path {file}: line 1 is a JSON {type(record).__name__}, not an "
                    f'object; write one object per line, e.g. {{"{config.text_field}": "..."}}'
                )
            if config.text_field not in record:
                raise DataError(
                    f"data.text_field '{config.text_field}' is not a key of {file}'s first "
                    f"record (keys: {', '.join(record) or 'none'}); set data.text_field"
                )
    return False


def _check_parquet(file: Path, config: DataConfig) -> None:
    with file.open("rb") as handle:
        start = handle.read(4)
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(size - 4, 0))
        end = handle.read(4)
    if size < 12 or start != b"PAR1" or end != b"PAR1":
        raise DataError(
            f"data.path {file} is not a Parquet file (no PAR1 marker at its start and end); "
            "fix or replace the file, or give it the suffix of what it holds"
        )
    try:
        import pyarrow.parquet as pq

        columns = pq.read_schema(file).names
    except ImportError:
        return
    except Exception as err:  # noqa: BLE001 - pyarrow's errors vary; report one line
        raise DataError(
            f"data.path {file} is a damaged Parquet file ({first_line(err)}); fix or replace it"
        ) from None
    if config.text_field not in columns:
        raise DataError(
            f"data.text_field '{config.text_field}' is not a column of {file} "
            f"(columns: {', '.join(columns)}); set data.text_field"
        )


def hub_cache_dirs(name: str) -> list[Path]:
    """Where Hugging Face keeps a hub dataset it has downloaded (hub files, prepared data),
    from the same environment variables ``huggingface_hub`` and ``datasets`` read."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    hub = Path(
        os.environ.get("HF_HUB_CACHE", os.environ.get("HUGGINGFACE_HUB_CACHE", home / "hub"))
    )
    prepared = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets"))
    return [hub / f"datasets--{name.replace('/', '--')}", prepared / name.replace("/", "___")]


def _offline() -> bool:
    return any(
        os.environ.get(key, "").lower() in ("1", "true", "yes", "on")
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_reachable() -> bool:
    """Whether the hub endpoint answers a TCP connect within a few seconds (one try, no
    retries); behind a proxy the answer is assumed yes (the proxy decides)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def check_hub_name(name: str) -> None:
    """A hub dataset loads from the local cache, or from a hub that answers; anything else
    fails now, in one line, instead of after the hub client's retries. A cached dataset with
    the hub unreachable is loaded offline (the environment of this process says so)."""
    cached = any(path.exists() for path in hub_cache_dirs(name))
    if cached:
        if not _offline() and not hub_reachable():
            os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        return
    if _offline():
        raise DataError(
            f"data.path '{name}' is neither a local file or directory nor a cached hub dataset "
            "(HF_HUB_OFFLINE is set); fix the path, or download the dataset first"
        )
    if not hub_reachable():
        raise DataError(
            f"data.path '{name}' is neither a local file or directory nor a cached hub dataset, "
            "and the Hugging Face hub cannot be reached; fix the path, or download the dataset "
            "where there is network"
        )


def sequence_bound(config: DataConfig, mode: str) -> int | None:
    """At most how many sequences the data can make, from file sizes (None if unknown):
    every token covers at least one byte of text, and an end-of-document token is more
    than paid for by the file's own separators, except for .txt files (one document each)."""
    if config.path is None:
        cached = CACHE_DIR / (
            f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{config.corpus_max_bytes}.jsonl"
        )
        files = [cached] if cached.is_file() else []
        if not files:
            return None
    else:
        local = Path(config.path).expanduser()
        if not local.exists():
            return None
        files = local_files(local)
        if not files or any(f.suffix == ".parquet" for f in files):
            return None  # compressed: its size bounds nothing
    tokens = sum(f.stat().st_size + (f.suffix == ".txt") for f in files)
    if mode == "classify":  # one row per document; a document is at least one byte
        return tokens
    window = config.seq_len + 1 if mode == "causal_lm" else config.seq_len
    return tokens // window


def check_batch_fits(config: DataConfig, mode: str, micro_batch: int, dp_size: int) -> None:
    """Refuse a micro batch the validation split can never fill, from the files' sizes."""
    bound = sequence_bound(config, mode)
    if bound is None:
        return
    source = config.path or "the embedded corpus"
    if bound < 2:  # a train and a validation sequence at the least (build_data's own rule)
        raise DataError(
            f"data.path {source} is too small for 2 sequences of data.seq_len={config.seq_len} "
            f"(at most {bound} by its size); add text or lower data.seq_len"
        )
    num_val = max(1, math.ceil(config.val_fraction * bound))
    if micro_batch * dp_size > num_val:
        raise DataError(
            f"train.micro_batch ({micro_batch}) x {dp_size} data-parallel rank(s) is more than "
            f"the validation split can hold: {source} makes at most {bound} sequences of "
            f"data.seq_len {config.seq_len}, {num_val} of them for validation "
            f"(data.val_fraction {config.val_fraction}); set train.micro_batch <= "
            f"{max(num_val // dp_size, 1)}"
        )


def load_records(config: DataConfig) -> tuple[list[str], list[int] | None]:
    """Texts (and integer labels when data.label_field is set) in a deterministic order."""
    path = str(default_corpus(config.corpus_max_bytes)) if config.path is None else config.path
    local = Path(path).expanduser()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets

    datasets.disable_progress_bars()
    if local.exists():
        files, builder = files_of_one_kind(local)
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        # A bad file deep inside (past what check_source reads) is reported here in one
        # line; the loader's own error log would only repeat it.
        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
        try:
            dataset = datasets.load_dataset(
                builder, data_files=[str(p) for p in files], split="train", **kwargs
            )
        except Exception as err:  # noqa: BLE001 - the readers' errors vary: name the path
            cause = err.__cause__ or err.__context__ or err
            raise DataError(
                f"data.path {local} could not be read as {builder} ({type(cause).__name__}: "
                f"{first_line(cause)}); check that every file is UTF-8 text, JSON lines or "
                "Parquet as its suffix says"
            ) from None
        finally:
            datasets.logging.set_verbosity(verbosity)
    elif _looks_local(path):
        raise DataError(
            f"data.path {path} does not exist; point it at a file or directory, or unset it for the embedded corpus"
        )
    else:
        try:
            dataset = datasets.load_dataset(path, config.name, split=config.split)
        except Exception as err:  # noqa: BLE001 - hub/network errors vary; report one line
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(
                f"data.path '{path}' could not be loaded from the hub ({first}); check the name or use a local file"
            ) from None
    if config.text_field not in dataset.column_names:
        raise DataError(
            f"data.text_field '{config.text_field}' is not a column of {path} "
            f"(columns: {', '.join(dataset.column_names)})"
        )
    texts = [t for t in dataset[config.text_field]]
    labels = None
    if config.label_field is not None:
        if config.label_field not in dataset.column_names:
            raise DataError(f"data.label_field '{config.label_field}' is not a column of {path}")
        labels = [int(v) for v in dataset[config.label_field]]
    if not any(t and t.strip() for t in texts):
        raise DataError(f"data.path {path} is empty: no non-blank '{config.text_field}' values")
    return texts, labels


# Packing and splitting ---------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Rows of one split: tokens int64 [N, L or L+1]; mask bool [N, L] or None; labels [N]."""

    tokens: torch.Tensor
    padding_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]


@dataclass(frozen=True)
class Data:
    """Tokenized, packed and split data plus the tokenizer that made it."""

    train: Split
    val: Split
    tokenizer: ByteTokenizer | BPETokenizer | None  # None for images (launch/images.py)
    num_documents: int


def build_data(config: DataConfig, mode: str, run_dir: Path | None = None) -> Data:
    """Load, tokenize, pack (LM modes) or pad (classify), and split into train/validation."""
    texts, labels = load_records(config)
    if config.tokenizer == "bpe":
        tokenizer: ByteTokenizer | BPETokenizer = BPETokenizer.train_or_load(
            texts, config.bpe_vocab_size, run_dir
        )
    else:
        tokenizer = ByteTokenizer()
    if mode == "classify":
        rows, mask = _pad_documents(texts, tokenizer, config.seq_len)
        all_rows = Split(rows, mask, torch.tensor(labels, dtype=torch.int64))
    else:
        window = config.seq_len + 1 if mode == "causal_lm" else config.seq_len
        all_rows = Split(_pack(texts, tokenizer, window))
    if len(all_rows) < 2:
        raise DataError(
            f"data has {len(all_rows)} sequence(s) of data.seq_len={config.seq_len}; "
            "add text or lower data.seq_len"
        )
    order = torch.from_numpy(np.random.default_rng(config.split_seed).permutation(len(all_rows)))
    num_val = max(1, math.ceil(config.val_fraction * len(all_rows)))
    return Data(
        train=_take(all_rows, order[num_val:]),
        val=_take(all_rows, order[:num_val]),
        tokenizer=tokenizer,
        num_documents=len(texts),
    )


def _pack(texts: list[str], tokenizer: Any, window: int) -> torch.Tensor:
    pieces = []
    eos = np.asarray([tokenizer.eos_id], dtype=np.int32)
    for text in texts:
        if text:
            pieces.append(tokenizer.encode(text))
            pieces.append(eos)
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    count = len(stream) // window
    return torch.from_numpy(stream[: count * window].astype(np.int64).reshape(count, window))


def _pad_documents(
    texts: list[str], tokenizer: Any, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.full((len(texts), length), tokenizer.pad_id, dtype=torch.int64)
    for i, text in enumerate(texts):
        ids = np.concatenate([[tokenizer.cls_id], tokenizer.encode(text or "")])[:length]
        rows[i, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
    return rows, rows != tokenizer.pad_id


def _take(split: Split, index: torch.Tensor) -> Split:
    return Split(
        tokens=split.tokens[index],
        padding_mask=None if split.padding_mask is None else split.padding_mask[index],
        labels=None if split.labels is None else split.labels[index],
    )


# Sampling ----------------------------------------------------------------------------------


class BatchSampler:
    """Deterministic global batches: the position in the data is the step number alone."""

    def __init__(
        self, split: Split, micro_batch: int, grad_accum: int, dp_size: int, dp_rank: int, seed: int
    ) -> None:
        self.split, self.micro_batch, self.grad_accum = split, micro_batch, grad_accum
        self.dp_size, self.dp_rank, self.seed = dp_size, dp_rank, seed
        self.global_batch = micro_batch * grad_accum * dp_size
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.int64)

    def _indices(self, start: int, count: int) -> torch.Tensor:
        size = len(self.split)
        out = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, size)
            if epoch != self._epoch:
                perm = np.random.default_rng([self.seed, epoch]).permutation(size)
                self._epoch, self._order = epoch, torch.from_numpy(perm)
            out.append(self._order[offset])
        return torch.stack(out)

    def micro_batch_indices(self, step: int, accum_index: int) -> torch.Tensor:
        """Row indices [B] this rank uses at global step ``step`` (0-based), micro step ``accum_index``."""
        first = (
            step * self.global_batch
            + (accum_index * self.dp_size + self.dp_rank) * self.micro_batch
        )
        return self._indices(first, self.micro_batch)

    def rows(self, step: int, accum_index: int) -> Split:
        """This rank's rows for one micro step."""
        return _take(self.split, self.micro_batch_indices(step, accum_index))


def check_loaded_batches(
    data: Data, micro_batch: int, num_eval_batches: int, dp_size: int
) -> str | None:
    """Refuse a micro batch the loaded validation split cannot fill; returns a warning line
    when ``train.eval_batches`` asks for more batches than the split holds (they are capped)."""
    per_batch = micro_batch * dp_size
    available = len(data.val) // per_batch
    if available == 0:
        raise DataError(
            f"train.micro_batch ({micro_batch}) x {dp_size} data-parallel rank(s) = {per_batch} "
            f"sequences is more than the validation split's {len(data.val)} (of {len(data.train) + len(data.val)}); "
            f"set train.micro_batch <= {max(len(data.val) // dp_size, 1)} or add data"
        )
    if num_eval_batches > available:
        return (
            f"train.eval_batches ({num_eval_batches}) is more than the {available} batch(es) of "
            f"train.micro_batch x ranks = {per_batch} sequences the validation split holds "
            f"({len(data.val)} sequences); evaluating on {available}"
        )
    return None


def eval_batches(
    split: Split, micro_batch: int, num_batches: int, dp_size: int, dp_rank: int
) -> list[Split]:
    """The fixed validation micro batches of this rank (the first rows of the val split)."""
    batches = []
    for j in range(num_batches):
        first = (j * dp_size + dp_rank) * micro_batch
        if (j * dp_size + dp_size) * micro_batch > len(split):
            break
        batches.append(_take(split, torch.arange(first, first + micro_batch)))
    if not batches:
        raise DataError(
            f"the validation split has {len(split)} sequences, fewer than one batch of "
            f"train.micro_batch x ranks = {micro_batch * dp_size}; raise data.val_fraction"
        )
    return batches


def mask_for_mlm(
    tokens: torch.Tensor, tokenizer: Any, probability: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ``probability`` of tokens [B, L]: returns (inputs, targets with -100)."""
    chosen = torch.rand(tokens.shape, generator=generator) < probability
    targets = torch.where(chosen, tokens, torch.full_like(tokens, -100))
    roll = torch.rand(tokens.shape, generator=generator)
    random_ids = torch.randint(0, 256, tokens.shape, generator=generator)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(tokens, tokenizer.mask_id), tokens)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
    return inputs, targets
