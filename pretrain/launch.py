"""One training rank: `python -m pretrain.launch <pretrain stage folder>`.

The one launch path of the pretrain stage's ranks: the executors start exactly this command in
every rank, srun on Slurm (one task per GPU) and attninf.dist.spawn_ranks on one machine; a
manual `srun python -m pretrain.launch DIR` is the same. It reads the frozen, resolved
`config.yaml` and the manifest (arm, the mix folder among its inputs) that the lifecycle's
`prepare` wrote (never re-composed with Hydra, so all ranks agree and no rank writes Hydra
output folders); a hand-made folder may give them as `job.json` ({"arm", "mix_dir"}) instead.

Exit codes: 0 = trained to the last step; 75 (lifecycle.EXIT_REQUEUE) = stopped earlier with a
checkpoint (SIGUSR1 before the time limit, SIGTERM on preemption or requeue, or
exit_after_steps), so the job script requeues the job and the next start resumes. A signal that
arrives after the last step's check also gives 75 (nothing left to save): the finish step then
runs after the requeue, at the start of a fresh allocation, instead of racing the time limit.
The signals are recorded from the module's first line (attninf/stop.py), before torch and
megatron load: a signal during those imports would otherwise kill the rank (their default
action), and spawned helpers that re-import this module as __mp_main__ record them too.

Rank and rendezvous (`rendezvous_env`): torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
when present, else Slurm's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; MASTER_ADDR/MASTER_PORT as
exported, else 127.0.0.1 on a one-node step (first host of SLURM_JOB_NODELIST otherwise) and
20000 + SLURM_JOB_ID % 20000. One Slurm task per rank runs exactly
`python -m pretrain.launch <stage folder>` (e.g. `srun --ntasks=2 python -m pretrain.launch DIR`);
a requeued job re-runs the same command and resumes from `ckpt/latest`.

The `__main__` guard matters: dist_checkpointing spawns helper processes that re-import __main__.
"""

from __future__ import annotations

if __name__ in ("__main__", "__mp_main__"):  # first: record stop signals, never die of them
    from attninf import stop as _stop

    _stop.install()

import json
import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Mapping

from attninf.stop import shielded


def rendezvous_env(env: Mapping[str, str]) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for this process, from torchrun or srun.

    torchrun (or `attninf`'s own launch) already sets RANK and WORLD_SIZE: they win, and only a
    missing MASTER_ADDR/PORT gets a default. Under srun without torchrun, Slurm's task variables
    map one to one: SLURM_PROCID -> RANK, SLURM_STEP_NUM_TASKS (else SLURM_NTASKS) -> WORLD_SIZE,
    SLURM_LOCALID -> LOCAL_RANK. Rendezvous under srun: MASTER_ADDR as exported by the batch
    script, else 127.0.0.1 when the job step has one node (SLURM_STEP_NUM_NODES, else
    SLURM_JOB_NUM_NODES / SLURM_NNODES, = 1: no scontrol needed), else the first host of
    SLURM_JOB_NODELIST (`scontrol show hostnames`); MASTER_PORT as exported, else 20000 + SLURM_JOB_ID % 20000 (slurm/pretrain.sbatch's rule: every task of the job
    computes the same port, and two jobs on one node rarely collide).
    """
    out: dict[str, str] = {}
    if "RANK" in env and "WORLD_SIZE" in env:
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        # the job step's task count (srun --ntasks) first: the allocation's may be larger
        out.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "")),
                   LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    else:
        raise SystemExit("pretrain.launch: no RANK/WORLD_SIZE (torchrun) and no SLURM_PROCID/SLURM_NTASKS "
                         "(srun); start it through `attninf`, torchrun or srun")
    if "MASTER_ADDR" not in env:
        nodes = next((env[k] for k in ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
                      if k in env), None)
        if "SLURM_JOB_NODELIST" in env and nodes != "1":
            nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
            with shielded():  # a step signal must not kill scontrol under us
                hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                                       capture_output=True, text=True, check=True).stdout.split()
            out["MASTER_ADDR"] = node_address(hosts[0])
        else:
            out["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(20000 + int(env["SLURM_JOB_ID"]) % 20000) if "SLURM_JOB_ID" in env else "29500"
    return out


def node_address(node: str) -> str:
    """The address a Slurm node is reached at (NodeAddr): a node name need not resolve (two
    slurmd on one host are `n1`, `n2` at 127.0.0.1); on most clusters it is the hostname."""
    with shielded():
        p = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True)
    for kv in p.stdout.split():
        if kv.startswith("NodeAddr="):
            return kv.split("=", 1)[1]
    return node


def _trained(stage: Path) -> bool:
    """The last step's checkpoint and the training summary exist: nothing left for the ranks."""
    from omegaconf import OmegaConf

    from pretrain import checkpoint
    from pretrain.train import load_config

    summary = stage / "train_summary.json"
    if not summary.exists() or not (stage / "config.yaml").exists():
        return False
    total = load_config(OmegaConf.load(stage / "config.yaml").get(stage_job(stage).get("stage", "pretrain"))).total_steps()
    return checkpoint.latest_step(stage / "ckpt") == total and json.loads(summary.read_text()).get("finished", False)


def stage_job(stage: Path) -> dict:
    """{"arm", "mix_dir"} from the stage manifest (lifecycle.prepare), else a hand-made job.json."""
    from attninf import manifest
    from attninf.arms import base

    m = manifest.read(stage)
    inputs = (m or {}).get("inputs") or {}
    if len(inputs) == 1:  # the stage's one input is its mixture (stages.py: needs)
        (mix,) = inputs.values()
        return {"arm": base(m.get("arm")) or "baseline", "mix_dir": mix["path"], "stage": m["stage"]}
    return json.loads((stage / "job.json").read_text())


def main(argv: list[str] | None = None) -> int:
    from attninf.lifecycle import EXIT_REQUEUE, install_stop_handlers
    from attninf.stop import name as stop_name

    install_stop_handlers()  # (again, for a caller that imported this module): honoured at the next step
    import torch
    from omegaconf import OmegaConf

    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        raise SystemExit("usage: python -m pretrain.launch <pretrain stage folder>")
    stage = Path(args[0])
    if _trained(stage):  # a requeued job whose training ended before the stop: straight to finish
        return 0
    os.environ.update(rendezvous_env(os.environ))
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # Megatron logs every config object and bucket at INFO: keep its warnings, our progress lines.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    from pretrain import cpu_compat
    from pretrain.train import _stop_agreed, load_config, train

    cfg_all = OmegaConf.load(stage / "config.yaml")
    job = stage_job(stage)
    name = job.get("stage", "pretrain")  # the stage (= its config section) this rank trains for
    cfg = load_config(cfg_all.get(name))
    mix_dir = Path(job["mix_dir"])
    blend = json.loads((mix_dir / "blend.json").read_text())

    on_cpu = cpu_compat.enable()
    if not on_cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("gloo" if on_cpu else "nccl", timeout=timedelta(minutes=30))

    tracker = None
    if rank == 0:
        from attninf.tracking import Tracker

        w = cfg_all.get("wandb") or {}
        with shielded():  # W&B's service process must outlive a step signal, like the rank
            tracker = Tracker(mode=w.get("mode", "offline"), project=w.get("project", "attention-influence"),
                              group=w.get("group") or cfg_all.get("experiment_name"),
                              name=f"{name}/{job['arm']}", dir=stage / "wandb",
                              config={"stage": name, "arm": job["arm"],
                                      name: OmegaConf.to_container(cfg_all.get(name), resolve=True)},
                              tags=[name, job["arm"]])
    try:
        summary = train(cfg, blend, mix_dir, job["arm"], stage,
                        log_fn=(lambda m, s: tracker.log({f"train/{k}" if "/" not in k else k: v
                                                          for k, v in m.items()}, step=s)) if tracker else None)
        if rank == 0:
            (stage / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if tracker is not None:
                tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        if summary["finished"] and cfg.export_hf and int(os.environ["WORLD_SIZE"]) == 1:
            # One process, TP=PP=1: export here and save a process start; several ranks export
            # afterwards in one process (`python -m pretrain.export`), resharding the checkpoint.
            from pretrain.export import export_all

            export_all(stage, cfg, blend, mix_dir)
    finally:
        if tracker is not None:
            tracker.finish()
    # A signal after the last step's check: requeue too (every rank agrees: one all-reduce).
    stopped = not summary["finished"] or _stop_agreed(not on_cpu)
    if summary["finished"] and stopped and rank == 0:
        logging.getLogger("pretrain").info("%s after the last step: the finish step runs after the requeue",
                                           stop_name())
    if rank == 0 and stopped:
        # Before the barrier: no rank exits (and no srun kills rank 0) until this marker exists,
        # so the job script knows the ranks stopped for a requeue whatever srun's exit code says.
        from attninf.lifecycle import mark_stopped

        mark_stopped(stage, summary["last_step"])
    # Only on success: after a failure on one rank a barrier would hang the others.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return EXIT_REQUEUE if stopped else 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        _stop.settle()  # a signal during interpreter teardown must not change the exit code
    raise SystemExit(code)
