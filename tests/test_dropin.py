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
