"""Faults on the local process pool: what a user sees when workers crash, payloads do
not pickle, initializers fail, or the client itself dies."""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import farpool

pytestmark = pytest.mark.timeout(90)


def crash_exit(code):
    os._exit(code)


def crash_sigkill():
    os.kill(os.getpid(), signal.SIGKILL)


def crash_segfault():
    ctypes.string_at(0)


def square(x):
    return x * x


def pid_of_worker(_=None):
    return os.getpid()


def slow(x, delay):
    time.sleep(delay)
    return x


def crash_once(marker):
    """Crash the first time (no marker file yet), succeed on the retry."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    return "second try"


class FailsToUnpickle:
    def __reduce__(self):
        return (_explode, ())


def _explode():
    raise ValueError("cannot rebuild this object here")


def return_fails_to_unpickle():
    return FailsToUnpickle()


@pytest.fixture
def pool():
    ex = farpool.ProcessPoolExecutor(max_workers=2)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("crash, words", [
    ((crash_exit, 3), "exit code 3"),
    ((crash_sigkill,), "SIGKILL"),
    ((crash_segfault,), "SIGSEGV"),
])
def test_crash_fails_only_that_task(pool, crash, words):
    fn, *args = crash
    before = [pool.submit(square, i) for i in range(4)]
    victim = pool.submit(fn, *args)
    after = [pool.submit(square, i) for i in range(20)]
    with pytest.raises(farpool.WorkerLost) as info:
        victim.result(timeout=30)
    # The error names the task and how the worker ended, and is a BrokenProcessPool.
    assert words in str(info.value)
    assert fn.__name__ in str(info.value)
    assert isinstance(info.value, cf.process.BrokenProcessPool)
    assert [f.result(timeout=30) for f in before] == [i * i for i in range(4)]
    assert [f.result(timeout=30) for f in after] == [i * i for i in range(20)]
    # The worker was replaced: the pool still has two and keeps working.
    assert pool.submit(square, 7).result(timeout=30) == 49


def test_repeated_crashes_do_not_break_the_pool(pool):
    for _ in range(5):
        with pytest.raises(farpool.WorkerLost):
            pool.submit(crash_exit, 1).result(timeout=30)
    assert list(pool.map(square, range(10))) == [i * i for i in range(10)]


def test_retries_rerun_a_task_whose_worker_died(tmp_path):
    with farpool.Executor("processes", max_workers=2, retries=1) as ex:
        marker = str(tmp_path / "crashed-once")
        assert ex.submit(crash_once, marker).result(timeout=30) == "second try"


def mark_or_die(path, die):
    """Append one mark to ``path`` (a count of runs), or kill the worker."""
    if die:
        os._exit(3)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # quick: the run must time as short
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def test_a_task_whose_result_the_dead_worker_held_back_never_runs_twice(tmp_path):
    # A worker holds a short task's result back while it runs the next one (results
    # are batched). Trained short, the function's two calls go to the one worker in
    # one batch; the second kills it. The first ran, so it must not run again on the
    # new worker: the caller gets its result or WorkerLost, never a second run.
    ran = tmp_path / "runs"
    ran.write_text("")
    with farpool.Executor("processes", max_workers=1) as ex:
        scratch = str(tmp_path / "training")
        open(scratch, "w").close()
        for _ in range(3):  # timed short, in the pool and in the worker
            list(ex.map(mark_or_die, [scratch] * 100, [False] * 100, timeout=30))
        first, second = ex._submit_many(mark_or_die, [(str(ran), False), (str(ran), True)])
        with pytest.raises(farpool.WorkerLost):
            second.result(timeout=30)
        try:
            assert first.result(timeout=30) is None
        except farpool.WorkerLost as exc:
            assert "before it reported the result" in str(exc)
        assert ex.submit(square, 3).result(timeout=30) == 9  # the worker was replaced
    assert ran.read_text() == "x"


def crash_once_later(marker, delay):
    time.sleep(delay)
    return crash_once(marker)


def test_cancel_futures_spares_tasks_already_started_when_their_worker_dies(tmp_path):
    # Tasks the worker had started or taken (prefetched) are requeued when it dies: they
    # are running already, so shutdown(cancel_futures=True) must let them finish, not
    # drop them and leave their futures running for ever.
    ex = farpool.Executor("processes", max_workers=1, retries=1)
    try:
        assert list(ex.map(square, range(50))) == [i * i for i in range(50)]  # timed short
        victim = ex.submit(crash_once_later, str(tmp_path / "crashed-once"), 0.5)
        time.sleep(0.1)
        behind = [ex.submit(square, i) for i in range(5)]
        time.sleep(0.1)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    assert victim.result(timeout=10) == "second try"
    for i, fut in enumerate(behind):
        assert fut.done()
        assert fut.cancelled() or fut.result() == i * i


def test_argument_that_fails_to_unpickle_in_the_worker(pool):
    # The stdlib pool breaks whole here, with BrokenProcessPool: farpool fails this
    # task with a subclass of it, caused by the unpickling error, and goes on.
    fut = pool.submit(square, FailsToUnpickle())
    with pytest.raises(farpool.UnpicklingFailed, match="cannot rebuild") as info:
        fut.result(timeout=30)
    assert isinstance(info.value, cf.process.BrokenProcessPool)
    assert "_explode" in str(info.value.__cause__)  # the worker's traceback
    assert pool.submit(square, 3).result(timeout=30) == 9


def test_result_that_fails_to_unpickle_in_the_client(pool):
    fut = pool.submit(return_fails_to_unpickle)
    with pytest.raises(farpool.UnpicklingFailed, match="cannot rebuild") as info:
        fut.result(timeout=30)
    assert isinstance(info.value, cf.process.BrokenProcessPool)
    assert isinstance(info.value.__cause__, ValueError)
    assert pool.submit(square, 3).result(timeout=30) == 9


class ExitsWhenUnpickled:
    def __reduce__(self):
        return (sys.exit, (1,))


def test_exit_while_unpickling_fails_that_task_only(pool):
    # SystemExit while a worker rebuilds the arguments, or while the client rebuilds
    # the result: the stdlib reports BrokenProcessPool (after losing the pool).
    for fut in (pool.submit(square, ExitsWhenUnpickled()), pool.submit(ExitsWhenUnpickled)):
        with pytest.raises(cf.process.BrokenProcessPool):
            fut.result(timeout=30)
    assert pool.submit(square, 4).result(timeout=30) == 16


def raise_runtime_error():
    raise RuntimeError(123)


def test_remote_traceback_is_the_stdlib_type(pool):
    # What the stdlib's process pool sets as __cause__, for code that inspects it.
    exc = pool.submit(raise_runtime_error).exception(timeout=30)
    assert type(exc) is RuntimeError and exc.args == (123,)
    assert type(exc.__cause__) is cf.process._RemoteTraceback
    assert "raise RuntimeError(123)" in exc.__cause__.tb


def test_unpicklable_exception_reported_as_pickling_error(pool):
    fut = pool.submit(_raise_unpicklable)
    with pytest.raises(pickle.PicklingError, match="could not be pickled"):
        fut.result(timeout=30)


def _raise_unpicklable():
    import threading

    err = RuntimeError("holds a lock")
    err.lock = threading.Lock()
    raise err


def test_max_tasks_per_child_replaces_workers():
    with farpool.ProcessPoolExecutor(max_workers=1, max_tasks_per_child=2) as ex:
        pids = [ex.submit(pid_of_worker).result(timeout=30) for _ in range(6)]
    # Each worker ran exactly two tasks, then a fresh one took over.
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5]
    assert len(set(pids)) == 3


def test_workers_are_fresh_interpreters(pool):
    worker = pool.submit(pid_of_worker).result(timeout=30)
    with open(f"/proc/{worker}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert b"farpool.worker_loop" in argv, argv
    # For people: a short command line, and "farpool-worker" where ps -e and top look.
    assert len(b" ".join(argv)) < len(sys.executable) + 80, argv
    with open(f"/proc/{worker}/comm") as f:
        assert f.read().strip() == "farpool-worker"


def test_remote_traceback_of_a_lambda_names_its_file_and_line(pool):
    # cloudpickle names code it pickles by value "<dynamic-code>"; the traceback of a
    # lambda, closure or __main__ function keeps where it was written, source and all.
    divide = lambda x: 1 / x  # noqa: E731 - this very line shows in the traceback
    cause = str(pool.submit(divide, 0).exception(timeout=30).__cause__)
    assert __file__ in cause
    assert "divide = lambda x: 1 / x" in cause


def uses_farpool_in_the_worker():
    import farpool

    with farpool.ThreadPoolExecutor(1) as ex:
        return ex.submit(pow, 2, 5).result(timeout=10), farpool.__version__, farpool.WorkerLost.__name__


def test_tasks_can_use_the_whole_package_in_a_worker(pool):
    # Workers start without running farpool/__init__.py; a task that needs it gets it.
    assert pool.submit(uses_farpool_in_the_worker).result(timeout=30) == (
        32, farpool.__version__, "WorkerLost")


def test_mp_context_is_accepted():
    import multiprocessing

    with farpool.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        assert ex.submit(square, 5).result(timeout=30) == 25


def test_bad_constructor_arguments():
    with pytest.raises(ValueError):
        farpool.ProcessPoolExecutor(max_workers=0)
    with pytest.raises(ValueError):
        farpool.ProcessPoolExecutor(max_tasks_per_child=0)
    with pytest.raises(TypeError):
        farpool.ProcessPoolExecutor(initializer=42)
    with pytest.raises(ValueError, match="processes"):
        farpool.Executor("nosuchscheme://x")
    with pytest.raises(TypeError):
        farpool.ThreadPoolExecutor(max_workers="2")


def _run_script(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, cwd=os.path.dirname(__file__))


def test_workers_exit_when_the_client_is_killed(tmp_path):
    code = """
        import os, sys, time, farpool
        ex = farpool.ProcessPoolExecutor(max_workers=2)
        pids = {ex.submit(os.getpid).result(timeout=30) for _ in range(20)}
        print(" ".join(map(str, pids)), flush=True)
        time.sleep(60)
    """
    # The client's pool directory goes under tmp_path: killed, it cannot remove it.
    client = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        line = client.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert pids
    finally:
        client.kill()
        client.wait(10)
        client.stdout.close()
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        time.sleep(0.05)
    assert not alive, f"workers outlived their client: {alive}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_interpreter_exit_finishes_pending_work_without_shutdown():
    result = _run_script("""
        import farpool, time
        def shout(word):
            time.sleep(0.2)
            print(word, flush=True)
        ex = farpool.ProcessPoolExecutor(max_workers=2)
        ex.submit(shout, "apple")
        tex = farpool.ThreadPoolExecutor(max_workers=2)
        tex.submit(shout, "pear")
    """)
    assert result.returncode == 0, result.stderr
    assert "apple" in result.stdout and "pear" in result.stdout


def test_exit_right_after_shutdown_without_wait_finishes_running_task():
    # CPython's gh-83386 (its own test skips its process pool, which hangs there): a
    # script ends just after shutdown(wait=False); the task still runs, quietly.
    result = _run_script("""
        import sys, time
        from farpool import ProcessPoolExecutor
        def sleep_and_print(t, msg):
            time.sleep(t)
            print(msg)
            sys.stdout.flush()
        if __name__ == "__main__":
            t = ProcessPoolExecutor(max_workers=3)
            t.submit(sleep_and_print, 1.0, "apple")
            t.shutdown(wait=False)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip() == "apple"


def test_initializer_failure_in_processes_is_broken_executor():
    ex = farpool.ProcessPoolExecutor(max_workers=2, initializer=crash_exit, initargs=(0,))
    try:
        with pytest.raises(cf.BrokenExecutor):
            ex.submit(square, 1).result(timeout=30)
    finally:
        ex.shutdown()


@pytest.fixture(scope="module")
def spawn_context():
    """A spawn context with multiprocessing's resource tracker already running: the
    tracker is a child process that lives as long as the session, not a leak."""
    import multiprocessing
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    return multiprocessing.get_context("spawn")


def log_to_queue_then_fail(queue):
    # As a user's initializer would send its workers' logs home (the logging cookbook).
    import logging
    from logging.handlers import QueueHandler

    logger = logging.getLogger("concurrent.futures")
    logger.addHandler(QueueHandler(queue))
    logger.propagate = False
    raise ValueError("error in initializer")


def test_initializer_gets_multiprocessing_objects_and_its_failure_is_logged(spawn_context):
    # Like the stdlib's pool under spawn: a multiprocessing Queue is a valid initarg,
    # and a failing initializer is logged (CRITICAL, "concurrent.futures") before the
    # pool reports itself broken.
    queue = spawn_context.Queue()
    ex = farpool.ProcessPoolExecutor(1, mp_context=spawn_context,
                                     initializer=log_to_queue_then_fail, initargs=(queue,))
    try:
        with pytest.raises(cf.BrokenExecutor):
            ex.submit(square, 1).result(timeout=30)
        record = queue.get(timeout=10)
        assert record.levelname == "CRITICAL"
        assert "Exception in initializer" in record.getMessage()
        assert "ValueError: error in initializer" in record.getMessage()
    finally:
        ex.shutdown()
        queue.close()
        queue.join_thread()


def test_thread_initializer_failure_is_logged_like_the_stdlib(caplog):
    ex = farpool.ThreadPoolExecutor(1, initializer=raise_runtime_error)
    try:
        with caplog.at_level("CRITICAL", logger="concurrent.futures"):
            with pytest.raises(cf.BrokenExecutor):
                ex.submit(square, 1).result(timeout=30)
        assert any("Exception in initializer" in r.getMessage() and r.exc_info
                   for r in caplog.records)
    finally:
        ex.shutdown()


def add_to(counter, n):
    with counter.get_lock():
        counter.value += n
    return counter.value


def init_counter(counter):
    global _COUNTER
    _COUNTER = counter


def add_to_global(n):
    return add_to(_COUNTER, n)


def test_shared_value_as_initarg(spawn_context):
    counter = spawn_context.Value("i", 0)
    with farpool.ProcessPoolExecutor(2, initializer=init_counter, initargs=(counter,)) as ex:
        list(ex.map(add_to_global, [1] * 10))
    assert counter.value == 10


@pytest.mark.parametrize("backend", ["processes", "threads", "tcp"])
def test_shut_down_executor_writes_to_no_descriptor_reused_since(backend, request, tmp_path):
    # A pool's finalizer (and any shutdown after the first) used to wake its finished
    # I/O thread by writing b"x" to the wake-up pipe's descriptor number, closed by
    # then: a file opened since under that number got the byte. So a multiprocessing
    # Value made after an earlier pool had shut down read 130 for 10 (b"x" is 120) when
    # that pool was garbage-collected while the Value was in use.
    address = request.getfixturevalue("tcp_cluster") if backend == "tcp" else backend
    ex = farpool.Executor(address, max_workers=1)
    assert ex.submit(square, 3).result(timeout=30) == 9
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    ex.shutdown()
    files = []
    try:
        # Fill every descriptor number the pool has freed (they are all <= highest).
        while not files or files[-1].fileno() <= highest:
            files.append(open(tmp_path / f"file{len(files)}", "wb", buffering=0))
        ex.shutdown()
        del ex
        gc.collect()
        written = [f.name for f in files if os.fstat(f.fileno()).st_size]
        assert written == []
    finally:
        for f in files:
            f.close()


def test_fork_context_objects_are_refused_at_construction():
    import multiprocessing

    fds_before = len(os.listdir("/proc/self/fd"))
    lock = multiprocessing.get_context("fork").Lock()
    with pytest.raises(RuntimeError, match="fork"):
        farpool.ProcessPoolExecutor(1, initializer=init_counter, initargs=(lock,))
    del lock
    # Nothing of the half-built pool is left open (it used to keep a zmq context that
    # hung the garbage collector).
    assert len(os.listdir("/proc/self/fd")) == fds_before


def store(mapping, key, value):
    mapping[key] = value


def test_manager_proxies_work_in_tasks(pool, spawn_context):
    # Workers share the client's multiprocessing authkey, as the stdlib's children do.
    with spawn_context.Manager() as manager:
        shared = manager.dict()
        pool.submit(store, shared, "answer", 42).result(timeout=30)
        assert shared["answer"] == 42


def test_max_tasks_per_child_with_fork_context_is_refused_like_the_stdlib():
    import multiprocessing

    with pytest.raises(ValueError, match="fork"):
        farpool.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"),
                                    max_tasks_per_child=3)


def test_dropped_executor_is_shut_down():
    ex = farpool.ProcessPoolExecutor(max_workers=1)
    fut = ex.submit(slow, 5, 0.2)
    del ex
    assert fut.result(timeout=30) == 5
