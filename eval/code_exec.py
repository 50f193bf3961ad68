"""Run model-written code safely enough to score HumanEval, offline and on a cluster alike.

lm-eval's HumanEval task calls Hugging Face's `code_eval` metric, which is a script fetched from
the Hub and runs candidates in forked workers of the evaluating process. This module replaces it
everywhere (not only offline) with the same `compute()` contract and a stricter sandbox, because
the harness evaluates models we trained ourselves, whose output nobody has read:

- every program runs in its own `python -I` process, in a fresh temporary directory that is
  deleted afterwards, with a minimal environment;
- wall-clock timeout (the whole process group is killed, so a forked child dies too), CPU-time,
  address-space, file-size and core-dump limits set in the child before the candidate runs;
- no network: a fresh network namespace (`unshare -rn`) where the OS allows it, and in every case
  `socket` is disabled inside the child;
- nothing runs unless `HF_ALLOW_CODE_EVAL=1` (the same switch Hugging Face's metric uses); the
  stage additionally requires `eval.allow_code_eval=true` in the config.

This is a guard against accidents (infinite loops, memory blow-ups, stray file writes), not a
security boundary against a malicious model: use a container or VM for that.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

ALLOW_ENV = "HF_ALLOW_CODE_EVAL"

_WARNING = f"""
################################################################################
Code execution is disabled. HumanEval runs code written by a model; this harness runs each
program in a separate, resource-limited process, but that is not a security boundary. Set
{ALLOW_ENV}=1 (and eval.allow_code_eval=true in the config) to allow it.
################################################################################"""

# Runs inside the child before the candidate: limits first, so the candidate cannot undo them
# (soft and hard limits are set together; an unprivileged process cannot raise a hard limit).
_PRELUDE = """\
import resource as _r, socket as _s, sys as _sys
for _lim, _v in ((_r.RLIMIT_AS, {mem}), (_r.RLIMIT_DATA, {mem}), (_r.RLIMIT_CPU, {cpu}),
                 (_r.RLIMIT_FSIZE, {fsize}), (_r.RLIMIT_CORE, 0)):
    try:
        _r.setrlimit(_lim, (_v, _v))
    except (ValueError, OSError):
        pass
def _no_network(*a, **k):
    raise OSError("network access is disabled in the code-execution sandbox")
_s.socket = _s.create_connection = _s.socketpair = _s.getaddrinfo = _no_network
del _r, _s, _lim, _v
_sys.setrecursionlimit(10000)
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. Defaults follow Hugging Face's code_eval (3 s) with a memory cap."""

    timeout_s: float = 3.0       # wall clock per program (HF code_eval default)
    memory_mb: int = 1024        # address space; HumanEval solutions need a few tens of MB
    cpu_s: int | None = None     # CPU seconds; default ceil(timeout) + 1 (catches busy loops)
    file_size_mb: int = 16       # largest file the program may write
    isolate_network: bool = True  # use a network namespace when available


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    result: str  # "passed" | "timed out" | "failed: <last stderr line>"


@lru_cache(maxsize=1)
def network_isolation_available() -> bool:
    """Whether `unshare -rn` works here (user + network namespaces; not in every container)."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def require_permission() -> None:
    if os.environ.get(ALLOW_ENV) != "1":
        raise ValueError(_WARNING)


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecResult:
    """Execute one Python program in a sandboxed child process; passed = exit status 0."""
    require_permission()
    mem = limits.memory_mb * 2**20
    cpu = limits.cpu_s if limits.cpu_s is not None else int(limits.timeout_s) + 2
    prelude = _PRELUDE.format(mem=mem, cpu=cpu, fsize=limits.file_size_mb * 2**20)
    workdir = tempfile.mkdtemp(prefix="attninf-exec-")
    try:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(prelude + "\n" + program + "\n")
        cmd = [sys.executable, "-I", "-B", path]
        if limits.isolate_network and network_isolation_available():
            cmd = [shutil.which("unshare") or "unshare", "-rn", "--"] + cmd
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)  # own process group: killpg reaches forks
        try:
            _, err = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return ExecResult(False, "timed out")
        finally:
            _kill_group(proc)  # leftovers (daemonised children) die with the group
        if proc.returncode == 0:
            return ExecResult(True, "passed")
        return ExecResult(False, "failed: " + _last_line(err, proc.returncode))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_line(err: bytes, rc: int) -> str:
    lines = [ln for ln in err.decode("utf-8", "replace").strip().splitlines() if ln.strip()]
    if lines:
        return lines[-1][:300]
    if rc < 0:
        return f"killed by signal {signal.Signals(-rc).name}"
    return f"exit status {rc}"


def estimate_pass_at_k(num_samples, num_correct, k: int) -> np.ndarray:
    """Unbiased pass@k per problem (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""

    def one(n: int, c: int) -> float:
        if n - c < k:
            return 1.0
        return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))

    if isinstance(num_samples, int):
        num_samples = itertools.repeat(num_samples, len(num_correct))
    return np.array([one(int(n), int(c)) for n, c in zip(num_samples, num_correct)])


def compute(predictions: list[list[str]], references: list[str], k: list[int] | int = (1, 10, 100),
            num_workers: int = 4, timeout: float = 3.0, memory_mb: int = 1024,
            isolate_network: bool = True):
    """Drop-in for Hugging Face `code_eval.compute`: returns (pass_at_k, results).

    predictions[i] holds candidate programs for problem i, references[i] its test code (which
    calls the candidate); the program run is `candidate + "\\n" + test`. pass@k is reported only
    for k no larger than every problem's number of candidates, as HF does.
    """
    require_permission()
    ks = [k] if isinstance(k, int) else list(k)
    limits = SandboxLimits(timeout_s=timeout, memory_mb=memory_mb, isolate_network=isolate_network)
    jobs = [(task_id, cid, cand + "\n" + test)
            for task_id, (cands, test) in enumerate(zip(predictions, references))
            for cid, cand in enumerate(cands)]
    results: dict[int, list] = defaultdict(list)
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        outs = pool.map(lambda j: run_program(j[2], limits), jobs)
        for (task_id, cid, _), r in zip(jobs, outs):
            results[task_id].append((cid, {"task_id": task_id, "passed": r.passed,
                                           "result": r.result, "completion_id": cid}))
    total, correct = [], []
    for task_id in range(len(predictions)):
        rs = sorted(results[task_id])
        results[task_id] = rs
        total.append(len(rs))
        correct.append(sum(r[1]["passed"] for r in rs))
    total_a, correct_a = np.array(total), np.array(correct)
    pass_at_k = {f"pass@{kk}": float(estimate_pass_at_k(total_a, correct_a, kk).mean())
                 for kk in ks if len(total_a) and (total_a >= kk).all()}
    return pass_at_k, dict(results)


# ---- lm-eval task functions (referenced from the generated HumanEval task YAML) -------------

def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | None = None,
              num_workers: int = 4, timeout: float = 3.0, memory_mb: int = 1024,
              isolate_network: bool = True) -> float:
    """lm-eval metric: called once per problem with that problem's candidates; returns pass@k[0].

    Only the first k is returned because lm-eval expects one number per metric.
    """
    assert k is not None, "pass_at_k needs k"
    ks = [k] if isinstance(k, int) else list(k)
    res, _ = compute(predictions=predictions, references=references, k=ks, num_workers=num_workers,
                     timeout=timeout, memory_mb=memory_mb, isolate_network=isolate_network)
    return res[f"pass@{ks[0]}"]


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval filter: the model continues the prompt, so the program is prompt + completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]
