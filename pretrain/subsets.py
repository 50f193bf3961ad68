"""Selected documents copied out of the tokenised corpus: a DuckDB join, then token ranges.

A subset (the AttentionInfluence top 20%, the random control, ...) is select's rows for one
method, found in the corpus's per-shard document tables and copied as token ranges out of the
merged per-domain datasets, so the treated arm sees byte-identical tokens to the baseline corpus
and nothing is tokenised twice.

Why a join in DuckDB: at paper size the corpus has ~244M documents and the selection ~49M rows;
a Python dict from doc_id to location (what this replaced) needs ~100-150 GB. DuckDB joins the
parquet tables with a memory limit and spills to a scratch folder beyond it, and the result is
streamed back in record batches, so the process's memory is bounded by the limit plus one batch.

Order: the subset keeps select's row order (as before the join existed), so the same selection
gives the same bytes. Reads are sorted by location within each batch (monotone offsets in the
domain file), then written back in selection order. A doc_id that occurs more than once in the
corpus resolves to its last occurrence in (dataset prefix, index) order - the old dict's rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

JOIN_MEMORY = "1GB"  # DuckDB's limit for the join; it spills to `<out>/.join-tmp` beyond it
BATCH_ROWS = 65_536  # selection rows per fetched batch (and per sorted read window)


@dataclass(frozen=True)
class DocTable:
    """One shard's document table and where its documents went in the merged domain dataset."""

    path: str  # <prefix>.docs.parquet: doc_id, split, index, n_tokens
    domain: str  # folder name of the domain (merged datasets are corpus/<domain>, valid/<domain>)
    train_offset: int  # documents of this domain's earlier shards in the merged training dataset
    valid_offset: int


def locate(selected: Path, method: str, tables: list[DocTable], scratch: Path, threads: int = 2):
    """Select's rows of `method` joined with the corpus: a RecordBatchReader in selection order
    with columns r (row in selected.parquet), hits (corpus rows with that doc_id), domain, split,
    gidx (index in the merged domain dataset of that split)."""
    import duckdb
    import pyarrow as pa

    scratch.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(f"SET memory_limit='{JOIN_MEMORY}'")
    con.execute(f"SET temp_directory='{scratch}'")
    con.execute(f"SET threads={max(1, int(threads))}")
    con.execute("SET preserve_insertion_order=false")
    # tables are given in the old dict's order: the last occurrence of a doc_id wins
    parts = pa.table({"file": [t.path for t in tables], "domain": [t.domain for t in tables],
                      "train_off": pa.array([t.train_offset for t in tables], pa.int64()),
                      "valid_off": pa.array([t.valid_offset for t in tables], pa.int64()),
                      "ord": pa.array(range(len(tables)), pa.int64())})
    con.register("parts", parts)
    q = """
    WITH sel AS (
      SELECT doc_id, file_row_number AS r FROM read_parquet($sel, file_row_number=true)
      WHERE method = $method
    ), docs AS (
      SELECT d.doc_id, d.split, p.domain,
             d."index" + CASE WHEN d.split = 'train' THEN p.train_off ELSE p.valid_off END AS gidx,
             p.ord * 4294967296 + d."index" AS pos
      FROM read_parquet($files, filename=true) d JOIN parts p ON d.filename = p.file
    ), hit AS (
      SELECT sel.r, count(docs.doc_id) AS hits,
             arg_max(struct_pack(domain := docs.domain, split := docs.split, gidx := docs.gidx), docs.pos) AS loc
      FROM sel LEFT JOIN docs ON sel.doc_id = docs.doc_id
      GROUP BY sel.r
    )
    SELECT r, hits, loc.domain AS domain, loc.split AS split, loc.gidx AS gidx FROM hit ORDER BY r
    """
    files = [t.path for t in tables]
    rel = con.sql(q, params={"sel": str(selected), "method": method, "files": files})
    return con, rel.to_arrow_reader(BATCH_ROWS)


class _Domains:
    """Random access to the merged training datasets by (domain, index) with pread: the reads
    do not map the corpus into this process (its resident memory stays bounded)."""

    def __init__(self, root: Path):
        self.root = root
        self.open: dict[str, tuple[int, np.ndarray, np.ndarray, type]] = {}

    def get(self, domain: str):
        if domain not in self.open:
            from pretrain.indexed import read_index

            prefix = str(self.root / domain)
            dtype, lens, ptrs, _ = read_index(prefix + ".idx")
            self.open[domain] = (os.open(prefix + ".bin", os.O_RDONLY), lens, ptrs, dtype)
        return self.open[domain]

    def close(self):
        for fd, *_ in self.open.values():
            os.close(fd)


def extract(selected: Path, method: str, tables: list[DocTable], corpus_root: Path, out_prefix: Path,
            scratch: Path) -> dict:
    """Write subsets/<method> and return its counts: selected rows, documents and tokens copied,
    rows held out (validation documents are never trained on), missing (not in the corpus) and
    duplicated doc_ids. Raises ValueError when nothing of the selection is in the corpus."""
    from pretrain.indexed import StreamingBuilder

    con, reader = locate(selected, method, tables, scratch)
    stats = {"selected": 0, "held_out": 0, "missing": 0, "duplicate_ids": 0}
    doms = _Domains(corpus_root)
    builder = None
    tmp = f"{out_prefix}.tmp{os.getpid()}"
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        for batch in reader:
            hits = batch.column("hits").to_numpy()
            split = batch.column("split").to_pylist()
            domain = batch.column("domain").to_pylist()
            gidx = batch.column("gidx").to_numpy(zero_copy_only=False)
            stats["selected"] += len(hits)
            stats["missing"] += int((hits == 0).sum())
            stats["duplicate_ids"] += int((hits > 1).sum())
            take = [i for i in range(len(hits)) if hits[i] > 0 and split[i] == "train"]
            stats["held_out"] += sum(1 for i in range(len(hits)) if hits[i] > 0 and split[i] != "train")
            if not take:
                continue
            order = sorted(take, key=lambda i: (domain[i], gidx[i]))  # monotone offsets per file
            chunks: dict[int, bytes] = {}
            lengths: dict[int, int] = {}
            for i in order:
                fd, lens, ptrs, dtype = doms.get(domain[i])
                n = int(lens[int(gidx[i])])
                chunks[i] = os.pread(fd, n * np.dtype(dtype).itemsize, int(ptrs[int(gidx[i])]))
                lengths[i] = n
            if builder is None:
                builder = StreamingBuilder(tmp + ".bin", dtype)
            builder.add_many(np.frombuffer(b"".join(chunks[i] for i in take), dtype),
                             np.array([lengths[i] for i in take], np.int64))
        if builder is None:
            raise ValueError(f"mix: method '{method}': none of its {stats['selected']} selected documents "
                             f"is in the tokenised training corpus ({stats['missing']} missing, "
                             f"{stats['held_out']} held out; doc_id mismatch between corpus and selection?)")
        builder.finalize(tmp + ".idx")
    except BaseException:
        if builder is not None:
            builder.abort()
        raise
    finally:
        doms.close()
        con.close()
    os.replace(tmp + ".bin", str(out_prefix) + ".bin")
    os.replace(tmp + ".idx", str(out_prefix) + ".idx")
    return {"documents": builder.n_doc, "tokens": builder.tokens, **stats}
