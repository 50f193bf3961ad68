"""Stage manifests: what a stage folder holds, what made it, and whether it is finished.

A stage folder is finished when its `manifest.json` says `status: done` with the same `key`
the runner computes now. The key hashes the stage's own config sections and the keys of its
inputs, so changing an upstream config re-runs everything downstream and nothing else.
Wall time and versions are recorded but are not part of the key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
TRACKED_PACKAGES = ("torch", "transformers", "megatron-core", "lm-eval", "hydra-core", "datasets",
                    "wandb", "duckdb", "pyarrow", "numpy", "attninf")


def git_commit() -> str | None:
    """Commit of the code that ran (with '-dirty' when the tree had local changes)."""
    from attninf.stop import shielded

    root = Path(__file__).resolve().parent.parent
    try:
        with shielded():  # a Slurm step signal must not kill git and drop the provenance
            sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                 text=True, timeout=10).stdout.strip()
            if not sha:
                return None
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def read(stage_dir: Path, name: str = MANIFEST) -> dict | None:
    p = Path(stage_dir) / name
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None  # a torn write from a killed process counts as "not finished"


def write_atomic(path: Path, text: str) -> None:
    """Write via temp file + rename so a killed process never leaves half a file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    return str(o)


def write(stage_dir: Path, *, stage: str, arm: str | None, key: str, status: str, config: dict,
          inputs: dict[str, dict], outputs: Any = None, wall_s: float | None = None,
          error: str | None = None, started: float | None = None) -> dict:
    m = {
        "stage": stage,
        "arm": arm,
        "status": status,
        "key": key,
        "config": config,
        "inputs": inputs,
        "outputs": outputs,
        "git_commit": git_commit(),
        "versions": package_versions(),
        "host": os.uname().nodename,
        "started": started,
        "finished": time.time() if status in ("done", "failed") else None,
        "wall_s": wall_s,
        "error": error,
    }
    write_json(Path(stage_dir) / MANIFEST, m)
    return m
