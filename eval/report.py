"""Stage `report`: our results beside the paper's Table 1 and Table 6, with provenance.

Reads, per arm, `eval/<arm>/results.json`; optionally `eval_masked/results.json`, the
pretraining metrics (`pretrain/<arm>/metrics.jsonl`, `summary.json`), `select/summary.json`,
`mix/blend.json` and every stage manifest. Anything missing is shown as "not run" instead of
failing: a report of a half-finished experiment is still useful.

Writes `report/report.md`, `report/report.json` (the same numbers, machine-readable) and figures
(`deltas.png`: per-benchmark delta vs the baseline arm, ours beside the paper's;
`mirror_effect.png`; `loss_curves.png` via pretrain.figures when available).

Deltas: treated minus baseline, in the paper's units; their standard error is
sqrt(se_a^2 + se_b^2) from lm-eval's per-task stderrs (the two arms are scored on the same items,
so this is conservative). Our "average" is over the benchmarks we ran, which is not the
paper's 19-benchmark average; the table says how many.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attninf import plots
from attninf.config import build, digest, to_plain
from attninf.manifest import MANIFEST, write_atomic, write_json
from eval import paper as paper_mod

log = logging.getLogger(__name__)
NOT_RUN = "not run"


@dataclass
class ReportConfig:
    baseline_arm: str = "baseline"           # compared against (paper: SmolLM-Corpus alone)
    treated_arm: str = "attention_influence"  # the paper's treated arm
    paper_numbers: str | None = None         # default eval/paper_numbers.yaml
    figures: bool = True


# ---------------------------------------------------------------- reading (robust to gaps)

def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def n_items(res: dict, task: str) -> int | None:
    """Scored items of a task or group (sum over its leaves)."""
    ns = res.get("n-samples") or {}
    if task in ns:
        return ns[task].get("effective")
    subs = (res.get("group_subtasks") or {}).get(task)
    if not subs:
        return None
    counts = [n_items(res, s) for s in subs]
    return sum(c for c in counts if c is not None) or None


def metric_of(res: dict | None, task: str, key: str) -> dict | None:
    """{value, stderr, key, n} for `task`'s `key` in an lm-eval result dict, or None."""
    if not res:
        return None
    metrics = (res.get("results") or {}).get(task)
    if not metrics:
        return None
    got = paper_mod.pick_metric(metrics, key)
    if got is None:
        return None
    return {"key": got[0], "value": got[1], "stderr": got[2], "n": n_items(res, task)}


# ---------------------------------------------------------------- tables

def _fmt(v: float | None, scale: float, se: float | None = None, signed: bool = False) -> str:
    if v is None:
        return NOT_RUN
    s = f"{v * scale:+.2f}" if signed else f"{v * scale:.2f}"
    if se is not None and se > 0:
        s += f" ± {se * scale:.2f}"
    return s


def table1(paper: dict, results: dict[str, dict | None], baseline: str, treated: str) -> dict:
    """Rows of the Table-1 comparison (values as fractions; the paper's in its own units)."""
    t = paper["table1"]
    arms = list(results)
    others = [a for a in arms if a != baseline]
    rows = []
    for prow in t["rows"]:
        if prow.get("key") == "average":
            continue
        ours = {a: metric_of(results[a], prow["task"], prow["metric"]) for a in arms}
        deltas = {}
        b = ours.get(baseline)
        for a in others:
            o = ours.get(a)
            if b and o:
                se = (math.sqrt((b["stderr"] or 0) ** 2 + (o["stderr"] or 0) ** 2)
                      if b["stderr"] is not None and o["stderr"] is not None else None)
                deltas[a] = {"value": o["value"] - b["value"], "stderr": se}
        rows.append({"name": prow["name"], "task": prow["task"], "metric": prow["metric"],
                     "note": prow.get("note"), "paper": {"baseline": prow["baseline"],
                                                         "attention_influence": prow["attention_influence"]},
                     "ours": ours, "delta": deltas})
    # Our average over benchmarks every arm has (the paper's is over its 19 benchmarks).
    common = [r for r in rows if all(r["ours"].get(a) for a in arms)]
    avg = {a: (sum(r["ours"][a]["value"] for r in common) / len(common) if common else None) for a in arms}
    pavg = next((r for r in t["rows"] if r.get("key") == "average"), None)
    return {"rows": rows, "average": {"ours": avg, "n_benchmarks": len(common),
                                      "benchmarks": [r["name"] for r in common], "paper": pavg},
            "arms": arms, "baseline": baseline, "treated": treated, "scale": t.get("scale", 100)}


def table1_markdown(t1: dict, paper: dict) -> str:
    scale = t1["scale"]
    arms, base = t1["arms"], t1["baseline"]
    others = [a for a in arms if a != base]
    cols = paper["table1"]["columns"]
    head = (["Benchmark", f"Paper: {cols['baseline']}", f"Paper: {cols['attention_influence']}", "Paper Δ"]
            + [f"Ours: {a}" for a in arms] + [f"Ours Δ {a} − {base}" for a in others] + ["n (ours)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in t1["rows"]:
        pb, pa = r["paper"]["baseline"], r["paper"]["attention_influence"]
        ns = {o["n"] for o in r["ours"].values() if o and o.get("n")}
        cells = [r["name"] + (f" ¹" if r.get("note") else ""), f"{pb:.2f}", f"{pa:.2f}", f"{pa - pb:+.2f}"]
        cells += [_fmt(o["value"], scale, o["stderr"]) if o else NOT_RUN for o in (r["ours"][a] for a in arms)]
        cells += [_fmt(r["delta"][a]["value"], scale, r["delta"][a]["stderr"], signed=True)
                  if a in r["delta"] else NOT_RUN for a in others]
        cells.append(",".join(str(n) for n in sorted(ns)) or "–")
        lines.append("| " + " | ".join(cells) + " |")
    av = t1["average"]
    pav = av["paper"] or {}
    cells = [f"Average ({av['n_benchmarks']} run)" if av["n_benchmarks"] else "Average",
             f"{pav.get('baseline', float('nan')):.2f}", f"{pav.get('attention_influence', float('nan')):.2f}",
             f"{pav.get('attention_influence', 0) - pav.get('baseline', 0):+.2f}"]
    cells += [_fmt(av["ours"][a], scale) for a in arms]
    cells += [_fmt(av["ours"][a] - av["ours"][base], scale, signed=True)
              if av["ours"].get(a) is not None and av["ours"].get(base) is not None else NOT_RUN
              for a in others]
    cells.append("–")
    lines.append("| " + " | ".join(cells) + " |")
    notes = [f"¹ {r['name']}: {r['note']}" for r in t1["rows"] if r.get("note")]
    return "\n".join(lines + [""] + ([" ".join(notes)] if notes else []))


def table6(paper: dict, masked: dict | None, masked_dir: Path | None) -> dict | None:
    """Rows of the mirror-effect comparison from eval_masked (None when it was not run)."""
    if not masked:
        return None
    t = paper["table6"]
    per_set = {}
    for name in (masked.get("head_sets") or {}):
        res = read_json(masked_dir / name / "results.json") if masked_dir else None
        per_set[name] = res
    rows = []
    for prow in t["rows"]:
        ours = {k: metric_of(per_set.get(k), prow["task"], prow["metric"]) for k in t["columns"]}
        rows.append({"name": prow["name"], "task": prow["task"],
                     "paper": {k: prow[k] for k in t["columns"]}, "ours": ours})
    return {"rows": rows, "columns": t["columns"],
            "n_heads": {k: v.get("n_heads") for k, v in masked["head_sets"].items()},
            "labels": {k: v.get("label") for k, v in masked["head_sets"].items()},
            "meta": masked.get("attninf") or {}}


def table6_markdown(t6: dict | None) -> str:
    if t6 is None:
        return f"Masked-head evaluation: {NOT_RUN} (add `eval_masked` to stages)."
    cols = t6["columns"]
    head = (["Benchmark"] + [f"Paper: {v}" for v in cols.values()]
            + [f"Ours: {t6['labels'][k]}" if t6.get("labels", {}).get(k) else
               f"Ours: {v} ({t6['n_heads'].get(k, '–')} heads)" for k, v in cols.items()])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in t6["rows"]:
        cells = [r["name"]] + [f"{r['paper'][k]:.3f}" for k in cols]
        cells += [(f"{o['value']:.3f} ± {o['stderr']:.3f}" if o["stderr"] else f"{o['value']:.3f}")
                  if o else NOT_RUN for o in (r["ours"][k] for k in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    m = t6["meta"]
    model = (m.get("model") or {}).get("path")
    heads = m.get("heads") or {}
    lines += ["", f"Selector: `{model}`; heads from {heads.get('source') or 'config'} "
                  f"(set {heads.get('set')}, mode {heads.get('mode')}, random seed {heads.get('seed')}); "
                  f"limit per task: {m.get('limit')}; shots: "
                  f"{sorted({v for v in (m.get('num_fewshot') or {}).values() if v is not None}) or 'task defaults'}."]
    return "\n".join(lines)


# ---------------------------------------------------------------- provenance

def manifests(run_dir: Path) -> list[dict]:
    out = []
    for p in sorted(list(run_dir.glob(f"*/{MANIFEST}")) + list(run_dir.glob(f"*/*/{MANIFEST}"))):
        if ".old-" in str(p.parent):
            continue
        m = read_json(p)
        if m:
            out.append({"folder": str(p.parent.relative_to(run_dir)), "stage": m.get("stage"),
                        "arm": m.get("arm"), "status": m.get("status"), "key": m.get("key"),
                        "git_commit": m.get("git_commit"), "wall_s": m.get("wall_s"),
                        "versions": m.get("versions") or {}})
    return out


def token_counts(run_dir: Path, arms: list[str]) -> dict:
    out: dict[str, Any] = {}
    sel = read_json(run_dir / "select" / "summary.json")
    if sel:
        out["selection"] = {m: {"tokens": sum((d or {}).get("tokens", 0) for d in per.values()),
                                "selected_tokens": sum((d or {}).get("selected_tokens", 0) for d in per.values()),
                                "selected": sum((d or {}).get("selected", 0) for d in per.values())}
                            for m, per in (sel.get("methods") or {}).items() if isinstance(per, dict)}
    blend = read_json(run_dir / "mix" / "blend.json")
    if blend:
        out["mix_arms"] = {a: {"tokens": v.get("tokens"), "selection": v.get("selection")}
                           for a, v in (blend.get("arms") or {}).items()}
    trained = {}
    for a in arms:
        s = read_json(run_dir / "pretrain" / a / "summary.json")
        if s:
            trained[a] = {"tokens": s.get("tokens"), "steps": s.get("steps"), "loss_last": s.get("loss_last")}
    if trained:
        out["pretrain"] = trained
    return out


def provenance_markdown(cfg_digest: str, mans: list[dict], results: dict[str, dict | None],
                        masked: dict | None, tokens: dict, cfg) -> str:
    lines = [f"- Config digest: `{cfg_digest}` (experiment `{cfg.get('experiment_name')}`)"]
    commits = sorted({m["git_commit"] for m in mans if m.get("git_commit")})
    lines.append(f"- Code commits: {', '.join(f'`{c}`' for c in commits) or 'unknown'}")
    vers = next((m["versions"] for m in mans if m.get("versions")), {})
    if vers:
        lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    sel_model = (cfg.get("model") or {}).get("path")
    lines.append(f"- Selector model: `{sel_model}`")
    corpus = cfg.get("corpus") or {}
    if corpus:
        lines.append(f"- Corpus: kind `{corpus.get('kind')}`, paths {to_plain(corpus.get('paths'))}")
    for arm, res in results.items():
        if not res:
            lines.append(f"- Eval `{arm}`: {NOT_RUN}")
            continue
        a = res.get("attninf") or {}
        mir = a.get("mirror") or {}
        mtxt = ("offline mirror (" + mir.get("reason", "") + "; few-shot pools: "
                + "; ".join(f"{k}: {v.get('fewshot_pool')}" for k, v in (mir.get("benchmarks") or {}).items())
                + ")") if mir.get("used") else f"Hub datasets ({mir.get('reason', 'unknown')})"
        model = a.get("model") or {}
        lines.append(f"- Eval `{arm}`: model `{model.get('path')}` ({model.get('dtype')}, "
                     f"{model.get('device')}), suite `{a.get('suite')}`, limit {a.get('limit')}, shots "
                     f"{sorted({v for v in (a.get('num_fewshot') or {}).values() if v is not None})}, "
                     f"data: {mtxt}; lm-eval {res.get('lm_eval_version')}; "
                     f"skipped: {a.get('skipped_tasks') or 'none'}; wall {a.get('wall_s') or 0:.0f}s")
    if masked:
        mir = ((masked.get("attninf") or {}).get("mirror") or {})
        lines.append(f"- Masked eval: offline mirror {'used' if mir.get('used') else 'not used'}")
    if tokens.get("selection"):
        for m, v in tokens["selection"].items():
            lines.append(f"- Selection `{m}`: {v['selected']} documents, {v['selected_tokens']:,} of "
                         f"{v['tokens']:,} tokens")
    for a, v in (tokens.get("mix_arms") or {}).items():
        lines.append(f"- Mix arm `{a}`: {v['tokens']:,} dataset tokens (selection {v['selection']})")
    for a, v in (tokens.get("pretrain") or {}).items():
        lines.append(f"- Pretrain `{a}`: {v['steps']} steps, {v['tokens']:,} tokens trained, "
                     f"final loss {v['loss_last']}")
    if mans:
        lines += ["", "| stage folder | status | commit | wall s |", "|---|---|---|---|"]
        for m in mans:
            lines.append(f"| {m['folder']} | {m['status']} | {m.get('git_commit') or '–'} | "
                         f"{(m.get('wall_s') or 0):.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the selector side

def selection_markdown(stage_dirs: dict[str, Path], out: Path | None = None) -> str:
    """Detection, the probe mirror check and the per-domain selection, when those stages ran.

    On small selectors these are the numbers that carry the method (which heads, how much the
    retrieval loss rises, what gets selected); benchmark deltas need paper-scale training.
    """
    lines: list[str] = []
    heads_p = stage_dirs.get("detect", Path("-")) / "heads.json"
    if heads_p.exists():
        h = json.loads(heads_p.read_text())
        sel = ", ".join(f"({l},{k})" for l, k in h.get("selected", [])[:16])
        lines += [f"- Detection: `{h.get('model')}`, {h.get('num_probes')} probes of <= {h.get('max_tokens')} "
                  f"tokens, mode `{h.get('mode')}`; probe accuracy {h.get('probe_accuracy', float('nan')):.3f}; "
                  f"top {h.get('fraction', 0):.0%} = {len(h.get('selected', []))} of "
                  f"{h.get('n_layers', 0) * h.get('n_heads', 0)} heads [layer, head]: {sel}"]
    mirror_md = stage_dirs.get("mirror", Path("-")) / "mirror.md"
    if mirror_md.exists():
        lines += ["", mirror_md.read_text().strip(), ""]
    summary_p = stage_dirs.get("select", Path("-")) / "summary.json"
    if summary_p.exists():
        sm = json.loads(summary_p.read_text())
        methods = sm.get("methods") or {}
        lines += ["", f"Selection: top {sm.get('ratio', 0):.0%} per domain by {sm.get('budget')}; "
                  "selected tokens as a share of the domain's tokens.", "",
                  "| domain | documents | tokens | " + " | ".join(methods) + " | AI score threshold |",
                  "|---|---:|---:|" + "---:|" * len(methods) + "---:|"]
        for dom, d in sorted((sm.get("domains") or {}).items()):
            cells = []
            for m in methods:
                v = methods[m].get(dom) or {}
                cells.append(f"{v.get('selected', 0)} docs, {v.get('selected_tokens', 0) / max(1, d['tokens']):.0%}")
            thr = (methods.get("attention_influence", {}).get(dom) or {}).get("threshold")
            thr_s = f"{thr:.3f}" if thr is not None else "–"
            lines.append(f"| {dom} | {d['documents']:,} | {d['tokens']:,} | " + " | ".join(cells) + f" | {thr_s} |")
    rep_md = stage_dirs.get("select", Path("-")) / "repetition.md"  # selection.select
    if rep_md.exists():
        lines += ["", rep_md.read_text().strip()]
    if out is not None:  # the stages' own figures, linked rather than copied
        figs = [stage_dirs.get(st, Path("-")) / f for st, f in
                (("detect", "heatmap.png"), ("select", "scores_by_domain.png"), ("select", "loss_vs_score.png"))]
        lines += [""] + [f"![{f.stem}]({os.path.relpath(f, out)})" for f in figs if f.exists()]
    return "\n".join(lines).strip()


# ---------------------------------------------------------------- figures

def plot_deltas(t1: dict, paper: dict, out_png: Path) -> Path | None:
    """Per-benchmark delta (treated − baseline), ours with ±1 se beside the paper's."""
    rows = [r for r in t1["rows"] if t1["treated"] in r["delta"]]
    if not rows:
        return None
    plt = plots.pyplot()
    scale = t1["scale"]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 3.8))
    ax.bar([i - 0.2 for i in x], [r["paper"]["attention_influence"] - r["paper"]["baseline"] for r in rows],
           0.4, label="paper (7B, 1T tokens)", color="#999999")
    ax.bar([i + 0.2 for i in x], [r["delta"][t1["treated"]]["value"] * scale for r in rows], 0.4,
           yerr=[(r["delta"][t1["treated"]]["stderr"] or 0) * scale for r in rows],
           label=f"ours ({t1['treated']} − {t1['baseline']})", color="#1f77b4", capsize=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(list(x), [r["name"] for r in rows])
    ax.set_ylabel("Δ score (points)")
    ax.set_title("Benchmark deltas vs the baseline arm")
    ax.legend(fontsize=8)
    return plots.save(fig, out_png)


def plot_mirror(t6: dict | None, out_png: Path) -> Path | None:
    if t6 is None:
        return None
    rows = [r for r in t6["rows"] if any(r["ours"].values())]
    if not rows:
        return None
    plt = plots.pyplot()
    cols = list(t6["columns"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    w = 0.8 / len(cols)
    for ax, who in zip(axes, ("paper", "ours")):
        for j, c in enumerate(cols):
            vals = [(r[who][c] if who == "paper" else (r["ours"][c] or {}).get("value", float("nan")))
                    for r in rows]
            ax.bar([i + (j - (len(cols) - 1) / 2) * w for i in range(len(rows))], vals, w,
                   label=t6["columns"][c])
        ax.set_xticks(range(len(rows)), [r["name"] for r in rows])
        ax.set_title("paper (1.3B selector)" if who == "paper" else "ours")
    axes[0].set_ylabel("score")
    axes[0].legend(fontsize=8)
    fig.suptitle("Mirror effect: masking retrieval vs random heads")
    return plots.save(fig, out_png)


# ---------------------------------------------------------------- the stage

def render(run_dir: Path, cfg, rcfg: ReportConfig, out: Path, arms: list[str],
           eval_dirs: dict[str, Path | None], masked_dir: Path | None,
           selector_dirs: dict[str, Path] | None = None) -> dict:
    """Build report.md/report.json/figures from a run directory; pure file in, file out."""
    out.mkdir(parents=True, exist_ok=True)
    paper = paper_mod.load(rcfg.paper_numbers)
    results = {a: (read_json(d / "results.json") if d else None) for a, d in eval_dirs.items()}
    masked = read_json(masked_dir / "results.json") if masked_dir else None
    base = rcfg.baseline_arm if rcfg.baseline_arm in arms else (arms[0] if arms else rcfg.baseline_arm)
    treated = rcfg.treated_arm if rcfg.treated_arm in arms else next((a for a in arms if a != base), base)
    t1 = table1(paper, results, base, treated)
    t6 = table6(paper, masked, masked_dir)
    mans = manifests(run_dir)
    tokens = token_counts(run_dir, arms)
    cfg_digest = digest(cfg)
    figs: dict[str, str] = {}
    fig_notes = []
    if rcfg.figures:
        for name, fn in (("deltas.png", lambda p: plot_deltas(t1, paper, p)),
                         ("mirror_effect.png", lambda p: plot_mirror(t6, p))):
            try:
                if fn(out / name):
                    figs[name] = name
            except Exception as e:  # noqa: BLE001 - a figure never costs the report
                fig_notes.append(f"{name}: failed ({e})")
        metrics = {a: run_dir / "pretrain" / a / "metrics.jsonl" for a in arms}
        metrics = {a: p for a, p in metrics.items() if p.exists()}
        if metrics:
            try:
                from pretrain.figures import plot_loss_curves

                plot_loss_curves(metrics, out / "loss_curves.png")
                figs["loss_curves.png"] = "loss_curves.png"
            except Exception as e:  # noqa: BLE001
                fig_notes.append(f"loss curves: skipped ({e})")
        else:
            fig_notes.append("loss curves: no pretrain metrics in this run")
    title = f"# AttentionInfluence reproduction report: `{cfg.get('experiment_name')}`"
    md = [title, "",
          f"Paper: {paper['source']}. The paper's numbers come from `eval/paper_numbers.yaml`.",
          "", "## Table 1: pretraining with selected data", "",
          paper["table1"]["caption"].strip(), "",
          f"Ours: arms {', '.join(f'`{a}`' for a in arms) or NOT_RUN}; Δ against `{base}`, "
          "± one standard error (sqrt of the summed squared per-arm stderrs). Points (×100).", "",
          table1_markdown(t1, paper), "",
          "## Table 6: mirror effect (the selector with heads masked)", "",
          paper["table6"]["caption"].strip(), "", table6_markdown(t6), ""]
    sel_md = selection_markdown(selector_dirs or {}, out)
    if sel_md:
        md += ["## The selector: retrieval heads, probe mirror check, selection", "", sel_md, ""]
    md += ["## Figures", ""]
    md += [f"![{k}]({v})" for k, v in figs.items()] or ["(none)"]
    md += [f"- {n}" for n in fig_notes]
    md += ["", "## Provenance", "", provenance_markdown(cfg_digest, mans, results, masked, tokens, cfg), ""]
    text = "\n".join(md)
    write_atomic(out / "report.md", text)
    write_json(out / "report.json", {"table1": t1, "table6": t6, "tokens": tokens, "manifests": mans,
                                     "config_digest": cfg_digest, "figures": figs})
    return {"report": str(out / "report.md"), "figures": sorted(figs),
            "arms_with_results": [a for a, r in results.items() if r],
            "mirror_effect": t6 is not None}


def run(ctx) -> dict:
    from attninf.context import MissingInput

    rcfg = build(ReportConfig, ctx.section("report"), "report")
    arms = list((ctx.cfg.get("arms") or {}).keys())
    eval_dirs: dict[str, Path | None] = {}
    for a in arms:
        try:
            eval_dirs[a] = ctx.upstream("eval", a)
        except MissingInput:
            eval_dirs[a] = None
    if not arms:  # a single-model eval (eval.model) still gets a report
        p = ctx.run_dir / "eval"
        if (p / "results.json").exists():
            arms, eval_dirs = ["model"], {"model": p}
    try:
        masked_dir = ctx.upstream("eval_masked")
    except MissingInput:
        masked_dir = None
    selector_dirs = {st: ctx.dirs.get((st, None), ctx.run_dir / st) for st in ("detect", "mirror", "select")}
    out = render(ctx.run_dir, ctx.cfg, rcfg, ctx.out, arms, eval_dirs, masked_dir, selector_dirs)
    for f in out["figures"]:
        ctx.tracker.artifact(ctx.out / f, type="figure", name=f"report-{f}")
    return out
