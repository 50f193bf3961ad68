"""The cluster path on a live two-node Slurm (marker `slurm`; `make test-cluster` starts two slurmd
on this machine with slurm/local_cluster.sh up 2 and stops them afterwards).

- `+experiment=smoke cluster=slurm_onenode` with pretraining on 2 nodes x 2 tasks (TP2 inside a
  node, DP2 across the nodes, gloo): every stage is a Slurm job (scoring an array of 2 tasks plus
  a finish job, each arm's pretraining one job of 4 srun tasks on n1 and n2), `attninf-status
  --wait` exits 0 and shows both nodes, and the artifacts equal a local run of the same config
  (4 local ranks): score rows, selection, per-step losses and eval results identical;
- a re-submission of the finished run submits nothing;
- time limits and preemption, on a run whose pretrain jobs have a one-minute limit: SIGUSR1 to a
  score array task (it stops after the part it is on and requeues itself); `scontrol requeue`
  of the two-node baseline job; SIGUSR1 (the time-limit warning) to the attention_influence job
  before its first step: the ranks save at step 1, exit 75, the job script requeues its own job.
  Each is sent once the target's processes catch the signals (/proc SigCgt), so it lands at the
  same point of the work on any machine. Every arm ends with losses identical to the
  uninterrupted run;
- a ratio sweep through Hydra's submitit Slurm launcher runs as Slurm jobs and shares one scoring;
- an unknown partition is refused with Slurm's own message, in one line, exit 2.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest


pytestmark = pytest.mark.slurm

ARMS = ["baseline", "attention_influence", "random"]
# 2 nodes x 2 tasks = TP2 x DP2: locally 4 processes, on Slurm one job of 4 srun tasks on n1, n2.
SMOKE = ["+experiment=smoke", "pretrain.launch.nodes=2", "pretrain.launch.tasks_per_node=2",
         "pretrain.tensor_parallel=2"]
CLUSTER = ["cluster=slurm_onenode"]


def _slurm_nodes() -> int:
    if shutil.which("scontrol") is None:
        return 0
    p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    if " is UP" not in p.stdout:
        return 0
    return len(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split())


@pytest.fixture(scope="module")
def slurm():
    n = _slurm_nodes()
    if n < 2:
        pytest.skip("no two-node Slurm answers: run `make test-cluster` (slurm/local_cluster.sh up 2)")


def cli(args, env, cwd, check=True, timeout=1200):
    p = subprocess.run([sys.executable, "-m", "attninf.cli", *args], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p


def status(run, env, *extra, timeout=1800):
    return subprocess.run([sys.executable, "-m", "attninf.status", str(run), *extra], env=env,
                          capture_output=True, text=True, timeout=timeout)


def job_fields(job_id: str) -> list[dict]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return [dict(kv.split("=", 1) for kv in ln.split() if "=" in kv) for ln in out.splitlines()]


def jobs(run: Path) -> dict:
    return {(j["stage"], j["arm"]): j for j in json.loads((run / "cluster/jobs.json").read_text())["jobs"]}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, env, corpus):
    run = tmp_path_factory.mktemp("local") / "run"
    t0 = time.perf_counter()
    cli([*SMOKE, f"run_dir={run}", corpus], env, run.parent)
    return run, time.perf_counter() - t0


@pytest.fixture(scope="module")
def cluster_run(slurm, tmp_path_factory, env, corpus, local_run):
    run = tmp_path_factory.mktemp("cluster") / "run"
    t0 = time.perf_counter()
    p = cli([*SMOKE, *CLUSTER, f"run_dir={run}", corpus], env, run.parent)
    st = status(run, env, "--wait", "--poll", "2")
    return run, p, st, time.perf_counter() - t0


def scores(run: Path) -> list[dict]:
    rows = pq.read_table(sorted((run / "score").glob("shard-*.parquet"))).to_pylist()
    return sorted(rows, key=lambda r: r["doc_id"])


def losses(run: Path, arm: str) -> list[tuple]:
    rows = [json.loads(ln) for ln in (run / "pretrain" / arm / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def eval_results(run: Path, arm: str) -> dict:
    return json.loads((run / "eval" / arm / "results.json").read_text())["results"]


def assert_same_artifacts(a: Path, b: Path, stages=("score", "select", "pretrain", "eval")):
    assert scores(a) == scores(b)  # every column, values bit-identical
    if "select" in stages:
        assert pq.read_table(a / "select/selected.parquet").to_pylist() == \
            pq.read_table(b / "select/selected.parquet").to_pylist()
    for arm in ARMS:
        if "pretrain" in stages:
            la, lb = losses(a, arm), losses(b, arm)
            assert la == lb and len(la) == 6, arm
        if "eval" in stages:
            assert eval_results(a, arm) == eval_results(b, arm), arm


def test_smoke_as_slurm_jobs_on_two_nodes_equals_the_local_run(cluster_run, local_run):
    run, submit, st, wall = cluster_run
    assert st.returncode == 0, st.stdout + st.stderr
    lines = st.stdout.splitlines()[1:]
    assert len(lines) == 13 and all(ln.split()[1] == "done" for ln in lines), st.stdout
    print(f"\ncluster run {wall:.0f}s (submit to all done), local run {local_run[1]:.0f}s\n{st.stdout}")
    js = jobs(run)
    assert set(js) == {(s, None) for s in ("detect", "mirror", "score", "select", "mix", "eval_masked", "report")} \
        | {(s, a) for s in ("pretrain", "eval") for a in ARMS}
    assert len(js[("score", None)]["tasks"]) == 3  # an array of 2 tasks, then the finish job
    array_id = js[("score", None)]["job_ids"][0]
    assert {f["ArrayTaskId"] for f in job_fields(array_id)} == {"0", "1"}
    owners = {json.loads(p.read_text())["rank"] for p in (run / "score").glob("shard-*.stats.json")}
    assert owners == {0, 1}  # both array tasks scored
    for arm in ARMS:
        (f,) = job_fields(js[("pretrain", arm)]["job_id"])
        assert (f["NumNodes"], f["NumTasks"], f["NodeList"], f["JobState"]) == ("2", "4", "n[1-2]", "COMPLETED"), f
        row = next(ln for ln in lines if ln.startswith(f"pretrain[{arm}]"))
        assert "n[1-2]" in row.split()  # attninf-status shows both nodes
        t = json.loads((run / "pretrain" / arm / "train_summary.json").read_text())
        assert (t["world"], t["tp"], t["dp"]) == (4, 2, 2)
        assert (run / "pretrain" / arm / "logs" / "rank-3.log").exists()
    for (stage, arm), j in js.items():
        for jid in j["job_ids"]:
            assert all(f["JobState"] == "COMPLETED" for f in job_fields(jid)), (stage, arm)
    # afterok chain: the score finish waited for the array, select for the finish, report for every eval
    assert js[("select", None)]["dependency"] == [js[("score", None)]["job_id"]]
    assert set(js[("report", None)]["dependency"]) >= {js[("eval", a)]["job_id"] for a in ARMS}
    assert_same_artifacts(run, local_run[0])
    for stage in ("detect", "score", "select", "mix", "pretrain/baseline"):  # same keys, computed twice
        assert json.loads((run / stage / "manifest.json").read_text())["key"] == \
            json.loads((local_run[0] / stage / "manifest.json").read_text())["key"]


def test_resubmitting_a_finished_run_submits_nothing(cluster_run, env, corpus):
    run = cluster_run[0]
    before = (run / "cluster/jobs.json").read_text()
    p = cli([*SMOKE, *CLUSTER, f"run_dir={run}", corpus], env, run.parent)
    assert "nothing to submit" in p.stdout
    assert (run / "cluster/jobs.json").read_text() == before
    # a partly done run: only the missing stage is submitted, with no dependency on finished ones
    report = (run / "report/report.md").read_text()
    shutil.rmtree(run / "report")
    p = cli([*SMOKE, *CLUSTER, f"run_dir={run}", corpus], env, run.parent)
    assert [ln.split()[1] for ln in p.stdout.splitlines() if ln.startswith("submitted")] == ["report"]
    assert jobs(run)[("report", None)]["dependency"] == []
    st = status(run, env, "--wait", "--poll", "2")
    assert st.returncode == 0, st.stdout
    assert (run / "report/report.md").read_text() == report


def _wait_for(pred, timeout=900, what=""):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class StartRequeuedAtOnce(threading.Thread):
    """A requeued job waits ~2 minutes (Reason=BeginTime) before Slurm starts it again; the test
    sets StartTime=now for every such job instead of waiting."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()

    def run(self):
        seen: dict[str, float] = {}
        while not self.stop.is_set():
            out = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r"], capture_output=True, text=True).stdout
            for ln in out.splitlines():
                jid, _, reason = ln.partition(" ")
                if reason.strip() != "BeginTime":
                    continue
                # not at once: a job started again before its last steps are cleaned up is killed
                # ("Job credential revoked"), which is what the delay protects against
                if time.time() - seen.setdefault(jid, time.time()) > 10:
                    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], capture_output=True)
                    seen.pop(jid)
            time.sleep(1)


def _python_procs(module: str, folder: Path) -> list[int]:
    """Pids of `python -m <module> <folder> ...` on this machine (both Slurm nodes run here)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = [a.decode() for a in (d / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if (len(argv) > 3 and Path(argv[0]).name.startswith("python") and argv[1:3] == ["-m", module]
                and argv[3] == str(folder)):
            pids.append(int(d.name))
    return pids


def _handles_stop_signals(pid: int) -> bool:
    """The process has handlers for SIGUSR1 and SIGTERM (SigCgt in /proc): a signal sent now is
    recorded, not fatal; from here on when it arrives is fixed relative to the work."""
    try:
        line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    mask = int(line.split()[1], 16)
    return all(mask >> (s - 1) & 1 for s in (10, 15))


def _env_of(pid: int, key: str) -> str | None:
    try:
        env = dict(kv.split("=", 1) for kv in (Path(f"/proc/{pid}/environ").read_text().split("\0")) if "=" in kv)
    except OSError:
        return None
    return env.get(key)


def _ready(module: str, folder: Path, n: int, **env) -> bool:
    """n processes of `python -m module folder` (with these environment values) catch the stop signals."""
    pids = [p for p in _python_procs(module, folder) if all(_env_of(p, k) == v for k, v in env.items())]
    return len(pids) == n and all(_handles_stop_signals(p) for p in pids)


def _owned_parts(stage: Path, task: int, tasks: int) -> list[str]:
    """The parts array task `task` of `tasks` runs: the list the lifecycle recorded, split its way."""
    from attninf.lifecycle import share

    idx = json.loads((stage / "parts" / "index.json").read_text())
    return share(idx["parts"], task, tasks, idx.get("weights"))


def _marker(stage: Path, part: str) -> dict:
    p = stage / "parts" / f"{part}.done"
    return {**json.loads(p.read_text()), "stat": (p.stat().st_ino, p.stat().st_mtime_ns)}


@pytest.mark.timelimit
def test_time_limit_signal_and_requeues_change_nothing(slurm, tmp_path, env, corpus, local_run):
    """Pretrain jobs with a one-minute limit (Slurm's own SIGUSR1 30 s before it, every attempt;
    save_interval=4: the math is unchanged). Each interruption is sent as soon as the target's
    processes have their stop handlers installed, so where it lands relative to the work is fixed,
    whatever the machine's speed: SIGUSR1 to one score array task (it finishes the part it is on,
    stops at the boundary, exits 75, requeues itself, and the next attempt runs only the rest);
    `scontrol requeue` of the two-node baseline job (SIGTERM, then Slurm requeues it); SIGUSR1 to
    the attention_influence job before its first step (it saves at step 1, before any periodic
    save, exits 75, its job script requeues it). Every job ends COMPLETED and the artifacts equal
    the uninterrupted local run."""
    run = tmp_path / "run"
    starter = StartRequeuedAtOnce()
    starter.start()
    t0 = time.perf_counter()
    try:
        cli([*SMOKE, *CLUSTER, f"run_dir={run}", corpus, "stages=[detect,score,select,mix,pretrain]",
             "pretrain.save_interval=4", "cluster.stages.pretrain.time_min=1",
             "cluster.max_requeues=10"], env, tmp_path)  # a loaded machine may need several one-minute attempts
        js = jobs(run)
        score_dir = run / "score"
        tasks = js[("score", None)]["tasks"][:-1]  # the array's tasks (the last job is its finish)
        r = 1
        _wait_for(lambda: _ready("attninf.worker", score_dir, 1, SLURM_ARRAY_TASK_ID=str(r)),
                  what=f"score array task {r} with its stop handlers")
        subprocess.run(["scancel", "--signal=USR1", tasks[r]], check=True, capture_output=True)
        _wait_for(lambda: (score_dir / "parts" / "index.json").exists(), what="the score parts list")
        mine = _owned_parts(score_dir, r, len(tasks))
        assert len(mine) >= 2, f"task {r} owns {mine}: a mid-task stop needs two parts or more"
        _wait_for(lambda: (score_dir / "parts" / f"{mine[0]}.done").exists(), what=f"{mine[0]}")
        first = _marker(score_dir, mine[0])

        base, ai = run / "pretrain" / "baseline", run / "pretrain" / "attention_influence"
        base_job, ai_job = js[("pretrain", "baseline")]["job_id"], js[("pretrain", "attention_influence")]["job_id"]
        pending = {base: ["scontrol", "requeue", base_job], ai: ["scancel", "--signal=USR1", ai_job]}

        def interrupt_when_ready():  # whichever job's four ranks are up first
            for stage, cmd in list(pending.items()):
                if _ready("pretrain.launch", stage, 4):
                    subprocess.run(cmd, check=True, capture_output=True)
                    pending.pop(stage)
            return not pending

        _wait_for(interrupt_when_ready, what="the pretrain ranks with their stop handlers")
        st = status(run, env, "--wait", "--poll", "2")
    finally:
        starter.stop.set()
    print(f"\n{st.stdout}\ntime-limit test: submit to all done {time.perf_counter() - t0:.0f}s")
    assert st.returncode == 0, st.stdout + st.stderr
    # the score task: stopped after its first part, requeued once, the rest run by the next attempt
    assert int(job_fields(tasks[r])[0]["Restarts"]) == 1
    assert _marker(score_dir, mine[0]) == first  # not run again
    later = {_marker(score_dir, p)["pid"] for p in mine[1:]}
    assert first["pid"] not in later and {first["task"], *(_marker(score_dir, p)["task"] for p in mine)} == {r}
    for jid in (base_job, ai_job):
        assert int(job_fields(jid)[0]["Restarts"]) >= 1, jid
    # the baseline: requeued by Slurm (SIGTERM, then killed after KillWait wherever it was)
    assert "received SIGTERM" in (base / "logs" / "rank-0.log").read_text()
    # attention_influence: the signal came before step 1 ended, so its first save is a stop's
    log = (ai / "logs" / "rank-0.log").read_text()
    assert "received SIGUSR1" in log and "checkpoint at step 1 saved; exiting for a requeue" in log, log[-3000:]
    assert "(step 1)" in log.split("resumed from", 1)[-1].splitlines()[0], log[-3000:]
    assert_same_artifacts(run, local_run[0], stages=("score", "select", "pretrain"))


def test_ratio_sweep_through_the_slurm_launcher_shares_one_scoring(cluster_run, env, corpus):
    run = cluster_run[0]
    score_manifest = (run / "score/manifest.json").stat().st_mtime_ns
    cli(["-m", "hydra/launcher=slurm", *SMOKE, f"run_dir={run}", corpus, "stages=[detect,score,select]",
         "select.ratio=0.1,0.3", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=null", "hydra.launcher.timeout_min=30"], env, run.parent)
    assert (run / "score/manifest.json").stat().st_mtime_ns == score_manifest
    for ratio in ("0.1", "0.3"):
        m = json.loads((run / f"select-select.ratio={ratio}" / "manifest.json").read_text())
        assert m["status"] == "done" and m["config"]["select"]["ratio"] == float(ratio)
    (sweep,) = (run / ".hydra").glob("multirun-*")
    # the launcher submits the points as one job array: folders <array id>_<task>
    ids = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(ids) == 2
    for jid in ids:  # real Slurm jobs, known to the controller (results land before the job ends)
        _wait_for(lambda: job_fields(jid)[0]["JobState"] not in ("RUNNING", "COMPLETING"), 120, f"job {jid}")
        assert job_fields(jid)[0]["JobState"] == "COMPLETED"


def test_unknown_partition_is_reported_with_slurms_message(slurm, tmp_path, env):
    p = cli(["cluster=slurm_onenode", "cluster.partition=no_such_part", "stages=[detect]",
             f"run_dir={tmp_path / 'run'}"], env, tmp_path, check=False)
    assert p.returncode == 2
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, lines
    assert "invalid partition" in lines[0].lower(), lines


def test_a_controller_that_does_not_answer_is_one_line(slurm, tmp_path, env):
    """Slurm installed but its controller unreachable (a conf naming a port nobody listens on)."""
    conf = tmp_path / "slurm.conf"
    lines = Path("/etc/slurm/slurm.conf").read_text().splitlines()
    conf.write_text("\n".join([ln for ln in lines if not ln.startswith(("SlurmctldPort", "MessageTimeout"))]
                              + ["SlurmctldPort=1", "MessageTimeout=2"]) + "\n")
    p = cli(["cluster=slurm_onenode", "stages=[detect]", f"run_dir={tmp_path / 'run'}"],
            {**env, "SLURM_CONF": str(conf)}, tmp_path, check=False, timeout=300)
    assert p.returncode == 2
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "does not answer" in lines[0] and "Traceback" not in p.stderr, lines
