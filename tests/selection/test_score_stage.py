"""The score and select stages end to end on a tiny model: shards, skips, ranks, kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from attninf.context import Incomplete
from attninf.runner import run_pipeline
from tests.helpers import ROOT, score_corpus, score_rows, score_stage_cfg


def test_score_and_select_stages(tmp_path, tiny_model_dir):
    paths = score_corpus(tmp_path)
    run_pipeline(score_stage_cfg(tmp_path, tiny_model_dir, paths))
    sd = tmp_path / "run/score"
    # shards are parts of the data: each 30-row file in row ranges of 7 (7, 7, 7, 7, 2) -> 10
    assert sorted(p.name for p in sd.glob("shard-*.parquet")) == [f"shard-{i:05d}.parquet" for i in range(10)]
    plan = json.loads((sd / "corpus_plan.json").read_text())["parts"]
    assert [(p["file"], p["first_row"], p["rows"]) for p in plan] == \
        [(f, a, min(7, 30 - a)) for f in paths for a in range(0, 30, 7)]
    t = pq.read_table(min(sd.glob("shard-*.parquet")))
    assert [f.name for f in t.schema][:3] == ["doc_id", "domain", "n_tokens"]
    assert str(t.schema.field("n_tokens").type) == "int64" and str(t.schema.field("score").type) == "double"
    stats = json.loads((sd / "stats.json").read_text())
    assert stats["rows"] == 60 and stats["scored"] == 54
    assert stats["skipped"] == {"empty": 2, "undecodable": 2, "too_short": 2}
    first = json.loads((sd / "shard-00000.stats.json").read_text())
    assert first["skip_examples"]["undecodable"] == [f"{paths[0]}:5"]
    rows = score_rows(sd)
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

    paths = score_corpus(tmp_path, n=10)
    run_pipeline(score_stage_cfg(tmp_path, tiny_model_dir, paths, max_tokens=4096, batch_tokens=4096))
    rows = {r[0]: r for r in score_rows(tmp_path / "run/score")}
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
    paths = score_corpus(tmp_path, n=12)
    cfg = score_stage_cfg(tmp_path, tiny_model_dir, paths)
    cfg.stages = ["score"]
    monkeypatch.setenv("ATTNINF_WORLD_SIZE", "2")
    monkeypatch.setenv("ATTNINF_RANK", "0")
    with pytest.raises(Incomplete, match="worker 0/2 did its share; 2 of 4 parts still missing"):
        run_pipeline(cfg)
    sd = tmp_path / "run/score"
    # a contiguous half of the parts (by bytes): the first file's two row ranges
    assert sorted(p.name for p in sd.glob("shard-*.parquet")) == ["shard-00000.parquet", "shard-00001.parquet"]
    stats = [json.loads(p.read_text()) for p in sd.glob("shard-*.stats.json")]
    assert {st["part"]["file"] for st in stats} == {paths[0]}  # task 0 opened only the first file
    assert all(st["files_opened"] == 1 and st["rank"] == 0 for st in stats)
    monkeypatch.setenv("ATTNINF_RANK", "1")
    run_pipeline(cfg)
    assert json.loads((sd / "manifest.json").read_text())["status"] == "done"
    assert json.loads((sd / "stats.json").read_text())["rows"] == 24


_RUNNER = ("import sys; from omegaconf import OmegaConf; from attninf.runner import run_pipeline; "
           "run_pipeline(OmegaConf.load(sys.argv[1]))")


@pytest.mark.slow
def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path, tiny_model_dir):
    """A real process SIGKILLed mid-run, then re-run, gives exactly the uninterrupted rows."""
    paths = score_corpus(tmp_path, n=60)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    cfg = score_stage_cfg(tmp_path, tiny_model_dir, paths, run="killed", shard_size=5)
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

    clean = score_stage_cfg(tmp_path, tiny_model_dir, paths, run="clean", shard_size=5)
    clean.stages = ["score"]
    run_pipeline(clean)
    resumed, straight = score_rows(sd), score_rows(tmp_path / "clean/score")
    assert len(resumed) == len({r[0] for r in resumed}) == 120 - 6
    assert resumed == straight
