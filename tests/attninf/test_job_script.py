"""The requeue rule of the generated job scripts, run by bash with srun/scontrol stand-ins that
record their arguments: an array task requeues itself (<array id>_<task>), never the array."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from attninf.plan import Job
from attninf.submit import ClusterConfig, job_script


def _run(tmp_path, job: Job, rc: int, env: dict) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("srun", f"exit {rc}"), ("scontrol", f'echo "$*" >> {tmp_path}/scontrol.calls')):
        p = bin_dir / name
        p.write_text(f"#!/bin/bash\n{body}\n")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    script = tmp_path / "job.sbatch"
    script.write_text(job_script(job, ClusterConfig(kind="slurm", max_requeues=3), tmp_path / "logs"))
    p = subprocess.run(["bash", str(script)], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
                       capture_output=True, text=True)
    calls = tmp_path / "scontrol.calls"
    return [p.returncode, calls.read_text().splitlines() if calls.exists() else []]


@pytest.mark.parametrize("env, target", [
    ({"SLURM_JOB_ID": "63", "SLURM_ARRAY_JOB_ID": "63", "SLURM_ARRAY_TASK_ID": "1"}, "63_1"),
    ({"SLURM_JOB_ID": "70", "SLURM_ARRAY_JOB_ID": "63", "SLURM_ARRAY_TASK_ID": "0"}, "63_0"),
    ({"SLURM_JOB_ID": "80"}, "80"),
])
def test_a_stopped_step_requeues_its_own_job_and_array_task(tmp_path, env, target):
    job = Job("score:parts", "score", None, "parts", str(tmp_path / "score"), array=2 if "SLURM_ARRAY_JOB_ID" in env else None)
    assert _run(tmp_path, job, 75, env) == [0, [f"requeue {target}"]]


def test_no_requeue_after_max_requeues_or_on_a_failure(tmp_path):
    job = Job("detect", "detect", None, "process", str(tmp_path / "detect"))
    assert _run(tmp_path, job, 75, {"SLURM_JOB_ID": "9", "SLURM_RESTART_COUNT": "3"}) == [75, []]
    assert _run(tmp_path, job, 1, {"SLURM_JOB_ID": "9"}) == [1, []]
    assert _run(tmp_path, job, 0, {"SLURM_JOB_ID": "9"}) == [0, []]
