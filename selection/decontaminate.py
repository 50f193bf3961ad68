"""Contamination of the selected documents by the evaluation sets: word n-gram overlap.

If the selected documents contain benchmark items, a gain on that benchmark is leakage, not
reasoning. A document is contaminated by a benchmark when it shares at least `min_matches`
word n-grams (13 by default, as GPT-3 and datatrove) with one of its items, after the same
normalisation on both sides: NFKC, lower case, words = runs of letters and digits (punctuation,
markup and whitespace are ignored, so "Q: What is 2+2?" and "what is 2 2" are the same words).

Items (the offline evaluation data, eval/benchmarks.py, every split, few-shot pools included):
MMLU question + its four choices, GSM8K question + reference solution, HumanEval prompt +
canonical solution. An item shorter than n words cannot be checked and is counted
(`too_short` in the summary). An n-gram found in more than `template_items` items is template
text (MMLU moral_scenarios opens ~900 questions with the same sentence) and is not checked
(`template_ngrams`): it would flag a document that quotes the template as a copy of every item.

Scale: the benchmarks' n-grams are hashed once into one sorted uint64 array (about 1M n-grams,
8 MB, plus the item index per n-gram); documents are streamed, each one's n-gram hashes computed
in numpy (a polynomial rolling hash over 64-bit word hashes) and looked up with searchsorted.
Only the contaminated documents are kept. With scope `selected` the corpus is streamed once and
only the selected documents (a sorted uint64 array of doc-id hashes) are hashed; scope `corpus`
hashes every document. One process hashes ~180k words/s on a 2-core CPU, so at paper scale
(tens of billions of selected words) check a sample (`max_docs` per method and domain: a
contamination rate with its denominator) and still expect one streaming pass over the corpus. Collisions: ~1M benchmark n-grams against 2^64 hashes, so about 5e-14 per
document n-gram; each reported match carries the matched words for a person to confirm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from attninf.config import check

log = logging.getLogger(__name__)

BENCHMARKS = ("mmlu", "gsm8k", "humaneval")
SCOPES = ("selected", "corpus", "none")
_WORD = re.compile(r"[^\W_]+")
_P = np.uint64(0x100000001B3)  # odd multiplier of the rolling n-gram hash


@dataclass
class ContaminationConfig:
    """`select.contamination` (conf/select/paper.yaml)."""

    scope: str = "selected"  # selected (the selected documents) | corpus (every document) | none
    ngram: int = 13  # words per n-gram (GPT-3, datatrove)
    min_matches: int = 1  # shared n-grams that make a document contaminated by a benchmark
    template_items: int = 10  # an n-gram in more items than this is template text, not checked
    benchmarks: list[str] = field(default_factory=lambda: list(BENCHMARKS))
    data_dir: str | None = None  # a folder in eval/benchmarks.py's layout; null = the eval stage's offline data
    max_docs: int | None = None  # scope=selected: check a seeded sample of at most this many documents per
    # method and domain (a contamination rate, not a clean selection; null = every selected document)
    examples: int = 5  # contaminated documents shown per benchmark in the report
    example_chars: int = 240

    def validate(self) -> None:
        check(self.scope in SCOPES, "scope", f"'{self.scope}' is not one of {list(SCOPES)}")
        check(self.ngram >= 3, "ngram", f"{self.ngram} words is too short to mean overlap (>= 3)")
        check(self.min_matches >= 1, "min_matches", "must be >= 1")
        check(self.template_items >= 1, "template_items", "must be >= 1")
        check(self.max_docs is None or self.max_docs >= 1, "max_docs", "must be >= 1 or null (all)")
        bad = [b for b in self.benchmarks if b not in BENCHMARKS]
        check(not bad and bool(self.benchmarks), "benchmarks", f"unknown {bad}; known {list(BENCHMARKS)}")


def normalise(text: str) -> list[str]:
    """Words of `text` after NFKC and lower-casing (letters and digits only)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


class WordHasher:
    """Stable 64-bit word hashes (blake2b), cached: the same in every process and machine."""

    def __init__(self, max_cache: int = 2_000_000):
        self.cache: dict[str, int] = {}
        self.max_cache = max_cache

    def __call__(self, words: list[str]) -> np.ndarray:
        c = self.cache
        out = np.empty(len(words), dtype=np.uint64)
        for i, w in enumerate(words):
            h = c.get(w)
            if h is None:
                if len(c) >= self.max_cache:
                    c.clear()
                h = c[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            out[i] = h
        return out


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every run of n consecutive words: sum_k h[i+k] * P^(n-1-k) mod 2^64."""
    m = len(word_hashes) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    g = word_hashes[:m].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            g = g * _P + word_hashes[k:k + m]
    return g


def benchmark_items(data_dir: Path, benchmarks: Iterable[str]) -> list[tuple[str, str, str]]:
    """(benchmark, item id, text) of every item of the offline evaluation data in `data_dir`."""
    import pyarrow.parquet as pq

    items: list[tuple[str, str, str]] = []
    data_dir = Path(data_dir)
    for b in benchmarks:
        files = sorted((data_dir / b).glob("*/*.parquet"))
        if not files:
            raise FileNotFoundError(f"{data_dir / b}: no parquet files (build with `python -m eval.benchmarks`)")
        for f in files:
            rows = pq.read_table(f).to_pylist()
            for i, r in enumerate(rows):
                if b == "mmlu":
                    text, iid = r["question"] + "\n" + "\n".join(map(str, r["choices"])), f"mmlu/{f.parent.name}/{f.stem}/{i}"
                elif b == "gsm8k":
                    text, iid = r["question"] + "\n" + r["answer"], f"gsm8k/{f.stem}/{i}"
                else:
                    text, iid = r["prompt"] + r["canonical_solution"], r["task_id"]
                items.append((b, iid, text))
    return items


class BenchmarkIndex:
    """Every benchmark item's n-gram hashes in one sorted array, with the item behind each."""

    def __init__(self, items: list[tuple[str, str, str]], n: int, hasher: WordHasher | None = None,
                 max_items: int = 10):
        self.n = n
        self.items = items
        self.hasher = hasher or WordHasher()
        hashes, owners = [], []
        self.stats: dict[str, dict] = {}
        for idx, (b, _, text) in enumerate(items):
            st = self.stats.setdefault(b, {"items": 0, "too_short": 0, "ngrams": 0})
            st["items"] += 1
            g = ngram_hashes(self.hasher(normalise(text)), n)
            if not g.size:
                st["too_short"] += 1
                continue
            g = np.unique(g)
            st["ngrams"] += int(g.size)
            hashes.append(g)
            owners.append(np.full(g.size, idx, dtype=np.int64))
        h = np.concatenate(hashes) if hashes else np.empty(0, dtype=np.uint64)
        o = np.concatenate(owners) if owners else np.empty(0, dtype=np.int64)
        order = np.argsort(h, kind="stable")
        h, o = h[order], o[order]
        # template n-grams (in more than max_items items, e.g. MMLU moral_scenarios' fixed question)
        # say nothing about one item: dropped, counted per benchmark
        uniq, first, counts = np.unique(h, return_index=True, return_counts=True)
        keep = counts <= max_items
        for i in np.nonzero(~keep)[0]:
            b = items[int(o[first[i]])][0]
            self.stats[b]["template_ngrams"] = self.stats[b].get("template_ngrams", 0) + 1
        self.hash, self.owner = uniq[keep], o[first[keep]]

    @classmethod
    def from_config(cls, cfg: ContaminationConfig) -> "BenchmarkIndex":
        """data_dir given: a folder in eval/benchmarks.py's layout, read as is; null: the eval
        stage's offline data, built from the PyPI packages when missing."""
        if cfg.data_dir:
            data_dir = Path(cfg.data_dir).expanduser()
            missing = [b for b in cfg.benchmarks if not (data_dir / b).is_dir()]
            if missing:
                raise FileNotFoundError(f"select.contamination.data_dir: {data_dir} has no {missing} folder(s) "
                                        "(build it with `python -m eval.benchmarks --out DIR`, or leave it null)")
        else:
            from eval.benchmarks import ensure_offline_data  # lazy: the eval package owns the data

            data_dir, _ = ensure_offline_data()
        return cls(benchmark_items(data_dir, cfg.benchmarks), cfg.ngram, max_items=cfg.template_items)

    def matches(self, text: str) -> dict[str, list[tuple[int, int]]]:
        """benchmark -> [(word position in the document, item index)] of the shared n-grams
        (one per distinct document n-gram)."""
        words = normalise(text)
        g = ngram_hashes(self.hasher(words), self.n)
        if not g.size or not self.hash.size:
            return {}
        pos = np.searchsorted(self.hash, g)
        pos[pos >= self.hash.size] = 0
        hit = np.nonzero(self.hash[pos] == g)[0]
        out: dict[str, list[tuple[int, int]]] = {}
        seen: set[int] = set()
        for i in hit:
            if int(g[i]) in seen:
                continue
            seen.add(int(g[i]))
            item = int(self.owner[pos[i]])
            out.setdefault(self.items[item][0], []).append((int(i), item))
        return out


def doc_key(doc_ids: Iterable[str]) -> np.ndarray:
    """64-bit hashes of doc ids (membership tests on millions of ids without a Python set)."""
    return np.array([int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8).digest(), "little")
                     for d in doc_ids], dtype=np.uint64)


class Scan:
    """The contamination check of one select stage: which documents were checked, which are
    contaminated (with their matches), and which method selected them."""

    def __init__(self, cfg: ContaminationConfig, index: BenchmarkIndex | None = None):
        self.cfg = cfg
        t0 = time.perf_counter()
        self.index = index or BenchmarkIndex.from_config(cfg)
        self.index_s = time.perf_counter() - t0
        self.checked = np.empty(0, dtype=np.uint64)  # sorted doc-id hashes
        self.found: dict[str, dict] = {}  # doc_id -> record
        self.selected_by: dict[str, set[str]] = {}  # doc_id -> methods that selected it (any pass)
        self.documents = 0
        self.words = 0
        self.wall_s = 0.0

    def run(self, docs: Iterable, wanted: np.ndarray | None) -> None:
        """Check the documents of `docs` whose id hash is in `wanted` (sorted; None = all)."""
        t0 = time.perf_counter()
        done: list[np.ndarray] = []
        batch: list = []

        def flush() -> None:
            keys = doc_key([d.doc_id for d in batch])
            if wanted is not None:
                p = np.searchsorted(wanted, keys)
                p[p >= wanted.size] = 0
                keep = wanted[p] == keys if wanted.size else np.zeros(len(batch), dtype=bool)
            else:
                keep = np.ones(len(batch), dtype=bool)
            for d, k in zip(batch, keep):
                if k:
                    self._check(d)
            done.append(keys[keep])
            batch.clear()

        for d in docs:
            batch.append(d)
            if len(batch) >= 4096:
                flush()
        if batch:
            flush()
        self.checked = np.unique(np.concatenate([self.checked, *done]))
        self.wall_s += time.perf_counter() - t0

    def _check(self, doc) -> None:
        self.documents += 1
        m = self.index.matches(doc.text)
        self.words += len(doc.text.split())
        hits = {b: v for b, v in m.items() if len(v) >= self.cfg.min_matches}
        if not hits:
            return
        words = normalise(doc.text)
        n, ch = self.cfg.ngram, self.cfg.example_chars
        rec = {"doc_id": doc.doc_id, "domain": doc.domain, "benchmarks": {}}
        for b, v in hits.items():
            first_pos, first_item = v[0]
            items = sorted({self.index.items[i][1] for _, i in v})
            rec["benchmarks"][b] = {
                "ngrams": len(v), "items": items[:10], "n_items": len(items),
                "matched": " ".join(words[first_pos:first_pos + n]),
                "item_text": self.index.items[first_item][2][:ch]}
        self.found[doc.doc_id] = rec

    def unchecked(self, con) -> np.ndarray:
        """Sorted hashes of the selected doc ids not yet checked (`sel` table of the select stage);
        with max_docs, of a seeded sample (md5 order) of each method and domain."""
        if self.cfg.max_docs is None:
            q = "SELECT DISTINCT doc_id FROM sel"
        else:
            q = (f"SELECT DISTINCT doc_id FROM (SELECT doc_id, row_number() OVER (PARTITION BY method, domain "
                 f"ORDER BY md5('contam:' || doc_id), doc_id) AS k FROM sel) WHERE k <= {int(self.cfg.max_docs)}")
        ids = [r[0] for r in con.execute(q).fetchall()]
        keys = np.unique(doc_key(ids))
        return keys[~np.isin(keys, self.checked)]

    def note_selection(self, con) -> None:
        """Record which methods selected each contaminated document (this pass)."""
        if not self.found:
            return
        con.execute("CREATE OR REPLACE TEMP TABLE found_ids (doc_id VARCHAR)")
        con.executemany("INSERT INTO found_ids VALUES (?)", [(d,) for d in self.found])
        for d, m in con.execute("SELECT s.doc_id, s.method FROM sel s JOIN found_ids f USING (doc_id)").fetchall():
            self.selected_by.setdefault(d, set()).add(m)

    def contaminated_in_selection(self, con) -> list[str]:
        if not self.found:
            return []
        self.note_selection(con)
        return [r[0] for r in con.execute(
            "SELECT DISTINCT s.doc_id FROM sel s JOIN found_ids f USING (doc_id)").fetchall()]

    def contaminated_ids(self) -> list[str]:
        return sorted(self.found)

    def summary(self, removed: bool) -> dict:
        """summary.json `contamination`: counts per method, domain and benchmark, and examples."""
        per_method: dict = {}
        for d, rec in self.found.items():
            for m in sorted(self.selected_by.get(d, ())):
                for b in rec["benchmarks"]:
                    cell = per_method.setdefault(m, {}).setdefault(rec["domain"], {})
                    cell[b] = cell.get(b, 0) + 1
        corpus: dict = {}
        for rec in self.found.values():
            for b in rec["benchmarks"]:
                cell = corpus.setdefault(rec["domain"], {})
                cell[b] = cell.get(b, 0) + 1
        examples: dict = {}
        for d in sorted(self.found):
            rec = self.found[d]
            for b, v in rec["benchmarks"].items():
                ex = examples.setdefault(b, [])
                if len(ex) < self.cfg.examples:
                    ex.append({"doc_id": d, "domain": rec["domain"], "methods": sorted(self.selected_by.get(d, ())),
                               "ngrams": v["ngrams"], "items": v["items"][:3], "matched": v["matched"],
                               "item_text": v["item_text"]})
        return {"checked": True, "scope": self.cfg.scope, "ngram": self.cfg.ngram, "max_docs": self.cfg.max_docs,
                "min_matches": self.cfg.min_matches, "benchmarks": self.index.stats,
                "benchmark_ngrams": int(self.index.hash.size),
                "documents_checked": self.documents, "contaminated": len(self.found),
                "removed": bool(removed), "per_method": per_method, "found_by_domain": corpus,
                "examples": examples, "index_s": self.index_s, "scan_s": self.wall_s,
                "words_per_s": self.words / self.wall_s if self.wall_s > 0 else None}

    def write(self, path: Path) -> None:
        from attninf.manifest import write_atomic

        write_atomic(path, "".join(json.dumps({**rec, "methods": sorted(self.selected_by.get(d, ()))}) + "\n"
                                   for d, rec in sorted(self.found.items())))


def exclude(con, doc_ids: Iterable[str]) -> None:
    """Add documents to the select stage's `excluded` table (left out of every ranking)."""
    rows = [(d,) for d in doc_ids]
    if rows:
        con.executemany("INSERT INTO excluded VALUES (?)", rows)
