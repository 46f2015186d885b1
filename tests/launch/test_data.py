"""Data: sources (local files, embedded corpus), tokenizers, packing, split, DP sharding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import launch.data as data_module
from launch.data import (
    BatchSampler,
    ByteTokenizer,
    DataConfig,
    DataError,
    Split,
    build_data,
    eval_batches,
    load_records,
    mask_for_mlm,
)

DOCS = [f"def f{i}(x):\n    return x * {i} + {'y' * (i % 7)}\n" for i in range(60)]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        "".join(json.dumps({"text": t, "label": i % 3}) + "\n" for i, t in enumerate(DOCS))
    )
    return path


def test_byte_tokenizer_and_packing_keep_every_byte_in_order(jsonl):
    data = build_data(DataConfig(path=str(jsonl), seq_len=15, val_fraction=0.1), "causal_lm")
    tok = data.tokenizer
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 260 and tok.eos_id == 257
    stream = np.concatenate([np.concatenate([tok.encode(t), [tok.eos_id]]) for t in DOCS])
    rows = torch.cat([data.train.tokens, data.val.tokens])
    assert rows.shape[1] == 16  # seq_len + 1: inputs and shifted targets
    windows = sorted(stream[: len(stream) // 16 * 16].reshape(-1, 16).tolist())
    assert sorted(rows.tolist()) == windows
    assert len(data.val) == int(np.ceil(0.1 * len(rows)))


def test_local_formats_and_directories_load_the_same_documents(tmp_path, jsonl):
    (tmp_path / "txt").mkdir()
    for i, text in enumerate(DOCS[:5]):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(text)
    texts, _ = load_records(DataConfig(path=str(tmp_path / "txt")))
    assert texts == DOCS[:5]  # one document per file, sorted by name
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": DOCS[:4]}), tmp_path / "d.parquet")
    assert (
        load_records(DataConfig(path=str(tmp_path / "d.parquet"), text_field="body"))[0] == DOCS[:4]
    )
    texts, labels = load_records(DataConfig(path=str(jsonl), label_field="label"))
    assert texts == DOCS and labels == [i % 3 for i in range(60)]


def test_data_errors_name_the_field_and_fix(tmp_path, jsonl):
    with pytest.raises(
        DataError, match=r"^data\.path /no/such/corpus\.txt does not exist; point it at a file"
    ):
        load_records(DataConfig(path="/no/such/corpus.txt"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(
        DataError, match=r"^data\.path .*empty\.jsonl is empty: no non-blank 'text' values$"
    ):
        load_records(DataConfig(path=str(empty)))
    with pytest.raises(
        DataError, match=r"^data\.text_field 'body' is not a column of .* \(columns: text, label\)$"
    ):
        load_records(DataConfig(path=str(jsonl), text_field="body"))
    with pytest.raises(DataError, match=r"^data has 0 sequence\(s\) of data\.seq_len=4096"):
        build_data(DataConfig(path=str(jsonl), seq_len=4096), "causal_lm")


def test_two_ranks_see_exactly_the_global_batch_of_one_rank(jsonl):
    data = build_data(DataConfig(path=str(jsonl), seq_len=7), "causal_lm")
    one = BatchSampler(data.train, micro_batch=4, grad_accum=1, dp_size=1, dp_rank=0, seed=3)
    two = [
        BatchSampler(data.train, micro_batch=2, grad_accum=1, dp_size=2, dp_rank=r, seed=3)
        for r in range(2)
    ]
    for step in range(2 * len(data.train) // 4 + 3):  # crosses epoch boundaries
        whole = one.micro_batch_indices(step, 0)
        assert torch.equal(torch.cat([s.micro_batch_indices(step, 0) for s in two]), whole)
    accum = BatchSampler(data.train, micro_batch=2, grad_accum=2, dp_size=1, dp_rank=0, seed=3)
    assert torch.equal(
        torch.cat([accum.micro_batch_indices(5, a) for a in range(2)]),
        one.micro_batch_indices(5, 0),
    )
    epoch = torch.cat([one.micro_batch_indices(s, 0) for s in range(len(data.train) // 4)])
    assert len(set(epoch.tolist())) == len(epoch)  # no repeats within an epoch
    other_seed = BatchSampler(data.train, 4, 1, 1, 0, seed=4)
    assert not torch.equal(other_seed.micro_batch_indices(0, 0), one.micro_batch_indices(0, 0))


def test_eval_batches_are_disjoint_across_ranks():
    split = Split(torch.arange(40).reshape(20, 2))
    ranks = [eval_batches(split, 3, 10, 2, r) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    rows = torch.cat([b.tokens for r in ranks for b in r])
    assert len(set(rows[:, 0].tolist())) == 18
    with pytest.raises(DataError, match="raise data.val_fraction"):
        eval_batches(Split(torch.zeros(3, 2)), 2, 1, 2, 0)


def test_classify_rows_are_padded_with_cls_first_and_labels(jsonl):
    data = build_data(DataConfig(path=str(jsonl), seq_len=24, label_field="label"), "classify")
    tok = data.tokenizer
    rows = torch.cat([data.train.tokens, data.val.tokens])
    mask = torch.cat([data.train.padding_mask, data.val.padding_mask])
    assert (rows[:, 0] == tok.cls_id).all() and torch.equal(mask, rows != tok.pad_id)
    assert sorted(torch.cat([data.train.labels, data.val.labels]).tolist()) == sorted(
        i % 3 for i in range(60)
    )


def test_mlm_masking_rate_and_targets():
    tokens = torch.randint(0, 256, (64, 64))
    inputs, targets = mask_for_mlm(tokens, ByteTokenizer(), 0.15, torch.Generator().manual_seed(0))
    chosen = targets != -100
    assert abs(chosen.float().mean().item() - 0.15) < 0.02
    assert torch.equal(targets[chosen], tokens[chosen]) and torch.equal(
        inputs[~chosen], tokens[~chosen]
    )
    assert abs((inputs[chosen] == 258).float().mean().item() - 0.8) < 0.05


def test_bpe_is_trained_saved_and_reloaded(tmp_path, jsonl):
    pytest.importorskip("tokenizers")
    config = DataConfig(path=str(jsonl), tokenizer="bpe", bpe_vocab_size=300, seq_len=8)
    first = build_data(config, "causal_lm", tmp_path)
    first.tokenizer.save(tmp_path)
    again = build_data(config, "causal_lm", tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and first.tokenizer.vocab_size <= 300
    assert torch.equal(first.train.tokens, again.train.tokens)
    text = DOCS[3]
    ids = first.tokenizer.encode(text)
    assert len(ids) < len(text.encode()) and first.tokenizer.token_bytes[ids].sum() == len(
        text.encode()
    )


def test_embedded_corpus_is_built_from_stdlib_sources_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "CACHE_DIR", tmp_path)
    path = data_module.default_corpus(50_000)
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert all(r["path"].endswith(".py") for r in records)
    assert [r["path"] for r in records] == sorted(r["path"] for r in records)
    assert sum(len(r["text"].encode()) for r in records) >= 50_000
    assert data_module.default_corpus(50_000) == path and path.read_text().splitlines() == lines
