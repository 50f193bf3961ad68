"""A local corpus as parts defined by the data: (file, parquet row groups), read one part at a time.

Why parts by file and row group: at paper size the corpus is ~1 TB in thousands of parquet files
and tokenisation runs as an array of tasks. A part names its file and its row-group range, so a
task opens only its own parts' bytes (plus their footers), the plan does not depend on the
number of tasks (a run resumed with another array size re-does no finished part), and a part is
small enough to hold in memory. A jsonl file is cut into row ranges of up to `part_rows` lines;
lines cannot be sought without a scan, so planning counts its lines and each of its parts reads
the file up to its last row (fine at test and demo size; the paper path is parquet, which
`selection.ingest` writes).

Both array stages that read the corpus split it this way: `score` (parts of `score.shard_size`
rows, shard files named by the part's index) and `mix` (parts of `mix.shard_docs` rows); the
executors hand each task a contiguous run of the plan (`assign`, attninf.lifecycle.share).

The documents of the parts, concatenated in plan order, are exactly `selection.corpora`'s
stream: same ids (the corpus's id field, else "<file-stem>:<row>" counting every row), same
skips, same domain filter and the same caps. Caps (`max_docs_per_domain`, `max_docs`) are
decided in corpus order, so a capped corpus is planned by one counting pass that records the
counters at the start of each part and stops where the caps are reached; uncapped corpora are
planned from parquet footers alone. (One edge of that pass: once every listed domain is full,
later files are not read, so an unlisted domain there is not reported as the full stream would.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from selection.corpora import CorpusConfig, CorpusError, Document, local_files


@dataclass
class Part:
    """One unit of work: rows of one file. `start` holds the cap counters at its first row."""

    id: str
    file: str
    kind: str  # parquet | jsonl
    domain: str | None  # the file's fixed domain (corpus.domain / domain_paths) or None
    row_groups: tuple[int, int] | None  # parquet: row groups [a, b)
    first_row: int  # row number of the part's first row in its file (ids count every row)
    rows: int | None  # rows in the part (None: the whole jsonl file, in plans made before row ranges)
    bytes: int  # compressed bytes of those row groups (jsonl: the part's share of the file size)
    start: dict = field(default_factory=dict)  # {"per_domain": {...}, "n": int} when capped

    @classmethod
    def from_json(cls, d: dict) -> "Part":
        d = dict(d)
        d["row_groups"] = tuple(d["row_groups"]) if d.get("row_groups") is not None else None
        return cls(**d)


class ByteCounter:
    """Files opened and bytes read through them: what a part costs in I/O (the scale test's figure).

    `bytes` counts distinct bytes (the union of the ranges read, what storage must deliver);
    `requested` counts every read, re-reads included (pyarrow reads the last 64 KB of a file for
    its footer and reads the footer's column chunks again from the page cache)."""

    def __init__(self) -> None:
        self.files = 0
        self.bytes = 0
        self.requested = 0

    def open(self, path: str):
        fh = open(path, "rb")
        self.files += 1
        counter = self
        spans: list[tuple[int, int]] = []

        class _Counting:  # a file object whose reads are counted (pyarrow reads through it)
            def __getattr__(self, name):
                return getattr(fh, name)

            def read(self, n=-1):
                pos = fh.tell()
                b = fh.read(n)
                spans.append((pos, pos + len(b)))
                return b

            def readinto(self, buf):
                pos = fh.tell()
                k = fh.readinto(buf) or 0
                spans.append((pos, pos + k))
                return k

            def __enter__(self):
                return self

            def __exit__(self, *a):
                fh.close()
                counter.requested += sum(e - s for s, e in spans)
                end = 0
                for s, e in sorted(spans):  # union of the ranges read
                    if e > end:
                        counter.bytes += e - max(s, end)
                        end = e

        return _Counting()


def _is_parquet(cfg: CorpusConfig, path: Path) -> bool:
    # the rule of selection.corpora._iter_local
    return path.name.endswith(".parquet") or cfg.kind == "parquet"


def _compressed(rg) -> int:
    return sum(rg.column(i).total_compressed_size for i in range(rg.num_columns))


def _capped(cfg: CorpusConfig) -> bool:
    return cfg.max_docs is not None or cfg.max_docs_per_domain is not None


def plan_parts(cfg: CorpusConfig, part_rows: int) -> list[Part]:
    """The corpus's parts in corpus order: consecutive row groups of a parquet file up to about
    `part_rows` rows (at least one group), row ranges of up to `part_rows` lines of a jsonl file.
    Reads parquet footers, not rows (jsonl: counts lines), unless the corpus is capped (then one
    counting pass, see the module docstring)."""
    import pyarrow.parquet as pq

    if cfg.kind == "hf":
        raise CorpusError("corpus.kind=hf has no files to split: ingest it first "
                          "(python -m tools.ingest) and mix the local parquet it writes")
    parts: list[Part] = []
    for path, fixed in local_files(cfg):
        if not _is_parquet(cfg, path):
            n, size = _count_lines(path), os.path.getsize(path)
            for a in range(0, max(n, 1), part_rows):
                k = min(part_rows, n - a)
                parts.append(Part(f"p{len(parts):05d}", str(path), "jsonl", fixed, None, a, k,
                                  size * k // n if n else size))
            continue
        try:
            md = pq.ParquetFile(path).metadata
        except Exception as e:  # noqa: BLE001 - arrow raises many types for a bad file
            raise CorpusError(f"{path}: not a readable parquet file ({e}); re-copy or remove it") from None
        if md.num_row_groups == 0:
            parts.append(Part(f"p{len(parts):05d}", str(path), "parquet", fixed, (0, 0), 0, 0, 0))
            continue
        g, row = 0, 0
        while g < md.num_row_groups:
            a, n, nbytes = g, 0, 0
            while g < md.num_row_groups and (g == a or n + md.row_group(g).num_rows <= part_rows):
                n += md.row_group(g).num_rows
                nbytes += _compressed(md.row_group(g))
                g += 1
            parts.append(Part(f"p{len(parts):05d}", str(path), "parquet", fixed, (a, g), row, n, nbytes))
            row += n
    return _cap(parts, cfg) if _capped(cfg) else parts


def _cap(parts: list[Part], cfg: CorpusConfig) -> list[Part]:
    """The counting pass of a capped corpus: counters at each part's start; parts after the caps
    are reached, and parts whose every row is over its domain's cap (they give no document, not
    even a skip), are dropped, and the kept parts are numbered again in order."""
    state = {"per_domain": {}, "n": 0}
    kept = []
    for p in parts:
        if _exhausted(state, cfg):
            break
        p.start = json.loads(json.dumps(state))
        if sum(1 for _ in read_part(p, cfg, state=state)):
            kept.append(p)
    for i, p in enumerate(kept):
        p.id = f"p{i:05d}"
    return kept


def _count_lines(path: Path) -> int:
    """Lines as selection.corpora's jsonl reader counts rows (a last line without newline counts)."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        return sum(1 for _ in fh)


def _exhausted(state: dict, cfg: CorpusConfig) -> bool:
    if cfg.max_docs is not None and state["n"] >= cfg.max_docs:
        return True
    if cfg.max_docs_per_domain is not None and cfg.domains:
        return all(state["per_domain"].get(d, 0) >= cfg.max_docs_per_domain for d in cfg.domains)
    return False


def _footer(fh):
    """The file's metadata from exactly its footer bytes. Handed to ParquetFile, it stops pyarrow's
    speculative 64 KB tail read, so a part reads its own row groups and the footer, nothing of
    its neighbours' row groups (the bytes a task opens stay ~1/N of the corpus)."""
    import struct

    import pyarrow as pa
    import pyarrow.parquet as pq

    fh.seek(-8, 2)
    tail = fh.read(8)
    if len(tail) != 8 or tail[4:] != b"PAR1":
        raise CorpusError(f"{fh.name}: not a parquet file (no PAR1 footer)")
    (n,) = struct.unpack("<i", tail[:4])
    fh.seek(-8 - n, 2)
    return pq.read_metadata(pa.BufferReader(b"PAR1" + fh.read(n) + tail))


def _rows(part: Part, cfg: CorpusConfig, io: ByteCounter) -> Iterator[tuple[int, dict | None, str | None]]:
    """(row number in file, record, problem) of the part's rows, as selection.corpora reads them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from selection.corpora import _jsonl_rows

    if part.kind == "jsonl":
        # corpora's jsonl reader, fed through the byte counter; a row range reads up to its end
        end = None if part.rows is None else part.first_row + part.rows
        for row, rec, problem in _jsonl_rows_counted(Path(part.file), io, _jsonl_rows):
            if end is not None and row >= end:
                break
            if row >= part.first_row:
                yield row, rec, problem
        return
    cols = [c for c in (cfg.text_field, cfg.domain_field, cfg.id_field) if c]
    row = part.first_row
    with io.open(part.file) as fh:
        try:
            pf = pq.ParquetFile(pa.PythonFile(fh, mode="r"), metadata=_footer(fh))
            have = set(pf.schema_arrow.names)
            use = [c for c in cols if c in have]
            a, b = part.row_groups
            if a == b:
                return
            for batch in pf.iter_batches(batch_size=1024, columns=use, row_groups=list(range(a, b))):
                for rec in batch.to_pylist():
                    yield row, rec, None
                    row += 1
        except CorpusError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CorpusError(f"{part.file}: unreadable after row {row} ({e}); the file is truncated "
                              "or corrupt") from None


def _jsonl_rows_counted(path: Path, io: ByteCounter, reader):
    # corpora._jsonl_rows opens the file itself; count its size as read (it reads all of it)
    io.files += 1
    io.bytes += os.path.getsize(path)
    io.requested += os.path.getsize(path)
    yield from reader(path)


def read_part(part: Part, cfg: CorpusConfig, state: dict | None = None,
              io: ByteCounter | None = None) -> Iterator[Document]:
    """The part's documents, skips included (Document.skip set), filtered as
    selection.corpora.iter_documents filters the whole stream. `state` (the cap counters) is
    advanced in place; by default it starts from the part's recorded `start`."""
    from selection.corpora import _record_to_doc, filter_domain

    io = io or ByteCounter()
    state = state if state is not None else json.loads(json.dumps(part.start or {"per_domain": {}, "n": 0}))
    per_domain, allowed = state["per_domain"], set(cfg.domains) if cfg.domains else None
    stem = Path(part.file).name.split(".")[0]
    for row, rec, problem in _rows(part, cfg, io):
        doc = _record_to_doc(rec, problem, row=row, stem=stem, where=f"{part.file}:{row}",
                             text_field=cfg.text_field, domain_field=cfg.domain_field,
                             id_field=cfg.id_field, fixed_domain=part.domain)
        if cfg.max_docs is not None and state["n"] >= cfg.max_docs:
            break
        doc = filter_domain(doc, cfg, allowed)
        if cfg.max_docs_per_domain is not None and per_domain.get(doc.domain, 0) >= cfg.max_docs_per_domain:
            continue
        if doc.skip is None:
            per_domain[doc.domain] = per_domain.get(doc.domain, 0) + 1
        state["n"] += 1
        yield doc


def assign(parts: list[Part], rank: int, world: int) -> list[Part]:
    """Task `rank`'s parts: a contiguous run of the plan holding ~1/world of its bytes, by the
    executors' one rule (attninf.lifecycle.share, weighted by the parts' bytes).

    Contiguous, not round-robin: consecutive parts share files, so a task opens ~1/world of the
    files and only the two files at its ends are shared with a neighbour (round-robin would have
    every task open most files for a few row groups each). Balanced by the plan's bytes, so a task
    of N reads ~1/N of the corpus whatever the file sizes. Any world size works on the same plan
    (finished parts are kept)."""
    from attninf.lifecycle import share

    keep = set(share([p.id for p in parts], rank, world, [p.bytes for p in parts]))
    return [p for p in parts if p.id in keep]


def files_fingerprint(cfg: CorpusConfig) -> list[list]:
    """[path, size, mtime_ns] of every corpus file: a plan is reused only while these hold."""
    out = []
    for path, _ in local_files(cfg):
        st = os.stat(path)
        out.append([str(path), st.st_size, st.st_mtime_ns])
    return out


def parts_json(parts: list[Part]) -> list[dict]:
    return [asdict(p) for p in parts]


def stored_plan(cfg: CorpusConfig, path: Path, part_rows: int, finished, stage: str) -> list[Part]:
    """The corpus's parts, kept in `path` and reused while the corpus files (path, size, mtime)
    and the part settings hold, so every task, and a run resumed with another task count, sees
    the same parts. `finished()` says whether any part's output exists: then a changed corpus is
    an error naming the file, not a replan (finished parts would no longer match their rows)."""
    from attninf.manifest import write_json

    path = Path(path)
    key = {"part_rows": part_rows, "corpus": {k: v for k, v in asdict(cfg).items() if k != "sources"}}
    files = files_fingerprint(cfg)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None  # missing or torn: plan again
    if old is not None:
        if old.get("key") == key and old.get("files") == files:
            return [Part.from_json(d) for d in old["parts"]]
        if finished():
            changed = next((f"{a[0]}" for a, b in zip(old.get("files", []), files) if a != b), None) or \
                "the file list or the part settings"
            raise CorpusError(f"{stage}: the corpus changed since {path} was planned ({changed}); its finished "
                              f"parts would not match: restore the corpus or remove {path.parent} to start over")
    parts = plan_parts(cfg, part_rows)
    write_json(path, {"key": key, "files": files, "parts": parts_json(parts),
                      "rows": sum(p.rows or 0 for p in parts), "bytes": sum(p.bytes for p in parts)})
    return parts


def preflight_parts(cfg: CorpusConfig, part_rows: int, tasks: int, stage: str) -> tuple[dict, list[str]]:
    """(facts, problems) of an array over the corpus's parts, for a dry run (attninf/plan.py):
    errors that only show at size, caught before any job is submitted.

    - a hub stream (corpus.kind=hf) is one part: more than one array task would idle;
    - more tasks than parts: the surplus tasks would start, find no work and hold their GPUs.

    Counting reads parquet footers only (a paper-size corpus: one small read per file); a capped
    corpus needs a counting pass, and a corpus not on disk yet (before ingest) cannot be counted:
    both are facts, not problems."""
    key = f"cluster.stages.{stage}.array_tasks"
    if cfg.kind == "hf":
        if tasks > 1:
            return {"parts": 1}, [f"{stage}: corpus.kind=hf is one part ('all') but {key}={tasks}: "
                                  f"ingest the corpus first (python -m tools.ingest) or set {key}=1"]
        return {"parts": 1}, []
    if _capped(cfg):
        return {"parts": None, "parts_note": "capped corpus: parts counted at run time"}, []
    try:
        n = len(plan_parts(cfg, part_rows))
    except CorpusError as e:
        return {"parts": None, "parts_note": f"not counted: {e}"}, []
    if tasks > n:
        return {"parts": n}, [f"{stage}: {key}={tasks} but the corpus has {n} parts of <= {part_rows:,} rows: "
                              f"{tasks - n} tasks would find no work; lower {key} or the part size"]
    return {"parts": n}, []
