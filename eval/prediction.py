"""A prediction written before training: which benchmarks AttentionInfluence data should improve.

The paper's mirror-effect argument (its Table 6): the tasks that fall apart when the selector's
retrieval heads are masked (and not when as many random heads are) are the tasks that data
selected by those heads should help. That makes a falsifiable prediction out of `eval_masked`,
and it can be written down before a single training step, so the report can later hold the arms'
paired deltas against it instead of reading a story into whatever came out.

Per benchmark metric of the masked evaluation, the *mirror gap* is paired per item: the harm
of masking the retrieval heads minus the harm of masking random heads (score random − score
retrieval for accuracy-like metrics; bpb retrieval − bpb random for bits per byte), with the
paired interval and test of eval/stats.py. Rule: a task is predicted to gain when its gap is
positive with p < alpha; otherwise no gain is predicted for it. `eval_masked` writes
`prediction.json` and `prediction.md` into its folder; the runner orders `eval_masked` before
`mix`/`pretrain`, and the report checks the timestamps (manifest `finished` vs the first
pretraining run's `started`) instead of trusting the order.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from eval import items, stats
from eval import paper as paper_mod

RULE = ("predicted gain: masking the retrieval heads hurts the task more than masking as many random "
        "heads (mirror gap > 0, paired per item, p < {alpha}); otherwise no gain is predicted")


def _metrics(res: dict) -> list[tuple[str, str, bool]]:
    """(task, metric key, higher is better) for the top-level tasks the masked run evaluated."""
    from eval.tasks import bpb

    heads = paper_mod.headline_metrics()
    tasks = (res.get("attninf") or {}).get("tasks") or list(res.get("results") or {})
    out = []
    for t in tasks:
        metrics = (res.get("results") or {}).get(t) or {}
        if t in bpb.METRICS:
            out += [(t, f"{m},none", bpb.HIGHER_IS_BETTER[m]) for m in bpb.METRICS[t] if f"{m},none" in metrics]
        elif t in heads and (got := paper_mod.pick_metric(metrics, heads[t])) is not None:
            out.append((t, got[0], True))
    return out


def predict(masked_dir: Path, n_resamples: int = 2000, seed: int = 0, alpha: float = 0.05,
            power: float = 0.8) -> dict:
    """The prediction from eval_masked's `none`, `retrieval` and `random` folders (samples per item)."""
    masked_dir = Path(masked_dir)
    need = [masked_dir / h / "results.json" for h in ("none", "retrieval", "random")]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        return {"rows": [], "rule": RULE.format(alpha=alpha), "note": f"no prediction: {missing[0]} missing "
                "(eval.masked.head_sets needs none, retrieval and random)", "written": time.time()}
    res = {h: json.loads((masked_dir / h / "results.json").read_text()) for h in ("none", "retrieval", "random")}
    rows = []
    for task, key, hib in _metrics(res["none"]):
        vals = {h: paper_mod.pick_metric((res[h].get("results") or {}).get(task) or {}, key) for h in res}
        if any(v is None for v in vals.values()):
            continue
        v = {h: vals[h][1] for h in vals}
        sign = 1.0 if hib else -1.0
        row = {"task": task, "metric": key, "higher_is_better": hib, "none": v["none"],
               "retrieval": v["retrieval"], "random": v["random"],
               "drop_retrieval": sign * (v["none"] - v["retrieval"]), "drop_random": sign * (v["none"] - v["random"])}
        try:
            # paired per item: gap = harm(retrieval) - harm(random), positive = retrieval heads matter more
            first, second = ("random", "retrieval") if hib else ("retrieval", "random")
            al = items.align([masked_dir / first], [masked_dir / second], res["none"], task, key)
            r = stats.paired_seeds(al.a, al.b, al.strata, al.stratum_weights, n_resamples, seed, alpha, power)
            row.update(gap=r.delta, ci_low=r.ci_low, ci_high=r.ci_high, p_value=r.p_value, test=r.test,
                       n_items=r.n_items)
            row["predicted_gain"] = bool(r.delta > 0 and r.p_value is not None and r.p_value < alpha)
        except items.ItemsMissing as e:
            row.update(gap=row["drop_retrieval"] - row["drop_random"], ci_low=None, ci_high=None, p_value=None,
                       test=None, n_items=None, predicted_gain=None, note=f"no paired analysis: {e}")
        rows.append(row)
    return {"rows": rows, "rule": RULE.format(alpha=alpha), "alpha": alpha, "written": time.time(),
            "gain_expected_on": [f"{r['task']} ({r['metric'].split(',')[0]})" for r in rows if r.get("predicted_gain")]}


def _num(v: float | None, k: int = 4) -> str:
    return "–" if v is None else f"{v:+.{k}f}"


def markdown(pred: dict) -> str:
    """The prediction as written before training (prediction.md)."""
    if not pred.get("rows"):
        return f"No prediction: {pred.get('note', 'the masked evaluation gave no comparable metric')}."
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(pred["written"]))
    gains = pred.get("gain_expected_on") or []
    lines = [f"Written {when}, before pretraining. Rule: {pred['rule']}.", "",
             "Prediction: the AttentionInfluence arm should gain over the baseline on "
             + (", ".join(gains) if gains else "no task (no task's mirror gap is significant)") + ".", "",
             "| task | metric | unmasked | retrieval masked | random masked | mirror gap [95% CI] | p | gain predicted |",
             "|---|---|---:|---:|---:|---|---:|---|"]
    for r in pred["rows"]:
        ci = f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}]" if r.get("ci_low") is not None else ""
        p = "–" if r.get("p_value") is None else f"{r['p_value']:.3g}"
        yes = {True: "yes", False: "no", None: "–"}[r.get("predicted_gain")]
        lines.append(f"| {r['task']} | {r['metric'].split(',')[0]} | {r['none']:.4f} | {r['retrieval']:.4f} | "
                     f"{r['random']:.4f} | {_num(r['gap'])} {ci} | {p} | {yes} |")
    lines += ["", "Mirror gap: harm of masking the retrieval heads minus harm of masking as many random heads "
              "(in the metric's units; bits/byte for bpb, fractions otherwise); positive = the retrieval heads "
              "matter more."]
    return "\n".join(lines)


def write(out: Path, pred: dict) -> None:
    from attninf.manifest import write_atomic, write_json

    write_json(Path(out) / "prediction.json", pred)
    write_atomic(Path(out) / "prediction.md", markdown(pred) + "\n")


def against_outcome(pred: dict | None, recs: list[dict], treated: str, base: str,
                    pretrain_started: float | None) -> str:
    """The report's section: the prediction beside the treated arm's paired deltas."""
    if not pred:
        return ("No prediction: `eval_masked` did not run before training (add it to `stages`; it runs "
                "before `mix` and `pretrain`).")
    if not pred.get("rows"):
        return markdown(pred)
    if pretrain_started is None:
        timing = "no pretraining start time in this run's manifests"
    elif pred["written"] < pretrain_started:
        timing = f"written {pretrain_started - pred['written']:.0f} s before the first pretraining run started"
    else:
        timing = "**written after pretraining had started** (the stages ran concurrently): not a prediction"
    by = {(r["task"], r["metric"]): r for r in recs if r.get("arm") == treated and r.get("phase") == "final"}
    lines = [f"The prediction ({timing}) beside `{treated}` − `{base}`, paired per item. "
             "Points for accuracy-like metrics, bits/byte for bpb (negative = better).", "",
             "| task | metric | mirror gap (p) | gain predicted | observed Δ [95% CI] | p | outcome |",
             "|---|---|---|---|---|---:|---|"]
    for r in pred["rows"]:
        o = by.get((r["task"], r["metric"]))
        pg = r.get("predicted_gain")
        gap = f"{_num(r['gap'])} (p={'–' if r.get('p_value') is None else format(r['p_value'], '.3g')})"
        if not o or o.get("delta") is None:
            lines.append(f"| {r['task']} | {r['metric'].split(',')[0]} | {gap} | {'yes' if pg else 'no'} | "
                         "not evaluated on the arms | – | – |")
            continue
        k = 4 if o.get("unit") == "bits/byte" else 2
        better = o["delta"] > 0 if o.get("higher_is_better", True) else o["delta"] < 0
        sig = o.get("p_value") is not None and o["p_value"] < pred.get("alpha", 0.05)
        if pg:
            outcome = "gain, as predicted" if (better and sig) else ("loss, against the prediction" if sig else
                                                                      "not shown (no significant change)")
        else:
            outcome = ("unpredicted gain" if better else "loss") if sig else "no change, as predicted"
        lines.append(f"| {r['task']} | {r['metric'].split(',')[0]} | {gap} | {'yes' if pg else 'no'} | "
                     f"{o['delta']:+.{k}f} [{o['ci_low']:+.{k}f}, {o['ci_high']:+.{k}f}] | "
                     f"{'–' if o.get('p_value') is None else format(o['p_value'], '.3g')} | {outcome} |")
    return "\n".join(lines)
