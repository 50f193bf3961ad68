"""Hostile programs against the bubblewrap sandbox: each test asserts what the program could NOT do.

Every case is a finding of a hostile review of the earlier process-group sandbox (the program
escaped with setsid, hung the evaluator through an inherited stderr, killed the evaluator, wrote
and read host files, leaked them through the result string, forked freely, reached local and
network listeners). They run in the default suite: each takes well under a few seconds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from eval import code_exec
from eval.code_exec import SandboxLimits, SandboxUnavailable, run_program

LIM = SandboxLimits(timeout_s=3.0, memory_mb=512)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def allow(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")


def _procs_with(token: str) -> list[int]:
    """Host pids whose command line contains token (a sandboxed process that escaped)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if token.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                    out.append(int(d))
            except OSError:
                pass
    return out


def _reap(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 9)
        except OSError:
            pass


@pytest.mark.parametrize("keep_stderr", [False, True])
def test_setsid_grandchild_neither_survives_nor_stalls_the_evaluator(keep_stderr):
    # Double fork + setsid leaves the process group; the daemon sleeps 20 s. With stderr kept
    # open, the old `communicate()` waited for it (a never-exiting daemon hangs evaluation).
    token = f"attninf-daemon-{uuid.uuid4().hex}"
    close = "" if keep_stderr else "    os.closerange(0, 3)\n"
    prog = (f"import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"{close}        os.execv(sys.executable, [sys.executable, '-S', '-c', "
            f"'import time; time.sleep(20)', {token!r}])\n    os._exit(0)\ntime.sleep(0.5)\n")
    prog = prog.replace("    os.closerange", "        os.closerange")
    t0 = time.perf_counter()
    r = run_program(prog, LIM)
    dt = time.perf_counter() - t0
    time.sleep(0.3)
    left = _procs_with(token)
    _reap(left)
    assert r.passed, r
    assert dt < LIM.timeout_s + 1.5, f"run_program took {dt:.1f}s"
    assert left == [], "a setsid'ed grandchild outlived run_program"


def test_program_cannot_kill_the_evaluator_nor_leave_temp_files(tmp_path):
    # In a child interpreter, so that a program that does kill its evaluator fails this test
    # instead of killing pytest. TMPDIR points at an empty folder that must stay empty.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = textwrap.dedent("""
        import os
        from eval.code_exec import run_program, SandboxLimits
        me = os.getpid()
        prog = ("import os, signal\\n"
                "for pid in (os.getppid(), %d, 1):\\n"
                "    try:\\n        os.kill(pid, signal.SIGKILL)\\n    except OSError:\\n        pass\\n"
                "os.kill(os.getppid(), signal.SIGKILL)\\n") % me
        r = run_program(prog, SandboxLimits(timeout_s=3.0))
        print("ALIVE", r.passed, r.result)
    """)
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert p.returncode == 0 and "ALIVE False failed: " in p.stdout, (p.returncode, p.stdout, p.stderr)
    assert list(tmp.iterdir()) == []


def test_program_cannot_write_outside_its_private_work_dir(tmp_path):
    name = f"escaped-{uuid.uuid4().hex}.txt"  # unique: nothing of an earlier run can answer
    targets = [tmp_path / name, Path(os.path.realpath(sys.base_prefix)) / name, Path("/tmp") / name,
               Path.home() / name]
    prog = (f"targets = {[str(t) for t in targets]!r}\nwritten = []\nfor t in targets:\n"
            f"    try:\n        open(t, 'w').write('x')\n        written.append(t)\n"
            f"    except OSError:\n        pass\nopen('scratch.txt', 'w').write('ok')\n"
            f"assert all(t.startswith('/tmp/') for t in written), written\n")
    r = run_program(prog, LIM)
    assert r.passed, r
    assert [t for t in targets if t.exists()] == []  # the sandbox's /tmp is its own tmpfs
    assert not (Path.cwd() / "scratch.txt").exists()


def test_program_cannot_read_host_files(tmp_path):
    secret = tmp_path / "run_dir" / "secret.txt"  # stands for the run dir, caches, home
    secret.parent.mkdir()
    secret.write_text("top secret\n")
    paths = [str(secret), "/etc/passwd", "/etc/shadow", str(Path.home()),
             str(Path.home() / ".cache"), str(REPO / "pyproject.toml"), os.getcwd(), "/proc/1/environ"]
    # A home directory may appear only as the skeleton leading to the interpreter (pyenv, uv).
    interp = os.path.realpath(sys.base_prefix)
    skeleton = [str(Path(interp).parents[i]) for i in range(len(Path(interp).parents) - 1)]
    prog = (f"import os\nseen = [p for p in {paths!r} if os.path.exists(p)]\n"
            f"skel = {skeleton!r}\n"
            f"seen = [p for p in seen if p not in skel or len(os.listdir(p)) != 1]\n"
            f"assert seen == ['/proc/1/environ'], seen\n"
            f"try:\n    open('/proc/1/environ').read()\n    assert False, 'read pid 1 environ'\n"
            f"except OSError:\n    pass\n")
    r = run_program(prog, LIM)
    assert r.passed, r


def test_result_string_never_carries_program_output():
    prog = "import sys\nprint('LEAKED-STDOUT')\nsys.stderr.write('root:x:0:0:LEAKED-STDERR\\n')\nsys.exit(1)"
    r = run_program(prog, LIM)
    assert not r.passed and r.result == "failed: exit status 1"
    # an exception: its type and first message line only, truncated
    r = run_program("raise ValueError('first line\\nsecond line' + 'x' * 5000)", LIM)
    assert r.result == "failed: ValueError: first line"


def test_captured_output_is_bounded_and_does_not_slow_the_evaluator():
    prog = "import sys\nfor _ in range(400):\n    sys.stderr.write('y' * 2**20)\nraise KeyError('k')"
    t0 = time.perf_counter()
    r = run_program(prog, SandboxLimits(timeout_s=10.0))
    assert r.result in ("failed: KeyError: 'k'", "timed out")
    assert len(r.result) < 400 and time.perf_counter() - t0 < 11.5


def test_program_cannot_fork_without_bound():
    token = f"attninf-fork-{uuid.uuid4().hex}"
    prog = (f"import os, time\nn = 0\ntry:\n    for _ in range(200):\n        if os.fork() == 0:\n"
            f"            time.sleep(20)\n            os._exit(0)\n        n += 1\n"
            f"except OSError:\n    pass\nassert n < 200, n\n{token!r}\n")
    r = run_program(prog, LIM)
    assert r.passed, r  # the assertion inside held: fewer than 200 forks succeeded
    assert _procs_with(token) == []


def test_program_cannot_reach_local_unix_sockets(tmp_path):
    path_srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path_srv.bind(str(tmp_path / "s.sock"))
    abstract = f"\0attninf-test-{uuid.uuid4().hex}"
    abs_srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abs_srv.bind(abstract)
    for s in (path_srv, abs_srv):
        s.listen(4)
        s.settimeout(0.3)
    prog = (f"import _socket\nreached = []\nfor addr in {[str(tmp_path / 's.sock'), abstract]!r}:\n"
            f"    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\n    try:\n"
            f"        s.connect(addr)\n        reached.append(addr)\n    except OSError:\n"
            f"        pass\nassert not reached, reached\n")
    try:
        r = run_program(prog, LIM)
        for s in (path_srv, abs_srv):
            with pytest.raises(TimeoutError):
                s.accept()
    finally:
        path_srv.close()
        abs_srv.close()
    assert r.passed, r


def test_program_cannot_reach_the_network_even_with_the_c_socket_module():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.3)
    port = srv.getsockname()[1]
    prog = (f"import _socket\nreached = []\nfor host in ('127.0.0.1', '1.1.1.1'):\n"
            f"    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n    s.settimeout(1)\n"
            f"    try:\n        s.connect((host, {port} if host == '127.0.0.1' else 80))\n"
            f"        reached.append(host)\n    except OSError:\n        pass\nassert not reached, reached\n")
    try:
        r = run_program(prog, LIM)
        with pytest.raises(TimeoutError):
            srv.accept()
    finally:
        srv.close()
    assert r.passed, r


def test_refuses_in_one_line_without_isolation_unless_weaker_mode_is_explicit(monkeypatch):
    real_which = code_exec.shutil.which
    monkeypatch.setattr(code_exec.shutil, "which", lambda n: None if n == "bwrap" else real_which(n))
    code_exec.sandbox_problem.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable) as ei:
            run_program("assert True", LIM)
        msg = str(ei.value)
        assert "\n" not in msg and "bubblewrap" in msg and "eval.humaneval.sandbox=process" in msg
        weak = SandboxLimits(timeout_s=3.0, sandbox="process")
        assert run_program("assert True", weak).passed
        assert code_exec.sandbox_record("process")["boundary"] is False
    finally:
        code_exec.sandbox_problem.cache_clear()


def test_eval_plan_refuses_before_the_model_loads(monkeypatch):
    from attninf.config import ConfigError, build
    from eval.config import EvalConfig
    from eval.harness import check_code_eval_allowed

    monkeypatch.setattr(code_exec, "sandbox_problem", lambda mode="bwrap": "bwrap is not installed"
                        if mode == "bwrap" else None)
    e = build(EvalConfig, {"tasks": ["humaneval"], "allow_code_eval": True}, "eval")
    with pytest.raises(ConfigError, match=r"^eval.humaneval.sandbox: code execution refused"):
        check_code_eval_allowed(e)
    check_code_eval_allowed(build(EvalConfig, {"tasks": ["humaneval"], "allow_code_eval": True,
                                               "humaneval": {"sandbox": "process"}}, "eval"))
