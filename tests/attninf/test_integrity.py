"""Inputs checked against their manifests, skips with a ceiling, bad input answered before compute.

Each test is a finding of a hostile review: a deleted shard silently shrank the selection, a
torn manifest let shards of another config be reused, an all-skipped corpus finished `done`,
duplicate ids surfaced only after scoring, an empty corpus looped, errors were tracebacks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from attninf.config import ConfigError
from attninf.context import InputError
from attninf.runner import run_pipeline
from tests.helpers import ROOT, score_corpus, score_rows, score_stage_cfg


def _ai_rows(run: Path) -> list[tuple]:
    t = pq.read_table(run / "select/selected.parquet").to_pylist()
    return sorted((r["doc_id"], r["method"]) for r in t)


def test_deleted_shard_is_named_by_select_and_remade_by_score(tmp_path, tiny_model_dir):
    paths = score_corpus(tmp_path, n=12)
    run_pipeline(score_stage_cfg(tmp_path, tiny_model_dir, paths, run="whole"))
    before = _ai_rows(tmp_path / "whole")
    cfg = score_stage_cfg(tmp_path, tiny_model_dir, paths)
    cfg.stages = ["score"]
    run_pipeline(cfg)
    sd = tmp_path / "run/score"
    gone = sd / "shard-00001.parquet"
    gone.unlink()
    cfg.stages = ["select"]
    with pytest.raises(InputError, match=r"shard-00001\.parquet: listed in .*plan\.json but missing; "
                                         r"re-run with stages=\[score,select\]"):
        run_pipeline(cfg)
    cfg.stages = ["score", "select"]
    run_pipeline(cfg)  # the runner's check finds the hole; score re-makes only that shard
    assert gone.exists() and _ai_rows(tmp_path / "run") == before


def test_altered_shard_is_refused(tmp_path, tiny_model_dir):
    paths = score_corpus(tmp_path, n=12)
    cfg = score_stage_cfg(tmp_path, tiny_model_dir, paths)
    cfg.stages = ["score"]
    run_pipeline(cfg)
    p = tmp_path / "run/score/shard-00000.parquet"
    t = pq.read_table(p)
    pq.write_table(t.slice(0, 2), p)  # a shorter table under the same name
    cfg.stages = ["select"]
    with pytest.raises(InputError, match=r"shard-00000\.parquet: content differs from the digest"):
        run_pipeline(cfg)


def test_torn_manifest_and_new_config_never_reuse_old_shards(tmp_path, tiny_model_dir):
    paths = score_corpus(tmp_path, n=12)
    cfg = score_stage_cfg(tmp_path, tiny_model_dir, paths)
    cfg.stages = ["score"]
    run_pipeline(cfg)
    sd = tmp_path / "run/score"
    assert max(r[2] for r in score_rows(sd)) <= 24
    m = (sd / "manifest.json").read_text()
    (sd / "manifest.json").write_text(m[: len(m) // 2])  # killed mid-write: unreadable
    cfg.score.max_tokens = 48
    run_pipeline(cfg)
    rows = score_rows(sd)
    assert max(r[2] for r in rows) > 24  # rescored at the new length, not the old shards
    key = json.loads((sd / "manifest.json").read_text())["key"]
    assert {json.loads(p.read_text())["key"] for p in sd.glob("shard-*.stats.json")} == {key}


def test_all_rows_skipped_fails_with_the_skip_table(tmp_path, tiny_model_dir):
    paths = score_corpus(tmp_path, n=12)
    cfg = score_stage_cfg(tmp_path, tiny_model_dir, paths)
    cfg.corpus.text_field = "body"  # a typo: every row lacks it
    with pytest.raises(InputError, match=r"score: 24 of 24 rows skipped \(100% > score.max_skip_share"
                                         r"=0.5\): .*e\.g\. .*part0\.jsonl:0.*corpus\.text_field='body'"):
        run_pipeline(cfg)
    assert not (tmp_path / "run/select").exists()  # select never ran on an empty score


def test_skip_share_above_the_ceiling_fails_below_passes(tmp_path, tiny_model_dir, caplog):
    paths = score_corpus(tmp_path, n=12)  # 6 of 24 rows are bad: 25%
    with pytest.raises(InputError, match=r"6 of 24 rows skipped \(25% > score.max_skip_share=0.2\)"):
        run_pipeline(score_stage_cfg(tmp_path, tiny_model_dir, paths, max_skip_share=0.2))
    caplog.set_level("INFO")
    run_pipeline(score_stage_cfg(tmp_path, tiny_model_dir, paths, run="ok"))
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("score: 24 rows")]
    assert line and "18 scored, 6 skipped: " in line[0] and "undecodable 2" in line[0]


def test_duplicate_ids_are_found_before_scoring_with_both_rows(tmp_path, tiny_model_dir):
    paths = score_corpus(tmp_path, n=12)
    lines = Path(paths[0]).read_bytes().splitlines()
    lines[2] = lines[1]  # doc1 twice, rows 1 and 2
    Path(paths[0]).write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(InputError, match=rf"doc id 'doc1' at {paths[0]}:1 and again at {paths[0]}:2"):
        run_pipeline(score_stage_cfg(tmp_path, tiny_model_dir, paths))
    assert list((tmp_path / "run/score").glob("shard-*.parquet")) == []  # nothing was scored


def test_empty_corpus_is_an_error_not_a_loop(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match=r"corpus: no documents in .*empty\.jsonl"):
        run_pipeline(score_stage_cfg(tmp_path, tiny_model_dir, [str(empty)]))


def test_missing_corpus_file_is_a_config_error_before_any_stage(tmp_path, tiny_model_dir):
    cfg = score_stage_cfg(tmp_path, tiny_model_dir, [str(tmp_path / "nope.jsonl")])
    with pytest.raises(ConfigError, match=r"corpus.paths: corpus file not found: .*nope\.jsonl"):
        run_pipeline(cfg)
    assert not (tmp_path / "run/score").exists()


def test_bad_select_ratio_is_refused_before_scoring(tmp_path, tiny_model_dir):
    cfg = score_stage_cfg(tmp_path, tiny_model_dir, score_corpus(tmp_path, n=12))
    cfg.select.ratio = 1.5
    with pytest.raises(ConfigError, match=r"select.ratio: must be in \(0, 1\]"):
        run_pipeline(cfg)
    assert not (tmp_path / "run/score").exists()


def test_model_path_without_a_model_is_one_config_line(tmp_path, tiny_model_dir):
    cfg = score_stage_cfg(tmp_path, tiny_model_dir, score_corpus(tmp_path, n=12))
    (tmp_path / "notamodel").mkdir()
    cfg.model.path = str(tmp_path / "notamodel")
    with pytest.raises(ConfigError, match=r"model.path: .*notamodel is a folder without config.json"):
        run_pipeline(cfg)


def _cli(tmp_path, *args, env=None):
    import os

    e = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", **(env or {})}
    e.pop("HYDRA_FULL_ERROR", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "attninf.cli", *args,
                           f"hydra.run.dir={tmp_path / 'hydra'}"], env=e, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)


def test_cli_expected_failures_are_one_line_exit_2(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    p = _cli(tmp_path, "stages=[select]", f"run_dir={f}")
    out = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert p.returncode == 2, out
    assert len(out) == 1 and "ERROR" in out[0] and "is a file, not a folder" in out[0], out
    p = _cli(tmp_path, "stages=[detect]", "heads.fraction=1.5", f"run_dir={tmp_path / 'r'}")
    out = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert p.returncode == 2 and len(out) == 1 and "heads.fraction: 1.5 is outside (0, 1]" in out[0], out
    assert not (tmp_path / "r/detect").exists()
    p = _cli(tmp_path, "--debug", "stages=[select]", f"run_dir={f}")
    assert p.returncode != 2 and "Traceback" in p.stdout + p.stderr  # asked for: the traceback


def test_head_list_outside_the_model_is_refused_before_loading(tmp_path, tiny_model_dir):
    cfg = score_stage_cfg(tmp_path, tiny_model_dir, score_corpus(tmp_path, n=12))
    n_l = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    cfg.heads.list = [[1, 0], [n_l, 0]]
    with pytest.raises(ConfigError, match=rf"heads.list: head \[{n_l}, 0\] is outside the model"):
        run_pipeline(cfg)
    assert not (tmp_path / "run/score").exists()


def test_unreadable_corpus_file_is_an_input_error_naming_it(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match=r"bad\.parquet: not a readable parquet file"):
        run_pipeline(score_stage_cfg(tmp_path, tiny_model_dir, [str(bad)]))
