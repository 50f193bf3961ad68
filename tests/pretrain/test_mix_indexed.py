"""The streaming .bin/.idx writer against megatron-core's IndexedDatasetBuilder on the same tokens.

The mix writes every shard, merged domain and subset with pretrain.indexed.StreamingBuilder
(memory bounded); megatron-core's builder is the obviously-correct reference: the files must be
byte-identical, merges included (its `add_index` loop), and readable by its IndexedDataset.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _megatron_dataset(prefix, docs, dtype, multi=False):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        if multi and len(d) > 2:  # a document of two sequences
            b.add_item(torch.from_numpy(d[:2].astype(np.int64)))
            b.add_item(torch.from_numpy(d[2:].astype(np.int64)))
            b.end_document()
        else:
            b.add_document(torch.from_numpy(d.astype(np.int64)), [len(d)])
    b.finalize(prefix + ".idx")


def _docs(seed, n, vocab=300):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, 40))) for _ in range(n)]


def _bytes(prefix):
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_streaming_builder_writes_megatrons_bytes(tmp_path, dtype, monkeypatch):
    from pretrain import indexed

    monkeypatch.setattr(indexed, "_CHUNK", 7)  # several index chunks on a small dataset
    docs = _docs(0, 53)
    _megatron_dataset(str(tmp_path / "ref"), docs, dtype)
    b = indexed.StreamingBuilder(str(tmp_path / "ours.bin"), dtype)
    b.add_many(np.concatenate(docs[:20]), [len(d) for d in docs[:20]])
    for d in docs[20:]:
        b.add(d)
    b.finalize(str(tmp_path / "ours.idx"))
    assert _bytes(str(tmp_path / "ours")) == _bytes(str(tmp_path / "ref"))
    assert not list(tmp_path.glob("*.lens")) and not list(tmp_path.glob("*.docs"))
    # the reader agrees with megatron-core's
    from megatron.core.datasets.indexed_dataset import _IndexReader

    ref = _IndexReader(str(tmp_path / "ref.idx"), multimodal=False)
    dt, lens, ptrs, dix = indexed.read_index(str(tmp_path / "ours.idx"))
    assert dt is dtype
    np.testing.assert_array_equal(lens, ref.sequence_lengths)
    np.testing.assert_array_equal(ptrs, ref.sequence_pointers)
    np.testing.assert_array_equal(dix, ref.document_indices)


def test_empty_dataset_matches_megatron(tmp_path):
    from pretrain import indexed

    _megatron_dataset(str(tmp_path / "ref"), [], np.uint16)
    b = indexed.StreamingBuilder(str(tmp_path / "ours.bin"), np.uint16)
    b.finalize(str(tmp_path / "ours.idx"))
    assert _bytes(str(tmp_path / "ours")) == _bytes(str(tmp_path / "ref"))


def test_merge_matches_megatron_add_index(tmp_path, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, _IndexReader

    from pretrain import indexed

    monkeypatch.setattr(indexed, "_CHUNK", 5)
    parts = []
    for k, n in enumerate([12, 0, 31, 1, 9]):  # an empty part is skipped by both
        p = str(tmp_path / f"part{k}")
        _megatron_dataset(p, _docs(k + 1, n), np.uint16, multi=(k == 2))
        parts.append(p)
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for p in parts:
        if len(_IndexReader(p + ".idx", multimodal=False).sequence_lengths):
            ref.add_index(p)
    ref.finalize(str(tmp_path / "ref.idx"))
    docs, tokens = indexed.merge(parts, str(tmp_path / "merged"))
    assert _bytes(str(tmp_path / "merged")) == _bytes(str(tmp_path / "ref"))
    assert (docs, tokens) == indexed.dataset_tokens(str(tmp_path / "merged"))
    assert docs == 12 + 31 + 1 + 9
    with pytest.raises(ValueError, match="nothing to merge"):
        indexed.merge([parts[1]], str(tmp_path / "none"))


def test_write_documents_matches_megatron_per_split(tmp_path, tiny_tokenizer):
    """A shard written by the vectorised writer holds exactly what the per-document loop of the
    previous writer (megatron-core's builder, EOD appended, empties skipped) held."""
    from pretrain import indexed

    texts = [("a:0", "alpha beta gamma"), ("a:1", ""), ("a:2", "the quick brown fox"), ("a:3", "x"),
             ("a:4", "retrieval heads copy tokens")] + [(f"b:{i}", "word " * (i % 9 + 1)) for i in range(40)]
    enc = lambda ts: tiny_tokenizer(ts, add_special_tokens=False)["input_ids"]  # noqa: E731
    eod = tiny_tokenizer.eos_token_id
    r = indexed.write_documents(str(tmp_path / "s"), texts, enc, eod, len(tiny_tokenizer), 0.3)
    ids = enc([t for _, t in texts])
    ref = {"train": [], "valid": []}
    for (d, _), t in zip(texts, ids):
        if t:
            ref["valid" if indexed.is_validation(d, 0.3) else "train"].append(np.array(t + [eod]))
    _megatron_dataset(str(tmp_path / "rt"), ref["train"], np.uint16)
    _megatron_dataset(str(tmp_path / "rv"), ref["valid"], np.uint16)
    assert _bytes(str(tmp_path / "s")) == _bytes(str(tmp_path / "rt"))
    assert _bytes(str(tmp_path / "s.valid")) == _bytes(str(tmp_path / "rv"))
    assert r.skipped_empty == 1 and r.docs == len(ref["train"]) and r.valid_docs == len(ref["valid"]) > 0
