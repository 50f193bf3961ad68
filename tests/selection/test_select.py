"""Selection against a plain-Python reference on synthetic score shards (no model needed)."""

from __future__ import annotations

import hashlib
import json
import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attninf.config import ConfigError, build
from selection.select import SelectConfig, select_scores


def _shards(tmp_path, n=120, seed=0, ties=True):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        score = round(rng.random(), 1) if ties else rng.random()  # rounding makes many ties
        rows.append({"doc_id": f"d{i:04d}", "domain": ["web", "code", "math"][i % 3],
                     "n_tokens": rng.randint(2, 50), "n_tokens_full": rng.randint(50, 500),
                     "loss_base": 1 + rng.random(), "loss_masked": 2.0, "score": score})
    for s in range(3):
        part = rows[s::3]
        pq.write_table(pa.Table.from_pylist(part), tmp_path / f"shard-{s:05d}.parquet")
    return rows


def _md5(x: str) -> str:
    return hashlib.md5(x.encode()).hexdigest()


def _length_bins(rs, ai: set, bins: int) -> tuple[dict, dict]:
    """Obvious length bins: the AI documents sorted by length in min(bins, n) equal-count groups;
    a document belongs to the last group whose lower edge (midpoint to the previous group) its
    length reaches. Returns (doc_id -> bin, bin -> AI count)."""
    a = sorted((r for r in rs if r["doc_id"] in ai), key=lambda r: (r["n_tokens_full"], r["doc_id"]))
    k = min(bins, len(a))
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(a):
        groups.setdefault(i * k // len(a) + 1, []).append(r["n_tokens_full"])
    edges = {g: (-1e300 if g == 1 else (max(groups[g - 1]) + min(groups[g])) / 2) for g in groups}
    of = {r["doc_id"]: max(g for g in groups if r["n_tokens_full"] >= edges[g]) for r in rs}
    return of, {g: len(v) for g, v in groups.items()}


def _reference(rows, cfg: SelectConfig) -> dict[str, dict[str, list[str]]]:
    """Obvious version: sort each domain; cut the AI ranking by count or tokens; walk every
    control's ranking, keeping a row while the total stays within (1 + tol) x the AI tokens,
    until it is within tol of them."""
    keys = {
        "attention_influence": lambda r: (-r["score"], r["doc_id"]),
        "inverse": lambda r: (r["score"], r["doc_id"]),
        "perplexity": lambda r: (r["loss_base"], r["doc_id"]),
        "random": lambda r: (_md5(f"{cfg.seed}:{r['doc_id']}"), r["doc_id"]),
    }
    out: dict[str, dict[str, list[str]]] = {}
    for m in ["attention_influence"] + [x for x in cfg.methods if x != "attention_influence"]:
        out[m] = {}
        for dom in sorted({r["domain"] for r in rows}):
            rs = [r for r in rows if r["domain"] == dom]
            if m == "length_matched":
                b, quota = _length_bins(rs, set(out["attention_influence"][dom]), cfg.length_bins)
                key = lambda r: (_md5(f"lm:{cfg.seed}:{r['doc_id']}"), r["doc_id"])  # noqa: E731
                within = {r["doc_id"]: i + 1 for k in quota for i, r in
                          enumerate(sorted((r for r in rs if b[r["doc_id"]] == k), key=key))}
                ranked = sorted(rs, key=lambda r: (quota[b[r["doc_id"]]] == 0,
                                                   (within[r["doc_id"]] - 0.5) / max(quota[b[r["doc_id"]]], 1),
                                                   key(r)))
            else:
                ranked = sorted(rs, key=keys[m])
            total = sum(r["n_tokens_full"] for r in ranked)
            picked, acc = [], 0
            if m != "attention_influence":
                target = sum(r["n_tokens_full"] for r in rs if r["doc_id"] in set(out["attention_influence"][dom]))
                lo, hi = target * (1 - cfg.token_tolerance), target * (1 + cfg.token_tolerance)
                prefix, passed = True, []
                for r in ranked:
                    if acc >= lo and not (prefix and acc + r["n_tokens_full"] <= target):
                        break
                    if prefix and acc + r["n_tokens_full"] <= target:
                        picked.append(r)
                        acc += r["n_tokens_full"]
                        continue
                    prefix = False
                    if acc + r["n_tokens_full"] <= hi:
                        picked.append(r)
                        acc += r["n_tokens_full"]
                    else:
                        passed.append(r)
                if acc < lo:  # one swap: the latest pick that can go, for the first row that fits
                    swap = next(((x, y) for x in picked[::-1][:64] for y in passed
                                 if lo <= acc - x["n_tokens_full"] + y["n_tokens_full"] <= hi), None)
                    if swap:
                        picked = [r for r in picked if r is not swap[0]] + [swap[1]]
                out[m][dom] = [r["doc_id"] for r in picked]
                continue
            for r in ranked:
                if cfg.budget == "documents" and len(picked) >= max(1, math.ceil(cfg.ratio * len(ranked) - 1e-9)):
                    break
                if cfg.budget == "tokens" and acc >= cfg.ratio * total:
                    break
                picked.append(r["doc_id"])
                acc += r["n_tokens_full"]
            out[m][dom] = picked
    return out


@pytest.mark.parametrize("budget,ratio", [("documents", 0.2), ("documents", 0.1), ("tokens", 0.3)])
def test_selection_matches_reference(tmp_path, budget, ratio):
    rows = _shards(tmp_path)
    cfg = SelectConfig(ratio=ratio, budget=budget, figures=False)
    summary = select_scores(str(tmp_path / "shard-*.parquet"), tmp_path / "sel", cfg)
    got: dict = {}
    for r in pq.read_table(tmp_path / "sel/selected.parquet").to_pylist():
        got.setdefault(r["method"], {}).setdefault(r["domain"], []).append((r["rank"], r["doc_id"]))
    got = {m: {d: [x for _, x in sorted(v)] for d, v in per.items()} for m, per in got.items()}
    ref = _reference(rows, cfg)
    assert {m: {d: sorted(v) for d, v in per.items()} for m, per in got.items()} == \
        {m: {d: sorted(v) for d, v in per.items()} for m, per in ref.items()}
    assert got["attention_influence"] == ref["attention_influence"]  # in rank order
    ai = summary["methods"]["attention_influence"]["web"]
    assert ai["documents"] == 40 and ai["selected"] == len(got["attention_influence"]["web"])
    assert ai["threshold"] == min(r["score"] for r in rows if r["doc_id"] in got["attention_influence"]["web"])
    # Jaccard from the selections themselves
    a, b = set(got["attention_influence"]["math"]), set(got["perplexity"]["math"])
    assert summary["jaccard"]["attention_influence|perplexity"]["math"] == pytest.approx(len(a & b) / len(a | b))
    assert summary["jaccard"]["attention_influence|inverse"]["web"] == 0.0 or ratio > 0.5


def test_random_control_matches_ai_tokens_and_seed(tmp_path):
    _shards(tmp_path, ties=False)
    s0 = select_scores(str(tmp_path / "shard-*.parquet"), tmp_path / "a", SelectConfig(figures=False, seed=0))
    select_scores(str(tmp_path / "shard-*.parquet"), tmp_path / "b", SelectConfig(figures=False, seed=1))
    for dom in ("web", "code", "math"):
        target = s0["methods"]["attention_influence"][dom]["selected_tokens"]
        got = s0["methods"]["random"][dom]["selected_tokens"]
        assert got <= target * 1.01 and s0["token_match"]["methods"]["random"][dom]["tokens"] == got
    ids = lambda d: {r["doc_id"] for r in pq.read_table(d / "selected.parquet").to_pylist() if r["method"] == "random"}
    assert ids(tmp_path / "a") != ids(tmp_path / "b")
    again = select_scores(str(tmp_path / "shard-*.parquet"), tmp_path / "c", SelectConfig(figures=False, seed=0))
    assert ids(tmp_path / "c") == ids(tmp_path / "a") and again == s0


def test_bad_inputs(tmp_path):
    pq.write_table(pa.table({"doc_id": ["a", "a"], "domain": ["x", "x"], "n_tokens": [3, 4],
                             "loss_base": [1.0, 1.0], "score": [0.1, 0.2]}), tmp_path / "shard-00000.parquet")
    with pytest.raises(ValueError, match="not unique"):
        select_scores(str(tmp_path / "shard-*.parquet"), tmp_path / "o", SelectConfig(figures=False))
    with pytest.raises(ConfigError, match="select.ratio"):
        build(SelectConfig, {"ratio": 0}, "select")
    with pytest.raises(ConfigError, match="select.methods"):
        build(SelectConfig, {"methods": ["random"]}, "select")


def test_summary_is_json_and_out_of_core_settings(tmp_path):
    _shards(tmp_path)
    cfg = SelectConfig(figures=False, threads=1, memory_limit="256MB", methods=["attention_influence"])
    select_scores(str(tmp_path / "shard-*.parquet"), tmp_path / "s", cfg)
    s = json.loads((tmp_path / "s/summary.json").read_text())
    assert set(s["methods"]) == {"attention_influence"} and s["token_column"] == "n_tokens_full"


def _long_tailed(tmp_path, n=300, seed=3):
    """Domains with document lengths spread like web text (log-normal, 20 to ~20k tokens) and
    an AI score that grows with length, as the paper's (its selections are ~2x the average)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        dom = ["web", "code", "math"][i % 3]
        tokens = int(np.clip(rng.lognormal(6.0, 1.0), 20, 20000))
        rows.append({"doc_id": f"d{i:04d}", "domain": dom, "n_tokens": min(tokens, 512), "n_tokens_full": tokens,
                     "loss_base": float(1 + rng.random()), "loss_masked": 2.0,
                     "score": float(np.log(tokens) / 10 + rng.normal(0, 0.2)),
                     "repetition": float(rng.random() * 0.3), "compression_ratio": 0.4})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "shard-00000.parquet")
    return rows


def test_every_control_token_matched_within_1_percent_and_length_matched_follows_ai_lengths(tmp_path):
    rows = _long_tailed(tmp_path)
    s = select_scores(str(tmp_path / "shard-*.parquet"), tmp_path / "sel", SelectConfig(figures=False))
    tm = s["token_match"]
    assert tm["all_within"] and set(tm["methods"]) == {"random", "perplexity", "inverse", "length_matched"}
    for m, per in tm["methods"].items():
        for d, v in per.items():
            assert v["ai_tokens"] == s["methods"]["attention_influence"][d]["selected_tokens"]
            assert v["tokens"] == s["methods"][m][d]["selected_tokens"]
            assert abs(v["tokens"] - v["ai_tokens"]) <= 0.01 * v["ai_tokens"]
    # the selected rows add up to what the summary says
    sel = pq.read_table(tmp_path / "sel/selected.parquet").to_pylist()
    for m in s["methods"]:
        for d in ("web", "code", "math"):
            assert sum(r["n_tokens"] for r in sel if r["method"] == m and r["domain"] == d) == \
                s["methods"][m][d]["selected_tokens"]
    # length_matched has the AI selection's lengths; random has the domain's (shorter)
    prof = s["comparison"]["profile"]
    for d in ("web", "code", "math"):
        ai, lm, rnd = (prof[d][m]["median_tokens"] for m in ("attention_influence", "length_matched", "random"))
        dom = prof[d]["domain"]["median_tokens"]
        assert ai > 1.5 * dom and abs(lm - ai) < 0.25 * ai
        assert s["jaccard"]["attention_influence|length_matched"][d] < 1.0
    # Spearman of the ranking keys against scipy on the same rows
    from scipy.stats import spearmanr

    for d in ("web", "math"):
        rs = [r for r in rows if r["domain"] == d]
        rho = s["comparison"]["spearman"][d]
        assert rho["ai_score|tokens"] == pytest.approx(spearmanr([r["score"] for r in rs],
                                                                 [r["n_tokens_full"] for r in rs])[0], abs=1e-9)
        assert rho["ai_score|neg_loss_base"] == pytest.approx(spearmanr([r["score"] for r in rs],
                                                                        [-r["loss_base"] for r in rs])[0], abs=1e-9)
    assert s["comparison"]["spearman"]["web"]["ai_score|tokens"] > 0.3  # score grows with length here


def test_length_matched_draws_the_ai_count_from_each_length_bin(tmp_path):
    """length_matched interleaves the length bins (cut at the AI selection's length quantiles) in
    proportion to the AI counts: per bin, computed here, its count is the AI count times one
    common factor, and its length distribution follows the AI selection's, not the domain's."""
    rows = _long_tailed(tmp_path, n=600)
    cfg = SelectConfig(figures=False, length_bins=5, methods=["attention_influence", "length_matched"])
    s = select_scores(str(tmp_path / "shard-*.parquet"), tmp_path / "sel", cfg)
    sel = pq.read_table(tmp_path / "sel/selected.parquet").to_pylist()
    for d in ("web", "code", "math"):
        rs = [r for r in rows if r["domain"] == d]
        ai_ids = {r["doc_id"] for r in sel if r["method"] == "attention_influence" and r["domain"] == d}
        b, quota = _length_bins(rs, ai_ids, 5)
        count = lambda m: [sum(1 for r in sel if r["method"] == m and r["domain"] == d and b[r["doc_id"]] == k)  # noqa: E731
                           for k in sorted(quota)]
        ai, lm = count("attention_influence"), count("length_matched")
        assert ai == [quota[k] for k in sorted(quota)]
        f = sum(lm) / sum(ai)
        assert 0.7 < f < 1.4 and all(abs(y - f * x) <= 1.5 for x, y in zip(ai, lm)), (d, ai, lm)
        prof = s["comparison"]["profile"][d]
        assert abs(prof["length_matched"]["median_tokens"] / prof["attention_influence"]["median_tokens"] - 1) < 0.3


def test_outside_the_tolerance_is_reported_not_hidden(tmp_path, caplog):
    """A domain where no set of control documents can match the AI tokens: summary says so."""
    rows = [{"doc_id": f"d{i}", "domain": "x", "n_tokens": 5, "n_tokens_full": 100 if i < 2 else 150,
             "loss_base": 1.0 + i / 10, "loss_masked": 2.0, "score": 1.0 - i / 100} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "shard-00000.parquet")
    with caplog.at_level("WARNING", logger="selection.select"):
        s = select_scores(str(tmp_path / "shard-*.parquet"), tmp_path / "s",
                          SelectConfig(figures=False, methods=["attention_influence", "random", "inverse"]))
    assert s["methods"]["attention_influence"]["x"]["selected_tokens"] == 200  # the two 100-token docs
    assert not s["token_match"]["all_within"]
    v = s["token_match"]["methods"]["inverse"]["x"]
    assert v["tokens"] == 150 and not v["within"] and v["rel_diff"] == pytest.approx(-0.25)
    assert "inverse in x: 150 tokens against the AI selection's 200" in caplog.text


@pytest.mark.slow  # Megatron's indexed datasets: ~10 s alone, 45 s on a busy 2-core machine
def test_length_matched_is_an_arm_mix_trains_on(tmp_path, tiny_tokenizer):
    """arms.<name>={selection: length_matched}: mix copies select's length_matched rows into a
    subset and blends it like any control (pretrain/mix.py reads whatever methods select wrote)."""
    from pretrain.mix import MixConfig, build_mix
    from selection.corpora import Document

    rng = random.Random(1)
    docs = [Document(f"c:{i}", ("web", "code")[i % 2],
                     " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(5, 120))))
            for i in range(80)]
    rows = [{"doc_id": d.doc_id, "domain": d.domain, "n_tokens": 8,
             "n_tokens_full": len(tiny_tokenizer(d.text)["input_ids"]), "loss_base": 1.0 + rng.random(),
             "loss_masked": 2.0, "score": len(d.text) / 1000 + rng.random() / 10} for d in docs]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "shard-00000.parquet")
    s = select_scores(str(tmp_path / "shard-*.parquet"), tmp_path / "sel", SelectConfig(
        figures=False, methods=["attention_influence", "length_matched"]))
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    arms = {"baseline": {"selection": None}, "length_matched": {"selection": "length_matched"}}
    summary = build_mix(iter(docs), tmp_path / "mix", tmp_path / "tok", tiny_tokenizer.eos_token_id,
                        len(tiny_tokenizer), "tiny", MixConfig(shard_docs=40, workers=1, valid_fraction=0.0),
                        arms, tmp_path / "sel/selected.parquet")
    blend = json.loads((tmp_path / "mix/blend.json").read_text())
    sub = blend["subsets"]["length_matched"]
    assert sub["documents"] == sum(v["selected"] for v in s["methods"]["length_matched"].values())
    assert sub["prefix"] in blend["arms"]["length_matched"]["prefixes"]
    assert summary["arms"]["length_matched"]["tokens"] > summary["arms"]["baseline"]["tokens"]
