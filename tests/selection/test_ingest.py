"""Ingest: a local hub layout through `datasets`, python-edu blobs from a real S3 server on localhost.

The S3 server is moto's server mode in its own process, bound to 127.0.0.1 on a free port,
started and stopped here; it holds the blobs tools.synth_corpus writes (gzip, the Software
Heritage layout). The benchmark figure (blobs/s with 1 and N fetch threads) is printed, not
asserted.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

BUCKET = "softwareheritage"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server process on 127.0.0.1 and a client for it; stopped at the end."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1")
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"moto server exited: {log.read_text()[-2000:]}")
                time.sleep(0.1)
        old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
        os.environ.update({k: env[k] for k in old})
        url = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=url)
        client.create_bucket(Bucket=BUCKET)
        yield url, client
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        for k, v in (locals().get("old") or {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def hub(tmp_path_factory, s3):
    """A small synthetic corpus in hub layout, python-edu as blob ids whose texts are in S3, with
    three broken blobs: one missing, one not gzip, one not UTF-8."""
    from tools.synth_corpus import SynthSpec, generate

    root = tmp_path_factory.mktemp("hub")
    m = generate(root / "hub", SynthSpec(documents=2_000, files=8, row_group=32), python_text=False,
                 blobs=root / "blobs")
    _, client = s3
    blobs = sorted((root / "blobs" / "content").iterdir())
    broken = {"missing": blobs[3].name, "not_gzip": blobs[10].name, "undecodable": blobs[20].name}
    for p in blobs:
        body = p.read_bytes()
        if p.name == broken["missing"]:
            continue
        if p.name == broken["not_gzip"]:
            body = b"plain bytes"
        if p.name == broken["undecodable"]:
            body = gzip.compress(b"\xff\xfe\xfa not utf-8")
        client.put_object(Bucket=BUCKET, Key=f"content/{p.name}", Body=body)
    return root / "hub", m, broken, {p.name: gzip.decompress(p.read_bytes()).decode() for p in blobs}


def _cfgs(hub_dir: Path, out: Path, url: str, **ingest):
    from omegaconf import OmegaConf

    from attninf.config import build
    from selection.corpora import CorpusConfig
    from selection.ingest import IngestConfig

    ccfg = build(CorpusConfig, OmegaConf.to_container(OmegaConf.load(hub_dir / "corpus_hf.yaml")), "corpus")
    icfg = IngestConfig(out=str(out), s3_endpoint=url, blob_workers=8, blob_backoff_s=0.01, row_group=100, **ingest)
    return ccfg, icfg


def test_ingest_local_hub_layout_with_blobs_from_s3(hub, s3, tmp_path):
    from selection.ingest import finish, plan, run_parts

    hub_dir, m, broken, texts = hub
    url, _ = s3
    out = tmp_path / "ingest"
    ccfg, icfg = _cfgs(hub_dir, out, url)
    parts = plan(ccfg, icfg, out)
    assert len(parts) == m["files"] == 8  # a part per data file of the dataset
    # two tasks of an array: the first leaves the ingest unfinished, the second completes it
    run_parts(parts[0::2], ccfg, icfg, out)
    assert finish(parts, out)["done"] is False and not (out / "corpus.yaml").exists()
    run_parts(parts[1::2], ccfg, icfg, out)
    summary = finish(parts, out)
    assert summary["done"] and summary["revisions"][f"{hub_dir}/python-edu"].startswith("local:")
    for config, c in m["configs"].items():
        lost = 3 if config == "python-edu" else 0
        assert summary["domains"][c["domain"]]["documents"] == c["documents"] - lost
        assert summary["domains"][c["domain"]]["files"] == c["files"]
    assert summary["skipped"] == {"missing_blob": 1, "not_gzip": 1, "undecodable": 1}
    named = [s for p in (out / "parts").glob("python_edu--*.json") for s in json.loads(p.read_text())["skipped_ids"]]
    assert sorted((s["reason"], s["id"]) for s in named) == sorted(
        [("missing_blob", broken["missing"]), ("not_gzip", broken["not_gzip"]), ("undecodable", broken["undecodable"])])
    # ids are stable and texts are the source's: python-edu's from S3, cosmopedia's by file and row
    py = pq.read_table(sorted((out / "python_edu").glob("*.parquet"))[0]).to_pylist()
    assert all(r["text"] == texts[r["id"]] and r["domain"] == "python_edu" for r in py)
    cos = pq.read_table(out / "cosmopedia" / "cosmopedia-v2--train-00001-of-00002.parquet")
    src = pq.read_table(hub_dir / "cosmopedia-v2" / "train-00001-of-00002.parquet")
    assert cos.column("id")[5].as_py() == "cosmopedia-v2/train-00001-of-00002:5"
    assert cos.column("text").to_pylist() == src.column("text").to_pylist()
    assert pq.ParquetFile(out / "cosmopedia" / "cosmopedia-v2--train-00001-of-00002.parquet").metadata.num_row_groups > 1
    # the written corpus.yaml reads the ingested corpus with the project's reader
    from omegaconf import OmegaConf

    from attninf.config import build
    from selection.corpora import CorpusConfig, iter_documents

    c2 = build(CorpusConfig, OmegaConf.to_container(OmegaConf.load(out / "corpus.yaml")), "corpus")
    assert sum(1 for _ in iter_documents(c2)) == sum(d["documents"] for d in summary["domains"].values())
    # resume: nothing is re-ingested; another revision of the dataset stops with both named
    marks = {p: p.stat().st_mtime_ns for p in (out / "parts").glob("*.done")}
    assert run_parts(parts, ccfg, icfg, out) == []
    assert {p: p.stat().st_mtime_ns for p in marks} == marks
    f = hub_dir / "open-web-math" / "train-00000-of-00001.parquet"
    t = pq.read_table(f)
    pq.write_table(t.slice(0, t.num_rows - 1), f)
    from selection.corpora import CorpusError

    with pytest.raises(CorpusError, match=r"open-web-math is at revision local:\w+ but .*plan.json was made from local:\w+"):
        plan(ccfg, icfg, out)
    pq.write_table(t, f)


def test_blob_fetcher_retries_transient_errors_and_names_what_still_fails(hub, s3):
    from selection.ingest import BlobFetcher, IngestConfig, s3_getter

    hub_dir, m, broken, texts = hub
    url, _ = s3
    get = s3_getter(IngestConfig(s3_endpoint=url, blob_workers=4))
    calls: dict[str, int] = {}
    ids = sorted(texts)[:40]
    flakes = [b for b in ids[:12] if b not in broken.values()][:10]

    def flaky(blob_id):
        calls[blob_id] = calls.get(blob_id, 0) + 1
        if blob_id in flakes and calls[blob_id] < 3:  # two transient failures, then fine
            raise ConnectionError("connection reset by peer")
        if blob_id == ids[30]:
            raise TimeoutError("read timed out")  # never recovers
        return get(blob_id)

    f = BlobFetcher(flaky, workers=4, retries=3, backoff_s=0.001)
    got = f.fetch([(b, None) for b in ids])
    f.close()
    for b, (text, why, detail) in zip(ids, got):
        if b == ids[30]:
            assert why == "fetch_failed" and "after 4 attempts: TimeoutError" in detail and calls[b] == 4
        elif b in broken.values():
            assert text is None and why in ("missing_blob", "not_gzip", "undecodable") and calls[b] == 1
        else:
            assert why is None and text == texts[b]
    assert f.retried == 10 * 2 + 3


def test_blob_throughput_one_vs_many_workers(hub, s3):
    """Benchmark (printed): blobs/s from the local S3 server with 1 and with 16 fetch threads, as
    it is (the server's CPU bounds it on a small machine) and with 50 ms added to every GET (an
    S3 round trip from a cluster: what the pool is for)."""
    from selection.ingest import BlobFetcher, IngestConfig, s3_getter

    hub_dir, m, broken, texts = hub
    url, _ = s3
    ids = [b for b in sorted(texts) if b not in broken.values()][:120]
    get = s3_getter(IngestConfig(s3_endpoint=url, blob_workers=16))

    def far(blob_id):
        time.sleep(0.05)
        return get(blob_id)

    rates = {}
    for label, getter, n in (("local", get, 120), ("+50ms", far, 48)):
        for workers in (1, 16):
            f = BlobFetcher(getter, workers, 0, 0.0)
            t0 = time.perf_counter()
            got = f.fetch([(b, None) for b in ids[:n]])
            rates[label, workers] = n / (time.perf_counter() - t0)
            f.close()
            assert [g[0] for g in got] == [texts[b] for b in ids[:n]]
    print("\nblob fetch from a local S3 server (moto), blobs/s: " + ", ".join(
        f"{label} {w} worker(s) {r:.0f}" for (label, w), r in rates.items()))
