"""Figures for the select stage: what the AI score looks like per domain, and what it picks.

- scores_by_domain.png: histogram of AI scores per domain with the selection threshold;
- loss_vs_score.png: reference loss L_base against the AI score (selected rows highlighted), to
  see whether the score is more than a perplexity filter in disguise;
- methods.png: Jaccard of the selections and their length / repetition against the domain
  (plot_methods; the report draws it too);
- examples.md: the top and bottom documents of each domain (text re-read from the corpus), for a
  person to judge what "reasoning-intensive" meant in this run.

Plots read a bounded sample (DuckDB reservoir sample) so they stay cheap at any corpus size.
"""

from __future__ import annotations

import logging
from pathlib import Path

from attninf import plots

log = logging.getLogger(__name__)

SAMPLE_ROWS = 200_000


def _load(score_dir: Path, select_dir: Path):
    import duckdb

    con = duckdb.connect()
    df = con.execute(
        f"""SELECT s.doc_id, s.domain, s.score, s.loss_base, sel.doc_id IS NOT NULL AS selected
            FROM (SELECT * FROM read_parquet('{score_dir}/shard-*.parquet')
                  USING SAMPLE reservoir({SAMPLE_ROWS} ROWS) REPEATABLE (0)) s
            LEFT JOIN (SELECT doc_id FROM read_parquet('{select_dir}/selected.parquet')
                       WHERE method = 'attention_influence') sel USING (doc_id)""").fetchall()
    return df, con


def make_figures(score_dir: Path, out: Path, summary: dict, cfg, corpus_cfg=None) -> list[Path]:
    import numpy as np

    plt = plots.pyplot()
    rows, con = _load(score_dir, out)
    domains = sorted({r[1] for r in rows})
    written = []
    if domains:
        thr = summary.get("methods", {}).get("attention_influence", {})
        n = len(domains)
        fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
        for ax, d in zip(axes[0], domains):
            s = np.array([r[2] for r in rows if r[1] == d])
            ax.hist(s, bins=min(60, max(5, len(s) // 5)), color="#4c72b0")
            t = (thr.get(d) or {}).get("threshold")
            if t is not None:
                ax.axvline(t, color="#c44e52", ls="--", label=f"top {summary.get('ratio', 0):.0%}")
                ax.legend(fontsize=8)
            ax.set_title(f"{d} (n={len(s)})", fontsize=9)
            ax.set_xlabel("AI score (L_masked - L_base) / L_base")
        axes[0][0].set_ylabel("documents")
        written.append(plots.save(fig, out / "scores_by_domain.png", dpi=110))

        fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
        for ax, d in zip(axes[0], domains):
            sel = np.array([r[4] for r in rows if r[1] == d], dtype=bool)
            x = np.array([r[3] for r in rows if r[1] == d])
            y = np.array([r[2] for r in rows if r[1] == d])
            ax.scatter(x[~sel], y[~sel], s=4, alpha=0.5, color="#999999", label="not selected")
            ax.scatter(x[sel], y[sel], s=4, alpha=0.7, color="#c44e52", label="selected (AI)")
            ax.set_title(d, fontsize=9)
            ax.set_xlabel("L_base (nats/token)")
        axes[0][0].set_ylabel("AI score")
        axes[0][0].legend(fontsize=7)
        written.append(plots.save(fig, out / "loss_vs_score.png", dpi=110))

    p = plot_methods(summary, out / "methods.png")
    if p is not None:
        written.append(p)
    if cfg.examples > 0 and corpus_cfg is not None:
        p = _examples(con, score_dir, out, cfg, corpus_cfg)
        if p is not None:
            written.append(p)
    con.close()
    return written


def _examples(con, score_dir: Path, out: Path, cfg, corpus_cfg) -> Path | None:
    """Top/bottom `cfg.examples` documents per domain with a text excerpt (a second corpus pass)."""
    from attninf.config import build
    from selection.corpora import CorpusConfig, iter_documents

    k = int(cfg.examples)
    picks = con.execute(f"""
        WITH r AS (SELECT doc_id, domain, score, loss_base,
                     row_number() OVER (PARTITION BY domain ORDER BY score DESC, doc_id) AS top,
                     row_number() OVER (PARTITION BY domain ORDER BY score ASC, doc_id) AS bottom
                   FROM read_parquet('{score_dir}/shard-*.parquet'))
        SELECT doc_id, domain, score, loss_base, top <= {k} AS is_top FROM r
        WHERE top <= {k} OR bottom <= {k} ORDER BY domain, score DESC""").fetchall()
    wanted = {p[0] for p in picks}
    text: dict[str, str] = {}
    try:
        ccfg = build(CorpusConfig, corpus_cfg, "corpus")
        if ccfg.kind == "hf":
            return None  # a second pass over a hub corpus is too costly for an illustration
        for doc in iter_documents(ccfg):
            if doc.doc_id in wanted:
                text[doc.doc_id] = doc.text
                if len(text) == len(wanted):
                    break
    except Exception as e:  # noqa: BLE001
        log.warning("examples: cannot re-read the corpus: %s", e)
        return None
    lines = ["# Top and bottom documents by AI score", "",
             "Score = (L_masked - L_base) / L_base; higher = leans on the retrieval heads.", ""]
    cur = None
    for doc_id, dom, score, lb, is_top in picks:
        if dom != cur:
            lines += [f"## {dom}", ""]
            cur = dom
        body = text.get(doc_id, "(text not found)")[: cfg.example_chars].replace("```", "'''")
        lines += [f"### {'top' if is_top else 'bottom'}: `{doc_id}` score {score:.4f}, L_base {lb:.3f}", "",
                  "```", body, "```", ""]
    p = out / "examples.md"
    p.write_text("\n".join(lines))
    return p


SHORT = {"attention_influence": "AI", "perplexity": "ppl", "inverse": "inv", "random": "rand",
         "length_matched": "len"}


def plot_methods(summary: dict, path: Path) -> Path | None:
    """methods.png: per domain, the Jaccard of every pair of selections (top row) and each
    selection's mean length and repetition as a multiple of its domain's (bottom row): how far
    the controls are from the AI selection, and whether it is mostly "longer" or "more repetitive"."""
    import numpy as np

    methods = sorted(summary.get("methods") or {}, key=lambda m: (m != "attention_influence", m))
    prof = (summary.get("comparison") or {}).get("profile") or {}
    domains = sorted(prof)
    if not methods or not domains:
        return None
    plt = plots.pyplot()
    n = len(domains)
    fig, axes = plt.subplots(2, n, figsize=(3.3 * n, 6.0), squeeze=False)
    jac = summary.get("jaccard") or {}
    for j, d in enumerate(domains):
        k = len(methods)
        mat = np.eye(k)
        for a in range(k):
            for b in range(k):
                if a != b:
                    key = "|".join(sorted((methods[a], methods[b])))
                    mat[a, b] = (jac.get(key) or {}).get(d, np.nan)
        ax = axes[0][j]
        ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
        for a in range(k):
            for b in range(k):
                ax.text(b, a, f"{mat[a, b]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if mat[a, b] < 0.6 else "black")
        labels = [SHORT.get(m, m[:4]) for m in methods]
        ax.set_xticks(range(k), labels, fontsize=8)
        ax.set_yticks(range(k), labels, fontsize=8)
        ax.set_title(f"{d}: Jaccard", fontsize=9)
        ax = axes[1][j]
        base = prof[d].get("domain") or {}
        x = np.arange(k)
        lens = [((prof[d].get(m) or {}).get("mean_tokens") or np.nan) / (base.get("mean_tokens") or np.nan) for m in methods]
        reps = [((prof[d].get(m) or {}).get("mean_repetition") or np.nan) / (base.get("mean_repetition") or np.nan)
                for m in methods]
        ax.bar(x - 0.2, lens, 0.4, label="mean tokens", color="#4c72b0")
        ax.bar(x + 0.2, reps, 0.4, label="mean repetition", color="#dd8452")
        ax.axhline(1.0, color="#555555", lw=0.8, ls="--")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(f"{d}: selection / domain", fontsize=9)
    axes[1][0].legend(fontsize=7)
    return plots.save(fig, path, dpi=110)
