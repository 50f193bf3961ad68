"""Stage `report`: our results beside the paper's Table 1 and Table 6, with provenance.

Everything is read through the stage context's folders (`ctx.upstream` / `ctx.dirs`), never
`run_dir/<stage>` by name, so a sweep point's report shows that point's numbers: per arm (and
seed) the eval folder's `results.json` and `samples/` (and `pre_decay/` with eval.pre_decay),
eval_masked's head-set folders, the pretraining metrics and summaries, mix/blend.json,
select/summary.json, detect/heads.json, mirror/mirror.json, and the manifests of those folders.
Anything missing is shown as "not run" instead of failing.

Writes `report/report.md`, `report/report.json` (the same numbers), `report/deltas.json` (paired
Table 1 deltas, points 0-100, phase final | pre_decay; then the small-scale metrics' deltas,
records with a `unit`: bits/byte for `bpb`, points for `p_correct`), `report/selector_deltas.json`
(Table 6 and probe-mirror rows, per item / per probe) and figures (`deltas_ci.png`: forest plot of
every Table 1 delta with its 95% interval beside the paper's; `small_scale_ci.png`, the same for
bits per byte; `deltas.png`; `mirror_effect.png`; `loss_curves.png`). The prediction that
`eval_masked` wrote before training (eval/prediction.py) is set beside the arms' deltas.

Deltas are paired (eval/deltas.py, eval/stats.py): both arms are scored on the same items, so the
interval is a paired bootstrap over items (within subtasks for groups such as MMLU), the p-value
an exact McNemar (0/1 metrics) or sign-flip test, and the MDE the smallest delta this run could
detect at 80% power. With several seeds per arm (every seed answers the same items) the interval
is a crossed bootstrap and the p-value and MDE come from the crossed items x seeds variance
(eval/stats.py). Our "average" is over the benchmarks we ran, not the paper's 19.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attninf import plots
from attninf.config import build, check, digest, to_plain
from attninf.manifest import MANIFEST, write_atomic, write_json
from eval import deltas as deltas_mod
from eval import paper as paper_mod
from eval import prediction as prediction_mod
from eval.stats import DEFAULT_RESAMPLES

log = logging.getLogger(__name__)
NOT_RUN = "not run"


@dataclass
class ReportConfig:
    baseline_arm: str = "baseline"           # compared against (paper: SmolLM-Corpus alone)
    treated_arm: str = "attention_influence"  # the paper's treated arm
    paper_numbers: str | None = None         # default eval/paper_numbers.yaml
    figures: bool = True
    n_resamples: int = DEFAULT_RESAMPLES      # bootstrap / sign-flip resamples
    bootstrap_seed: int = 0                  # seeds the resampling: the intervals are reproducible
    alpha: float = 0.05                      # two-sided level of the intervals, tests and MDE
    power: float = 0.8                       # power at which the MDE is stated

    def validate(self) -> None:
        check(self.n_resamples >= 100, "n_resamples", "must be >= 100")
        check(0 < self.alpha < 1, "alpha", "must be in (0, 1)")
        check(0 < self.power < 1, "power", "must be in (0, 1)")


@dataclass
class Inputs:
    """This run's folders as the report reads them (from the stage context, never by name)."""

    arms: list[str]                                        # base arm names
    runs: dict[str, list[tuple[int | None, Path | None]]]  # arm -> [(seed, eval folder | None)]
    pretrain: dict[str, Path] = field(default_factory=dict)  # run name (arm or arm@seedS) -> folder
    masked: Path | None = None
    stages: dict[str, Path] = field(default_factory=dict)  # detect, mirror, select, mix
    folders: list[Path] = field(default_factory=list)      # every stage folder of this run
    seeds: list[int] | None = None


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


def arm_metric(res_list: list[dict | None], task: str, key: str) -> dict | None:
    """{key, value (mean over seeds), std (over seeds), stderr (one seed: lm-eval's), n, per_seed}."""
    got = [metric_of(r, task, key) for r in res_list if r]
    got = [g for g in got if g]
    if not got:
        return None
    vals = [g["value"] for g in got]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"key": got[0]["key"], "value": mean, "std": std,
            "stderr": got[0]["stderr"] if len(got) == 1 else None, "n": got[0]["n"],
            "per_seed": vals, "seeds": len(vals)}


def table1(paper: dict, results: dict[str, list[dict | None]], baseline: str, treated: str,
           recs: list[dict] | None = None) -> dict:
    """Rows of the Table-1 comparison (values as fractions; the paper's in its own units).

    results: arm -> per-seed lm-eval result dicts. Each delta carries the unpaired
    value/stderr from the result files and, when `recs` has it, the paired interval and test.
    """
    t = paper["table1"]
    arms = list(results)
    others = [a for a in arms if a != baseline]
    by = {(r["arm"], r["task"]): r for r in (recs or [])}
    rows = []
    for prow in t["rows"]:
        if prow.get("key") == "average":
            continue
        ours = {a: arm_metric(results[a], prow["task"], prow["metric"]) for a in arms}
        deltas = {}
        b = ours.get(baseline)
        for a in others:
            o = ours.get(a)
            if b and o:
                se = (math.sqrt((b["stderr"] or 0) ** 2 + (o["stderr"] or 0) ** 2)
                      if b["stderr"] is not None and o["stderr"] is not None else None)
                deltas[a] = {"value": o["value"] - b["value"], "stderr": se, "paired": by.get((a, prow["task"]))}
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


def _p(p: float | None) -> str:
    if p is None:
        return "–"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def paired_cell(rec: dict | None) -> str:
    """"+1.23 [-0.50, +2.96] p=0.170 MDE 3.10" (points) or why there is none."""
    if not rec:
        return NOT_RUN
    if rec.get("delta") is None:
        return "no item data"
    mde = f"{rec['mde']:.2f}" if rec.get("mde") is not None else "–"
    return f"{rec['delta']:+.2f} [{rec['ci_low']:+.2f}, {rec['ci_high']:+.2f}] p={_p(rec['p_value'])} MDE {mde}"


def _ours_cell(o: dict | None, scale: float) -> str:
    if not o:
        return NOT_RUN
    if o["seeds"] > 1:
        return f"{o['value'] * scale:.2f} ± {o['std'] * scale:.2f} sd ({o['seeds']} seeds)"
    return _fmt(o["value"], scale, o["stderr"])


def table1_markdown(t1: dict, paper: dict) -> str:
    scale = t1["scale"]
    arms, base = t1["arms"], t1["baseline"]
    others = [a for a in arms if a != base]
    cols = paper["table1"]["columns"]
    head = (["Benchmark", f"Paper: {cols['baseline']}", f"Paper: {cols['attention_influence']}", "Paper Δ"]
            + [f"Ours: {a}" for a in arms] + [f"Ours Δ {a} − {base} [95% CI] p MDE" for a in others] + ["n (ours)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in t1["rows"]:
        pb, pa = r["paper"]["baseline"], r["paper"]["attention_influence"]
        ns = {o["n"] for o in r["ours"].values() if o and o.get("n")}
        cells = [r["name"] + (f" ¹" if r.get("note") else ""), f"{pb:.2f}", f"{pa:.2f}", f"{pa - pb:+.2f}"]
        cells += [_ours_cell(r["ours"][a], scale) for a in arms]
        cells += [paired_cell(r["delta"][a]["paired"]) if a in r["delta"] and r["delta"][a]["paired"]
                  else (_fmt(r["delta"][a]["value"], scale, r["delta"][a]["stderr"], signed=True)
                        if a in r["delta"] else NOT_RUN) for a in others]
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


def before_decay_markdown(paper: dict, results: dict[str, list[dict | None]], recs: list[dict],
                          base: str, treated: str) -> str:
    """The paper's before-decay rows beside ours (each arm's hf_pre_decay export)."""
    rows = (paper.get("table1_before_decay") or {}).get("rows", [])
    metric = {r["task"]: r["metric"] for r in paper["table1"]["rows"] if r.get("task")}
    by = {(r["arm"], r["task"]): r for r in recs}
    any_ours = any(r for v in results.values() for r in v)
    head = ["Benchmark", "Paper: baseline", "Paper: AttentionInfluence", "Paper Δ",
            f"Ours: {base}", f"Ours: {treated}", f"Ours Δ [95% CI] p MDE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if not r.get("task"):
            continue
        cells = [r["name"], f"{r['baseline']:.2f}", f"{r['attention_influence']:.2f}",
                 f"{r['attention_influence'] - r['baseline']:+.2f}"]
        for a in (base, treated):
            cells.append(_ours_cell(arm_metric(results.get(a) or [], r["task"], metric[r["task"]]), 100))
        cells.append(paired_cell(by.get((treated, r["task"]))))
        lines.append("| " + " | ".join(cells) + " |")
    if not any_ours:
        lines += ["", f"Ours: {NOT_RUN} (set `eval.pre_decay=true` with `pretrain.export_pre_decay=true`)."]
    return "\n".join(lines)


def deltas_markdown(recs: list[dict]) -> str:
    """Every paired delta as one table row (the same numbers as deltas.json)."""
    if not recs:
        return "(none)"
    lines = ["| benchmark | metric | arm | baseline | phase | n items | seeds | Δ | 95% CI | p | test | MDE | paper Δ |",
             "|---|---|---|---|---|---:|---:|---:|---|---:|---|---:|---:|"]
    for r in recs:
        if r.get("delta") is None:
            lines.append(f"| {r['name']} | {r['metric']} | {r['arm']} | {r['baseline']} | {r['phase']} | – | – | "
                         f"{r.get('note')} | | | | | |")
            continue
        k = 4 if r["metric"] == "answer_loss" or r.get("unit") == "bits/byte" else 2  # points: 2 decimals
        pd = f"{r['paper_delta']:+.2f}" if r.get("paper_delta") is not None else "–"
        mde = f"{r['mde']:.{k}f}" if r.get("mde") is not None else "–"
        lines.append(f"| {r['name']} | {r['metric']} | {r['arm']} | {r['baseline']} | {r['phase']} | "
                     f"{r['n_items']:,} | {len(r['seeds'])} | {r['delta']:+.{k}f} | "
                     f"[{r['ci_low']:+.{k}f}, {r['ci_high']:+.{k}f}] | {_p(r['p_value'])} | {r['test']} | "
                     f"{mde} | {pd} |")
    return "\n".join(lines)


def power_markdown(paper: dict, recs: list[dict], treated: str, rcfg: ReportConfig) -> str:
    lines = [f"MDE: the smallest true delta a two-sided test at alpha {rcfg.alpha} detects with "
             f"{rcfg.power:.0%} power, (z_(1-alpha/2) + z_power) x the delta's null standard deviation "
             "(one seed: from the observed discordant items, sqrt(sum_i c_i^2 d_i^2), = sqrt(p_disc / n) "
             "for a 0/1 metric; several seeds: (t_(1-alpha/2, df) + t_(power, df)) x sqrt(Var) from the crossed "
             "items x seeds decomposition, Var = s_item^2/n + s_seed^2/S + s_noise^2/(nS), Satterthwaite df).", ""]
    words = deltas_mod.power_words(paper, recs, treated, rcfg.alpha, rcfg.power)
    lines += ["This run:", ""] + (words or ["- no Table 1 delta with a paper counterpart was evaluated."])
    ps = deltas_mod.paper_scale_power(paper, rcfg.alpha, rcfg.power)
    lines += ["", "At the paper's scale (full test sets, one seed; discordance assumed from the paper's "
              "accuracy levels with independent errors, p_b(1 - p_a) + p_a(1 - p_b), an upper bound since "
              "related models err on the same items, so these MDEs are conservative; HumanEval as one 0/1 "
              "outcome per problem):", "",
              "| benchmark | items | assumed discordance | MDE (points) | paper Δ | detectable? |",
              "|---|---:|---:|---:|---:|---|"]
    for r in ps:
        ok = "yes" if abs(r["paper_delta"]) >= r["mde"] else "no"
        lines.append(f"| {r['name']} | {r['n_items']:,} | {r['discordance']:.3f} | {r['mde']:.2f} | "
                     f"{r['paper_delta']:+.2f} | {ok} |")
    return "\n".join(lines)


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


SMALL_SCALE_TEXT = (
    "Accuracy cannot rank arms that all sit at chance; the likelihood of the gold answer can (DataDecide, "
    "OLMES). Per item: the gold answer's bits per byte (`bpb`, bits/byte, lower is better, so a negative Δ is "
    "a gain) for MMLU (cloze form: the correct option's text), GSM8K (the reference solution) and HumanEval "
    "(the canonical solution), and MMLU's probability of the correct option among the four (`p_correct`, "
    "points). Paired per item like the accuracy deltas (eval/tasks/bpb.py).")


def truncation_markdown(results: dict[str, list[dict | None]]) -> str:
    """Which prompts lm-eval cut from the left to fit the arms' context window (then what is scored
    is not the task as defined)."""
    cut: dict[str, list[int]] = {}
    for res in (r for rs in results.values() for r in rs if r):
        for task, v in ((res.get("attninf") or {}).get("truncated") or {}).items():
            c = cut.setdefault(task, [0, 0])
            c[0] += v["cut"]
            c[1] += v["requests"]
    if not cut:
        return ""
    bad = {t: v for t, v in cut.items() if v[0]}
    total = sum(v[1] for v in cut.values())
    if not bad:
        return f"Context: no prompt was cut to fit the arms' window ({total:,} requests over all arms)."
    return ("Context: prompts cut from the left to fit the arms' window (cut / requests, all arms): "
            + ", ".join(f"{t} {v[0]}/{v[1]}" for t, v in sorted(bad.items())) + ".")


# ---------------------------------------------------------------- provenance

def manifests(folders: list[Path], run_dir: Path | None = None) -> list[dict]:
    """Manifests of this run's own stage folders (a sweep point's, not its neighbours')."""
    out = []
    for folder in folders:
        m = read_json(Path(folder) / MANIFEST)
        if m:
            try:
                label = str(Path(folder).relative_to(run_dir)) if run_dir else str(folder)
            except ValueError:
                label = str(folder)
            out.append({"folder": label, "stage": m.get("stage"),
                        "arm": m.get("arm"), "status": m.get("status"), "key": m.get("key"),
                        "git_commit": m.get("git_commit"), "wall_s": m.get("wall_s"),
                        "versions": m.get("versions") or {}})
    return out


def token_counts(inp: Inputs) -> dict:
    out: dict[str, Any] = {}
    sel = read_json(inp.stages["select"] / "summary.json") if inp.stages.get("select") else None
    if sel:
        out["selection"] = {m: {"tokens": sum((d or {}).get("tokens", 0) for d in per.values()),
                                "selected_tokens": sum((d or {}).get("selected_tokens", 0) for d in per.values()),
                                "selected": sum((d or {}).get("selected", 0) for d in per.values())}
                            for m, per in (sel.get("methods") or {}).items() if isinstance(per, dict)}
    blend = read_json(inp.stages["mix"] / "blend.json") if inp.stages.get("mix") else None
    if blend:
        out["mix_arms"] = {a: {"tokens": v.get("tokens"), "selection": v.get("selection")}
                           for a, v in (blend.get("arms") or {}).items()}
    trained = {}
    for name, d in inp.pretrain.items():
        s = read_json(d / "summary.json")
        if s:
            trained[name] = {"tokens": s.get("tokens"), "steps": s.get("steps"), "loss_last": s.get("loss_last")}
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
        mir = a.get("offline_data") or {}
        mtxt = ("offline benchmark data (" + mir.get("reason", "") + "; few-shot pools: "
                + "; ".join(f"{k}: {v.get('fewshot_pool')}" for k, v in (mir.get("benchmarks") or {}).items())
                + ")") if mir.get("used") else f"Hub datasets ({mir.get('reason', 'unknown')})"
        model = a.get("model") or {}
        lines.append(f"- Eval `{arm}`: model `{model.get('path')}` ({model.get('dtype')}, "
                     f"{model.get('device')}), suite `{a.get('suite')}`, limit {a.get('limit')}, shots "
                     f"{sorted({v for v in (a.get('num_fewshot') or {}).values() if v is not None})}, "
                     f"data: {mtxt}; lm-eval {res.get('lm_eval_version')}; "
                     f"skipped: {a.get('skipped_tasks') or 'none'}; wall {a.get('wall_s') or 0:.0f}s")
    if masked:
        mir = ((masked.get("attninf") or {}).get("offline_data") or {})
        lines.append(f"- Masked eval: offline benchmark data {'used' if mir.get('used') else 'not used'}")
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

def _run_name(arm: str, seed: int | None) -> str:
    return arm if seed is None else f"{arm}@seed{seed}"


def _phase_results(inp: Inputs, phase: str) -> dict[str, list[dict | None]]:
    sub = "" if phase == "final" else phase
    return {a: [read_json(d / sub / "results.json") if d else None for _, d in inp.runs[a]] for a in inp.arms}


def _phase_runs(inp: Inputs, phase: str) -> dict[str, list[tuple[int | None, Path | None]]]:
    sub = "" if phase == "final" else phase
    return {a: [(s, (d / sub) if d else None) for s, d in inp.runs[a]] for a in inp.arms}


def render(cfg, rcfg: ReportConfig, out: Path, inp: Inputs, run_dir: Path | None = None) -> dict:
    """Build report.md/report.json/deltas.json/figures from the folders in `inp`; files in, files out."""
    out.mkdir(parents=True, exist_ok=True)
    paper = paper_mod.load(rcfg.paper_numbers)
    arms = inp.arms
    base = rcfg.baseline_arm if rcfg.baseline_arm in arms else (arms[0] if arms else rcfg.baseline_arm)
    treated = rcfg.treated_arm if rcfg.treated_arm in arms else next((a for a in arms if a != base), base)
    stat = dict(n_resamples=rcfg.n_resamples, seed=rcfg.bootstrap_seed, alpha=rcfg.alpha, power=rcfg.power)
    results = _phase_results(inp, "final")
    pre_results = _phase_results(inp, "pre_decay")
    recs = deltas_mod.table1_deltas(paper, _phase_runs(inp, "final"), base, treated, "final", **stat)
    pre_recs = deltas_mod.table1_deltas(paper, _phase_runs(inp, "pre_decay"), base, treated, "pre_decay",
                                        **stat)
    small_recs = (deltas_mod.small_scale_deltas(_phase_runs(inp, "final"), base, "final", **stat)
                  + deltas_mod.small_scale_deltas(_phase_runs(inp, "pre_decay"), base, "pre_decay", **stat))
    table1_recs = recs + pre_recs
    all_recs = table1_recs + small_recs
    masked = read_json(inp.masked / "results.json") if inp.masked else None
    t1 = table1(paper, results, base, treated, recs)
    t6 = table6(paper, masked, inp.masked)
    mirror = read_json(inp.stages["mirror"] / "mirror.json") if inp.stages.get("mirror") else None
    sel_recs = (deltas_mod.table6_deltas(paper, inp.masked, list((masked or {}).get("head_sets") or []), **stat)
                + deltas_mod.mirror_deltas(mirror, **stat))
    mans = manifests(inp.folders, run_dir)
    tokens = token_counts(inp)
    cfg_digest = digest(cfg)
    write_json(out / "deltas.json", all_recs)
    write_json(out / "selector_deltas.json", sel_recs)
    figs: dict[str, str] = {}
    fig_notes = []
    if rcfg.figures:
        for name, fn in (("deltas_ci.png", lambda p: deltas_mod.plot_forest(table1_recs, p)),
                         ("small_scale_ci.png", lambda p: deltas_mod.plot_forest(
                             [r for r in small_recs if r.get("unit") == "bits/byte"], p,
                             "Bits per byte of the gold answer: arm − baseline (negative = better)")),
                         ("deltas.png", lambda p: plot_deltas(t1, paper, p)),
                         ("mirror_effect.png", lambda p: plot_mirror(t6, p))):
            try:
                if fn(out / name):
                    figs[name] = name
            except Exception as e:  # noqa: BLE001 - a figure never costs the report
                fig_notes.append(f"{name}: failed ({e})")
        metrics = {name: d / "metrics.jsonl" for name, d in inp.pretrain.items()}
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
    seeds_txt = (f"{len(inp.seeds)} pretraining seeds per arm ({', '.join(map(str, inp.seeds))}): ours = mean ± sd "
                 "over seeds; every seed answers the same items, so the interval is a crossed bootstrap (one "
                 "item draw per subtask shared by all seeds, seeds resampled) and the p-value and MDE come "
                 "from the crossed items x seeds variance (t with Satterthwaite df): all three count seed "
                 "and item variance"
                 if inp.seeds and len(inp.seeds) > 1 else
                 "one pretraining seed per arm: the interval covers item variance only (seed-to-seed "
                 "variance is unmeasured; set pretrain.seeds=[0,1,...] to measure it); ours ± lm-eval's stderr")
    ci_method = next((r["ci_method"] for r in all_recs if r.get("ci_method")), None)
    pred = read_json(inp.masked / "prediction.json") if inp.masked else None
    pretrain_started = min((m["started"] for d in inp.pretrain.values()
                            if (m := read_json(d / MANIFEST)) and m.get("started")), default=None)
    title = f"# AttentionInfluence reproduction report: `{cfg.get('experiment_name')}`"
    md = [title, "",
          f"Paper: {paper['source']}. The paper's numbers come from `eval/paper_numbers.yaml`.",
          "", "## Table 1: pretraining with selected data", "",
          paper["table1"]["caption"].strip(), "",
          f"Ours: arms {', '.join(f'`{a}`' for a in arms) or NOT_RUN}; {seeds_txt}. Δ against `{base}`, "
          f"paired on the same items: Δ [{1 - rcfg.alpha:.0%} CI], two-sided p, MDE at {rcfg.power:.0%} power. "
          "Points (×100).", "",
          table1_markdown(t1, paper), "",
          "### Paired deltas (report/deltas.json)", "",
          f"Interval: {ci_method or 'none computed'}. Test: exact McNemar for 0/1 metrics with one seed, "
          "else the paired sign-flip test (one seed) or the crossed t test (several seeds). HumanEval is paired per problem on its pass@1 over the n samples.", "",
          deltas_markdown(table1_recs), "", "![deltas_ci](deltas_ci.png)" if "deltas_ci.png" in figs else "",
          "", "### Metrics that move at small scale (report/deltas.json)", "",
          SMALL_SCALE_TEXT, "", truncation_markdown(results), "",
          deltas_markdown(small_recs) if small_recs else
          f"{NOT_RUN} (add `mmlu_bpb`, `gsm8k_bpb`, `humaneval_bpb` to `eval.tasks`).", "",
          "![small_scale_ci](small_scale_ci.png)" if "small_scale_ci.png" in figs else "",
          "", "## Before decay (each arm's pre-decay export)", "",
          "The paper gives these before-decay rows in its text (746B tokens, before the LR decay).", "",
          before_decay_markdown(paper, pre_results, pre_recs, base, treated), "",
          "## Power: could this run see the paper's deltas?", "",
          power_markdown(paper, all_recs, treated, rcfg), "",
          "## Table 6: mirror effect (the selector with heads masked)", "",
          paper["table6"]["caption"].strip(), "", table6_markdown(t6), "",
          "Paired per item (masked head set − unmasked) and per probe (the mirror stage's held-out "
          "probes; exact match in points, answer loss in nats):", "",
          deltas_markdown(sel_recs), "",
          "## A prediction written before training: the mirror effect, tested", "",
          prediction_mod.against_outcome(pred, all_recs, treated, base, pretrain_started), ""]
    sel_md = selection_markdown(inp.stages, out)
    if sel_md:
        md += ["## The selector: retrieval heads, probe mirror check, selection", "", sel_md, ""]
    # Sections that other modules contribute (one call each, returning markdown lines) go here.
    from eval.report_selection import selection_report  # controls, method comparison, contamination

    md += selection_report(inp.stages.get("select"), out)[0]
    md += ["## Figures", ""]
    md += [f"![{k}]({v})" for k, v in figs.items()] or ["(none)"]
    md += [f"- {n}" for n in fig_notes]
    flat = {_run_name(a, s): r for a in arms for (s, _), r in zip(inp.runs[a], results[a])}
    md += ["", "## Provenance", "", provenance_markdown(cfg_digest, mans, flat, masked, tokens, cfg), ""]
    text = "\n".join(md)
    write_atomic(out / "report.md", text)
    write_json(out / "report.json", {"table1": t1, "table6": t6, "deltas": all_recs, "selector_deltas": sel_recs,
                                     "prediction": pred,
                                     "power_paper_scale": deltas_mod.paper_scale_power(paper, rcfg.alpha, rcfg.power),
                                     "tokens": tokens, "manifests": mans, "seeds": inp.seeds,
                                     "config_digest": cfg_digest, "figures": figs})
    return {"report": str(out / "report.md"), "figures": sorted(figs),
            "arms_with_results": [a for a in arms if any(results[a])],
            "deltas": len(all_recs), "mirror_effect": t6 is not None}


def inputs_from_context(ctx) -> Inputs:
    """The report's inputs, all from the stage context's folders (`ctx.upstream`, `ctx.dirs`)."""
    from attninf import arms as arms_mod
    from attninf.context import MissingInput

    def up(stage, arm=None):
        try:
            return ctx.upstream(stage, arm)
        except MissingInput:
            return None

    def done(stage, arm=None):  # a folder it shows when present (a declared input when in `stages`)
        d = ctx.dirs.get((stage, arm))
        return d if d is not None and (d / MANIFEST).exists() else None

    base_arms = arms_mod.base_arms(ctx.cfg)
    seeds = arms_mod.seeds(ctx.cfg)
    runs: dict[str, list[tuple[int | None, Path | None]]] = {}
    pretrain: dict[str, Path] = {}
    for a in base_arms:
        runs[a] = []
        for s in (seeds or [None]):
            name = _run_name(a, s)
            runs[a].append((s, up("eval", name)))
            if (p := done("pretrain", name)) is not None:
                pretrain[name] = p
    if not base_arms and (single := up("eval")) is not None:  # a single-model eval (eval.model)
        base_arms, runs = ["model"], {"model": [(None, single)]}
    stages = {st: d for st in ("detect", "mirror", "select", "mix") if (d := done(st)) is not None}
    folders = sorted({d for d in ctx.dirs.values() if (d / MANIFEST).exists()})
    return Inputs(arms=base_arms, runs=runs, pretrain=pretrain, masked=up("eval_masked"), stages=stages,
                  folders=folders, seeds=seeds)


def run(ctx) -> dict:
    rcfg = build(ReportConfig, ctx.section("report"), "report")
    inp = inputs_from_context(ctx)
    out = render(ctx.cfg, rcfg, ctx.out, inp, ctx.run_dir)
    for f in out["figures"]:
        ctx.tracker.artifact(ctx.out / f, type="figure", name=f"report-{f}")
    return out
