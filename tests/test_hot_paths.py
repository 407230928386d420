"""The shortcuts on the per-task path stay correct: a function pickled by value is
pickled again whenever what it captures may have changed, and a worker batches
results only where no result waits behind a long task."""

from __future__ import annotations

import collections
import math
import pickle
import threading
import time

import pytest
import zmq

import farpool
from farpool import protocol, serialize
from farpool.protocol import Kind
from farpool.worker_loop import PickledCalls, WorkerLoop

LIMIT = 10
TABLE = {"a": 1}


def helper(x):
    return x + LIMIT


def uses_helper(x):
    return helper(x) * math.pi


def uses_table(key):
    return TABLE[key]


def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def _by_value(fn):
    """Make a module-level function of this file pickle by value, like one in __main__."""
    fn.__module__ = "__main__"
    return fn


def test_by_value_function_pickle_is_reused_while_nothing_changed():
    pickler = serialize.FunctionPickler()
    offset = 3
    closure = lambda x: x + offset  # noqa: E731
    for fn in (closure, _by_value(lambda: None)):
        first, again = pickler(fn), pickler(fn)
        assert first[1] is again[1]  # the very same blob: not pickled twice
        assert first[0] == again[0]


def test_rebound_closure_cell_is_pickled_again():
    pickler = serialize.FunctionPickler()
    offset = 3
    fn = lambda x: x + offset  # noqa: E731
    key1, blob1 = pickler(fn)
    offset = 4  # noqa: F841 - read through the closure
    key2, blob2 = pickler(fn)
    assert key1 != key2
    assert pickle.loads(blob2)(1) == 5


def test_mutable_capture_is_never_cached():
    pickler = serialize.FunctionPickler()
    box = [1]
    fn = lambda: box[0]  # noqa: E731
    _, blob1 = pickler(fn)
    box[0] = 2
    _, blob2 = pickler(fn)
    assert blob1 is not blob2
    assert pickle.loads(blob2)() == 2
    assert serialize._captured(fn) is None


def test_rebound_global_of_a_helper_is_pickled_again(monkeypatch):
    pickler = serialize.FunctionPickler()
    fn = _by_value(_copy(uses_helper))
    monkeypatch.setitem(fn.__globals__, "helper", _by_value(_copy(helper)))
    key1, _ = pickler(fn)
    assert pickler(fn)[0] == key1
    # The helper it calls (pickled by value too) reads a global that is rebound.
    monkeypatch.setitem(fn.__globals__, "LIMIT", 20)
    key2, blob2 = pickler(fn)
    assert key2 != key1
    assert pickle.loads(blob2)(1) == (1 + 20) * math.pi


def test_global_defined_later_is_pickled_again(monkeypatch):
    pickler = serialize.FunctionPickler()
    fn = _by_value(_copy(uses_helper))
    later = _by_value(_copy(helper))
    monkeypatch.delitem(fn.__globals__, "helper")
    key1, _ = pickler(fn)
    monkeypatch.setitem(fn.__globals__, "helper", later)
    assert pickler(fn)[0] != key1


def test_function_reading_a_mutable_global_is_never_cached():
    fn = _by_value(_copy(uses_table))
    assert serialize._captured(fn) is None


def test_recursive_by_value_function_is_cached():
    fn = _by_value(_copy(fib))
    assert serialize._captured(fn) is not None


def test_changed_default_or_attribute_is_pickled_again():
    pickler = serialize.FunctionPickler()
    fn = _by_value(lambda x=1: x)
    key1, _ = pickler(fn)
    fn.__defaults__ = (2,)
    key2, blob2 = pickler(fn)
    assert key2 != key1 and pickle.loads(blob2)() == 2
    fn.tag = "t"
    assert pickler(fn)[0] != key2
    fn.tag = ["mutable"]
    assert serialize._captured(fn) is None


def _copy(fn):
    """A fresh function object with fn's code and globals (so tests may change it)."""
    clone = type(fn)(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__qualname__ = fn.__qualname__
    return clone


def sleep_then(value, delay):
    time.sleep(delay)
    return value


def test_result_never_waits_behind_a_long_task_of_a_short_function():
    # One worker, a function trained as short (so tasks are prefetched and results
    # batched), then a short call and a long call of it in one batch: the short
    # call's result comes while the long one still runs.
    with farpool.Executor("processes", max_workers=1) as ex:
        assert list(ex.map(sleep_then, range(200), [0.0] * 200)) == list(range(200))
        it = ex.map(sleep_then, [1, 2], [0.0, 3.0], timeout=1.5)
        assert next(it) == 1
        it.close()


def _task_frames(task_id, fn_key, blob, args):
    entry = [task_id, fn_key, int(blob is not None), 1]
    frames = ([blob] if blob is not None else []) + [pickle.dumps((args, {}))]
    return entry, frames


def test_worker_batches_results_of_short_tasks():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.bind("inproc://hot-paths-batching")
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.identity = b"w"
    dealer.connect("inproc://hot-paths-batching")
    stop = threading.Event()
    loop = WorkerLoop(dealer, PickledCalls(), stop=stop)
    thread = threading.Thread(target=loop.run, name="farpool-test-worker")
    thread.start()
    try:
        key, blob = serialize.FunctionPickler()(abs)
        entries, frames = [], []
        for i in range(500):
            entry, more = _task_frames(i, key, blob if i == 0 else None, (-i,))
            entries.append(entry)
            frames += more
        router.send_multipart([b"w", *protocol.encode(Kind.TASKS, [entries], frames)])
        results, messages = {}, 0
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while len(results) < 500:
            assert poller.poll(10_000), "no results"
            msg = protocol.decode(router.recv_multipart()[1:])
            messages += 1
            payload = msg.frames
            for entry in msg.body[0]:
                results[entry.task_id] = serialize.loads(payload[: entry.nframes])
                payload = payload[entry.nframes :]
        assert results == {i: i for i in range(500)}
        assert messages < 100  # batched: one message per result would be 500
    finally:
        stop.set()
        thread.join(10)
        dealer.close()
        router.close()
        ctx.term()


def test_thread_round_trips_go_from_the_caller_without_waking_the_io_thread():
    # With a worker idle and nothing queued, submit sends the task itself (run_now):
    # the pool's I/O thread is not woken, yet every result is right and in order.
    # Now and then the I/O thread wakes by itself (ZeroMQ's socket FD may signal
    # with nothing to read) and holds the pool's lock just as a submit comes: that
    # submit takes the general path, which wakes it. So: nearly every one, not all.
    with farpool.ThreadPoolExecutor(max_workers=2) as ex:
        assert ex.submit(identity, 0).result(timeout=10) == 0  # the worker is up
        io = ex._backend._io
        wakes, shortcuts = [], []
        wake, run_now = io.wake, io.run_now
        io.wake = lambda force=False: (wakes.append(1), wake(force))
        io.run_now = lambda task: shortcuts.append(run_now(task)) or shortcuts[-1]
        try:
            got = [ex.submit(identity, i).result(timeout=10) for i in range(200)]
        finally:
            del io.wake, io.run_now
        assert got == list(range(200))
        assert shortcuts.count(True) >= 190, shortcuts.count(True)
        assert len(wakes) <= 10, len(wakes)
        assert len(ex._threads) == 1  # sequential tasks needed one thread


def test_a_thread_task_cancelled_while_queued_gives_its_worker_back():
    # One thread, blocked; two tasks queue behind it and the first is cancelled.
    # The dispatcher hands both to the worker once it is free: the cancelled one
    # must not run, and must not keep the worker's only slot (else the pool hangs).
    ran = []
    gate = threading.Event()
    with farpool.ThreadPoolExecutor(max_workers=1) as ex:
        blocker = ex.submit(gate.wait, 10)
        cancelled = ex.submit(ran.append, "cancelled")
        after = ex.submit(ran.append, "after")
        assert cancelled.cancel()
        gate.set()
        assert blocker.result(timeout=10) is True
        assert after.result(timeout=10) is None
        assert ex.submit(identity, 7).result(timeout=10) == 7
    assert ran == ["after"]


def identity(x):
    return x


def worker_pid(_):
    import os

    return os.getpid()


def wait_for_file(path):
    import os

    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def test_short_tasks_do_not_wait_behind_a_worker_in_a_long_task(tmp_path):
    # One of two workers is held in a long task; a map of 400 short tasks (their
    # function timed short by a warm-up) runs on the other worker, none queued behind
    # the busy one. (The prefetch for short functions used to go to every worker.)
    flag = tmp_path / "release"
    with farpool.ProcessPoolExecutor(max_workers=2) as ex:
        assert len({ex.submit(worker_pid, i).result(timeout=30) for i in range(50)}) >= 1
        busy = ex.submit(wait_for_file, str(flag))
        time.sleep(0.2)  # it has started on one worker
        pids = list(ex.map(worker_pid, range(400), timeout=30))
        assert not busy.done()  # the whole map ran while it was held
        flag.touch()
        busy_pid = busy.result(timeout=30)
        assert busy_pid not in pids


def test_a_process_task_after_a_cancelled_one_still_runs(tmp_path):
    # One worker process, held; two tasks queue behind it and the first is cancelled.
    # When the worker is free, the dispatcher hands it the cancelled task, which is
    # taken back as it goes out: the task behind it must go out in the same turn,
    # not wait for something else to wake the pool.
    flag = tmp_path / "release"
    with farpool.ProcessPoolExecutor(max_workers=1) as ex:
        assert ex.submit(identity, 1).result(timeout=30) == 1
        blocker = ex.submit(wait_for_file, str(flag))
        cancelled = ex.submit(identity, "cancelled")
        after = ex.submit(worker_pid, "after")
        assert cancelled.cancel()
        flag.touch()
        assert blocker.result(timeout=30) == after.result(timeout=30)


def nap_pid(seconds, started=None):
    """Sleep; which worker ran it (process and thread)."""
    import os

    me = f"{os.getpid()}-{threading.get_ident()}"
    if started is not None:
        open(f"{started}.{me}", "w").close()
    time.sleep(seconds)
    return me


def _both_workers_up(ex):
    """Both workers have joined: under load the second process may still be starting
    when the first has run a whole map, and then a call handed ahead to the first
    stays there (prefetched tasks are not moved to a worker that joins later).
    Threads start at submit, as the stdlib's: nothing to wait for."""
    if isinstance(ex, farpool.ThreadPoolExecutor):
        return
    deadline = time.monotonic() + 30
    while ex.stats()["workers"] < 2:
        assert time.monotonic() < deadline, ex.stats()
        time.sleep(0.01)


@pytest.mark.parametrize("make", [lambda: farpool.ProcessPoolExecutor(max_workers=2),
                                  lambda: farpool.ThreadPoolExecutor(max_workers=2)],
                         ids=["processes", "threads"])
def test_slow_calls_of_a_function_timed_short_share_the_workers(make):
    # After quick calls, calls of 0.5, 0.02, 0.5, 0.5 s: two each per worker (2 x 0.5 s,
    # as the stdlib's), not three behind the first (they used to be prefetched there).
    with make() as ex:
        _both_workers_up(ex)
        list(ex.map(nap_pid, [0.0] * 100, timeout=30))
        ran = list(ex.map(nap_pid, [0.5, 0.02, 0.5, 0.5], timeout=30))
    assert sorted(collections.Counter(ran).values()) == [2, 2], ran


@pytest.mark.parametrize("make", [lambda: farpool.ProcessPoolExecutor(max_workers=2),
                                  lambda: farpool.ThreadPoolExecutor(max_workers=2)],
                         ids=["processes", "threads"])
def test_tasks_queued_behind_busy_workers_stay_cancellable(make, tmp_path):
    # Both workers in a slow call of a function timed short: what comes next waits in
    # the queue, where cancel() works (10 of 10, as the stdlib's thread pool), instead
    # of being handed ahead, where it counted as running (0 of 10).
    started = tmp_path / "started"
    with make() as ex:
        _both_workers_up(ex)
        list(ex.map(nap_pid, [0.0] * 100, timeout=30))
        busy = [ex.submit(nap_pid, 1.0, str(started)) for _ in range(2)]
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("started.*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # both have run longer than a short call takes
        queued = [ex.submit(nap_pid, 0.0) for _ in range(10)]
        assert sum(f.cancel() for f in queued) == 10
        assert len({f.result(timeout=30) for f in busy}) == 2
