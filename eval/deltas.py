"""Paired deltas for the report: every arm against the baseline on the same items, with an
interval, a p-value and the minimal detectable effect (eval/stats.py), plus the same analysis
for the selector's Table 6 rows (eval_masked, per item) and the probe mirror table (per probe).

A delta record (one entry of report/deltas.json) is in the paper's units, points 0-100:
{arm, baseline, task, name, metric, phase (final | pre_decay), n_items, seeds, delta, ci_low,
ci_high, p_value, test, ci_method, mde, mde_basis, paper_delta, arm_mean, arm_std,
baseline_mean, baseline_std, note}; the small-scale metrics' records (small_scale_deltas) add
`unit` (bits/byte for bpb, unscaled; points for p_correct) and `higher_is_better`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from attninf import plots
from eval import items, stats
from eval import paper as paper_mod

SCALE = 100.0  # lm-eval fractions -> the paper's points


def _record(r: stats.Paired | None, scale: float = SCALE, **fields) -> dict:
    rec = {**fields, "n_items": None, "delta": None, "ci_low": None, "ci_high": None, "p_value": None,
           "test": None, "ci_method": None, "mde": None, "mde_basis": None, "arm_mean": None,
           "arm_std": None, "baseline_mean": None, "baseline_std": None, "discordant": None}
    if r is None:
        return rec

    def _pts(v: float | None) -> float | None:
        return None if v is None else v * scale

    rec.update(n_items=r.n_items, delta=_pts(r.delta), ci_low=_pts(r.ci_low), ci_high=_pts(r.ci_high),
               p_value=r.p_value, test=r.test, ci_method=r.ci_method, mde=_pts(r.mde),
               mde_basis=("crossed items x seeds variance (t, Satterthwaite df)" if r.n_seeds > 1
                          else "observed discordance" if r.test == "exact McNemar"
                          else "observed paired differences"),
               arm_mean=_pts(r.mean_a), arm_std=_pts(r.std_a), baseline_mean=_pts(r.mean_b),
               baseline_std=_pts(r.std_b), discordant=list(r.discordant) if r.discordant else None,
               arm_per_seed=[_pts(x) for x in r.score_a], baseline_per_seed=[_pts(x) for x in r.score_b])
    return rec


def _metric_key(res: dict, task: str, key: str) -> str | None:
    got = paper_mod.pick_metric((res.get("results") or {}).get(task) or {}, key)
    return got[0] if got else None


def table1_deltas(paper: dict, runs: dict[str, list[tuple[int | None, Path | None]]], base: str,
                  treated: str, phase: str, n_resamples: int, seed: int, alpha: float,
                  power: float) -> list[dict]:
    """Paired deltas of every arm vs `base` for each Table 1 task the runs evaluated.

    runs: arm -> [(seed, eval results folder or None)]; seed j of an arm is paired with the
    same seed of the baseline (same initialisation), items by (leaf task, lm-eval doc_id).
    The paper's delta is attached to the treated arm only (the paper has no other arms).
    """
    rows = [r for r in paper["table1"]["rows"] if r.get("task")]
    before = {r["task"]: r for r in (paper.get("table1_before_decay") or {}).get("rows", []) if r.get("task")}
    out = []
    for a in [x for x in runs if x != base]:
        pairs = [(s, da, db) for (s, da), (_, db) in zip(runs[a], runs.get(base, [])) if da and db]
        pairs = [(s, da, db) for s, da, db in pairs
                 if (da / "results.json").exists() and (db / "results.json").exists()]
        if not pairs:
            continue
        res_b = json.loads((pairs[0][2] / "results.json").read_text())
        res_a = json.loads((pairs[0][1] / "results.json").read_text())
        for prow in rows:
            task = prow["task"]
            if task not in (res_b.get("results") or {}) or task not in (res_a.get("results") or {}):
                continue
            key = _metric_key(res_b, task, prow["metric"])
            if key is None:
                continue
            pref = (before.get(task) if phase == "pre_decay" else prow) if a == treated else None
            paper_delta = (pref["attention_influence"] - pref["baseline"]) if pref else None
            fields = dict(arm=a, baseline=base, task=task, name=prow["name"], metric=key, phase=phase,
                          seeds=[s for s, _, _ in pairs], paper_delta=paper_delta,
                          paper_items=prow.get("items"),
                          paper_levels=[pref["baseline"], pref["attention_influence"]] if pref else None)
            try:
                al = items.align([p[1] for p in pairs], [p[2] for p in pairs], res_b, task, key)
            except items.ItemsMissing as e:
                out.append(_record(None, **fields, note=f"no paired analysis: {e}"))
                continue
            r = stats.paired_seeds(al.a, al.b, al.strata, al.stratum_weights, n_resamples, seed, alpha, power)
            note = al.aggregation + (f"; {al.dropped} items not in every run were dropped" if al.dropped else "")
            out.append(_record(r, **fields, note=note))
    return out


def table6_deltas(paper: dict, masked_dir: Path | None, head_sets: list[str], n_resamples: int,
                  seed: int, alpha: float, power: float) -> list[dict]:
    """Each masked head set vs the unmasked selector, per item (eval_masked/<set>/samples)."""
    if masked_dir is None or "none" not in head_sets:
        return []
    base = Path(masked_dir) / "none"
    if not (base / "results.json").exists():
        return []
    res_b = json.loads((base / "results.json").read_text())
    out = []
    for hs in [h for h in head_sets if h != "none"]:
        d = Path(masked_dir) / hs
        if not (d / "results.json").exists():
            continue
        for prow in paper["table6"]["rows"]:
            task = prow["task"]
            if task not in (res_b.get("results") or {}):
                continue
            key = _metric_key(res_b, task, prow["metric"])
            if key is None:
                continue
            fields = dict(arm=f"masked:{hs}", baseline="masked:none", task=task, name=prow["name"],
                          metric=key, phase="selector", seeds=[None],
                          paper_delta=(prow[hs] - prow["none"]) * SCALE if hs in prow else None)
            try:
                al = items.align([d], [base], res_b, task, key)
            except items.ItemsMissing as e:
                out.append(_record(None, **fields, note=f"no paired analysis: {e}"))
                continue
            r = stats.paired_seeds(al.a, al.b, al.strata, al.stratum_weights, n_resamples, seed, alpha, power)
            out.append(_record(r, **fields, note=al.aggregation))
    return out


def mirror_deltas(mirror: dict | None, n_resamples: int, seed: int, alpha: float, power: float) -> list[dict]:
    """Probe mirror table, per probe: masked head set (and random control) vs no masking.

    Exact match in points (McNemar for the retrieval set; the random control averages its draws
    per probe, so it uses the sign-flip test); answer loss in nats (not scaled).
    """
    if not mirror:
        return []
    rows = mirror.get("rows") or []
    none = next((r for r in rows if r.get("condition") == "none"), None)
    if none is None or "per_probe_em" not in none:
        return []
    cands = []
    for r in rows:
        if r is none:
            continue
        if "per_probe_em" in r:
            cands.append((r["condition"], r["per_probe_em"], r["per_probe_loss"]))
        elif r.get("draws") and all("per_probe_em" in d for d in r["draws"]):
            k = len(r["draws"])
            em = [sum(d["per_probe_em"][i] for d in r["draws"]) / k for i in range(len(none["per_probe_em"]))]
            loss = [sum(d["per_probe_loss"][i] for d in r["draws"]) / k for i in range(len(none["per_probe_loss"]))]
            cands.append((r["condition"], em, loss))
    out = []
    for cond, em, loss in cands:
        for metric, a, b, scale in (("exact_match", em, none["per_probe_em"], SCALE),
                                    ("answer_loss", loss, none["per_probe_loss"], 1.0)):
            r = stats.paired([float(x) for x in a], [float(x) for x in b], n_resamples=n_resamples,
                             seed=seed, alpha=alpha, power=power)
            rec = _record(r, arm=f"mirror:{cond}", baseline="mirror:none", task="probes", name="probes",
                          metric=metric, phase="selector", seeds=[None], paper_delta=None,
                          note="points" if scale == SCALE else "nats (answer-token loss)")
            if scale != SCALE:
                for f in ("delta", "ci_low", "ci_high", "mde", "arm_mean", "baseline_mean"):
                    rec[f] = rec[f] / SCALE if rec[f] is not None else None
                rec["arm_per_seed"] = [x / SCALE for x in rec["arm_per_seed"]]
                rec["baseline_per_seed"] = [x / SCALE for x in rec["baseline_per_seed"]]
            out.append(rec)
    return out


def small_scale_deltas(runs: dict[str, list[tuple[int | None, Path | None]]], base: str, phase: str,
                       n_resamples: int, seed: int, alpha: float, power: float) -> list[dict]:
    """Paired deltas of every arm vs `base` on the metrics that move at small scale (eval/tasks/bpb.py).

    The gold answer's bits per byte (bits/byte, lower is better: a negative delta is a gain) and
    MMLU's probability of the correct option (points, higher is better); items aligned as for
    Table 1, seeds crossed with items. Records carry `unit` and `higher_is_better`.
    """
    from eval.tasks import bpb

    out = []
    for a in [x for x in runs if x != base]:
        pairs = [(s, da, db) for (s, da), (_, db) in zip(runs[a], runs.get(base, [])) if da and db
                 and (da / "results.json").exists() and (db / "results.json").exists()]
        if not pairs:
            continue
        res_b = json.loads((pairs[0][2] / "results.json").read_text())
        res_a = json.loads((pairs[0][1] / "results.json").read_text())
        for task, metrics in bpb.METRICS.items():
            if task not in (res_b.get("results") or {}) or task not in (res_a.get("results") or {}):
                continue
            for metric in metrics:
                key = _metric_key(res_b, task, f"{metric},none")
                if key is None:
                    continue
                unit, scale = ("bits/byte", 1.0) if metric == "bpb" else ("points", SCALE)
                fields = dict(arm=a, baseline=base, task=task, name=BPB_NAMES.get(task, task), metric=key,
                              phase=phase, seeds=[s for s, _, _ in pairs], paper_delta=None, unit=unit,
                              higher_is_better=bpb.HIGHER_IS_BETTER[metric])
                try:
                    al = items.align([p[1] for p in pairs], [p[2] for p in pairs], res_b, task, key)
                except items.ItemsMissing as e:
                    out.append(_record(None, scale, **fields, note=f"no paired analysis: {e}"))
                    continue
                r = stats.paired_seeds(al.a, al.b, al.strata, al.stratum_weights, n_resamples, seed, alpha, power)
                note = al.aggregation + (f"; {al.dropped} items not in every run were dropped" if al.dropped else "")
                out.append(_record(r, scale, **fields, note=note))
    return out


BPB_NAMES = {"mmlu_bpb": "MMLU (cloze)", "gsm8k_bpb": "GSM8K (reference solution)",
             "humaneval_bpb": "HumanEval (canonical solution)"}


# ---------------------------------------------------------------- power

def paper_scale_power(paper: dict, alpha: float = 0.05, power: float = 0.8) -> list[dict]:
    """MDE at the paper's item counts, one seed, for the Table 1 rows with `items`.

    Discordance assumed from the paper's accuracy levels with independent errors,
    p_b (1 - p_a) + p_a (1 - p_b): an upper bound (related models err on the same items), so
    these MDEs are conservative. HumanEval is treated as one 0/1 outcome per problem (n = 1);
    averaging n = 20 samples per problem lowers the within-problem part of the variance only.
    """
    out = []
    for r in paper["table1"]["rows"]:
        if not r.get("items"):
            continue
        pb, pa = r["baseline"] / SCALE, r["attention_influence"] / SCALE
        disc = stats.independent_discordance(pa, pb)
        mde = stats.mde_binary(int(r["items"]), disc, alpha, power) * SCALE
        out.append({"name": r["name"], "task": r["task"], "n_items": int(r["items"]), "seeds": 1,
                    "discordance": disc, "mde": mde, "paper_delta": r["attention_influence"] - r["baseline"]})
    return out


def _verdict(paper_delta: float, mde: float) -> str:
    if mde > SCALE:
        return f"{paper_delta:+.2f} points is far below the detectable ±{mde:.0f} (beyond the 100-point scale)"
    if abs(paper_delta) >= mde:
        return f"{paper_delta:+.2f} points is at or above the detectable ±{mde:.2f}"
    return f"{paper_delta:+.2f} points is below the detectable ±{mde:.2f}"


def power_words(paper: dict, recs: list[dict], treated: str, alpha: float = 0.05, power: float = 0.8) -> list[str]:
    """One sentence per paper Table 1 delta on a task this run evaluated (treated arm, both phases)."""
    lines = []
    for r in recs:
        if r["arm"] != treated or r.get("paper_delta") is None:
            continue
        seeds = len(r["seeds"])
        phase = "" if r["phase"] == "final" else " (before decay)"
        n = r["n_items"] or 0
        head = (f"{r['name']}{phase}, {n:,} item{'s' if n != 1 else ''}, "
                f"{seeds} seed{'s' if seeds != 1 else ''}")
        if r["mde"] is not None:
            lines.append(f"- {head}: the paper's {_verdict(r['paper_delta'], r['mde'])} "
                         f"(MDE from this run's {r['mde_basis']}).")
        elif r["n_items"] and r.get("paper_levels"):
            pb, pa = (x / SCALE for x in r["paper_levels"])
            # One seed's MDE, whatever the seed count: every seed answers the same items, so averaging
            # seeds shrinks only the seed x item part of the discordance, never the item part; without
            # this run's decomposition the single-seed figure is the honest (conservative) one.
            mde = stats.mde_binary(r["n_items"], stats.independent_discordance(pa, pb), alpha, power) * SCALE
            lines.append(f"- {head}: the arms agreed on every item, so the run gives no discordance; "
                         f"assuming the paper's accuracy levels with independent errors, the paper's "
                         f"{_verdict(r['paper_delta'], mde)}.")
        else:
            lines.append(f"- {head}: no item-level data ({r.get('note')}).")
    return lines


# ---------------------------------------------------------------- forest plot

def plot_forest(recs: list[dict], out_png: Path, title: str = "Paired deltas vs the baseline arm") -> Path | None:
    """Every delta with its interval (ours), the paper's delta as a marker beside it."""
    rows = [r for r in recs if r.get("delta") is not None]
    if not rows:
        return None
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.6))
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows):
        lo, hi = r["ci_low"], r["ci_high"]
        ax.errorbar([r["delta"]], [y], xerr=[[r["delta"] - lo], [hi - r["delta"]]], fmt="o",
                    color="#1f77b4", capsize=3, label="ours (95% CI)" if y == ys[0] else None)
        if r.get("paper_delta") is not None:
            ax.plot([r["paper_delta"]], [y], marker="D", color="#d62728", linestyle="none",
                    label="paper" if not any(l.get_label() == "paper" for l in ax.lines) else None)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(ys, [f"{r['name']} · {r['arm']} ({r['phase']}, {len(r['seeds'])} seed"
                       f"{'s' if len(r['seeds']) != 1 else ''}, n={r['n_items']})" for r in rows], fontsize=8)
    units = {r.get("unit", "points") for r in rows}
    ax.set_xlabel(f"Δ ({', '.join(sorted(units))}), arm − baseline")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    return plots.save(fig, out_png)
