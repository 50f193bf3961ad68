"""Corpus readers: local jsonl / parquet files and Hugging Face datasets, one document stream.

Every reader yields `Document`s in a deterministic order (files sorted, rows in file order,
sources in config order) with stable ids, because scoring shards are contiguous blocks of that
order: the same config must give the same shards on every worker and on every re-run.

Ids: the corpus's own id field when present, else "<file-stem>:<row>" (local) or
"<hub-id>/<config>:<row>" (hub). Row numbers count every row, including skipped ones, so one bad
row never shifts the ids of the rows after it.

Bad rows never vanish: a row with a missing or non-string text field, empty text or bytes that
are not UTF-8 becomes a `Document` with `skip` set to the reason (and `where` naming file and
row). Consumers that count skips (the scorer) ask for them with `with_skips=True`; others get
only the good documents, and the skips are still tallied in the optional `stats` dict.
Errors that mean the corpus itself is unusable (a missing or truncated file, a domain the config
does not list when `unknown_domain=error`) raise `CorpusError` naming the file and row.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attninf.config import check
from attninf.context import InputError

KINDS = ("jsonl", "parquet", "hf")


class CorpusError(InputError):
    """The corpus cannot be read as configured; the message names file, row and field."""


@dataclass(frozen=True)
class Document:
    doc_id: str
    domain: str
    text: str
    skip: str | None = None  # reason this row cannot be scored (empty, undecodable, missing_field...)
    where: str = ""  # "file:row" for messages


@dataclass
class HFSource:
    """One Hugging Face dataset (config/split) feeding one domain."""

    path: str = ""  # hub id (or a local dataset dir / builder name load_dataset accepts)
    name: str | None = None  # dataset config, e.g. "fineweb-edu-dedup"
    split: str = "train"
    data_files: list[str] | None = None  # for builder paths like "json"/"parquet" (local mirrors)
    domain: str = ""
    text_field: str = "text"
    id_field: str | None = None
    # How the text is obtained: "field" (a text column) or "swh_blob" (python-edu: the row holds a
    # Software Heritage blob id; the file is fetched from the public S3 bucket, needs boto3).
    text_from: str = "field"
    blob_field: str = "blob_id"
    max_docs: int | None = None


@dataclass
class CorpusConfig:
    """`corpus` config group. Defaults read jsonl files with fields text/domain/id."""

    kind: str = "jsonl"
    paths: list[str] = field(default_factory=list)  # files or globs (sorted after expansion)
    # domain -> files/globs; each file's documents get that domain (overrides domain_field).
    domain_paths: dict[str, list[str]] = field(default_factory=dict)
    text_field: str = "text"
    domain_field: str | None = "domain"
    id_field: str | None = "id"
    domain: str | None = None  # one domain for every document (overrides domain_field)
    domains: list[str] | None = None  # keep only these domains (None = all)
    unknown_domain: str = "error"  # a document whose domain is not in `domains`: error | skip
    max_docs_per_domain: int | None = None  # first N documents of each domain in corpus order
    max_docs: int | None = None  # first N documents overall (after the per-domain cap)
    sources: list[HFSource] = field(default_factory=list)  # kind=hf
    streaming: bool = True  # kind=hf: stream from the hub instead of downloading whole configs

    def validate(self) -> None:
        check(self.kind in KINDS, "kind", f"'{self.kind}' unknown; use one of {KINDS}")
        check(self.unknown_domain in ("error", "skip"), "unknown_domain", "use error or skip")
        if self.kind == "hf":
            check(bool(self.sources), "sources", "kind=hf needs at least one source")
            for i, s in enumerate(self.sources):
                check(bool(s.path), f"sources[{i}].path", "hub id or dataset path required")
                check(s.text_from in ("field", "swh_blob"), f"sources[{i}].text_from",
                      "use field or swh_blob")
        else:
            check(bool(self.paths) or bool(self.domain_paths), "paths",
                  f"kind={self.kind} needs corpus.paths=[...] or corpus.domain_paths")
            check(bool(self.domain or self.domain_field or self.domain_paths), "domain_field",
                  "set corpus.domain_field, corpus.domain or corpus.domain_paths")
        for key in ("max_docs_per_domain", "max_docs"):
            v = getattr(self, key)
            check(v is None or v > 0, key, "must be positive or null")


# --- local files ------------------------------------------------------------------------------

def _expand(patterns: list[str]) -> list[Path]:
    out: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pat)))
        if not hits:
            raise CorpusError(f"corpus file not found: {pat}")
        out.extend(Path(h) for h in hits)
    return out


def local_files(cfg: CorpusConfig) -> list[tuple[Path, str | None]]:
    """(file, fixed domain or None) in reading order."""
    files = [(p, cfg.domain) for p in _expand(list(cfg.paths))]
    for dom in sorted(cfg.domain_paths):
        files.extend((p, dom) for p in _expand(list(cfg.domain_paths[dom])))
    return files


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(row, record or None, problem or None); reads bytes so one bad line is one skip."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        for row, raw in enumerate(fh):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield row, None, "undecodable"
                continue
            if not line.strip():
                yield row, None, "empty"
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                yield row, None, "bad_json"
                continue
            yield row, rec if isinstance(rec, dict) else None, None if isinstance(rec, dict) else "bad_json"


def _parquet_rows(path: Path, columns: list[str]) -> Iterator[tuple[int, dict | None, str | None]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - truncated/corrupt files raise many arrow error types
        raise CorpusError(f"{path}: not a readable parquet file ({e}); re-copy or remove it") from None
    have = set(pf.schema_arrow.names)
    cols = [c for c in columns if c in have]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=cols):
            for rec in batch.to_pylist():
                yield row, rec, None
                row += 1
    except Exception as e:  # noqa: BLE001
        raise CorpusError(f"{path}: unreadable after row {row} ({e}); the file is truncated or "
                          "corrupt") from None


def _record_to_doc(rec: dict | None, problem: str | None, *, row: int, stem: str, where: str,
                   text_field: str, domain_field: str | None, id_field: str | None,
                   fixed_domain: str | None) -> Document:
    domain = fixed_domain
    if domain is None and rec is not None and domain_field:
        d = rec.get(domain_field)
        domain = str(d) if d is not None else None
    doc_id = None
    if rec is not None and id_field and rec.get(id_field) is not None:
        doc_id = str(rec[id_field])
    doc_id = doc_id or f"{stem}:{row}"
    if problem is not None:
        return Document(doc_id, domain or "", "", skip=problem, where=where)
    if domain is None:
        return Document(doc_id, "", "", skip="missing_domain", where=where)
    text = rec.get(text_field)
    if text is None:
        return Document(doc_id, domain, "", skip="missing_field", where=where)
    if not isinstance(text, str):
        return Document(doc_id, domain, "", skip="not_text", where=where)
    if not text.strip():
        return Document(doc_id, domain, "", skip="empty", where=where)
    return Document(doc_id, domain, text, where=where)


def _iter_local(cfg: CorpusConfig) -> Iterator[Document]:
    for path, fixed in local_files(cfg):
        name = path.name
        kind = "parquet" if name.endswith(".parquet") else "jsonl" if cfg.kind != "parquet" else "parquet"
        stem = name.split(".")[0]
        if kind == "parquet":
            cols = [c for c in (cfg.text_field, cfg.domain_field, cfg.id_field) if c]
            rows = _parquet_rows(path, cols)
        else:
            rows = _jsonl_rows(path)
        for row, rec, problem in rows:
            yield _record_to_doc(rec, problem, row=row, stem=stem, where=f"{path}:{row}",
                                 text_field=cfg.text_field, domain_field=cfg.domain_field,
                                 id_field=cfg.id_field, fixed_domain=fixed)


# --- Hugging Face datasets --------------------------------------------------------------------

def swh_fetcher():
    """Fetch a Software Heritage blob's text (python-edu). Needs boto3 and network to S3.

    The bucket is public (s3://softwareheritage/content/<blob_id>, gzip); boto3 still wants
    credentials configured (any AWS account), as in the SmolLM-Corpus instructions.
    """
    try:
        import boto3
    except ImportError:
        raise CorpusError(
            "python-edu rows hold Software Heritage blob ids; their text lives in "
            "s3://softwareheritage/content/<blob_id>. Install boto3 (`pip install boto3`), configure "
            "AWS credentials (the bucket is public, any account works) and re-run; or point "
            "corpus.sources at a pre-fetched copy with a text column (text_from: field).") from None
    import boto3

    s3 = boto3.client("s3")

    def fetch(blob_id: str, encoding: str = "utf-8") -> str:
        obj = s3.get_object(Bucket="softwareheritage", Key=f"content/{blob_id}")
        with gzip.GzipFile(fileobj=obj["Body"]) as fin:
            return fin.read().decode(encoding or "utf-8")

    return fetch


def _iter_hf(cfg: CorpusConfig) -> Iterator[Document]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise CorpusError("corpus.kind=hf needs the `datasets` package") from None
    for src in cfg.sources:
        label = f"{src.path}" + (f"/{src.name}" if src.name else "")
        try:
            kw = {"data_files": list(src.data_files)} if src.data_files else {}
            ds = load_dataset(src.path, src.name, split=src.split, streaming=cfg.streaming, **kw)
        except Exception as e:  # noqa: BLE001
            raise CorpusError(f"cannot open hub dataset {label} (split {src.split}): {e}. Without "
                              "hub access, export it to jsonl/parquet and use corpus=jsonl") from None
        fetch = swh_fetcher() if src.text_from == "swh_blob" else None
        domain = src.domain or (src.name or src.path)
        for row, rec in enumerate(ds):
            if src.max_docs is not None and row >= src.max_docs:
                break
            where = f"{label}:{row}"
            if fetch is not None:
                blob = rec.get(src.blob_field)
                if not blob:
                    yield Document(f"{label}:{row}", domain, "", skip="missing_field", where=where)
                    continue
                try:
                    rec = dict(rec, **{src.text_field: fetch(blob, rec.get("src_encoding") or "utf-8")})
                except UnicodeDecodeError:
                    yield Document(f"{label}:{row}", domain, "", skip="undecodable", where=where)
                    continue
            yield _record_to_doc(rec, None, row=row, stem=label, where=where,
                                 text_field=src.text_field, domain_field=None,
                                 id_field=src.id_field, fixed_domain=domain)


# --- public entry -----------------------------------------------------------------------------

def filter_domain(doc: Document, cfg: CorpusConfig, allowed: set[str] | None) -> Document:
    """A document of a domain outside corpus.domains: an error naming it, or (unknown_domain=skip)
    a counted skip. The one rule of the whole stream and of a part read alone (corpus_parts)."""
    if allowed is not None and doc.domain and doc.domain not in allowed:
        if cfg.unknown_domain == "error":
            raise CorpusError(f"{doc.where}: domain '{doc.domain}' is not in corpus.domains "
                              f"{sorted(allowed)}; add it, or set corpus.unknown_domain=skip")
        return Document(doc.doc_id, doc.domain, "", skip="domain_not_configured", where=doc.where)
    return doc


def iter_documents(cfg: CorpusConfig, *, with_skips: bool = False,
                   stats: dict[str, Any] | None = None) -> Iterator[Document]:
    """All documents of the corpus in deterministic order, caps and domain filter applied.

    with_skips: also yield unreadable rows (Document.skip set) in their place in the order.
    stats: if given, `stats["skipped"][reason]` and `stats["documents"]` are counted here.
    """
    rows = _iter_hf(cfg) if cfg.kind == "hf" else _iter_local(cfg)
    allowed = set(cfg.domains) if cfg.domains else None
    per_domain: dict[str, int] = {}
    n = 0
    for doc in rows:
        if cfg.max_docs is not None and n >= cfg.max_docs:
            break
        doc = filter_domain(doc, cfg, allowed)
        key = doc.domain
        if cfg.max_docs_per_domain is not None and per_domain.get(key, 0) >= cfg.max_docs_per_domain:
            continue  # this domain is full: its later rows (good or bad) are not in the corpus
        if doc.skip is None:
            per_domain[key] = per_domain.get(key, 0) + 1
        n += 1
        if stats is not None:
            if doc.skip is None:
                stats["documents"] = stats.get("documents", 0) + 1
            else:
                sk = stats.setdefault("skipped", {})
                sk[doc.skip] = sk.get(doc.skip, 0) + 1
        if doc.skip is None or with_skips:
            yield doc
