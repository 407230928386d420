"""Task control on the daemons: the scheduler keeps the time limits and forwards
stops; the worker host's supervisor interrupts its worker process, then kills it.
Real scheduler and worker daemons on loopback with CURVE keys; the tasks are those of
test_task_control (a busy loop, a long sleep, one ignoring signals and swallowing
every exception, one blocked in C)."""

from __future__ import annotations

import os
import time
from concurrent.futures import CancelledError

import pytest

import farpool
from remote_cluster import HEARTBEAT, wait_for_workers
from test_remote import one_host_cluster
from test_task_control import (
    HARD_TASKS,
    LIMIT,
    limit_stops,
    pid,
    slow_the_first_time,
    stop_ends,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def daemons(key_dir, tmp_path_factory):
    """One scheduler and a worker host of 2 processes, shared by this module's tests:
    each test checks both processes are back before it starts."""
    yield from one_host_cluster(tmp_path_factory.mktemp("task-control"), "stops")


@pytest.fixture
def ex(daemons):
    wait_for_workers(daemons.address, 2)
    executor = farpool.Executor(daemons.address, heartbeat=HEARTBEAT)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _both_workers_serve(ex):
    pids = {f.result(timeout=30) for f in [ex.submit(pid) for _ in range(20)]}
    assert 1 <= len(pids) <= 2


@pytest.mark.parametrize("task", HARD_TASKS, ids=lambda fn: fn.__name__)
def test_a_time_limit_stops_every_kind_of_task_on_the_daemons(ex, daemons, task):
    limit_stops(ex, task)
    wait_for_workers(daemons.address, 2)  # the host replaced a killed process
    _both_workers_serve(ex)


@pytest.mark.parametrize("task", HARD_TASKS, ids=lambda fn: fn.__name__)
def test_stop_ends_every_kind_of_running_task_on_the_daemons(ex, daemons, task):
    future = ex.submit(task)
    time.sleep(0.5)  # it runs (tcp futures stay pending until their result)
    stop_ends(ex, future, task)
    wait_for_workers(daemons.address, 2)
    _both_workers_serve(ex)


def test_stop_cancels_a_queued_task_on_the_daemons(ex):
    busy = [ex.submit(time.sleep, 0.5) for _ in range(2)]
    queued = ex.submit(pid)
    time.sleep(0.2)
    assert ex.stop(queued) is True
    with pytest.raises(CancelledError):
        queued.result(timeout=30)
    assert [f.result(timeout=30) for f in busy] == [None, None]


def test_a_timed_out_task_is_retried_on_the_daemons(ex, tmp_path):
    marker = tmp_path / "ran once"
    future = ex.options(timeout=LIMIT, retries=1).submit(slow_the_first_time, str(marker))
    assert future.result(timeout=30) == "second run"


@pytest.mark.parametrize("method", ["terminate_workers", "kill_workers"])
def test_ending_the_workers_on_the_daemons_ends_this_clients_tasks_only(daemons, method):
    """As Python 3.14's: running futures fail with BrokenProcessPool, queued ones are
    cancelled, a second call does nothing, submit after raises; another client's
    task on the same daemons runs on."""
    from concurrent.futures import wait
    from concurrent.futures.process import BrokenProcessPool

    wait_for_workers(daemons.address, 2)
    other = farpool.Executor(daemons.address, heartbeat=HEARTBEAT)
    ex = farpool.Executor(daemons.address, heartbeat=HEARTBEAT)
    try:
        theirs = other.submit(time.sleep, 1.5)
        running = ex.submit(sleep_forever_in_python)
        queued = [ex.submit(pid) for _ in range(3)]
        time.sleep(0.5)
        started = time.monotonic()
        getattr(ex, method)()
        assert time.monotonic() - started < 0.5  # it does not wait
        with pytest.raises(RuntimeError, match="after shutdown"):
            ex.submit(pid)
        with pytest.raises(BrokenProcessPool, match=f"{method}"):
            running.result(timeout=30)
        done, not_done = wait(queued, timeout=30)
        assert not not_done
        getattr(ex, method)()  # a second call is harmless
        assert theirs.result(timeout=30) is None  # the other client's task was untouched
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        other.shutdown(wait=True, cancel_futures=True)
    wait_for_workers(daemons.address, 2)


def sleep_forever_in_python():
    while True:
        time.sleep(0.05)


CTRL_C_REMOTE = """
import os, sys, time, farpool

if __name__ == "__main__":
    if sys.argv[2] == "with":
        with farpool.Executor(sys.argv[1], heartbeat=0.5) as ex:
            ex.submit(os.getpid).result(timeout=30)
            print("ready", flush=True)
            list(ex.map(time.sleep, [100] * 10))
    else:  # no with block: the program ends on the KeyboardInterrupt
        ex = farpool.Executor(sys.argv[1], heartbeat=0.5)
        ex.submit(os.getpid).result(timeout=30)
        print("ready", flush=True)
        list(ex.map(time.sleep, [100] * 10))
"""


@pytest.mark.parametrize("shape", ["with", "bare"])
def test_ctrl_c_in_a_client_of_the_daemons_stops_its_tasks(daemons, tmp_path, shape):
    """SIGINT to the client's process group: it exits at once, its running tasks are
    stopped on the worker host (the host is free again), its queue dropped."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "remote_map.py"
    script.write_text(CTRL_C_REMOTE)
    wait_for_workers(daemons.address, 2)
    proc = subprocess.Popen([sys.executable, str(script), daemons.address, shape],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(10)
        assert time.monotonic() - started < 3.0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
    # The host's two processes are free for another client at once, not in 100 s.
    with farpool.Executor(daemons.address, heartbeat=HEARTBEAT) as ex:
        futures = [ex.submit(time.sleep, 0.3) for _ in range(2)]
        assert [f.result(timeout=5) for f in futures] == [None, None]


def test_worker_info_on_the_daemons_names_the_host_and_ranks(ex):
    from test_task_control import info_of_worker

    infos = {f.result(timeout=30) for f in [ex.submit(info_of_worker) for _ in range(40)]}
    assert {info.host for info in infos} == {"stops"}  # the worker daemon's --name
    assert {info.rank for info in infos} <= {0, 1}


def test_priority_orders_one_clients_queue_on_the_daemons(ex, tmp_path):
    from test_task_control import run_in_priority_order

    # The host's second process stays in a 3 s task: one process serves the queue.
    order = run_in_priority_order(ex, tmp_path / "order", blocks=[0.6, 3.0])
    assert order == ["high"] * 3 + ["plain"] * 3 + ["low"] * 3
