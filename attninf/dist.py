"""Which worker am I? One answer for torchrun ranks, Slurm array tasks and a plain process.

Sharded stages (scoring, tokenisation) take `(rank, world_size)` from here and process the shards
with `shard_index % world_size == rank`; nothing else coordinates them, so any mix of launchers
works and a re-run only needs the same world size to reproduce the same assignment (and even a
different one is safe: finished shards are skipped by their completion markers).
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
