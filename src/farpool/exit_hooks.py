"""Letting queued work finish when the interpreter exits, for every I/O loop.

The stdlib's pools finish their queued work at exit even when nobody called
``shutdown``. farpool's I/O threads are daemon threads (an executor dropped without
``shutdown`` must not keep the interpreter alive), so the local pool and the remote
client register their I/O loops here, and one hook, run before ``threading`` joins
its non-daemon threads, asks each to close without cancelling and waits for it.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Protocol

# Each loop is waited for at most this long at exit (its workers get their own grace).
EXIT_JOIN_SECONDS = 20.0
# After Ctrl-C: the grace running tasks get (task_control.INTERRUPT_GRACE), and a little more.
INTERRUPTED_JOIN_SECONDS = 2.0


class ClosableLoop(Protocol):
    """What the exit hook needs of an I/O loop."""

    def request_close(self, cancel: bool) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...


_live: weakref.WeakSet[ClosableLoop] = weakref.WeakSet()
_lock = threading.Lock()
_installed = False
_exiting = False


def exiting() -> bool:
    """Whether the interpreter is exiting (new executors are refused then)."""
    return _exiting


def register(loop: ClosableLoop) -> None:
    """Close ``loop`` at exit unless it is closed first (held weakly)."""
    _install()
    _live.add(loop)


def unregister(loop: ClosableLoop) -> None:
    """``loop`` has closed: nothing left to do for it at exit."""
    _live.discard(loop)


def _at_exit() -> None:
    global _exiting
    _exiting = True
    loops = list(_live)
    # The program ends on Ctrl-C (an uncaught KeyboardInterrupt, which the interpreter
    # has printed and kept as sys.last_value): stop, do not wait for the work.
    interrupted = isinstance(getattr(sys, "last_value", None), KeyboardInterrupt)
    for loop in loops:
        interrupt = getattr(loop, "interrupt", None)
        if interrupted and interrupt is not None:
            interrupt()
        else:
            loop.request_close(cancel=interrupted)
    for loop in loops:
        loop.join(INTERRUPTED_JOIN_SECONDS if interrupted else EXIT_JOIN_SECONDS)


def _install() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        hook = getattr(threading, "_register_atexit", None)
        if hook is not None:
            hook(_at_exit)  # runs before threading joins non-daemon threads
        else:  # pragma: no cover
            import atexit

            atexit.register(_at_exit)
        _installed = True
