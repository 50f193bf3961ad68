"""`attninf-status RUN_DIR [--wait]`: where every stage and arm of a run stands.

One line per (stage, arm): done / running / queued / failed / not started, the Slurm job ids and
their states and the nodes they ran on (from `scontrol show job -o`, which needs no accounting
database; a job Slurm has forgotten after MinJobAge falls back to the manifest), parts done of
total for an array stage, steps, tokens/s and ETA for running work (progress files, a ranks
stage's metrics.jsonl), and for a failed job its
log path and last lines. Local runs (no `cluster/jobs.json`) are read from the manifests alone.

`--wait` polls until nothing is queued or running; exit 0 when every stage is done, 1 otherwise
(a failed or cancelled job, or a stage nobody is running).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from attninf import manifest
from attninf.stages import STAGES

FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
          "PREEMPTED"}
RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "RESIZING"}
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}


def _fmt_s(s: float | None) -> str:
    if s is None or s != s or s < 0:
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _tail(path: Path, n: int = 5) -> list[str]:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return []
    return lines[-n:]


def _parts_progress(d: Path) -> dict:
    """An array stage: parts marked done of the planned list, and the live rate of its workers."""
    out: dict = {}
    idx = manifest.read(d / "parts", "index.json")
    done = len(list((d / "parts").glob("*.done"))) if (d / "parts").exists() else 0
    out["parts"] = f"{done}/{len(idx['parts']) if idx else '?'}"
    tok_s, etas = 0.0, []
    now = time.time()
    for p in d.glob("progress-*.json"):
        r = manifest.read(d, p.name) or {}
        if r.get("finished") or now - p.stat().st_mtime > 600:
            continue
        tok_s += r.get("tokens_per_s") or 0.0
        if r.get("eta_s") is not None:
            etas.append(r["eta_s"])
    if tok_s:
        out["tok_s"], out["eta_s"] = tok_s, max(etas) if etas else None
    return out


def _log_of(logs: str | None, tid: str) -> str | None:
    if not logs:
        return None
    hits = sorted(Path(logs).glob(f"*-{tid}.out"))
    return str(hits[0]) if hits else None


def _pretrain_progress(d: Path, cfg) -> dict:
    p = d / "metrics.jsonl"
    if not p.exists():
        return {}
    rows = [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return {}
    try:
        from pretrain.train import load_config

        total = load_config(cfg.pretrain).total_steps()
    except Exception:  # noqa: BLE001 - status must never die on a config it cannot build
        total = None
    last = rows[-1]
    out = {"steps": f"{last['step']}/{total or '?'}", "tok_s": last.get("tokens_per_s")}
    if total and last.get("step_time_s"):
        out["eta_s"] = (total - last["step"]) * last["step_time_s"]
    return out


def stage_rows(run_dir: Path) -> list[dict]:
    from attninf.runner import stage_dirs
    from attninf.submit import cluster_dir, latest_jobs, slurm_states

    run_dir = Path(run_dir)
    cfg_path = cluster_dir(run_dir) / "config.yaml"
    if not cfg_path.exists():
        cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not an attninf run folder)")
    cfg = OmegaConf.load(cfg_path)
    dirs = stage_dirs(cfg, [], multirun=False)
    jobs = latest_jobs(run_dir)
    states = slurm_states(sorted({i for j in jobs.values() for i in (j.get("job_ids") or [j["job_id"]])}))
    rows = []
    wanted = [s for s in STAGES if s in list(cfg.get("stages") or [])]
    for name in wanted:
        for arm in STAGES[name].arms(cfg):
            d = dirs[(name, arm)]
            m = manifest.read(d) or {}
            job = jobs.get((name, arm))
            row = {"stage": name + (f"[{arm}]" if arm else ""), "dir": str(d), "manifest": m.get("status"),
                   "jobs": [], "detail": {}}
            slurm = []
            nodes: list[str] = []
            if job:
                for tid in job["tasks"]:
                    st = states.get(tid)
                    s = (st or {}).get("JobState", "UNKNOWN")
                    restarts = int((st or {}).get("Restarts", 0) or 0)
                    slurm.append((tid, s, _log_of(job.get("logs"), tid), restarts))
                    nl = (st or {}).get("NodeList")
                    if nl and nl not in ("(null)", "None") and nl not in nodes:
                        nodes.append(nl)
                row["jobs"] = [f"{t}:{s}" + (f"(requeued {r}x)" if r else "") for t, s, _, r in slurm]
            row["nodes"] = nodes
            ss = {s for _, s, _, _ in slurm}
            if m.get("status") == "done":
                state = "done"
            elif ss & FAILED:
                state = "failed"
            elif ss & RUNNING:
                state = "running"
            elif ss & QUEUED:
                state = "queued"
            elif m.get("status") == "failed":
                state = "failed"
            elif m.get("status") in ("running", "partial"):
                # no job left (local run, or Slurm forgot it): what the manifest says
                state = "running" if not job else "failed"
            else:
                state = "not started" if not slurm or ss <= {"UNKNOWN", "COMPLETED"} else "queued"
            row["state"] = state
            kind = STAGES[name].shape_of(cfg).kind
            if kind == "array":
                row["detail"].update(_parts_progress(d))
            if kind == "ranks" and state in ("running", "done", "failed"):
                row["detail"].update(_pretrain_progress(d, cfg))
            if state == "failed":
                bad = [(t, log) for t, s, log, _ in slurm if s in FAILED and log] or \
                    [(t, log) for t, _, log, _ in slurm if log]
                if bad:
                    row["log"] = bad[0][1]
                    row["tail"] = _tail(Path(bad[0][1]))
                elif m.get("error"):
                    row["tail"] = [m["error"]]
            rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    lines = [f"{'stage':<30} {'state':<12} {'jobs':<34} {'nodes':<10} progress"]
    for r in rows:
        d = r["detail"]
        prog = []
        if "parts" in d:
            prog.append(f"parts {d['parts']}")
        if "steps" in d:
            prog.append(f"step {d['steps']}")
        if r["state"] == "running" and d.get("tok_s"):
            prog.append(f"{d['tok_s']:,.0f} tok/s, ETA {_fmt_s(d.get('eta_s'))}")
        lines.append(f"{r['stage']:<30} {r['state']:<12} {' '.join(r['jobs']) or '-':<34} "
                     f"{','.join(r.get('nodes') or []) or '-':<10} {', '.join(prog)}")
        if r["state"] == "failed":
            if r.get("log"):
                lines.append(f"    log: {r['log']}")
            for t in r.get("tail", []):
                lines.append(f"    | {t[:200]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attninf-status", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--wait", action="store_true", help="block until nothing is queued or running")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between checks with --wait")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    try:
        rows = stage_rows(args.run_dir)
        while args.wait and any(r["state"] in ("running", "queued") for r in rows):
            time.sleep(args.poll)
            rows = stage_rows(args.run_dir)
    except FileNotFoundError as e:
        print(f"attninf-status: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else render(rows), flush=True)
    return 0 if rows and all(r["state"] == "done" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
