"""`cluster=slurm`: the Slurm executor of the stage lifecycle. Plans, prepares, submits, returns.

The same lifecycle as the local runner (attninf/lifecycle.py), as jobs: the launching process
composes the config once, plans every (stage, arm) with its key, `prepare`s its folder (frozen
config + `running` manifest) and submits jobs shaped by the stage's declaration
(attninf/plan.py): one task; an array over the stage's parts plus a finish job; or one job of
nodes x tasks ranks. Every job runs `python -m attninf.worker <stage folder> --step ...` (or the
stage's rank module under srun) from that folder, chained with `afterok` dependencies. Nothing
here names a stage.

Before anything is written or submitted the plan is checked (attninf/plan.py): config errors
and preflight problems (time, memory, permissions, libraries) are one line each, exit 2.
`cluster.dry_run=true` stops there: it prints the job graph and writes `RUN/cluster/plan.json`.

Time limits and preemption: every job asks for `--signal=USR1@<signal_delay_s>` and
`--requeue`; workers stop at a safe point on SIGUSR1 or SIGTERM and exit 75
(lifecycle.EXIT_REQUEUE), and the job script then requeues its own job (`scontrol requeue`, at
most `max_requeues` times), whose next start resumes from the part markers / checkpoints.

Re-submitting the same command submits only what is missing: a unit whose manifest is `done`
with the key computed now is skipped, one whose recorded job is still queued or running is
reused as a dependency. Submitted job ids go to `<run_dir>/cluster/jobs.json` (read by
`attninf-status`); the job scripts stay in `<run_dir>/cluster/jobs/` (the manual path: sbatch
one of them again by hand and it behaves the same).
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from attninf import lifecycle, manifest, plan
from attninf.config import ConfigError, build, check
from attninf.stages import ORDER, STAGES

log = logging.getLogger("attninf")

FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED")
ACTIVE_STATES = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING",
                 "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT")
RESOURCE_KEYS = ("time_min", "gpus_per_node", "cpus_per_task", "mem_gb", "array_tasks")
REPO = Path(__file__).resolve().parent.parent


class DryRunRefused(ConfigError):
    """The plan has problems; they were printed one per line with the plan."""


class SubmitError(RuntimeError):
    """Slurm is absent or refused a job; the message is one line (Slurm's own words when it spoke)."""


@dataclass
class Resources:
    """One job's request. Nodes and tasks come from the stage's shape, not from here."""

    time_min: int = 240
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 0  # 0 = the site default (no --mem)
    array_tasks: int = 1  # array stages: tasks of the array (each runs a contiguous ~1/n of the parts, lifecycle.share)


@dataclass
class ClusterConfig:
    kind: str = "local"
    dry_run: bool = False  # print the plan, write RUN/cluster/plan.json, submit nothing
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpu: str = "H100-SXM"  # for the record; the cost model's peak comes from cost.gpu
    gpu_memory_gb: float = 80.0  # one GPU's memory: the preflight's memory check
    resources: dict = field(default_factory=dict)   # defaults for every job
    stages: dict = field(default_factory=dict)      # per-stage overrides of `resources`
    array_parallelism: int = 64
    max_requeues: int = 5
    signal_delay_s: int = 300
    python: str | None = None                       # interpreter on the nodes (default: this one)
    setup: list = field(default_factory=list)       # shell lines run in every job before srun

    def validate(self) -> None:
        check(self.kind in ("local", "slurm"), "kind", f"'{self.kind}' is not one of local | slurm")
        check(self.max_requeues >= 0, "max_requeues", "must be >= 0")
        check(self.signal_delay_s >= 0, "signal_delay_s", "must be >= 0")
        check(self.array_parallelism >= 1, "array_parallelism", "must be >= 1")
        check(self.gpu_memory_gb >= 0, "gpu_memory_gb", "must be >= 0")
        for name in self.stages or {}:
            check(name in STAGES, "stages", f"unknown stage '{name}'; known: {ORDER}")
        unknown = sorted(set(self.resources or {}) - set(RESOURCE_KEYS))
        check(not unknown, "resources", f"unknown key(s) {unknown}; known: {list(RESOURCE_KEYS)}")
        for name in self.stages or {}:  # each stage's merged resources
            unknown = sorted(set((self.stages or {}).get(name) or {}) - set(RESOURCE_KEYS))
            check(not unknown, f"stages.{name}", f"unknown key(s) {unknown}; known: {list(RESOURCE_KEYS)}")
            r = self.for_stage(name)
            check(int(r.array_tasks) >= 1, f"stages.{name}.array_tasks", f"{r.array_tasks} must be >= 1")

    def for_stage(self, name: str) -> Resources:
        merged = {**(self.resources or {}), **((self.stages or {}).get(name) or {})}
        unknown = sorted(set(merged) - set(RESOURCE_KEYS))
        if unknown:
            raise ConfigError(f"cluster.stages.{name}: unknown key(s) {unknown}; known: {list(RESOURCE_KEYS)}")
        return Resources(**merged)


def cluster_config(cfg: DictConfig) -> ClusterConfig:
    return build(ClusterConfig, cfg.get("cluster"), "cluster")


def cluster_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "cluster"


def frozen_config(run_dir: Path) -> DictConfig:
    return OmegaConf.load(cluster_dir(run_dir) / "config.yaml")


def plan_units(cfg: DictConfig, names: list[str], dirs: dict) -> dict:
    return lifecycle.plan_units(cfg, names, dirs)


# --- Slurm -----------------------------------------------------------------------------------

def check_slurm() -> None:
    """One clear line when no Slurm answers, before anything is written or submitted."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise SubmitError("cluster=slurm: no Slurm here (sbatch/srun not on PATH); run on a Slurm "
                          "login node, use cluster=local, or cluster.dry_run=true for the plan alone")
    try:
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SubmitError(f"cluster=slurm: `scontrol ping` did not answer ({e})") from None
    text = " ".join(w for w in (p.stdout + p.stderr).split() if w.strip("*"))  # drop its banner
    if p.returncode != 0 or " is UP" not in text:
        raise SubmitError(f"cluster=slurm: the Slurm controller does not answer (`scontrol ping`: "
                          f"{text or 'no output'})")


def slurm_states(job_ids: list[str]) -> dict[str, dict]:
    """`scontrol show job -o` per job (array tasks included): {job id: {JobState, ...}}.

    Works without accounting (no sacct): finished jobs stay listed for the controller's MinJobAge.
    A job Slurm no longer knows is absent from the result.
    """
    out: dict[str, dict] = {}
    if not job_ids or shutil.which("scontrol") is None:
        return out
    for jid in job_ids:
        try:
            p = subprocess.run(["scontrol", "show", "job", "-o", str(jid)], capture_output=True,
                               text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in p.stdout.splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if "JobId" not in fields:
                continue
            tid = fields.get("ArrayTaskId")
            if tid in (None, "N/A") or "ArrayJobId" not in fields:
                out[fields["JobId"]] = fields
                continue
            for t in _expand_tasks(tid):  # a pending array is one record "0-1%2"
                out[f"{fields['ArrayJobId']}_{t}"] = fields
    return out


def _expand_tasks(spec: str) -> list[int]:
    out = []
    for part in spec.split("%")[0].split(","):
        a, _, b = part.partition("-")
        if a.isdigit():
            out.extend(range(int(a), int(b or a) + 1))
    return out


def job_script(job: plan.Job, cc: ClusterConfig, logs: Path) -> str:
    """The sbatch script of one job: the request, then the lifecycle step, then the requeue rule."""
    py = shlex.quote(cc.python or sys.executable)
    out = shlex.quote(job.out)
    name = "attninf-" + job.id.replace("[", "-").replace("]", "").replace(":", "-")
    h = [f"#SBATCH --job-name={name}", f"#SBATCH --nodes={job.nodes}",
         f"#SBATCH --ntasks-per-node={job.tasks_per_node}", f"#SBATCH --cpus-per-task={job.cpus_per_task}",
         f"#SBATCH --time={job.time_min}", f"#SBATCH --signal=USR1@{cc.signal_delay_s}",
         "#SBATCH --requeue", "#SBATCH --open-mode=append",
         f"#SBATCH --output={logs}/{name}-%A_%a.out" if job.array else f"#SBATCH --output={logs}/{name}-%j.out"]
    if job.gpus_per_node:
        h.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    if job.mem_gb:
        h.append(f"#SBATCH --mem={int(round(job.mem_gb * 1024))}M")
    if job.array:
        h.append(f"#SBATCH --array=0-{job.array - 1}%{min(cc.array_parallelism, job.array)}")
    for k in ("partition", "qos", "account", "constraint"):
        if getattr(cc, k):
            h.append(f"#SBATCH --{k}={getattr(cc, k)}")
    worker = f"{py} -m attninf.worker {out}"
    if job.step == "ranks":
        spec = STAGES[job.stage]
        stopped = shlex.quote(str(Path(job.out) / lifecycle.STOPPED))
        body = (f"mkdir -p {out}/logs && rm -f {stopped}\n"
                f"srun --kill-on-bad-exit=1 --cpu-bind=none --nodes={job.nodes} "
                f"--ntasks-per-node={job.tasks_per_node} --output={out}/logs/rank-%t.log --open-mode=append "
                f"{py} -m {spec.rank_module} {out}\n"
                "rc=$?\n"
                f"[ -f {stopped} ] && rc={lifecycle.EXIT_REQUEUE}  # the ranks stopped with a checkpoint\n"
                f"if [ $rc -eq 0 ]; then srun --nodes=1 --ntasks=1 {worker} --step finish; rc=$?; fi\n"
                "[ $rc -eq 0 ] && exit 0\n")
    else:
        body = f"srun --nodes=1 --ntasks=1 {worker} --step {job.step}\nrc=$?\n[ $rc -eq 0 ] && exit 0\n"
    return "\n".join([
        "#!/bin/bash",
        f"# attninf job {job.id}: {job.step} step of {job.out}",
        *h,
        "set -u",
        f"cd {shlex.quote(str(REPO))}",
        f'export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}',
        "export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} CUDA_DEVICE_MAX_CONNECTIONS=1",
        *(cc.setup or []),
        body.rstrip("\n"),
        f"if [ $rc -eq {lifecycle.EXIT_REQUEUE} ] && [ \"${{SLURM_RESTART_COUNT:-0}}\" -lt {cc.max_requeues} ]; then",
        # an array task by <array id>_<task>: its SLURM_JOB_ID may be the array's own id, and
        # `scontrol requeue <array id>` requeues every task of the array
        '  me=$SLURM_JOB_ID; [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && me=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}',
        '  echo "attninf: stopped at a safe point; requeueing job $me (restart ${SLURM_RESTART_COUNT:-0})"',
        '  scontrol requeue "$me" && exit 0',
        "fi",
        "exit $rc",
        ""])


def _sbatch(script: Path, deps: list[str], label: str) -> str:
    cmd = ["sbatch", "--parsable"]
    if deps:
        cmd += [f"--dependency=afterok:{':'.join(deps)}", "--kill-on-invalid-dep=yes"]
    p = subprocess.run([*cmd, str(script)], capture_output=True, text=True)
    if p.returncode != 0:
        msg = "; ".join(ln.strip() for ln in (p.stderr or p.stdout).splitlines() if ln.strip())
        raise SubmitError(f"cluster=slurm: sbatch refused the {label} job: {msg[:500]}")
    return p.stdout.strip().split(";")[0]


def read_jobs(run_dir: Path) -> list[dict]:
    p = cluster_dir(run_dir) / "jobs.json"
    if not p.exists():
        return []
    return json.loads(p.read_text()).get("jobs", [])


def latest_jobs(run_dir: Path) -> dict[tuple[str, str | None], dict]:
    out = {}
    for j in read_jobs(run_dir):
        out[(j["stage"], j.get("arm"))] = j
    return out


def _job_active(job: dict) -> bool:
    states = slurm_states(job.get("job_ids") or [job["job_id"]])
    return any(s.get("JobState") in ACTIVE_STATES for s in states.values())


def preflight(cfg: DictConfig) -> tuple[ClusterConfig, DictConfig, dict, list[plan.Job], list[str]]:
    """Everything checked before anything is written or submitted: (cc, cfg, units, jobs, problems)."""
    from attninf.runner import selected_stages, stage_dirs, validate_sections

    cc = cluster_config(cfg)
    names = selected_stages(cfg)
    validate_sections(cfg, names)  # every section checked before anything is submitted
    run_dir = Path(cfg.run_dir).resolve()
    if str(run_dir) != cfg.run_dir:
        cfg = OmegaConf.merge(cfg, {"run_dir": str(run_dir)})  # jobs run from other working dirs
    dirs = stage_dirs(cfg, [], multirun=False)
    units = lifecycle.plan_units(cfg, names, dirs)
    for name in names:
        cc.for_stage(name)
    todo = {k: u for k, u in units.items() if not lifecycle.is_done(u)}
    jobs, problems = plan.job_graph(cfg, todo, cc)
    return cc, cfg, todo, jobs, problems


def submit_pipeline(cfg: DictConfig) -> list[dict]:
    """Plan, check, (dry run: print and stop) prepare and submit every unfinished (stage, arm)."""
    cc, cfg, units, jobs, problems = preflight(cfg)
    run_dir = Path(cfg.run_dir)
    cdir = cluster_dir(run_dir)
    if cc.dry_run:
        print(plan.render(jobs, problems), flush=True)
        cdir.mkdir(parents=True, exist_ok=True)
        manifest.write_json(plan.plan_path(run_dir), plan.to_json(jobs, problems))
        print(f"\nplan: {plan.plan_path(run_dir)} (dry run: nothing submitted)", flush=True)
        if problems:
            raise DryRunRefused(f"cluster.dry_run: {len(problems)} problem(s), each a `refused:` line above")
        return []
    if problems:
        raise ConfigError("\n".join(problems))
    check_slurm()
    cdir.mkdir(parents=True, exist_ok=True)
    manifest.write_atomic(cdir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    manifest.write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    manifest.write_json(plan.plan_path(run_dir), plan.to_json(jobs, problems))
    history = read_jobs(run_dir)
    previous = latest_jobs(run_dir)
    slurm_id: dict[str, str] = {}  # plan id -> Slurm job id
    reused: set[tuple[str, str | None]] = set()
    submitted: list[dict] = []
    logs = cdir / "logs"
    logs.mkdir(exist_ok=True)
    (cdir / "jobs").mkdir(exist_ok=True)
    by_unit: dict[tuple[str, str | None], list[plan.Job]] = {}
    for j in jobs:
        by_unit.setdefault((j.stage, j.arm), []).append(j)
    for (name, arm), ujobs in by_unit.items():
        unit = units[(name, arm)]
        prev = previous.get((name, arm))
        if prev and prev.get("key") == unit.key and _job_active(prev):
            for j in ujobs:
                slurm_id[j.id] = (prev.get("plan_ids_to_jobs") or {}).get(j.id, prev["job_id"])
            reused.add((name, arm))
            log.info("cluster: %-22s already queued/running as job %s", unit.label, prev["job_id"])
            continue
        lifecycle.prepare(cfg, unit)
        ids = []
        for j in ujobs:
            script = cdir / "jobs" / (j.id.replace("[", "-").replace("]", "").replace(":", "-") + ".sbatch")
            manifest.write_atomic(script, job_script(j, cc, logs))
            deps = [slurm_id[a] for a in j.after if a in slurm_id]
            jid = _sbatch(script, deps, j.id)
            slurm_id[j.id] = jid
            ids.append(jid)
            print(f"submitted {j.id:<34} job {jid}" + (f" ({j.array} array tasks)" if j.array else "")
                  + (f" after {','.join(deps)}" if deps else ""), flush=True)
        first = ujobs[0]
        tasks = [f"{ids[0]}_{t}" for t in range(first.array)] if first.array else [ids[0]]
        tasks += ids[1:]
        rec = {"stage": name, "arm": arm, "job_id": ids[-1], "job_ids": ids, "tasks": tasks,
               "plan_ids_to_jobs": dict(zip([j.id for j in ujobs], ids)),
               "logs": str(logs), "scripts": str(cdir / "jobs"),
               "dependency": sorted({slurm_id[a] for j in ujobs[:1] for a in j.after if a in slurm_id}),
               "key": unit.key, "submitted": time.time()}
        history.append(rec)
        submitted.append(rec)
        manifest.write_json(cdir / "jobs.json", {"jobs": history})
    if not submitted:
        print("nothing to submit: every selected stage is done or already queued", flush=True)
    print(f"status: attninf-status {run_dir}   (--wait to block until the jobs end)", flush=True)
    return submitted
