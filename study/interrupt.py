"""SIGTERM stops a command the way Ctrl-C does, and is never lost.

`make` passes SIGTERM on to the command it runs (as do kill, systemd and
docker stop), and a worker whose search died gets it from the kernel
(study/lifetime.py); by default Python would die on the spot and leave its
worker processes training and its trials RUNNING. The handler raises
KeyboardInterrupt("SIGTERM"), so running trials are told FAIL and outputs stay
whole. It also records the request: Python swallows an exception raised while
a weakref or GC callback runs ("Exception ignored in ..."), so the long loops
call `check` at safe points (each epoch, each ask, each search of hpo-bench)
and stop there.

A SIGTERM that comes while the interrupt is being handled (an `except` or
`finally` on its way out) raises nothing: a worker whose search was SIGKILLed
gets one parent-death signal per thread of the dead search, and each would
otherwise cut short the telling of trials FAIL. Once a command handles the
interrupt (`stop_begun`) every later SIGTERM is only recorded. Any other SIGTERM
raises again, so a second one after a swallowed first still stops the process;
SIGKILL ends a stop that hangs.
"""

from __future__ import annotations

import signal
import sys

_requested = False  # a SIGTERM came since `install`
_begun = False  # the interrupt is handled: trials are being told FAIL, workers stopped


def interrupt_on_sigterm(signum=None, frame=None):
    """SIGTERM handler: record the request and raise KeyboardInterrupt("SIGTERM"), unless one is being handled."""
    global _requested
    _requested = True
    if not _begun and not _being_handled():
        raise KeyboardInterrupt("SIGTERM")


def check() -> None:
    """A safe point: raise the requested stop here if its interrupt was lost (swallowed by a callback)."""
    if _requested and not _begun:
        raise KeyboardInterrupt("SIGTERM")


def stop_begun() -> None:
    """Called where the interrupt is handled: from now on a SIGTERM must not cut that short."""
    global _begun
    _begun = True


def install() -> None:
    """Make SIGTERM stop this process as Ctrl-C does (main thread only), with nothing requested yet."""
    global _requested, _begun
    _requested = _begun = False
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)


def restore(handler) -> None:
    """Put back the SIGTERM handler from before `install`; nothing is requested any more (a command run in-process)."""
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
