"""How the selection methods differ, per domain (summary.json `comparison`).

- spearman: rank correlation, over every document of the domain, of the keys the methods rank
  by: the AI score, -L_base (perplexity), the token length (what length_matched matches) and the
  random key; plus repetition when the shards carry it. A high rho(AI score, -L_base) says the
  AI score is a perplexity filter in disguise; a high rho(AI score, tokens) that it is a length
  filter.
- profile: each selection's mean and median tokens and mean repetition against its domain's
  (the paper's selections are about twice the average document's length).
The Jaccard of the selected sets is summary.json `jaccard` (selection/select.py).
"""

from __future__ import annotations

# Ranking keys compared (name -> SQL over `scores`); ascending rank = selected later.
KEYS = {
    "ai_score": "score",
    "neg_loss_base": "-loss_base",
    "tokens": "{tok}",
    "random_key": "md5(CAST({seed} AS VARCHAR) || ':' || doc_id)",
}


def compare(con, cols: set[str], tok: str, cfg) -> dict:
    """The `comparison` block from the select stage's DuckDB connection (views scores, sel)."""
    from selection.select import spearman_sql

    keys = {k: v.format(tok=tok, seed=int(cfg.seed)) for k, v in KEYS.items()}
    if "repetition" in cols:
        keys["repetition"] = "repetition"
    names = list(keys)
    cols_sql = ", ".join(f"{v} AS {k}" for k, v in keys.items())
    con.execute(f"CREATE OR REPLACE TEMP VIEW cmp AS SELECT domain, {cols_sql} FROM scores")
    spearman: dict[str, dict[str, float | None]] = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for d, rho, _ in con.execute(spearman_sql(a, b, "cmp")).fetchall():
                # rounded: DuckDB's parallel corr() differs in the last bits between runs
                spearman.setdefault(d, {})[f"{a}|{b}"] = None if rho is None else round(rho, 10)
    rep = "avg(repetition)" if "repetition" in cols else "NULL"
    profile: dict[str, dict] = {}
    for d, n, mean, med, r in con.execute(
            f"SELECT domain, count(*), avg({tok}), median({tok}), {rep} FROM scores GROUP BY domain "
            "ORDER BY domain").fetchall():
        profile.setdefault(d, {})["domain"] = {"documents": n, "mean_tokens": mean, "median_tokens": med,
                                               "mean_repetition": r}
    rep_sel = "avg(s.repetition)" if "repetition" in cols else "NULL"
    for m, d, n, mean, med, r in con.execute(
            f"SELECT x.method, x.domain, count(*), avg(x.tokens), median(x.tokens), {rep_sel} "
            "FROM sel x JOIN scores s USING (doc_id) GROUP BY x.method, x.domain ORDER BY 1, 2").fetchall():
        profile.setdefault(d, {})[m] = {"documents": n, "mean_tokens": mean, "median_tokens": med,
                                        "mean_repetition": r}
    return {"keys": keys, "spearman": spearman, "profile": profile}
