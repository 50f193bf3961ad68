"""Stage `select`: the top fraction of each domain by AI score, plus the controls, out of core.

All methods live here, written as one ranking each over the score shards (DuckDB reads the
parquet files directly, so hundreds of millions of rows never sit in Python):

  attention_influence  highest score first (the paper)
  inverse              lowest score first (does the direction matter?)
  perplexity           lowest reference loss L_base first (the classic baseline)
  random               seeded random order, cut at the same token count per domain as the
                       attention_influence selection (equal-token control)

Budget per domain (PAPER.md: top 20% of each domain's documents):
  budget=documents  the first ceil(ratio * documents) rows of the ranking (at least one row of
                    a non-empty domain; ceil so tiny demo domains still select something)
  budget=tokens     rows of the ranking until their tokens reach ratio * the domain's tokens
                    (the row that crosses the budget is included)
Before ranking, rows whose score or reference loss is not finite are dropped and counted
(`nonfinite` in summary.json; the score stage already skips them, this guards older shards), and
with `select.max_repetition` set, documents whose repetition (selection/repetition.py: share of
repeated word 3-grams) exceeds it. Per domain, summary.json `repetition` and repetition.md give the
Spearman correlation of the AI score with repetition and with the zlib compression ratio, over
every scored document: the confound the review raises (repeated passages are easy to copy).
Tokens are `n_tokens_full` (the whole document, what the mixture will train on) when the shards
have it, else `n_tokens`. Ties break by doc_id, so the selection is a pure function of the
shards and the config. The random order is md5(seed:doc_id): stable across DuckDB versions and
machines.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from attninf import manifest
from attninf.config import build, check

log = logging.getLogger(__name__)

METHODS = ("attention_influence", "random", "perplexity", "inverse")

# ORDER BY clause of each ranking (row 1 = selected first).
_ORDER = {
    "attention_influence": "score DESC, doc_id ASC",
    "inverse": "score ASC, doc_id ASC",
    "perplexity": "loss_base ASC, doc_id ASC",
    "random": "md5(CAST({seed} AS VARCHAR) || ':' || doc_id) ASC, doc_id ASC",
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

    def validate(self) -> None:
        check(0.0 < self.ratio <= 1.0, "ratio", "must be in (0, 1]")
        check(self.budget in ("documents", "tokens"), "budget", "use documents or tokens")
        bad = [m for m in self.methods if m not in METHODS]
        check(not bad, "methods", f"unknown {bad}; known {list(METHODS)}")
        check(len(self.methods) > 0, "methods", "at least one method")
        check("random" not in self.methods or "attention_influence" in self.methods, "methods",
              "random matches the attention_influence token count, so it needs that method too")
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


def _ranked(method: str, cfg: SelectConfig, tok: str) -> str:
    order = _ORDER[method].format(seed=int(cfg.seed))
    return f"""
      SELECT doc_id, domain, score, loss_base, {tok} AS tokens,
             row_number() OVER (PARTITION BY domain ORDER BY {order}) AS rank,
             count(*) OVER (PARTITION BY domain) AS n_dom,
             sum({tok}) OVER (PARTITION BY domain) AS tok_dom,
             sum({tok}) OVER (PARTITION BY domain ORDER BY {order}
                              ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS tok_before
      FROM scores"""


def select_sql(method: str, cfg: SelectConfig, tok: str) -> str:
    """SQL selecting one method's rows (doc_id, domain, score, loss_base, tokens, rank)."""
    ranked = _ranked(method, cfg, tok)
    if method == "random":
        # Same token count per domain as the attention_influence selection.
        cond = "coalesce(r.tok_before, 0) < t.target"
        return f"""
          WITH r AS ({ranked}),
               t AS (SELECT domain, sum(tokens) AS target FROM sel WHERE method = 'attention_influence'
                     GROUP BY domain)
          SELECT r.doc_id, r.domain, r.score, r.loss_base, r.tokens, r.rank
          FROM r JOIN t USING (domain) WHERE {cond}"""
    if cfg.budget == "documents":
        cond = f"rank <= greatest(1, CAST(ceil({cfg.ratio!r} * n_dom - 1e-9) AS BIGINT))"
    else:
        cond = f"coalesce(tok_before, 0) < {cfg.ratio!r} * tok_dom"
    return f"WITH r AS ({ranked}) SELECT doc_id, domain, score, loss_base, tokens, rank FROM r WHERE {cond}"


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
        con.execute("CREATE VIEW scores AS SELECT * FROM base")
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
    con.execute(f"CREATE VIEW scores AS SELECT * FROM base WHERE {cond}")
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


def select_scores(shards: str | list[str], out: Path, cfg: SelectConfig) -> dict:
    """Select from score shards (a glob or a list of files); writes selected.parquet + summary.json."""
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
    methods = sorted(cfg.methods, key=lambda m: m == "random")  # random needs the AI selection first
    for m in methods:
        con.execute(f"INSERT INTO sel SELECT *, '{m}' FROM ({select_sql(m, cfg, tok)})")

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
        # threshold = the ranking key of the last selected row (None for random)
        thr = {"attention_influence": smin, "inverse": smax, "perplexity": lmax}.get(m)
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
    summary = {"ratio": cfg.ratio, "budget": cfg.budget, "token_column": tok, "seed": cfg.seed,
               "domains": dom, "methods": per_method, "jaccard": jac, **repetition}
    manifest.write_json(out / "summary.json", summary)
    manifest.write_atomic(out / "repetition.md", repetition_markdown(summary))
    con.close()
    return summary


def run(ctx) -> dict:
    cfg = build(SelectConfig, ctx.cfg.get("select"), "select")
    score_dir = ctx.upstream("score")
    shards = planned_shards(Path(score_dir))
    summary = select_scores(shards, ctx.out, cfg)
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
