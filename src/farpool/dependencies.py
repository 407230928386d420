"""Futures as arguments: ``ex.submit(g, ex.submit(f, x))`` runs ``g(f(x))``.

A future cannot travel to a worker (it holds a lock), and a task that waited for one
inside a worker would hold that worker idle. So the executor finds futures among a
call's arguments (``find_futures``: the arguments themselves, and the items of a list, tuple,
set or dict argument, up to ``MAX_SCAN`` of them), hands back a future of its own at
once, and submits the call only when its inputs are done (``Pending``), with each input
replaced by its result. If an input failed, the call fails with ``InputFailed`` (its
``__cause__`` is the input's exception); if an input was cancelled, so is the call.
Cancelling the call's future before it was submitted means it never is.

No sockets and no threads here: ``Pending`` moves on in the done-callbacks of its
inputs, so a chain of any length holds no worker and no thread while it waits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .errors import FarpoolError
from .futures import new_future

__all__ = ["InputFailed", "Pending", "find_futures"]

# Containers with more items than this are passed as they are, unscanned: a submit
# must stay cheap for a call with a million-item list.
MAX_SCAN = 1000
_CONTAINERS = (list, tuple, set, frozenset, dict)


class InputFailed(FarpoolError):
    """A task's argument was a future that failed; ``__cause__`` is its exception."""


def find_futures(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Future]:
    """The futures among a call's arguments (see the module docstring), in order."""
    found: list[Future] = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, Future):
            found.append(value)
        elif type(value) in _CONTAINERS and len(value) <= MAX_SCAN:
            items = value.values() if type(value) is dict else value
            found.extend(v for v in items if isinstance(v, Future))
    return found


def _resolved(value: Any) -> Any:
    if isinstance(value, Future):
        return value.result()
    kind = type(value)
    if kind in _CONTAINERS and len(value) <= MAX_SCAN:
        if kind is dict:
            return {k: _resolved(v) for k, v in value.items()}
        return kind(_resolved(v) for v in value)
    return value


class Pending:
    """A call waiting for its input futures; ``future`` is what the caller holds.

    ``submit(fn, args, kwargs)`` is called once every input is done and all of them
    succeeded; it returns the task's future, whose outcome becomes ``future``'s.
    """

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 inputs: list[Future], submit: Callable[..., Future]) -> None:
        self.future: Future = new_future()
        self._call = (fn, args, kwargs)
        self._submit = submit
        unique = list({id(f): f for f in inputs}.values())  # a future given twice waits once
        self._left = len(unique)
        self._lock = threading.Lock()
        self._task: Future | None = None
        self.future.add_done_callback(self._on_caller_done)
        for inp in unique:
            inp.add_done_callback(self._input_done)

    def _input_done(self, inp: Future) -> None:
        if self.future.done():
            return
        if inp.cancelled():
            self.future.cancel()
            return
        error = inp.exception()
        if error is not None:
            failed = InputFailed(f"an input of this task failed: {type(error).__name__}: {error}")
            failed.__cause__ = error
            if self.future.set_running_or_notify_cancel():
                self.future.set_exception(failed)
            return
        with self._lock:
            self._left -= 1
            if self._left:
                return
        fn, args, kwargs = self._call
        self._call = None  # type: ignore[assignment]
        try:
            task = self._submit(fn, tuple(_resolved(a) for a in args),
                                {k: _resolved(v) for k, v in kwargs.items()})
        except BaseException as exc:  # noqa: BLE001 - e.g. the executor shut down meanwhile
            if self.future.set_running_or_notify_cancel():
                self.future.set_exception(exc)
            return
        with self._lock:
            self._task = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: Future) -> None:
        if task.cancelled():
            self.future.cancel()
            return
        if not self.future.set_running_or_notify_cancel():
            return
        error = task.exception()
        if error is None:
            self.future.set_result(task.result())
        else:
            self.future.set_exception(error)

    def _on_caller_done(self, future: Future) -> None:
        if not future.cancelled():
            return
        with self._lock:
            task = self._task
        if task is not None:
            task.cancel()
