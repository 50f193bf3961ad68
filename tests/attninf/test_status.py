"""cluster=slurm without a scheduler, the cluster config's validation, and `attninf-status` on local
runs (manifests only). The live-Slurm checks are in test_cluster.py (marker `slurm`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from attninf import status
from attninf.config import ConfigError
from attninf.runner import run_pipeline
from attninf.lifecycle import plan_units
from attninf.submit import _expand_tasks, cluster_config
from tests import toy_stages

ROOT = Path(__file__).resolve().parents[2]




_cfg = toy_stages.pipeline_cfg


def test_cluster_slurm_without_slurm_is_one_line_exit_2(tmp_path):
    """No sbatch on PATH: one line saying so, exit 2, nothing submitted, no traceback."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty), "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    p = subprocess.run([sys.executable, "-m", "attninf.cli", "cluster=slurm", "stages=[detect]",
                        f"run_dir={tmp_path / 'run'}"], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "no Slurm here" in lines[0] and "Traceback" not in p.stderr, lines
    assert not (tmp_path / "run" / "cluster" / "jobs.json").exists()


def test_cluster_config_is_validated_at_the_edge():
    cfg = OmegaConf.create({"cluster": {"kind": "slurm", "resources": {"cpus_per_task": 2},
                                        "stages": {"score": {"cpus": 4}}}})
    with pytest.raises(ConfigError, match=r"cluster.stages.score: unknown key\(s\) \['cpus'\]"):
        cluster_config(cfg)
    with pytest.raises(ConfigError, match="cluster.stages: unknown stage 'scor'"):
        cluster_config(OmegaConf.create({"cluster": {"kind": "slurm", "stages": {"scor": {}}}}))
    with pytest.raises(ConfigError, match="cluster.kind"):
        cluster_config(OmegaConf.create({"cluster": {"kind": "pbs"}}))
    with pytest.raises(ConfigError, match=r"^cluster.stages.score.array_tasks: 0 must be >= 1"):
        cluster_config(OmegaConf.create({"cluster": {"kind": "slurm", "stages": {"score": {"array_tasks": 0}}}}))
    with pytest.raises(ConfigError, match=r"^unknown config key\(s\) cluster.partitions;"):
        cluster_config(OmegaConf.create({"cluster": {"partitions": "gpu"}}))
    cc = cluster_config(OmegaConf.create({"cluster": {"kind": "slurm", "resources": {"cpus_per_task": 2, "mem_gb": 8},
                                                      "stages": {"score": {"cpus_per_task": 4}}}}))
    assert (cc.for_stage("score").cpus_per_task, cc.for_stage("score").mem_gb) == (4, 8)
    assert cc.for_stage("detect").cpus_per_task == 2


def test_composed_slurm_presets_validate():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name in ("local", "slurm", "slurm_onenode"):
            cfg = compose("config", overrides=[f"cluster={name}"])
            cc = cluster_config(cfg)
            assert cc.kind == ("local" if name == "local" else "slurm")
    assert cluster_config(cfg).for_stage("pretrain").gpus_per_node == 0  # one-node CPU preset


def test_array_task_ranges_expand():
    assert _expand_tasks("0-3%2") == [0, 1, 2, 3]
    assert _expand_tasks("1,3-4") == [1, 3, 4]
    assert _expand_tasks("7") == [7]


def test_plan_keys_equal_the_keys_a_local_run_writes(tmp_path, toy):
    """Keys chained through stages that have not run yet are the keys the jobs will write."""
    from attninf.runner import stage_dirs

    cfg = _cfg(tmp_path)
    planned = plan_units(cfg, ["detect", "score"], stage_dirs(cfg, [], False))
    run_pipeline(cfg)
    for name in ("detect", "score"):
        m = json.loads((tmp_path / "run" / name / "manifest.json").read_text())
        assert planned[(name, None)].key == m["key"], name


def test_status_of_a_local_run_from_manifests(tmp_path, toy, capsys):
    cfg = _cfg(tmp_path, fail_once=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    assert status.main([str(tmp_path / "run")]) == 1
    assert [r["state"] for r in status.stage_rows(tmp_path / "run")] == ["not started", "not started"]
    with pytest.raises(RuntimeError, match="boom"):
        run_pipeline(cfg)
    rows = status.stage_rows(tmp_path / "run")
    assert [r["state"] for r in rows] == ["failed", "not started"]
    assert "boom" in rows[0]["tail"][0]
    capsys.readouterr()
    assert status.main([str(tmp_path / "run")]) == 1
    assert "boom" in capsys.readouterr().out
    run_pipeline(cfg)
    capsys.readouterr()  # the run's own terminal summary is not status output
    assert status.main([str(tmp_path / "run"), "--wait", "--poll", "0.1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[:2] for ln in out[1:]] == [["detect", "done"], ["score", "done"]]


def test_status_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert status.main([str(tmp_path)]) == 2
    assert "not an attninf run folder" in capsys.readouterr().err
