"""Repetition statistics (closed forms), their per-domain Spearman in select (against a plain
Python rank correlation), the max_repetition filter, non-finite rows, and the stability stats."""

from __future__ import annotations

import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attninf.config import ConfigError, build
from selection.repetition import compression_ratio, repeated_ngram_fraction
from selection.select import SelectConfig, select_scores
from selection.stability import average_ranks, compare_runs, jaccard, spearman


def test_repeated_ngram_fraction_closed_forms():
    assert repeated_ngram_fraction("a b c a b c") == pytest.approx(1 / 4)  # abc bca cab abc
    assert repeated_ngram_fraction("one two three four") == 0.0
    assert repeated_ngram_fraction("x x x x x") == pytest.approx(2 / 3)  # xxx three times
    assert repeated_ngram_fraction("Hi, hi.") == 0.0  # fewer than 3 words
    # k >= 2 copies of m distinct words: km-2 trigrams, m distinct (m-2 inside, 2 across a seam)
    words = [f"w{i}" for i in range(10)]
    for k in (2, 3, 5):
        text = " ".join(words * k)
        assert repeated_ngram_fraction(text) == pytest.approx((10 * k - 2 - 10) / (10 * k - 2))
    assert repeated_ngram_fraction("The CAT sat the cat sat") == pytest.approx(1 / 4)  # case-folded


def test_compression_ratio():
    t = "abc" * 200
    assert compression_ratio(t) < 0.05  # 600 bytes of a 3-byte period compress to ~17
    assert compression_ratio("é" * 300) < 0.04  # over UTF-8 bytes (600), not characters (300)
    assert compression_ratio("") == 1.0
    rng = random.Random(0)
    rnd = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(600))
    assert compression_ratio(t) < 0.1 < compression_ratio(rnd)


def test_spearman_closed_form_and_ties():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    y = [2.0, 1.0, 4.0, 3.0, 5.0]
    assert spearman(x, y) == pytest.approx(0.8)  # no ties: 1 - 6 * (1+1+1+1+0) / (5 * 24)
    assert average_ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert spearman(x, [-v for v in x]) == pytest.approx(-1.0)
    assert spearman(x, [1.0] * 5) is None
    assert jaccard([[0, 1], [2, 3]], [[2, 3], [4, 5]]) == pytest.approx(1 / 3)


def test_compare_runs_reports_pairs_and_stable_heads():
    a = [[0.9, 0.1, 0.0], [0.5, 0.4, 0.0]]
    b = [[0.8, 0.0, 0.1], [0.6, 0.3, 0.0]]
    c = [[0.0, 0.9, 0.1], [0.6, 0.3, 0.0]]
    runs = [{"name": "paper-seed0", "scores": a}, {"name": "paper-seed1", "scores": b},
            {"name": "alt-seed0", "scores": c}]
    cmp = compare_runs(runs, fraction=2 / 6)  # top 2 of 6
    assert cmp["top"]["paper-seed0"] == [[0, 0], [1, 0]] and cmp["top"]["alt-seed0"] == [[0, 1], [1, 0]]
    p = {(x["a"], x["b"]): x for x in cmp["pairs"]}
    assert p[("paper-seed0", "paper-seed1")]["jaccard"] == 1.0
    assert p[("paper-seed0", "alt-seed0")]["jaccard"] == pytest.approx(1 / 3)
    # ranks of the 6 flattened scores: a [6, 3, 1.5, 5, 4, 1.5], c [1.5, 6, 3, 5, 4, 1.5] -> 1.25 / 17
    assert p[("paper-seed0", "alt-seed0")]["spearman"] == pytest.approx(5 / 68)
    assert cmp["stable_heads"] == [[1, 0]]
    assert cmp["same_template"]["pairs"] == 1 and cmp["across_templates"]["pairs"] == 2


def _rows(n=90, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rep = round(rng.random(), 1)  # ties on purpose
        rows.append({"doc_id": f"d{i:03d}", "domain": ["web", "code", "math"][i % 3], "n_tokens": 10,
                     "n_tokens_full": 10, "loss_base": 1 + rng.random(), "loss_masked": 2.0,
                     "score": round(rep + rng.gauss(0, 0.3), 2) if i % 3 else rng.random(),
                     "repetition": rep, "compression_ratio": 0.5 + rng.random() / 2})
    return rows


def _write(tmp_path, rows):
    for s in range(2):
        pq.write_table(pa.Table.from_pylist(rows[s::2]), tmp_path / f"shard-{s:05d}.parquet")
    return str(tmp_path / "shard-*.parquet")


def test_select_reports_repetition_spearman_per_domain(tmp_path):
    rows = _rows()
    summ = select_scores(_write(tmp_path, rows), tmp_path / "out", build(SelectConfig, {"figures": False}, "select"))
    rep = summ["repetition"]
    assert rep["max_repetition"] is None and rep["excluded"] == {}
    for dom in ("web", "code", "math"):
        d = [r for r in rows if r["domain"] == dom]
        want = spearman([r["score"] for r in d], [r["repetition"] for r in d])
        assert rep["per_domain"][dom]["spearman_repetition"] == pytest.approx(want, abs=1e-9)
        want_c = spearman([r["score"] for r in d], [r["compression_ratio"] for r in d])
        assert rep["per_domain"][dom]["spearman_compression_ratio"] == pytest.approx(want_c, abs=1e-9)
    assert rep["per_domain"]["code"]["spearman_repetition"] > 0.5  # constructed correlation
    md = (tmp_path / "out" / "repetition.md").read_text()
    assert "| code | 30 |" in md and "no repetition filter" in md


def test_max_repetition_excludes_before_ranking(tmp_path):
    rows = _rows()
    cfg = build(SelectConfig, {"figures": False, "max_repetition": 0.5, "methods": ["attention_influence"]}, "select")
    summ = select_scores(_write(tmp_path, rows), tmp_path / "out", cfg)
    sel = pq.read_table(tmp_path / "out" / "selected.parquet").to_pylist()
    rep = {r["doc_id"]: r["repetition"] for r in rows}
    assert sel and all(rep[r["doc_id"]] <= 0.5 for r in sel)
    for dom in ("web", "code", "math"):
        kept = [r for r in rows if r["domain"] == dom and r["repetition"] <= 0.5]
        assert summ["repetition"]["excluded"][dom] == 30 - len(kept)
        want = sorted(kept, key=lambda r: (-r["score"], r["doc_id"]))[:math.ceil(0.2 * len(kept) - 1e-9)]
        assert sorted(r["doc_id"] for r in sel if r["domain"] == dom) == sorted(r["doc_id"] for r in want)
        assert summ["domains"][dom]["documents"] == len(kept)
    with pytest.raises(ConfigError, match="select.max_repetition"):
        build(SelectConfig, {"max_repetition": 1.5}, "select")


def test_nonfinite_rows_are_never_ranked(tmp_path):
    rows = _rows(30)
    rows[0]["score"] = float("nan")
    rows[3]["score"] = float("inf")
    rows[6]["loss_base"] = float("nan")
    summ = select_scores(_write(tmp_path, rows), tmp_path / "out", build(SelectConfig, {"figures": False}, "select"))
    sel = {r["doc_id"] for r in pq.read_table(tmp_path / "out" / "selected.parquet").to_pylist()}
    assert not sel & {"d000", "d003", "d006"}
    assert summ["nonfinite"] == {"web": 3}  # all three sit in domain web (i % 3 == 0)


def test_old_shards_without_repetition(tmp_path):
    rows = [{k: v for k, v in r.items() if k not in ("repetition", "compression_ratio")} for r in _rows(30)]
    glob = _write(tmp_path, rows)
    summ = select_scores(glob, tmp_path / "out", build(SelectConfig, {"figures": False}, "select"))
    assert summ["repetition"]["columns_present"] is False
    with pytest.raises(ValueError, match="no 'repetition' column"):
        select_scores(glob, tmp_path / "out2", build(SelectConfig, {"figures": False, "max_repetition": 0.3}, "select"))


def test_score_shard_skips_nonfinite_losses_and_stores_repetition(tiny_model_dir, one_torch_thread):
    """A real tiny model whose embedding row of "~" is NaN: the document holding "~" gets NaN
    losses and becomes a counted skip; the others keep their rows, with repetition beside them."""
    import torch

    from selection import scoring
    from selection.corpora import Document
    from selection.models import ModelConfig, load_selector
    from selection.repetition import stats as rep_stats
    from selection.score import ScoreConfig, score_shard

    model, tok = load_selector(ModelConfig(path=str(tiny_model_dir), dtype="float32", device="cpu"))
    bad = tok("~", add_special_tokens=False)["input_ids"]
    assert len(bad) == 1
    with torch.no_grad():
        model.model.embed_tokens.weight[bad[0]] = float("nan")
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "retrieval heads copy tokens",
             "the cat ~ sat on the mat", "alpha beta gamma delta alpha beta gamma delta"]
    docs = [Document(f"d{i}", "web", t, where=f"f.jsonl:{i + 1}") for i, t in enumerate(texts)]
    scorer = scoring.BranchScorer(model, [(1, 0)], mode="uniform")
    cols, stats = score_shard(docs, tokenizer=tok, scorer=scorer,
                              cfg=ScoreConfig(max_tokens=64, batch_tokens=256, progress=False))
    assert stats["skipped"] == {"nonfinite_loss_base": 1}
    assert stats["skip_examples"]["nonfinite_loss_base"] == ["f.jsonl:3"]
    assert cols["doc_id"] == ["d0", "d1", "d3"] and stats["scored"] == 3
    assert all(math.isfinite(s) for s in cols["score"])
    for i, d in zip(cols["doc_id"], range(3)):
        r, c = rep_stats(texts[int(i[1:])])
        assert cols["repetition"][d] == r and cols["compression_ratio"][d] == c
    assert cols["repetition"][0] > 0.5 and cols["repetition"][1] == 0.0


def test_drop_nonfinite_reasons():
    from selection.corpora import Document
    from selection.score import drop_nonfinite

    seen = []
    keep = [(Document(f"d{i}", "web", "x"), [1, 2], 2) for i in range(5)]
    k, b, m = drop_nonfinite(keep, [1.0, float("nan"), 2.0, 0.0, float("-inf")],
                             [1.5, 1.0, float("inf"), 1.0, 1.0], lambda d, r: seen.append((d.doc_id, r)))
    assert [x[0].doc_id for x in k] == ["d0"] and b == [1.0] and m == [1.5]
    assert seen == [("d1", "nonfinite_loss_base"), ("d2", "nonfinite_loss_masked"),
                    ("d3", "zero_loss_base"), ("d4", "nonfinite_loss_base")]
