"""The Future every backend hands out: a real ``concurrent.futures.Future``, lighter
while it waits.

A stdlib Future builds its ``threading.Condition`` in ``__init__``: about 1,360 of its
1,600 bytes. ``LazyFuture`` builds it the first time anything touches it (a wait, a
state change, a callback), so a task queued behind busy workers costs a fraction of
that; once touched, the Condition is an ordinary instance attribute and every method
is the stdlib's own, as fast as ever.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any


class _MadeOnFirstUse:
    """A non-data descriptor: the first read makes the Condition and stores it as an
    instance attribute, which every later read finds without coming here.

    Two threads may read it first at once, and must get the same Condition (a waiter
    on one and a notifier on another would hang): so the first read runs under a lock
    and looks, inside it, for a Condition another thread stored meanwhile, under a
    second name the class does not intercept. (Not ``__dict__.setdefault``: reading
    ``__dict__`` turns the instance's compact attribute storage into a dict, and every
    later attribute read gets slower.)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __get__(self, future: Any, owner: type | None = None) -> Any:
        if future is None:
            return self
        with self._lock:
            condition = future._made_condition  # the class's None until one is made
            if condition is None:
                condition = future._made_condition = threading.Condition()
                future._condition = condition
            return condition


# The attributes Future.__init__ sets, as of Python 3.8 to 3.14. Should a Python set
# others, LazyFuture is the plain Future: never a half-initialized one.
_STDLIB_LAYOUT = {"_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"}
_PENDING = Future()._state


class LazyFuture(Future):
    """A ``concurrent.futures.Future`` whose Condition is made on first use."""

    _condition = _MadeOnFirstUse()
    _made_condition: Any = None  # see _MadeOnFirstUse

    def __init__(self) -> None:
        # What Future.__init__ does, but the Condition.
        self._state = _PENDING
        self._result = None
        self._exception = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []


def _layout_matches() -> bool:
    return set(vars(Future())) == _STDLIB_LAYOUT


new_future: type[Future] = LazyFuture if _layout_matches() else Future
"""What backends call to make a task's future."""
