"""Corpus readers: fields, stable ids, domains, caps and every kind of bad input."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attninf.config import ConfigError, build
from selection.corpora import CorpusConfig, CorpusError, iter_documents


def _jsonl(path, rows):
    with open(path, "wb") as fh:
        fh.writelines(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows)
    return str(path)


def test_jsonl_fields_ids_and_order(tmp_path):
    _jsonl(tmp_path / "b_part.jsonl", [{"id": "x1", "domain": "web", "text": "hello"},
                                       {"domain": "math", "text": "1+1=2"}])
    _jsonl(tmp_path / "a_part.jsonl", [{"id": "y", "domain": "web", "text": "first file"}])
    cfg = CorpusConfig(paths=[str(tmp_path / "*.jsonl")])
    docs = list(iter_documents(cfg))
    # files sorted by name; an id field wins, else "<stem>:<row>"
    assert [(d.doc_id, d.domain, d.text) for d in docs] == [
        ("y", "web", "first file"), ("x1", "web", "hello"), ("b_part:1", "math", "1+1=2")]


def test_custom_fields_and_domain_per_file(tmp_path):
    p = tmp_path / "code.jsonl"
    _jsonl(p, [{"content": "def f(): pass", "uid": 7}, {"content": "x = 1"}])
    cfg = build(CorpusConfig, {"domain_paths": {"python": [str(p)]}, "text_field": "content",
                               "id_field": "uid"}, "corpus")
    docs = list(iter_documents(cfg))
    assert [(d.doc_id, d.domain) for d in docs] == [("7", "python"), ("code:1", "python")]


def test_bad_rows_are_counted_skips_with_file_and_row(tmp_path):
    p = tmp_path / "bad.jsonl"
    _jsonl(p, [{"id": "ok", "domain": "web", "text": "fine text"},
               {"id": "e", "domain": "web", "text": "   "},
               {"id": "m", "domain": "web"},
               b'{"id": "u", "domain": "web", "text": "caf\xe9"}\n',
               b"{not json\n",
               {"id": "n", "domain": "web", "text": 5},
               {"id": "nd", "text": "no domain"}])
    stats: dict = {}
    docs = list(iter_documents(CorpusConfig(paths=[str(p)]), with_skips=True, stats=stats))
    assert [d.skip for d in docs] == [None, "empty", "missing_field", "undecodable", "bad_json",
                                      "not_text", "missing_domain"]
    assert docs[3].where == f"{p}:3"
    assert stats == {"documents": 1, "skipped": {"empty": 1, "missing_field": 1, "undecodable": 1,
                                                 "bad_json": 1, "not_text": 1, "missing_domain": 1}}
    # without with_skips only good documents come out, but the skips are still counted
    stats2: dict = {}
    assert [d.doc_id for d in iter_documents(CorpusConfig(paths=[str(p)]), stats=stats2)] == ["ok"]
    assert sum(stats2["skipped"].values()) == 6


def test_parquet_reader_and_truncated_file(tmp_path):
    p = tmp_path / "part.parquet"
    pq.write_table(pa.table({"text": ["alpha beta", "gamma"], "domain": ["d1", "d2"]}), p)
    cfg = CorpusConfig(kind="parquet", paths=[str(p)], id_field=None)
    assert [(d.doc_id, d.domain) for d in iter_documents(cfg)] == [("part:0", "d1"), ("part:1", "d2")]
    bad = tmp_path / "cut.parquet"
    bad.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(CorpusError, match="cut.parquet"):
        list(iter_documents(CorpusConfig(kind="parquet", paths=[str(bad)])))


def test_domain_filter_error_or_skip_and_caps(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"domain": d, "text": f"t{i}"} for i, d in
                                      enumerate(["a", "b", "a", "zzz", "a", "b"])])
    with pytest.raises(CorpusError, match=r"c.jsonl:3.*'zzz'"):
        list(iter_documents(CorpusConfig(paths=[p], domains=["a", "b"])))
    stats: dict = {}
    cfg = CorpusConfig(paths=[p], domains=["a", "b"], unknown_domain="skip", max_docs_per_domain=2)
    docs = list(iter_documents(cfg, stats=stats))
    assert [d.doc_id for d in docs] == ["c:0", "c:1", "c:2", "c:5"]
    assert stats["skipped"] == {"domain_not_configured": 1}


def test_config_validation_names_keys(tmp_path):
    with pytest.raises(ConfigError, match="corpus.paths"):
        build(CorpusConfig, {"kind": "jsonl"}, "corpus")
    with pytest.raises(ConfigError, match="corpus.kind"):
        build(CorpusConfig, {"kind": "csv", "paths": ["x"]}, "corpus")
    with pytest.raises(ConfigError, match="corpus.txt_field"):
        build(CorpusConfig, {"paths": ["x"], "txt_field": "t"}, "corpus")
    with pytest.raises(CorpusError, match="not found"):
        list(iter_documents(CorpusConfig(paths=[str(tmp_path / "nope.jsonl")])))


def test_smollm_corpus_config_builds():
    from pathlib import Path

    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[2] / "conf" / "corpus"
    node = OmegaConf.merge(OmegaConf.load(root / "jsonl.yaml"), OmegaConf.load(root / "smollm_corpus.yaml"))
    node.pop("defaults", None)
    cfg = build(CorpusConfig, node, "corpus")
    assert [s.domain for s in cfg.sources] == ["fineweb_edu", "cosmopedia", "python_edu", "openwebmath"]
    assert cfg.sources[2].text_from == "swh_blob"


def test_hf_reader_streams_a_local_dataset(tmp_path):
    """kind=hf through the real `datasets` streaming loader (a local json builder, no hub)."""
    p = _jsonl(tmp_path / "hub.jsonl", [{"text": "one doc", "uid": "u1"}, {"text": ""},
                                        {"text": "third", "uid": "u3"}])
    cfg = build(CorpusConfig, {"kind": "hf", "sources": [
        {"path": "json", "data_files": [p], "domain": "web", "id_field": "uid", "max_docs": 3}]}, "corpus")
    stats: dict = {}
    docs = list(iter_documents(cfg, with_skips=True, stats=stats))
    assert [(d.doc_id, d.domain, d.skip) for d in docs] == [("u1", "web", None), ("json:1", "web", "empty"),
                                                            ("u3", "web", None)]
    assert stats == {"documents": 2, "skipped": {"empty": 1}}
