"""The end-of-run summary on the terminal: what the pipeline found, without opening a file.

Read from the stage folders only (manifests and the small JSON files the stages write), so it
describes exactly what is on disk, including stages finished by an earlier run. Sections:
detected heads, the probe mirror table, what was selected per domain, each arm's held-out loss
and benchmark scores beside the baseline's, the report's paired deltas on the metrics that move
at small scale (bits per byte of the gold answer, with 95% CI and p), the selector's masked
evaluation and the prediction written from it before training, the report's path, and
per-stage wall times. A section whose stage did not run (or whose files another
version of a stage wrote differently) says so in one line instead of failing: the summary must
never cost a finished run its exit status.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from attninf import manifest
from attninf.progress import fmt_s

log = logging.getLogger("attninf")

Unit = tuple[str, "str | None"]


def _json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _done(dirs: dict, name: str, arm: str | None = None) -> tuple[Path | None, dict | None]:
    d = dirs.get((name, arm))
    if d is None:
        return None, None
    m = manifest.read(d)
    return (d, m) if m and m.get("status") == "done" else (d, None)


def heads_section(dirs: dict) -> list[str]:
    d, m = _done(dirs, "detect")
    hj = _json(d / "heads.json") if m else None
    if not hj or not hj.get("selected"):
        return []
    sel = [tuple(h) for h in hj["selected"]]
    total = (hj.get("n_layers") or 0) * (hj.get("n_heads") or 0)
    layers = sorted({h[0] for h in sel})
    of = f" of {total} ({100 * len(sel) / total:.0f}%)" if total else ""
    shown = " ".join(f"({l},{h})" for l, h in sel[:8]) + (" ..." if len(sel) > 8 else "")
    return [f"retrieval heads: {len(sel)}{of}, layers {layers[0]}-{layers[-1]} of "
            f"{hj.get('n_layers', '?')} ({hj.get('mode', '?')}); top: {shown}"]


def mirror_section(dirs: dict) -> list[str]:
    d, m = _done(dirs, "mirror")
    mj = _json(d / "mirror.json") if m else None
    if not mj or not mj.get("rows"):
        return []
    out = [f"probe mirror check ({mj.get('num_probes', '?')} held-out probes):",
           f"  {'heads masked':<22} {'n':>4} {'exact match':>11} {'answer loss':>11} {'d loss':>8}"]
    for r in mj["rows"]:
        out.append(f"  {str(r.get('condition')):<22} {r.get('n_heads', 0):>4} {r.get('exact_match', 0):>11.3f} "
                   f"{r.get('answer_loss', 0):>11.3f} {r.get('delta_loss', 0):>+8.3f}")
    return out


def selection_section(dirs: dict) -> list[str]:
    d, m = _done(dirs, "select")
    sj = _json(d / "summary.json") if m else None
    if not sj or not sj.get("methods"):
        return []
    methods = sj["methods"]
    doms = sorted({dom for per in methods.values() for dom in per})
    out = [f"selection (ratio {sj.get('ratio')}): documents selected / scored, share of the domain's tokens"]
    names = ["attention_influence"] + sorted(k for k in methods if k != "attention_influence")
    names = [n for n in names if n in methods]
    out.append(f"  {'domain':<14}" + "".join(f" {n[:20]:>21}" for n in names))
    for dom in doms:
        cells = []
        for n in names:
            s = methods[n].get(dom)
            if not s:
                cells.append(f" {'-':>21}")
                continue
            share = s.get("selected_tokens", 0) / s["tokens"] if s.get("tokens") else float("nan")
            text = f"{s.get('selected')}/{s.get('documents')} {100 * share:.0f}%"
            cells.append(f" {text:>21}")
        out.append(f"  {dom:<14}" + "".join(cells))
    return out


def _held_out(d: Path) -> float | None:
    sj = _json(d / "summary.json") or {}
    v = (sj.get("val_last") or {}).get("val/mean")
    return float(v) if v is not None else None


def arms_section(dirs: dict, arms: list[str]) -> list[str]:
    rows, tasks = {}, []
    for arm in arms:
        dp, mp = _done(dirs, "pretrain", arm)
        de, me = _done(dirs, "eval", arm)
        head = ((me or {}).get("outputs") or {}).get("headline") or {}
        for t in head:
            if t not in tasks:
                tasks.append(t)
        rows[arm] = {"loss": _held_out(dp) if mp else None,
                     "bench": {t: (h.get("value") if isinstance(h, dict) else h) for t, h in head.items()}}
    if not any(r["loss"] is not None or r["bench"] for r in rows.values()):
        return []
    base = "baseline" if "baseline" in rows else arms[0]
    b = rows[base]

    def cell(v, ref, scale, fmt):
        """Value, and its difference to the baseline's in brackets (ref None on the baseline row)."""
        if v is None:
            return f"{'-':>16}"
        s = f"{v * scale:{fmt}}"
        if ref is not None:
            s += f" ({(v - ref) * scale:+{fmt}})"
        return f"{s:>16}"

    out = [f"arms (difference to {base} in brackets; benchmarks x100):",
           f"  {'arm':<22} {'held-out loss':>16}" + "".join(f" {t[:15]:>16}" for t in tasks)]
    for arm, r in rows.items():
        ref = (lambda k, t=None: None) if arm == base else (
            lambda k, t=None: b[k] if t is None else b[k].get(t))
        out.append(f"  {arm:<22} {cell(r['loss'], ref('loss'), 1, '.3f')}"
                   + "".join(f" {cell(r['bench'].get(t), ref('bench', t), 100, '.1f')}" for t in tasks))
    return out


def masked_section(dirs: dict) -> list[str]:
    d, m = _done(dirs, "eval_masked")
    sets = ((m or {}).get("outputs") or {}).get("head_sets") or {}
    if not sets:
        return []
    tasks = sorted({t for s in sets.values() for t in (s.get("headline") or {})})
    if not tasks:  # e.g. only bits-per-byte tasks: the prediction section shows them
        return []
    out = ["selector with heads masked (benchmarks x100):",
           f"  {'heads masked':<22} {'n':>4}" + "".join(f" {t[:12]:>12}" for t in tasks)]
    for name, s in sets.items():
        h = s.get("headline") or {}
        out.append(f"  {name:<22} {s.get('n_heads', 0):>4}"
                   + "".join(f" {100 * h[t]:>12.1f}" if t in h else f" {'-':>12}" for t in tasks))
    return out


def small_scale_section(dirs: dict) -> list[str]:
    """The report's paired deltas on the metrics that move at small scale (bits per byte, p_correct)."""
    d, m = _done(dirs, "report")
    recs = _json(d / "deltas.json") if m else None
    rows = [r for r in (recs if isinstance(recs, list) else []) if r.get("unit") and r.get("phase") == "final"]
    if not rows:
        return []
    base = rows[0].get("baseline")
    out = [f"small-scale metrics, paired vs {base} (bpb: bits/byte of the gold answer, lower is better; "
           "p_correct: points):",
           f"  {'arm':<22} {'task':<16} {'metric':<10} {base[:10]:>10} {'arm':>10}  {'delta [95% CI]':<30} {'p':>8}"]
    for r in rows:
        name = r.get("task", "?")
        if r.get("delta") is None:
            out.append(f"  {r['arm']:<22} {name:<16} {r['metric'].split(',')[0]:<10} {r.get('note')}")
            continue
        k = 4 if r["unit"] == "bits/byte" else 2
        ci = f"{r['delta']:+.{k}f} [{r['ci_low']:+.{k}f}, {r['ci_high']:+.{k}f}]"
        p = "-" if r.get("p_value") is None else f"{r['p_value']:.3g}"
        out.append(f"  {r['arm']:<22} {name:<16} {r['metric'].split(',')[0]:<10} {r['baseline_mean']:>10.{k}f} "
                   f"{r['arm_mean']:>10.{k}f}  {ci:<30} {p:>8}  (n={r['n_items']}, {len(r['seeds'])} seed(s))")
    return out


def prediction_section(dirs: dict) -> list[str]:
    d, m = _done(dirs, "eval_masked")
    pred = _json(d / "prediction.json") if m else None
    if not pred or not pred.get("rows"):
        return []
    gains = pred.get("gain_expected_on") or []
    out = [f"prediction written before training (eval_masked mirror gap): gain expected on "
           f"{', '.join(gains) if gains else 'no task'}; the report sets it beside the arms' deltas"]
    for r in pred["rows"]:
        if r.get("gap") is None or "none" not in r:
            continue
        ci = (f" [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] p={r['p_value']:.3g}"
              if r.get("ci_low") is not None and r.get("p_value") is not None else "")
        out.append(f"  {r['task']:<16} {r['metric'].split(',')[0]:<10} unmasked {r['none']:.4f}  retrieval masked "
                   f"{r['retrieval']:.4f}  random masked {r['random']:.4f}  gap {r['gap']:+.4f}{ci}")
    return out


def report_section(dirs: dict) -> list[str]:
    d, m = _done(dirs, "report")
    path = ((m or {}).get("outputs") or {}).get("report")
    if not path and d is not None and (d / "report.md").exists():
        path = str(d / "report.md")
    return [f"report: {path}"] if path else []


def times_section(units: list[Unit], dirs: dict, ran: set[Unit], total_s: float) -> list[str]:
    out = ["stage wall times:", f"  {'stage':<30} {'wall':>8}  this run"]
    for name, arm in units:
        m = manifest.read(dirs[(name, arm)]) if (name, arm) in dirs else None
        label = name + (f"[{arm}]" if arm else "")
        wall = (m or {}).get("wall_s")
        how = "ran" if (name, arm) in ran else "skipped (done earlier)"
        out.append(f"  {label:<30} {fmt_s(wall):>8}  {how}")
    out.append(f"  {'pipeline (this run)':<30} {fmt_s(total_s):>8}")
    return out


def summary_lines(run_dir: Path, units: list[Unit], dirs: dict, ran: set[Unit], total_s: float) -> list[str]:
    arms = [a for n, a in units if n in ("pretrain", "eval") and a is not None]
    arms = list(dict.fromkeys(arms))
    lines = [f"== attninf summary: {run_dir} =="]
    for section in (lambda: heads_section(dirs), lambda: mirror_section(dirs),
                    lambda: selection_section(dirs), lambda: arms_section(dirs, arms),
                    lambda: small_scale_section(dirs), lambda: masked_section(dirs),
                    lambda: prediction_section(dirs), lambda: report_section(dirs),
                    lambda: times_section(units, dirs, ran, total_s)):
        try:
            part = section()
        except Exception as e:  # noqa: BLE001 - one odd file must not hide the rest
            part = [f"(a summary section failed: {type(e).__name__}: {e})"]
        if part:
            lines.extend(part)
    return lines


def print_summary(run_dir: Path, units: list[Unit], dirs: dict, ran: set[Unit], total_s: float) -> None:
    try:
        text = "\n".join(summary_lines(Path(run_dir), units, dirs, ran, total_s))
    except Exception as e:  # noqa: BLE001 - see the module docstring
        log.warning("summary failed: %s", e)
        return
    print("\n" + text, flush=True)
