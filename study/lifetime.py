"""A command's process from start to end: how it was started, how it stops, and that it never outlives its parent.

No process outlives the one that started it (docs/parallel.md).

A search's worker processes, or a command run by `make`, whose parent is
SIGKILLed (the OOM killer, a CI timeout, `kill -9`) would go on training and
telling trials under PID 1, with nobody to read their output or stop them.
Each such process follows its parent: on Linux the kernel sends
it SIGTERM the moment the parent dies (prctl PR_SET_PDEATHSIG), which it
handles as it does any SIGTERM (its trials are told FAIL); a watchdog thread
notices the parent gone within a second where prctl is missing, and kills the
process outright if it has not ended GRACE_SECONDS after that.

SIGTERM stops a command the way Ctrl-C does, in the command line's process and
in each search worker. `program_name` is what the
user typed to start it, so that usage lines and printed commands paste back.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

# The environment variable by which `make` names itself as the parent a command must not outlive
# (the Makefile's recipes set it to make's pid). Read once and removed: a process the command starts
# has a parent of its own.
PARENT_VARIABLE = "STUDY_PARENT_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_SECONDS = 1.0
# A search told to stop fails its trials and stops its workers, each given 30 s (worker_processes.STOP_SECONDS).
GRACE_SECONDS = 45


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `signum` when our parent dies (Linux); False where it cannot.

    Usable as a subprocess `preexec_fn`: it runs in the child, and the setting survives exec.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def follow_parent(parent_pid: int) -> None:
    """End this process (SIGTERM, then SIGKILL after GRACE_SECONDS) once `parent_pid` is no longer its parent.

    Call it after this process's SIGTERM handler is in place.
    """
    by_kernel = set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl above: the kernel will not tell us
        _stop(by_kernel=False)
        return
    threading.Thread(target=_watch, args=(parent_pid, by_kernel), name="follow-parent", daemon=True).start()


def follow_parent_from_environment() -> None:
    """Follow the parent named by PARENT_VARIABLE (make), if set."""
    text = os.environ.pop(PARENT_VARIABLE, "")
    if text.strip().isdigit():
        follow_parent(int(text))


def _watch(parent_pid: int, by_kernel: bool) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_SECONDS)
    _stop(by_kernel)


def _stop(by_kernel: bool) -> None:
    if not by_kernel:
        os.kill(os.getpid(), signal.SIGTERM)

    def kill_if_still_here():
        time.sleep(GRACE_SECONDS)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=kill_if_still_here, name="follow-parent-kill", daemon=True).start()


def program_name() -> str:
    """What the user typed to start us, so that usage lines and printed commands can be pasted back."""
    return "cnn-hpo" if os.path.basename(sys.argv[0] or "") == "cnn-hpo" else "python -m study"

# --- SIGTERM as Ctrl-C, never lost ----------------------------------------------------
#
# `make` passes SIGTERM on to the command it runs (as do kill, systemd and
# docker stop), and a worker whose search died gets it from the kernel
# (study/lifetime.py); by default Python would die on the spot and leave its
# worker processes training and its trials RUNNING. The handler raises
# KeyboardInterrupt("SIGTERM"), so running trials are told FAIL and outputs stay
# whole. It also records the request: Python swallows an exception raised while
# a weakref or GC callback runs ("Exception ignored in ..."), so the long loops
# call `check` at safe points (each epoch, each ask, each search of hpo-bench)
# and stop there.
#
# A SIGTERM that comes while the interrupt is being handled (an `except` or
# `finally` on its way out) raises nothing: a worker whose search was SIGKILLed
# gets one parent-death signal per thread of the dead search, and each would
# otherwise cut short the telling of trials FAIL. Once a command handles the
# interrupt (`stop_begun`) every later SIGTERM is only recorded. Any other SIGTERM
# raises again, so a second one after a swallowed first still stops the process;
# SIGKILL ends a stop that hangs.

_requested = False  # a SIGTERM came since `install_sigterm`
_begun = False  # the interrupt is handled: trials are being told FAIL, workers stopped


def interrupt_on_sigterm(signum=None, frame=None):
    """SIGTERM handler: record the request and raise KeyboardInterrupt("SIGTERM"), unless one is being handled."""
    global _requested
    _requested = True
    if not _begun and not _being_handled():
        raise KeyboardInterrupt("SIGTERM")


def check_interrupt() -> None:
    """A safe point: raise the requested stop here if its interrupt was lost (swallowed by a callback)."""
    if _requested and not _begun:
        raise KeyboardInterrupt("SIGTERM")


def stop_begun() -> None:
    """Called where the interrupt is handled: from now on a SIGTERM must not cut that short."""
    global _begun
    _begun = True


def install_sigterm() -> None:
    """Make SIGTERM stop this process as Ctrl-C does (main thread only), with nothing requested yet."""
    global _requested, _begun
    _requested = _begun = False
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)


def restore_sigterm(handler) -> None:
    """Put back the SIGTERM handler from before `install_sigterm`; nothing is requested any more (a command run in-process)."""
    global _requested, _begun
    signal.signal(signal.SIGTERM, handler)
    _requested = _begun = False


def _being_handled() -> bool:
    """Whether a SIGTERM interrupt is on its way out: the exception in hand, or one it was raised while handling."""
    error = sys.exc_info()[1]
    while error is not None:
        if isinstance(error, KeyboardInterrupt) and error.args == ("SIGTERM",):
            return True
        error = error.__context__
    return False
