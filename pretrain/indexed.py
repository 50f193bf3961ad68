"""Tokenised data: documents -> Megatron indexed datasets (.bin/.idx), and subsets by copying.

Layout under a folder (normally `<run>/mix/`):

    corpus/<domain>/shard-00000.{bin,idx}        training documents of one shard, EOD appended
    corpus/<domain>/shard-00000.valid.{bin,idx}  held-out documents of that shard (never trained on)
    corpus/<domain>/shard-00000.docs.parquet     doc_id, split, index, n_tokens: where each doc lives
    corpus/<domain>/shard-00000.done             completion marker (a re-run skips the shard)

Why shards: tokenising 241B tokens is the slow part; shards of `shard_docs` documents are
independent units for a process pool (and for several workers, via attninf.dist.rank_world), are
written under temporary names and renamed, and a killed run resumes at the first missing shard.
Megatron blends any number of prefixes, so shards never need merging for training.

Why copying for subsets: the selected documents (AttentionInfluence top 20%, controls) become their
own dataset by copying their token ranges out of the corpus shards (`copy_documents`), so the
treated arm sees byte-identical tokens to the baseline corpus and nothing is tokenised twice.

The held-out split is decided per document by a hash of its doc_id (`is_validation`), so it is
stable under any corpus order or sharding, and the same documents are held out for every arm.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

DOC_TABLE_COLUMNS = ("doc_id", "split", "index", "n_tokens")


def is_validation(doc_id: str, fraction: float) -> bool:
    """Stable held-out assignment: first 8 bytes of sha1(doc_id) as a uniform number in [0, 1)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def token_dtype(vocab_size: int):
    # Megatron stores uint16 for vocabularies < 65,500 (half the disk of int32); same rule here.
    return np.uint16 if vocab_size < 65500 else np.int32


@dataclass
class ShardResult:
    prefix: str  # training prefix (no extension)
    valid_prefix: str
    docs: int
    tokens: int
    valid_docs: int
    valid_tokens: int
    skipped_empty: int


def shard_done(prefix: str) -> bool:
    return os.path.exists(prefix + ".done")


def write_shard(prefix: str, docs: Sequence[tuple[str, str]], encode: Callable[[list[str]], list[list[int]]],
                eod: int, vocab_size: int, valid_fraction: float) -> ShardResult:
    """Tokenise `docs` [(doc_id, text)] into `<prefix>` (train) and `<prefix>.valid` (held out).

    Written under temporary names and renamed at the end; `<prefix>.done` marks completion.
    Empty documents (no tokens) are counted and skipped: they would only add lone EOD tokens.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = token_dtype(vocab_size)
    tmp = f"{prefix}.tmp{os.getpid()}"
    builders = {"train": IndexedDatasetBuilder(tmp + ".bin", dtype=dtype),
                "valid": IndexedDatasetBuilder(tmp + ".valid.bin", dtype=dtype)}
    counts = {"train": 0, "valid": 0}
    toks = {"train": 0, "valid": 0}
    rows = {k: [] for k in DOC_TABLE_COLUMNS}
    skipped = 0
    ids = encode([t for _, t in docs])
    for (doc_id, _), tokens in zip(docs, ids):
        if not tokens:
            skipped += 1
            continue
        arr = np.asarray(list(tokens) + [eod], dtype=dtype)
        split = "valid" if is_validation(doc_id, valid_fraction) else "train"
        builders[split].add_document(torch.from_numpy(arr.astype(np.int64)), [arr.size])
        rows["doc_id"].append(doc_id)
        rows["split"].append(split)
        rows["index"].append(counts[split])
        rows["n_tokens"].append(int(arr.size))
        counts[split] += 1
        toks[split] += int(arr.size)
    builders["train"].finalize(tmp + ".idx")
    builders["valid"].finalize(tmp + ".valid.idx")
    pq.write_table(pa.table({"doc_id": pa.array(rows["doc_id"], pa.string()),
                             "split": pa.array(rows["split"], pa.string()),
                             "index": pa.array(rows["index"], pa.int64()),
                             "n_tokens": pa.array(rows["n_tokens"], pa.int64())}),
                   tmp + ".docs.parquet")
    for src, dst in [(tmp + ".bin", prefix + ".bin"), (tmp + ".idx", prefix + ".idx"),
                     (tmp + ".valid.bin", prefix + ".valid.bin"),
                     (tmp + ".valid.idx", prefix + ".valid.idx"),
                     (tmp + ".docs.parquet", prefix + ".docs.parquet")]:
        os.replace(src, dst)
    Path(prefix + ".done").write_text(f"{counts['train']} {toks['train']} {counts['valid']} "
                                      f"{toks['valid']} {skipped}\n")
    return ShardResult(prefix, prefix + ".valid", counts["train"], toks["train"], counts["valid"],
                       toks["valid"], skipped)


def read_shard_result(prefix: str) -> ShardResult:
    d, t, vd, vt, s = (int(x) for x in Path(prefix + ".done").read_text().split())
    return ShardResult(prefix, prefix + ".valid", d, t, vd, vt, s)


# --- process-pool tokenisation -------------------------------------------------------------------

_WORKER_TOK = None


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOK
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    _WORKER_TOK = AutoTokenizer.from_pretrained(tokenizer_dir)


def _encode(texts: list[str]) -> list[list[int]]:
    return _WORKER_TOK(texts, add_special_tokens=False)["input_ids"]


def _shard_job(args) -> ShardResult:
    prefix, docs, eod, vocab, frac = args
    return write_shard(prefix, docs, _encode, eod, vocab, frac)


def chunk_documents(docs: Iterable, shard_docs: int) -> Iterator[tuple[str, int, list[tuple[str, str]]]]:
    """Group a deterministic document stream into (domain, shard_no, [(doc_id, text)]) shards.

    Shards never mix domains (domains are blended separately); each domain numbers its own shards.
    """
    open_: dict[str, list[tuple[str, str]]] = {}
    n: dict[str, int] = {}
    for d in docs:
        buf = open_.setdefault(d.domain, [])
        buf.append((d.doc_id, d.text))
        if len(buf) >= shard_docs:
            yield d.domain, n.get(d.domain, 0), buf
            n[d.domain] = n.get(d.domain, 0) + 1
            open_[d.domain] = []
    for dom, buf in open_.items():
        if buf:
            yield dom, n.get(dom, 0), buf
            n[dom] = n.get(dom, 0) + 1


def safe_name(domain: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in domain) or "_"


def tokenize_corpus(docs: Iterable, out_dir: Path, tokenizer_dir: str, eod: int, vocab_size: int, *,
                    shard_docs: int = 2000, valid_fraction: float = 0.02, workers: int = 1,
                    rank: int = 0, world: int = 1, progress=None) -> list[ShardResult]:
    """Tokenise a document stream into sharded indexed datasets under `out_dir/<domain>/`.

    `docs` yields objects with doc_id, domain, text (selection.corpora.Document). Shards already
    marked done are skipped (their documents are still read from the stream, which is cheap next
    to tokenising). With world > 1 this worker only writes shards with number % world == rank.
    Returns the results of every shard this worker owns (finished earlier or now).
    """
    import multiprocessing as mp

    out_dir = Path(out_dir)
    results: list[ShardResult] = []
    todo = []

    def jobs():
        for i, (dom, k, buf) in enumerate(chunk_documents(docs, shard_docs)):
            prefix = str(out_dir / safe_name(dom) / f"shard-{k:05d}")
            if i % world != rank:
                continue
            if shard_done(prefix):
                results.append(read_shard_result(prefix))
                if progress is not None:
                    progress.update(len(buf), tokens=results[-1].tokens + results[-1].valid_tokens)
                continue
            Path(prefix).parent.mkdir(parents=True, exist_ok=True)
            todo.append(prefix)
            yield (prefix, buf, eod, vocab_size, valid_fraction)

    if workers <= 1:
        _init_worker(tokenizer_dir)
        it = map(_shard_job, jobs())
        for r in it:
            results.append(r)
            if progress is not None:
                progress.update(r.docs + r.valid_docs + r.skipped_empty, tokens=r.tokens + r.valid_tokens)
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_dir,)) as pool:
            for r in pool.imap(_shard_job, jobs()):
                results.append(r)
                if progress is not None:
                    progress.update(r.docs + r.valid_docs + r.skipped_empty, tokens=r.tokens + r.valid_tokens)
    return sorted(results, key=lambda r: r.prefix)


def load_doc_tables(shard_prefixes: Iterable[str]):
    """One table over shards: doc_id, split, index, n_tokens, prefix (where the doc's tokens are)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for p in shard_prefixes:
        t = pq.read_table(p + ".docs.parquet")
        tables.append(t.append_column("prefix", pa.array([p] * t.num_rows, pa.string())))
    if not tables:
        return pa.table({k: [] for k in (*DOC_TABLE_COLUMNS, "prefix")})
    return pa.concat_tables(tables)


def copy_documents(locations: Sequence[tuple[str, int]], out_prefix: str) -> tuple[int, int]:
    """Write a new indexed dataset holding the given (prefix, index) documents, in that order.

    Token ranges are copied verbatim (no re-tokenisation). Returns (documents, tokens).
    """
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    cache: dict[str, IndexedDataset] = {}
    dtype = None
    tmp = f"{out_prefix}.tmp{os.getpid()}"
    builder = None
    n_tok = 0
    for prefix, idx in locations:
        ds = cache.get(prefix)
        if ds is None:
            ds = cache[prefix] = IndexedDataset(prefix, mmap=True)
        if builder is None:
            dtype = ds.index.dtype
            builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
        arr = ds[int(idx)]
        builder.add_document(torch.from_numpy(np.asarray(arr).astype(np.int64)), [len(arr)])
        n_tok += len(arr)
    if builder is None:
        raise ValueError(f"copy_documents: no documents to write to {out_prefix}")
    builder.finalize(tmp + ".idx")
    os.replace(tmp + ".bin", out_prefix + ".bin")
    os.replace(tmp + ".idx", out_prefix + ".idx")
    return len(locations), n_tok


def merge(prefixes: Sequence[str], out_prefix: str) -> None:
    """Concatenate indexed datasets (e.g. the held-out parts of all shards of a domain)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, _IndexReader

    prefixes = [p for p in prefixes if len(_IndexReader(p + ".idx", multimodal=False).sequence_lengths)]
    if not prefixes:
        raise ValueError(f"merge: nothing to merge into {out_prefix}")
    dtype = _IndexReader(prefixes[0] + ".idx", multimodal=False).dtype
    tmp = f"{out_prefix}.tmp{os.getpid()}"
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    b = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    for p in prefixes:
        b.add_index(p)
    b.finalize(tmp + ".idx")
    os.replace(tmp + ".bin", out_prefix + ".bin")
    os.replace(tmp + ".idx", out_prefix + ".idx")


def dataset_tokens(prefix: str) -> tuple[int, int]:
    """(documents, tokens) of an indexed dataset, read from its index only."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    r = _IndexReader(prefix + ".idx", multimodal=False)
    return int(len(r.document_indices) - 1), int(np.asarray(r.sequence_lengths, dtype=np.int64).sum())
