"""Futures as arguments (farpool.dependencies): ``ex.submit(g, ex.submit(f, x))``.

Before, such a call failed with ``TypeError: cannot pickle '_thread.RLock' object``.
The decisions are tested here with plain futures and a recording submit (no sockets);
tests/test_contract.py runs chains on every backend.
"""

from __future__ import annotations

import concurrent.futures as cf

import pytest

import farpool
from farpool.dependencies import InputFailed, Pending
from farpool.dependencies import find_futures as find

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """A submit that records calls and returns futures the test completes."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.tasks: list[cf.Future] = []

    def __call__(self, fn, args, kwargs):
        self.calls.append((fn, args, kwargs))
        task = cf.Future()
        self.tasks.append(task)
        return task


def test_find_looks_in_arguments_and_one_level_of_containers():
    a, b, c, d = (cf.Future() for _ in range(4))
    assert find((a, [b, 1], {"k": c}), {"kw": (d,)}) == [a, b, c, d]
    assert find((1, "x", [1, 2]), {}) == []
    assert find(([cf.Future()] * 1001,), {}) == []  # too big to scan: passed as is


def test_the_call_waits_for_every_input_then_gets_their_results():
    a, b = cf.Future(), cf.Future()
    submit = Recorder()
    pending = Pending(max, (a, [b, 5]), {"default": a}, [a, b, a], submit)
    a.set_result(3)
    assert submit.calls == []  # b is not done yet
    b.set_result(7)
    assert submit.calls == [(max, (3, [7, 5]), {"default": 3})]
    assert not pending.future.done()
    submit.tasks[0].set_result(7)
    assert pending.future.result(timeout=0) == 7


def test_a_failed_input_fails_the_call_with_its_cause():
    a = cf.Future()
    submit = Recorder()
    pending = Pending(abs, (a,), {}, [a], submit)
    a.set_exception(KeyError("lost"))
    error = pending.future.exception(timeout=0)
    assert isinstance(error, InputFailed) and isinstance(error.__cause__, KeyError)
    assert "KeyError" in str(error) and submit.calls == []


def test_cancelling_an_input_or_the_call():
    a = cf.Future()
    submit = Recorder()
    pending = Pending(abs, (a,), {}, [a], submit)
    a.cancel()
    assert pending.future.cancelled() and submit.calls == []
    b = cf.Future()
    pending = Pending(abs, (b,), {}, [b], submit)
    assert pending.future.cancel()  # before its input is done: never submitted
    b.set_result(1)
    assert submit.calls == []
    c = cf.Future()
    pending = Pending(abs, (c,), {}, [c], submit)
    c.set_result(-1)
    assert pending.future.cancel()  # submitted: the task is cancelled too
    assert submit.tasks[-1].cancelled()


def test_the_drop_in_thread_pool_passes_futures_as_they_are():
    # As the stdlib's: a task may wait on a future it is given.
    with farpool.ThreadPoolExecutor(2) as ex:
        first = ex.submit(pow, 2, 3)
        assert ex.submit(lambda f: f.result(timeout=10) + 1, first).result(timeout=10) == 9


def test_shutdown_waits_for_calls_still_waiting_for_inputs():
    import time

    with farpool.Executor("threads", max_workers=2) as ex:
        first = ex.submit(lambda: (time.sleep(0.3), 4)[1])
        second = ex.submit(pow, first, 2)
    assert second.result(timeout=0) == 16
