"""The drop-in classes against what code written for the stdlib pools reads and sees:
the private attributes people use (``_max_workers``, ``_threads``, ``_broken``,
``_mp_context``) and when thread workers are started."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import threading
import time

import pytest

import farpool

pytestmark = pytest.mark.timeout(60)


def identity(x):
    return x


def fail_init():
    raise ValueError("no")


def test_thread_pool_starts_one_thread_per_blocked_submit_up_to_max_workers():
    # As the stdlib's: three blocked tasks are three threads at once (CPython's
    # test_threads_terminate), never more than max_workers, joinable after shutdown.
    ex = farpool.ThreadPoolExecutor(max_workers=5)
    sem = threading.Semaphore(0)
    try:
        futs = [ex.submit(sem.acquire, True, 10) for _ in range(3)]  # bounded
        assert len(ex._threads) == 3
        for _ in range(3):
            sem.release()
        assert all(f.result(timeout=10) for f in futs)
    finally:
        ex.shutdown()
    for t in ex._threads:
        t.join(10)
        assert not t.is_alive()

    with farpool.ThreadPoolExecutor(max_workers=4) as ex:
        sem = threading.Semaphore(0)
        futs = [ex.submit(sem.acquire, True, 10) for _ in range(40)]
        assert len(ex._threads) == ex._max_workers == 4
        for _ in range(40):
            sem.release()
        assert all(f.result(timeout=10) for f in futs)


def test_thread_pool_reuses_an_idle_thread():
    # CPython's test_idle_thread_reuse: sequential tasks need one thread.
    with farpool.ThreadPoolExecutor(max_workers=4) as ex:
        for i in range(5):
            assert ex.submit(identity, i).result(timeout=10) == i
        assert len(ex._threads) == 1


def test_default_max_workers_match_the_stdlib():
    with farpool.ThreadPoolExecutor() as ex:
        assert ex._max_workers == min(32, (os.cpu_count() or 1) + 4)
    with farpool.ProcessPoolExecutor() as ex:
        assert ex._max_workers == (os.cpu_count() or 1)


def test_broken_flag_reads_like_the_stdlib():
    ex = farpool.ThreadPoolExecutor(max_workers=1, initializer=fail_init)
    try:
        assert ex._broken is False
        fut = ex.submit(identity, 1)
        with pytest.raises(cf.BrokenExecutor):
            fut.result(timeout=10)
        assert isinstance(ex._broken, str) and "initializer" in ex._broken
    finally:
        ex.shutdown()


def test_mp_context_is_the_one_given_else_spawn():
    ctx = multiprocessing.get_context("forkserver")
    with farpool.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
        assert ex._mp_context is ctx
    with farpool.ProcessPoolExecutor(max_workers=1, max_tasks_per_child=3) as ex:
        # Workers are fresh interpreters, as spawn's are.
        assert ex._mp_context.get_start_method() == "spawn"


def test_thread_pool_runs_blocking_tasks_side_by_side_after_a_busy_spell():
    # After sequential work (one thread, idle between tasks) and a map, three tasks
    # that block until released must all be running at once on three threads.
    with farpool.ThreadPoolExecutor(max_workers=3) as ex:
        for i in range(50):
            assert ex.submit(identity, i).result(timeout=10) == i
        list(ex.map(identity, range(200)))
        gate = threading.Event()
        futs = [ex.submit(gate.wait, 10) for _ in range(3)]
        deadline = time.monotonic() + 5
        while sum(f.running() for f in futs) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        running = sum(f.running() for f in futs)
        gate.set()
        assert all(f.result(timeout=10) for f in futs)
        assert running == 3, f"only {running} of 3 blocking tasks ran at once on 3 threads"


class _SlowSecondInit:
    """An initializer whose second call (the second thread's) takes a while."""

    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()
        self.second_done = threading.Event()

    def __call__(self):
        with self.lock:
            self.calls += 1
            second = self.calls == 2
        if second:
            time.sleep(0.2)
            self.second_done.set()


def test_a_task_cancelled_before_its_new_thread_started_leaves_that_thread_idle():
    # As the stdlib's: a thread started for a task that was cancelled before the
    # thread could take it counts as idle, so later submits use it instead of
    # starting a third thread.
    def run(cls):
        gate = threading.Event()
        init = _SlowSecondInit()
        ex = cls(max_workers=3, initializer=init)
        try:
            first = ex.submit(gate.wait, 10)
            second = ex.submit(identity, 2)  # starts a second thread, slow to come up
            assert second.cancel()
            assert init.second_done.wait(10)
            time.sleep(0.2)  # the second thread takes the cancelled task and skips it
            gate.set()
            assert first.result(timeout=10) is True
            time.sleep(0.2)  # the first thread counts itself idle again
            hold = threading.Event()
            later = [ex.submit(hold.wait, 10) for _ in range(2)]
            count = len(ex._threads)  # threads start in submit: counted at once
            hold.set()
            assert all(f.result(timeout=10) for f in later)
            return count
        finally:
            gate.set()
            ex.shutdown()

    assert run(cf.ThreadPoolExecutor) == run(farpool.ThreadPoolExecutor) == 2


class _FailSecondInit(_SlowSecondInit):
    def __call__(self):
        with self.lock:
            self.calls += 1
            second = self.calls == 2
        if second:
            raise ValueError("no second thread")


def test_a_failed_thread_initializer_lets_tasks_already_running_finish(monkeypatch):
    # The stdlib fails only the work items still waiting when a thread's
    # initializer fails: one already running on another thread returns its result.
    crashes = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    for cls in (cf.ThreadPoolExecutor, farpool.ThreadPoolExecutor):
        started = threading.Event()

        def long_task(started=started):
            started.set()
            time.sleep(0.3)
            return "finished"

        ex = cls(max_workers=2, initializer=_FailSecondInit())
        try:
            running = ex.submit(long_task)
            assert started.wait(10)
            waiting = ex.submit(identity, 1)  # starts the second thread, whose init fails
            with pytest.raises(cf.BrokenExecutor):
                waiting.result(timeout=10)
            assert running.result(timeout=10) == "finished", cls
        finally:
            ex.shutdown()
    assert crashes == []  # no worker thread died of an exception


def test_the_drop_ins_are_the_stdlib_classes_for_isinstance_and_asyncio():
    # Libraries check isinstance(ex, concurrent.futures.ThreadPoolExecutor), and
    # asyncio's set_default_executor refuses anything else (TypeError before).
    import asyncio

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(farpool.ThreadPoolExecutor(2))
        return await loop.run_in_executor(None, pow, 2, 8)

    assert asyncio.run(main()) == 256
    with farpool.ProcessPoolExecutor(1) as ex:
        assert isinstance(ex, cf.ProcessPoolExecutor)
        assert ex.submit(pow, 3, 3).result(timeout=30) == 27
    with farpool.ThreadPoolExecutor(1) as ex:
        assert isinstance(ex, cf.ThreadPoolExecutor)
        assert not isinstance(ex, cf.ProcessPoolExecutor)


def test_process_pool_follows_farpool_address_to_other_processes(monkeypatch, tcp_cluster):
    monkeypatch.setenv("FARPOOL_ADDRESS", tcp_cluster)
    with farpool.ProcessPoolExecutor(2) as ex:
        assert ex.address == tcp_cluster
        assert ex._max_workers == 2
        assert ex.submit(os.getpid).result(timeout=30) != os.getpid()
    with pytest.raises(ValueError, match="max_tasks_per_child is set on the worker daemons"):
        farpool.ProcessPoolExecutor(2, max_tasks_per_child=3)


@pytest.mark.parametrize("address", ["threads", "inline"])
def test_process_pool_keeps_to_processes_when_the_address_runs_in_this_process(monkeypatch, address):
    monkeypatch.setenv("FARPOOL_ADDRESS", address)
    with farpool.ProcessPoolExecutor(1) as ex:
        assert ex.address == "processes"
        assert ex.submit(os.getpid).result(timeout=30) != os.getpid()


def test_thread_pool_ignores_farpool_address(monkeypatch):
    monkeypatch.setenv("FARPOOL_ADDRESS", "processes")
    with farpool.ThreadPoolExecutor(1) as ex:
        assert ex.submit(os.getpid).result(timeout=30) == os.getpid()


def test_tqdm_thread_map_counts_every_task():
    import io

    from tqdm.contrib.concurrent import _executor_map

    bar = io.StringIO()
    results = _executor_map(farpool.ThreadPoolExecutor, identity, range(200), file=bar,
                            max_workers=2)
    assert results == list(range(200))
    assert "200/200" in bar.getvalue()
