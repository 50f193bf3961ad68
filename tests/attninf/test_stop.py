"""Stop requests (attninf/stop.py): the handler records the signal and never raises, so a signal
that lands during heavy imports or a finish step leaves them intact; children started shielded
survive a signal meant for their step; a step's safe point turns a recorded signal into a stop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def test_signals_during_imports_are_recorded_and_the_imports_complete():
    """A thread sends SIGUSR1 and SIGTERM to its own process every millisecond while the main thread
    imports numpy, matplotlib's pyplot and pyarrow (what a finish step imports): every import
    completes whole and the process ends normally, with the request recorded once."""
    p = _python("""
import os, signal, sys, threading, time
from attninf import stop
stop.install()
sys.setswitchinterval(0.0002)  # the sender gets the GIL back often, even on a loaded machine
done = threading.Event()
sent = [0]
def pound():
    while not done.is_set():
        os.kill(os.getpid(), signal.SIGUSR1 if sent[0] % 2 else signal.SIGTERM)
        sent[0] += 1
        time.sleep(0.001)
t = threading.Thread(target=pound)
t.start()
import numpy, matplotlib.pyplot as plt, pyarrow.parquet
done.set(); t.join()
assert sent[0] > 10, sent  # the imports take ~0.5 s; a loaded machine paces the sender down
print(int(numpy.subtract(3, 1)), plt.figure is not None, stop.requested(), stop.name())
""")
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout.split()
    assert out[:3] == ["2", "True", "True"] and out[3] in ("SIGUSR1", "SIGTERM")  # the latest one
    # one line on stderr, for the first signal (SIGTERM), not one per signal
    assert p.stderr.count("attninf: received ") == 1, p.stderr[-2000:]
    assert "attninf: received SIGTERM: stopping at the next safe point" in p.stderr


def test_a_child_started_shielded_survives_its_steps_signal():
    p = _python("""
import os, signal, subprocess, sys, time
from attninf import stop
stop.install()
with stop.shielded():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1); print('child finished')"],
                             stdout=subprocess.PIPE, text=True)
    os.kill(os.getpid(), signal.SIGUSR1)  # held until the block ends
    assert not stop.requested()
assert stop.requested()
plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
time.sleep(0.3)
for pid in (child.pid, plain.pid):
    os.kill(pid, signal.SIGUSR1)
print(child.communicate()[0].strip(), child.returncode, plain.wait())
""")
    assert p.returncode == 0, p.stderr[-3000:]
    # the shielded child finished its work; an unshielded one dies of the same signal
    assert p.stdout.split() == ["child", "finished", "0", "-10"]


def test_a_safe_point_turns_a_recorded_signal_into_a_stop():
    from attninf import lifecycle, stop

    stop.reset()
    lifecycle.raise_if_stop_requested("nothing recorded")  # no signal: goes on
    stop._handler(10, None)  # what the installed handler does on SIGUSR1, without replacing pytest's
    try:
        assert lifecycle.stop_requested() and stop.name() == "SIGUSR1"
        with pytest.raises(lifecycle.Interrupted, match="stopped by SIGUSR1 before it started"):
            lifecycle.raise_if_stop_requested("finish")
    finally:
        stop.reset()


def test_share_splits_the_recorded_list_among_tasks():
    from attninf.lifecycle import share

    names = [f"p{i}" for i in range(7)]
    shares = [share(names, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == sorted(names)  # every part once
    assert all(shares)


@pytest.mark.parametrize("settle", [False, True])
def test_a_signal_after_python_s_teardown_kills_unless_settled(tmp_path, settle):
    """Python's finalization puts recorded-signal handlers back to the default action: a process
    that finished its work and is still tearing down (here: a C exit handler that waits) dies of
    SIGUSR1, which Slurm reports as a failed step. `stop.settle()` (what the entry points call on
    their way out) ignores the signals instead."""
    import signal
    import time

    code = f"""
import ctypes
from attninf import stop
stop.install()
libc = ctypes.CDLL("libc.so.6")
libc.on_exit(libc.pause, None)  # runs after Python's finalization and waits for a signal
{"stop.settle()" if settle else ""}
print("main done", flush=True)
"""
    p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "main done"
    time.sleep(0.5)  # into the exit handler
    p.send_signal(signal.SIGUSR1)
    try:
        rc = p.wait(timeout=3)
    except subprocess.TimeoutExpired:
        rc = None
        p.kill()
        p.wait()
    assert rc == (None if settle else -signal.SIGUSR1)
