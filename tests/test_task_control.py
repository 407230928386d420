"""Task control: time limits that stop a task, ``Executor.stop``, per-task options and
Python 3.14's ``terminate_workers``/``kill_workers``.

The decisions (task_control) are tested with a fake clock; the rest with real worker
processes running tasks that a stop must get through: a busy loop, a long sleep, one
that ignores SIGTERM and SIGINT and swallows every exception, and one blocked in C
(libc ``pause()`` through ctypes). What the user sees is the future's error and the
time it took, and that the pool goes on at its size.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import time
from concurrent.futures import CancelledError, wait
from concurrent.futures.process import BrokenProcessPool

import pytest

import farpool
from farpool.task_control import (
    STOPPED,
    TIMED_OUT,
    TaskControl,
    check_task_options,
    outcome_of,
    retries_after_loss,
    retry_after_stop,
)

pytestmark = pytest.mark.timeout(120)

LIMIT = 0.5
GRACE = 1.0


# -- the decisions, on a fake clock ----------------------------------------------------
class _Task:
    def __init__(self, task_id: int, label: str = "fn") -> None:
        self.task_id, self.label, self.attempts = task_id, label, 0


def test_a_time_limit_gives_a_soft_stop_then_a_kill_after_the_grace():
    control = TaskControl()
    task = _Task(1)
    control.began(task, b"w1", limit=2.0, grace=3.0, now=100.0)
    assert control.next_due() == 102.0
    assert control.due(101.9) == []
    [(action, watch)] = control.due(102.0)
    assert (action, watch.why, watch.kill_at) == ("soft", TIMED_OUT, 105.0)
    assert control.next_due() == 105.0
    assert control.due(104.0) == []
    [(action, _)] = control.due(105.0)
    assert action == "kill"
    assert control.due(106.0) == [] and control.next_due() is None  # killed once
    gone = control.lost(b"w1")
    error = outcome_of(gone[1], None, died=True)
    assert isinstance(error, farpool.TaskTimeout) and isinstance(error, TimeoutError)
    assert "limit of 2 s and was killed with its worker after a grace of 3 s" in str(error)
    assert not control


def test_a_clock_starts_when_its_task_heads_the_workers_queue():
    from farpool.task_control import TaskOptions

    control = TaskControl()
    plain, timed = _Task(1), _Task(2)
    plain.options, timed.options = None, TaskOptions(timeout=2.0, grace=1.0)
    held = {1: plain, 2: timed}  # the timed task was handed ahead, behind the plain one
    control.head_began(b"w1", held, slots=1, now=10.0)
    assert not control  # it waits behind task 1: its clock has not started
    del held[1]  # task 1 answered
    control.head_began(b"w1", held, slots=1, now=10.5)
    assert control.next_due() == 12.5
    control.head_began(b"w1", held, slots=1, now=11.0)  # again: the clock runs on
    assert control.next_due() == 12.5


def test_a_result_that_was_on_its_way_at_the_limit_stands():
    control = TaskControl()
    control.began(_Task(1), b"w1", limit=2.0, grace=3.0, now=0.0)
    control.due(2.0)  # soft stop sent
    watch = control.finished(1)
    assert outcome_of(watch, 1.99) is None  # it returned within its limit
    error = outcome_of(watch, None)  # an error (the interrupt): the limit is the news
    assert isinstance(error, farpool.TaskTimeout) and "interrupted" in str(error)
    assert outcome_of(None, 5.0) is None  # never watched


def test_stop_is_a_cancelled_error_and_overrides_a_time_limit():
    control = TaskControl()
    task = _Task(7, "fit")
    control.began(task, b"w1", limit=60.0, grace=3.0, now=0.0)
    watch = control.stop(task, b"w1", grace=1.0, now=5.0)
    assert watch.why == STOPPED and watch.kill_at == 6.0 and watch.deadline == math.inf
    assert control.due(5.5) == []
    [(action, _)] = control.due(6.0)
    assert action == "kill"
    watch = control.finished(7)
    error = outcome_of(watch, None)
    assert isinstance(error, farpool.TaskStopped) and isinstance(error, CancelledError)
    assert str(error) == "task 7 (fit) was stopped while running: it was interrupted"
    # Killed: the message names the stop's grace (1 s), not the time limit's (3 s).
    assert str(outcome_of(watch, None, died=True)).endswith("killed after a grace of 1 s")
    # stop() means: never run it again; a time limit: while the retries allow.
    assert retries_after_loss({7: watch}, task, retries=5) == 0
    assert not retry_after_stop(task, error, retries=5)
    timed_out = farpool.TaskTimeout("late")
    assert retry_after_stop(task, timed_out, retries=1) and task.attempts == 1
    assert not retry_after_stop(task, timed_out, retries=1)


def test_task_options_are_checked_at_once():
    with pytest.raises(TypeError, match="unknown task option 'timout'; the options are "
                                        "timeout, retries, grace"):
        check_task_options({"timout": 3})
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError, match="timeout must be a finite number"):
            check_task_options({"timeout": bad})
    with pytest.raises(TypeError, match="timeout must be a number of seconds, not str"):
        check_task_options({"timeout": "5"})
    with pytest.raises(ValueError, match="retries must be an int"):
        check_task_options({"retries": -1})
    refined = check_task_options({"retries": 2}, check_task_options({"timeout": 5}))
    assert (refined.timeout, refined.retries, refined.grace) == (5.0, 2, None)


# -- real worker processes -------------------------------------------------------------
def spin():
    while True:
        pass


def sleep_forever():
    time.sleep(10**6)


def stubborn():
    """Ignores SIGTERM and SIGINT and swallows every exception, TaskInterrupted too."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            time.sleep(100)
        except BaseException:  # noqa: BLE001, S110 - the point of this task
            pass


def blocked_in_c():
    ctypes.CDLL(None).pause()


def pid():
    return os.getpid()


def cleans_up(path):
    try:
        time.sleep(10**6)
    finally:
        with open(path, "w") as f:
            f.write("finally ran")


def slow_the_first_time(marker):
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(10**6)
    return "second run"


HARD_TASKS = [spin, sleep_forever, stubborn, blocked_in_c]


def _pool_size_kept(ex, workers=2):
    """Tasks run, and the pool is back to ``workers`` processes (a killed one's
    replacement may still be starting)."""
    pids = {f.result(timeout=30) for f in [ex.submit(pid) for _ in range(20)]}
    assert 1 <= len(pids) <= workers
    deadline = time.monotonic() + 30
    while ex.stats()["workers"] != workers:
        assert time.monotonic() < deadline, ex.stats()
        time.sleep(0.02)


def limit_stops(ex, task):
    """``task`` under a time limit ends with TaskTimeout within limit + grace + 1 s,
    saying whether it was interrupted or killed; five other tasks finish meanwhile."""
    started = time.monotonic()
    limited = ex.options(timeout=LIMIT, grace=GRACE).submit(task)
    others = [ex.submit(time.sleep, 0.05) for _ in range(5)]
    with pytest.raises(farpool.TaskTimeout) as caught:
        limited.result(timeout=30)
    assert LIMIT <= time.monotonic() - started < LIMIT + GRACE + 1.0
    assert f"({task.__name__}) ran past its time limit of 0.5 s" in str(caught.value)
    if task is stubborn:
        assert "killed with its worker after a grace of 1 s" in str(caught.value)
    else:
        assert "interrupted" in str(caught.value)
    assert [f.result(timeout=30) for f in others] == [None] * 5


def stop_ends(ex, future, task):
    """``ex.stop`` ends a running ``future`` with TaskStopped (a CancelledError, not a
    cancellation) within the grace + 1 s; a second stop finds nothing to stop."""
    started = time.monotonic()
    assert ex.stop(future, grace=GRACE) is True
    with pytest.raises(farpool.TaskStopped) as caught:
        future.result(timeout=30)
    assert time.monotonic() - started < GRACE + 1.0
    assert isinstance(caught.value, CancelledError)
    assert not future.cancelled()  # it ran: stopped, not cancelled
    if task is stubborn:
        assert "its worker was killed after a grace of 1 s" in str(caught.value)
    assert ex.stop(future) is False  # done: nothing to stop


@pytest.mark.parametrize("task", HARD_TASKS, ids=lambda fn: fn.__name__)
def test_a_time_limit_stops_every_kind_of_task(task):
    with farpool.Executor("processes", max_workers=2) as ex:
        _pool_size_kept(ex)
        limit_stops(ex, task)
        _pool_size_kept(ex)


@pytest.mark.parametrize("task", HARD_TASKS, ids=lambda fn: fn.__name__)
def test_stop_ends_every_kind_of_running_task(task):
    with farpool.Executor("processes", max_workers=2) as ex:
        _pool_size_kept(ex)
        future = ex.submit(task)
        deadline = time.monotonic() + 30
        while not future.running():  # running: handed to a worker (it starts at once)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)  # inside the task
        stop_ends(ex, future, task)
        _pool_size_kept(ex)


def test_a_lone_timed_task_on_an_idle_pool_is_stopped():
    """The submitting thread sends a task to an idle worker itself; the I/O thread,
    asleep with no timer, must still learn of the limit. (Before: never stopped.)"""
    with farpool.Executor("processes", max_workers=2) as ex:
        _pool_size_kept(ex)
        future = ex.options(timeout=LIMIT).submit(sleep_forever)
        with pytest.raises(farpool.TaskTimeout):
            future.result(timeout=10)


def test_a_stopped_task_runs_its_finally_blocks(tmp_path):
    marker = tmp_path / "finally"
    with farpool.Executor("processes", max_workers=1) as ex:
        future = ex.options(timeout=LIMIT).submit(cleans_up, str(marker))
        with pytest.raises(farpool.TaskTimeout, match="interrupted"):
            future.result(timeout=30)
        assert marker.read_text() == "finally ran"


def test_a_task_that_times_out_once_then_succeeds_with_retries(tmp_path):
    marker = tmp_path / "ran once"
    with farpool.Executor("processes", max_workers=2) as ex:
        future = ex.options(timeout=LIMIT, retries=1).submit(slow_the_first_time, str(marker))
        assert future.result(timeout=30) == "second run"
        # Without retries the same task fails at its limit.
        marker.unlink()
        future = ex.options(timeout=LIMIT).submit(slow_the_first_time, str(marker))
        with pytest.raises(farpool.TaskTimeout):
            future.result(timeout=30)


def test_map_through_an_options_view():
    with farpool.Executor("processes", max_workers=2) as ex:
        limited = ex.options(timeout=LIMIT)
        results = limited.map(time.sleep, [0.01, 10**6, 0.01])
        assert next(results) is None
        with pytest.raises(farpool.TaskTimeout):
            next(results)  # and the map ends there, as a stdlib map does on an error
        # The time limit is per task, not per map: 40 short tasks take longer in all.
        assert list(limited.map(time.sleep, [0.02] * 40)) == [None] * 40


def test_stop_cancels_a_queued_task():
    with farpool.Executor("processes", max_workers=1) as ex:
        busy = ex.submit(time.sleep, 0.5)
        queued = [ex.submit(pid) for _ in range(3)]
        assert ex.stop(queued[-1]) is True
        assert queued[-1].cancelled()
        busy.result(timeout=30)
        assert all(isinstance(f.result(timeout=30), int) for f in queued[:-1])


def test_no_option_keeps_the_stdlib_cancel():
    with farpool.Executor("processes", max_workers=1) as ex:
        running = ex.submit(time.sleep, 0.5)
        while not running.running():
            time.sleep(0.01)
        assert running.cancel() is False  # the stdlib's meaning: a running task goes on
        assert running.result(timeout=30) is None


def test_an_options_view_shuts_down_alone():
    with farpool.Executor("processes", max_workers=1) as ex:
        view = ex.options(timeout=30)
        futures = [view.submit(time.sleep, 0.05) for _ in range(3)]
        view.shutdown(wait=True)
        assert all(f.done() for f in futures)
        with pytest.raises(RuntimeError, match="after shutdown"):
            view.submit(pid)
        assert isinstance(ex.submit(pid).result(timeout=30), int)  # the executor goes on
        other = ex.options(retries=1)
    with pytest.raises(RuntimeError, match="after shutdown"):
        other.submit(pid)  # its executor is shut down


def test_options_a_backend_cannot_honour_are_refused_at_once():
    with farpool.Executor("threads", max_workers=1) as ex:
        with pytest.raises(ValueError, match="the threads backend cannot honour the task "
                                             "option timeout"):
            ex.options(timeout=1)
        with pytest.raises(ValueError, match="cannot stop a running task"):
            future = ex.submit(time.sleep, 0.3)
            while not future.running():
                time.sleep(0.01)
            ex.stop(future)
        with pytest.raises(NotImplementedError, match="terminate_workers"):
            ex.terminate_workers()
    with farpool.Executor("processes", max_workers=1) as ex:
        with pytest.raises(TypeError, match="unexpected keyword argument 'time_limit'"):
            ex.options(time_limit=1)
        with pytest.raises(ValueError, match="grace must be a finite number"):
            ex.options(grace=-1)
        with pytest.raises(TypeError, match="stop\\(\\) takes a Future"):
            ex.stop("not a future")


# -- Python 3.14's terminate_workers and kill_workers ----------------------------------
def _worker_pids(ex):
    return {p.pid for p in ex._backend._io.procs.values()}


def _gone(pids, within=10.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = {p for p in pids if os.path.exists(f"/proc/{p}")
                 and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"}
        if not alive:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("method", ["terminate_workers", "kill_workers"])
def test_ending_the_workers_as_python_314_does(method, tmp_path):
    marker = tmp_path / "finished"
    with farpool.ProcessPoolExecutor(max_workers=1) as ex:
        assert ex.submit(pid).result(timeout=30)
        pids = _worker_pids(ex)
        running = ex.submit(cleans_up, str(tmp_path / "cleaned"))
        while not running.running():
            time.sleep(0.01)
        queued = [ex.submit(open, str(marker), "w") for _ in range(3)]
        started = time.monotonic()
        getattr(ex, method)()
        assert time.monotonic() - started < 0.5  # it does not wait
        with pytest.raises(RuntimeError, match="after shutdown"):
            ex.submit(pid)
        with pytest.raises(BrokenProcessPool):
            running.result(timeout=30)
        wait(queued, timeout=30)
        assert all(f.cancelled() or isinstance(f.exception(), BrokenProcessPool)
                   for f in queued)
        assert not marker.exists()  # no queued task ran
        getattr(ex, method)()  # a second call is harmless
    assert _gone(pids)


@pytest.mark.parametrize("method", ["terminate_workers", "kill_workers"])
def test_ending_workers_of_an_idle_or_healed_pool_does_not_raise(method):
    with farpool.ProcessPoolExecutor(max_workers=1) as ex:
        future = ex.submit(os._exit, 1)
        with pytest.raises(BrokenProcessPool):
            future.result(timeout=30)
        getattr(ex, method)()
    with farpool.ProcessPoolExecutor(max_workers=1) as ex:
        getattr(ex, method)()  # nothing ever ran


# -- Ctrl-C ----------------------------------------------------------------------------
CTRL_C_SCRIPT = """
import os, sys, time, farpool

def pid():
    time.sleep(0.3)  # so the two calls run on the two workers
    return os.getpid()

def stubborn():
    while True:
        try:
            time.sleep(100)
        except BaseException:
            pass

if __name__ == "__main__":
    if sys.argv[1] == "with":
        with farpool.Executor("processes", max_workers=2) as ex:
            print(sorted({f.result() for f in [ex.submit(pid) for _ in range(2)]}), flush=True)
            ex.submit(stubborn)
            list(ex.map(time.sleep, [100] * 10))
    else:  # no with block: the program ends on the KeyboardInterrupt
        ex = farpool.Executor("processes", max_workers=2)
        print(sorted({f.result() for f in [ex.submit(pid) for _ in range(2)]}), flush=True)
        ex.submit(stubborn)
        list(ex.map(time.sleep, [100] * 10))
"""


@pytest.mark.parametrize("shape", ["with", "bare"])
def test_ctrl_c_during_a_long_map_exits_at_once_and_leaves_no_worker(shape, tmp_path):
    """Ctrl-C in a terminal: SIGINT to the whole process group, client and workers.
    The workers ignore it; the client's KeyboardInterrupt cancels the queue and stops
    the running tasks (one of them swallows every exception: it is killed after 1 s).
    Before: the with block (or the exit) waited for every task, 100 s each."""
    import ast
    import subprocess
    import sys

    script = tmp_path / "long_map.py"
    script.write_text(CTRL_C_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), shape], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        workers = ast.literal_eval(proc.stdout.readline())
        assert len(workers) == 2
        time.sleep(0.5)  # inside the map
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(10)
        assert time.monotonic() - started < 3.0
        assert "KeyboardInterrupt" in proc.stderr.read()
        assert _gone(workers, within=1.0), "a worker process outlived its client"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


# -- asyncio ---------------------------------------------------------------------------
def test_cancelling_run_async_stops_the_running_task():
    """asyncio.wrap_future's cancellation leaves a running task running (the pool's one
    worker stays busy); run_async's stops it, so the next task runs at once."""
    import asyncio

    async def main(ex):
        task = asyncio.ensure_future(farpool.run_async(ex, sleep_forever, grace=GRACE))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        started = time.monotonic()
        assert await farpool.run_async(ex, pid) > 0
        return time.monotonic() - started

    with farpool.Executor("processes", max_workers=1) as ex:
        assert ex.submit(pid).result(timeout=30)
        assert asyncio.run(main(ex)) < GRACE + 1.0
        assert await_result_in_time_on_a_stdlib_pool()


def await_result_in_time_on_a_stdlib_pool():
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    async def main(ex):
        return await asyncio.wait_for(farpool.run_async(ex, pow, 2, 10), 10)

    with ThreadPoolExecutor(1) as ex:  # any executor: cancellation falls back to cancel()
        return asyncio.run(main(ex)) == 1024


# -- shutdown lets initializers finish -------------------------------------------------
def _slow_init(path):
    time.sleep(1.0)
    with open(os.path.join(path, str(os.getpid())), "w") as f:
        f.write("initialized")


def test_shutdown_wait_lets_a_worker_finish_its_initializer(tmp_path):
    """Before: of two workers starting a 1 s initializer, one was cut off by the with
    block's end (the task needed only one). As the stdlib's pool, shutdown(wait=True)
    lets both finish; only terminate_workers, kill_workers, a time limit or Ctrl-C
    cut an initializer short."""
    with farpool.Executor("processes", max_workers=2, initializer=_slow_init,
                          initargs=(str(tmp_path),)) as ex:
        assert ex.submit(pow, 2, 5).result(timeout=30) == 32
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["initialized"] * 2


# -- worker_info ----------------------------------------------------------------------
def info_of_worker():
    return farpool.worker_info()


def _record_rank(path):
    """Write this worker's rank to PATH/rank.PID whole (renamed into place: the test
    reads it as soon as it is there)."""
    info = farpool.worker_info()
    partial = os.path.join(path, f"partial.{info.pid}")
    with open(partial, "w") as f:
        f.write(str(info.rank))
    os.replace(partial, os.path.join(path, f"rank.{info.pid}"))


def test_worker_info_gives_each_process_a_rank_its_replacement_inherits(tmp_path):
    """An initializer can pin a GPU or a core by its worker's rank (0..N-1); a
    replacement for a dead worker takes the rank it leaves."""
    assert farpool.worker_info() is None  # not in a worker
    with farpool.Executor("processes", max_workers=2, initializer=_record_rank,
                          initargs=(str(tmp_path),)) as ex:
        infos = {f.result(timeout=30) for f in [ex.submit(info_of_worker) for _ in range(40)]}
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("rank.*"))) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert sorted(p.read_text() for p in tmp_path.glob("rank.*")) == ["0", "1"]
        info = next(iter(infos))
        assert info.pid != os.getpid() and info.host and info.worker_id
        victim = ex.submit(os._exit, 1)
        with pytest.raises(farpool.WorkerLost):
            victim.result(timeout=30)
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("rank.*"))) < 3:  # the replacement's initializer ran
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert sorted(p.read_text() for p in tmp_path.glob("rank.*")) in (["0", "0", "1"],
                                                                       ["0", "1", "1"])


def test_worker_info_on_threads():
    with farpool.ThreadPoolExecutor(2) as ex:
        info = ex.submit(info_of_worker).result(timeout=30)
    assert info.pid == os.getpid() and info.rank in (0, 1)
    assert farpool.worker_info() is None


# -- priority -------------------------------------------------------------------------
def append_label(path, label):
    with open(path, "a") as f:
        f.write(f"{label}\n")


def run_in_priority_order(ex, path, blocks):
    """Workers busy (``blocks``: seconds, one task each); then low, plain and high
    priority tasks queued behind them, in that order of submission. One worker serves
    the queue (the others are in longer blocks): the order they ran in is the order
    they were handed out."""
    blockers = [ex.submit(time.sleep, seconds) for seconds in blocks]
    time.sleep(0.2)
    futures = [ex.options(priority=-1).submit(append_label, path, "low") for _ in range(3)]
    futures += [ex.submit(append_label, path, "plain") for _ in range(3)]
    futures += [ex.options(priority=5).submit(append_label, path, "high") for _ in range(3)]
    for f in blockers + futures:
        f.result(timeout=30)
    with open(path) as f:
        return f.read().split()


def test_priority_orders_one_clients_queue(tmp_path):
    with farpool.Executor("processes", max_workers=1) as ex:
        ex.submit(pid).result(timeout=30)
        order = run_in_priority_order(ex, tmp_path / "order", blocks=[0.6])
    assert order == ["high"] * 3 + ["plain"] * 3 + ["low"] * 3
    with pytest.raises(TypeError, match="priority must be an int"):
        check_task_options({"priority": 1.5})


def sleep_and_mark(path, seconds):
    append_label(path, "ran")
    time.sleep(seconds)


def test_closing_a_buffered_map_early_cancels_what_it_buffered(tmp_path):
    """As Python 3.14's map(buffersize=N): closing the iterator cancels the buffered
    futures that have not started, and submits nothing more."""
    marks = tmp_path / "marks"
    with farpool.Executor("processes", max_workers=1) as ex:
        it = ex.map(sleep_and_mark, [marks] * 100, [0.3] * 100, buffersize=5)
        next(it)  # the first ran; the next one now runs, the rest of the buffer waits
        it.close()
    ran = marks.read_text().split()
    assert 1 < len(ran) <= 3  # the first, the one running at the close (and a refill)
