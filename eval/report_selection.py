"""The report's selection-control sections, from select/summary.json (selection/select.py):

- controls: each control's tokens per domain against the AI selection's (token-matched within
  select.token_tolerance, or marked where a domain's documents were too long to match);
- how the methods differ: Jaccard of the selected sets, Spearman of the ranking keys, length and
  repetition of each selection against its domain, with the figure (methods.png);
- contamination: documents sharing word n-grams with MMLU / GSM8K / HumanEval items, per method,
  domain and benchmark, with examples naming the documents and what they share.
Kept apart from eval/report.py so the selection side can grow without touching the report's
own tables.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def _f(x, fmt: str = "{:+.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def token_match_markdown(sm: dict) -> list[str]:
    tm = sm.get("token_match") or {}
    rows = [(m, d, v) for m, per in sorted((tm.get("methods") or {}).items()) for d, v in sorted(per.items())]
    if not rows:
        return []
    ok = "all within" if tm.get("all_within") else "**not all within**"
    out = ["### Controls: tokens per domain against the AI selection", "",
           f"Every control is token-matched per domain to the AI selection (tolerance "
           f"{100 * tm['tolerance']:.1f}%; {ok}).", "",
           "| control | domain | documents | tokens | AI tokens | difference |", "|---|---|---:|---:|---:|---:|"]
    per = sm.get("methods") or {}
    for m, d, v in rows:
        n = (per.get(m, {}).get(d) or {}).get("selected", "")
        out.append(f"| {m} | {d} | {n} | {v['tokens']:,} | {v['ai_tokens']:,} | {100 * v['rel_diff']:+.2f}%"
                   + ("" if v["within"] else " (outside)") + " |")
    return out + [""]


def comparison_markdown(sm: dict) -> list[str]:
    cmp_ = sm.get("comparison") or {}
    prof, rho = cmp_.get("profile") or {}, cmp_.get("spearman") or {}
    if not prof:
        return []
    methods = sorted(sm.get("methods") or {}, key=lambda m: (m != "attention_influence", m))
    out = ["### How the methods differ", "",
           "Jaccard of the selected sets per domain (1 = the same documents):", "",
           "| pair | " + " | ".join(sorted(prof)) + " |", "|---|" + "---:|" * len(prof)]
    for pair, per in sorted((sm.get("jaccard") or {}).items()):
        out.append(f"| {pair.replace('|', ' / ')} | " + " | ".join(_f(per.get(d), "{:.2f}") for d in sorted(prof)) + " |")
    pairs = sorted({p for per in rho.values() for p in per})
    if pairs:
        out += ["", "Spearman correlation, over every scored document of the domain, of the keys the methods "
                "rank by (AI score, -L_base for perplexity, tokens for length, the random key):", "",
                "| keys | " + " | ".join(sorted(rho)) + " |", "|---|" + "---:|" * len(rho)]
        for p in pairs:
            out.append(f"| {p.replace('|', ' vs ')} | " + " | ".join(_f(rho[d].get(p)) for d in sorted(rho)) + " |")
    out += ["", "Length and repetition of each selection against its domain (mean tokens, median tokens, "
            "mean share of repeated word 3-grams):", "",
            "| domain | all documents | " + " | ".join(methods) + " |", "|---|" + "---:|" * (len(methods) + 1)]
    for d in sorted(prof):
        cells = []
        for m in ["domain"] + methods:
            v = prof[d].get(m) or {}
            if not v:
                cells.append("–")
                continue
            rep = v.get("mean_repetition")
            cells.append(f"{v['mean_tokens']:.0f} / {v['median_tokens']:.0f}" + ("" if rep is None else f" / {rep:.3f}"))
        out.append(f"| {d} | " + " | ".join(cells) + " |")
    return out + [""]


def contamination_markdown(sm: dict) -> list[str]:
    c = sm.get("contamination") or {}
    out = ["### Contamination by the evaluation sets", ""]
    if not c.get("checked"):
        return out + [f"Not checked ({c.get('reason', 'no contamination block in select/summary.json')}).", ""]
    bstats = c.get("benchmarks") or {}
    short = ", ".join(f"{b} {v['too_short']}" for b, v in sorted(bstats.items()) if v.get("too_short"))
    out += [f"{c['documents_checked']:,} documents checked ({c['scope']}) against "
            + ", ".join(f"{b} ({v['items']:,} items)" for b, v in sorted(bstats.items()))
            + f" by shared word {c['ngram']}-grams (normalised text; a document counts when it shares >= "
            f"{c['min_matches']} with a benchmark)" + (f"; items shorter than {c['ngram']} words, not checkable: {short}" if short else "")
            + f". Contaminated: **{c['contaminated']}**"
            + ("; removed before mixing (select.decontaminate=true), the selection re-drawn from the clean pool."
               if c.get("removed") else "; kept (select.decontaminate=false)."), ""]
    per = c.get("per_method") or {}
    benches = sorted(bstats)
    if per:
        out += ["Contaminated selected documents per method, domain and benchmark:", "",
                "| method | domain | " + " | ".join(benches) + " |", "|---|---|" + "---:|" * len(benches)]
        for m in sorted(per):
            for d in sorted(per[m]):
                out.append(f"| {m} | {d} | " + " | ".join(str(per[m][d].get(b, 0)) for b in benches) + " |")
        out.append("")
    elif c.get("found_by_domain"):
        out += ["Contaminated corpus documents per domain: "
                + "; ".join(f"{d}: " + ", ".join(f"{b} {n}" for b, n in sorted(v.items()))
                            for d, v in sorted(c["found_by_domain"].items())), ""]
    for b, exs in sorted((c.get("examples") or {}).items()):
        out += [f"Examples ({b}):", ""]
        for e in exs:
            methods = ", ".join(e["methods"]) or "not selected"
            out += [f"- `{e['doc_id']}` ({e['domain']}; {methods}): {e['ngrams']} shared {c['ngram']}-grams "
                    f"with {', '.join(e['items'])}; e.g. \"{e['matched']}\""]
        out.append("")
    return out


def selection_report(select_dir: Path | None, out: Path | None = None) -> tuple[list[str], list[Path]]:
    """(markdown lines, figure paths) of the selection-control sections; nothing without a
    finished select stage. `out`: the report folder (figure links are relative to it; the method
    figure is drawn there when the select stage did not draw it)."""
    if select_dir is None or not (Path(select_dir) / "summary.json").exists():
        return [], []
    select_dir = Path(select_dir)
    sm = json.loads((select_dir / "summary.json").read_text())
    lines = ["## Selection controls, method comparison, contamination", ""]
    lines += token_match_markdown(sm) + comparison_markdown(sm)
    figs: list[Path] = []
    fig = select_dir / "methods.png"
    if not fig.exists() and out is not None:
        try:
            from selection.figures_scores import plot_methods

            fig = plot_methods(sm, Path(out) / "methods.png") or fig
        except Exception as e:  # noqa: BLE001 - a figure must never cost the report
            log.warning("report: methods figure failed: %s", e)
    if fig.exists():
        figs.append(fig)
        lines += [f"![methods]({os.path.relpath(fig, out) if out is not None else fig})", ""]
    lines += contamination_markdown(sm)
    return lines, figs
