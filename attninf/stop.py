"""Stop requests for a requeue: SIGUSR1 (Slurm's warning before the time limit) and SIGTERM
(preemption, `scontrol requeue`) only set a flag; the work checks it at its safe points.

Why a flag and nothing else: a handler that raises lands at an arbitrary bytecode, e.g. inside
an import whose failure third-party code catches with a broad `except`, which leaves a
half-initialised module behind ("module 'numpy' has no attribute 'subtract'" in a finish step
that was importing matplotlib) and fails the step for a reason that has nothing to do with it. So the handler records the signal, writes one line
to stderr with os.write (no logging lock, no allocation in the interrupted code), and returns.
The safe points decide: an array task at a part boundary, a training rank after a step (with a
checkpoint), a finish step before it starts. A step with no safe point (a one-process stage, the
rest of a finish) runs to its end: restarting it after a requeue would need its whole wall time
again, which is more than what is left of the current allocation when the warning arrives.

Stdlib only, so an entry point installs it before its heavy imports (torch, megatron, pandas):
a signal that arrives while those load is recorded instead of killing the process (the default
action of both signals). Child processes a step starts are started inside `shielded()`: Slurm
signals every process of a step, and a child with default dispositions would die mid-work.
On the way out an entry point calls `settle()`: Python's own teardown would otherwise restore
the default action and let a late signal turn a finished step into a killed one.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_STATE: dict = {"signal": None, "installed": False}


def _handler(signum, frame) -> None:
    first = _STATE["signal"] is None
    _STATE["signal"] = signum
    if first:
        try:
            os.write(2, f"attninf: received {signal.Signals(signum).name}: stopping at the next safe "
                        "point for a requeue\n".encode())
        except OSError:
            pass


def install() -> None:
    """Record SIGUSR1/SIGTERM from now on (idempotent; main thread only, as signal.signal requires)."""
    for s in SIGNALS:
        signal.signal(s, _handler)
    _STATE["installed"] = True


def requested() -> bool:
    return _STATE["signal"] is not None


def name() -> str | None:
    """The signal's name (SIGUSR1, SIGTERM) once one arrived, else None."""
    return signal.Signals(_STATE["signal"]).name if _STATE["signal"] is not None else None


def reset() -> None:
    """Forget a recorded request (tests; a process that serves several stages in turn)."""
    _STATE["signal"] = None


def settle() -> None:
    """Ignore both signals from here to the exit: the outcome is decided. Python's finalization
    puts a Python-level handler back to the default action (terminate), so a signal during the
    seconds of teardown (threads, process groups, W&B) would kill a process that finished its
    work and turn its exit code into "killed by SIGUSR1"; an ignored signal is left alone."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@contextmanager
def shielded():
    """Start child processes in here: they inherit both signals blocked (a blocked mask survives
    fork and exec; a preexec_fn would run Python in the child, unsafe with threads), so a signal
    meant for the step leaves them alone and they finish; this process gets any signal that
    arrived meanwhile when the block ends, as a recorded request."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
