"""Probe generator: the paper's 3-shot JSON key-value task, seeded, within the token budget.

The test tokenizer is tiny (384 BPE tokens) and therefore verbose: a procedural sentence costs
~35-75 of its tokens, so these tests allow values of up to 80 tokens (the paper's 30 is for the
selector's real tokenizer)."""

from __future__ import annotations

import json
import re

import pytest

from selection.probes import (Probe, generate_probes, load_probes, read_text_source, save_probes,
                              split_sentences)


VT = 80


def _json_part(prompt: str) -> dict:
    start = prompt.index("{")
    end = prompt.index("}\n\n") + 1
    return json.loads(prompt[start:end])


@pytest.fixture(scope="module")
def probes(tiny_tokenizer):
    return generate_probes(tiny_tokenizer, num_probes=6, max_tokens=1024, seed=7, max_value_tokens=VT)


def test_probe_structure(probes, tiny_tokenizer):
    for p in probes:
        obj = _json_part(p.prompt)
        assert len(obj) == p.n_pairs >= 4
        assert all(re.fullmatch(r"[A-Za-z0-9]{32}", k) for k in obj)
        assert obj[p.key] == p.value
        assert p.prompt[p.value_span[0]:p.value_span[1]] == p.value
        assert p.answer == " " + p.value
        # three shots from the same JSON, none is the query, answered with their own values
        assert len(p.shot_keys) == 3 and p.key not in p.shot_keys and len(set(p.shot_keys)) == 3
        for k in p.shot_keys:
            assert f'key: "{k}"\nanswer: {obj[k]}\n\n' in p.prompt
        assert p.prompt.endswith(f'key: "{p.key}"\nanswer:')
        assert len(set(obj.values())) == len(obj), "values within a probe are distinct"
        n_val = len(tiny_tokenizer(p.answer, add_special_tokens=False)["input_ids"])
        assert 5 <= n_val <= VT


def test_token_budget_is_tight(probes, tiny_tokenizer):
    for p in probes:
        n = (len(tiny_tokenizer(p.prompt)["input_ids"])
             + len(tiny_tokenizer(p.answer, add_special_tokens=False)["input_ids"]))
        assert n == p.n_tokens <= 1024
        # "just under": one more pair (key ~ 32 chars + value) would not have fitted
        assert p.n_tokens > 1024 - 2 * (1024 / p.n_pairs)


def test_seeded_and_saved(probes, tiny_tokenizer, tmp_path):
    again = generate_probes(tiny_tokenizer, num_probes=6, max_tokens=1024, seed=7, max_value_tokens=VT)
    assert again == probes
    other = generate_probes(tiny_tokenizer, num_probes=6, max_tokens=1024, seed=8, max_value_tokens=VT)
    assert [p.key for p in other] != [p.key for p in probes]
    save_probes(tmp_path / "probes.jsonl", probes)
    assert load_probes(tmp_path / "probes.jsonl") == probes


def test_text_source_jsonl(tmp_path, tiny_tokenizer):
    rows = [{"text": f"Sentence number {i} talks about the quiet harbour town. Another line {i} "
                     f"describes a walk along the canal at noon."} for i in range(60)]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sents = read_text_source(src)
    assert len(sents) == 120
    ps = generate_probes(tiny_tokenizer, 2, 1024, seed=0, sentences=sents, max_value_tokens=VT)
    for p in ps:
        assert all(v in sents for v in _json_part(p.prompt).values())


def test_text_source_errors(tmp_path, tiny_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine."}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'text'"):
        read_text_source(bad)
    small = tmp_path / "small.txt"
    small.write_text("Only one usable sentence lives in this file.")
    with pytest.raises(ValueError, match="usable sentences"):
        generate_probes(tiny_tokenizer, 1, 512, sentences=read_text_source(small), max_value_tokens=VT)
    with pytest.raises(ValueError, match="cannot hold"):
        generate_probes(tiny_tokenizer, 1, 100, max_value_tokens=VT)


def test_split_sentences_drops_nothing_in_prose():
    text = "First sentence here. Second one follows! Is this the third?\n\nNew paragraph now."
    assert list(split_sentences(text)) == ["First sentence here.", "Second one follows!",
                                           "Is this the third?", "New paragraph now."]


def test_probe_json_roundtrip(probes):
    p = probes[0]
    assert Probe.from_json(json.loads(json.dumps(p.to_json()))) == p


def test_text_source_from_one_corpus_domain(tmp_path, tiny_tokenizer):
    """detect.text_source=corpus:<domain>: sentences of that domain's first text_docs documents
    only (sentence-split, clean), and probe values drawn from them."""
    from attninf.config import ConfigError, build
    from selection.detect import DetectConfig
    from selection.probes import load_sentences

    rows = []
    for i in range(80):
        dom = ("web", "code")[i % 2]
        word = "harbour" if dom == "web" else "compiler"
        rows.append({"id": f"{dom}{i}", "domain": dom,
                     "text": f"Document {i} tells about the {word} in plain words. It has a second {word} "
                             f"sentence number {i} here.\n\ndef f(x): return x"})
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = {"paths": [str(src)], "domains": ["web", "code"]}
    stats: dict = {}
    sents = load_sentences("corpus:web", corpus=corpus, max_docs=30, stats=stats)
    assert stats == {"documents": 30, "sentences": 60} and len(sents) == 60
    assert all("harbour" in s for s in sents) and not any("def f" in s for s in sents)
    assert sents[0] == "Document 0 tells about the harbour in plain words."
    ps = generate_probes(tiny_tokenizer, 2, 1024, seed=0, sentences=sents, max_value_tokens=VT)
    assert all(v in sents for p in ps for v in _json_part(p.prompt).values())
    with pytest.raises(ConfigError, match="'math' is not in corpus.domains"):
        load_sentences("corpus:math", corpus=corpus)
    with pytest.raises(ConfigError, match="detect.text_source"):
        build(DetectConfig, {"text_source": "corpus:"}, "detect")


def test_value_repetition_counts_the_generators_recurring_phrases(tiny_tokenizer):
    """heads.json probe_text: generator values share phrases inside a probe; distinct prose does not."""
    import random

    from selection.detect import value_repetition

    gen = value_repetition(generate_probes(tiny_tokenizer, 2, 1024, seed=0, max_value_tokens=VT))
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnop") for _ in range(5)) for _ in range(400)]
    prose = [" ".join(rng.sample(vocab, 6)).capitalize() + "." for _ in range(300)]
    real = value_repetition(generate_probes(tiny_tokenizer, 2, 1024, seed=0, sentences=prose, max_value_tokens=VT))
    assert gen["value_slots"] >= 8 and gen["distinct_values_per_probe"] > 4
    assert gen["mean_value_3gram_repetition"] > 0.05 > real["mean_value_3gram_repetition"]
