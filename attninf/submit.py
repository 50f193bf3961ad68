"""`cluster=slurm`: submit the whole pipeline to Slurm as one job per stage and arm, then return.

The launching process composes the config once and freezes it (resolved, site values from the
environment included) into `<run_dir>/cluster/config.yaml`; every job reads that file. Jobs go
through submitit's SlurmExecutor (it writes the sbatch file, submits arrays, and requeues on
preemption or time limit), chained with `afterok` dependencies in pipeline order:

- scoring is a job array of `cluster.score_tasks` tasks; task r scores shards i with
  i % tasks == r (selection.score), and whichever task finds every shard present closes the stage;
- pretraining is one job per arm with `pretrain.launch.nproc_per_node` tasks per node (srun, one
  task per rank; RANK / WORLD_SIZE / MASTER_ADDR come from the Slurm task), task 0 exports;
- every other stage (and eval, once per arm) is one single-task job running the runner's
  `run_stage`, exactly what a local run does for that stage.

Re-submitting the same command submits only what is missing: a stage whose manifest is `done`
with the key computed now is skipped, one whose recorded job is still queued or running is
reused as a dependency. Submitted job ids go to `<run_dir>/cluster/jobs.json` (read by
`attninf-status`).

Requeue safety comes from the stages themselves: finished score shards are skipped, pretraining
resumes from its latest checkpoint, lm-eval answers finished requests from its cache.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from attninf import arms, manifest
from attninf.config import ConfigError, build, check
from attninf.context import Incomplete, MissingInput
from attninf.stages import ORDER, STAGES

log = logging.getLogger("attninf")

FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED")
ACTIVE_STATES = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING",
                 "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT")
RESOURCE_KEYS = ("time_min", "nodes", "gpus_per_node", "cpus_per_task", "mem_gb")


class SubmitError(RuntimeError):
    """Slurm is absent or refused a job; the message is one line (Slurm's own words when it spoke)."""


@dataclass
class Resources:
    time_min: int = 240
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 0  # 0 = the site default (no --mem)


@dataclass
class ClusterConfig:
    kind: str = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    resources: dict = field(default_factory=dict)   # defaults for every job
    stages: dict = field(default_factory=dict)      # per-stage overrides of `resources`
    score_tasks: int = 1
    array_parallelism: int = 64
    max_requeues: int = 5
    signal_delay_s: int = 300
    python: str | None = None                       # interpreter on the nodes (default: this one)
    setup: list = field(default_factory=list)       # shell lines run in every job before srun

    def validate(self) -> None:
        check(self.kind in ("local", "slurm"), "kind", f"'{self.kind}' is not one of local | slurm")
        check(int(self.score_tasks) >= 1, "score_tasks", f"{self.score_tasks} must be >= 1")
        for name in self.stages or {}:
            check(name in STAGES, "stages", f"unknown stage '{name}'; known: {ORDER}")
        for name in list(self.stages or {}) + ["detect"]:  # each stage's merged resources
            unknown = sorted(set({**(self.resources or {}), **((self.stages or {}).get(name) or {})})
                             - set(RESOURCE_KEYS))
            check(not unknown, f"stages.{name}" if name in (self.stages or {}) else "resources",
                  f"unknown key(s) {unknown}; known: {list(RESOURCE_KEYS)}")

    def for_stage(self, name: str) -> Resources:
        merged = {**(self.resources or {}), **((self.stages or {}).get(name) or {})}
        unknown = sorted(set(merged) - set(RESOURCE_KEYS))
        if unknown:
            raise ConfigError(f"cluster.stages.{name}: unknown key(s) {unknown}; known: {list(RESOURCE_KEYS)}")
        return Resources(**merged)


def cluster_config(cfg: DictConfig) -> ClusterConfig:
    return build(ClusterConfig, cfg.get("cluster"), "cluster")


# --- what a run needs ------------------------------------------------------------------------

def cluster_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "cluster"


def frozen_config(run_dir: Path) -> DictConfig:
    return OmegaConf.load(cluster_dir(run_dir) / "config.yaml")


def plan(cfg: DictConfig, names: list[str], dirs: dict) -> dict[tuple[str, str | None], dict]:
    """Key, folder and upstream of every (stage, arm) to run, computed before anything runs.

    The key is the runner's (config sections + upstream keys), chained through stages that have
    not run yet, so it equals the key the job will compute once its inputs exist.
    """
    from attninf.runner import stage_key

    run_dir = Path(cfg.run_dir)
    out: dict[tuple[str, str | None], dict] = {}
    for name in names:
        spec = STAGES[name]
        for arm in spec.arms(cfg):
            inputs, ups = {}, []
            for u, ua in spec.needs(cfg, arm):
                udir = dirs.get((u, ua), run_dir / u)
                if (u, ua) in out:
                    k = out[(u, ua)]["key"]
                    ups.append((u, ua))
                else:
                    m = manifest.read(udir)
                    if m is None or m.get("status") != "done":
                        what = u + (f" (arm {ua})" if ua else "")
                        raise MissingInput(
                            f"stage '{name}' needs the outputs of '{what}' at {udir}, which has no "
                            f"finished manifest: add '{u}' to stages=[...] (run_dir={run_dir})")
                    k = m["key"]
                inputs[f"{u}/{ua}" if ua else u] = {"path": str(udir), "key": k}
            # A seeded arm's key is computed on its own config (pretrain.seed), as run_stage does.
            key, sections = stage_key(arms.config_for(cfg, arm), name, arm, inputs)
            out[(name, arm)] = {"key": key, "dir": dirs[(name, arm)], "inputs": inputs,
                                "sections": sections, "upstream": ups}
    return out


def is_done(entry: dict) -> bool:
    m = manifest.read(entry["dir"])
    return bool(m) and m.get("status") == "done" and m.get("key") == entry["key"]


def prepare_stage(cfg: DictConfig, name: str, arm: str | None, dirs: dict) -> Path:
    """Freeze config + a `running` manifest into the stage folder (what attninf.worker reads).

    Same rules as the runner: a folder holding another key is moved aside first; a folder with
    this key is left as it is (its finished shards / checkpoints are what a requeue resumes from).
    """
    from attninf.runner import _lock

    entry = plan(cfg, [name], dirs)[(name, arm)]
    cfg = arms.config_for(cfg, arm)
    out = entry["dir"]
    with _lock(out):
        old = manifest.read(out)
        if old and old.get("key") == entry["key"]:
            if not (out / "config.yaml").exists():
                manifest.write_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            return out
        if old:
            aside = out.with_name(f"{out.name}.old-{old.get('key', 'unknown')[:8]}")
            shutil.rmtree(aside, ignore_errors=True)
            out.rename(aside)
            out.mkdir(parents=True)
        manifest.write_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        manifest.write(out, stage=name, arm=arm, key=entry["key"], status="running",
                       config=entry["sections"], inputs=entry["inputs"], started=time.time())
    return out


# --- Slurm -----------------------------------------------------------------------------------

def check_slurm() -> None:
    """One clear line when no Slurm answers, before anything is written or submitted."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise SubmitError("cluster=slurm: no Slurm here (sbatch/srun not on PATH); run on a Slurm "
                          "login node, or use cluster=local")
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


def _slurm_message(err: BaseException) -> str:
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()]
    msg = "; ".join(dict.fromkeys(lines)) or " ".join(text.split())[:500]
    return msg


def _executor(cc: ClusterConfig, res: Resources, folder: Path, name: str, ntasks_per_node: int = 1):
    import submitit

    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=cc.max_requeues,
                                python=cc.python or sys.executable)
    params: dict[str, Any] = dict(job_name=f"attninf-{name}", time=int(res.time_min), nodes=int(res.nodes),
                                  ntasks_per_node=ntasks_per_node, cpus_per_task=int(res.cpus_per_task),
                                  signal_delay_s=cc.signal_delay_s, array_parallelism=cc.array_parallelism,
                                  setup=["export TOKENIZERS_PARALLELISM=false", *(cc.setup or [])])
    if res.gpus_per_node:
        params["gpus_per_node"] = int(res.gpus_per_node)
    if res.mem_gb:
        params["mem"] = f"{int(round(float(res.mem_gb) * 1024))}M"
    for k in ("partition", "qos", "account", "constraint"):
        if getattr(cc, k):
            params[k] = getattr(cc, k)
    ex.update_parameters(**params)
    return ex


def _submit(ex, deps: list[str], fn, args_list: list[tuple], label: str) -> list:
    import submitit

    extra = {"requeue": True, "open-mode": "append"}
    if deps:
        extra.update({"dependency": "afterok:" + ":".join(deps), "kill-on-invalid-dep": "yes"})
    ex.update_parameters(additional_parameters=extra)
    # submitit echoes sbatch's stderr before raising; keep it for the one-line message instead.
    echoed = io.StringIO()
    try:
        with contextlib.redirect_stderr(echoed):
            if len(args_list) == 1:
                return [ex.submit(fn, *args_list[0])]
            return ex.map_array(fn, *zip(*args_list))
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as e:
        raise SubmitError(f"cluster=slurm: sbatch refused the {label} job: {_slurm_message(e)}") from None
    except subprocess.CalledProcessError as e:
        out = e.output.decode() if isinstance(e.output, bytes) else str(e.output or e)
        raise SubmitError(f"cluster=slurm: sbatch refused the {label} job: "
                          f"{_slurm_message(Exception(out))}") from None


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
    states = slurm_states([job["job_id"]])
    return any(s.get("JobState") in ACTIVE_STATES for s in states.values())


def submit_pipeline(cfg: DictConfig) -> list[dict]:
    """Submit every selected, unfinished (stage, arm) as Slurm jobs; return what was submitted."""
    from attninf.runner import selected_stages, stage_dirs, validate_sections

    cc = cluster_config(cfg)
    names = selected_stages(cfg)
    validate_sections(cfg, names)  # every section checked before anything is submitted
    run_dir = Path(cfg.run_dir).resolve()
    if str(run_dir) != cfg.run_dir:
        cfg = OmegaConf.merge(cfg, {"run_dir": str(run_dir)})  # jobs run from other working dirs
    dirs = stage_dirs(cfg, [], multirun=False)
    entries = plan(cfg, names, dirs)
    for name in names:  # validate every stage's resources before submitting anything
        cc.for_stage(name)
    check_slurm()
    cdir = cluster_dir(run_dir)
    cdir.mkdir(parents=True, exist_ok=True)
    manifest.write_atomic(cdir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    manifest.write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    history = read_jobs(run_dir)
    previous = latest_jobs(run_dir)
    job_of: dict[tuple[str, str | None], str] = {}
    submitted: list[dict] = []
    for (name, arm), entry in entries.items():
        label = name + (f"[{arm}]" if arm else "")
        if is_done(entry):
            log.info("cluster: %-22s done, not submitted", label)
            continue
        prev = previous.get((name, arm))
        if prev and prev.get("key") == entry["key"] and _job_active(prev):
            job_of[(name, arm)] = prev["job_id"]
            log.info("cluster: %-22s already queued/running as job %s", label, prev["job_id"])
            continue
        deps = [job_of[u] for u in entry["upstream"] if u in job_of]
        res = cc.for_stage(name)
        folder = cdir / "logs" / (name + (f"-{arm}" if arm else ""))
        if name == "score" and cc.score_tasks > 1:
            ex = _executor(cc, res, folder, name)
            jobs = _submit(ex, deps, StageJob(), [(str(run_dir), name, arm, r, cc.score_tasks)
                                                  for r in range(cc.score_tasks)], label)
            job_id = jobs[0].job_id.split("_")[0]
        else:
            ntasks = int(cfg.pretrain.launch.nproc_per_node) if name == "pretrain" else 1
            ex = _executor(cc, res, folder, name, ntasks_per_node=ntasks)
            jobs = _submit(ex, deps, StageJob(), [(str(run_dir), name, arm, None, None)], label)
            job_id = jobs[0].job_id
        rec = {"stage": name, "arm": arm, "job_id": job_id, "tasks": [j.job_id for j in jobs],
               "logs": [str(j.paths.stderr) for j in jobs], "folder": str(folder),
               "dependency": deps, "key": entry["key"], "submitted": time.time()}
        job_of[(name, arm)] = job_id
        history.append(rec)
        submitted.append(rec)
        manifest.write_json(cdir / "jobs.json", {"jobs": history})
        print(f"submitted {label:<28} job {job_id}" + (f" ({len(jobs)} array tasks)" if len(jobs) > 1 else "")
              + (f" after {','.join(deps)}" if deps else ""), flush=True)
    if not submitted:
        print("nothing to submit: every selected stage is done or already queued", flush=True)
    print(f"status: attninf-status {run_dir}   (--wait to block until the jobs end)", flush=True)
    return submitted


# --- what runs inside a job --------------------------------------------------------------------

def _checkpointable():
    import submitit

    return submitit.helpers.Checkpointable


class StageJob(_checkpointable()):
    """The callable every job runs. Checkpointable: on a time-limit signal submitit requeues it
    with the same arguments, and the stage resumes from its own completion markers."""

    def __call__(self, run_dir: str, name: str, arm: str | None, rank: int | None, world: int | None):
        from attninf.runner import run_stage, setup_logging, stage_dirs

        setup_logging()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        cfg = frozen_config(Path(run_dir))
        dirs = stage_dirs(cfg, [], multirun=False)
        if name == "score" and world and world > 1:
            return _score_task(cfg, dirs, rank, world)
        if name == "pretrain":
            return _pretrain_job(cfg, dirs, arm)
        try:
            run_stage(cfg, name, arm, dirs)
        except Incomplete as e:
            raise RuntimeError(f"{name}: stage not complete after its job: {e}") from None
        return "done"


def _score_task(cfg: DictConfig, dirs: dict, rank: int, world: int) -> str:
    """Array task `rank`: score this task's shards, then close the stage if every shard exists."""
    from attninf import worker
    from attninf.runner import run_stage

    stage_dir = prepare_stage(cfg, "score", None, dirs)
    os.environ["ATTNINF_RANK"], os.environ["ATTNINF_WORLD_SIZE"] = str(rank), str(world)
    worker.main([str(stage_dir)])
    try:
        run_stage(cfg, "score", None, dirs)  # skips present shards; raises Incomplete if some are missing
    except Incomplete as e:
        log.info("score task %d/%d: share done; %s", rank, world, e)
        return "share done"
    return "done"


def _pretrain_job(cfg: DictConfig, dirs: dict, arm: str | None) -> str:
    """One task per rank: task 0 prepares the folder, every task trains, task 0 exports + closes."""
    import submitit

    from attninf.runner import run_stage

    env = submitit.JobEnvironment()
    rank, world = env.global_rank, env.num_tasks
    if world == 1:
        run_stage(cfg, "pretrain", arm, dirs)
        return "done"
    out = dirs[("pretrain", arm)]
    ready = out / f".ready-{env.job_id}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    if rank == 0:
        prepare_stage(cfg, "pretrain", arm, dirs)
        m = manifest.read(out)
        if m and m.get("status") == "done":
            ready.touch()
            return "done"
        mix = Path(m["inputs"]["mix"]["path"])
        manifest.write_json(out / "job.json", {"arm": arm or "baseline", "mix_dir": str(mix.resolve())})
        ready.touch()
    else:
        for _ in range(3600):
            if ready.exists():
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"pretrain task {rank}: task 0 did not prepare {out} within 30 min")
        m = manifest.read(out)
        if m and m.get("status") == "done":
            return "done"
    from pretrain import checkpoint
    from pretrain.train import load_config

    total = load_config(cfg.pretrain).total_steps()
    if checkpoint.latest_step(out / "ckpt") != total:
        penv = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(env.local_rank),
                "LOCAL_WORLD_SIZE": str(max(world // max(env.num_nodes, 1), 1)),
                "MASTER_ADDR": env.hostnames[0],
                "MASTER_PORT": str(20000 + int(str(env.job_id).split("_")[0]) % 20000)}
        with open(out / f"train-rank{rank}.log", "a") as fh:
            rc = subprocess.run([sys.executable, "-m", "pretrain.launch", str(out)], env=penv,
                                stdout=fh, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"pretrain rank {rank}: training exited with code {rc}; see "
                               f"{out / f'train-rank{rank}.log'}")
    if rank == 0:
        run_stage(cfg, "pretrain", arm, dirs)  # finds the final checkpoint: export, figures, done
    return "done"
