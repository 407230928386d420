"""The futures farpool hands out: real concurrent.futures.Future objects, which make
their Condition only when something first uses it."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading

import farpool
from farpool.futures import LazyFuture, new_future


def test_every_backend_future_is_a_real_future_that_waits_like_one():
    with farpool.ThreadPoolExecutor(2) as ex:
        gate = threading.Event()
        blocker = ex.submit(gate.wait, 10)
        blocker2 = ex.submit(gate.wait, 10)
        queued = ex.submit(pow, 2, 10)
        assert isinstance(queued, cf.Future)
        # Queued behind busy workers, nobody waiting: no Condition yet.
        assert "_condition" not in vars(queued)
        done, not_done = cf.wait([queued], timeout=0.05)
        assert not done and not_done == {queued}
        gate.set()
        assert [f.result(timeout=10) for f in cf.as_completed([queued, blocker, blocker2],
                                                             timeout=10)]
        assert queued.result() == 1024

        async def awaited() -> int:
            return await asyncio.wrap_future(ex.submit(pow, 3, 3))

        assert asyncio.run(awaited()) == 27


def test_first_use_from_many_threads_makes_one_condition():
    # Threads racing to be first must share one Condition: a waiter on one and a
    # notifier on another would hang.
    for _ in range(50):
        future = new_future()
        start = threading.Barrier(8)
        seen = []

        def touch(f=future, start=start, seen=seen):
            start.wait(5)
            seen.append(f._condition)

        threads = [threading.Thread(target=touch) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        assert len(seen) == 8 and len({id(c) for c in seen}) == 1


def test_a_waiter_is_woken_by_a_result_set_from_another_thread():
    future = new_future()
    setter = threading.Timer(0.05, future.set_result, args=("late",))
    setter.start()
    try:
        assert future.result(timeout=10) == "late"
    finally:
        setter.cancel()
    cancelled = new_future()
    assert cancelled.cancel() and cancelled.cancelled()
    failed = new_future()
    failed.set_exception(ValueError("no"))
    assert isinstance(failed.exception(timeout=1), ValueError)


def test_on_this_python_the_lazy_future_is_used():
    # new_future falls back to the plain Future on a Python whose Future sets other
    # attributes than the six LazyFuture knows; on the ones we support, it is lazy.
    assert new_future is LazyFuture
    assert set(vars(LazyFuture())) | {"_condition"} == set(vars(cf.Future()))
