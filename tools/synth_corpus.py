"""`python -m tools.synth_corpus --out DIR`: a SmolLM-Corpus-shaped synthetic corpus, in hub layout.

The data path at paper size (244M documents in thousands of parquet files, four domains) has
failure modes that a few hundred documents never show: a task that opens every file, a blend
with one dataset per shard, a Python dict of every document. This tool makes a corpus with the
paper corpus's *shape* (four configs named like SmolLM-Corpus's, hundreds of parquet files with
several row groups, ~1M short documents, each config with its own columns and id field) so the
scale test can run ingest, mix and their checks on this machine in minutes.

The output directory is also a local "hub layout": `README.md` carries the same `configs:` YAML
block the hub dataset card does, so `datasets.load_dataset(DIR, "cosmopedia-v2", split="train")`
reads it through the same code path as `load_dataset("HuggingFaceTB/smollm-corpus", ...)`.

Text is not language: words are drawn from a seeded vocabulary of syllable strings with a
Zipf-like law and joined by Arrow kernels (no Python loop per document), so 1M documents take
seconds. The token *rate* of a tokenizer on it is what the scale test measures, not its quality.
python-edu rows hold a `blob_id`, as on the hub; `--python-text` also writes the text column (a
pre-fetched layout), `--blobs DIR` writes each python-edu text as `DIR/content/<blob_id>` gzip,
the Software Heritage bucket's layout, for a local S3 server.

Deterministic by seed: the same arguments give byte-identical files (same pyarrow version).
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# config name, domain, share of documents, share of files, (min, max) words per document.
# Document and file shares follow the paper corpus loosely (fineweb-edu dominates), but the small
# domains keep enough files that every task of 8 gets some of each.
CONFIGS = (
    ("fineweb-edu-dedup", "fineweb_edu", 0.60, 0.50, (10, 40)),
    ("cosmopedia-v2", "cosmopedia", 0.25, 0.25, (15, 45)),
    ("python-edu", "python_edu", 0.075, 0.125, (8, 35)),
    ("open-web-math", "openwebmath", 0.075, 0.125, (10, 40)),
)
# The id field each config's documents carry on the hub (conf/corpus/smollm_corpus.yaml).
ID_FIELDS = {"fineweb-edu-dedup": "id", "cosmopedia-v2": None, "python-edu": "blob_id",
             "open-web-math": "url"}
_SYLLABLES = ("ka ri to mo na se lu pe ti da ro vi ne sa ko mi la ze bu fa go he ju ly qu "
              "wa xe yo an el in on ur st th ch sh pr tr gr bl cl").split()


@dataclass(frozen=True)
class SynthSpec:
    documents: int = 1_000_000
    files: int = 400
    row_group: int = 512
    vocab: int = 6000
    seed: int = 0


def vocabulary(n: int, rng: np.random.Generator) -> pa.Array:
    """`n` distinct pseudo-words of 1-4 syllables, as an Arrow string array (the draw order)."""
    syl = np.array(_SYLLABLES, dtype=object)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        k = rng.integers(1, 5, size=n)
        parts = [syl[rng.integers(0, len(syl), size=j)] for j in k]
        for p in parts:
            w = "".join(p)
            if w not in seen:
                seen.add(w)
                words.append(w)
                if len(words) == n:
                    break
    return pa.array(words, pa.string())


def texts(n_docs: int, lengths: tuple[int, int], vocab: pa.Array, rng: np.random.Generator,
          lead: str) -> pa.Array:
    """`n_docs` documents: Zipf-distributed word ids joined by spaces, all in Arrow kernels."""
    n_words = rng.integers(lengths[0], lengths[1] + 1, size=n_docs)
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(n_words, out=offsets[1:])
    # Zipf-like: rank r drawn with probability ~ 1/(r+10); the top words repeat as in prose.
    u = rng.random(int(offsets[-1]))
    v = len(vocab)
    ranks = np.minimum((np.exp(u * np.log(v / 10 + 1)) - 1) * 10, v - 1).astype(np.int64)
    words = vocab.take(pa.array(ranks))
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), words), " ")
    return pc.binary_join_element_wise(pa.scalar(lead), joined, "")


def _columns(config: str, domain: str, start: int, txt: pa.Array, rng: np.random.Generator,
             python_text: bool) -> dict[str, pa.Array]:
    n = len(txt)
    idx = np.arange(start, start + n)
    if config == "fineweb-edu-dedup":
        return {"text": txt, "id": pa.array([f"<urn:uuid:synth-{i:09d}>" for i in idx]),
                "score": pa.array(rng.random(n) * 2 + 3), "int_score": pa.array(rng.integers(3, 6, n))}
    if config == "cosmopedia-v2":
        return {"prompt": pa.array(["Write a textbook section."] * n), "text": txt,
                "token_length": pc.utf8_length(txt),
                "audience": pa.array(np.array(["college_students", "grade_school_students"])[idx % 2]),
                "format": pa.array(["textbook"] * n)}
    if config == "python-edu":
        cols = {"blob_id": pa.array([f"{(i * 2654435761) % 2**40:010x}{i:030x}" for i in idx]),
                "repo_name": pa.array([f"synth/repo{i % 997}" for i in idx]),
                "path": pa.array([f"src/mod{i}.py" for i in idx]),
                "length_bytes": pc.binary_length(txt), "score": pa.array(rng.random(n) * 2 + 3),
                "int_score": pa.array(rng.integers(3, 6, n))}
        if python_text:
            cols["text"] = txt
        return cols
    return {"url": pa.array([f"https://math.synth/{i}" for i in idx]), "text": txt,
            "date": pa.array(["2023-01-01"] * n)}


_LEADS = {"fineweb-edu-dedup": "", "cosmopedia-v2": "", "python-edu": "def ", "open-web-math": "Theorem "}


def _readme(configs: list[str]) -> str:
    lines = ["---", "configs:"]
    for c in configs:
        lines += [f"- config_name: {c}", "  data_files:", "  - split: train", f"    path: {c}/train-*"]
    lines += ["---", "", "# Synthetic SmolLM-Corpus-shaped corpus (generated by tools.synth_corpus)", ""]
    return "\n".join(lines)


def corpus_yaml(out: Path, python_text: bool) -> str:
    """The `corpus` section (kind=hf) that reads this layout as conf/corpus/smollm_corpus.yaml
    reads the hub: same configs, domains, id fields; python-edu text from blobs unless written."""
    lines = ["kind: hf", "streaming: true", f"domains: [{', '.join(c[1] for c in CONFIGS)}]", "sources:"]
    for config, domain, *_ in CONFIGS:
        idf = ID_FIELDS[config]
        blob = config == "python-edu" and not python_text
        lines.append(f"  - {{path: '{out}', name: {config}, split: train, domain: {domain}, text_field: text, "
                     f"id_field: {idf or 'null'}" + (", text_from: swh_blob, blob_field: blob_id" if blob else "")
                     + "}")
    return "\n".join(lines) + "\n"


def generate(out: Path, spec: SynthSpec = SynthSpec(), python_text: bool = True,
             blobs: Path | None = None, blob_limit: int | None = None) -> dict:
    """Write the corpus under `out` (hub layout) and return its manifest (also `out/synth.json`).

    blobs: also write python-edu texts as gzip objects under `blobs/content/<blob_id>` (the first
    `blob_limit` of them, all if None), for a local S3 server."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(spec.seed)
    vocab = vocabulary(spec.vocab, rng)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"spec": spec.__dict__, "configs": {}, "python_text": python_text}
    n_blobs = 0
    for k, (config, domain, doc_share, file_share, lengths) in enumerate(CONFIGS):
        last = k == len(CONFIGS) - 1
        n_docs = spec.documents - sum(round(spec.documents * c[2]) for c in CONFIGS[:-1]) if last \
            else round(spec.documents * doc_share)
        n_files = spec.files - sum(round(spec.files * c[3]) for c in CONFIGS[:-1]) if last \
            else round(spec.files * file_share)
        n_files = max(1, min(n_files, n_docs))
        d = out / config
        d.mkdir(exist_ok=True)
        crng = np.random.default_rng([spec.seed, k])  # each config its own stream: shares are independent
        txt = texts(n_docs, lengths, vocab, crng, _LEADS[config])
        bounds = np.linspace(0, n_docs, n_files + 1).astype(np.int64)
        rows = []
        for f in range(n_files):
            a, b = int(bounds[f]), int(bounds[f + 1])
            table = pa.table(_columns(config, domain, a, txt.slice(a, b - a), crng, python_text))
            pq.write_table(table, d / f"train-{f:05d}-of-{n_files:05d}.parquet",
                           row_group_size=spec.row_group)
            rows.append(b - a)
            if blobs is not None and config == "python-edu":
                for bid, t in zip(table.column("blob_id").to_pylist(), txt.slice(a, b - a).to_pylist()):
                    if blob_limit is not None and n_blobs >= blob_limit:
                        break
                    p = blobs / "content" / bid
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(gzip.compress(t.encode(), mtime=0))
                    n_blobs += 1
        manifest["configs"][config] = {"domain": domain, "documents": n_docs, "files": n_files,
                                       "id_field": ID_FIELDS[config],
                                       "bytes": sum(p.stat().st_size for p in d.glob("*.parquet"))}
    (out / "README.md").write_text(_readme([c[0] for c in CONFIGS]))
    (out / "corpus_hf.yaml").write_text(corpus_yaml(out, python_text))
    manifest["documents"] = sum(c["documents"] for c in manifest["configs"].values())
    manifest["files"] = sum(c["files"] for c in manifest["configs"].values())
    manifest["bytes"] = sum(c["bytes"] for c in manifest["configs"].values())
    manifest["blobs"] = n_blobs
    manifest["seconds"] = round(time.perf_counter() - t0, 2)
    (out / "synth.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def train_tokenizer(corpus: Path, out: Path, vocab_size: int = 4096, sample_docs: int = 50_000):
    """A byte-level BPE tokenizer trained on a sample of the corpus, saved to `out` (the scale
    test's tokenizer). Trained on this text it splits a pseudo-word into ~1-2 tokens, as a real
    tokenizer does real words, so token counts and tokens/s are of a realistic shape; the tiny
    test tokenizer (384 merges on English) would cut each word into ~6 pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts: list[str] = []
    for config, *_ in CONFIGS:  # the first row groups of each config, ~sample_docs/4 documents each
        want = len(texts) + sample_docs // len(CONFIGS)
        for f in sorted((corpus / config).glob("*.parquet")):
            pf = pq.ParquetFile(f)
            if "text" not in pf.schema_arrow.names or len(texts) >= want:
                break
            texts += pf.read_row_group(0, columns=["text"]).column("text").to_pylist()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--documents", type=int, default=SynthSpec.documents)
    p.add_argument("--files", type=int, default=SynthSpec.files)
    p.add_argument("--row-group", type=int, default=SynthSpec.row_group)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-python-text", action="store_true",
                   help="python-edu rows hold only blob ids, as on the hub (text from S3)")
    p.add_argument("--blobs", type=Path, default=None, help="also write python-edu texts as gzip blobs here")
    a = p.parse_args(argv)
    m = generate(a.out, SynthSpec(a.documents, a.files, a.row_group, seed=a.seed),
                 python_text=not a.no_python_text, blobs=a.blobs)
    print(json.dumps({k: m[k] for k in ("documents", "files", "bytes", "blobs", "seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
