"""Runner: skip finished stages, move changed ones aside, name what is missing, sweep folders."""

from __future__ import annotations

import dataclasses
import json

import pytest
from omegaconf import OmegaConf

from attninf.config import ConfigError, build, check
from attninf.context import MissingInput
from attninf.runner import run_pipeline, stage_dirs
from tests import toy_stages




_cfg = toy_stages.pipeline_cfg


def test_second_run_skips_finished_stages(tmp_path, toy):
    cfg = _cfg(tmp_path)
    run_pipeline(cfg)
    run_pipeline(cfg)
    assert toy == [("detect", None), ("score", None)]
    m = json.loads((tmp_path / "run/score/manifest.json").read_text())
    assert m["status"] == "done" and m["outputs"] == {"double": 6}
    assert m["inputs"]["detect"]["key"] == json.loads((tmp_path / "run/detect/manifest.json").read_text())["key"]
    assert (tmp_path / "run/score/config.yaml").exists()


def test_changed_upstream_config_reruns_downstream_and_keeps_old_outputs(tmp_path, toy):
    run_pipeline(_cfg(tmp_path))
    run_pipeline(_cfg(tmp_path, detect={"value": 5}))
    assert toy == [("detect", None), ("score", None)] * 2
    assert json.loads((tmp_path / "run/score/double.json").read_text()) == {"v": 10}
    olds = sorted(p.name for p in (tmp_path / "run").iterdir() if ".old-" in p.name)
    assert [o.split(".old-")[0] for o in olds] == ["detect", "score"]


def test_downstream_config_change_does_not_rerun_upstream(tmp_path, toy):
    run_pipeline(_cfg(tmp_path))
    run_pipeline(_cfg(tmp_path, score={"x": 2}))
    assert toy == [("detect", None), ("score", None), ("score", None)]


def test_missing_upstream_names_the_stage_to_run(tmp_path, toy):
    with pytest.raises(MissingInput, match=r"needs the outputs of 'detect'.*add 'detect' to stages"):
        run_pipeline(_cfg(tmp_path, stages=["score"]))


def test_failed_stage_is_recorded_and_resumed(tmp_path, toy):
    cfg = _cfg(tmp_path, fail_once=True)
    with pytest.raises(RuntimeError, match="boom"):
        run_pipeline(cfg)
    m = json.loads((tmp_path / "run/detect/manifest.json").read_text())
    assert m["status"] == "failed" and "boom" in m["error"]
    run_pipeline(cfg)
    assert json.loads((tmp_path / "run/detect/manifest.json").read_text())["status"] == "done"


def test_unknown_stage_is_a_config_error(tmp_path, toy):
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['scor'\]"):
        run_pipeline(_cfg(tmp_path, stages=["scor"]))


def test_sweep_folders_share_untouched_stages(tmp_path):
    cfg = OmegaConf.create({"run_dir": str(tmp_path), "arms": {"baseline": {"selection": None},
                                                              "ai": {"selection": "attention_influence"}}})
    dirs = stage_dirs(cfg, ["select.ratio=0.1", "wandb.mode=disabled"], multirun=True)
    assert dirs[("score", None)] == tmp_path / "score"
    assert dirs[("select", None)] == tmp_path / "select-select.ratio=0.1"
    assert dirs[("pretrain", "ai")] == tmp_path / "pretrain-select.ratio=0.1" / "ai"
    assert dirs[("eval", "baseline")].parent.name == "eval-select.ratio=0.1"
    plain = stage_dirs(cfg, ["select.ratio=0.1"], multirun=False)
    assert plain[("select", None)] == tmp_path / "select"


def test_long_sweep_tags_stay_short_and_distinct(tmp_path):
    cfg = OmegaConf.create({"run_dir": str(tmp_path), "arms": {}})
    long = "corpus.paths=[" + ",".join(f"shard-{i:05d}.jsonl" for i in range(30))
    a = stage_dirs(cfg, [long + ",a.jsonl]"], multirun=True)[("score", None)]
    b = stage_dirs(cfg, [long + ",b.jsonl]"], multirun=True)[("score", None)]
    assert a != b and len(a.name) <= 130 and len(b.name) <= 130


@dataclasses.dataclass
class _Cfg:
    fraction: float = 0.05
    name: str = "x"

    def validate(self):
        check(0 < self.fraction <= 1, "fraction", f"{self.fraction} outside (0, 1]")


def test_typed_config_rejects_unknown_keys_types_and_ranges():
    assert build(_Cfg, {"fraction": 0.5}, "heads").fraction == 0.5
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) heads.fractoin"):
        build(_Cfg, {"fractoin": 0.5}, "heads")
    with pytest.raises(ConfigError, match="heads"):
        build(_Cfg, {"fraction": "lots"}, "heads")
    with pytest.raises(ConfigError, match=r"heads.fraction: 1.5 outside \(0, 1\]"):
        build(_Cfg, {"fraction": 1.5}, "heads")


def test_second_run_with_another_config_refuses_naming_the_first(tmp_path, toy):
    import os

    from attninf.runner import run_dir_lock, run_key

    first = _cfg(tmp_path)
    run_pipeline(first)
    (tmp_path / "run").mkdir(exist_ok=True)
    with run_dir_lock(tmp_path / "run", run_key(first)):  # the first run, still going
        with pytest.raises(ConfigError, match=rf"run_dir=.*run: in use by pid {os.getpid()} .*"
                                              r"another config .*choose another run_dir"):
            run_pipeline(_cfg(tmp_path, detect={"value": 5}))
        assert not [p for p in (tmp_path / "run").iterdir() if ".old-" in p.name]  # nothing moved
        run_pipeline(_cfg(tmp_path, stages=["score"]))  # same config (another rank/stage): joins
    assert toy == [("detect", None), ("score", None)]


def test_temp_files_of_killed_writes_are_removed_on_the_next_run(tmp_path, toy):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    run_pipeline(_cfg(tmp_path))
    stale = [tmp_path / f"run/score/.shard-00000.parquet.tmp{dead}", tmp_path / f"run/.config.yaml.tmp{dead}"]
    for p in stale:
        p.write_text("half")
    keep = tmp_path / "run/score/notes.tmp1"  # not our pattern
    keep.write_text("x")
    run_pipeline(_cfg(tmp_path))
    assert [p for p in stale if p.exists()] == [] and keep.exists()


def test_all_sections_are_validated_whichever_stages_run(tmp_path, toy):
    with pytest.raises(ConfigError, match=r"heads.fraction: 1.5 is outside \(0, 1\]"):
        run_pipeline(_cfg(tmp_path, stages=["detect"], heads={"fraction": 1.5}))
    with pytest.raises(ConfigError, match=r"select.ratio: must be in \(0, 1\]"):
        run_pipeline(_cfg(tmp_path, stages=["detect"], select={"ratio": 1.5}))
    assert toy == []


def test_run_dir_that_is_a_file_is_one_config_line(tmp_path, toy):
    (tmp_path / "run").write_text("x")
    with pytest.raises(ConfigError, match=r"run_dir=.*run: is a file, not a folder"):
        run_pipeline(_cfg(tmp_path))
