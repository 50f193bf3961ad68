"""Tokenised data: documents -> Megatron indexed datasets (.bin/.idx), merged per domain.

Layout under a folder (normally `<run>/mix/`; a corpus read from files names its shards after the
parts of selection.corpus_parts, `p00017`, and keeps their markers in `parts/`):

    corpus/<domain>/shard-00000.{bin,idx}        training documents of one shard, EOD appended
    corpus/<domain>/shard-00000.valid.{bin,idx}  held-out documents of that shard (never trained on)
    corpus/<domain>/shard-00000.docs.parquet     doc_id, split, index, n_tokens: where each doc lives
    corpus/<domain>/shard-00000.done             completion marker (a re-run skips the shard)

Why shards: tokenising 241B tokens is the slow part; shards of `shard_docs` documents are
independent units for a process pool (and for several workers, via attninf.dist.rank_world), are
written under temporary names and renamed, and a killed run resumes at the first missing shard.
The mix merges the shards of each domain into one dataset (`merge`), so a blend lists
O(domains) datasets whatever the shard count (megatron-core's BlendedDataset accepts fewer than
32,767, and each dataset holds open memory maps).

Why our own index writer (`StreamingBuilder`) instead of megatron-core's IndexedDatasetBuilder:
the builder keeps every sequence length in a Python list and computes the pointers in a Python
loop, so merging a 190M-document domain (or copying a 48M-document subset) needs ~40 bytes of
memory per document. The streaming writer keeps lengths in a scratch file and writes the same
bytes (tests compare it with the builder's output, merge included) in memory bounded by a chunk.

Subsets (the selected documents) are token ranges copied out of the merged datasets
(pretrain.subsets), so the treated arm sees byte-identical tokens to the baseline corpus.

The held-out split is decided per document by a hash of its doc_id (`is_validation`), so it is
stable under any corpus order or sharding, and the same documents are held out for every arm.
"""

from __future__ import annotations

import hashlib
import itertools
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
    r = write_documents(prefix, docs, encode, eod, vocab_size, valid_fraction)
    Path(prefix + ".done").write_text(f"{r.docs} {r.tokens} {r.valid_docs} {r.valid_tokens} {r.skipped_empty}\n")
    return r


def write_documents(prefix: str, docs: Sequence[tuple[str, str]], encode: Callable[[list[str]], list[list[int]]],
                    eod: int, vocab_size: int, valid_fraction: float, batch: int = 1024) -> ShardResult:
    """write_shard without the marker: `<prefix>{.bin,.idx,.valid.bin,.valid.idx,.docs.parquet}`,
    each written under a temporary name and renamed (a killed writer leaves no partial file).

    Documents are tokenised `batch` at a time and streamed into the two writers, so memory holds
    one batch of token lists (a tokenizer returns Python ints, ~30 bytes per token), not the
    part's; only the document table (id, split, index, length) grows with the part."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dtype = token_dtype(vocab_size)
    tmp = f"{prefix}.tmp{os.getpid()}"
    names = {"train": tmp + ".bin", "valid": tmp + ".valid.bin"}
    builders = {k: StreamingBuilder(v, dtype) for k, v in names.items()}
    table = {"doc_id": [], "split": [], "index": [], "n_tokens": []}
    skipped = 0
    try:
        for a in range(0, len(docs), batch):
            chunk = docs[a:a + batch]
            ids = encode([t for _, t in chunk])
            lengths = np.fromiter((len(t) for t in ids), np.int64, len(ids))
            keep = lengths > 0
            skipped += int((~keep).sum())
            doc_ids = [d for (d, _), k in zip(chunk, keep) if k]
            n_tok = lengths[keep] + 1  # EOD appended to every document
            ends = np.cumsum(n_tok)
            flat = np.full(int(n_tok.sum()), eod, np.int64)
            body = np.ones(len(flat), bool)
            body[ends - 1] = False
            flat[body] = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum()))
            starts = ends - n_tok
            valid = np.fromiter((is_validation(d, valid_fraction) for d in doc_ids), bool, len(doc_ids))
            index = np.zeros(len(doc_ids), np.int64)
            for split, mask in (("train", ~valid), ("valid", valid)):
                sel = np.flatnonzero(mask)
                index[sel] = builders[split].n_doc + np.arange(len(sel))
                if len(sel):
                    gather = np.repeat(starts[sel] - np.concatenate(([0], np.cumsum(n_tok[sel])[:-1])), n_tok[sel]) \
                        + np.arange(int(n_tok[sel].sum()))
                    builders[split].add_many(flat[gather], n_tok[sel])
            table["doc_id"] += doc_ids  # in document order, as the reader gave them
            table["split"] += np.where(valid, "valid", "train").tolist()
            table["index"] += index.tolist()
            table["n_tokens"] += n_tok.tolist()
        for split, b in builders.items():
            b.finalize(names[split][:-4] + ".idx")
    except BaseException:
        for b in builders.values():
            b.abort()
        raise
    pq.write_table(pa.table({"doc_id": pa.array(table["doc_id"], pa.string()),
                             "split": pa.array(table["split"], pa.string()),
                             "index": pa.array(table["index"], pa.int64()),
                             "n_tokens": pa.array(table["n_tokens"], pa.int64())}),
                   tmp + ".docs.parquet")
    for ext in (".bin", ".idx", ".valid.bin", ".valid.idx", ".docs.parquet"):
        os.replace(tmp + ext, prefix + ext)
    t, v = builders["train"], builders["valid"]
    return ShardResult(prefix, prefix + ".valid", t.n_doc, t.tokens, v.n_doc, v.tokens, skipped)


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
                    rank: int = 0, world: int = 1, progress=None,
                    all_prefixes: list[str] | None = None) -> list[ShardResult]:
    """Tokenise a document stream into sharded indexed datasets under `out_dir/<domain>/`.

    `docs` yields objects with doc_id, domain, text (selection.corpora.Document). Shards already
    marked done are skipped (their documents are still read from the stream, which is cheap next
    to tokenising). With world > 1 this worker only writes shards with number % world == rank.
    Returns the results of every shard this worker owns (finished earlier or now); `all_prefixes`,
    when given, receives every shard's prefix (all workers'), so a worker can tell whether the
    whole corpus is done.
    """
    import multiprocessing as mp

    out_dir = Path(out_dir)
    results: list[ShardResult] = []
    todo = []

    def jobs():
        for i, (dom, k, buf) in enumerate(chunk_documents(docs, shard_docs)):
            prefix = str(out_dir / safe_name(dom) / f"shard-{k:05d}")
            if all_prefixes is not None:
                all_prefixes.append(prefix)
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


def dataset_tokens(prefix: str) -> tuple[int, int]:
    """(documents, tokens) of an indexed dataset, read from its index only."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    r = _IndexReader(prefix + ".idx", multimodal=False)
    return int(len(r.document_indices) - 1), int(np.asarray(r.sequence_lengths, dtype=np.int64).sum())


# --- streaming .bin/.idx writer (memory bounded, byte-identical to megatron-core's builder) ----

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
                np.float32: 7, np.uint16: 8}
_CHUNK = 1 << 20  # index entries per write: 1M entries = 8 MB of pointers


def read_index(idx_path: str, mmap: bool = True):
    """(dtype, sequence_lengths int32, sequence_pointers int64, document_indices int64) of an
    .idx file, as memory maps by default (a merged domain's index is GBs at paper size)."""
    import struct

    with open(idx_path, "rb") as fh:
        head = fh.read(34)
    if head[:9] != _INDEX_HEADER:
        raise ValueError(f"{idx_path}: not a Megatron indexed-dataset index (bad header)")
    (code,) = struct.unpack("<B", head[17:18])
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    dtype = {v: k for k, v in _DTYPE_CODES.items()}[code]
    load = (lambda off, dt, n: np.memmap(idx_path, dtype=dt, mode="r", offset=off, shape=(n,))) if mmap \
        else (lambda off, dt, n: np.fromfile(idx_path, dtype=dt, count=n, offset=off))
    lens = load(34, np.int32, n_seq) if n_seq else np.zeros(0, np.int32)
    ptrs = load(34 + 4 * n_seq, np.int64, n_seq) if n_seq else np.zeros(0, np.int64)
    docs = load(34 + 12 * n_seq, np.int64, n_doc)
    return dtype, lens, ptrs, docs


class StreamingBuilder:
    """Writes `<tmp>.bin` as documents arrive and the .idx at `finalize`, never holding the index.

    One sequence per document (what the mix writes); `add_dataset` appends a whole indexed
    dataset (any document structure), copying its .bin bytes as megatron-core's add_index does.
    Lengths and document boundaries go to scratch files next to the output and are streamed into
    the .idx in chunks, so memory does not grow with the number of documents.
    """

    def __init__(self, bin_path: str, dtype) -> None:
        self.dtype = np.dtype(dtype).type
        self.bin_path = bin_path
        self.data = open(bin_path, "wb")
        self._lens = open(bin_path + ".lens", "w+b")
        self._docs = open(bin_path + ".docs", "w+b")
        self.n_seq = 0
        self.n_doc = 0
        self.tokens = 0
        self._docs.write(np.zeros(1, np.int64).tobytes())  # document_indices start with 0

    def add(self, tokens: np.ndarray) -> None:
        self.add_many(np.asarray(tokens), np.array([len(tokens)], np.int64))

    def add_many(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Several one-sequence documents: `flat` holds them back to back, `lengths` their sizes."""
        lengths = np.asarray(lengths, np.int64)
        if int(lengths.sum()) != len(flat):
            raise ValueError(f"add_many: lengths sum to {int(lengths.sum())}, tokens {len(flat)}")
        self.data.write(np.asarray(flat, dtype=self.dtype).tobytes())
        self._lens.write(lengths.astype(np.int32).tobytes())
        self._docs.write((self.n_seq + 1 + np.arange(len(lengths), dtype=np.int64)).tobytes())
        self.n_seq += len(lengths)
        self.n_doc += len(lengths)
        self.tokens += int(lengths.sum())

    def add_dataset(self, prefix: str) -> None:
        import shutil

        dtype, lens, _, docs = read_index(prefix + ".idx")
        if dtype is not self.dtype:
            raise ValueError(f"{prefix}: token dtype {dtype.__name__}, expected {self.dtype.__name__}")
        for a in range(0, len(lens), _CHUNK):
            self._lens.write(np.asarray(lens[a:a + _CHUNK], np.int32).tobytes())
            self.tokens += int(np.asarray(lens[a:a + _CHUNK], np.int64).sum())
        for a in range(1, len(docs), _CHUNK):
            self._docs.write((np.asarray(docs[a:a + _CHUNK], np.int64) + self.n_seq).tobytes())
        self.n_seq += len(lens)
        self.n_doc += len(docs) - 1
        del lens, docs
        with open(prefix + ".bin", "rb") as fh:
            shutil.copyfileobj(fh, self.data, 16 << 20)

    def finalize(self, idx_path: str) -> None:
        import struct

        self.data.close()
        itemsize = np.dtype(self.dtype).itemsize
        with open(idx_path, "wb") as out:
            out.write(_INDEX_HEADER)
            out.write(struct.pack("<Q", 1))
            out.write(struct.pack("<B", _DTYPE_CODES[self.dtype]))
            out.write(struct.pack("<Q", self.n_seq))
            out.write(struct.pack("<Q", self.n_doc + 1))
            self._lens.flush()
            self._lens.seek(0)
            for a in range(0, self.n_seq, _CHUNK):
                out.write(self._lens.read(4 * min(_CHUNK, self.n_seq - a)))
            self._lens.seek(0)
            ptr = 0
            for a in range(0, self.n_seq, _CHUNK):
                lens = np.frombuffer(self._lens.read(4 * min(_CHUNK, self.n_seq - a)), np.int32).astype(np.int64)
                p = np.empty(len(lens), np.int64)
                p[0] = ptr
                np.cumsum(lens[:-1] * itemsize, out=p[1:])
                p[1:] += ptr
                ptr = int(p[-1] + lens[-1] * itemsize)
                out.write(p.tobytes())
            self._docs.flush()
            self._docs.seek(0)
            while chunk := self._docs.read(8 * _CHUNK):
                out.write(chunk)
        for fh in (self._lens, self._docs):
            fh.close()
            os.remove(fh.name)

    def abort(self) -> None:
        for fh in (self.data, self._lens, self._docs):
            fh.close()
            if os.path.exists(fh.name):
                os.remove(fh.name)


def merge(prefixes: Sequence[str], out_prefix: str) -> tuple[int, int]:
    """Concatenate indexed datasets in order (a domain's shards; its held-out parts).

    The same bytes as megatron-core's `IndexedDatasetBuilder.add_index` loop, with memory bounded
    by a chunk (StreamingBuilder). Empty datasets are skipped. Returns (documents, tokens)."""
    prefixes = [p for p in prefixes if len(read_index(p + ".idx")[1])]
    if not prefixes:
        raise ValueError(f"merge: nothing to merge into {out_prefix}")
    dtype = read_index(prefixes[0] + ".idx")[0]
    tmp = f"{out_prefix}.tmp{os.getpid()}"
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    b = StreamingBuilder(tmp + ".bin", dtype)
    try:
        for p in prefixes:
            b.add_dataset(p)
        b.finalize(tmp + ".idx")
    except BaseException:
        b.abort()
        raise
    os.replace(tmp + ".bin", out_prefix + ".bin")
    os.replace(tmp + ".idx", out_prefix + ".idx")
    return b.n_doc, b.tokens
