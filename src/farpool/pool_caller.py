"""What caller threads do on a local pool (the caller side of ``pool.PoolIO``).

They reach the I/O thread through its inbox and wake pipe, or send a task to an idle
worker themselves, under ``io_lock``, through ``IOThread.send_from_caller`` (the one
exception to the socket rule, with its check-after-send; see io_thread.py). Nothing
here completes a future, so no done-callback runs in a submitting thread.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from . import exit_hooks, protocol
from .task_control import INTERRUPT_GRACE

if TYPE_CHECKING:
    import zmq

    from .dispatch import Dispatcher, Task, WorkerSlot
    from .task_control import TaskControl

__all__ = ["STOP_ALL", "PoolCallerSide"]

# A stop request for every running task (Ctrl-C); its grace is INTERRUPT_GRACE.
STOP_ALL = object()


class PoolCallerSide:
    """Mixed into ``PoolIO`` (the names below are its own, or its IOThread's)."""

    if TYPE_CHECKING:
        inbox: deque[Any]
        dispatcher: Dispatcher
        control: TaskControl
        closing: bool
        broken: BaseException | None
        cut_short: bool
        timers_changed: bool
        stop_requests: deque[tuple[Any, float]]
        freed: deque[Any]
        deferred: deque[Any]
        router: zmq.Socket
        thread: threading.Thread
        started: threading.Event

        def refuse_if_closed(self, futures: Any) -> None: ...
        def send_from_caller(self, send: Any, arg: Any) -> bool: ...
        def wake(self, force: bool = False) -> None: ...
        def request_close(self, cancel: bool) -> None: ...
        def join(self, timeout: float | None = None) -> None: ...
        def send_batch(self, worker: WorkerSlot, batch: list[Task]) -> bool: ...
        def dispatch(self) -> None: ...
        def take_freed(self) -> None: ...

    def start(self) -> None:
        exit_hooks.register(self)
        self.thread.start()
        if not self.started.wait(30):  # pragma: no cover - a stuck start is a bug
            raise RuntimeError("farpool I/O thread did not start")

    def post(self, tasks: list[Task]) -> None:
        self.refuse_if_closed(task.context for task in tasks)
        # Fast path: when the I/O thread is waiting and a worker is idle, the caller
        # sends the task itself, saving a thread switch on every round trip.
        direct = not self.inbox
        self.inbox.extend(tasks)
        if not (direct and self.send_from_caller(self.dispatch_now, None)):
            self.wake()

    def dispatch_now(self, _: None) -> bool:
        """In a submitting thread, with ``io_lock``: hand the inbox to idle workers;
        whether it did. Anything else (a queue to respect, no idle worker, a closing or
        broken pool) is left to the I/O thread. Nothing here completes a future, so no
        done-callback runs in the submitting thread.
        """
        dispatcher = self.dispatcher
        inbox = self.inbox
        if (len(inbox) == 1 and not self.closing and self.broken is None
                and not dispatcher.queued):
            # The common case (one submit, a worker idle): no queue to go through.
            worker = dispatcher.place(inbox[0])
            if worker is not None:
                self.send_batch(worker, [inbox.popleft()])
                return True
        if self.closing or self.broken is not None or dispatcher.queued or not dispatcher.has_room():
            return False
        while inbox:
            dispatcher.submit(inbox.popleft())
        self.dispatch()
        if self.freed:
            self.take_freed()  # a fast thread worker has answered already
        return True

    def interrupt(self) -> None:
        """Ctrl-C, or the program ending on it (see exit_hooks): cancel the queued
        tasks, stop the running ones within INTERRUPT_GRACE (where the kind of pool
        can), and close."""
        self.cut_short = True
        self.request_close(True)
        self.request_stop(STOP_ALL, INTERRUPT_GRACE)

    def request_stop(self, future: Any, grace: float) -> None:
        """From a caller: stop the running task of ``future`` (see task_control)."""
        self.stop_requests.append((future, grace))
        self.wake()

    def needs_io_thread(self) -> bool:
        # timers_changed: a caller's send started a time limit, which the I/O thread,
        # asleep in a poll with no timeout, must start waiting for.
        return bool(self.closing or self.inbox or self.dispatcher.queued or self.deferred
                    or self.timers_changed or self.may_have_input())

    def may_have_input(self) -> bool:
        """Is input waiting on the router (that a send may have hidden from poll)?"""
        return protocol.readable(self.router)

    def stats(self) -> dict[str, Any]:
        d = self.dispatcher
        running = d.in_flight()
        return {"workers": len(d.workers), "queued": d.queued, "running": running,
                "done": d.done, "pending": len(self.inbox) + d.queued + running}
