"""Stage `score`: reference loss with and without the retrieval heads for every document, sharded.

Sharding: a local corpus is cut into parts defined by the data (selection.corpus_parts): a
parquet file's consecutive row groups up to `score.shard_size` rows, or a jsonl file's row
ranges of `score.shard_size` lines (skipped rows included, so a shard's content never depends on
the tokenizer). The plan is made once, from parquet footers, and kept in `corpus_plan.json`
(reused while the corpus files' path, size and mtime hold), so the shards do not depend on the
task count and a run resumed with another array size re-does no finished shard. Shard i is part
i of the plan. The executors give each array task a contiguous run of the parts holding ~1/N of
the corpus bytes (attninf.lifecycle.share), and a task reads only its parts' row groups (plus
their footers): N tasks read the corpus once between them. A finished shard is two files,
written atomically (temp + rename), stats first:

  score/shard-00007.stats.json   counts, skips by reason (with the first few file:row), tokens, wall,
                                 the part (file, row groups, rows) and the bytes read for it
  score/shard-00007.parquet      doc_id, domain, n_tokens, n_tokens_full, loss_base, loss_masked, score,
                                 repetition, compression_ratio (selection/repetition.py)

A document whose base or masked loss is NaN or infinite, or whose base loss is 0 (the score
divides by it), is a skip with its reason (nonfinite_loss_base, nonfinite_loss_masked,
zero_loss_base), never a row: DuckDB would rank a NaN score first.

The parquet's presence is the completion marker, so a worker killed at any moment leaves either
a whole shard or nothing, and a re-run recomputes exactly the missing shards: no document is
lost or duplicated, and rows come out identical (same shard -> same batches -> same kernels).
The executors (attninf/lifecycle.py) see one part per shard (`parts`): an array task scores
its share with `run_parts` and `finish` merges the shard stats once every part is marked,
reading shard stats and digests, never the corpus. A hub corpus (corpus.kind=hf) has no files
to split: it is one part, `all`, that streams the whole corpus in one process and cuts it into
`score.shard_size` blocks; at the paper's size ingest it to local parquet first
(`python -m tools.ingest`, slurm/README.md), then score `corpus=parquet`.

Precision: the selector runs in `score.dtype` (default: the model config's dtype, `auto` in the
shipped configs: bf16 on GPU, on CPU whichever of bf16 / fp32 this machine runs faster, see
selection.precision) with the loss in fp32; `score.dtype=float32` forces the full fp32 path.
Each shard's stats and the summary record the dtype it ran in and the measurement behind it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from attninf import manifest
from attninf.config import build, check
from attninf.context import Incomplete, InputError
from attninf.dist import rank_world
from attninf.progress import Progress
from selection.corpora import CorpusConfig, Document, iter_documents

log = logging.getLogger(__name__)

SCHEMA_COLUMNS = ("doc_id", "domain", "n_tokens", "n_tokens_full", "loss_base", "loss_masked", "score",
                  "repetition", "compression_ratio")


@dataclass
class ScoreConfig:
    """`score` config group (conf/score/default.yaml documents each choice)."""

    max_tokens: int = 4096  # truncation length (the paper's selector context); recorded per row
    min_tokens: int = 2  # shorter documents have no next-token loss: counted skip "too_short"
    bos: str = "auto"  # auto (tokenizer's own special tokens) | always | never
    dtype: str | None = None  # override model.dtype (float32 forces the fp32 path)
    device: str | None = None  # override model.device
    attn_impl: str | None = None  # override model.attn_impl
    shard_size: int = 2000  # documents (rows) per shard
    batch_tokens: int | None = None  # padded tokens per batch; null = 2,048 on CPU, 16,384 on GPU (>= max_tokens)
    max_batch_size: int = 64
    ce_chunk: int | None = None  # positions per lm_head/log-softmax chunk; null = 64 on CPU, 4096 on GPU
    share_prefix: bool = True  # compute the layers below the first masked layer once
    tokenize_batch: int = 256  # documents per tokenizer call
    progress: bool = True
    skip_examples: int = 5  # file:row examples kept per skip reason in the stats
    # The stage fails (with the skip table) when more than this share of rows is skipped, or all
    # are: a typo in corpus.text_field must not finish `done` with an empty selection.
    max_skip_share: float = 0.5

    def batch_budget(self, device_type: str) -> int:
        """Padded tokens per batch: batch_tokens, or the device's measured best when null."""
        from selection.scoring import default_batch_tokens

        return self.batch_tokens or default_batch_tokens(device_type, self.max_tokens)

    def validate(self) -> None:
        check(self.max_tokens >= 2, "max_tokens", "must be >= 2")
        check(self.min_tokens >= 2, "min_tokens", "must be >= 2 (a loss needs a next token)")
        check(self.bos in ("auto", "always", "never"), "bos", "use auto, always or never")
        check(self.dtype in (None, "auto", "float32", "bfloat16", "float16"), "dtype",
              "use auto, float32, bfloat16, float16 or null (= model.dtype)")
        check(self.shard_size > 0, "shard_size", "must be positive")
        check(0.0 <= self.max_skip_share <= 1.0, "max_skip_share", "must be in [0, 1]")
        check(self.batch_tokens is None or self.batch_tokens >= self.max_tokens, "batch_tokens",
              f"must be >= max_tokens ({self.max_tokens}) so the longest document fits a batch")
        check(self.max_batch_size > 0 and (self.ce_chunk or 1) > 0, "max_batch_size", "must be positive")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def iter_shards(docs: Iterator[Document], shard_size: int) -> Iterator[tuple[int, list[Document]]]:
    """Contiguous blocks of `shard_size` rows in corpus order: (shard index, rows)."""
    block: list[Document] = []
    i = 0
    for d in docs:
        block.append(d)
        if len(block) == shard_size:
            yield i, block
            block, i = [], i + 1
    if block:
        yield i, block


def _write_parquet_atomic(table, path: Path, before_rename=None) -> None:
    """Temp + rename; `before_rename(sha256)` runs between (the stats record the digest)."""
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    if before_rename is not None:
        before_rename(file_digest(tmp))
    os.replace(tmp, path)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for buf in iter(lambda: fh.read(1 << 20), b""):
            h.update(buf)
    return h.hexdigest()


def score_shard(docs: list[Document], *, tokenizer, scorer, cfg: ScoreConfig, progress=None) -> tuple[dict, dict]:
    """Score one shard: (columns dict in corpus order, stats). Skips are counted with a reason."""
    from selection import scoring

    t0, c0 = time.perf_counter(), time.process_time()
    skipped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}

    def skip(d: Document, reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1
        ex = examples.setdefault(reason, [])
        if len(ex) < cfg.skip_examples:
            ex.append(d.where or d.doc_id)

    good = []
    for d in docs:
        if d.skip is not None:
            skip(d, d.skip)
        else:
            good.append(d)
    encoded: list[tuple[list[int], int]] = []
    for s in range(0, len(good), cfg.tokenize_batch):
        encoded.extend(scoring.encode(tokenizer, [d.text for d in good[s:s + cfg.tokenize_batch]],
                                      cfg.max_tokens, cfg.bos))
    keep = []
    for d, (ids, n_full) in zip(good, encoded):
        if len(ids) < cfg.min_tokens:
            skip(d, "too_short")
        else:
            keep.append((d, ids, n_full))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    on_batch = (lambda n, t: progress.update(n, t)) if progress is not None else None
    budget = cfg.batch_budget(next(scorer.model.parameters()).device.type)
    base, masked = scoring.score_tokens(scorer, [k[1] for k in keep], max_batch_tokens=budget,
                                        max_batch_size=cfg.max_batch_size, pad_id=pad_id, on_batch=on_batch)
    if progress is not None:
        progress.update(len(docs) - len(keep), 0)  # skipped rows count as processed
    keep, base, masked = drop_nonfinite(keep, base, masked, skip)
    from selection.repetition import stats as repetition_stats

    rep = [repetition_stats(k[0].text) for k in keep]
    cols = {
        "doc_id": [k[0].doc_id for k in keep],
        "domain": [k[0].domain for k in keep],
        "n_tokens": [len(k[1]) for k in keep],
        "n_tokens_full": [k[2] for k in keep],
        "loss_base": base,
        "loss_masked": masked,
        "score": [float(scoring.ai_score(b, m)) for b, m in zip(base, masked)],
        "repetition": [r[0] for r in rep],
        "compression_ratio": [r[1] for r in rep],
    }
    stats = {
        "rows": len(docs),
        "scored": len(keep),
        "max_tokens": cfg.max_tokens,
        "bos": cfg.bos,
        "skipped": skipped,
        "skip_examples": examples,
        "tokens_scored": int(sum(cols["n_tokens"])),
        "tokens_full": int(sum(cols["n_tokens_full"])),
        "truncated": int(sum(1 for k in keep if k[2] > len(k[1]))),
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,  # this process's CPU (all its threads): a rate that load does not skew
    }
    return cols, stats


def drop_nonfinite(keep: list, base: list, masked: list, skip) -> tuple[list, list, list]:
    """Rows whose losses cannot give a score become skips with their reason (module docs)."""
    import math

    out_k, out_b, out_m = [], [], []
    for k, b, m in zip(keep, base, masked):
        b, m = float(b), float(m)
        if not math.isfinite(b):
            skip(k[0], "nonfinite_loss_base")
        elif not math.isfinite(m):
            skip(k[0], "nonfinite_loss_masked")
        elif b == 0.0:
            skip(k[0], "zero_loss_base")
        else:
            out_k.append(k)
            out_b.append(b)
            out_m.append(m)
    return out_k, out_b, out_m


def write_shard(out: Path, i: int, cols: dict, stats: dict) -> Path:
    """Stats first, then the parquet (the completion marker), both atomically."""
    import pyarrow as pa

    schema = pa.schema([("doc_id", pa.string()), ("domain", pa.string()), ("n_tokens", pa.int64()),
                        ("n_tokens_full", pa.int64()), ("loss_base", pa.float64()),
                        ("loss_masked", pa.float64()), ("score", pa.float64()),
                        ("repetition", pa.float64()), ("compression_ratio", pa.float64())])
    table = pa.table({k: cols[k] for k in SCHEMA_COLUMNS}, schema=schema)
    path = out / f"{shard_name(i)}.parquet"
    _write_parquet_atomic(table, path, lambda sha: manifest.write_json(
        out / f"{shard_name(i)}.stats.json", {**stats, "sha256": sha}))
    return path


def summarize(out: Path, n_shards: int) -> dict:
    """Merge shard stats into score/stats.json (the stage's outputs summary)."""
    skipped: dict[str, int] = {}
    examples: dict[str, list] = {}
    tot = {"rows": 0, "scored": 0, "tokens_scored": 0, "tokens_full": 0, "truncated": 0, "wall_s": 0.0}
    for i in range(n_shards):
        st = json.loads((out / f"{shard_name(i)}.stats.json").read_text())
        for k in tot:
            tot[k] += st.get(k, 0)
        for r, c in st.get("skipped", {}).items():
            skipped[r] = skipped.get(r, 0) + c
        for r, ex in st.get("skip_examples", {}).items():
            examples.setdefault(r, [])
            examples[r] += ex[:max(0, 3 - len(examples[r]))]
    summary = {"shards": n_shards, **tot, "skipped": skipped, "skip_examples": examples}
    if n_shards:
        first = json.loads((out / f"{shard_name(0)}.stats.json").read_text())
        summary.update({k: first.get(k) for k in ("max_tokens", "bos", "model", "dtype", "precision",
                                                     "attn_impl")})
    manifest.write_json(out / "stats.json", summary)
    return summary


def model_config(ctx, cfg: ScoreConfig):
    from selection.models import ModelConfig

    mc = build(ModelConfig, ctx.cfg.model, "model")
    for key in ("dtype", "device", "attn_impl"):
        if getattr(cfg, key) is not None:
            setattr(mc, key, getattr(cfg, key))
    return mc


class _Scorer:
    """The selector and its heads, loaded on the first shard that needs them (never for a
    re-run whose shards all exist)."""

    def __init__(self, ctx, cfg: ScoreConfig, rank: int, world: int):
        self.ctx, self.cfg, self.rank, self.world = ctx, cfg, rank, world
        self.state: dict = {}

    def get(self):
        state, cfg, ctx = self.state, self.cfg, self.ctx
        if "scorer" not in state:
            from selection import masking, scoring
            from selection.heads import HeadsConfig, heads_for_stage
            from selection.models import load_selector, precision_of

            mc = model_config(ctx, cfg)
            model, tok = load_selector(mc)
            heads = heads_for_stage(ctx, model)
            mode = build(HeadsConfig, ctx.cfg.get("heads"), "heads").mode
            state["tok"] = tok
            state["scorer"] = scoring.BranchScorer(model, list(heads), mode=mode,
                                                   ce_chunk=cfg.ce_chunk, share_prefix=cfg.share_prefix)
            device = next(model.parameters()).device
            prec = precision_of(model)
            state["info"] = {"model": mc.path, "dtype": prec["dtype"], "precision": prec, "attn_impl": masking.base_implementation(model),
                             "device": str(device), "heads": len(heads),
                             "batch_tokens": cfg.batch_budget(device.type),
                             "first_masked_layer": state["scorer"].split}
            log.info("score: rank %d/%d, %s", self.rank, self.world, state["info"])
        return state["scorer"], state["tok"], state["info"]


PLAN = "corpus_plan.json"


def corpus_plan(ctx, cfg: ScoreConfig, ccfg: CorpusConfig) -> list:
    """The corpus's parts of `score.shard_size` rows, planned once into `corpus_plan.json`."""
    from selection.corpus_parts import stored_plan

    out: Path = ctx.out
    return stored_plan(ccfg, out / PLAN, cfg.shard_size, lambda: any(out.glob("shard-*.parquet")), "score")


def parts(ctx) -> list:
    """The stage's parts for an executor: one per part of the corpus plan (`shard-00007`), with
    its bytes as the weight that balances the tasks' shares (attninf.lifecycle.share).

    Planning reads parquet footers (jsonl: counts lines; a capped corpus: one counting pass). A
    hub corpus (corpus.kind=hf) has no files to split: one part, `all`, scores every shard of
    the stream in one process; ingest it first for the parallel path (python -m tools.ingest).
    """
    cfg = build(ScoreConfig, ctx.cfg.get("score"), "score")
    ccfg = build(CorpusConfig, ctx.cfg.get("corpus"), "corpus")
    if ccfg.kind == "hf":
        log.warning("score: corpus.kind=hf is one part ('all'): one process streams the whole corpus; "
                    "ingest it to local parquet first (python -m tools.ingest) to score it as an array")
        return ["all"]
    return [(shard_name(i), p.bytes) for i, p in enumerate(corpus_plan(ctx, cfg, ccfg))]


def preflight(cfg, arm, resources) -> tuple[dict, list[str]]:
    """Before any job: the array's task count against the corpus's parts (selection.corpus_parts)."""
    from selection.corpus_parts import preflight_parts

    if resources is None:  # a local run (attninf/runner.py): one executor, no array to size
        return {}, []

    scfg = build(ScoreConfig, cfg.get("score"), "score")
    ccfg = build(CorpusConfig, cfg.get("corpus"), "corpus")
    return preflight_parts(ccfg, scfg.shard_size, int(resources.array_tasks), "score")


def run_parts(ctx, names: list[str], rank: int | None = None, world: int | None = None):
    """Score the shards named (`all` = every shard of a hub stream); yield each name once its
    shard is on disk. A shard reads only its own part of the corpus (selection.corpus_parts).

    A shard already present, intact and made under this key is yielded without re-scoring.
    (rank, world) only label the progress file and the shard stats (default: rank_world()).
    """
    if rank is None or world is None:
        rank, world = rank_world()
    cfg = build(ScoreConfig, ctx.cfg.get("score"), "score")
    ccfg = build(CorpusConfig, ctx.cfg.get("corpus"), "corpus")
    out: Path = ctx.out
    scorer = _Scorer(ctx, cfg, rank, world)
    # The executor wrote this run's key into the `running` manifest; every shard records it, so a
    # shard made under another config is never reused, even when the old manifest was torn.
    key = (manifest.read(out) or {}).get("key")
    if "all" in names:
        yield from _run_stream(ctx, cfg, ccfg, scorer, key, rank, world)
        return
    from selection.corpus_parts import ByteCounter, read_part

    plan = corpus_plan(ctx, cfg, ccfg)
    index = {shard_name(i): i for i in range(len(plan))}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise InputError(f"score: parts {unknown[:3]} are not in {out / PLAN} ({len(plan)} parts); "
                         "the corpus or score.shard_size changed since the parts were listed")
    todo = sorted(index[n] for n in names)
    prog = Progress(total=sum(plan[i].rows or 0 for i in todo) or None, desc=f"score[{rank}/{world}]",
                    tracker=ctx.tracker, prefix="score", disable=not cfg.progress, path=out / f"progress-{rank}.json")
    with prog:
        for i in todo:
            part, name = plan[i], shard_name(i)
            if (out / f"{name}.parquet").exists():
                why = shard_problem(out, i, key)
                if why is None:
                    prog.total = None if prog.total is None else max(prog.total - (part.rows or 0), 0)
                    yield name
                    continue
                log.warning("score: %s; re-scoring it", why)
                (out / f"{name}.parquet").unlink(missing_ok=True)
            io = ByteCounter()
            t0 = time.perf_counter()
            block = list(read_part(part, ccfg, io=io))
            read_s = time.perf_counter() - t0
            _score_and_write(out, i, block, scorer, cfg, prog, key, rank, world,
                             part={"file": part.file, "row_groups": part.row_groups, "first_row": part.first_row,
                                   "rows": part.rows, "planned_bytes": part.bytes},
                             files_opened=io.files, bytes_read=io.bytes, bytes_requested=io.requested,
                             read_s=round(read_s, 4))
            yield name


def _score_and_write(out: Path, i: int, block: list[Document], scorer: "_Scorer", cfg: ScoreConfig, prog, key,
                     rank: int, world: int, **extra) -> None:
    check_unique_ids(block)
    model, tok, info = scorer.get()
    cols, stats = score_shard(block, tokenizer=tok, scorer=model, cfg=cfg, progress=prog)
    stats.update(shard=i, rank=rank, world=world, key=key, **info, **extra)
    write_shard(out, i, cols, stats)


def _run_stream(ctx, cfg: ScoreConfig, ccfg: CorpusConfig, scorer: "_Scorer", key, rank: int, world: int):
    """The hub stream's one part, `all`: blocks of `shard_size` rows of the stream, in order."""
    out: Path = ctx.out
    prog = Progress(total=None, desc=f"score[{rank}/{world}]", tracker=ctx.tracker, prefix="score",
                    disable=not cfg.progress, path=out / f"progress-{rank}.json")
    with prog:
        for i, block in iter_shards(iter_documents(ccfg, with_skips=True), cfg.shard_size):
            name = shard_name(i)
            if (out / f"{name}.parquet").exists():
                why = shard_problem(out, i, key, len(block))
                if why is None:
                    continue
                log.warning("score: %s; re-scoring it", why)
                (out / f"{name}.parquet").unlink(missing_ok=True)
            _score_and_write(out, i, block, scorer, cfg, prog, key, rank, world)
    yield "all"


def _n_shards(ctx) -> int:
    names = ctx.parts if ctx.parts is not None else [p[0] if isinstance(p, tuple) else p for p in parts(ctx)]
    if names == ["all"]:
        return len(list(ctx.out.glob("shard-*.stats.json")))
    return len(names)


def finish(ctx) -> dict:
    """Every shard present: the plan select verifies (rows and digest per shard) and the summary.

    Reads the shards' stats and digests (the score folder), never the corpus."""
    cfg = build(ScoreConfig, ctx.cfg.get("score"), "score")
    ccfg = build(CorpusConfig, ctx.cfg.get("corpus"), "corpus")
    out: Path = ctx.out
    key = (manifest.read(out) or {}).get("key")
    n_shards = _n_shards(ctx)
    missing = [i for i in range(n_shards) if shard_problem(out, i, key) is not None]
    if missing:
        raise Incomplete(f"score: {len(missing)} of {n_shards} shards missing or not intact "
                         f"(e.g. {shard_problem(out, missing[0], key)})")
    files = []
    for i in range(n_shards):
        st = json.loads((out / f"{shard_name(i)}.stats.json").read_text())
        files.append({"name": f"{shard_name(i)}.parquet", "rows": st["rows"], "scored": st["scored"],
                      "sha256": st.get("sha256")})
    manifest.write_json(out / "plan.json", {"shards": n_shards, "shard_size": cfg.shard_size,
                                            "key": key, "files": files})
    summary = summarize(out, n_shards)
    check_skips(summary, cfg, ccfg)
    ctx.tracker.summary({f"score/{k}": v for k, v in summary.items() if not isinstance(v, dict)})
    return summary


def run(ctx) -> dict:
    """This worker's share (attninf.lifecycle.share of the parts, rank and world from
    attninf.dist.rank_world), then finish when every shard exists; Incomplete while other
    workers' shards are missing (torchrun / manual fan-out)."""
    from attninf.lifecycle import share

    rank, world = rank_world()
    listed = parts(ctx)
    names = [p[0] if isinstance(p, tuple) else p for p in listed]
    weights = [p[1] for p in listed] if listed and isinstance(listed[0], tuple) else None
    for _ in run_parts(ctx, share(names, rank, world, weights) if names != ["all"] else names, rank, world):
        pass
    ctx.parts = names
    key = (manifest.read(ctx.out) or {}).get("key")
    n = _n_shards(ctx)
    missing = [i for i in range(n) if shard_problem(ctx.out, i, key) is not None]
    if missing:
        raise Incomplete(f"score: rank {rank}/{world} did its share; {len(missing)} of {n} shards "
                         f"still missing (e.g. {shard_name(missing[0])})")
    return finish(ctx)


# --- integrity: shards carry the stage key and their digest; readers check both -------------

def shard_problem(out: Path, i: int, key: str | None, rows: int | None = None) -> str | None:
    """Why shard i cannot be reused under `key` (None = it can): missing, other config, altered."""
    name = shard_name(i)
    path = out / f"{name}.parquet"
    if not path.exists():
        return f"{path} is missing"
    try:
        st = json.loads((out / f"{name}.stats.json").read_text())
    except (OSError, json.JSONDecodeError):
        return f"{out / (name + '.stats.json')} is missing or torn"
    if st.get("key") != key:
        return f"{path} was scored under another config (key {st.get('key')}, now {key})"
    if rows is not None and st.get("rows") != rows:
        return f"{path} covers {st.get('rows')} corpus rows, the corpus now gives {rows}"
    if st.get("sha256") != file_digest(path):
        return f"{path} was altered after it was written (sha256 differs from its stats)"
    return None


def verify(out: Path) -> str | None:
    """Runner hook for a `done` score folder: None when every planned shard is intact."""
    plan = manifest.read(out, "plan.json")
    m = manifest.read(out)
    if plan is None or "files" not in plan:
        return f"{out / 'plan.json'} is missing or predates shard digests"
    for i in range(plan["shards"]):
        why = shard_problem(out, i, (m or {}).get("key"))
        if why:
            return why
    return None


def check_skips(summary: dict, cfg: ScoreConfig, ccfg: CorpusConfig) -> None:
    """Always print the skip table; fail when every row, or more than max_skip_share, is skipped."""
    rows, scored, skipped = summary["rows"], summary["scored"], summary["skipped"]
    table = ", ".join(f"{r} {c} (e.g. {(summary.get('skip_examples', {}).get(r) or ['?'])[0]})"
                      for r, c in sorted(skipped.items(), key=lambda kv: -kv[1])) or "none"
    log.info("score: %d rows, %d scored, %d skipped: %s", rows, scored, rows - scored, table)
    if rows == 0:
        where = ccfg.paths or ccfg.domain_paths or [s.path for s in ccfg.sources]
        raise InputError(f"corpus: no documents in {where}; check corpus.paths (or the filters "
                         "corpus.domains / max_docs)")
    share = (rows - scored) / rows
    if scored == 0 or share > cfg.max_skip_share:
        raise InputError(
            f"score: {rows - scored} of {rows} rows skipped ({share:.0%} > score.max_skip_share="
            f"{cfg.max_skip_share}): {table}; check corpus.text_field={ccfg.text_field!r} and the "
            "files, or raise score.max_skip_share")


def check_unique_ids(block: list[Document]) -> None:
    """Duplicate doc_ids inside one shard, before it is scored: both file:rows."""
    seen: dict[str, str] = {}
    for d in block:
        if d.skip is not None:
            continue
        if d.doc_id in seen:
            raise InputError(f"corpus: doc id {d.doc_id!r} at {seen[d.doc_id]} and again at "
                             f"{d.where or '?'}; set corpus.id_field to a unique field, or empty "
                             "it for file:row ids")
        seen[d.doc_id] = d.where or d.doc_id
