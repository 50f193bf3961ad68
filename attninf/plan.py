"""The preflight plan of a Slurm submission: every job, its resources, cost and problems.

`job_graph` turns the planned units (attninf/lifecycle.py) into jobs from each stage's declared
shape, never its name:

- process: one job of one task;
- array: an array job of `array_tasks` tasks (each runs a contiguous run of the parts, lifecycle.share), then a one-task finish
  job that depends on it;
- ranks: one job of nodes x tasks_per_node tasks (the ranks, then finish on the first node).

Each job carries its request (time limit, CPUs, GPUs, memory), its dependencies, and an
estimate: the GPU-hours of the stage's cost item (attninf/cost.py, the `cost:` section, measured
rates when given) split evenly over the stage's arms, and the wall time those take on the job's
GPUs (an array: one task's share). `problems` lists, one line each, what would make the run fail
late: a wall time beyond the time limit x (1 + requeues), a ranks layout that does not match the
GPUs, and whatever the stages' own preflights report (memory per GPU, code execution, libraries).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from attninf import arms
from attninf.lifecycle import Unit
from attninf.stages import STAGES


@dataclass
class Job:
    """One sbatch submission."""

    id: str  # label within the plan: "<stage>[<arm>]", with ":parts" / ":finish" for an array
    stage: str
    arm: str | None
    step: str  # process | parts | finish | ranks
    out: str
    nodes: int = 1
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    mem_gb: float = 0
    time_min: int = 60
    array: int | None = None  # array size (parts jobs)
    after: list[str] = field(default_factory=list)  # plan ids this job waits for (afterok)
    gpu_hours: float | None = None
    wall_hours: float | None = None
    facts: dict = field(default_factory=dict)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def _cost_items(cfg: DictConfig) -> dict[str, dict]:
    from attninf.cost import by_item, from_mapping

    node = cfg.get("cost")
    if node is None:
        return {}
    return by_item(from_mapping(node))


def job_graph(cfg: DictConfig, units: dict[tuple[str, str | None], Unit], cc) -> tuple[list[Job], list[str]]:
    """(jobs in submission order, problems). Units already done are left out by the caller."""
    items = _cost_items(cfg)
    jobs: list[Job] = []
    problems: list[str] = []
    last_job: dict[tuple[str, str | None], str] = {}  # unit -> the plan id its dependents wait for
    for (name, arm), unit in units.items():
        spec = STAGES[name]
        acfg = arms.config_for(cfg, arm)
        shape = spec.shape_of(acfg)
        res = cc.for_stage(name)
        after = [last_job[u] for u in unit.upstream if u in last_job]
        base = dict(stage=name, arm=arm, out=str(unit.out), cpus_per_task=int(res.cpus_per_task),
                    gpus_per_node=int(res.gpus_per_node), mem_gb=float(res.mem_gb), time_min=int(res.time_min))
        n_arms = max(len(spec.arms(cfg)), 1)
        gpu_h = items[spec.cost_item]["gpu_hours"] / n_arms if spec.cost_item in items else None
        if shape.kind == "array":
            n = int(res.array_tasks)
            work = Job(f"{unit.label}:parts", step="parts", array=n, after=after, **base)
            fin = Job(f"{unit.label}:finish", step="finish", after=[work.id],
                      **{**base, "gpus_per_node": 0, "time_min": min(int(res.time_min), 60)})
            work.gpu_hours = gpu_h
            if gpu_h is not None:
                work.wall_hours = gpu_h / n / max(work.gpus_per_node, 1)
            jobs += [work, fin]
            last_job[(name, arm)] = fin.id
        elif shape.kind == "ranks":
            job = Job(unit.label, step="ranks", nodes=shape.nodes, tasks_per_node=shape.tasks_per_node,
                      after=after, **base)
            if job.gpus_per_node and shape.tasks_per_node != job.gpus_per_node:
                problems.append(
                    f"{unit.label}: {shape.tasks_per_node} tasks per node but cluster.stages.{name}."
                    f"gpus_per_node={job.gpus_per_node}: one rank per GPU (set the stage's tasks per node "
                    f"or the GPUs per node so they match)")
            job.gpu_hours = gpu_h
            if gpu_h is not None:
                job.wall_hours = gpu_h / max(job.gpus, 1)
            jobs.append(job)
            last_job[(name, arm)] = job.id
        else:
            job = Job(unit.label, step="process", after=after, **base)
            job.gpu_hours = gpu_h
            if gpu_h is not None:
                job.wall_hours = gpu_h / max(job.gpus, 1)
            jobs.append(job)
            last_job[(name, arm)] = job.id
        if spec.preflight:
            facts, probs = spec.call("preflight")(acfg, arm, _JobResources(res, cc))
            jobs[-1 if shape.kind != "array" else -2].facts.update(facts)
            problems += [p for p in probs if p not in problems]
    for job in jobs:
        if job.wall_hours is not None:
            allowed = job.time_min / 60 * (1 + cc.max_requeues)
            if job.wall_hours > allowed:
                problems.append(
                    f"{job.id}: estimated {job.wall_hours:,.1f} h of wall time per "
                    f"{'task' if job.array else 'job'} is beyond its time limit x (1 + requeues) = "
                    f"{job.time_min / 60:g} h x {1 + cc.max_requeues} = {allowed:g} h; raise "
                    f"cluster.stages.{job.stage}.time_min, cluster.max_requeues"
                    + (f" or cluster.stages.{job.stage}.array_tasks" if job.array else " or the GPUs"))
    return jobs, problems


@dataclass
class _JobResources:
    """What a stage's preflight sees of its job: the request plus the GPU's memory."""

    res: Any
    cc: Any

    def __getattr__(self, k):
        if k == "gpu_memory_gb":
            return self.cc.gpu_memory_gb
        return getattr(self.res, k)


def render(jobs: list[Job], problems: list[str]) -> str:
    """The job graph as the terminal shows it (one line per job), then memory and problems."""
    head = (f"{'job':<34} {'nodes':>5} {'tasks/n':>7} {'GPUs':>5} {'CPUs/t':>6} {'mem':>7} {'limit':>7} "
            f"{'array':>5} {'GPU-h':>10} {'wall':>9}  after")
    lines = [head, "-" * len(head)]
    for j in jobs:
        mem = f"{j.mem_gb:g}G" if j.mem_gb else "site"
        wall = "-" if j.wall_hours is None else (f"{j.wall_hours:,.1f} h" if j.wall_hours < 48
                                                 else f"{j.wall_hours / 24:,.1f} d")
        gh = "-" if j.gpu_hours is None else f"{j.gpu_hours:,.0f}"
        lim = f"{j.time_min // 60}h{j.time_min % 60:02d}"
        lines.append(f"{j.id:<34} {j.nodes:>5} {j.tasks_per_node:>7} {j.gpus:>5} {j.cpus_per_task:>6} "
                     f"{mem:>7} {lim:>7} {j.array or '-':>5} {gh:>10} {wall:>9}  {_after(j.after)}")
    total = sum(j.gpu_hours or 0 for j in jobs)
    lines.append(f"{'total':<34} {'':>5} {'':>7} {'':>5} {'':>6} {'':>7} {'':>7} {'':>5} {total:>10,.0f}")
    seen = set()
    for j in jobs:
        m = j.facts.get("memory_per_gpu")
        if m and j.stage not in seen:
            seen.add(j.stage)
            parts = ", ".join(f"{k} {v:.1f}" for k, v in m.items() if k not in ("total", "gpu_gib"))
            lines.append(f"\nmemory per GPU ({j.stage}, GiB): {parts}; total {m['total']:.1f} of "
                         f"{m['gpu_gib']:g}")
    if problems:
        lines.append("")
        lines += [f"refused: {p}" for p in problems]
    return "\n".join(lines)


def _after(ids: list[str]) -> str:
    return (",".join(ids) or "-") if len(ids) <= 2 else f"{ids[0]} +{len(ids) - 1} more"


def to_json(jobs: list[Job], problems: list[str]) -> dict:
    return {"jobs": [{**asdict(j), "gpus": j.gpus} for j in jobs], "problems": problems,
            "gpu_hours": sum(j.gpu_hours or 0 for j in jobs)}


def plan_path(run_dir: Path) -> Path:
    return Path(run_dir) / "cluster" / "plan.json"
