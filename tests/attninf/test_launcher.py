"""Hydra launcher configs: the Slurm one renders the sbatch header we mean (through submitit's own
renderer), the local one runs a real multirun as separate submitit jobs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"


def _absent_defaults() -> list[str]:
    """`~group` for root defaults whose option file does not exist (yet): these tests exercise
    the launcher only, so they must not depend on which stage configs have landed."""
    out = []
    for d in OmegaConf.load(CONF / "config.yaml").defaults:
        if isinstance(d, str):
            continue
        ((group, option),) = d.items()
        if option is not None and not (CONF / group / f"{option}.yaml").exists():
            out.append(f"~{group}")
    return out


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides + _absent_defaults(), return_hydra_config=True)


def test_slurm_launcher_renders_sbatch_with_requeue(tmp_path, monkeypatch):
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf

    monkeypatch.setenv("ATTNINF_SLURM_PARTITION", "gpu-h100")
    monkeypatch.setenv("ATTNINF_SLURM_ACCOUNT", "proj42")
    cfg = _compose(["hydra/launcher=slurm", "hydra.launcher.timeout_min=600"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    # every key is one the plugin knows, with the right type
    OmegaConf.merge(OmegaConf.structured(SlurmQueueConf), OmegaConf.to_container(launcher))

    # Render the sbatch file exactly as the plugin would (same parameter mapping as
    # BaseSubmititLauncher.launch). submitit refuses to build a Slurm executor without `srun` on
    # PATH; a no-op one suffices because nothing is submitted.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_")
    params.pop("submitit_folder")
    ex = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "sub",
                               slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    ex.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    text = ex._executor._make_submission_file_text("python -c pass", "uid")
    for line in ["--partition=gpu-h100", "--account=proj42", "--gpus-per-node=8", "--nodes=1",
                 "--time=600", "--requeue", "--signal=USR2@300", "--open-mode=append"]:
        assert f"#SBATCH {line}" in text, line
    assert "export TOKENIZERS_PARALLELISM=false" in text
    assert ex._executor.max_num_timeout == 5  # timeouts/preemptions are requeued, runner resumes


def test_slurm_launcher_leaves_site_values_unset_without_env(monkeypatch):
    for k in ("ATTNINF_SLURM_PARTITION", "ATTNINF_SLURM_ACCOUNT", "ATTNINF_SLURM_QOS"):
        monkeypatch.delenv(k, raising=False)
    launcher = _compose(["hydra/launcher=slurm"]).hydra.launcher
    assert launcher.partition is None and launcher.account is None and launcher.qos is None


def test_local_launcher_multirun_runs_each_point_as_a_job(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "attninf.cli", "-m", "hydra/launcher=local", "stages=[]",
           f"run_dir={run_dir}", "seed=0,1", *_absent_defaults()]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    (sweep,) = list((run_dir / ".hydra").glob("multirun-*"))
    jobs = sorted(d.name for d in sweep.iterdir() if d.is_dir() and not d.name.startswith("."))
    assert jobs == ["0", "1"]
    seeds = [OmegaConf.load(sweep / j / ".hydra" / "config.yaml").seed for j in jobs]
    assert seeds == [0, 1]
    # each point ran as its own submitit job (a result pickle per job)
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2


def test_local_launcher_reports_a_failing_job(tmp_path):
    cmd = [sys.executable, "-m", "attninf.cli", "-m", "hydra/launcher=local", "stages=[no_such_stage]",
           f"run_dir={tmp_path / 'run'}", "seed=0,1", *_absent_defaults()]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "no_such_stage" in p.stdout + p.stderr


@pytest.mark.parametrize("preset", ["paper_7b", "paper_1b_proxy"])
def test_paper_presets_are_global_packages_with_a_cost_section(preset):
    from tools.cost import estimate, from_mapping

    path = CONF / "experiment" / f"{preset}.yaml"
    assert path.read_text().startswith("# @package _global_")
    cfg = OmegaConf.load(path)
    assert set(cfg.arms) >= {"baseline", "attention_influence", "random"}
    rows = estimate(from_mapping(cfg.cost))
    assert [r["what"].split()[0] for r in rows] == ["scoring", "pretraining"]


# --- slurm/score_array.sbatch, run as plain bash with the Slurm array variables set ---------------

SBATCH = ROOT / "slurm" / "score_array.sbatch"


def _array_env(task: int, count: int, **extra) -> dict:
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "ATTNINF_REPO": str(ROOT),
            "ATTNINF_PYTHON": sys.executable, "SLURM_ARRAY_JOB_ID": "4242",
            "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "0",
            "SLURM_ARRAY_TASK_COUNT": str(count), **extra}


def test_score_array_refuses_a_stage_that_was_not_started(tmp_path):
    p = subprocess.run(["bash", str(SBATCH), str(tmp_path / "run")], env=_array_env(0, 2), check=False,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "no manifest" in p.stdout and "stages=[score]" in p.stdout


@pytest.mark.slow
def test_score_array_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir):
    """Three simulated array tasks score a tiny corpus: the first starts the stage via the runner,
    the others run attninf.worker; every shard is scored once, by the rank that owns it, and the
    next runner call marks the stage done. Uses the real scorer (selection.score)."""
    import json

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "domain": "ab"[i % 2],
                                          "text": "Retrieval heads copy tokens. " * (i + 2)}) + "\n"
                              for i in range(14)))
    run_dir = tmp_path / "run"
    defaults = [o for o in _absent_defaults() if o not in ("~score", "~corpus")]
    ov = ["~corpus", "+corpus.kind=jsonl", f"+corpus.paths=[{corpus}]", f"model.path={tiny_model_dir}",
          "model.dtype=float32", "model.device=cpu", "heads.set=list", "heads.list=[[0,0],[1,1]]",
          "~score", "+score.shard_size=3", "+score.progress=false", *defaults]
    procs = [subprocess.Popen(["bash", str(SBATCH), str(run_dir), *ov],
                              env=_array_env(t, 3, WAIT_MIN="3", POLL_S="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for t in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    stage = run_dir / "score"
    owners = {int(f.name[6:11]): json.loads(f.read_text())["rank"]
              for f in stage.glob("shard-*.stats.json")}
    assert owners == {i: i % 3 for i in range(5)}  # 14 rows / 3 per shard = 5 shards
    p = subprocess.run([sys.executable, "-m", "attninf.cli", "stages=[score]", f"run_dir={run_dir}", *ov],
                       env=_array_env(0, 1), capture_output=True, text=True, timeout=120, cwd=ROOT,
                       check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads((stage / "manifest.json").read_text())
    assert m["status"] == "done" and m["outputs"]["scored"] == 14


@pytest.mark.parametrize("preset", ["paper_7b", "paper_1b_proxy"])
def test_paper_presets_compose_and_validate(preset):
    """The presets compose with the real config groups and every stage section they touch builds
    into its typed config (unknown or mistyped keys fail here, not on the cluster)."""
    from hydra import compose, initialize_config_dir

    from attninf.config import build
    from eval.config import EvalConfig
    from pretrain.train import PretrainConfig
    from selection.corpora import CorpusConfig
    from selection.heads import HeadsConfig
    from selection.score import ScoreConfig
    from selection.select import SelectConfig

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={preset}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    for cls, key in [(ScoreConfig, "score"), (CorpusConfig, "corpus"), (SelectConfig, "select"),
                     (HeadsConfig, "heads"), (PretrainConfig, "pretrain"), (EvalConfig, "eval")]:
        build(cls, cfg[key], key)
    assert cfg.corpus.kind == "hf" and cfg.select.ratio == 0.2
    assert cfg.cost.score_max_tokens == cfg.score.max_tokens
