"""The score and select stages end to end on a tiny model: shards, skips, ranks, kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from attninf.context import Incomplete
from attninf.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["alpha", "beta", "gamma", "delta", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "def", "return", "x", "y", "z", "retrieval", "heads", "copy", "tokens", "photosynthesis", "energy"]


def _corpus(tmp_path: Path, n: int = 30) -> list[str]:
    """Two jsonl files, two domains, a few bad rows in known places."""
    paths = []
    for f in range(2):
        lines = []
        for i in range(n):
            k = f * n + i
            text = " ".join(WORDS[(k * 7 + j * 3) % len(WORDS)] for j in range(5 + (k * 13) % 40))
            lines.append(json.dumps({"id": f"doc{k}", "domain": ["web", "math"][k % 2], "text": text}).encode())
        lines[3] = json.dumps({"id": f"empty{f}", "domain": "web", "text": ""}).encode()
        lines[5] = b'{"id": "bytes%d", "domain": "web", "text": "\xff\xfe"}' % f
        lines[7] = json.dumps({"id": f"short{f}", "domain": "math", "text": "a"}).encode()
        p = tmp_path / f"part{f}.jsonl"
        p.write_bytes(b"\n".join(lines) + b"\n")
        paths.append(str(p))
    return paths


def _cfg(tmp_path, model_dir, paths, run="run", **score):
    root = ROOT / "conf"
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


def _rows(score_dir: Path) -> list[tuple]:
    out = []
    for p in sorted(score_dir.glob("shard-*.parquet")):
        out.extend(tuple(r.values()) for r in pq.read_table(p).to_pylist())
    return out


def test_score_and_select_stages(tmp_path, tiny_model_dir):
    paths = _corpus(tmp_path)
    run_pipeline(_cfg(tmp_path, tiny_model_dir, paths))
    sd = tmp_path / "run/score"
    assert sorted(p.name for p in sd.glob("shard-*.parquet")) == [f"shard-{i:05d}.parquet" for i in range(9)]
    t = pq.read_table(min(sd.glob("shard-*.parquet")))
    assert [f.name for f in t.schema][:3] == ["doc_id", "domain", "n_tokens"]
    assert str(t.schema.field("n_tokens").type) == "int64" and str(t.schema.field("score").type) == "double"
    stats = json.loads((sd / "stats.json").read_text())
    assert stats["rows"] == 60 and stats["scored"] == 54
    assert stats["skipped"] == {"empty": 2, "undecodable": 2, "too_short": 2}
    first = json.loads((sd / "shard-00000.stats.json").read_text())
    assert first["skip_examples"]["undecodable"] == [f"{paths[0]}:5"]
    rows = _rows(sd)
    assert len({r[0] for r in rows}) == 54 and max(r[2] for r in rows) <= 24
    assert all(abs(r[6] - (r[5] - r[4]) / r[4]) < 1e-12 for r in rows)
    sel = pq.read_table(tmp_path / "run/select/selected.parquet").to_pylist()
    summ = json.loads((tmp_path / "run/select/summary.json").read_text())
    ai = [r for r in sel if r["method"] == "attention_influence"]
    assert {r["domain"] for r in ai} == {"web", "math"}
    for dom in ("web", "math"):
        n = summ["domains"][dom]["documents"]
        assert summ["methods"]["attention_influence"][dom]["selected"] == -(-n // 5)  # ceil(0.2 n)
    assert (tmp_path / "run/select/scores_by_domain.png").exists()
    assert "top" in (tmp_path / "run/select/examples.md").read_text()


def test_fp32_fast_scores_equal_naive_reference(tmp_path, tiny_model_dir):
    """The stage's rows against the naive reference (fresh fp32 eager model, two passes)."""
    from selection import scoring
    from selection.models import ModelConfig, load_selector

    paths = _corpus(tmp_path, n=10)
    run_pipeline(_cfg(tmp_path, tiny_model_dir, paths, max_tokens=4096, batch_tokens=4096))
    rows = {r[0]: r for r in _rows(tmp_path / "run/score")}
    ref, tok = load_selector(ModelConfig(path=str(tiny_model_dir), dtype="float32", device="cpu",
                                         attn_impl="eager"))
    from selection.corpora import CorpusConfig, iter_documents

    docs = [d for d in iter_documents(CorpusConfig(paths=paths)) if d.doc_id in rows]
    toks = [e[0] for e in scoring.encode(tok, [d.text for d in docs], 4096, "auto")]
    nb, nm = scoring.naive_losses(ref, toks, [(1, 0), (2, 3)])
    for d, b, m in zip(docs, nb, nm):
        r = rows[d.doc_id]
        assert abs(r[4] - b) < 1e-5 and abs(r[5] - m) < 1e-5
        assert abs(r[6] - (m - b) / b) < 1e-5


def test_ranks_share_shards_and_last_one_finishes(tmp_path, tiny_model_dir, monkeypatch):
    paths = _corpus(tmp_path, n=12)
    cfg = _cfg(tmp_path, tiny_model_dir, paths)
    cfg.stages = ["score"]
    monkeypatch.setenv("ATTNINF_WORLD_SIZE", "2")
    monkeypatch.setenv("ATTNINF_RANK", "0")
    with pytest.raises(Incomplete, match="rank 0/2"):
        run_pipeline(cfg)
    sd = tmp_path / "run/score"
    assert sorted(p.name for p in sd.glob("shard-*.parquet")) == ["shard-00000.parquet", "shard-00002.parquet"]
    monkeypatch.setenv("ATTNINF_RANK", "1")
    run_pipeline(cfg)
    assert json.loads((sd / "manifest.json").read_text())["status"] == "done"
    assert json.loads((sd / "stats.json").read_text())["rows"] == 24


_RUNNER = ("import sys; from omegaconf import OmegaConf; from attninf.runner import run_pipeline; "
           "run_pipeline(OmegaConf.load(sys.argv[1]))")


@pytest.mark.slow
def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path, tiny_model_dir):
    """A real process SIGKILLed mid-run, then re-run, gives exactly the uninterrupted rows."""
    paths = _corpus(tmp_path, n=60)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    cfg = _cfg(tmp_path, tiny_model_dir, paths, run="killed", shard_size=5)
    cfg.stages = ["score"]
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(OmegaConf.to_yaml(cfg))
    sd = tmp_path / "killed/score"
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER, str(cfg_path)], env=env, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(sd.glob("shard-*.parquet"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(sd.glob("shard-*.parquet")))
    assert 0 < done_before < 24, "the kill must land mid-run for this test to mean anything"
    subprocess.run([sys.executable, "-c", _RUNNER, str(cfg_path)], env=env, cwd=ROOT, check=True)

    clean = _cfg(tmp_path, tiny_model_dir, paths, run="clean", shard_size=5)
    clean.stages = ["score"]
    run_pipeline(clean)
    resumed, straight = _rows(sd), _rows(tmp_path / "clean/score")
    assert len(resumed) == len({r[0] for r in resumed}) == 120 - 6
    assert resumed == straight
