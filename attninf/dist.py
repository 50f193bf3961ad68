"""Which worker am I? One answer for torchrun ranks, Slurm array tasks and a plain process.

Array stages (scoring, tokenisation) take `(rank, world_size)` from here; the executors then hand
the task a contiguous run of the stage's parts (attninf.lifecycle.share, one rule for the local
runner, Slurm array tasks and the manual fan-out ATTNINF_RANK / ATTNINF_WORLD_SIZE). Nothing else
coordinates them, so any mix of launchers works, and a re-run with another world size is safe:
parts are defined by the data and finished ones are skipped by their completion markers.
"""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port free on this host now, for a single-node rendezvous (MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_world() -> tuple[int, int]:
    env = os.environ
    if "ATTNINF_RANK" in env:  # explicit override, e.g. for manual fan-out
        return int(env["ATTNINF_RANK"]), int(env["ATTNINF_WORLD_SIZE"])
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / torch.distributed
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


def rank_env(rank: int, nodes: int, tasks_per_node: int, master_addr: str, master_port: int) -> dict[str, str]:
    """torch.distributed's variables for rank `rank` of a nodes x tasks_per_node layout."""
    return {"RANK": str(rank), "WORLD_SIZE": str(nodes * tasks_per_node),
            "LOCAL_RANK": str(rank % tasks_per_node), "LOCAL_WORLD_SIZE": str(tasks_per_node),
            "NODE_RANK": str(rank // tasks_per_node), "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port)}


def spawn_ranks(module: str, stage_dir, nodes: int = 1, tasks_per_node: int = 1,
                port: int | None = None, env: dict | None = None) -> str:
    """Run `python -m <module> <stage_dir>` as nodes x tasks_per_node ranks on this machine.

    The local twin of `srun --nodes=N --ntasks-per-node=T python -m <module> <stage_dir>`: the
    same command in every rank, rank variables in the environment (what pretrain.launch's
    rendezvous reads from srun's SLURM_PROCID/... on a cluster). Rank r logs to
    `<stage_dir>/logs/rank-<r>.log`; rank 0 is also echoed here. Exit codes: all 0 -> "done";
    EXIT_REQUEUE (75) from some and 0 from the rest -> "stopped" (a stop request or
    exit_after_steps: a re-run resumes); anything else kills the other ranks (they would wait
    in a collective for half an hour) and raises RuntimeError naming the log.
    """
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    stage_dir = Path(stage_dir)
    logs = stage_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = dict(env if env is not None else os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    base["PYTHONPATH"] = root + (os.pathsep + base["PYTHONPATH"] if base.get("PYTHONPATH") else "")
    base.setdefault("TOKENIZERS_PARALLELISM", "false")
    for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"):
        base.pop(k, None)  # this process's own Slurm task must not leak into the ranks
    port = port or free_port()
    world = nodes * tasks_per_node
    procs, files = [], []
    for r in range(world):
        fh = open(logs / f"rank-{r}.log", "a")
        files.append(fh)
        p = subprocess.Popen([sys.executable, "-m", module, str(stage_dir)],
                             env={**base, **rank_env(r, nodes, tasks_per_node, "127.0.0.1", port)},
                             stdout=subprocess.PIPE if r == 0 else fh, stderr=subprocess.STDOUT, text=True)
        procs.append(p)

    def tee():
        for line in procs[0].stdout:
            files[0].write(line)
            files[0].flush()
            if "Warning" not in line and "warnings.warn" not in line:
                sys.stderr.write(line)

    t = threading.Thread(target=tee, daemon=True)
    t.start()
    from attninf.lifecycle import EXIT_REQUEUE

    try:
        while True:
            rcs = [p.poll() for p in procs]
            bad = [(r, rc) for r, rc in enumerate(rcs) if rc not in (None, 0, EXIT_REQUEUE)]
            if bad or all(rc is not None for rc in rcs):
                break
            time.sleep(0.2)
    finally:
        if any(p.poll() is None for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
        t.join(timeout=10)
        for fh in files:
            fh.close()
    if bad:
        r, rc = bad[0]
        raise RuntimeError(f"{module}: rank {r} of {world} exited with code {rc}; see {logs / f'rank-{r}.log'}")
    return "stopped" if any(rc == EXIT_REQUEUE for rc in rcs) else "done"
