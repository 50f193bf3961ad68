"""The offline demo corpus: cutting, sampling, dedup, manifest, and the missing-package path."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from tools import demo_corpus as dc


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- cutting -------------------------------------------------------------------------------------

def test_split_prose_respects_bounds_and_keeps_text():
    paras = [f"Paragraph {i}. " + "word " * (20 + 7 * (i % 5)) for i in range(40)]
    text = "\n\n".join(paras)
    pieces = dc.split_prose(text, min_chars=100, max_chars=500)
    assert len(pieces) > 1
    assert all(100 <= len(p) <= 500 for p in pieces)
    # nothing invented, dropped or reordered: each piece is a run of whole paragraphs
    assert all(p in text for p in pieces)
    assert [q.strip() for p in pieces for q in p.split("\n\n")] == [p.strip() for p in paras]


def test_split_prose_hard_cuts_a_single_huge_line():
    pieces = dc.split_prose("x" * 1050, min_chars=10, max_chars=400)
    assert [len(p) for p in pieces] == [400, 400, 250]


def test_split_code_cuts_between_top_level_statements():
    funcs = [f"def f{i}(x):\n    # step {i}\n    y = x + {i}\n    return y * {i}\n\n" for i in range(30)]
    src = "import os\n\n\n" + "".join(funcs)
    pieces = dc.split_code(src, min_chars=20, max_chars=300)
    assert all(len(p) <= 300 for p in pieces)
    for p in pieces:  # every piece starts at a top-level statement and holds whole functions
        assert p.startswith(("import", "def ")), p[:30]
        assert p.count("def ") == p.count("return y")
    # each piece is a verbatim slice of the source, and together they cover all of it in order
    assert all(p in src for p in pieces)
    assert "".join("".join(pieces).split()) == "".join(src.split())


def test_small_text_is_one_doc_or_dropped():
    assert dc.split_prose("short", 200, 1000) == []
    assert dc.split_prose("a" * 300, 200, 1000) == ["a" * 300]


def test_html_and_roff_to_text():
    h = ("<html><head><title>T</title><style>p{}</style></head><body><h1>Groups</h1>"
         "<p>A group is a set &amp; an operation.</p><script>x()</script><p>Second.</p></body></html>")
    assert dc.html_to_text(h) == "Groups\n\nA group is a set & an operation.\n\nSecond."
    roff = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list directory contents\n.PP\n\\fB\\-a\\fR, all'
    t = dc.roff_to_text(roff)
    assert "NAME" in t and "ls - list directory contents" in t and "-a, all" in t and "\\f" not in t


def test_quotas_sum_and_follow_weights():
    q = dc._quotas(10, {"a": 0.6, "b": 0.2, "c": 0.2})
    assert q == {"a": 6, "b": 2, "c": 2}
    q = dc._quotas(7, {"a": 1.0, "b": 1.0, "c": 1.0})
    assert sum(q.values()) == 7 and max(q.values()) - min(q.values()) <= 1


# --- building ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_corpus")
    cfg = dc.BuildConfig(per_domain=16, min_chars=200, max_chars=1500)
    return out, cfg, dc.build(out, cfg)


def test_build_writes_four_domains_with_the_reader_fields(built):
    out, cfg, m = built
    assert sorted(p.name for p in out.glob("*.jsonl")) == sorted(f"{d}.jsonl" for d in dc.DOMAINS)
    all_ids, all_texts = [], []
    for d in dc.DOMAINS:
        rows = _rows(out / f"{d}.jsonl")
        assert 0 < len(rows) <= cfg.per_domain
        assert m["domains"][d]["documents"] == len(rows)
        assert m["domains"][d]["chars"] == sum(len(r["text"]) for r in rows)
        for r in rows:
            assert set(r) == {"id", "domain", "text", "source", "license"}
            assert r["domain"] == d and r["license"] and r["source"] in m["sources"]
            assert cfg.min_chars <= len(r["text"]) <= cfg.max_chars
            # ids are machine-independent (no absolute install paths leak into the corpus)
            assert not r["id"].startswith("/") and sys.prefix not in r["id"]
        all_ids += [r["id"] for r in rows]
        all_texts += [dc.normalise(r["text"]) for r in rows]
    assert len(set(all_ids)) == len(all_ids)
    assert len(set(all_texts)) == len(all_texts)  # exact duplicates removed across domains
    # the always-present sources are there
    assert m["sources"]["cpython-stdlib"]["documents"] == cfg.per_domain
    assert m["sources"]["wikipedia-leads"]["documents"] > 0
    assert m["total"]["documents"] == sum(v["documents"] for v in m["domains"].values())


def test_negatives_are_mixed_into_the_web_domain(built):
    out, cfg, m = built
    neg_sources = {n for n, s in m["sources"].items() if s["negative"] and s.get("present")}
    if not neg_sources:
        pytest.skip("no changelogs, licences or man pages on this system")
    web = _rows(out / "fineweb_edu.jsonl")
    n_neg = sum(r["source"] in neg_sources for r in web)
    assert n_neg == m["domains"]["fineweb_edu"]["negatives"]
    assert n_neg == round(cfg.per_domain * cfg.negatives_fraction)
    assert all(r["source"] not in neg_sources for d in dc.DOMAINS[1:] for r in _rows(out / f"{d}.jsonl"))


def test_build_is_deterministic_and_seeded(built, tmp_path):
    out, cfg, _ = built
    dc.build(tmp_path / "same", cfg)
    for d in dc.DOMAINS:
        assert (tmp_path / "same" / f"{d}.jsonl").read_bytes() == (out / f"{d}.jsonl").read_bytes()
    dc.build(tmp_path / "other", dataclasses.replace(cfg, seed=1))
    def ids(root):
        return [r["id"] for r in _rows(root / "python_edu.jsonl")]

    assert ids(tmp_path / "other") != ids(out)


def test_missing_debian_sources_fall_back_and_say_how_to_install(tmp_path):
    sources = dc.default_sources()
    for s in sources:  # pretend none of the Debian documentation packages is installed
        if s.package:
            s.available = lambda: False
    cfg = dc.BuildConfig(per_domain=10, max_chars=1500)
    m = dc.build(tmp_path, cfg, sources)
    missing_pkgs = {e["package"] for e in m["missing"] if e["package"]}
    assert missing_pkgs == {s.package for s in sources if s.package}
    assert m["apt_command"].startswith("apt-get update && apt-get install -y")
    assert all(p in m["apt_command"] for p in missing_pkgs)
    assert m["fallbacks_used"]["cosmopedia"] == ["pydoc-topics"]
    assert m["fallbacks_used"]["openwebmath"][0] == "wikipedia-math"
    for d in dc.DOMAINS:
        rows = _rows(tmp_path / f"{d}.jsonl")
        assert len(rows) == cfg.per_domain
        assert not any(r["source"] in {s.name for s in sources if s.package} for r in rows)


def test_a_domain_without_any_source_is_an_error(tmp_path):
    sources = [s for s in dc.default_sources() if s.domain != "openwebmath"]
    with pytest.raises(SystemExit, match="openwebmath.*no documents.*apt-get install"):
        dc.build(tmp_path, dc.BuildConfig(per_domain=3), sources)


def test_cli_builds_and_rejects_bad_arguments(tmp_path, capsys):
    assert dc.main(["--out", str(tmp_path), "--per-domain", "4", "--max-chars", "1200",
                    "--domains", "python_edu", "openwebmath"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["openwebmath.jsonl", "python_edu.jsonl"]
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["config"]["per_domain"] == 4 and list(m["domains"]) == ["python_edu", "openwebmath"]
    assert "python_edu" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        dc.main(["--out", str(tmp_path), "--min-chars", "500", "--max-chars", "400"])
