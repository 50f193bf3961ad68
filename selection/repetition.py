"""Repetition statistics per document: the confound the paper's public review raises.

Masking retrieval heads hurts most where the next tokens can be copied from earlier in the
document, so a document that repeats itself (boilerplate, lists, duplicated passages) may score
high for copying rather than for reasoning. The score stage stores two statistics beside every
AI score, and `select` reports their per-domain rank correlation with the score (and can drop
documents above `select.max_repetition` before ranking):

- repetition: the share of word 3-gram occurrences that repeat an earlier 3-gram of the same
  document (0 = no 3-gram occurs twice; "a b c a b c" has 4 trigrams, 1 repeated -> 0.25).
  Words are lower-cased \\w+ runs, so it reads prose and code alike. Documents with fewer than 3
  words get 0.
- compression_ratio: zlib (level 6) compressed bytes / UTF-8 bytes of the whole text; lower =
  more redundant. Byte-level, so it also sees repetition below the word level.

Both read the full document text (not the scorer's truncated tokens): cheap next to a forward
pass (~1 ms per 10 kB).
"""

from __future__ import annotations

import re
import zlib

NGRAM = 3
_WORD = re.compile(r"\w+")


def repeated_ngram_fraction(text: str, n: int = NGRAM) -> float:
    """Share of word n-gram occurrences that repeat an earlier one (module docs)."""
    words = _WORD.findall(text.lower())
    total = len(words) - n + 1
    if total <= 0:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeated = 0
    for i in range(total):
        g = tuple(words[i:i + n])
        if g in seen:
            repeated += 1
        else:
            seen.add(g)
    return repeated / total


def compression_ratio(text: str) -> float:
    """zlib-compressed size / raw size (UTF-8); 1.0 for an empty text."""
    raw = text.encode("utf-8")
    if not raw:
        return 1.0
    return len(zlib.compress(raw, 6)) / len(raw)


def stats(text: str) -> tuple[float, float]:
    """(repetition, compression_ratio) of one document."""
    return repeated_ngram_fraction(text), compression_ratio(text)
