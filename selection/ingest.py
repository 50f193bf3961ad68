"""Ingest a hub corpus once: every file of every source -> local parquet with stable document ids.

Why: scoring and tokenisation at paper size run as arrays of tasks, and each task must read only
its own part of the corpus. Streaming the hub in every task reads ~1 TB per task, and python-edu
costs one S3 GET per row, rows of other tasks included. Ingest runs once, as an array over the
hub dataset's own files (a part = one file of one source): each part streams its file through
`datasets` (the same code path for a hub id and a local dataset directory), fetches python-edu
blobs concurrently, and writes `<out>/<domain>/<config>--<file>.parquet` (id, domain, text) under
a temporary name, then its stats and a completion marker. A re-run skips finished files; the
dataset revision (the hub commit, or a fingerprint of a local directory) is recorded in
`plan.json` and a resume against another revision stops with both named.

Ids: the source's id field when set (fineweb-edu `id`, python-edu `blob_id`, OpenWebMath `url`),
else "<config>/<file stem>:<row in file>" (cosmopedia-v2): stable whatever the other files hold.

python-edu: rows hold a Software Heritage blob id; the text is gzip in
s3://softwareheritage/content/<blob_id>. A bounded thread pool fetches a batch's blobs at once,
each with retries and exponential backoff on transient errors; a blob that still fails (or is
missing, or is not text in its encoding) is a counted skip whose id and reason are in the part's
stats, never a crash or a silent drop.

The work is plain functions (`plan`, `run_part`, `finish`); `python -m tools.ingest` drives them
for one task of an array (attninf.dist.rank_world: part i belongs to task i % world).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from attninf.config import check
from selection.corpora import CorpusConfig, CorpusError, HFSource

log = logging.getLogger(__name__)

MAX_LISTED_SKIPS = 1000  # skipped ids listed in a part's stats (all are counted)


@dataclass
class IngestConfig:
    """`ingest` settings (conf/ingest/default.yaml)."""

    out: str = "data/ingest"
    # Hub revision (commit, branch or tag) to ingest; null = the default branch's commit now. The
    # commit is recorded in plan.json and a resume against another one stops.
    revision: str | None = None
    row_group: int = 10_000  # rows per parquet row group written (the unit mix and score split by)
    batch_rows: int = 1_024  # rows read, fetched and written at a time
    blob_workers: int = 32  # concurrent S3 GETs for python-edu blobs (threads)
    blob_retries: int = 4  # retries of a transient failure (exponential backoff)
    blob_backoff_s: float = 0.5  # first backoff; doubles per retry, with jitter
    blob_timeout_s: float = 30.0
    s3_endpoint: str | None = None  # null = AWS; a URL for an S3-compatible server
    s3_bucket: str = "softwareheritage"
    s3_prefix: str = "content/"
    s3_unsigned: bool = False  # anonymous requests (no AWS credentials)

    def validate(self) -> None:
        check(bool(self.out), "out", "must name the output folder")
        for k in ("row_group", "batch_rows", "blob_workers"):
            check(getattr(self, k) > 0, k, "must be > 0")
        check(self.blob_retries >= 0, "blob_retries", "must be >= 0")
        check(self.blob_backoff_s >= 0, "blob_backoff_s", "must be >= 0")


@dataclass
class IngestPart:
    id: str  # "<domain>--<config>--<file stem>": names the output file too
    source: int  # index in corpus.sources
    file: str  # the data file as `datasets` resolved it (hf:// URL or local path)
    out: str  # output parquet, relative to the ingest folder


def _label(src: HFSource) -> str:
    return src.name or Path(src.path.rstrip("/")).name


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def resolve_files(src: HFSource, revision: str | None) -> tuple[list[str], str]:
    """The data files of one source's split, as `datasets` resolves them, and the revision they
    belong to: the hub commit for a hub id, "local:<sha256 of names and sizes>" for a directory."""
    try:
        from datasets import load_dataset_builder
    except ImportError:
        raise CorpusError("ingest needs the `datasets` package") from None
    label = src.path + (f"/{src.name}" if src.name else "")
    try:
        kw = {"data_files": list(src.data_files)} if src.data_files else {}
        b = load_dataset_builder(src.path, src.name, revision=revision, **kw)
    except Exception as e:  # noqa: BLE001
        raise CorpusError(f"ingest: cannot open dataset {label}: {e}") from None
    files = (b.config.data_files or {}).get(src.split)
    if not files:
        raise CorpusError(f"ingest: dataset {label} has no data files for split '{src.split}'")
    files = [str(f) for f in files]
    shas = {m.group(1) for f in files if (m := re.search(r"@([0-9a-f]{40})/", f))}
    if shas:
        return files, sorted(shas)[0]
    h = hashlib.sha256()  # a local directory has no commit: its files' names and sizes stand in
    for f in files:
        h.update(f"{Path(f).parent.name}/{Path(f).name}\0{os.path.getsize(f) if os.path.exists(f) else -1}\0".encode())
    return files, "local:" + h.hexdigest()[:16]


def plan(ccfg: CorpusConfig, icfg: IngestConfig, out: Path) -> list[IngestPart]:
    """Every file of every source, in config order; plan.json records files and revisions. On a
    resume the revisions must match the recorded ones (a pinned `revision` too)."""
    if ccfg.kind != "hf":
        raise CorpusError(f"ingest: corpus.kind={ccfg.kind}; ingest reads hub datasets (kind=hf)")
    path = out / "plan.json"
    old = json.loads(path.read_text()) if path.exists() else None
    sources, parts = [], []
    for i, src in enumerate(ccfg.sources):
        label = src.path + (f"/{src.name}" if src.name else "")
        files, rev = resolve_files(src, icfg.revision)
        if old is not None:
            was = next((s for s in old["sources"] if s["label"] == label and s["split"] == src.split), None)
            if was is not None and was["revision"] != rev:
                raise CorpusError(f"ingest: {label} is at revision {rev} but {path} was made from "
                                  f"{was['revision']}: set ingest.revision={was['revision']} to finish that "
                                  "ingest, or ingest into a new folder")
        domain = src.domain or _label(src)
        sources.append({"label": label, "split": src.split, "domain": domain, "revision": rev, "files": files})
        for f in files:
            stem = Path(f.split("?")[0]).name.split(".")[0]
            pid = f"{_safe(domain)}--{_safe(_label(src))}--{_safe(stem)}"
            parts.append(IngestPart(pid, i, f, f"{_safe(domain)}/{_safe(_label(src))}--{_safe(stem)}.parquet"))
    ids = [p.id for p in parts]
    if len(set(ids)) != len(ids):
        raise CorpusError("ingest: two data files map to the same output name; give the sources distinct "
                          "domains or configs")
    _write_json(path, {"sources": sources, "parts": [asdict(p) for p in parts]})
    return parts


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def part_done(out: Path, part: IngestPart) -> bool:
    return (out / "parts" / f"{part.id}.done").exists()


# --- python-edu blobs -----------------------------------------------------------------------------

class BlobError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def s3_getter(icfg: IngestConfig) -> Callable[[str], bytes]:
    """GET of one blob's raw (gzip) bytes from the configured bucket; botocore's own retries are
    off so the retries and their count are ours."""
    try:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config
    except ImportError:
        raise CorpusError("python-edu blobs need boto3 (`pip install boto3`, or `pip install -e .[smollm]`)") from None
    cfg = Config(retries={"max_attempts": 1, "mode": "standard"}, max_pool_connections=icfg.blob_workers,
                 connect_timeout=icfg.blob_timeout_s, read_timeout=icfg.blob_timeout_s,
                 **({"signature_version": UNSIGNED} if icfg.s3_unsigned else {}))
    s3 = boto3.client("s3", endpoint_url=icfg.s3_endpoint, config=cfg)

    def get(blob_id: str) -> bytes:
        try:
            return s3.get_object(Bucket=icfg.s3_bucket, Key=f"{icfg.s3_prefix}{blob_id}")["Body"].read()
        except s3.exceptions.NoSuchKey:
            raise BlobError("missing_blob", f"s3://{icfg.s3_bucket}/{icfg.s3_prefix}{blob_id} does not exist") from None

    return get


class BlobFetcher:
    """Concurrent blob fetches: a bounded pool, retries with exponential backoff and jitter on
    transient errors; permanent failures (missing, not gzip, not text) are not retried."""

    def __init__(self, get: Callable[[str], bytes], workers: int, retries: int, backoff_s: float,
                 seed: int = 0):
        self.get, self.retries, self.backoff_s = get, retries, backoff_s
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blob")
        self.rng = random.Random(seed)
        self.retried = 0

    def _one(self, item: tuple[str, str | None]) -> tuple[str | None, str | None, str | None]:
        blob_id, encoding = item
        err = None
        for attempt in range(self.retries + 1):
            try:
                raw = self.get(blob_id)
                try:
                    data = gzip.decompress(raw)
                except (OSError, EOFError) as e:
                    raise BlobError("not_gzip", str(e)) from None
                try:
                    return data.decode(encoding or "utf-8"), None, None
                except (UnicodeDecodeError, LookupError) as e:
                    raise BlobError("undecodable", str(e)) from None
            except BlobError as e:
                return None, e.reason, str(e)
            except Exception as e:  # noqa: BLE001 - network, throttling, 5xx: transient
                err = f"{type(e).__name__}: {e}"
                if attempt < self.retries:
                    self.retried += 1
                    time.sleep(self.backoff_s * 2 ** attempt * (0.5 + self.rng.random()))
        return None, "fetch_failed", f"after {self.retries + 1} attempts: {err}"

    def fetch(self, items: list[tuple[str, str | None]]) -> list[tuple[str | None, str | None, str | None]]:
        """(text, skip reason, detail) per (blob_id, encoding), in order."""
        return list(self.pool.map(self._one, items))

    def close(self) -> None:
        self.pool.shutdown(wait=True)


# --- one part -------------------------------------------------------------------------------------

def _stream(file: str, batch_rows: int):
    """Batches (dict of columns) of one data file through `datasets`' streaming parquet reader."""
    from datasets import load_dataset

    kind = "json" if re.search(r"\.jsonl?(\.gz)?$", file.split("?")[0]) else "parquet"
    ds = load_dataset(kind, data_files={"train": [file]}, split="train", streaming=True)
    yield from ds.iter(batch_size=batch_rows)


def run_part(part: IngestPart, ccfg: CorpusConfig, icfg: IngestConfig, out: Path, revision: str,
             fetcher: BlobFetcher | None = None) -> dict:
    """Ingest one file: rows -> (id, domain, text) parquet, atomically; then stats and marker."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = ccfg.sources[part.source]
    domain = src.domain or _label(src)
    stem = Path(part.file.split("?")[0]).name.split(".")[0]
    t0, c0 = time.perf_counter(), time.process_time()
    dest = out / part.out
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    schema = pa.schema([("id", pa.string()), ("domain", pa.string()), ("text", pa.string())])
    # statistics of long text columns would bloat every footer a reader of a row group must read
    writer = pq.ParquetWriter(tmp, schema, write_statistics=["domain"])
    buf = {"id": [], "text": []}
    skipped: dict[str, int] = {}
    listed: list[dict] = []
    rows = docs = fetched = 0
    fetch_s = 0.0

    def skip(row, ident, reason, detail=""):
        skipped[reason] = skipped.get(reason, 0) + 1
        if len(listed) < MAX_LISTED_SKIPS:
            listed.append({"row": row, "id": ident, "reason": reason, **({"detail": detail} if detail else {})})

    def flush(force=False):
        while len(buf["id"]) >= icfg.row_group or (force and buf["id"]):
            n = min(icfg.row_group, len(buf["id"]))
            writer.write_table(pa.table({"id": buf["id"][:n], "domain": [domain] * n, "text": buf["text"][:n]},
                                        schema=schema), row_group_size=n)
            del buf["id"][:n], buf["text"][:n]

    try:
        for batch in _stream(part.file, icfg.batch_rows):
            n = len(next(iter(batch.values()))) if batch else 0
            ids = batch.get(src.id_field) if src.id_field else None
            texts = batch.get(src.text_field)
            blobs = (batch.get(src.blob_field) or [None] * n) if src.text_from == "swh_blob" else None
            if blobs is not None:
                enc = batch.get("src_encoding") or [None] * n
                want = [i for i in range(n) if blobs[i]]
                t1 = time.perf_counter()
                got = fetcher.fetch([(blobs[i], enc[i]) for i in want]) if want else []
                fetch_s += time.perf_counter() - t1
                fetched += len(want)
                texts = [None] * n
                reasons: dict[int, tuple[str, str]] = {}
                for i, (t, why, detail) in zip(want, got):
                    texts[i] = t
                    if why:
                        reasons[i] = (why, detail)
            for i in range(n):
                row = rows + i
                ident = str(ids[i]) if ids is not None and ids[i] is not None else f"{_label(src)}/{stem}:{row}"
                if blobs is not None:
                    if not blobs[i]:
                        skip(row, ident, "missing_field")
                        continue
                    if i in reasons:
                        skip(row, ident, *reasons[i])
                        continue
                t = texts[i] if texts is not None else None
                if t is None:
                    skip(row, ident, "missing_field")
                    continue
                if not isinstance(t, str):
                    skip(row, ident, "not_text")
                    continue
                if not t.strip():
                    skip(row, ident, "empty")
                    continue
                buf["id"].append(ident)
                buf["text"].append(t)
                docs += 1
            rows += n
            flush()
        flush(force=True)
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    wall = time.perf_counter() - t0
    stats = {"part": part.id, "file": part.file, "out": part.out, "revision": revision, "domain": domain,
             "rows": rows, "documents": docs, "skipped": skipped, "skipped_ids": listed,
             "skipped_ids_truncated": sum(skipped.values()) > len(listed), "blobs_fetched": fetched,
             "blob_seconds": round(fetch_s, 3), "bytes_written": dest.stat().st_size,
             "seconds": round(wall, 3), "cpu_s": round(time.process_time() - c0, 3)}
    _write_json(out / "parts" / f"{part.id}.json", stats)
    _write_json(out / "parts" / f"{part.id}.done", {"revision": revision})
    if skipped:
        log.warning("ingest %s: skipped %s (ids in %s)", part.id, skipped, out / "parts" / f"{part.id}.json")
    return stats


def run_parts(parts: list[IngestPart], ccfg: CorpusConfig, icfg: IngestConfig, out: Path) -> list[dict]:
    """This task's parts not yet done (a finished part is checked against the plan's revision)."""
    revisions = {i: s["revision"] for i, s in enumerate(json.loads((out / "plan.json").read_text())["sources"])}
    todo = []
    for p in parts:
        if part_done(out, p):
            was = json.loads((out / "parts" / f"{p.id}.done").read_text()).get("revision")
            if was != revisions[p.source]:
                raise CorpusError(f"ingest: part {p.id} was made from revision {was}, the plan says "
                                  f"{revisions[p.source]}: ingest into a new folder")
            continue
        todo.append(p)
    if not todo:
        return []
    need_blobs = any(ccfg.sources[p.source].text_from == "swh_blob" for p in todo)
    fetcher = BlobFetcher(s3_getter(icfg), icfg.blob_workers, icfg.blob_retries, icfg.blob_backoff_s) \
        if need_blobs else None
    try:
        return [run_part(p, ccfg, icfg, out, revisions[p.source], fetcher) for p in todo]
    finally:
        if fetcher is not None:
            fetcher.close()


def finish(parts: list[IngestPart], out: Path) -> dict:
    """When every part is done: totals from the part stats (never the data) and `corpus.yaml`,
    the corpus config that reads the ingested parquet (corpus=parquet, ids and domains kept)."""
    missing = [p.id for p in parts if not part_done(out, p)]
    if missing:
        return {"done": False, "missing": len(missing), "parts": len(parts), "e.g.": missing[:3]}
    stats = [json.loads((out / "parts" / f"{p.id}.json").read_text()) for p in parts]
    plan_ = json.loads((out / "plan.json").read_text())
    per_domain: dict[str, dict] = {}
    skipped: dict[str, int] = {}
    for s in stats:
        d = per_domain.setdefault(s["domain"], {"files": 0, "rows": 0, "documents": 0, "bytes": 0})
        d["files"] += 1
        d["rows"] += s["rows"]
        d["documents"] += s["documents"]
        d["bytes"] += s["bytes_written"]
        for k, v in s["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    domains = sorted(per_domain)
    summary = {"done": True, "parts": len(parts), "domains": per_domain, "skipped": skipped,
               "revisions": {s["label"]: s["revision"] for s in plan_["sources"]},
               "seconds": round(sum(s["seconds"] for s in stats), 2),
               "blobs_fetched": sum(s["blobs_fetched"] for s in stats)}
    _write_json(out / "summary.json", summary)
    (out / "corpus.yaml").write_text(
        "# Written by selection.ingest: the ingested corpus as local parquet (use with corpus=parquet).\n"
        f"# Revisions: {json.dumps(summary['revisions'])}\n"
        "kind: parquet\n"
        f"paths: [{out}/*/*.parquet]\n"
        "text_field: text\ndomain_field: domain\nid_field: id\n"
        f"domains: [{', '.join(domains)}]\n")
    return summary
