"""Stage `select`: the top fraction of each domain by AI score, plus the controls, out of core.

All methods live here, written as one ranking each over the score shards (DuckDB reads the
parquet files directly, so hundreds of millions of rows never sit in Python):

  attention_influence  highest score first (the paper)
  inverse              lowest score first (does the direction matter?)
  perplexity           lowest reference loss L_base first (the classic baseline)
  random               seeded random order (md5(seed:doc_id))
  length_matched       random documents with the AI selection's length distribution: length
                       bins cut at the AI selection's own length quantiles (up to
                       `length_bins` of them, each holding an equal share of its documents),
                       each bin drawn from at the AI selection's count, in a seeded random
                       order within the bin (separates "longer" from "selected": the paper's
                       selections are about twice the average document's length)

Budget per domain (PAPER.md: top 20% of each domain's documents) for attention_influence:
  budget=documents  the first ceil(ratio * documents) rows of the ranking (at least one row of
                    a non-empty domain; ceil so tiny demo domains still select something)
  budget=tokens     rows of the ranking until their tokens reach ratio * the domain's tokens
                    (the row that crosses the budget is included)
Every control is token-matched per domain to the attention_influence selection (mix weighs a
subset by its tokens, so an arm with more tokens would simply train on more data): the ranking's
longest prefix whose tokens stay within the AI selection's, then the following rows of the
ranking that still fit under (1 + token_tolerance) x the AI tokens, until the total is within
token_tolerance of them; if the walk ends short, one swap that lands inside the tolerance: the
latest of the last 64 picks that can go, for the first walked-over row that fits. Near the cut this skips documents too long to
fit, a bias confined to the last few picks (at scale the first row past the prefix lands inside
the tolerance); when nothing fits, the total stays outside it and summary.json `token_match`
says so (a domain whose documents are long against its budget). Without
attention_influence in `methods`, perplexity and inverse take the budget themselves.
Before ranking, rows whose score or reference loss is not finite are dropped and counted
(`nonfinite` in summary.json; the score stage already skips them, this guards older shards), and
with `select.max_repetition` set, documents whose repetition (selection/repetition.py: share of
repeated word 3-grams) exceeds it. Per domain, summary.json `repetition` and repetition.md give the
Spearman correlation of the AI score with repetition and with the zlib compression ratio, over
every scored document: the confound the review raises (repeated passages are easy to copy).
`comparison` (selection/compare.py) sets the methods side by side: Jaccard of the selected sets,
Spearman of the ranking keys, and the length and repetition of each selection against its domain.
Contamination (selection/decontaminate.py): the selected documents (or the whole corpus) are
checked against the evaluation sets by word n-gram overlap; `select.decontaminate=true` removes
the contaminated documents from the pool and selects again, so every method is drawn from the
same clean pool and the controls stay token-matched.
Tokens are `n_tokens_full` (the whole document, what the mixture will train on) when the shards
have it, else `n_tokens`. Ties break by doc_id, so the selection is a pure function of the
shards and the config. The random orders are md5 of the seed and doc_id: stable across DuckDB
versions and machines.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from attninf import manifest
from attninf.config import build, check
from selection.decontaminate import ContaminationConfig

log = logging.getLogger(__name__)

METHODS = ("attention_influence", "random", "perplexity", "inverse", "length_matched")
MATCHED = ("random", "length_matched")  # controls defined only against the AI selection

# ORDER BY clause of each ranking (row 1 = selected first).
_ORDER = {
    "attention_influence": "score DESC, doc_id ASC",
    "inverse": "score ASC, doc_id ASC",
    "perplexity": "loss_base ASC, doc_id ASC",
    "random": "md5(CAST({seed} AS VARCHAR) || ':' || doc_id) ASC, doc_id ASC",
    # lm_* columns: see _length_view
    "length_matched": "(lm_quota = 0) ASC, (lm_rank - 0.5) / greatest(lm_quota, 1) ASC, lm_key ASC, doc_id ASC",
}


@dataclass
class SelectConfig:
    """`select` config group (conf/select/paper.yaml)."""

    ratio: float = 0.2  # paper: top 20% of each domain
    budget: str = "documents"  # documents | tokens
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seed: int = 0  # random control
    figures: bool = True
    examples: int = 3  # top/bottom documents per domain shown in examples.md (0 = none)
    example_chars: int = 600
    max_repetition: float | None = None  # drop documents with repetition above this before ranking (null = off)
    threads: int | None = None  # DuckDB threads (None = DuckDB's default)
    memory_limit: str | None = None  # e.g. "8GB": DuckDB spills to disk beyond it
    token_tolerance: float = 0.01  # controls' tokens per domain within this share of the AI selection's
    length_bins: int = 50  # length_matched: at most this many length bins per domain, cut at the AI selection's quantiles
    decontaminate: bool = False  # drop documents that overlap an evaluation set before selecting
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)

    def validate(self) -> None:
        check(0.0 < self.ratio <= 1.0, "ratio", "must be in (0, 1]")
        check(self.budget in ("documents", "tokens"), "budget", "use documents or tokens")
        bad = [m for m in self.methods if m not in METHODS]
        check(not bad, "methods", f"unknown {bad}; known {list(METHODS)}")
        check(len(self.methods) > 0, "methods", "at least one method")
        for m in MATCHED:
            check(m not in self.methods or "attention_influence" in self.methods, "methods",
                  f"{m} is matched to the attention_influence selection, so it needs that method too")
        check(0.0 < self.token_tolerance < 1.0, "token_tolerance", f"{self.token_tolerance} is outside (0, 1)")
        check(self.length_bins >= 1, "length_bins", "must be >= 1")
        check(not self.decontaminate or self.contamination.scope != "none", "decontaminate",
              "needs a contamination check: set select.contamination.scope=selected or corpus")
        check(not self.decontaminate or self.contamination.max_docs is None, "decontaminate",
              "removal needs every selected document checked: set select.contamination.max_docs=null")
        check(self.max_repetition is None or 0.0 <= self.max_repetition <= 1.0, "max_repetition",
              f"{self.max_repetition} is outside [0, 1] (or null = off)")


def _connect(cfg: SelectConfig, tmp: Path):
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET temp_directory='{tmp}'")
    if cfg.threads:
        con.execute(f"SET threads={int(cfg.threads)}")
    if cfg.memory_limit:
        con.execute(f"SET memory_limit='{cfg.memory_limit}'")
    return con


def _ranked(method: str, cfg: SelectConfig, tok: str, source: str = "scores") -> str:
    order = _ORDER[method].format(seed=int(cfg.seed))
    return f"""
      SELECT doc_id, domain, score, loss_base, {tok} AS tokens,
             row_number() OVER (PARTITION BY domain ORDER BY {order}) AS rank,
             count(*) OVER (PARTITION BY domain) AS n_dom,
             sum({tok}) OVER (PARTITION BY domain) AS tok_dom,
             sum({tok}) OVER (PARTITION BY domain ORDER BY {order}
                              ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS tok_before
      FROM {source}"""


def select_sql(method: str, cfg: SelectConfig, tok: str) -> str:
    """SQL selecting one method's rows by its own budget (doc_id, domain, score, loss_base,
    tokens, rank): attention_influence, and perplexity / inverse without it."""
    ranked = _ranked(method, cfg, tok)
    if cfg.budget == "documents":
        cond = f"rank <= greatest(1, CAST(ceil({cfg.ratio!r} * n_dom - 1e-9) AS BIGINT))"
    else:
        cond = f"coalesce(tok_before, 0) < {cfg.ratio!r} * tok_dom"
    return f"WITH r AS ({ranked}) SELECT doc_id, domain, score, loss_base, tokens, rank FROM r WHERE {cond}"


def _length_view(con, cfg: SelectConfig, tok: str) -> str:
    """View `lm_scores`: scores plus, per domain, each document's length bin, its seeded random
    rank inside the bin (lm_rank), the AI selection's count in that bin (lm_quota) and the
    random key. Bins follow the AI selection: its documents, sorted by tokens, form
    min(length_bins, n) equal-count groups; a bin runs from the midpoint between the previous
    group's longest and this group's shortest document to the next such midpoint (the first from
    0, the last to the longest). Ordering by (lm_rank - 0.5) / lm_quota interleaves the bins in
    proportion to the AI counts: the first sum(quota) rows hold exactly lm_quota documents of
    every bin, so a cut there has the AI selection's length histogram at its own resolution.
    When the AI selection holds a bin's only documents (it took the longest ones), the control
    takes them too: nothing else has that length."""
    key = f"md5('lm:' || CAST({int(cfg.seed)} AS VARCHAR) || ':' || doc_id)"
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE lm_edges AS
        WITH a AS (SELECT domain, tokens, row_number() OVER (PARTITION BY domain ORDER BY tokens, doc_id) AS r,
                          count(*) OVER (PARTITION BY domain) AS n
                   FROM sel WHERE method = 'attention_influence'),
             g AS (SELECT domain, (r - 1) * least({int(cfg.length_bins)}, n) // n + 1 AS bin, tokens FROM a),
             b AS (SELECT domain, bin, min(tokens) AS lo, max(tokens) AS hi, count(*) AS quota FROM g GROUP BY ALL)
        SELECT domain, bin, quota,
               coalesce((lag(hi) OVER (PARTITION BY domain ORDER BY bin) + lo) / 2.0, -1e300) AS edge FROM b""")
    con.execute(f"""
        CREATE OR REPLACE TEMP VIEW lm_binned AS
        SELECT sc.*, e.bin AS lm_bin, e.quota AS lm_quota, {key} AS lm_key
        FROM scores sc ASOF JOIN lm_edges e ON sc.domain = e.domain AND sc.{tok} >= e.edge""")
    con.execute("""
        CREATE OR REPLACE TEMP VIEW lm_scores AS
        SELECT *, row_number() OVER (PARTITION BY domain, lm_bin ORDER BY lm_key, doc_id) AS lm_rank
        FROM lm_binned""")
    return "lm_scores"


def insert_matched(con, method: str, cfg: SelectConfig, tok: str, batch: int = 4096) -> None:
    """Insert `method`'s rows token-matched per domain to the attention_influence rows of `sel`
    (module docs): the ranking's prefix within the target, then first-fit under the upper bound."""
    source = _length_view(con, cfg, tok) if method == "length_matched" else "scores"
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE rk AS
        SELECT r.*, t.target FROM ({_ranked(method, cfg, tok, source)}) r
        JOIN (SELECT domain, sum(tokens) AS target FROM sel WHERE method = 'attention_influence'
              GROUP BY domain) t USING (domain)""")
    con.execute(f"""INSERT INTO sel SELECT doc_id, domain, score, loss_base, tokens, rank, '{method}' FROM rk
                    WHERE coalesce(tok_before, 0) + tokens <= target""")
    core = {d: (int(t or 0), int(r or 0)) for d, t, r in con.execute(
        "SELECT domain, sum(tokens), max(rank) FROM sel WHERE method = ? GROUP BY domain", [method]).fetchall()}
    tol = float(cfg.token_tolerance)
    for dom, target in con.execute("SELECT DISTINCT domain, target FROM rk ORDER BY domain").fetchall():
        cum, last = core.get(dom, (0, 0))
        lo, hi = target * (1 - tol), target * (1 + tol)
        picked: list[tuple] = []
        passed: list[tuple] = []  # rows walked over (too long to fit), swap candidates
        while cum < lo:
            rows = con.execute("SELECT doc_id, domain, score, loss_base, tokens, rank FROM rk "
                               "WHERE domain = ? AND rank > ? ORDER BY rank LIMIT ?", [dom, last, batch]).fetchall()
            if not rows:
                break
            for r in rows:
                last = r[5]
                if cum + r[4] <= hi:
                    picked.append(r)
                    cum += r[4]
                    if cum >= lo:
                        break
                elif len(passed) < batch:
                    passed.append(r)
        drop = None
        if cum < lo and passed:  # one swap: a walked-over row for one of the last picks
            tail = con.execute("SELECT doc_id, domain, score, loss_base, tokens, rank FROM sel WHERE method = ? "
                               "AND domain = ? ORDER BY rank DESC LIMIT 64", [method, dom]).fetchall()
            xs = sorted(picked + tail, key=lambda r: -r[5])[:64]
            swap = next(((x, y) for x in xs for y in passed if lo <= cum - x[4] + y[4] <= hi), None)
            if swap is not None:
                x, y = swap
                cum += y[4] - x[4]
                picked = [r for r in picked if r[0] != x[0]] + [y]
                drop = x[0]
        if drop is not None:
            con.execute("DELETE FROM sel WHERE method = ? AND doc_id = ?", [method, drop])
        if picked:
            con.executemany(f"INSERT INTO sel VALUES (?, ?, ?, ?, ?, ?, '{method}')", picked)
    con.execute("DROP TABLE rk")


def planned_shards(score_dir: Path) -> list[str]:
    """Exactly the shards the score stage's plan lists, each checked for presence, row count and
    digest: a deleted or altered shard is an error naming it (never a silently smaller domain)."""
    import pyarrow.parquet as pq

    from attninf.context import InputError
    from selection.score import file_digest

    fix = (f"re-run with stages=[score,select] (same config): the score stage re-makes it and "
           f"keeps the intact shards")
    plan = manifest.read(score_dir, "plan.json")
    if plan is None or "files" not in plan:
        raise InputError(f"{score_dir / 'plan.json'}: missing or without a shard list; {fix}")
    paths = []
    for f in plan["files"]:
        p = score_dir / f["name"]
        if not p.exists():
            raise InputError(f"{p}: listed in {score_dir / 'plan.json'} but missing; {fix}")
        if f.get("sha256") and file_digest(p) != f["sha256"]:
            raise InputError(f"{p}: content differs from the digest in plan.json (altered); {fix}")
        if pq.ParquetFile(p).metadata.num_rows != f["scored"]:
            raise InputError(f"{p}: {pq.ParquetFile(p).metadata.num_rows} rows, plan.json says "
                             f"{f['scored']}; {fix}")
        paths.append(str(p))
    if not paths:
        raise InputError(f"{score_dir}: the score stage planned no shards (empty corpus?); check "
                         "corpus.paths")
    return paths


def spearman_sql(x: str, y: str, table: str = "base") -> str:
    """Per-domain Spearman rho of columns x and y: Pearson correlation of average ranks (ties
    share the mean of the ranks they span)."""
    def avg_rank(c: str) -> str:
        return (f"(rank() OVER (PARTITION BY domain ORDER BY {c}) + "
                f"(count(*) OVER (PARTITION BY domain, {c}) - 1) / 2.0)")
    return (f"SELECT domain, corr(rx, ry), count(*) FROM (SELECT domain, {avg_rank(x)} AS rx, "
            f"{avg_rank(y)} AS ry FROM {table}) GROUP BY domain ORDER BY domain")


def filter_scores(con, cols: set[str], cfg: SelectConfig, where: str) -> dict:
    """Redefine the `scores` view without non-finite rows (and, with select.max_repetition,
    without documents above it); returns the summary's nonfinite / repetition blocks."""
    con.execute("ALTER VIEW scores RENAME TO raw_scores")
    con.execute("CREATE TABLE IF NOT EXISTS excluded (doc_id VARCHAR)")  # contaminated (decontaminate)
    clean = "doc_id NOT IN (SELECT doc_id FROM excluded)"
    finite = "isfinite(score) AND isfinite(loss_base)"
    nonfinite = {d: n for d, n in con.execute(
        f"SELECT domain, count(*) FROM raw_scores WHERE NOT coalesce({finite}, false) GROUP BY domain "
        "ORDER BY domain").fetchall()}
    con.execute(f"CREATE VIEW base AS SELECT * FROM raw_scores WHERE coalesce({finite}, false)")
    if nonfinite:
        log.warning("select: %d rows with a non-finite score or loss left out (%s)",
                    sum(nonfinite.values()), nonfinite)
    rep: dict = {"max_repetition": cfg.max_repetition, "columns_present": "repetition" in cols}
    if "repetition" not in cols:
        if cfg.max_repetition is not None:
            from attninf.context import InputError

            raise InputError(f"{where}: select.max_repetition is set but the score shards have no "
                             "'repetition' column (scored before it existed); re-run the score stage")
        con.execute(f"CREATE VIEW scores AS SELECT * FROM base WHERE {clean}")
        return {"nonfinite": nonfinite, "repetition": rep}
    rho = {d: {"spearman_repetition": r, "n": n} for d, r, n in con.execute(spearman_sql("score", "repetition")).fetchall()}
    if "compression_ratio" in cols:
        for d, r, _ in con.execute(spearman_sql("score", "compression_ratio")).fetchall():
            rho.setdefault(d, {})["spearman_compression_ratio"] = r
    for d, m, q in con.execute("SELECT domain, avg(repetition), quantile_cont(repetition, 0.9) FROM base "
                               "GROUP BY domain ORDER BY domain").fetchall():
        rho[d].update(mean_repetition=m, p90_repetition=q)
    cond = "TRUE" if cfg.max_repetition is None else f"repetition <= {float(cfg.max_repetition)!r}"
    excluded = {d: n for d, n in con.execute(
        f"SELECT domain, count(*) FROM base WHERE NOT ({cond}) GROUP BY domain ORDER BY domain").fetchall()}
    con.execute(f"CREATE VIEW scores AS SELECT * FROM base WHERE ({cond}) AND {clean}")
    rep.update(per_domain=rho, excluded=excluded)
    return {"nonfinite": nonfinite, "repetition": rep}


def repetition_markdown(summary: dict) -> str:
    """The repetition-confound table (report/report.md includes it)."""
    rep = summary.get("repetition") or {}
    lines = ["### Repetition confound", ""]
    if not rep.get("columns_present"):
        return "\n".join(lines + ["The score shards carry no repetition column (scored before it existed).", ""])
    thr = rep.get("max_repetition")
    lines += ["Spearman correlation, per domain, of the AI score with the share of repeated word 3-grams "
              "and with the zlib compression ratio (lower = more redundant), over every scored document; "
              + ("no repetition filter (select.max_repetition: null)." if thr is None else
                 f"documents with repetition > {thr} were left out before ranking."), "",
              "| domain | documents | rho(score, repetition) | rho(score, compression) | mean repetition | "
              "p90 repetition | excluded |", "|---|---:|---:|---:|---:|---:|---:|"]

    def f(x):
        return "–" if x is None else f"{x:+.3f}"
    for d, r in sorted((rep.get("per_domain") or {}).items()):
        lines.append(f"| {d} | {r.get('n', 0)} | {f(r.get('spearman_repetition'))} | "
                     f"{f(r.get('spearman_compression_ratio'))} | {r.get('mean_repetition', 0):.3f} | "
                     f"{r.get('p90_repetition', 0):.3f} | {(rep.get('excluded') or {}).get(d, 0)} |")
    nf = summary.get("nonfinite") or {}
    if nf:
        lines += ["", f"Left out for a non-finite score or loss: {nf}."]
    return "\n".join(lines) + "\n"


def select_methods(con, cfg: SelectConfig, tok: str) -> None:
    """(Re)fill `sel` with every configured method: attention_influence first, its controls
    token-matched to it."""
    con.execute("DELETE FROM sel")
    has_ai = "attention_influence" in cfg.methods
    if has_ai:
        con.execute(f"INSERT INTO sel SELECT *, 'attention_influence' FROM ({select_sql('attention_influence', cfg, tok)})")
    for m in cfg.methods:
        if m == "attention_influence":
            continue
        if has_ai:
            insert_matched(con, m, cfg, tok)
        else:
            con.execute(f"INSERT INTO sel SELECT *, '{m}' FROM ({select_sql(m, cfg, tok)})")


def token_match(per_method: dict, tolerance: float) -> dict:
    """Each control's tokens per domain against the AI selection's (summary.json `token_match`)."""
    ai = per_method.get("attention_influence") or {}
    out: dict = {"tolerance": tolerance, "methods": {}, "all_within": True}
    for m, per in per_method.items():
        if m == "attention_influence" or not ai:
            continue
        for d, v in per.items():
            target = (ai.get(d) or {}).get("selected_tokens", 0)
            rel = (v["selected_tokens"] - target) / target if target else float("nan")
            ok = bool(target) and abs(rel) <= tolerance + 1e-12
            out["methods"].setdefault(m, {})[d] = {"tokens": v["selected_tokens"], "ai_tokens": target,
                                                   "rel_diff": rel, "within": ok}
            if not ok:
                out["all_within"] = False
                log.warning("select: %s in %s: %d tokens against the AI selection's %d (%+.2f%%), outside "
                            "the %.1f%% tolerance (documents too long to match at this budget)",
                            m, d, v["selected_tokens"], target, 100 * rel, 100 * tolerance)
    return out


def token_match_lines(tm: dict) -> list[str]:
    """The token-match table as terminal lines (the select stage logs it)."""
    rows = [(m, d, v) for m, per in sorted(tm.get("methods", {}).items()) for d, v in sorted(per.items())]
    if not rows:
        return []
    out = [f"select: tokens per domain of each control vs the AI selection (tolerance {100 * tm['tolerance']:.1f}%)",
           f"  {'method':<16} {'domain':<14} {'tokens':>12} {'AI tokens':>12} {'diff':>8}"]
    out += [f"  {m:<16} {d:<14} {v['tokens']:>12,} {v['ai_tokens']:>12,} {100 * v['rel_diff']:>+7.2f}%"
            + ("" if v["within"] else "  OUTSIDE") for m, d, v in rows]
    return out


def check_contamination(con, cfg: SelectConfig, tok: str, documents):
    """Select with the contamination check (selection/decontaminate.py); returns the Scan.

    scope=corpus: every document checked once, before selecting (and, with decontaminate,
    excluded). scope=selected: select, check the selected documents not yet checked (one corpus
    pass), and with decontaminate exclude the contaminated ones and select again, until a
    selection holds only checked, clean documents (each round checks only the new picks)."""
    from attninf.context import InputError
    from selection import decontaminate

    try:
        scan = decontaminate.Scan(cfg.contamination)
    except (OSError, RuntimeError) as e:  # missing data folder or benchmark package
        raise InputError(f"select.contamination: {e}") from None
    if cfg.contamination.scope == "corpus":
        scan.run(documents(), wanted=None)
        if cfg.decontaminate:
            decontaminate.exclude(con, scan.contaminated_ids())
    select_methods(con, cfg, tok)
    scan.note_selection(con)
    while cfg.contamination.scope == "selected":
        todo = scan.unchecked(con)
        if todo.size:
            scan.run(documents(), wanted=todo)
            scan.note_selection(con)
        hit = scan.contaminated_in_selection(con)
        if not cfg.decontaminate or not hit:
            break
        decontaminate.exclude(con, hit)  # re-select from the clean pool; new picks are checked next
        select_methods(con, cfg, tok)
        scan.note_selection(con)
    return scan


def select_scores(shards: str | list[str], out: Path, cfg: SelectConfig, documents=None) -> dict:
    """Select from score shards (a glob or a list of files); writes selected.parquet + summary.json.

    documents: a callable returning an iterator of selection.corpora.Document (the corpus, for
    the contamination check; None skips it)."""
    from selection import compare

    out.mkdir(parents=True, exist_ok=True)
    con = _connect(cfg, out)
    files = [shards] if isinstance(shards, str) else list(shards)
    shard_glob = shards if isinstance(shards, str) else f"{Path(files[0]).parent}/shard-*.parquet"
    con.execute("CREATE VIEW scores AS SELECT * FROM read_parquet([" + ", ".join(
        "'" + f.replace("'", "''") + "'" for f in files) + "])")
    cols = {r[0] for r in con.execute("DESCRIBE scores").fetchall()}
    repetition = filter_scores(con, cols, cfg, shard_glob)
    missing = {"doc_id", "domain", "score", "loss_base", "n_tokens"} - cols
    if missing:
        raise ValueError(f"{shard_glob}: score shards lack column(s) {sorted(missing)}")
    tok = "n_tokens_full" if "n_tokens_full" in cols else "n_tokens"
    dup = con.execute("SELECT doc_id, count(*) c FROM scores GROUP BY doc_id HAVING c > 1 LIMIT 3").fetchall()
    if dup:
        from attninf.context import InputError

        raise InputError(f"{shard_glob}: doc_id is not unique (e.g. {dup[0][0]!r} x{dup[0][1]}); "
                         "set corpus.id_field to a unique field or leave it empty for file:row ids")
    con.execute("CREATE TABLE sel (doc_id VARCHAR, domain VARCHAR, score DOUBLE, loss_base DOUBLE, "
                "tokens BIGINT, rank BIGINT, method VARCHAR)")
    ccfg = cfg.contamination
    scan = None
    if documents is not None and ccfg.scope != "none":
        scan = check_contamination(con, cfg, tok, documents)
    else:
        select_methods(con, cfg, tok)
    path = out / "selected.parquet"
    tmp = out / f".selected.parquet.tmp{os.getpid()}"
    con.execute(f"COPY (SELECT doc_id, domain, score, method, tokens AS n_tokens, rank, loss_base FROM sel "
                f"ORDER BY method, domain, rank) TO '{tmp}' (FORMAT parquet)")
    os.replace(tmp, path)

    dom = {r[0]: {"documents": r[1], "tokens": int(r[2] or 0)} for r in con.execute(
        f"SELECT domain, count(*), sum({tok}) FROM scores GROUP BY domain ORDER BY domain").fetchall()}
    per_method: dict[str, dict] = {}
    for m, d, n, t, smin, smax, lmax in con.execute(
            "SELECT method, domain, count(*), sum(tokens), min(score), max(score), max(loss_base) FROM sel "
            "GROUP BY method, domain ORDER BY method, domain").fetchall():
        # threshold = the ranking key of the last selected row (None for the random controls)
        thr = {"attention_influence": smin, "inverse": smax, "perplexity": lmax}.get(m)
        if m in ("inverse", "perplexity") and "attention_influence" in cfg.methods:
            thr = None  # token-matched with a first-fit tail: no single cut-off
        per_method.setdefault(m, {})[d] = {**dom[d], "selected": n, "selected_tokens": int(t or 0),
                                           "threshold": thr}
    jac: dict[str, dict] = {}
    pairs = con.execute("""
        WITH a AS (SELECT method, domain, count(*) n FROM sel GROUP BY ALL),
             i AS (SELECT x.method m1, y.method m2, x.domain, count(*) n FROM sel x JOIN sel y
                   ON x.doc_id = y.doc_id AND x.method < y.method GROUP BY ALL)
        SELECT a1.method, a2.method, a1.domain, coalesce(i.n, 0), a1.n, a2.n
        FROM a a1 JOIN a a2 ON a1.domain = a2.domain AND a1.method < a2.method
        LEFT JOIN i ON i.m1 = a1.method AND i.m2 = a2.method AND i.domain = a1.domain
        ORDER BY 1, 2, 3""").fetchall()
    for m1, m2, d, inter, n1, n2 in pairs:
        union = n1 + n2 - inter
        jac.setdefault(f"{m1}|{m2}", {})[d] = inter / union if union else 0.0
    tm = token_match(per_method, cfg.token_tolerance)
    for line in token_match_lines(tm):
        log.info("%s", line)
    summary = {"ratio": cfg.ratio, "budget": cfg.budget, "token_column": tok, "seed": cfg.seed,
               "domains": dom, "methods": per_method, "jaccard": jac, "token_match": tm,
               "comparison": compare.compare(con, cols, tok, cfg), **repetition,
               "contamination": (scan.summary(cfg.decontaminate) if scan is not None else
                                 {"checked": False, "reason": "scope none" if ccfg.scope == "none"
                                  else "no corpus given to the select stage"})}
    if scan is not None:
        scan.write(out / "contamination.jsonl")
    manifest.write_json(out / "summary.json", summary)
    manifest.write_atomic(out / "repetition.md", repetition_markdown(summary))
    con.close()
    return summary


def run(ctx) -> dict:
    cfg = build(SelectConfig, ctx.cfg.get("select"), "select")
    score_dir = ctx.upstream("score")
    shards = planned_shards(Path(score_dir))
    documents, why = None, "no corpus section"
    if cfg.contamination.scope != "none" and ctx.cfg.get("corpus") is not None:
        from attninf.config import ConfigError
        from selection.corpora import CorpusConfig, iter_documents

        try:
            ccfg = build(CorpusConfig, ctx.cfg.get("corpus"), "corpus")
            documents = lambda: iter_documents(ccfg)  # noqa: E731 - one corpus pass per call
        except ConfigError as e:  # e.g. select on given score shards with no corpus configured
            why = f"the corpus section is unusable ({e})"
    if documents is None and cfg.contamination.scope != "none":
        if cfg.decontaminate:
            from attninf.context import InputError

            raise InputError(f"select.decontaminate=true needs the documents' text: {why}")
        log.warning("select: contamination not checked: %s", why)
    summary = select_scores(shards, ctx.out, cfg, documents)
    if documents is None and cfg.contamination.scope != "none":
        summary["contamination"]["reason"] = why
        manifest.write_json(ctx.out / "summary.json", summary)
    if cfg.figures:
        try:
            from selection.figures_scores import make_figures

            make_figures(Path(score_dir), ctx.out, summary, cfg, corpus_cfg=ctx.cfg.get("corpus"))
        except Exception as e:  # noqa: BLE001 - a figure must never cost the selection
            log.warning("select: figures failed: %s", e)
    small = {m: {d: {k: v for k, v in s.items() if k in ("selected", "selected_tokens", "threshold")}
                 for d, s in per.items()} for m, per in summary["methods"].items()}
    ctx.tracker.summary({"select/summary": json.dumps(small)})
    return {"selected": str(ctx.out / "selected.parquet"), "methods": small, "jaccard": summary["jaccard"]}
