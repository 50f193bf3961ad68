"""Run model-written code for HumanEval inside a sandbox that is a boundary, not a courtesy.

lm-eval's HumanEval task calls Hugging Face's `code_eval` metric, which is a script fetched from
the Hub and runs candidates in forked workers of the evaluating process. This module replaces it
everywhere (not only offline) with the same `compute()` contract, because the harness evaluates
models we trained ourselves, whose output nobody has read. Each program runs under bubblewrap
(`bwrap`, Debian package `bubblewrap`, installed by `make setup`):

- new PID, mount, network, IPC and UTS namespaces and a user namespace; the program runs as an
  unprivileged uid (as `nobody` when the harness is root), with no capabilities and
  no_new_privs, so it cannot signal, see or trace the evaluator or other programs;
- a read-only view of the interpreter and system libraries only (`/usr`, `/lib*`, the Python
  prefix): no /etc, no home, no caches, no run directory; the work dir is a private, size-capped
  tmpfs that vanishes with the sandbox, and the program arrives through a memfd, so nothing is
  written on the host (a killed evaluator leaves no temp folder);
- bwrap's PID-namespace init: when the program exits, or on the wall-clock timeout (the outer
  bwrap is killed, `--die-with-parent` takes the namespace down), the kernel kills every
  descendant, including ones that called `setsid()` or kept stderr open;
- RLIMIT_NPROC, CPU, address-space, file-size and core limits set by a trusted runner before
  the candidate's first line;
- stdout and stderr are discarded; the result string is `passed`, `timed out`, or `failed: `
  plus the exception type and (truncated) message the runner reports, or the exit status.

Where bubblewrap is missing or cannot create namespaces, evaluation refuses with one line,
unless `sandbox="process"` (eval.humaneval.sandbox) explicitly accepts the older, weaker mode
(a separate resource-limited process, `unshare -rn` when available); results record the mode.
Nothing runs unless `HF_ALLOW_CODE_EVAL=1` (the same switch Hugging Face's metric uses); the
stage additionally requires `eval.allow_code_eval=true` in the config.
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
SANDBOX_MODES = ("bwrap", "process")
NOBODY = 65534

_WARNING = f"""
################################################################################
Code execution is disabled. HumanEval runs code written by a model; this harness runs each
program in a bubblewrap sandbox (namespaces, read-only system, no network, limits). Set
{ALLOW_ENV}=1 (and eval.allow_code_eval=true in the config) to allow it.
################################################################################"""


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be set up here; the message is one line saying what to do."""


# Trusted runner, executed by the sandboxed interpreter before the candidate (as `-c`). argv:
# result fd, memory bytes, cpu s, file bytes, max processes, drop-to-nobody flag. Limits first,
# so the candidate cannot undo them (soft = hard; an unprivileged process cannot raise a hard
# limit). The candidate's exception type and message (one line, truncated) go to the result fd;
# its stdout/stderr go nowhere the evaluator reads.
_RUNNER = r"""
import os, sys, resource as _r
_fd, _mem, _cpu, _fsize, _nproc, _drop = (int(a) for a in sys.argv[1:7])
if _drop:
    os.setgroups([]); os.setgid(%(nobody)d); os.setuid(%(nobody)d)
    import ctypes
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: setuid cleared it; /proc/self/*_map need it
    if _libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER: the program's own user namespace
        raise SystemExit("sandbox: unshare(CLONE_NEWUSER) failed: " + os.strerror(ctypes.get_errno()))
    for _f, _t in (("setgroups", "deny"), ("uid_map", "%(nobody)d %(nobody)d 1"),
                   ("gid_map", "%(nobody)d %(nobody)d 1")):
        with open("/proc/self/" + _f, "w") as _h:
            _h.write(_t)
    del ctypes, _libc, _f, _t, _h
for _lim, _v in ((_r.RLIMIT_AS, _mem), (_r.RLIMIT_DATA, _mem), (_r.RLIMIT_CPU, _cpu),
                 (_r.RLIMIT_FSIZE, _fsize), (_r.RLIMIT_CORE, 0), (_r.RLIMIT_NPROC, _nproc)):
    if _v < 0:
        continue
    try:
        _r.setrlimit(_lim, (_v, _v))
    except (ValueError, OSError):
        if _lim == _r.RLIMIT_NPROC:
            raise
import socket as _s
def _no_network(*a, **k):
    raise OSError("network access is disabled in the code-execution sandbox")
_s.socket = _s.create_connection = _s.socketpair = _s.getaddrinfo = _no_network
del _s
sys.setrecursionlimit(10000)
sys.argv = ["program.py"]
def _report(e):
    try:
        msg = type(e).__name__ + (": " + str(e) if str(e) else "")
    except BaseException:
        msg = type(e).__name__
    msg = (msg.splitlines() or [type(e).__name__])[0][:300]
    try:
        os.write(_fd, msg.encode("utf-8", "replace"))
    except OSError:
        pass
with open("program.py", encoding="utf-8") as _h:
    _src = _h.read()
_g = {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "program.py"}
del _h, _r, _lim, _v, _no_network, _mem, _cpu, _fsize, _nproc, _drop
try:
    exec(compile(_src, "program.py", "exec"), _g)
except SystemExit as e:
    if e.code is None or e.code == 0:
        code = 0
    elif isinstance(e.code, int):
        code = e.code & 0xFF or 1
    else:
        _report(e); code = 1
    try: sys.stdout.flush(); sys.stderr.flush()
    except BaseException: pass
    os._exit(code)
except BaseException as e:
    _report(e)
    os._exit(1)
try: sys.stdout.flush(); sys.stderr.flush()
except BaseException: pass
os._exit(0)
""" % {"nobody": NOBODY}


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. Defaults follow Hugging Face's code_eval (3 s) with a memory cap."""

    timeout_s: float = 3.0       # wall clock per program (HF code_eval default)
    memory_mb: int = 1024        # address space; HumanEval solutions need a few tens of MB
    cpu_s: int | None = None     # CPU seconds; default ceil(timeout) + 1 (catches busy loops)
    file_size_mb: int = 16       # largest file the program may write (work dir tmpfs: 4x this)
    isolate_network: bool = True  # "process" mode only: use `unshare -rn` when available
    max_processes: int = 16      # RLIMIT_NPROC inside the sandbox (HumanEval never forks)
    sandbox: str = "bwrap"       # bwrap (a boundary) | process (explicitly weaker; recorded)


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    result: str  # "passed" | "timed out" | "failed: <ExceptionType: message> | exit status N"


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


def _interpreter() -> str:
    """The base interpreter (not a venv shim): run with -I -S it needs only its own prefix."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return exe if os.access(exe, os.X_OK) else os.path.realpath(sys.executable)


def _bwrap_argv(limits: SandboxLimits, program_fd: int) -> list[str]:
    exe = shutil.which("bwrap")
    if exe is None:
        raise SandboxUnavailable("bwrap not found")
    root = os.geteuid() == 0
    argv = [exe, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net",
            "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if not root:
        # Unprivileged bwrap needs a user namespace for the others; as root the runner drops
        # to nobody and makes its own (a namespace owned by uid 0 would exempt it from NPROC).
        argv += ["--unshare-user", "--disable-userns"]
    else:
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    system = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
    for p in system:
        if os.path.islink(p):
            argv += ["--symlink", os.readlink(p), p]
        elif os.path.isdir(p):
            argv += ["--ro-bind", p, p]
    prefix = os.path.realpath(sys.base_prefix)
    exe_dir = os.path.dirname(_interpreter())
    bound = list(system)
    for extra in (prefix, exe_dir):  # e.g. a pyenv/uv interpreter under a home directory
        if any(extra == p or extra.startswith(p + "/") for p in bound):
            continue
        parts = extra.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):  # ancestors readable (bwrap would copy a 0700 home)
            argv += ["--perms", "0755", "--dir", "/" + "/".join(parts[:i])]
        argv += ["--ro-bind", extra, extra]
        bound.append(extra)
    size = max(4 * limits.file_size_mb, 16) * 2**20
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(size), "--perms", "01777", "--tmpfs", "/tmp",
             "--perms", "0777", "--dir", "/tmp/work", "--file", str(program_fd), "/tmp/work/program.py",
             "--chdir", "/tmp/work", "--clearenv",
             "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp/work",
             "--setenv", "TMPDIR", "/tmp/work", "--setenv", "LANG", "C.UTF-8",
             "--setenv", "PYTHONHASHSEED", "0", "--setenv", "OMP_NUM_THREADS", "1", "--"]
    return argv


@lru_cache(maxsize=4)
def sandbox_problem(mode: str = "bwrap") -> str | None:
    """None when `mode` works here, else why not (one line). Probed once per process."""
    if mode == "process":
        return None
    if mode != "bwrap":
        return f"unknown sandbox mode {mode!r}; known: {', '.join(SANDBOX_MODES)}"
    if not sys.platform.startswith("linux"):
        return "bubblewrap needs Linux"
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    probe = "import os\nassert os.getuid() != 0 and os.getpid() == 2\n"
    try:
        r = _execute(probe, SandboxLimits(timeout_s=20.0), capture_stderr=True)
    except (OSError, SandboxUnavailable) as e:
        return f"bubblewrap failed to start: {e}"
    if r[0] == 0:
        return None
    detail = (r[2] or r[1] or f"exit status {r[0]}").strip().splitlines()
    return "bubblewrap cannot build the sandbox here: " + (detail[-1] if detail else "no output")[:200]


def check_sandbox(mode: str = "bwrap") -> None:
    """Raise SandboxUnavailable (one line: why, and what to do) unless `mode` works here."""
    why = sandbox_problem(mode)
    if why:
        raise SandboxUnavailable(
            f"code execution refused: {why}. Install bubblewrap (`apt-get install bubblewrap`, or "
            "`make setup` as root) on a kernel that allows user namespaces, or set "
            "eval.humaneval.sandbox=process to accept a weaker sandbox (no namespaces beyond "
            "`unshare -rn`; recorded in the results).")


def sandbox_record(mode: str = "bwrap") -> dict:
    """What isolated the programs, for results.json (a weaker mode must be visible there)."""
    rec = {"mode": mode, "boundary": mode == "bwrap"}
    if mode == "bwrap":
        try:
            out = subprocess.run([shutil.which("bwrap") or "bwrap", "--version"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = None
        rec |= {"bwrap": out, "namespaces": ["user", "pid", "mount", "net", "ipc", "uts"]}
    else:
        rec["network_namespace"] = network_isolation_available()
    return rec


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecResult:
    """Execute one Python program in the sandbox; passed = exit status 0.

    Returns within about timeout_s + 1 s whatever the program does: the wait is bounded, the
    whole sandbox is killed at the deadline, and no read waits for a pipe to close.
    """
    require_permission()
    check_sandbox(limits.sandbox)
    rc, msg, _ = _execute(program, limits)
    if rc is None:
        return ExecResult(False, "timed out")
    if rc == 0:
        return ExecResult(True, "passed")
    if msg:
        return ExecResult(False, "failed: " + msg)
    if rc < 0 or (limits.sandbox == "bwrap" and rc > 128):  # bwrap reports a signal as 128 + n
        sig = -rc if rc < 0 else rc - 128
        try:
            return ExecResult(False, f"failed: killed by signal {signal.Signals(sig).name}")
        except ValueError:
            pass
    return ExecResult(False, f"failed: exit status {rc}")


def _execute(program: str, limits: SandboxLimits, capture_stderr: bool = False):
    """(exit status or None on timeout, reported message, stderr if captured)."""
    mem = limits.memory_mb * 2**20
    cpu = limits.cpu_s if limits.cpu_s is not None else int(limits.timeout_s) + 2
    fsize = limits.file_size_mb * 2**20
    res_r, res_w = os.pipe()
    fds = [res_w]
    workdir = None
    try:
        if limits.sandbox == "bwrap":
            mfd = os.memfd_create("program.py")
            fds.append(mfd)
            os.write(mfd, program.encode("utf-8", "surrogatepass"))
            os.lseek(mfd, 0, os.SEEK_SET)
            drop = int(os.geteuid() == 0)
            cmd = _bwrap_argv(limits, mfd) + [_interpreter(), "-I", "-S", "-B", "-c", _RUNNER,
                                              str(res_w), str(mem), str(cpu), str(fsize),
                                              str(limits.max_processes), str(drop)]
            kw = dict(cwd="/", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        else:  # the explicitly weaker mode: a separate limited process in a temp dir
            workdir = tempfile.mkdtemp(prefix="attninf-exec-")
            with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as fh:
                fh.write(program)
            cmd = [sys.executable, "-I", "-B", "-c", _RUNNER, str(res_w), str(mem), str(cpu),
                   str(fsize), "-1", "0"]  # NPROC would count all the user's processes
            if limits.isolate_network and network_isolation_available():
                cmd = [shutil.which("unshare") or "unshare", "-rn", "--"] + cmd
            kw = dict(cwd=workdir, env={"PATH": "/usr/bin:/bin", "HOME": workdir,
                                        "TMPDIR": workdir, "LANG": "C.UTF-8",
                                        "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"})
        err_fh = tempfile.TemporaryFile() if capture_stderr else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err_fh, pass_fds=fds, start_new_session=True, **kw)
            for fd in fds:  # the child holds its copies; ours would keep the pipe open
                os.close(fd)
            fds = []
            try:
                rc = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                _kill_group(proc)  # bwrap dies -> --die-with-parent -> the namespace dies
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            os.set_blocking(res_r, False)
            try:
                msg = os.read(res_r, 4096).decode("utf-8", "replace").strip()
            except BlockingIOError:
                msg = ""
            err = ""
            if capture_stderr:
                err_fh.seek(0)
                err = err_fh.read(65536).decode("utf-8", "replace")
            return rc, msg[:400], err
        finally:
            if capture_stderr:
                err_fh.close()
    finally:
        for fd in [res_r, *fds]:
            try:
                os.close(fd)
            except OSError:
                pass
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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
            isolate_network: bool = True, sandbox: str = "bwrap"):
    """Drop-in for Hugging Face `code_eval.compute`: returns (pass_at_k, results).

    predictions[i] holds candidate programs for problem i, references[i] its test code (which
    calls the candidate); the program run is `candidate + "\\n" + test`. pass@k is reported only
    for k no larger than every problem's number of candidates, as HF does.
    """
    require_permission()
    ks = [k] if isinstance(k, int) else list(k)
    limits = SandboxLimits(timeout_s=timeout, memory_mb=memory_mb, isolate_network=isolate_network,
                           sandbox=sandbox)
    check_sandbox(sandbox)
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
              isolate_network: bool = True, sandbox: str = "bwrap") -> float:
    """lm-eval metric: called once per problem with that problem's candidates; returns pass@k[0].

    Only the first k is returned because lm-eval expects one number per metric.
    """
    assert k is not None, "pass_at_k needs k"
    ks = [k] if isinstance(k, int) else list(k)
    res, _ = compute(predictions=predictions, references=references, k=ks, num_workers=num_workers,
                     timeout=timeout, memory_mb=memory_mb, isolate_network=isolate_network,
                     sandbox=sandbox)
    return res[f"pass@{ks[0]}"]


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval filter: the model continues the prompt, so the program is prompt + completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]
