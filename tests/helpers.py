"""Helpers shared by test modules: paths, small synthetic corpora and configs of tiny runs.

Fixtures live in conftest.py files; plain functions and constants live here, so no test module
imports another.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def attninf(args: list[str], env: dict, cwd: Path, **kw) -> subprocess.CompletedProcess:
    """`python -m attninf.cli ARGS` as a user runs it; fails the test with the output's tail."""
    p = subprocess.run([sys.executable, "-m", "attninf.cli", *args], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=kw.pop("timeout", 900), **kw)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p


# --- the score and select stages (tests/selection/test_score_stage.py, tests/attninf/test_integrity.py)

_SCORE_WORDS = ["alpha", "beta", "gamma", "delta", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "def", "return", "x", "y", "z", "retrieval", "heads", "copy", "tokens", "photosynthesis", "energy"]


def score_corpus(tmp_path: Path, n: int = 30) -> list[str]:
    """Two jsonl files, two domains, a few bad rows in known places."""
    paths = []
    for f in range(2):
        lines = []
        for i in range(n):
            k = f * n + i
            text = " ".join(_SCORE_WORDS[(k * 7 + j * 3) % len(_SCORE_WORDS)] for j in range(5 + (k * 13) % 40))
            lines.append(json.dumps({"id": f"doc{k}", "domain": ["web", "math"][k % 2], "text": text}).encode())
        lines[3] = json.dumps({"id": f"empty{f}", "domain": "web", "text": ""}).encode()
        lines[5] = b'{"id": "bytes%d", "domain": "web", "text": "\xff\xfe"}' % f
        lines[7] = json.dumps({"id": f"short{f}", "domain": "math", "text": "a"}).encode()
        p = tmp_path / f"part{f}.jsonl"
        p.write_bytes(b"\n".join(lines) + b"\n")
        paths.append(str(p))
    return paths


def score_stage_cfg(tmp_path, model_dir, paths, run="run", **score):
    """A score + select run on a tiny model: real conf/ defaults, small shards and batches."""
    root = CONF
    cfg = OmegaConf.create({
        "run_dir": str(tmp_path / run), "stages": ["score", "select"], "seed": 0, "arms": {},
        "wandb": {"mode": "disabled"},
        "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu", "attn_impl": "sdpa"},
        "heads": {**OmegaConf.to_container(OmegaConf.load(root / "heads/retrieval.yaml")),
                  "set": "list", "list": [[1, 0], [2, 3]]},
        "corpus": {**OmegaConf.to_container(OmegaConf.load(root / "corpus/jsonl.yaml")), "paths": paths},
        "score": {**OmegaConf.to_container(OmegaConf.load(root / "score/default.yaml")),
                  "shard_size": 7, "progress": False, "max_tokens": 24, "batch_tokens": 64,
                  **score},
        "select": {**OmegaConf.to_container(OmegaConf.load(root / "select/paper.yaml")), "examples": 1},
    })
    return cfg


def score_rows(score_dir: Path) -> list[tuple]:
    """Every row of the score shards, in shard order."""
    out = []
    for p in sorted(score_dir.glob("shard-*.parquet")):
        out.extend(tuple(r.values()) for r in pq.read_table(p).to_pylist())
    return out


# --- the detect and mirror stages (tests/selection/test_detect.py, test_mirror.py)

def detect_cfg(run_dir, model_dir, **detect):
    """A detect-only run on a tiny model (3 teacher-forced probes); mirror settings for the mirror stage."""
    return OmegaConf.create({
        "run_dir": str(run_dir), "stages": ["detect"], "seed": 0, "experiment_name": "t",
        "arms": {}, "wandb": {"mode": "disabled"},
        "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu", "attn_impl": "sdpa"},
        "detect": {"num_probes": 3, "max_tokens": 1024, "max_value_tokens": 80, "mode": "teacher_forced",
                   **detect},
        "heads": {"set": "retrieval", "fraction": 0.1},
        "mirror": {"num_probes": 2, "random_draws": 2},
    })


# --- pretraining (tests/pretrain/)

@dataclass(frozen=True)
class Doc:
    """A corpus document as pretrain.indexed reads it (doc_id, domain, text, skip reason)."""

    doc_id: str
    domain: str
    text: str
    skip: str | None = None


_PRETRAIN_WORDS = ("the quick brown fox jumps over the lazy dog retrieval heads copy tokens from context "
                   "def add return x real number energy plants light").split()


def make_docs(n_per_domain=60, seed=0):
    """Seeded random-word documents in three domains, plus one empty (skipped) document."""
    rng = np.random.default_rng(seed)
    docs = []
    for dom in ("web", "code", "math"):
        for i in range(n_per_domain):
            k = int(rng.integers(10, 120))
            docs.append(Doc(f"{dom}:{i}", dom, " ".join(rng.choice(_PRETRAIN_WORDS, size=k))))
    docs.append(Doc("web:empty", "web", "", skip="empty"))
    return docs


# --- training ranks (tests/pretrain) ------------------------------------------------------------

def launch_ranks(stage: Path, n: int, nodes: int = 1) -> str:
    """The pretrain stage's ranks as the local executor starts them: n per node, nodes 'nodes'."""
    from attninf.dist import spawn_ranks

    return spawn_ranks("pretrain.launch", stage, nodes, n)
