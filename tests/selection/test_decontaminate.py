"""Contamination: real benchmark items (from the offline packages) planted in a few documents of
a small corpus must be found, named in select's summary and the report, and removed on request;
the hashed n-gram matcher agrees with a plain set-of-tuples reference."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selection.decontaminate import (BenchmarkIndex, ContaminationConfig, Scan, benchmark_items,
                                     normalise)
from selection.select import SelectConfig, select_scores


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """A small offline benchmark folder in eval/benchmarks.py's layout, built by its own builders
    from the first real items of each source package (MMLU: one subject)."""
    from eval.benchmarks import (SOURCES, OfflineDataConfig, _read_jsonl, build_gsm8k, build_humaneval,
                                 build_mmlu)

    tmp = tmp_path_factory.mktemp("bench")
    cfg = OfflineDataConfig(mmlu_dev_per_subject=1, gsm8k_fewshot_pool=1)
    rows = [r for _, r in _read_jsonl(SOURCES["mmlu"].locate()) if r.get("correct_answer") in tuple("ABCD")]
    topic = rows[0]["topic"]
    srcs = {"mmlu": [r for r in rows if r["topic"] == topic][:12],
            "gsm8k": [r for _, r in _read_jsonl(SOURCES["gsm8k"].locate())][:12],
            "humaneval": [r for _, r in _read_jsonl(SOURCES["humaneval"].locate())][:12]}
    for name, builder in (("mmlu", build_mmlu), ("gsm8k", build_gsm8k), ("humaneval", build_humaneval)):
        src = tmp / f"{name}.src.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in srcs[name]))
        builder(tmp / name, cfg, src)
    return tmp


def _prose(rng: random.Random, n: int) -> str:
    words = ("the river valley farmers measured rainfall over seven seasons and compared harvest records "
             "with older accounts from the library archive while students drew maps").split()
    return " ".join(rng.choice(words) for _ in range(n)) + "."


@pytest.fixture
def planted(tmp_path, bench_dir):
    """Corpus (jsonl) + score shards: 3 documents hold a benchmark item each, 1 holds 10 words of
    one (below the 13-gram bar), the rest are prose."""
    items = {b: [i for i in benchmark_items(bench_dir, [b]) if "/test/" in i[1] or b == "humaneval"]
             for b in ("mmlu", "gsm8k", "humaneval")}
    g = json.loads(json.dumps(pq.read_table(bench_dir / "gsm8k/main/test.parquet").to_pylist()[2]))
    m = pq.read_table(sorted(bench_dir.glob("mmlu/*/test.parquet"))[0]).to_pylist()[1]
    h = pq.read_table(bench_dir / "humaneval/openai_humaneval/test.parquet").to_pylist()[3]
    rng = random.Random(0)
    docs = []
    for i in range(60):
        dom = ("web", "code")[i % 2]
        docs.append({"id": f"{dom}-{i:03d}", "domain": dom, "text": _prose(rng, rng.randint(40, 400))})
    docs[4]["text"] += f"\n\nWorked problem. Q: {g['question']}\nA: {g['answer']}\n" + _prose(rng, 30)
    letters = "ABCD"
    docs[10]["text"] = (_prose(rng, 50) + "\n\n**Quiz.** " + m["question"] + "\n"
                        + "\n".join(f"({letters[k]}) {c}" for k, c in enumerate(m["choices"])))
    docs[7]["text"] = "# A tutorial\n```python\n" + h["prompt"] + h["canonical_solution"] + "```\n" + _prose(rng, 60)
    near = " ".join(g["question"].split()[:10])
    docs[20]["text"] += " " + near + " " + _prose(rng, 20)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    rows = []
    for d in docs:
        score = 0.9 if d["id"] in ("web-004", "web-010") else 0.01 if d["id"] == "code-007" else rng.uniform(0.1, 0.8)
        rows.append({"doc_id": d["id"], "domain": d["domain"], "n_tokens": 10,
                     "n_tokens_full": len(d["text"].split()), "loss_base": 1 + rng.random(),
                     "loss_masked": 2.0, "score": score})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "shard-00000.parquet")
    return tmp_path, corpus, {"gsm8k": "web-004", "mmlu": "web-010", "humaneval": "code-007"}, items


def _docs(corpus):
    from attninf.config import build
    from selection.corpora import CorpusConfig, iter_documents

    ccfg = build(CorpusConfig, {"paths": [str(corpus)]}, "corpus")
    return lambda: iter_documents(ccfg)


def _cfg(bench_dir, **kw) -> SelectConfig:
    from attninf.config import build

    return build(SelectConfig, {"figures": False, "contamination": {"data_dir": str(bench_dir)}, **kw}, "select")


def test_planted_items_are_found_named_in_summary_and_report(planted, bench_dir, tmp_path):
    from eval.report_selection import selection_report

    folder, corpus, where, _ = planted
    s = select_scores(str(folder / "shard-*.parquet"), folder / "sel", _cfg(bench_dir), _docs(corpus))
    c = s["contamination"]
    assert c["checked"] and c["contaminated"] == 3 and not c["removed"]
    # which method selected which planted document: AI picks the two high scores, inverse the low one
    assert c["per_method"]["attention_influence"]["web"] == {"gsm8k": 1, "mmlu": 1}
    assert c["per_method"]["inverse"]["code"] == {"humaneval": 1}
    named = {b: [e["doc_id"] for e in exs] for b, exs in c["examples"].items()}
    assert named == {b: [d] for b, d in where.items()}  # the near-miss (10 words) is not flagged
    assert c["examples"]["gsm8k"][0]["items"] == ["gsm8k/test/2"]
    lines = (folder / "sel/contamination.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["doc_id"] for x in lines) == sorted(where.values())

    md = "\n".join(selection_report(folder / "sel", tmp_path / "report")[0])
    for b, d in where.items():
        assert f"`{d}`" in md and f"Examples ({b})" in md
    assert "Contaminated: **3**" in md and "| attention_influence | web | 1 | 0 | 1 |" in md  # gsm8k humaneval mmlu
    subject = sorted(p.name for p in bench_dir.glob("mmlu/*"))[0]
    assert f"mmlu/{subject}/test/1" in c["examples"]["mmlu"][0]["items"] and f"mmlu/{subject}/test/1" in md


def test_decontaminate_removes_them_and_keeps_the_controls_matched(planted, bench_dir):
    folder, corpus, where, _ = planted
    s = select_scores(str(folder / "shard-*.parquet"), folder / "clean",
                      _cfg(bench_dir, decontaminate=True), _docs(corpus))
    picked = {r["doc_id"] for r in pq.read_table(folder / "clean/selected.parquet").to_pylist()}
    assert not picked & set(where.values())
    assert s["contamination"]["removed"] and s["contamination"]["contaminated"] == 3
    assert s["contamination"]["per_method"]["attention_influence"]["web"] == {"gsm8k": 1, "mmlu": 1}
    assert s["token_match"]["all_within"]
    # every selected document was checked, so the clean selection is known clean
    assert s["contamination"]["documents_checked"] >= len(picked)


def test_corpus_scope_checks_every_document(planted, bench_dir):
    folder, corpus, where, _ = planted
    s = select_scores(str(folder / "shard-*.parquet"), folder / "all",
                      _cfg(bench_dir, methods=["attention_influence"], contamination={
                          "data_dir": str(bench_dir), "scope": "corpus"}), _docs(corpus))
    c = s["contamination"]
    assert c["documents_checked"] == 60 and c["contaminated"] == 3
    assert c["found_by_domain"] == {"web": {"gsm8k": 1, "mmlu": 1}, "code": {"humaneval": 1}}
    assert c["per_method"] == {"attention_influence": {"web": {"gsm8k": 1, "mmlu": 1}}}


def test_hashed_ngrams_agree_with_a_set_of_word_tuples(bench_dir):
    """The numpy rolling hash + searchsorted against the obvious set of n-word tuples."""
    items = benchmark_items(bench_dir, ["gsm8k", "humaneval", "mmlu"])
    for n in (5, 8, 13):
        idx = BenchmarkIndex(items, n)
        owners: dict[tuple, set] = {}
        for k, (b, _, text) in enumerate(items):
            w = normalise(text)
            for i in range(len(w) - n + 1):
                owners.setdefault(tuple(w[i:i + n]), set()).add(k)
        # template n-grams (in more than 10 items) are not checked
        ref = {t: {items[k][0] for k in ks} for t, ks in owners.items() if len(ks) <= 10}
        rng = random.Random(n)
        for k in range(30):  # documents mixing item fragments of random length with other words
            b, _, text = items[rng.randrange(len(items))]
            w = normalise(text)
            a = rng.randrange(len(w))
            doc = " ".join(["alpha", "beta"] * rng.randint(0, 8) + w[a:a + rng.randint(1, 30)] + ["omega"])
            dw = normalise(doc)
            want: dict[str, int] = {}
            seen = set()
            for i in range(len(dw) - n + 1):
                t = tuple(dw[i:i + n])
                if t in ref and t not in seen:
                    seen.add(t)
                    for bb in ref[t]:
                        want[bb] = want.get(bb, 0) + 1
            got = {bb: len(v) for bb, v in idx.matches(doc).items()}
            # a shared n-gram owned by two benchmarks is attributed to one of them by the index
            assert sum(got.values()) == len(seen) and set(got) <= set(want)


def test_normalise_ignores_case_punctuation_and_markup():
    assert normalise("Q: What is 2+2?\n**Answer**: ＦＯＵＲ.") == ["q", "what", "is", "2", "2", "answer", "four"]


def test_bad_config_names_the_key():
    from attninf.config import ConfigError, build

    with pytest.raises(ConfigError, match="select.contamination.benchmarks"):
        build(SelectConfig, {"contamination": {"benchmarks": ["arc"]}}, "select")
    with pytest.raises(ConfigError, match="select.decontaminate"):
        build(SelectConfig, {"decontaminate": True, "contamination": {"scope": "none"}}, "select")
    assert Scan  # the scan class is the stage's unit (used through select_scores above)
    assert ContaminationConfig().ngram == 13


def test_missing_benchmark_folder_is_one_line_naming_the_key(planted, tmp_path):
    from attninf.context import InputError

    folder, corpus, _, _ = planted
    with pytest.raises(InputError, match=r"select.contamination: select.contamination.data_dir: .* has no"):
        select_scores(str(folder / "shard-*.parquet"), folder / "bad",
                      _cfg(tmp_path / "nowhere"), _docs(corpus))


def test_sampled_check_counts_its_denominator(planted, bench_dir):
    folder, corpus, where, _ = planted
    s = select_scores(str(folder / "shard-*.parquet"), folder / "sample",
                      _cfg(bench_dir, methods=["attention_influence"], contamination={
                          "data_dir": str(bench_dir), "max_docs": 2}), _docs(corpus))
    c = s["contamination"]
    assert c["max_docs"] == 2 and c["documents_checked"] == 4  # 2 per domain of the one method
    from attninf.config import ConfigError, build

    with pytest.raises(ConfigError, match="select.decontaminate"):
        build(SelectConfig, {"decontaminate": True, "contamination": {"max_docs": 5}}, "select")
