"""Probe set for retrieval-head detection: the paper's synthetic 3-shot JSON key-value task.

Each probe is a JSON object of k pairs (key = random 32-character alphanumeric "hash key",
value = a natural-language sentence of at most 30 selector tokens), three solved question/answer
shots that query keys of the same JSON, then the query key and `answer:`. The model must copy the
query key's value out of the JSON; a head that points at that value while the answer is produced
is a retrieval head (see selection/detect.py).

Choices the paper leaves open, and what this module does:
- k: pairs are added until one more would push prompt + answer past `max_tokens` (the paper:
  "just under 4,096"). Lengths are estimated from per-pair token counts, then the real prompt is
  tokenised and pairs are dropped until it fits, so the bound is exact for the tokenizer used.
- The shots query keys of the sample's own JSON (assumed, as PAPER.md says), never the query key.
- Values come from a text source, split into sentences: a .jsonl file's text field, a .txt
  file, or `corpus:<domain>` = the first `detect.text_docs` documents of one domain of the run's
  own corpus (the paper draws values from web text: its presets use `corpus:fineweb_edu`, the
  demo its own corpus). Without one, a built-in procedural sentence generator (original generic
  sentences, no third-party text: 20 choices per slot, so each phrase recurs several times in a
  ~4,096-token JSON, which real text does not). Values within one probe are distinct, and a value never holds
  a double quote or backslash, so the JSON string and the answer are the same characters.
- Everything is drawn from one `random.Random(seed)`: the same seed, tokenizer and source give
  the same probes; the probes are also saved with the run (probes.jsonl) so nothing needs
  re-generating to audit a detection.
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from attninf.config import ConfigError

KEY_ALPHABET = string.ascii_letters + string.digits

# The instruction follows the paper's description ("extract the value for the given key from the
# JSON below, output only the value").
DEFAULT_INSTRUCTION = ("Extract the value corresponding to the given key from the JSON object "
                       "below. Output only the value.")
# JSON layouts: inline = one line `{"k": "v", ...}` (default); lines = one pair per line, indented
# (a second template for the head-stability check, selection/stability.py).
LAYOUTS = ("inline", "lines")


@dataclass(frozen=True)
class Probe:
    """One detection sample. `answer` is what follows the prompt (a space, then the value)."""

    id: int
    prompt: str
    answer: str
    key: str
    value: str
    value_span: tuple[int, int]  # [start, end) characters of the query value inside the JSON
    n_pairs: int
    n_tokens: int  # prompt + answer tokens under the tokenizer that generated the probe
    shot_keys: tuple[str, ...]

    def to_json(self) -> dict:
        d = asdict(self)
        d["value_span"] = list(self.value_span)
        d["shot_keys"] = list(self.shot_keys)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Probe":
        return cls(id=int(d["id"]), prompt=d["prompt"], answer=d["answer"], key=d["key"],
                   value=d["value"], value_span=(int(d["value_span"][0]), int(d["value_span"][1])),
                   n_pairs=int(d["n_pairs"]), n_tokens=int(d["n_tokens"]),
                   shot_keys=tuple(d["shot_keys"]))


# --------------------------------------------------------------------------------------------
# Value sentences
# --------------------------------------------------------------------------------------------

# Procedural fallback: ~20^5 combinations of plain, original phrases. Generic on purpose: the
# detector needs distinct copyable sentences, not meaningful ones.
_SUBJECTS = ["The old librarian", "A young engineer", "Our neighbour", "The school choir",
             "A tired farmer", "The city council", "My younger sister", "The night watchman",
             "A curious student", "The ship's captain", "An elderly painter", "The local baker",
             "A travelling musician", "The museum guide", "Every new volunteer", "The head nurse",
             "A quiet gardener", "The football coach", "A patient teacher", "The village doctor"]
_VERBS = ["repaired", "painted", "measured", "described", "photographed", "carried",
          "cleaned", "inspected", "rebuilt", "sketched", "counted", "moved", "borrowed",
          "decorated", "labelled", "weighed", "polished", "studied", "sold", "found"]
_OBJECTS = ["a wooden bridge", "the broken clock", "three copper kettles", "an ancient map",
            "the blue bicycle", "a box of letters", "the stone fountain", "two glass lanterns",
            "the garden fence", "a pile of old records", "the red wagon", "a silver trophy",
            "the iron gate", "several oak chairs", "a large telescope", "the school bell",
            "a basket of apples", "the harbour crane", "a paper kite", "the long ladder"]
_PLACES = ["near the river", "behind the station", "in the market square", "at the top of the hill",
           "beside the old mill", "inside the town hall", "on the northern shore",
           "under the railway arch", "next to the bakery", "across the valley",
           "in the empty warehouse", "by the lighthouse", "outside the library",
           "along the canal", "in the courtyard", "at the edge of the forest",
           "on the second floor", "beneath the clock tower", "in the small harbour",
           "beyond the orchard"]
_TIMES = ["after the storm", "before sunrise", "on a rainy Tuesday", "during the festival",
          "late in the evening", "early last spring", "while the others slept",
          "in the middle of winter", "just before lunch", "after a long journey",
          "on the first day of autumn", "when the bells rang", "during the holidays",
          "at the end of the week", "before the guests arrived", "as the tide went out",
          "under a full moon", "on a windy afternoon", "once the fog lifted", "every other Sunday"]


def fallback_sentences(rng: random.Random) -> Iterator[str]:
    """Endless stream of distinct-ish procedural sentences (the built-in text source)."""
    while True:
        parts = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        # Three lengths, so short value budgets (or verbose tokenizers) still find sentences.
        shape = rng.random()
        if shape > 0.2:
            parts.append(rng.choice(_PLACES))
        if shape > 0.5:
            parts.append(rng.choice(_TIMES))
        yield " ".join(parts) + "."


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_OK_CHARS = set(string.printable) - set('"\\\t\r\n\x0b\x0c')


def split_sentences(text: str) -> Iterator[str]:
    """Plain regex sentence splitter: good enough for prose; code/maths lines get filtered."""
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        for s in _SENT_SPLIT.split(para):
            s = s.strip()
            if s:
                yield s


def clean_sentence(s: str) -> bool:
    """A usable value: printable ASCII, no quote/backslash (JSON == answer), ends like prose."""
    return (len(s) >= 20 and s[-1] in ".!?" and s[0].isalnum() and all(c in _OK_CHARS for c in s)
            and sum(c.isalpha() for c in s) >= 0.7 * len(s.replace(" ", "")))


def read_text_source(path: str | Path, text_field: str = "text", max_sentences: int = 200_000) -> list[str]:
    """Sentences from a .jsonl (one JSON object per line, `text_field`) or a plain text file.

    Raises ValueError naming file, line and field for malformed rows, so a bad source fails
    before any model is loaded.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"detect.text_source: {path} does not exist")
    out: list[str] = []
    seen: set[str] = set()

    def add(text: str) -> None:
        for s in split_sentences(text):
            if clean_sentence(s) and s not in seen:
                seen.add(s)
                out.append(s)

    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise ValueError(f"{path}:{i}: field '{text_field}' missing or not a string")
                add(row[text_field])
                if len(out) >= max_sentences:
                    break
    else:
        add(path.read_text(encoding="utf-8", errors="replace"))
    return out[:max_sentences]


class ValuePool:
    """Draws value sentences of at most `max_value_tokens` tokens (counted with the selector's
    tokenizer, with the leading space the answer carries)."""

    def __init__(self, tokenizer, rng: random.Random, sentences: Sequence[str] | None,
                 max_value_tokens: int = 30, min_value_tokens: int = 5):
        self.tok = tokenizer
        self.rng = rng
        self.max_t, self.min_t = max_value_tokens, min_value_tokens
        self.pool: list[str] | None = None
        self._stream = fallback_sentences(rng)
        if sentences is not None:
            pool = [s for s in sentences if self._fits(s)]
            if len(pool) < 50:
                raise ValueError(
                    f"detect.text_source: only {len(pool)} usable sentences of "
                    f"{min_value_tokens}-{max_value_tokens} tokens (need >= 50); use a larger "
                    f"source or leave text_source unset for the built-in sentences")
            self.pool = pool

    def _fits(self, s: str) -> bool:
        n = len(self.tok(" " + s, add_special_tokens=False)["input_ids"])
        return self.min_t <= n <= self.max_t

    def draw(self, n: int) -> list[str]:
        """n distinct sentences."""
        if self.pool is not None:
            if n > len(self.pool):
                raise ValueError(f"text source has {len(self.pool)} usable sentences; a probe needs {n}")
            return self.rng.sample(self.pool, n)
        out: list[str] = []
        seen: set[str] = set()
        misses = 0
        while len(out) < n:
            s = next(self._stream)
            if s not in seen and self._fits(s):
                seen.add(s)
                out.append(s)
                misses = 0
            else:
                misses += 1
                if misses > 5000:
                    raise ValueError(
                        f"built-in sentences: none fits {self.min_t}-{self.max_t} tokens with this "
                        f"tokenizer; raise detect.max_value_tokens or give detect.text_source")
        return out


# --------------------------------------------------------------------------------------------
# Prompt assembly
# --------------------------------------------------------------------------------------------

def random_key(rng: random.Random, length: int = 32) -> str:
    return "".join(rng.choice(KEY_ALPHABET) for _ in range(length))


def render(pairs: Sequence[tuple[str, str]], shots: Sequence[int], query: int,
           instruction: str = DEFAULT_INSTRUCTION, layout: str = "inline") -> tuple[str, str, tuple[int, int]]:
    """(prompt, answer, value char span) for the given pairs, shot indices and query index."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout '{layout}' is not one of {list(LAYOUTS)}")
    lines = layout == "lines"
    head = f"{instruction}\n\nJSON data:\n{{" + ("\n" if lines else "")
    parts = [head]
    pos = len(head)
    span = (0, 0)
    for i, (k, v) in enumerate(pairs):
        sep = (",\n" if lines else ", ") if i else ""
        item = f'{sep}{"  " if lines else ""}"{k}": "'
        if i == query:
            start = pos + len(item)
            span = (start, start + len(v))
        item += v + '"'
        parts.append(item)
        pos += len(item)
    parts.append("\n}\n\n" if lines else "}\n\n")
    for s in shots:
        k, v = pairs[s]
        parts.append(f'key: "{k}"\nanswer: {v}\n\n')
    parts.append(f'key: "{pairs[query][0]}"\nanswer:')
    prompt = "".join(parts)
    return prompt, " " + pairs[query][1], span


def n_tokens(tokenizer, prompt: str, answer: str) -> int:
    return (len(tokenizer(prompt)["input_ids"])
            + len(tokenizer(answer, add_special_tokens=False)["input_ids"]))


def make_probe(pid: int, tokenizer, pool: ValuePool, rng: random.Random, max_tokens: int,
               shots: int = 3, key_length: int = 32, instruction: str = DEFAULT_INSTRUCTION,
               layout: str = "inline") -> Probe:
    """One probe whose prompt + answer holds at most `max_tokens` tokens, as close as fits."""
    # Estimate pairs from a small sample's token cost, then correct against the real prompt.
    overhead = len(tokenizer(f"{instruction}\n\nJSON data:\n{{}}\n\n")["input_ids"])
    sample_vals = pool.draw(8)
    per_pair = sum(len(tokenizer(f', "{random_key(rng, key_length)}": "{v}"', add_special_tokens=False)["input_ids"])
                   for v in sample_vals) / len(sample_vals)
    per_shot = per_pair + 8  # "key: ...\nanswer: value\n\n" ~ a pair plus a few template tokens
    budget = max_tokens - overhead - (shots + 1) * per_shot
    k = max(shots + 1, int(budget // per_pair))
    while True:
        values = pool.draw(k)
        keys: list[str] = []
        seen: set[str] = set()
        while len(keys) < k:
            key = random_key(rng, key_length)
            if key not in seen:
                seen.add(key)
                keys.append(key)
        pairs = list(zip(keys, values))
        order = rng.sample(range(k), shots + 1)
        query, shot_idx = order[0], order[1:]
        prompt, answer, span = render(pairs, shot_idx, query, instruction, layout)
        total = n_tokens(tokenizer, prompt, answer)
        if total <= max_tokens:
            break
        if k <= shots + 1:
            raise ConfigError(
                f"detect.max_tokens={max_tokens} cannot hold even {shots + 1} pairs "
                f"({total} tokens needed); raise max_tokens or lower detect.shots")
        # Overshoot: drop the estimated excess (at least one pair) and redraw.
        k = max(shots + 1, k - max(1, int((total - max_tokens) / per_pair + 0.999)))
    # Fill up: add pairs while they still fit (keeps "just under max_tokens").
    while True:
        extra = pool.draw(1)[0]
        if extra in values:
            break
        key = random_key(rng, key_length)
        cand = pairs + [(key, extra)]
        p2, a2, s2 = render(cand, shot_idx, query, instruction, layout)
        t2 = n_tokens(tokenizer, p2, a2)
        if t2 > max_tokens:
            break
        pairs, values, prompt, answer, span, total = cand, values + [extra], p2, a2, s2, t2
    assert prompt[span[0]:span[1]] == pairs[query][1]
    return Probe(id=pid, prompt=prompt, answer=answer, key=pairs[query][0], value=pairs[query][1],
                 value_span=span, n_pairs=len(pairs), n_tokens=total,
                 shot_keys=tuple(pairs[s][0] for s in shot_idx))


def generate_probes(tokenizer, num_probes: int, max_tokens: int, seed: int = 0,
                    sentences: Sequence[str] | None = None, shots: int = 3, key_length: int = 32,
                    max_value_tokens: int = 30, min_value_tokens: int = 5,
                    instruction: str = DEFAULT_INSTRUCTION, layout: str = "inline") -> list[Probe]:
    """`num_probes` seeded probes; `sentences=None` uses the built-in procedural values."""
    rng = random.Random(seed)
    pool = ValuePool(tokenizer, rng, sentences, max_value_tokens, min_value_tokens)
    return [make_probe(i, tokenizer, pool, rng, max_tokens, shots, key_length, instruction, layout)
            for i in range(num_probes)]


CORPUS_PREFIX = "corpus:"


def corpus_domain(text_source: str | None) -> str | None:
    """The domain a `corpus:<domain>` text source names, else None."""
    if text_source and text_source.startswith(CORPUS_PREFIX):
        return text_source[len(CORPUS_PREFIX):].strip()
    return None


def corpus_sentences(corpus_cfg, domain: str, max_docs: int = 2000, max_sentences: int = 200_000,
                     stats: dict | None = None) -> list[str]:
    """Distinct clean sentences of the first `max_docs` documents of `domain` in the corpus
    (selection/corpora.py order). Only that domain is read: a hub corpus keeps only the sources
    feeding it, a local one skips the other domains' rows."""
    from attninf.config import build
    from selection.corpora import CorpusConfig, iter_documents

    ccfg = build(CorpusConfig, corpus_cfg, "corpus")
    if ccfg.domains and domain not in ccfg.domains:
        raise ConfigError(f"detect.text_source: corpus domain '{domain}' is not in corpus.domains "
                          f"{list(ccfg.domains)}")
    if ccfg.kind == "hf":
        ccfg.sources = [s for s in ccfg.sources if (s.domain or s.name or s.path) == domain]
        if not ccfg.sources:
            raise ConfigError(f"detect.text_source: no corpus.sources entry feeds domain '{domain}'")
    else:
        ccfg.domains, ccfg.unknown_domain = [domain], "skip"
    ccfg.max_docs_per_domain = min(max_docs, ccfg.max_docs_per_domain or max_docs)
    ccfg.max_docs = None
    out: list[str] = []
    seen: set[str] = set()
    n_docs = 0
    for doc in iter_documents(ccfg):
        if doc.domain != domain:
            continue
        n_docs += 1
        for sent in split_sentences(doc.text):
            if clean_sentence(sent) and sent not in seen:
                seen.add(sent)
                out.append(sent)
        if len(out) >= max_sentences:
            break
    if stats is not None:
        stats.update(documents=n_docs, sentences=len(out))
    if not out:
        raise ConfigError(f"detect.text_source: corpus domain '{domain}' gave no usable sentences "
                          f"({n_docs} documents read); check corpus.paths or pick another domain")
    return out[:max_sentences]


def load_sentences(text_source: str | None, text_field: str = "text", corpus=None,
                   max_docs: int = 2000, stats: dict | None = None) -> list[str] | None:
    """The probe values' source text (detect.text_source), or None for the built-in sentences.

    `corpus:<domain>` reads the run's `corpus` section (passed as `corpus`)."""
    if not text_source:
        return None
    domain = corpus_domain(text_source)
    if domain is not None:
        if corpus is None:
            raise ConfigError(f"detect.text_source={text_source} needs the run's corpus section")
        return corpus_sentences(corpus, domain, max_docs, stats=stats)
    out = read_text_source(text_source, text_field)
    if stats is not None:
        stats.update(sentences=len(out))
    return out


def probes_from_settings(tokenizer, settings: Mapping, num_probes: int, max_tokens: int, seed: int,
                         sentences: Sequence[str] | None) -> list[Probe]:
    """Probes built the way a detection built its own, from the `probe_settings` it wrote into
    heads.json (shots, key length, value lengths, instruction, layout), at another size and
    seed: the mirror check's held-out probes follow the detection they test, not today's config."""
    return generate_probes(tokenizer, num_probes, max_tokens, seed, sentences, settings["shots"],
                           settings["key_length"], settings["max_value_tokens"],
                           settings["min_value_tokens"], settings["instruction"], settings["json_layout"])


def save_probes(path: str | Path, probes: Iterable[Probe]) -> None:
    from attninf.manifest import write_atomic

    write_atomic(Path(path), "".join(json.dumps(p.to_json()) + "\n" for p in probes))


def load_probes(path: str | Path) -> list[Probe]:
    out = []
    with Path(path).open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    out.append(Probe.from_json(json.loads(line)))
                except (KeyError, ValueError, TypeError) as e:
                    raise ValueError(f"{path}:{i}: not a probe record ({e})") from None
    return out
