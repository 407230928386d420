"""What every client-side I/O thread shares: the local pools' and the remote client's.

Each such thread owns one ZeroMQ socket (a ROUTER to local workers, a DEALER to a
scheduler). Caller threads reach it through ``inbox`` and the wake pipe, and close it
with ``request_close``. The exit-hook registry (``exit_hooks``) finishes their queued
work when the interpreter exits.

The socket rule has one exception, and this module is its one place: for speed, a
caller thread may send on the socket itself while the I/O thread sleeps in poll
(``send_from_caller``), holding ``io_lock``, which the I/O thread holds whenever it is
awake. A ZeroMQ socket's file descriptor is edge-triggered and any operation on the
socket, a send included, may consume the edge that would have woken the I/O thread for
input already waiting; so after such a send, the caller asks ``needs_io_thread`` and
wakes the thread if it must look (the check-after-send).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, ClassVar

from . import exit_hooks
from .wakeup import WakePipe


class IOThread:
    """The skeleton of an I/O thread's state; subclasses give ``run`` (the thread's
    body) and ``needs_io_thread``."""

    thread_name: ClassVar[str]

    def __init__(self) -> None:
        self.inbox: deque[Any] = deque()  # work from callers, taken by the I/O thread
        self.wakeup = WakePipe()
        self.closing = False
        self.cancel_pending = False  # shutdown(cancel_futures=True) asked
        # Held by whoever uses the socket and the state behind it: the I/O thread,
        # except while it sleeps in poll, when a caller may take it (send_from_caller).
        self.io_lock = threading.Lock()
        self.thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)

    def run(self) -> None:
        """The I/O thread's body."""
        raise NotImplementedError

    def needs_io_thread(self) -> bool:
        """After a send from a caller thread (with ``io_lock``): must the I/O thread
        look (input waiting on its socket, work left for it)?"""
        raise NotImplementedError

    # -- caller side ---------------------------------------------------------------
    def send_from_caller(self, send: Callable[[Any], bool], arg: Any) -> bool:
        """Run ``send(arg)`` in the calling thread, holding ``io_lock``, if the lock is
        free: never wait for it (a done-callback the I/O thread runs may submit).
        ``send`` returns whether it took the work. False (the lock busy, or the work
        declined): the caller hands the work to the I/O thread instead. After a send,
        the check-after-send: wake the I/O thread if it needs to look."""
        lock = self.io_lock
        if not lock.acquire(False):  # (positional: a keyword costs more here)
            return False
        try:
            if not send(arg):
                return False
            if self.needs_io_thread():
                self.wake(True)  # our send may have taken the thread's signal
            return True
        finally:
            lock.release()

    def refuse_if_closed(self, futures: Iterable[Future]) -> None:
        """Cancel ``futures`` and raise as the stdlib does, once shutdown has begun."""
        if self.closing:
            for future in futures:
                future.cancel()
            raise RuntimeError("cannot schedule new futures after shutdown")

    def wake(self, force: bool = False) -> None:
        self.wakeup.wake(force)

    def request_close(self, cancel: bool) -> None:
        if cancel:
            self.cancel_pending = True
        self.closing = True
        self.wake()

    def join(self, timeout: float | None = None) -> None:
        if threading.current_thread() is not self.thread and self.thread.is_alive():
            self.thread.join(timeout)

    # -- I/O thread ----------------------------------------------------------------
    def release_thread_state(self) -> None:
        """Last in the I/O thread's cleanup, its sockets closed: no wake reaches it."""
        self.wakeup.close()
        exit_hooks.unregister(self)
